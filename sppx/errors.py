"""One error type for bad input: a single line naming the key, the value and what is allowed."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """Bad user input, detected before heavy work starts.

    ``str(err)`` is one line: ``<key>=<value>: <what is allowed>``.
    """

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key placed under a config group (``rows`` -> ``adapter.rows``)."""
        if not prefix or self.key.startswith(prefix + "."):
            return self
        return ConfigError(f"{prefix}.{self.key}", self.value, self.allowed)


class RunError(RuntimeError):
    """A run that cannot finish although its input was valid (training diverged, an invariant broke):
    ``str(err)`` is one line saying what happened and what is left on disk."""


def first_line(err: BaseException, limit: int | None = 300) -> str:
    """An exception's first line (its type name when it has no message), at most ``limit`` characters
    (None: the whole line)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError(key, value, allowed)`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, value, allowed)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_fraction(key: str, value: Any, *, closed_right: bool = False) -> float:
    """A number in [0, 1) (or [0, 1] with ``closed_right``)."""
    interval = "[0, 1]" if closed_right else "[0, 1)"
    ok = is_number(value) and value >= 0 and (value <= 1 if closed_right else value < 1)
    require(ok, key, value, f"must be a number in {interval}")
    return float(value)


def require_positive_int(key: str, value: Any, *, minimum: int = 1) -> int:
    require(is_int(value) and value >= minimum, key, value, f"must be an integer >= {minimum}")
    return int(value)


def check_annotated_types(hints: dict, values: dict, group: str) -> None:
    """Values against their ``bool`` / ``int`` / ``float`` annotations (``X | None`` also takes None):
    a boolean takes only true or false (the string 'false' is not false), an integer no fraction or
    string, a float only finite numbers. One ConfigError line naming ``group.key`` otherwise."""
    import math
    import types
    import typing

    for key, value in values.items():
        hint = hints.get(key)
        if hint is None:
            continue
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
        if args:
            kinds = [a for a in args if a is not type(None)]
            if value is None and type(None) in args:
                continue
            if len(kinds) != 1:
                continue
            hint = kinds[0]
        name = f"{group}.{key}" if group else key
        if hint is bool:
            require(isinstance(value, bool), name, value, "must be true or false")
        elif hint is int:
            require(is_int(value), name, value, "must be an integer")
        elif hint is float:
            require(is_number(value) and math.isfinite(value), name, value, "must be a finite number")

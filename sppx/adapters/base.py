"""What an adapter is: it wraps a model's target Linears with trainable parameters (``apply``), folds
them back into plain Linears (``merge``), and saves its weights beside the config that rebuilds it."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sppx.anatomy import PROJECTIONS, prunable_linears, replace_module
from sppx.errors import is_int, is_number, require
from sppx.masking import MaskedLinear

# sppx's own adapters (SPP, masked LoRA) under names no other tool claims; LoRA is saved in peft's format
# (adapter_config.json + adapter_model.safetensors), which PeftModel.from_pretrained loads.
CONFIG_FILE = "sppx_adapter.json"
WEIGHTS_FILE = "sppx_adapter.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


MAX_SCALE = 1e3  # alpha / r beyond this overflows float32 training within a step or two


def check_scale_args(r, alpha, dropout) -> None:
    """The LoRA-style settings every low-rank adapter shares: rank r, scale alpha / r, dropout."""
    require(is_int(r) and r >= 1, "adapter.r", r, "must be an integer >= 1")
    require(is_number(alpha) and math.isfinite(alpha), "adapter.alpha", alpha, "must be a finite number")
    require(
        0 < alpha / r <= MAX_SCALE,
        "adapter.alpha",
        alpha,
        f"gives the scale alpha / r = {alpha / r:g}, outside (0, {MAX_SCALE:g}]: 0 or less leaves the "
        "weights unchanged or flips the update, a larger one overflows the first step",
    )
    require(is_number(dropout) and 0 <= dropout < 1, "adapter.dropout", dropout, "must be a number in [0, 1)")


@dataclass
class Adapter:
    """``targets``: the Linears it wraps; ``lr``: the learning rate of this adapter's tuning recipe
    (``tune.lr`` takes it unless set). Each adapter moves the weights by a different amount per step
    (SPP's update is relative to W, LoRA's absolute), so each has its own lr, chosen on the validation
    split (``scripts/bench_recovery.py --lr-sweep``), never one shared value."""

    targets: list = field(default_factory=lambda: list(PROJECTIONS))
    lr: float | None = None

    name = "base"
    keeps_zeros = True  # whether merging leaves every zero of the pruned weights at exactly 0.0

    def __post_init__(self):
        require(
            isinstance(self.targets, list) and all(isinstance(t, str) for t in self.targets),
            "adapter.targets",
            self.targets,
            f"must list Linear names such as {', '.join(PROJECTIONS)}",
        )
        require(
            self.lr is None or (is_number(self.lr) and 0 < self.lr < 1),
            "adapter.lr",
            self.lr,
            "must be a number in (0, 1) (or null: set tune.lr)",
        )

    def check_shapes(self, linears: dict[str, tuple[int, int]]) -> None:
        """Validate against ``{module name: (out, in)}`` of the targeted Linears; raises ConfigError."""

    def apply(self, model: nn.Module) -> list[str]:
        """Freeze the model, wrap the targeted Linears, return their names. Only adapter weights train."""
        model.requires_grad_(False)
        return []

    def merge(self, model: nn.Module) -> list[str]:
        """Fold the adapter into the weights and restore plain Linears; return the merged names."""
        return []

    def wrapped(self, model: nn.Module) -> dict[str, nn.Module]:
        return {}

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Switch the adapter off (the model computes as if unadapted) or back on."""

    @contextlib.contextmanager
    def disabled(self, model: nn.Module):
        """The adapter switched off for the duration of the block (a teacher pass)."""
        self.set_enabled(model, False)
        try:
            yield
        finally:
            self.set_enabled(model, True)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module, state: dict[str, torch.Tensor]):
        """The adapter's tensors temporarily replaced by ``state`` (a snapshot from ``state()``)."""
        live = self.state(model)
        saved = {key: t.detach().clone() for key, t in live.items()}
        with torch.no_grad():
            for key, t in live.items():
                t.copy_(state[key])
        try:
            yield
        finally:
            with torch.no_grad():
                for key, t in live.items():
                    t.copy_(saved[key])

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable adapter tensors by a stable name (``<module>.<tensor>``)."""
        return {}

    def save(self, model: nn.Module, directory: Path) -> None:
        """``sppx_adapter.json`` (which rebuilds this adapter) beside ``sppx_adapter.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps({"type": self.name, **asdict(self)}, indent=2))
        state = {key: t.detach().cpu().contiguous() for key, t in self.state(model).items()}
        if state:
            save_file(state, str(directory / WEIGHTS_FILE))


@dataclass
class WrappingAdapter(Adapter):
    """An adapter that replaces each targeted Linear by a ``wrapper`` module built by ``wrap``: the
    wrapper keeps the Linear as ``.base``, lists its tensors in ``adapter_state()`` and folds itself
    into one weight in ``merged_weight()``."""

    wrapper = nn.Module

    def wrap(self, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def apply(self, model: nn.Module) -> list[str]:
        model.requires_grad_(False)
        linears = prunable_linears(model, self.targets)
        self.check_shapes({n: tuple(lin.weight.shape) for n, lin in linears.items()})
        for name, linear in linears.items():
            replace_module(model, name, self.wrap(linear).train(linear.training))
        return list(linears)

    def wrapped(self, model: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, m in model.named_modules() if isinstance(m, self.wrapper)}

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        for mod in self.wrapped(model).values():
            mod.enabled = enabled

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{p}": t
            for name, mod in self.wrapped(model).items()
            for p, t in mod.adapter_state().items()
        }

    @torch.no_grad()
    def merge(self, model: nn.Module) -> list[str]:
        merged = []
        for name, mod in self.wrapped(model).items():
            mod.base.weight.copy_(mod.merged_weight())  # the student's weight (masked) with the update
            base = mod.base.baked() if isinstance(mod.base, MaskedLinear) else mod.base
            replace_module(model, name, base)
            merged.append(name)
        return merged


def load_adapter(model: nn.Module, directory: Path) -> Adapter:
    """Rebuild the adapter from its saved config, wrap ``model`` with it and load its weights."""
    from sppx.adapters import ADAPTERS

    directory = Path(directory)
    if (directory / PEFT_CONFIG_FILE).is_file() and not (directory / CONFIG_FILE).is_file():
        return ADAPTERS["lora"].load_peft(model, directory)  # a LoRA saved in peft's format
    config = json.loads((directory / CONFIG_FILE).read_text())
    kind = config.pop("type")
    adapter = ADAPTERS[kind](**config)
    names = adapter.apply(model)
    weights_path = directory / WEIGHTS_FILE
    if names:
        saved = load_file(str(weights_path))
        with torch.no_grad():
            for key, t in adapter.state(model).items():
                t.copy_(saved[key])
    return adapter


@dataclass
class NoAdapter(Adapter):
    """``adapter=none``: nothing trains; the pruned model is the final model."""

    name = "none"

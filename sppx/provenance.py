"""Where a result came from: the sppx version and git commit, the base model's hub id and license, and
config values with the machine's paths taken out (for files that leave the machine)."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import sppx

ROOT = Path(sppx.__file__).resolve().parents[1]
# The hub model each embedded model was converted from, and its license.
EMBEDDED_BASES = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


@functools.cache
def sppx_provenance() -> dict:
    """``{"version", "commit"}``: the commit is None outside a git checkout; ``-dirty`` marks a tree with
    uncommitted changes."""
    commit = None
    if (ROOT / ".git").exists():
        try:
            head = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            commit = head + ("-dirty" if dirty else "") if head else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"version": sppx.__version__, "commit": commit}


def base_model(name: str) -> tuple[str | None, str | None]:
    """(hub id, license) of the model a run started from, where known: embedded models map to their hub
    source; a hub id is itself (license unknown); a local folder has none."""
    if name in EMBEDDED_BASES:
        return EMBEDDED_BASES[name]
    if "/" in name and not name.startswith(("/", ".", "~")) and not Path(name).exists():
        return name, None
    return None, None


# An absolute or home-relative path: at the start, or after a space, '=', '[', ',' or a quote.
_PATH = re.compile(r"""(?:^|(?<=[\s=\[,'"]))~?/[^\s,\[\]'"]*""")


def without_paths(value):
    """``value`` (nested dicts, lists, strings) with every absolute or home-relative path replaced by
    ``<path>/<its last part>``: what the machine's folders were called stays on the machine."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    if isinstance(value, str):
        return _PATH.sub(lambda m: f"<path>/{Path(m.group(0)).name}", value)
    return value

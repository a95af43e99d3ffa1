"""What an adapter is: it wraps a model's target Linears with trainable parameters (``apply``), folds
them back into plain Linears (``merge``), and saves its weights beside the config that rebuilds it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sppx.errors import require
from sppx.pruning.base import PROJECTIONS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


@dataclass
class Adapter:
    targets: list = field(default_factory=lambda: list(PROJECTIONS))

    name = "base"

    def __post_init__(self):
        require(
            isinstance(self.targets, list) and all(isinstance(t, str) for t in self.targets),
            "adapter.targets",
            self.targets,
            f"must list Linear names such as {', '.join(PROJECTIONS)}",
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

    def save(self, model: nn.Module, directory: Path) -> None:
        """``adapter_config.json`` (which rebuilds this adapter) beside ``adapter.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps({"type": self.name, **asdict(self)}, indent=2))
        state = {
            f"{name}.{p}": t.detach().cpu().contiguous()
            for name, mod in self.wrapped(model).items()
            for p, t in mod.adapter_state().items()
        }
        if state:
            save_file(state, str(directory / WEIGHTS_FILE))


def load_adapter(model: nn.Module, directory: Path) -> Adapter:
    """Rebuild the adapter from its saved config, wrap ``model`` with it and load its weights."""
    from sppx.adapters import ADAPTERS

    config = json.loads((Path(directory) / CONFIG_FILE).read_text())
    kind = config.pop("type")
    adapter = ADAPTERS[kind](**config)
    names = adapter.apply(model)
    weights_path = Path(directory) / WEIGHTS_FILE
    if names:
        state = load_file(str(weights_path))
        with torch.no_grad():
            for name, mod in adapter.wrapped(model).items():
                for p, t in mod.adapter_state().items():
                    t.copy_(state[f"{name}.{p}"])
    return adapter


@dataclass
class NoAdapter(Adapter):
    """``adapter=none``: nothing trains; the pruned model is the final model."""

    name = "none"

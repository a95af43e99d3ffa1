"""LoRA baselines for recovery: plain LoRA (through the ``peft`` library) and masked LoRA.

LoRA learns W + s * B A (B: out x r, zero at start; A: r x in; s = alpha / r). Its merge is dense: the
zeros of a pruned W fill in, and the run reports how much sparsity the merge destroyed. Masked LoRA
multiplies the update by W's keep-mask, W' = W + s * (B A) * mask, so every zero survives the merge.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sppx.adapters.base import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    Adapter,
    WrappingAdapter,
    check_scale_args,
)
from sppx.anatomy import prunable_linears, replace_module
from sppx.errors import ConfigError, require
from sppx.masking import MaskedLinear, apply_keep, forward_keep, student_weight

PEFT_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's modules in its files


class MaskedLoRALinear(nn.Module):
    """A frozen Linear plus s * (B A) * mask. The mask is the keep-mask of a MaskedLinear base (it follows
    the student's masks), or where W is nonzero when a plain (pruned) Linear is wrapped."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float):
        super().__init__()
        out_features, in_features = base.weight.shape
        self.base = base.requires_grad_(False)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        self.A = nn.Parameter(torch.empty(r, in_features, dtype=torch.float32, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, r, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        own_mask = None if isinstance(base, MaskedLinear) else base.weight.detach() != 0
        self.register_buffer("nonzero", own_mask, persistent=False)
        self.enabled = True  # False: the adapter is switched off (a teacher pass), the base Linear alone

    @property
    def mask(self) -> torch.Tensor:
        return self.base.keep if isinstance(self.base, MaskedLinear) else self.nonzero

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"A": self.A, "B": self.B}

    def delta(self) -> torch.Tensor:
        """s * (B A) * mask, the (out x in) update, in fp32."""
        return apply_keep(self.scale * (self.B @ self.A), self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # No dropout: one matmul with the merged weight (W * keep) + s (B A) * mask.
            w = self.base.weight
            merged = apply_keep(w, forward_keep(self.base)) + self.delta().to(w.dtype)
            return F.linear(x, merged, self.base.bias)
        return self.base(x) + F.linear(self.dropout(x), self.delta().to(x.dtype))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        if not (torch.isfinite(self.A).all() and torch.isfinite(self.B).all()):
            raise FloatingPointError("masked LoRA factors are not finite; refusing to merge")
        return (student_weight(self.base).float() + self.delta()).to(self.base.weight.dtype)


@dataclass
class LowRankArgs(Adapter):
    """The settings LoRA and masked LoRA share: rank ``r``, scale ``alpha / r`` and adapter dropout."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        check_scale_args(self.r, self.alpha, self.dropout)

    def check_shapes(self, linears) -> None:
        if not linears:
            raise ConfigError("adapter.targets", self.targets, "match no Linear of the model")
        name, (out_features, in_features) = min(linears.items(), key=lambda item: min(item[1]))
        require(
            self.r <= min(out_features, in_features),
            "adapter.r",
            self.r,
            f"must be <= {min(out_features, in_features)}, the smaller side of {name} "
            f"({out_features} x {in_features}): a larger rank adds parameters, not expressiveness",
        )


@dataclass
class MaskedLoRAAdapter(WrappingAdapter, LowRankArgs):
    """``adapter=masked_lora``: LoRA whose update is masked by the pruned weight's zeros."""

    name = "masked_lora"
    wrapper = MaskedLoRALinear
    keeps_zeros = True

    def wrap(self, linear: nn.Linear) -> MaskedLoRALinear:
        return MaskedLoRALinear(linear, self.r, self.alpha / self.r, self.dropout)


@dataclass
class LoRAAdapter(LowRankArgs):
    """``adapter=lora``: peft's LoRA injected into the targeted Linears. The merge is dense."""

    name = "lora"
    keeps_zeros = False

    def apply(self, model: nn.Module) -> list[str]:
        from peft import LoraConfig, inject_adapter_in_model

        model.requires_grad_(False)
        linears = prunable_linears(model, self.targets)
        self.check_shapes({n: tuple(m.weight.shape) for n, m in linears.items()})
        names = list(linears)
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names)
        inject_adapter_in_model(config, model)
        return names

    def wrapped(self, model: nn.Module) -> dict[str, nn.Module]:
        from peft.tuners.lora import LoraLayer

        return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{part}": getattr(mod, f"lora_{part}")["default"].weight
            for name, mod in self.wrapped(model).items()
            for part in ("A", "B")
        }

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        for mod in self.wrapped(model).values():
            mod.enable_adapters(enabled)

    def save(self, model: nn.Module, directory: Path) -> None:
        """peft's own format: ``PeftModel.from_pretrained(<the pruned model>, directory)`` loads it."""
        from peft import LoraConfig

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = list(self.wrapped(model))
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=names,
            task_type="CAUSAL_LM",
            base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
        )
        config.save_pretrained(str(directory))
        state = {
            f"{PEFT_PREFIX}{name}.lora_{part}.weight": t.detach().cpu().contiguous()
            for name, mod in self.wrapped(model).items()
            for part in ("A", "B")
            for t in [getattr(mod, f"lora_{part}")["default"].weight]
        }
        save_file(state, str(directory / PEFT_WEIGHTS_FILE))

    @classmethod
    def load_peft(cls, model: nn.Module, directory: Path) -> LoRAAdapter:
        """Inject a LoRA saved in peft's format into ``model`` (the pruned model it was tuned on)."""
        config = json.loads((Path(directory) / PEFT_CONFIG_FILE).read_text())
        names = list(config["target_modules"])
        adapter = cls(
            targets=sorted({n.rsplit(".", 1)[-1] for n in names}),
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=config["lora_dropout"],
        )
        adapter.apply(model)
        saved = load_file(str(Path(directory) / PEFT_WEIGHTS_FILE))
        with torch.no_grad():
            for name, mod in adapter.wrapped(model).items():
                for part in ("A", "B"):
                    key = f"{PEFT_PREFIX}{name}.lora_{part}.weight"
                    getattr(mod, f"lora_{part}")["default"].weight.copy_(saved[key])
        return adapter

    @torch.no_grad()
    def merge(self, model: nn.Module) -> list[str]:
        merged = []
        for name, mod in self.wrapped(model).items():
            base = mod.get_base_layer()
            if isinstance(base, MaskedLinear):  # the student's weight is W * keep; LoRA adds B A to it
                mod.base_layer = base = base.baked()
            mod.merge(safe_merge=True)  # raises on non-finite weights
            replace_module(model, name, base)
            merged.append(name)
        if hasattr(model, "peft_config"):  # left by peft's injection; the model is plain again
            del model.peft_config
        return merged

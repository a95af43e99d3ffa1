"""Adapters for recovery tuning. ``spp`` and ``masked_lora`` keep every zero through the merge;
``lora`` (peft) merges densely and the run reports the sparsity it lost."""

from sppx.adapters.base import Adapter, NoAdapter, load_adapter
from sppx.adapters.lora import LoRAAdapter, MaskedLoRAAdapter, MaskedLoRALinear
from sppx.adapters.spp import SPPAdapter, SPPLinear

ADAPTERS = {"none": NoAdapter, "spp": SPPAdapter, "lora": LoRAAdapter, "masked_lora": MaskedLoRAAdapter}

__all__ = [
    "ADAPTERS",
    "Adapter",
    "LoRAAdapter",
    "MaskedLoRAAdapter",
    "MaskedLoRALinear",
    "NoAdapter",
    "SPPAdapter",
    "SPPLinear",
    "load_adapter",
]

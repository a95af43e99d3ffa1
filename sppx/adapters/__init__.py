"""Adapters for recovery tuning. ``spp`` keeps every zero through the merge."""

from sppx.adapters.base import Adapter, NoAdapter, load_adapter
from sppx.adapters.spp import SPPAdapter, SPPLinear

ADAPTERS = {"none": NoAdapter, "spp": SPPAdapter}

__all__ = ["ADAPTERS", "Adapter", "NoAdapter", "SPPAdapter", "SPPLinear", "load_adapter"]

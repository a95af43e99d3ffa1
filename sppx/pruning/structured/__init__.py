"""Structured pruning: whole layers, attention heads and FFN neurons removed, the model physically
smaller (units), COMP and NutePrune, and the LLM-Pruner / FLAP / ShortGPT / magnitude baselines."""

from sppx.anatomy import Dims
from sppx.pruning.structured.base import OneShotStructured, StructuredContext, StructuredPruner
from sppx.pruning.structured.baselines import (
    FLAPPruner,
    LLMPrunerPruner,
    MagnitudeStructuredPruner,
    ShortGPTPruner,
)
from sppx.pruning.structured.comp import COMPPruner
from sppx.pruning.structured.nuteprune import NutePrunePruner
from sppx.pruning.structured.units import Budget, Structure, allocate, mask_model, shrink_model

__all__ = [
    "Budget",
    "COMPPruner",
    "Dims",
    "FLAPPruner",
    "LLMPrunerPruner",
    "MagnitudeStructuredPruner",
    "NutePrunePruner",
    "OneShotStructured",
    "ShortGPTPruner",
    "Structure",
    "StructuredContext",
    "StructuredPruner",
    "allocate",
    "mask_model",
    "shrink_model",
]

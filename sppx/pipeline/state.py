"""The run state: what one stage hands to the next."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from sppx.data import TokenizedCorpus
from sppx.interrupts import SignalGuard
from sppx.masking import StudentMasks
from sppx.pipeline.planning import Plan
from sppx.profiling import Stopwatch

log = logging.getLogger("sppx.pipeline")


@dataclass
class StructuredOutcome:
    info: dict  # results.json's prune.structure
    teacher: dict | None  # the pruner's teacher record (NutePrune), results.json's teacher
    dense_shapes: dict[str, tuple[int, int]]  # of the pruned Linears before pruning
    layers_kept: list[int]  # dense indices of the layers left, in order


@dataclass
class RunState:
    """Everything a stage may read or write. ``sections`` are results.json's sections, filled by the
    stages that own them (``report.complete_results`` puts them in order)."""

    plan: Plan
    watch: Stopwatch
    guard: SignalGuard
    progress: bool = True
    leader: bool = True  # the first process (the only one that measures and writes)
    logger: object = None
    model: torch.nn.Module | None = None
    tokenizer: object = None
    tokens: TokenizedCorpus | None = None
    eval_windows: torch.Tensor | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # keep-masks of the pruned Linears
    student_masks: StudentMasks | None = None  # dense weights masked in the forward (distilling teachers)
    structure: StructuredOutcome | None = None  # what a structured pruner removed
    recovery_teacher: object = None  # what tuning distils from (a structured pruner used the teacher)
    dense_merge: bool = False  # the adapter's merge fills the pruned zeros in (LoRA)
    ppl: dict[str, dict | None] = field(default_factory=dict)  # stage -> perplexity record
    zero_shot: dict[str, dict] = field(default_factory=dict)  # stage -> task -> metrics
    sections: dict = field(default_factory=dict)  # results.json sections written by the stages
    results: dict | None = None  # results.json, once the report stage has put the sections together
    started: float = field(default_factory=time.perf_counter)

    @property
    def pruned_changed(self) -> bool:
        """Whether pruning changed the model (else the pruned model is the dense one)."""
        return bool(self.masks) or self.structure is not None

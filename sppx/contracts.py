"""What the run expects of each component a config selects: the hooks it calls, and when.

These are Protocols (structural types): a class of your own does not need to inherit anything to be
selected with ``_target_``, it needs these attributes. The base classes in sppx (``sppx.pruning.base.
Pruner``, ``sppx.adapters.base.Adapter``, ``sppx.teachers.NoTeacher``) implement them with defaults,
so subclassing one of them is the short way. docs/extending.md walks through a complete example.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ModelSource(Protocol):
    """Where the model comes from (``model=smollm2-135m``, ``model=hub model.name=...``).

    Lifecycle: ``model_config()`` at plan time (shapes only, no weights), then ``load()`` once at the
    start of the run (and again for the dense copy the speed stage times)."""

    name: str

    def model_config(self): ...  # transformers PretrainedConfig

    def load(self) -> tuple[nn.Module, object]: ...  # (causal LM, tokenizer)


@runtime_checkable
class OneShotPruner(Protocol):
    """Weight pruning, block by block (``pruner=wanda sparsity=0.5``).

    Lifecycle, for each decoder block in turn: ``new_stats(linear)`` per targeted Linear, fed every
    calibration batch's input to that Linear (``stats.add(x)``); then ``prune(linear, stats, sparsity,
    pattern)`` zeroes weights in place and returns the keep-mask (``score`` gives the importance that
    masks and numerous teachers nest by); then the block's outputs feed the next block."""

    name: str
    targets: list[str]
    allocation: str
    allow_empty: bool
    updates_weights: bool  # rewrites kept weights (SparseGPT): no dense teacher then

    @property
    def needs_calibration(self) -> bool: ...

    def check_pattern(self, pattern, sparsity: float | None = None) -> None: ...

    def new_stats(self, linear: nn.Linear): ...

    def score(self, linear: nn.Linear, stats) -> torch.Tensor | None: ...

    def prune(self, linear: nn.Linear, stats, sparsity: float, pattern) -> torch.Tensor: ...


@runtime_checkable
class StructuredPrunerContract(Protocol):
    """Structured pruning (``pruner=comp pattern=structured sparsity=0.2``).

    Lifecycle: ``check(dims, sparsity)`` and ``budget(dims, sparsity)`` at plan time; at run time
    ``select(model, budget, context)`` returns the units to keep (it may rewrite kept weights), and the
    run removes the others physically."""

    name: str
    units: list
    targets: list[str]
    needs_calibration: bool
    uses_teacher: bool  # learns its masks with the teacher strategy (NutePrune)

    def check(self, dims, sparsity: float) -> None: ...

    def budget(self, dims, sparsity: float): ...

    def select(self, model: nn.Module, budget, ctx): ...


@runtime_checkable
class AdapterContract(Protocol):
    """Parameter-efficient recovery (``adapter=spp``).

    Lifecycle: ``check_shapes`` at plan time; ``apply(model)`` wraps the targeted Linears and leaves only
    the adapter's parameters trainable; the tuning stage trains them; ``save`` writes them; ``merge``
    folds them into plain Linears. ``keeps_zeros`` says whether the merge keeps every pruned zero."""

    name: str
    targets: list[str]
    keeps_zeros: bool

    def check_shapes(self, linears: dict[str, tuple[int, int]]) -> None: ...

    def apply(self, model: nn.Module) -> list[str]: ...

    def save(self, model: nn.Module, directory) -> None: ...

    def merge(self, model: nn.Module) -> list[str]: ...


@runtime_checkable
class Teacher(Protocol):
    """What the student learns from while tuning (``teacher=dense``, ``teacher=numerous``).

    Lifecycle: ``bind(model, masks, adapter, target)`` before tuning; ``begin(total_steps)``;
    per step ``before_step(step)``, ``teacher_outputs(...)`` and ``loss(student, teacher, lm_loss,
    token_mask)``; ``finish()``; ``report()`` is results.json's ``teacher`` section."""

    name: str
    needs_dense: bool  # the pruned weights stay dense, masked in the student's forward
    nested: bool  # masks nest by score (a sparsity schedule)

    def bind(self, model: nn.Module, masks, adapter, target: float) -> None: ...

    def begin(self, total_steps: int) -> None: ...

    def before_step(self, step: int) -> None: ...

    def teacher_outputs(self, model: nn.Module, input_ids, attention_mask): ...

    def loss(self, student, teacher, lm_loss, token_mask): ...

    def finish(self) -> None: ...

    def report(self) -> dict | None: ...


@runtime_checkable
class Stage(Protocol):
    """One step of a run (``sppx.pipeline.flow.STAGES`` lists them in order).

    ``enabled(plan)``: whether the config asks for it; ``check(plan)``: its settings, at plan time (no
    weights); ``run(state)``: the work, reading and writing the run state; ``all_processes``: whether
    the extra processes of data-parallel tuning run it too (else only the first process does)."""

    name: str
    all_processes: bool

    def enabled(self, plan) -> bool: ...

    def check(self, plan) -> None: ...

    def run(self, state) -> None: ...

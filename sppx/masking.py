"""Masks applied in the student's forward while the dense weights stay in place.

Distilling from the unpruned model (``teacher=dense``) or from the model under other masks
(``teacher=numerous``) needs the dense weights, and holding a second copy of the model would double its
memory. Instead every pruned Linear becomes a :class:`MaskedLinear` that shares the original weight
tensor and multiplies it by a keep-mask in its forward. The student is the model with masks on; the
intact teacher is the same modules with masks off. Merging bakes the mask into the weight.

Nested masks for the numerous-teacher schedule come from one ``uint8`` level per weight: the mask at
step ``k`` of ``steps`` keeps the weights whose level is above ``k``. Within each row, the weights the
pruner removed are ordered by its score, and at step ``k`` the lowest ``floor(k / steps * c)`` of the
row's ``c`` pruned weights are removed, so every mask contains the kept weights of every later one and
step ``steps`` is exactly the pruner's mask. Kept weights have level 255 (never removed).

:class:`DenseKeeper` lets the one-shot calibration engine compute the masks while leaving the weights
dense (and records the nested levels), so the masks can then be attached to the intact model.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sppx.anatomy import replace_module

if TYPE_CHECKING:
    from sppx.pruning.base import Pruner
    from sppx.pruning.masks import SparsityPattern

NEVER = 255  # level of a weight the pruner kept
MAX_STEPS = NEVER - 1


class _MaskedLinearFunction(torch.autograd.Function):
    """y = x (W * keep)^T + bias for a frozen W. The masked weight is rebuilt in the backward pass
    instead of being saved, so no (out x in) temporary per Linear stays alive between the passes."""

    @staticmethod
    def forward(ctx, x, weight, keep, bias):
        ctx.save_for_backward(weight, keep)
        return F.linear(x, apply_keep(weight, keep), bias)

    @staticmethod
    def backward(ctx, grad):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            raise RuntimeError("a MaskedLinear's weight and bias are frozen; only its input has a gradient")
        weight, keep = ctx.saved_tensors
        grad_x = grad @ apply_keep(weight, keep).to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def apply_keep(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``t`` with the entries ``keep`` marks False set to 0 (``torch.where``: on the CPU about twice as
    fast as multiplying by a bool mask, which converts it elementwise)."""
    return t if keep is None else torch.where(keep, t, 0.0)


def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None, bias=None
) -> torch.Tensor:
    """``F.linear(x, weight * keep, bias)`` without keeping the masked weight for the backward pass."""
    if keep is None:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaskedLinearFunction.apply(x, weight, keep, bias)
    return F.linear(x, apply_keep(weight, keep), bias)


class MaskedLinear(nn.Linear):
    """A Linear whose dense weight stays intact; its forward uses ``weight * keep`` while ``masked``.

    It shares the weight and bias tensors of the Linear it replaces (nothing is copied) and has the
    same state-dict keys. ``levels`` (optional, uint8) holds the nested masks of the numerous schedule.
    """

    def __init__(self, linear: nn.Linear, keep: torch.Tensor, levels: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        device = linear.weight.device
        self.register_buffer("keep", keep.to(device=device, dtype=torch.bool), persistent=False)
        self.register_buffer("levels", None if levels is None else levels.to(device), persistent=False)
        self.masked = True
        self.train(linear.training)

    def student_weight(self) -> torch.Tensor:
        """The weight the forward uses: ``weight * keep`` while masked, else the dense weight."""
        return apply_keep(self.weight, self.keep) if self.masked else self.weight

    @property
    def active_keep(self) -> torch.Tensor | None:
        return self.keep if self.masked else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_linear(x, self.weight, self.active_keep, self.bias)

    def baked(self) -> nn.Linear:
        """A plain Linear (same tensors) with the pruned weights set to exactly 0.0."""
        with torch.no_grad():
            self.weight.mul_(self.keep).add_(0.0)  # adding 0.0 turns -0.0 into 0.0
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, masked={self.masked}"


def student_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a student's forward uses: masked for a :class:`MaskedLinear`, else ``.weight``."""
    return linear.student_weight() if isinstance(linear, MaskedLinear) else linear.weight


def forward_keep(linear: nn.Module) -> torch.Tensor | None:
    """The keep-mask a Linear's forward applies now (None: the weight is used as it is)."""
    return linear.active_keep if isinstance(linear, MaskedLinear) else None


@torch.no_grad()
def nested_levels(scores: torch.Tensor, keep: torch.Tensor, steps: int) -> torch.Tensor:
    """uint8 levels such that ``levels > k`` is the mask at step ``k`` of ``steps`` (see the module doc).

    In each row the ``c`` pruned weights are ranked by ``scores`` (ascending, ties by column); the one of
    rank ``r`` is removed from step ``ceil(steps * (r + 1) / c)`` on. Step 0 removes nothing and step
    ``steps`` removes exactly the weights ``keep`` marks as pruned.
    """
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
    keep = keep.to(scores.device)
    key = scores.float().masked_fill(keep, float("inf"))
    order = key.argsort(dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    pruned_per_row = (~keep).sum(dim=1, keepdim=True).clamp(min=1)
    level = (steps * (rank + 1) + pruned_per_row - 1) // pruned_per_row
    return level.masked_fill(keep, NEVER).to(torch.uint8)


class StudentMasks:
    """The keep-masks of a model whose Linears were replaced by :class:`MaskedLinear` (``attach``).

    ``set_level`` moves every mask to one step of the nested schedule; ``dense()`` turns the masks off
    for a teacher pass; ``bake`` writes the masks into the weights and restores plain Linears.
    """

    def __init__(self, model: nn.Module, steps: int = 0):
        self.model, self.steps = model, steps
        self.level = steps
        self.named: dict[str, MaskedLinear] = {}

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        masks: dict[str, torch.Tensor],
        levels: dict[str, torch.Tensor] | None = None,
        steps: int = 0,
    ) -> StudentMasks:
        """Replace every Linear named in ``masks`` by a MaskedLinear using that keep-mask (shared, not
        copied; with ``levels``, each module gets its own keep tensor, set to step ``steps``)."""
        for name, keep in masks.items():
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear) or isinstance(linear, MaskedLinear):
                raise TypeError(f"{name}: expected a plain nn.Linear, got {type(linear).__name__}")
            own_levels = None if levels is None else levels[name]
            if own_levels is not None:
                keep = own_levels > steps
            replace_module(model, name, MaskedLinear(linear, keep, own_levels))
        students = cls(model, steps)
        students.named = {name: model.get_submodule(name) for name in masks}
        return students

    def keeps(self) -> dict[str, torch.Tensor]:
        """``{module name at attach time: keep-mask}``: the modules' own tensors, not copies."""
        return {name: mod.keep for name, mod in self.named.items()}

    def modules(self) -> dict[str, MaskedLinear]:
        """The MaskedLinears by their current path (adapters wrap them, so paths change after attach)."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, MaskedLinear)}

    @torch.no_grad()
    def set_level(self, level: int) -> None:
        """Every mask to step ``level`` of the nested schedule (in place)."""
        if not 0 <= level <= self.steps:
            raise ValueError(f"level must be in [0, {self.steps}], got {level}")
        if level == self.level:
            return
        for mod in self.named.values():
            if mod.levels is None:
                raise RuntimeError("these masks have no nested levels")
            torch.gt(mod.levels, level, out=mod.keep)
        self.level = level

    @contextlib.contextmanager
    def dense(self):
        """Masks off: the modules compute with the dense weights (the intact model)."""
        mods = list(self.named.values())
        for mod in mods:
            mod.masked = False
        try:
            yield
        finally:
            for mod in mods:
                mod.masked = True

    @contextlib.contextmanager
    def at_level(self, level: int):
        """Masks at another step of the schedule for the duration of the block."""
        previous = self.level
        self.set_level(level)
        try:
            yield
        finally:
            self.set_level(previous)

    def sparsity(self) -> float:
        """Fraction of the masked weights the student's forward removes now."""
        zeros = total = 0
        for mod in self.named.values():
            zeros += int((~mod.keep).sum())
            total += mod.keep.numel()
        return zeros / total if total else 0.0

    def bake(self) -> list[str]:
        """Zero the pruned weights in place and put plain Linears back; return the module names."""
        names = []
        for name, mod in self.modules().items():
            replace_module(self.model, name, mod.baked())
            names.append(name)
        return names


class DenseKeeper:
    """Keeps the dense weights through pruning: a block's weights are copied before its Linears are
    pruned and written back once its (pruned) outputs are computed, so only one block is ever copied.
    With ``steps``, the nested-mask levels of every pruned Linear are recorded from the pruner's scores."""

    def __init__(self, pruner: Pruner, steps: int = 0):
        self.pruner, self.steps = pruner, steps
        self.levels: dict[str, torch.Tensor] = {}
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def prune(self, name: str, linear: nn.Linear, stats, sparsity: float, pattern: SparsityPattern):
        self._saved.append((linear.weight, linear.weight.detach().clone()))
        scores = self.pruner.score(linear, stats) if self.steps else None
        if self.steps and scores is None:
            raise ValueError(f"pruner {self.pruner.name} has no fixed score to order nested masks by")
        keep = self.pruner.prune(linear, stats, sparsity, pattern)
        if self.steps:
            self.levels[name] = nested_levels(scores, keep, self.steps).cpu()
        return keep

    @torch.no_grad()
    def restore(self, _block_index: int | None = None) -> None:
        for weight, dense in self._saved:
            weight.copy_(dense)
        self._saved.clear()

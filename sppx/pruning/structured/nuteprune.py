"""NutePrune (Li et al. 2024): structured pruning by learned hard-concrete masks, distilled from
numerous teachers that are all the one model in memory. ``docs/nuteprune.md`` has the method as
implemented, its options, a measured run and every deviation from the paper and its reference code.

Mask learning. Every attention head (query head; with GQA the K/V heads are kept) and every FFN neuron
of every layer gets a hard-concrete gate (:mod:`~sppx.pruning.structured.hard_concrete`). A head's gate
multiplies its ``head_dim`` input columns of o_proj (a forward pre-hook); a neuron's gate multiplies
its outputs of gate_proj and of up_proj (forward hooks: act(z g) * (z u), as the reference; a fused
gate_up_proj's both halves; a plain MLP's up projection: act(z u)). Names are Llama's; every family
finds its own Linears through :mod:`sppx.anatomy` (LoRA targets too: q_proj is Phi-3's qkv_proj). The gates
start open (head ``log_alpha`` 10, neuron drop rate 0.01: ``log_alpha`` 4.6) and ``log_alpha`` is
clamped to [log 1e-2, log 1e2] after every optimizer step. The base weights are frozen; LoRA (rank 8,
alpha 8 on q_proj and v_proj) trains with the gates, its lr decaying linearly to 0 and its gradient
norm clipped at 1. The expected sparsity s_hat = 1 - E[kept prunable params] / total comes from the
keep probabilities P(z > 0); it is tied to the target t = t_final min(1, step / warmup) by the
Lagrangian l1 (s_hat - t) + l2 (s_hat - t)^2, whose multipliers are trained by gradient ascent (an AdamW
group with ``maximize=True``; at ``lambda_lr`` 3e4 by default, where the reference's 0.1 would need
thousands of steps to balance the distillation loss). The loss is the teacher loss plus the Lagrangian:

- ``teacher=none``: LM cross-entropy;
- ``teacher=dense``: the intact model (gates off, LoRA off) at every step;
- ``teacher=numerous``: NutePrune's progressive teachers (:class:`TeacherSchedule`). A snapshot (the
  reference's deterministic gates and a copy of the LoRA tensors, nothing else) is recorded each time
  s_hat reaches the next multiple of ``snapshot_every``; the teacher is the snapshot ``teacher_gap /
  snapshot_every`` records back (the intact model before there are that many); once every multiple
  below the target is recorded and s_hat reaches the target, the teacher walks back through the
  snapshots to the intact model as the remaining steps run out. A teacher pass is the student's own
  modules under the snapshot's gates and LoRA tensors (swapped in and back): no copy of the weights.

Final structure. Per layer the lowest-``log_alpha`` heads (the same number in every K/V group) and
neurons go, as many as :func:`~sppx.pruning.structured.units.allocate` gives, so every layer keeps the
same widths and a standard config describes the pruned model. The LoRA is merged, the kept units are
scaled by their deterministic gate values (``fold_gates``, as the reference's export), every hook and
wrapper is removed; the pipeline then removes the pruned units physically.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sppx.anatomy import PROJECTIONS, Dims, decoder_layers, family_of
from sppx.errors import RunError, is_int, is_number, require, require_fraction, require_positive_int
from sppx.evaluate import next_token_nll
from sppx.pruning.structured.base import StructuredContext, StructuredPruner
from sppx.pruning.structured.hard_concrete import HardConcrete, soft_gate
from sppx.pruning.structured.units import (
    Budget,
    Structure,
    heads_to_remove,
    keep_all_but,
    lowest_units,
)

TEACHERS = ("none", "dense", "numerous")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# The gate tensors: layers x query heads (on o_proj's inputs) and layers x neurons (on gate_proj's and
# up_proj's outputs).
GATE_KINDS = ("heads", "neurons")
MAX_LORA_GRAD_NORM = 1.0  # the reference's gradient clipping (the model's parameters, i.e. LoRA)


# --------------------------------------------------------------------------- the sparsity constraint
def kept_params(d: Dims, heads: torch.Tensor | None, neurons: torch.Tensor | None) -> torch.Tensor | float:
    """Prunable parameters kept when query head (layer, h) is kept with weight ``heads[layer, h]`` and
    neuron (layer, n) with ``neurons[layer, n]`` (keep probabilities, or 0/1 gates; None: all kept).
    K/V heads are always kept."""
    head_count = heads.sum() if heads is not None else d.layers * d.heads
    neuron_count = neurons.sum() if neurons is not None else d.layers * d.intermediate
    return head_count * d.head_params + d.layers * d.kv_heads * d.kv_params + neuron_count * d.neuron_params


def expected_sparsity(d: Dims, heads: torch.Tensor | None, neurons: torch.Tensor | None):
    """s_hat = 1 - E[kept prunable params] / :attr:`Dims.total` (differentiable in the keep weights)."""
    return 1.0 - kept_params(d, heads, neurons) / d.total


def target_at(step: int, final: float, warmup_steps: int) -> float:
    """The target sparsity at ``step``: linear from 0 to ``final`` over ``warmup_steps``."""
    if warmup_steps <= 0:
        return final
    return final * min(1.0, step / warmup_steps)


def lagrangian(s_hat: torch.Tensor, target: float, lambda1: torch.Tensor, lambda2: torch.Tensor):
    """l1 (s_hat - t) + l2 (s_hat - t)^2: minimised in the gates, maximised in l1 and l2."""
    gap = s_hat - target
    return lambda1 * gap + lambda2 * gap * gap


# --------------------------------------------------------------------------- gates in the forward
class GateHook:
    """Multiplies a Linear's input (:meth:`before`, a forward pre-hook) or output (:meth:`after`, a
    forward hook) by one layer's gates, each repeated ``width`` times (``head_dim`` columns per head);
    it does nothing while the gates are off."""

    def __init__(self, gates: UnitGates, kind: str, layer: int, width: int, rows=None):
        self.gates, self.kind, self.layer, self.width = gates, kind, layer, width
        self.rows = rows  # a fused Linear's: one layer's gates -> one per output row

    def gated(self, x: torch.Tensor) -> torch.Tensor | None:
        current = self.gates.current
        if current is None or self.kind not in current:
            return None
        z = current[self.kind][self.layer]
        if self.width > 1:
            z = z.repeat_interleave(self.width)
        if self.rows is not None:
            z = self.rows(z)
        return x * z.to(x.dtype)

    def before(self, module: nn.Module, args: tuple):
        x = self.gated(args[0])
        return None if x is None else (x, *args[1:])

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor):
        return self.gated(output)


class UnitGates(nn.Module):
    """Hard-concrete gates of the chosen units of every layer and the hooks that apply them.

    ``current`` is what the hooks multiply by: ``{kind: layers x units}`` tensors (sampled gates, a
    snapshot's deterministic gates) or None (gates off: the unmasked model). Heads start at
    ``head_log_alpha``, neurons at the ``log_alpha`` of drop rate ``droprate_init``."""

    def __init__(
        self,
        d: Dims,
        units: list[str],
        droprate_init: float,
        head_log_alpha: float | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.d = d
        widths = {"heads": d.heads, "neurons": d.intermediate}
        starts = {"heads": head_log_alpha, "neurons": None}
        self.kinds = nn.ModuleDict(
            {
                kind: HardConcrete(
                    (d.layers, widths[kind]), droprate_init, generator=generator, log_alpha_init=starts[kind]
                )
                for kind in GATE_KINDS
                if kind in units
            }
        )
        self.current: dict[str, torch.Tensor] | None = None
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        """Hook the gates into the attention output's inputs (heads: o_proj) and the MLP input's outputs
        (neurons: gate_proj and up_proj, each part of a fused input, a plain MLP's up projection)."""
        family = family_of(model)
        for i, layer in enumerate(decoder_layers(model)):
            if "heads" in self.kinds:
                hook = GateHook(self, "heads", i, self.d.head_dim)
                out = layer.get_submodule(family.attention_out)
                self._handles.append(out.register_forward_pre_hook(hook.before))
            if "neurons" in self.kinds:
                for name in family.mlp_in:
                    hook = GateHook(self, "neurons", i, 1, self.part_rows(family, name))
                    self._handles.append(layer.get_submodule(name).register_forward_hook(hook.after))

    def part_rows(self, family, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """One layer's neuron gates -> one per output row of MLP input ``name`` (once per part it packs:
        gate and up of a fused gate_up_proj)."""
        parts = family.mlp_parts if name in family.fused else 1
        return lambda z: family.fuse_rows(name, [z] * parts, self.d.head_dim)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.current = None

    @contextlib.contextmanager
    def using(self, z: dict[str, torch.Tensor] | None):
        """The hooks multiply by ``z`` (None: gates off) for the duration of the block."""
        previous, self.current = self.current, z
        try:
            yield
        finally:
            self.current = previous

    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training gates (differentiable)."""
        return {kind: gate.sample(generator) for kind, gate in self.kinds.items()}

    def ones(self) -> dict[str, torch.Tensor]:
        return {kind: torch.ones_like(gate.log_alpha) for kind, gate in self.kinds.items()}

    @torch.no_grad()
    def deterministic(self) -> dict[str, torch.Tensor]:
        """The reference's deterministic gates: per layer and kind the rounded expected number of closed
        gates, lowest ``log_alpha`` first; the others sigmoid(0.8 log_alpha / beta)."""
        return {kind: gate.deterministic_rows(soft=True) for kind, gate in self.kinds.items()}

    @torch.no_grad()
    def constrain(self) -> None:
        """Clamp every ``log_alpha`` to [log 1e-2, log 1e2] (after each optimizer step)."""
        for gate in self.kinds.values():
            gate.constrain()

    def expected_sparsity(self) -> torch.Tensor:
        """s_hat from the keep probabilities (differentiable)."""
        keep = {kind: gate.keep_prob() for kind, gate in self.kinds.items()}
        return expected_sparsity(self.d, keep.get("heads"), keep.get("neurons"))

    def sparsity_of(self, z: dict[str, torch.Tensor]) -> float:
        """The sparsity of deterministic gates (a unit counts as kept when its gate is not 0)."""
        kept = {kind: (t != 0).float() for kind, t in z.items()}
        return float(expected_sparsity(self.d, kept.get("heads"), kept.get("neurons")))

    @torch.no_grad()
    def structure(self, budget: Budget) -> Structure:
        """The final structure: per layer ``budget.heads`` heads (the same number per K/V group) and
        ``budget.neurons`` neurons with the lowest ``log_alpha`` go."""
        d, s = self.d, Structure(self.d)
        for i in range(d.layers):
            if "heads" in self.kinds:
                s.heads[i], s.kv_heads[i] = heads_to_remove(d, self.kinds["heads"].log_alpha[i], budget)
            if "neurons" in self.kinds:
                gone = lowest_units(self.kinds["neurons"].log_alpha[i], budget.neurons)
                s.neurons[i] = keep_all_but(d.intermediate, gone)
        return s

    @torch.no_grad()
    def fold(self, model: nn.Module) -> None:
        """Scale every unit by its soft deterministic value sigmoid(0.8 log_alpha / beta), as the
        reference's export does: a head's attention output columns, a neuron's MLP input rows (gate and
        up, or a plain MLP's one) and their biases. Exactly what the hooks would do with those values;
        the pruned units are cut later."""
        family = family_of(model)
        for i, layer in enumerate(decoder_layers(model)):
            if "heads" in self.kinds:
                out = layer.get_submodule(family.attention_out)
                scale = soft_gate(self.kinds["heads"].log_alpha[i]).repeat_interleave(self.d.head_dim)
                out.weight.mul_(scale.to(out.weight)[None, :])
            if "neurons" in self.kinds:
                gates = soft_gate(self.kinds["neurons"].log_alpha[i])
                for name in family.mlp_in:
                    linear, scale = layer.get_submodule(name), self.part_rows(family, name)(gates)
                    linear.weight.mul_(scale.to(linear.weight)[:, None])
                    if linear.bias is not None:
                        linear.bias.mul_(scale.to(linear.bias))


# --------------------------------------------------------------------------- teachers
@dataclass
class Snapshot:
    """A snapshot teacher: the student's deterministic gates and a copy of its LoRA tensors."""

    level: int  # recorded when s_hat reached level * snapshot_every
    step: int
    student_sparsity: float  # s_hat when it was taken
    sparsity: float  # the sparsity of its deterministic gates
    gates: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        tensors = [*self.gates.values(), *self.lora.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


INTACT = "intact"  # the teacher is the unmasked model with LoRA off
NONE = "none"  # no teacher pass (LM loss)
RAMP, WALK_BACK = "ramp", "walk back"


@dataclass
class TeacherSchedule:
    """Which teacher each optimizer step uses (:data:`NONE`, :data:`INTACT` or a :class:`Snapshot`):
    NutePrune's iterative distillation.

    ``numerous``, at step t of T (R = T - t steps remaining), the teacher chosen before the step's record:

    - records: the thresholds are k * ``every`` for k = 1 .. K - 1, K = floor(target / every); a step
      whose s_hat (before its update) reaches the next unrecorded threshold records a snapshot (at
      most one a step, never replaced);
    - ramp: with n >= A = round(gap / every) records, the teacher is record n - A + 1 (the A-th newest);
      before that the intact model;
    - walk back: once every threshold is recorded, the first step whose s_hat reaches the target starts
      it with R0 = R. Then with interval = max(1, R0 // (n + 1)) the teacher is record
      min(R // interval - A, n - 1) (0-based), the intact model when that is negative: it walks back
      one record per interval and the last steps are taught by the intact model. Records no later step
      can use are freed.
    """

    strategy: str
    total_steps: int
    target: float
    every: float = 0.01
    gap: float = 0.1
    records: list[Snapshot | None] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    walk_back_from: int | None = None  # R0: the steps remaining when the walk back began
    walk_back_step: int | None = None  # the step whose s_hat reached the target (after every record)
    held_max: int = 0
    bytes_max: int = 0

    @property
    def thresholds(self) -> list[float]:
        return [k * self.every for k in range(1, math.floor(self.target / self.every + 1e-9))]

    @property
    def ahead(self) -> int:
        return max(1, round(self.gap / self.every))

    @property
    def taken(self) -> int:
        return len(self.records)

    def teacher_index(self, remaining: int) -> int | None:
        """The index of the record that teaches with ``remaining`` steps left (None: the intact model)."""
        n = len(self.records)
        if self.walk_back_from is None:
            return n - self.ahead if n >= self.ahead else None
        interval = max(1, self.walk_back_from // (n + 1))
        phase = min(remaining // interval - self.ahead, n - 1)
        return phase if phase >= 0 else None

    def record(self, step: int, s_hat: float, take: Callable[[int, int, float], Snapshot]) -> int | None:
        """Record a snapshot if s_hat reached the next threshold (its level), or start the walk back."""
        if self.walk_back_from is not None:
            return None
        thresholds = self.thresholds
        if len(self.records) == len(thresholds):
            if s_hat >= self.target:
                self.walk_back_from, self.walk_back_step = self.total_steps - step, step
            return None
        if s_hat < thresholds[len(self.records)]:
            return None
        level = len(self.records) + 1
        self.records.append(take(level, step, s_hat))
        return level

    def choose(self, step: int, s_hat: float, take: Callable[[int, int, float], Snapshot]):
        """The teacher of ``step``; ``take(level, step, s_hat)`` makes a snapshot of the student now."""
        taken, phase = None, RAMP if self.walk_back_from is None else WALK_BACK
        if self.strategy == "numerous":
            index = self.teacher_index(self.total_steps - step)
            teacher = INTACT if index is None else self.records[index]
            taken = self.record(step, s_hat, take)
            self.free(self.total_steps - step - 1)
        else:
            teacher = NONE if self.strategy == "none" else INTACT
        self.trace.append(
            {
                "step": step,
                "student_sparsity": s_hat,
                "phase": phase,
                "teacher": teacher if isinstance(teacher, str) else "snapshot",
                "teacher_level": teacher.level if isinstance(teacher, Snapshot) else None,
                "teacher_sparsity": teacher_sparsity(teacher),
                "snapshot_taken": taken,
            }
        )
        return teacher

    def free(self, remaining: int) -> None:
        """During the walk back the teacher's index never rises: the records above the one the next
        step (``remaining`` steps left) would use are dropped."""
        if self.walk_back_from is not None:
            index = self.teacher_index(remaining)
            for i in range((-1 if index is None else index) + 1, len(self.records)):
                self.records[i] = None
        held = [snap for snap in self.records if snap is not None]
        self.held_max = max(self.held_max, len(held))
        self.bytes_max = max(self.bytes_max, sum(snap.nbytes for snap in held))

    def stages(self) -> list[dict]:
        """Runs of consecutive steps of one phase with the same teacher."""
        stages: list[dict] = []
        for row in self.trace:
            last = stages[-1] if stages else None
            key = (row["phase"], row["teacher"], row["teacher_level"])
            if last is not None and (last["phase"], last["teacher"], last["teacher_level"]) == key:
                last["steps"][1] = row["step"]
                last["student_sparsity"][1] = round(row["student_sparsity"], 6)
                continue
            sparsity = row["teacher_sparsity"]
            stages.append(
                {
                    "steps": [row["step"], row["step"]],
                    "phase": row["phase"],
                    "student_sparsity": [round(row["student_sparsity"], 6)] * 2,
                    "teacher": row["teacher"],
                    "teacher_level": row["teacher_level"],
                    "teacher_sparsity": None if sparsity is None else round(sparsity, 6),
                }
            )
        return stages

    def report(self) -> dict:
        stages = self.stages()
        return {
            "strategy": self.strategy,
            "schedule": stages,
            "snapshot_stages": sum(1 for stage in stages if stage["teacher"] == "snapshot"),
            "snapshot_steps": sum(1 for row in self.trace if row["teacher"] == "snapshot"),
            "snapshots_taken": self.taken,
            "target_reached_step": self.walk_back_step,
            "snapshots_held_max": self.held_max,
            "snapshot_mib": round(self.bytes_max / 2**20, 3),
        }


def teacher_sparsity(teacher) -> float | None:
    if isinstance(teacher, Snapshot):
        return teacher.sparsity
    return 0.0 if teacher == INTACT else None


def distills(teacher) -> bool:
    """Whether ``teacher`` teaches by distillation (its decoder outputs and a distillation loss, as
    :class:`sppx.teachers.Distiller`), not the LM loss alone (:class:`sppx.teachers.NoTeacher`, None)."""
    return callable(getattr(teacher, "decoder_outputs", None)) and callable(
        getattr(teacher, "distillation", None)
    )


# --------------------------------------------------------------------------- mask learning
class MaskLearner(pl.LightningModule):
    """Learns the gates (and LoRA, and the Lagrange multipliers) of one model.

    :meth:`install` wraps the model (LoRA, gate hooks); :meth:`release` merges the LoRA and removes
    everything it added, leaving plain Linears."""

    def __init__(
        self,
        model: nn.Module,
        pruner: NutePrunePruner,
        target: float,
        teacher,
        seed: int = 0,
        *,
        lora_factory: Callable[..., object],
    ):
        super().__init__()
        self.model = model
        self.pruner = pruner
        self.target = target
        self.seed = seed
        self.d = Dims.of(model.config)
        self.teacher = teacher if distills(teacher) else None
        strategy = getattr(teacher, "name", NONE) if teacher is not None else NONE
        self.schedule = TeacherSchedule(
            strategy,
            pruner.steps,
            target,
            every=getattr(teacher, "snapshot_every", 0.01),
            gap=getattr(teacher, "teacher_gap", 0.1),
        )
        init = torch.Generator().manual_seed(seed)
        self.gates = UnitGates(self.d, pruner.units, pruner.droprate_init, pruner.head_log_alpha, init).to(
            next(model.parameters()).device
        )
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self.lora = lora_factory(  # Llama's names stand for the family's (Phi-3: q_proj is qkv_proj)
            r=pruner.lora_r,
            alpha=pruner.lora_alpha,
            dropout=0.0,
            targets=family_of(model).own_names(list(pruner.lora_targets)),
        )
        self.generator: torch.Generator | None = None
        self._requires_grad: dict[str, bool] = {}

    @property
    def wants_hidden(self) -> bool:
        return self.teacher is not None and self.teacher.wants_hidden

    def install(self) -> None:
        self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.lora.apply(self.model)  # freezes the base; only the LoRA tensors train
        self.gates.attach(self.model)

    def release(self) -> list[str]:
        """Remove the hooks, merge the LoRA into the base weights, restore the base's requires_grad."""
        self.gates.detach()
        merged = self.lora.merge(self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        return merged

    # ------------------------------------------------------------------ one step
    def snapshot(self, level: int, step: int, s_hat: float) -> Snapshot:
        gates = self.gates.deterministic()
        lora = {k: t.detach().clone() for k, t in self.lora.state(self.model).items()}
        return Snapshot(level, step, s_hat, self.gates.sparsity_of(gates), gates, lora)

    def teacher_pass(self, input_ids: torch.Tensor, teacher):
        """The teacher's decoder outputs: the same modules under other gates and LoRA tensors."""
        if teacher == NONE or self.teacher is None:
            return None
        if teacher == INTACT:
            with self.gates.using(None), self.lora.disabled(self.model):
                return self.teacher.decoder_outputs(self.model, input_ids, None)
        with self.gates.using(teacher.gates), self.lora.swapped(self.model, teacher.lora):
            return self.teacher.decoder_outputs(self.model, input_ids, None)

    def losses(self, input_ids: torch.Tensor, step: int, z: dict[str, torch.Tensor]) -> dict:
        """Every term of step ``step`` with the student's gates ``z``; ``loss`` is what is minimised."""
        with torch.no_grad():
            s_now = float(self.gates.expected_sparsity())
        teacher = self.schedule.choose(step, s_now, self.snapshot)
        teacher_out = self.teacher_pass(input_ids, teacher)
        with self.gates.using(z):
            out = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=self.wants_hidden)
        nll, count = next_token_nll(out.logits, input_ids)
        lm_loss = nll / max(count, 1)
        task, extra = lm_loss, {}
        if teacher_out is not None:
            task, extra = self.teacher.distillation(out, teacher_out, lm_loss, None)
        s_hat = self.gates.expected_sparsity()
        target = target_at(step, self.target, self.pruner.warmup_steps)
        lag = lagrangian(s_hat, target, self.lambda1, self.lambda2)
        terms = {
            "loss": task + lag,
            "task_loss": task,
            "lm_loss": lm_loss,
            **extra,
            "lagrangian": lag,
            "expected_sparsity": s_hat.detach(),
            "target_sparsity": target,
            "lambda1": self.lambda1.detach(),
            "lambda2": self.lambda2.detach(),
        }
        if teacher_sparsity(teacher) is not None:
            terms["teacher_sparsity"] = teacher_sparsity(teacher)
        return terms

    # ------------------------------------------------------------------ Lightning
    def on_fit_start(self):
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        terms = self.losses(input_ids, self.global_step, self.gates.sample(self.generator))
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"mask-learning loss is {loss.item()} at step {self.global_step}")
        for key, value in terms.items():
            self.log(f"prune/{key}", value, prog_bar=key in ("loss", "expected_sparsity"))
        return loss

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """The LoRA gradient's norm is clipped at 1 (the gates and multipliers are not clipped)."""
        torch.nn.utils.clip_grad_norm_(self.lora_parameters(), MAX_LORA_GRAD_NORM)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.gates.constrain()

    def configure_optimizers(self):
        groups = [
            {"params": list(self.gates.parameters()), "lr": self.pruner.mask_lr},
            {"params": self.lora_parameters(), "lr": self.pruner.lora_lr},
            {"params": [self.lambda1, self.lambda2], "lr": self.pruner.lambda_lr, "maximize": True},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        steps = self.pruner.steps

        def lora_decay(step: int) -> float:  # linear to 0 over the run; gates and multipliers constant
            return max(0.0, (steps - step) / steps)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [constant_lr, lora_decay, constant_lr])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def constant_lr(step: int) -> float:
    return 1.0


# --------------------------------------------------------------------------- the pruner
@dataclass
class NutePrunePruner(StructuredPruner):
    """``pruner=nuteprune``: hard-concrete masks over heads and neurons learned with LoRA, a Lagrangian
    sparsity constraint and the teacher group's strategy, then merged and cut to uniform widths."""

    units: list = field(default_factory=lambda: ["heads", "neurons"])
    head_mode: str = "query"
    batch_size: int = 4  # training windows per optimizer step
    steps: int = 200  # optimizer steps of mask learning
    warmup: float = 0.4  # fraction of the steps over which the target sparsity ramps up from 0
    mask_lr: float = 0.1
    lambda_lr: float = 3e4  # the reference 0.1 is far too slow for a few hundred steps (docs/nuteprune.md)
    lora_r: int = 8
    lora_alpha: float = 8.0  # LoRA scale lora_alpha / lora_r = 1, as the reference
    lora_lr: float = 1e-3  # decays linearly to 0 over the steps
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    droprate_init: float = 0.01  # neurons start at log_alpha = log(1 - d) - log(d) = 4.6
    head_log_alpha: float = 10.0  # heads start here (clamped to log 1e2 = 4.6 after the first step)
    fold_gates: bool = True  # scale the kept units by their deterministic gate values, as the reference
    accelerator: str = "auto"  # Lightning accelerator of mask learning (auto: the GPU when there is one)

    name = "nuteprune"
    allowed_units = GATE_KINDS
    needs_calibration = False  # learns on the tuning windows (ctx.train)
    uses_teacher = True

    def __post_init__(self):
        super().__post_init__()
        self.check_gate_settings()
        require_positive_int("pruner.steps", self.steps)
        require_fraction("pruner.warmup", self.warmup, closed_right=True)
        for key in ("mask_lr", "lambda_lr", "lora_lr", "lora_alpha"):
            value = getattr(self, key)
            require(is_number(value) and 0 < value < math.inf, f"pruner.{key}", value, "must be a number > 0")
        require(
            is_int(self.lora_r) and self.lora_r >= 1, "pruner.lora_r", self.lora_r, "must be an integer >= 1"
        )
        require(
            isinstance(self.lora_targets, list)
            and len(self.lora_targets) > 0
            and all(t in PROJECTIONS for t in self.lora_targets),
            "pruner.lora_targets",
            self.lora_targets,
            f"must list some of: {', '.join(PROJECTIONS)}",
        )
        require(
            self.accelerator in ACCELERATORS,
            "pruner.accelerator",
            self.accelerator,
            f"allowed: {', '.join(ACCELERATORS)}",
        )
        self.report: dict = {}
        self.trace: list[dict] = []

    def check_gate_settings(self) -> None:
        require(
            all(u in GATE_KINDS for u in self.units),
            "pruner.units",
            self.units,
            f"nuteprune gates some of: {', '.join(GATE_KINDS)}",
        )
        require(
            self.head_mode == "query",
            "pruner.head_mode",
            self.head_mode,
            "nuteprune keeps every K/V head and gates query heads: only 'query'",
        )
        require(
            is_number(self.droprate_init) and 0 < self.droprate_init < 1,
            "pruner.droprate_init",
            self.droprate_init,
            "must be a number in (0, 1)",
        )
        require(
            is_number(self.head_log_alpha) and math.isfinite(self.head_log_alpha),
            "pruner.head_log_alpha",
            self.head_log_alpha,
            "must be a finite number",
        )
        require(
            isinstance(self.fold_gates, bool), "pruner.fold_gates", self.fold_gates, "must be true or false"
        )

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup * self.steps)

    def select(self, model: nn.Module, budget: Budget, ctx: StructuredContext) -> Structure:
        if ctx.lora_factory is None:
            raise RunError("pruner=nuteprune needs a LoRA factory in its context")
        train = ctx.train
        if train is None or train.numel() == 0:
            raise ValueError("nuteprune learns its masks on tuning windows: ctx.train is empty")
        teacher = ctx.teacher
        name = getattr(teacher, "name", NONE) if teacher is not None else NONE
        require(name in TEACHERS, "teacher", name, f"nuteprune supports: {', '.join(TEACHERS)}")
        target = budget.sparsity(Dims.of(model.config))
        learner = MaskLearner(model, self, target, teacher, ctx.seed, lora_factory=ctx.lora_factory)
        start = time.perf_counter()
        with ctx.watch("mask learning"):
            trainer = self._fit(learner, train, ctx)
        seconds = time.perf_counter() - start
        with ctx.watch("merge"):
            structure = learner.gates.structure(budget)
            merged = learner.release()
            if self.fold_gates:
                learner.gates.fold(model)
        self.trace = learner.schedule.trace
        self.report = self._report(learner, trainer, structure, merged, seconds)
        check_snapshots_taught(learner.schedule, self.report["teacher"])
        return structure

    def _fit(self, learner: MaskLearner, train: torch.Tensor, ctx: StructuredContext) -> pl.Trainer:
        model = learner.model
        device, was_training = next(model.parameters()).device, model.training
        loader = DataLoader(
            TensorDataset(train),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(ctx.seed),
        )
        trainer = pl.Trainer(
            max_steps=self.steps,
            max_epochs=-1,  # cycle through the windows when there are fewer than steps x batch
            accelerator=self.accelerator,
            devices=1,
            logger=ctx.logger if ctx.logger is not None else False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=ctx.progress,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            log_every_n_steps=1,
            default_root_dir=str(ctx.output_dir) if ctx.output_dir is not None else None,
        )
        learner.install()
        try:
            model.train()
            trainer.fit(learner, train_dataloaders=loader)
        except BaseException:
            learner.release()
            raise
        finally:
            model.train(was_training)
            learner.to(device)  # Lightning's teardown leaves the module on the CPU
        return trainer

    def _report(self, learner: MaskLearner, trainer, structure: Structure, merged, seconds: float) -> dict:
        with torch.no_grad():
            s_hat = float(learner.gates.expected_sparsity())
            deterministic = learner.gates.sparsity_of(learner.gates.deterministic())
        return {
            "target_sparsity": round(learner.target, 6),
            "expected_sparsity": round(s_hat, 6),
            "deterministic_sparsity": round(deterministic, 6),
            "structure_sparsity": round(structure.sparsity(), 6),
            "lambda1": round(learner.lambda1.item(), 6),
            "lambda2": round(learner.lambda2.item(), 6),
            "log_alpha": {
                kind: [round(gate.log_alpha.min().item(), 4), round(gate.log_alpha.max().item(), 4)]
                for kind, gate in learner.gates.kinds.items()
            },
            "steps": int(trainer.global_step),
            "warmup_steps": self.warmup_steps,
            "teacher": learner.schedule.report(),
            "lora_merged": len(merged),
            "gates_folded": self.fold_gates,
            "mask_learning_s": round(seconds, 3),
        }


def check_snapshots_taught(schedule: TeacherSchedule, report: dict) -> None:
    """A RunError when ``teacher=numerous`` ran without a single step taught by a snapshot."""
    if schedule.strategy != "numerous" or report["snapshot_stages"] > 0:
        return
    reached = max((row["student_sparsity"] for row in schedule.trace), default=0.0)
    raise RunError(
        f"teacher=numerous: no snapshot taught in {len(schedule.trace)} mask-learning steps (expected "
        f"sparsity reached {reached:.3f}, {schedule.taken} snapshots recorded; one teaches once "
        f"{schedule.ahead} are recorded, from s_hat >= {schedule.ahead * schedule.every:.2f}); raise "
        "pruner.steps or pruner.mask_lr, or lower teacher.teacher_gap"
    )

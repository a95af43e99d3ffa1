"""NutePrune (Li et al. 2024): structured pruning by learned hard-concrete masks, distilled from
numerous teachers that are all the one model in memory.

Mask learning. Every attention head (query head; with GQA the K/V heads are kept) and every FFN neuron
of every layer gets a hard-concrete gate (:mod:`~sppx.pruning.structured.hard_concrete`), applied by
forward pre-hooks that multiply the inputs of o_proj (``head_dim`` consecutive columns per head) and
down_proj (one column per neuron). The base weights are frozen; LoRA (rank 8 on q_proj and v_proj by
default) trains with the gates. The expected sparsity s_hat = 1 - E[kept prunable params] / total comes
from the gates' keep probabilities P(z > 0); it is tied to the target t = t_final min(1, step / warmup)
by the Lagrangian l1 (s_hat - t) + l2 (s_hat - t)^2, whose multipliers l1, l2 are trained by gradient
ascent (an AdamW group with ``maximize=True``). The loss is the teacher loss plus the Lagrangian:

- ``teacher=none``: LM cross-entropy;
- ``teacher=dense``: the intact model (gates off, LoRA off) at every step, with the teacher's weights;
- ``teacher=numerous``: NutePrune's progressive teachers. While the target ramps, a snapshot (the
  deterministic 0/1 gates and a copy of the LoRA tensors, nothing else) is taken each time s_hat climbs
  across another multiple of ``snapshot_every``; the teacher is the snapshot about ``teacher_gap``
  sparsity behind the student (the intact model until one exists). After the ramp the teacher walks
  back linearly to the intact model, which teaches the last step. A teacher pass is the student's own
  modules under the snapshot's gates and LoRA tensors (swapped in and back): no copy of the weights.

Final structure. Per layer the lowest-``log_alpha`` heads (the same number in every K/V group) and
neurons go, as many as :func:`~sppx.pruning.structured.units.allocate` gives, so every layer keeps the
same widths and a standard config describes the pruned model. (NutePrune's reference instead closes
the rounded expected number of gates over all layers at once and exports same-shape weights.) The LoRA
is merged into the base weights and every hook and wrapper is removed; the pipeline then removes the
pruned units physically.

Other adaptations: log_alpha starts at CoFi's ``droprate_init`` value (0.5: log_alpha = 0, keep
probability 0.83, so s_hat starts near 0.15); by default (``ramp_from_init``) the target ramps from
that initial s_hat instead of from 0, where the Lagrangian would first spend steps pulling s_hat down
(SmolLM2-135M at 20%, 40 steps: pruned ppl 337 ramping from s_hat, 2422 ramping from 0);
snapshots are taken on upward crossings during the ramp only (a level crossed again replaces its
snapshot); the teacher's ``start`` and ``warmup`` (nested one-shot masks) do not apply here: the
pruner's ``warmup`` sets the ramp. With AdamW at lr 0.1 on both the gates and the multipliers the
constraint oscillates for a while (about 150 steps on a tiny model) before it settles: in shorter runs
s_hat ends off the target, and the final structure still removes exactly the budget's units.
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

from sppx.adapters.lora import LoRAAdapter
from sppx.errors import is_int, is_number, require, require_fraction, require_positive_int
from sppx.evaluate import next_token_nll
from sppx.pruning.base import PROJECTIONS
from sppx.pruning.sequential import decoder_layers
from sppx.pruning.structured.base import StructuredContext, StructuredPruner
from sppx.pruning.structured.hard_concrete import HardConcrete
from sppx.pruning.structured.units import (
    Budget,
    Dims,
    Structure,
    heads_to_remove,
    keep_all_but,
    lowest_units,
)
from sppx.teachers import Distiller

TEACHERS = ("none", "dense", "numerous")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# The gate tensors: layers x query heads (on o_proj's inputs) and layers x neurons (on down_proj's).
GATE_KINDS = ("heads", "neurons")


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


def target_at(step: int, final: float, warmup_steps: int, start: float = 0.0) -> float:
    """The target sparsity at ``step``: linear from ``start`` to ``final`` over ``warmup_steps``."""
    if warmup_steps <= 0:
        return final
    return start + (final - start) * min(1.0, step / warmup_steps)


def lagrangian(s_hat: torch.Tensor, target: float, lambda1: torch.Tensor, lambda2: torch.Tensor):
    """l1 (s_hat - t) + l2 (s_hat - t)^2: minimised in the gates, maximised in l1 and l2."""
    gap = s_hat - target
    return lambda1 * gap + lambda2 * gap * gap


# --------------------------------------------------------------------------- gates in the forward
class GateHook:
    """A forward pre-hook multiplying a Linear's input by one layer's gates (each repeated ``width``
    times: ``head_dim`` columns per head); it does nothing while the gates are off."""

    def __init__(self, gates: UnitGates, kind: str, layer: int, width: int):
        self.gates, self.kind, self.layer, self.width = gates, kind, layer, width

    def __call__(self, module: nn.Module, args: tuple):
        current = self.gates.current
        if current is None or self.kind not in current:
            return None
        z = current[self.kind][self.layer]
        if self.width > 1:
            z = z.repeat_interleave(self.width)
        x = args[0]
        return (x * z.to(x.dtype), *args[1:])


class UnitGates(nn.Module):
    """Hard-concrete gates of the chosen units of every layer and the hooks that apply them.

    ``current`` is what the hooks multiply by: ``{kind: layers x units}`` tensors (sampled gates, a
    snapshot's 0/1 gates) or None (gates off: the unmasked model)."""

    def __init__(
        self, d: Dims, units: list[str], droprate_init: float, generator: torch.Generator | None = None
    ):
        super().__init__()
        self.d = d
        widths = {"heads": d.heads, "neurons": d.intermediate}
        self.kinds = nn.ModuleDict(
            {
                kind: HardConcrete((d.layers, widths[kind]), droprate_init, generator=generator)
                for kind in GATE_KINDS
                if kind in units
            }
        )
        self.current: dict[str, torch.Tensor] | None = None
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        """Hook the gates into o_proj (heads) and down_proj (neurons) of every layer."""
        for i, layer in enumerate(decoder_layers(model)):
            if "heads" in self.kinds:
                hook = GateHook(self, "heads", i, self.d.head_dim)
                self._handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
            if "neurons" in self.kinds:
                hook = GateHook(self, "neurons", i, 1)
                self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook))

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
        """0/1 gates: per kind, the rounded expected number of closed gates, lowest ``log_alpha`` first."""
        return {kind: gate.deterministic() for kind, gate in self.kinds.items()}

    def expected_sparsity(self) -> torch.Tensor:
        """s_hat from the keep probabilities (differentiable)."""
        keep = {kind: gate.keep_prob() for kind, gate in self.kinds.items()}
        return expected_sparsity(self.d, keep.get("heads"), keep.get("neurons"))

    def sparsity_of(self, z: dict[str, torch.Tensor]) -> float:
        """The sparsity of 0/1 gates."""
        return float(expected_sparsity(self.d, z.get("heads"), z.get("neurons")))

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


# --------------------------------------------------------------------------- teachers
@dataclass
class Snapshot:
    """A snapshot teacher: the student's deterministic 0/1 gates and a copy of its LoRA tensors."""

    level: int  # the multiple of snapshot_every s_hat climbed across
    step: int
    student_sparsity: float  # s_hat when it was taken
    sparsity: float  # the sparsity of its 0/1 gates
    gates: dict[str, torch.Tensor]
    lora: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        tensors = [*self.gates.values(), *self.lora.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


INTACT = "intact"  # the teacher is the unmasked model with LoRA off
NONE = "none"  # no teacher pass (LM loss)


@dataclass
class TeacherSchedule:
    """Which teacher each optimizer step uses (:data:`NONE`, :data:`INTACT` or a :class:`Snapshot`).

    ``numerous``: during the ramp (step < ``warmup_steps``) a snapshot is taken each time s_hat climbs
    into a higher multiple of ``every`` than at the previous step, and the teacher is the sparsest
    snapshot at most ``s_hat - gap``; afterwards the wanted teacher sparsity falls linearly from
    ``target - gap`` to 0 (the intact model) at the last step, and snapshots sparser than it are freed."""

    strategy: str
    total_steps: int
    warmup_steps: int
    target: float
    every: float = 0.01
    gap: float = 0.1
    snapshots: dict[int, Snapshot] = field(default_factory=dict)
    trace: list[dict] = field(default_factory=list)
    taken: int = 0
    held_max: int = 0
    bytes_max: int = 0

    def wanted(self, step: int, s_hat: float) -> float:
        """The sparsity the teacher should have (<= 0: the intact model)."""
        if step >= self.total_steps - 1:
            return 0.0
        if step < self.warmup_steps:
            return s_hat - self.gap
        remaining = self.total_steps - 1 - self.warmup_steps
        progress = (step - self.warmup_steps) / remaining if remaining > 0 else 1.0
        return (self.target - self.gap) * (1.0 - progress)

    def choose(self, step: int, s_hat: float, take: Callable[[int, int, float], Snapshot]):
        """The teacher of ``step``; ``take(level, step, s_hat)`` makes a snapshot of the student now."""
        taken = None
        if self.strategy == "numerous":
            teacher, taken = self._numerous(step, s_hat, take)
        else:
            teacher = NONE if self.strategy == "none" else INTACT
        self.trace.append(
            {
                "step": step,
                "student_sparsity": s_hat,
                "level": math.floor(s_hat / self.every + 1e-9),
                "teacher": teacher if isinstance(teacher, str) else "snapshot",
                "teacher_level": teacher.level if isinstance(teacher, Snapshot) else None,
                "teacher_sparsity": teacher_sparsity(teacher),
                "snapshot_taken": taken,
            }
        )
        return teacher

    def _numerous(self, step: int, s_hat: float, take) -> tuple[Snapshot | str, int | None]:
        level = math.floor(s_hat / self.every + 1e-9)
        taken = None
        previous = self.trace[-1]["level"] if self.trace else None
        if step < self.warmup_steps and previous is not None and level > previous:
            self.snapshots[level] = take(level, step, s_hat)
            self.taken, taken = self.taken + 1, level
        wanted = self.wanted(step, s_hat)
        if step >= self.warmup_steps:  # the wanted sparsity only falls from here on
            for gone in [k for k, snap in self.snapshots.items() if snap.sparsity > wanted]:
                del self.snapshots[gone]
        self.held_max = max(self.held_max, len(self.snapshots))
        self.bytes_max = max(self.bytes_max, sum(s.nbytes for s in self.snapshots.values()))
        fits = [snap for snap in self.snapshots.values() if snap.sparsity <= wanted]
        if wanted <= 0 or not fits:
            return INTACT, taken
        return max(fits, key=lambda snap: (snap.sparsity, snap.level)), taken

    def stages(self) -> list[dict]:
        """Runs of consecutive steps with the same teacher."""
        stages: list[dict] = []
        for row in self.trace:
            last = stages[-1] if stages else None
            key = (row["teacher"], row["teacher_level"])
            if last is not None and last["_key"] == key:
                last["steps"][1] = row["step"]
                last["student_sparsity"][1] = round(row["student_sparsity"], 6)
                continue
            sparsity = row["teacher_sparsity"]
            stages.append(
                {
                    "_key": key,
                    "steps": [row["step"], row["step"]],
                    "student_sparsity": [round(row["student_sparsity"], 6)] * 2,
                    "teacher": row["teacher"],
                    "teacher_sparsity": None if sparsity is None else round(sparsity, 6),
                }
            )
        for stage in stages:
            del stage["_key"]
        return stages


def teacher_sparsity(teacher) -> float | None:
    if isinstance(teacher, Snapshot):
        return teacher.sparsity
    return 0.0 if teacher == INTACT else None


# --------------------------------------------------------------------------- mask learning
class MaskLearner(pl.LightningModule):
    """Learns the gates (and LoRA, and the Lagrange multipliers) of one model.

    :meth:`install` wraps the model (LoRA, gate hooks); :meth:`release` merges the LoRA and removes
    everything it added, leaving plain Linears."""

    def __init__(self, model: nn.Module, pruner: NutePrunePruner, target: float, teacher, seed: int = 0):
        super().__init__()
        self.model = model
        self.pruner = pruner
        self.target = target
        self.seed = seed
        self.d = Dims.of(model.config)
        self.teacher = teacher if isinstance(teacher, Distiller) else None
        strategy = getattr(teacher, "name", NONE) if teacher is not None else NONE
        self.schedule = TeacherSchedule(
            strategy,
            pruner.steps,
            pruner.warmup_steps,
            target,
            every=getattr(teacher, "snapshot_every", 0.01),
            gap=getattr(teacher, "teacher_gap", 0.1),
        )
        init = torch.Generator().manual_seed(seed)
        self.gates = UnitGates(self.d, pruner.units, pruner.droprate_init, init).to(
            next(model.parameters()).device
        )
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self.lora = LoRAAdapter(
            r=pruner.lora_r, alpha=pruner.lora_alpha, dropout=0.0, targets=list(pruner.lora_targets)
        )
        with torch.no_grad():
            self.start = min(target, float(self.gates.expected_sparsity())) if pruner.ramp_from_init else 0.0
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
                return self.teacher._forward(self.model, input_ids, None)
        with self.gates.using(teacher.gates), self.lora.swapped(self.model, teacher.lora):
            return self.teacher._forward(self.model, input_ids, None)

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
            task, extra = Distiller.loss(self.teacher, out, teacher_out, lm_loss, None)
        s_hat = self.gates.expected_sparsity()
        target = target_at(step, self.target, self.schedule.warmup_steps, self.start)
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

    def configure_optimizers(self):
        lora = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": list(self.gates.parameters()), "lr": self.pruner.mask_lr},
            {"params": lora, "lr": self.pruner.lora_lr},
            {"params": [self.lambda1, self.lambda2], "lr": self.pruner.lambda_lr, "maximize": True},
        ]
        return torch.optim.AdamW(groups, weight_decay=0.0)


# --------------------------------------------------------------------------- the pruner
@dataclass
class NutePrunePruner(StructuredPruner):
    """``pruner=nuteprune``: hard-concrete masks over heads and neurons learned with LoRA, a Lagrangian
    sparsity constraint and the teacher group's strategy, then merged and cut to uniform widths."""

    units: list = field(default_factory=lambda: ["heads", "neurons"])
    head_mode: str = "query"
    batch_size: int = 4  # training windows per optimizer step
    steps: int = 40  # optimizer steps of mask learning
    warmup: float = 0.5  # fraction of the steps over which the target sparsity ramps up
    mask_lr: float = 0.1
    lambda_lr: float = 0.1
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_lr: float = 1e-3
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    droprate_init: float = 0.5
    ramp_from_init: bool = True  # the target ramps from the gates' initial s_hat (false: from 0)
    accelerator: str = "auto"  # Lightning accelerator of mask learning (auto: the GPU when there is one)

    name = "nuteprune"
    allowed_units = GATE_KINDS
    needs_calibration = False  # learns on the tuning windows (ctx.train)
    uses_teacher = True

    def __post_init__(self):
        super().__post_init__()
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
            is_number(self.droprate_init) and 0 < self.droprate_init < 1,
            "pruner.droprate_init",
            self.droprate_init,
            "must be a number in (0, 1)",
        )
        require(
            isinstance(self.ramp_from_init, bool),
            "pruner.ramp_from_init",
            self.ramp_from_init,
            "must be true or false",
        )
        require(
            self.accelerator in ACCELERATORS,
            "pruner.accelerator",
            self.accelerator,
            f"allowed: {', '.join(ACCELERATORS)}",
        )
        self.report: dict = {}
        self.trace: list[dict] = []

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup * self.steps)

    def select(self, model: nn.Module, budget: Budget, ctx: StructuredContext) -> Structure:
        train = ctx.train
        if train is None or train.numel() == 0:
            raise ValueError("nuteprune learns its masks on tuning windows: ctx.train is empty")
        teacher = ctx.teacher
        name = getattr(teacher, "name", NONE) if teacher is not None else NONE
        require(name in TEACHERS, "teacher", name, f"nuteprune supports: {', '.join(TEACHERS)}")
        d = Dims.of(model.config)
        target = budget.sparsity(d)
        learner = MaskLearner(model, self, target, teacher, ctx.seed)
        start = time.perf_counter()
        with ctx.watch("mask learning"):
            trainer = self._fit(learner, train, ctx)
        seconds = time.perf_counter() - start
        with ctx.watch("merge"):
            structure = learner.gates.structure(budget)
            merged = learner.release()
        self.trace = learner.schedule.trace
        self.report = self._report(learner, trainer, structure, merged, seconds)
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
        schedule = learner.schedule
        with torch.no_grad():
            s_hat = float(learner.gates.expected_sparsity())
        return {
            "target_sparsity": round(learner.target, 6),
            "ramp_start": round(learner.start, 6),
            "expected_sparsity": round(s_hat, 6),
            "structure_sparsity": round(structure.sparsity(), 6),
            "lambda1": round(learner.lambda1.item(), 6),
            "lambda2": round(learner.lambda2.item(), 6),
            "steps": int(trainer.global_step),
            "warmup_steps": self.warmup_steps,
            "teacher": {
                "strategy": schedule.strategy,
                "schedule": schedule.stages(),
                "snapshots_taken": schedule.taken,
                "snapshots_held_max": schedule.held_max,
                "snapshot_mib": round(schedule.bytes_max / 2**20, 3),
            },
            "lora_merged": len(merged),
            "mask_learning_s": round(seconds, 3),
        }

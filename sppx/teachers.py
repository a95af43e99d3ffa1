"""Teacher strategies for recovery tuning: what the student learns from besides the text itself.

Every teacher is the one model in memory seen another way (:mod:`sppx.masking`): the pruned weights
stay dense and the student's forward applies the masks, so

- ``teacher=dense``: the teacher pass is the same modules with masks and adapter switched off, i.e.
  exactly the unpruned model;
- ``teacher=numerous`` (NutePrune's progressive distillation, adapted to one-shot masks): the student's
  sparsity ramps from ``start`` to the target over the warm-up through nested masks, a snapshot (mask
  step + adapter tensors) is taken every ``snapshot_every`` of sparsity, and the teacher is the snapshot
  about ``teacher_gap`` behind the student (the intact model until one exists); once the target is
  reached, teachers walk back to the intact model. The snapshots hold adapter tensors only.

The loss is ``lm_weight * LM cross-entropy + kl_weight * KL(T) + hidden_weight * hidden-state MSE``,
with one of two normalisations (``normalisation``, :mod:`sppx.distill`): ``token`` (the KL averaged over
tokens, the relative hidden-state error averaged over layers; ``teacher=dense``) or ``reference``
(NutePrune's: the KL summed over tokens and divided by the number of sequences, the absolute MSE over
each layer's non-zero hidden entries summed over layers; ``teacher=numerous``). NutePrune's 0.1 / 0.9
weights mean what they mean in the paper only with the reference normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sppx.anatomy import output_head
from sppx.distill import hidden_mse, layer_mse_sum, logit_kl
from sppx.errors import RunError, is_number, require
from sppx.masking import MAX_STEPS, StudentMasks


@dataclass
class TeacherPass:
    """What a teacher pass keeps: the decoder's last hidden state (the input of the output head), the
    per-layer hidden states when the loss uses them, and the output head."""

    last_hidden: torch.Tensor
    hidden_states: tuple | None
    head: nn.Module

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        return self.head(self.last_hidden)


NORMALISATIONS = ("reference", "token")


@dataclass
class NoTeacher:
    """``teacher=none``: the language-modelling loss only."""

    name = "none"
    needs_dense = False  # whether the pruned weights must stay dense (masks applied in the forward)
    nested = False  # whether the masks must be nested (a sparsity schedule)
    wants_hidden = False

    def bind(self, model: nn.Module, masks: StudentMasks | None, adapter, target: float) -> None:
        """Called once before tuning with the model, its masks, the adapter and the target sparsity."""

    def begin(self, total_steps: int) -> None:
        """Called when tuning starts, with the number of optimizer steps it will take."""

    def finish(self) -> None:
        """Called when tuning ends, before the merge."""

    def before_step(self, step: int) -> None:
        """Called before optimizer step ``step`` (0-based) is computed."""

    def teacher_outputs(self, model: nn.Module, input_ids, attention_mask):
        return None

    def loss(self, student, teacher, lm_loss, token_mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and extra terms to log."""
        return lm_loss, {}

    def report(self) -> dict | None:
        """What results.json records about the teachers used."""
        return None

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (called after :meth:`begin` when a run resumes)."""


@dataclass
class Distiller(NoTeacher):
    """Loss weights shared by the distilling teachers."""

    lm_weight: float = 1.0
    kl_weight: float = 1.0
    hidden_weight: float = 0.0
    temperature: float = 1.0
    normalisation: str = "token"  # token | reference (NutePrune's batchmean KL and summed layer MSE)

    needs_dense = True

    def __post_init__(self):
        for key in ("lm_weight", "kl_weight", "hidden_weight"):
            value = getattr(self, key)
            require(
                is_number(value) and 0 <= value < math.inf, f"teacher.{key}", value, "must be a number >= 0"
            )
        require(
            self.lm_weight + self.kl_weight + self.hidden_weight > 0,
            "teacher.kl_weight",
            self.kl_weight,
            "lm_weight, kl_weight and hidden_weight are all 0: nothing to learn from",
        )
        require(
            is_number(self.temperature) and 0 < self.temperature < math.inf,
            "teacher.temperature",
            self.temperature,
            "must be a number > 0",
        )
        require(
            self.normalisation in NORMALISATIONS,
            "teacher.normalisation",
            self.normalisation,
            f"allowed: {', '.join(NORMALISATIONS)}",
        )
        self.model = self.masks = self.adapter = None

    @property
    def wants_hidden(self) -> bool:
        return self.hidden_weight > 0

    def bind(self, model, masks, adapter, target) -> None:
        self.model, self.masks, self.adapter = model, masks, adapter

    @torch.no_grad()
    def decoder_outputs(self, model: nn.Module, input_ids, attention_mask) -> TeacherPass:
        """A teacher pass of ``model`` as it is set up now (masks, gates, adapter state): the decoder
        only, in eval mode, without gradient. The logits are made from the last hidden state a chunk of
        tokens at a time inside the KL (a full tokens x vocabulary tensor of teacher logits never
        exists)."""
        was_training = model.training
        model.eval()  # no dropout in a teacher
        try:
            out = model.get_decoder()(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                output_hidden_states=self.wants_hidden,
            )
        finally:
            model.train(was_training)
        return TeacherPass(out.last_hidden_state, out.hidden_states, output_head(model))

    def intact_outputs(self, model: nn.Module, input_ids, attention_mask=None):
        """The unpruned, unadapted model's outputs: masks and adapter off."""
        with self.masks.dense(), self.adapter.disabled(model):
            return self.decoder_outputs(model, input_ids, attention_mask)

    def distillation(self, student, teacher: TeacherPass, lm_loss, token_mask):
        """``lm_weight * lm_loss + kl_weight * KL + hidden_weight * hidden term`` under
        ``normalisation``, and the terms to log (``kd_kl``, ``kd_hidden``)."""
        reference = self.normalisation == "reference"
        total = self.lm_weight * lm_loss
        extra: dict[str, torch.Tensor] = {}
        if self.kl_weight > 0:
            extra["kd_kl"] = logit_kl(
                student.logits,
                temperature=self.temperature,
                token_mask=token_mask,
                teacher_hidden=teacher.last_hidden,
                head=teacher.head,
                per="sequence" if reference else "token",
            )
            total = total + self.kl_weight * extra["kd_kl"]
        if self.hidden_weight > 0:
            hidden_term = layer_mse_sum if reference else hidden_mse
            extra["kd_hidden"] = hidden_term(student.hidden_states, teacher.hidden_states, token_mask)
            total = total + self.hidden_weight * extra["kd_hidden"]
        return total, extra

    def loss(self, student, teacher, lm_loss, token_mask):
        return self.distillation(student, teacher, lm_loss, token_mask)


@dataclass
class DenseTeacher(Distiller):
    """``teacher=dense``: distil from the unpruned model (the same modules, masks and adapter off)."""

    name = "dense"

    def teacher_outputs(self, model, input_ids, attention_mask):
        return self.intact_outputs(model, input_ids, attention_mask)

    def report(self) -> dict:
        return {"strategy": self.name, "teacher": "intact model (masks and adapter off) at every step"}


class NumerousSchedule:
    """Which mask step the student is at, and which snapshot teaches it, at every optimizer step.

    Mask steps ``0..levels`` are the nested masks (step ``levels`` is the target). The student starts at
    step ``start_level`` and climbs linearly to ``levels`` over ``warmup_steps``. When it leaves a step,
    that step's snapshot (mask + adapter tensors) becomes available. While ramping, the teacher is the
    highest snapshot at most ``gap`` steps below the student; afterwards the wanted teacher step falls
    linearly from ``levels - gap`` to the intact model (``None``) at the last step.
    """

    def __init__(self, total_steps: int, levels: int, start_level: int, warmup_steps: int, gap: int):
        if not (0 <= start_level <= levels and total_steps >= 1 and warmup_steps >= 0 and gap >= 1):
            raise ValueError("invalid numerous schedule")
        self.total, self.levels, self.start_level = total_steps, levels, start_level
        self.warmup, self.gap = min(warmup_steps, total_steps), gap
        # (mask step, first optimizer step at which its snapshot exists)
        self.snapshots: list[tuple[int, int]] = [
            (self.student_level(t - 1), t)
            for t in range(1, total_steps)
            if self.student_level(t) > self.student_level(t - 1)
        ]

    def student_level(self, step: int) -> int:
        if step >= self.warmup:
            return self.levels
        return self.start_level + (self.levels - self.start_level) * step // self.warmup

    def wanted_teacher_level(self, step: int) -> int:
        """The mask step the teacher should be at (-1: the intact model)."""
        if step < self.warmup:
            return self.student_level(step) - self.gap
        remaining = self.total - 1 - self.warmup
        progress = (step - self.warmup) / remaining if remaining > 0 else 1.0
        # Walk back through steps levels - gap, ..., 0 and end at the intact model on the last step.
        return math.floor((self.levels - self.gap + 1) * (1.0 - progress)) - 1

    def teacher_level(self, step: int) -> int | None:
        wanted = self.wanted_teacher_level(step)
        levels = [level for level, ready in self.snapshots if ready <= step and level <= wanted]
        return max(levels) if levels else None

    def last_use(self) -> dict[int, int]:
        """``{mask step: last optimizer step it teaches}`` for the snapshots that ever teach."""
        used: dict[int, int] = {}
        for step in range(self.total):
            level = self.teacher_level(step)
            if level is not None:
                used[level] = step
        return used


@dataclass
class NumerousTeacher(Distiller):
    """``teacher=numerous``: progressive sparsity with snapshot teachers of the one model in memory."""

    start: float = 0.0  # the student's sparsity at step 0
    warmup: float = 0.5  # fraction of the optimizer steps over which the sparsity ramps to the target
    snapshot_every: float = 0.01  # sparsity between two mask steps (a snapshot at each)
    teacher_gap: float = 0.1  # how far (in sparsity) the teacher trails the student while ramping
    normalisation: str = "reference"  # NutePrune's loss normalisation (see sppx.distill)

    name = "numerous"
    nested = True

    def __post_init__(self):
        super().__post_init__()
        require(
            is_number(self.start) and 0 <= self.start < 1, "teacher.start", self.start, "must be in [0, 1)"
        )
        require(
            is_number(self.warmup) and 0 <= self.warmup <= 1,
            "teacher.warmup",
            self.warmup,
            "must be in [0, 1]",
        )
        require(
            is_number(self.snapshot_every) and 0 < self.snapshot_every < 1,
            "teacher.snapshot_every",
            self.snapshot_every,
            "must be in (0, 1)",
        )
        require(
            is_number(self.teacher_gap) and 0 < self.teacher_gap < 1,
            "teacher.teacher_gap",
            self.teacher_gap,
            "must be in (0, 1)",
        )
        self.schedule: NumerousSchedule | None = None
        self.target = 0.0
        self._snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self._last_use: dict[int, int] = {}
        self._sparsity_at: dict[int, float] = {}
        self._segments: list[dict] = []
        self._teacher: int | None = None
        self._held_max = 0
        self._snapshot_bytes = 0

    def levels_for(self, target: float) -> int:
        """Number of nested mask steps for ``target`` sparsity (one every ``snapshot_every``)."""
        return max(1, round(target / self.snapshot_every))

    def check_target(self, target: float) -> None:
        require(
            self.levels_for(target) <= MAX_STEPS,
            "teacher.snapshot_every",
            self.snapshot_every,
            f"gives more than {MAX_STEPS} mask steps up to sparsity {target:g}; raise it",
        )
        require(
            self.start <= target,
            "teacher.start",
            self.start,
            f"must be <= the target sparsity {target:g}",
        )

    def bind(self, model, masks, adapter, target) -> None:
        super().bind(model, masks, adapter, target)
        self.target = target

    def start_schedule(self, total_steps: int) -> NumerousSchedule:
        levels = self.masks.steps
        start_level = min(levels, round(self.start / self.target * levels)) if self.target > 0 else levels
        gap = max(1, round(self.teacher_gap / self.snapshot_every))
        return NumerousSchedule(total_steps, levels, start_level, math.ceil(self.warmup * total_steps), gap)

    def begin(self, total_steps: int) -> None:
        """Plan the schedule; a RunError when no snapshot would ever teach (the student never gets
        ``teacher_gap`` ahead of a snapshot within ``total_steps``)."""
        self.schedule = self.start_schedule(total_steps)
        self._last_use = self.schedule.last_use()
        if not self._last_use:
            raise RunError(
                f"teacher=numerous: no snapshot would teach in {total_steps} tuning steps (every teacher "
                f"would be the intact model); raise trainer.max_steps or lower teacher.teacher_gap "
                f"({self.teacher_gap:g}), or use teacher=dense"
            )
        self.masks.set_level(self.schedule.student_level(0))

    def level_sparsity(self, level: int) -> float:
        if level not in self._sparsity_at:
            with self.masks.at_level(level):
                self._sparsity_at[level] = round(self.masks.sparsity(), 6)
        return self._sparsity_at[level]

    def before_step(self, step: int) -> None:
        level = self.schedule.student_level(step)
        if level != self.masks.level:
            leaving = self.masks.level
            if leaving in self._last_use:  # this step's state will teach later: keep it
                self._snapshots[leaving] = {
                    k: t.detach().clone() for k, t in self.adapter.state(self.model).items()
                }
                self._snapshot_bytes = max(
                    self._snapshot_bytes,
                    sum(t.numel() * t.element_size() for t in self._snapshots[leaving].values()),
                )
            self.masks.set_level(level)
        for done in [lvl for lvl in self._snapshots if self._last_use[lvl] < step]:
            del self._snapshots[done]
        self._held_max = max(self._held_max, len(self._snapshots))
        self._teacher = self.schedule.teacher_level(step)
        self._record(step, level, self._teacher)

    def _record(self, step: int, student: int, teacher: int | None) -> None:
        last = self._segments[-1] if self._segments else None
        if last and last["student_level"] == student and last["teacher_level"] == teacher:
            last["steps"][1] = step
            return
        self._segments.append(
            {
                "steps": [step, step],
                "student_level": student,
                "student_sparsity": self.level_sparsity(student),
                "teacher": "intact" if teacher is None else "snapshot",
                "teacher_level": teacher,
                "teacher_sparsity": 0.0 if teacher is None else self.level_sparsity(teacher),
            }
        )

    def loss(self, student, teacher, lm_loss, token_mask):
        total, extra = super().loss(student, teacher, lm_loss, token_mask)
        segment = self._segments[-1]
        extra["student_sparsity"] = torch.tensor(segment["student_sparsity"])
        extra["teacher_sparsity"] = torch.tensor(segment["teacher_sparsity"])
        return total, extra

    def teacher_outputs(self, model, input_ids, attention_mask):
        if self._teacher is None:
            return self.intact_outputs(model, input_ids, attention_mask)
        with self.masks.at_level(self._teacher), self.adapter.swapped(model, self._snapshots[self._teacher]):
            return self.decoder_outputs(model, input_ids, attention_mask)

    def state_dict(self) -> dict:
        return {
            "level": self.masks.level,
            "snapshots": {str(level): dict(tensors) for level, tensors in self._snapshots.items()},
            "segments": [dict(segment, steps=list(segment["steps"])) for segment in self._segments],
            "held_max": self._held_max,
            "snapshot_bytes": self._snapshot_bytes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.masks.set_level(state["level"])
        self._snapshots = {int(level): dict(tensors) for level, tensors in state["snapshots"].items()}
        self._segments = [dict(segment, steps=list(segment["steps"])) for segment in state["segments"]]
        self._held_max, self._snapshot_bytes = state["held_max"], state["snapshot_bytes"]

    def finish(self) -> None:
        """The student ends at the target mask; the snapshots are dropped."""
        self.masks.set_level(self.masks.steps)
        self._snapshots.clear()

    def report(self) -> dict:
        return {
            "strategy": self.name,
            "mask_steps": self.masks.steps if self.masks else None,
            "snapshots_used": len(self._last_use),
            "snapshot_stages": sum(1 for segment in self._segments if segment["teacher"] == "snapshot"),
            "snapshots_held_max": self._held_max,
            "snapshot_mib": round(self._snapshot_bytes / 2**20, 2),
            "schedule": self._segments,
        }


TEACHERS = {"none": NoTeacher, "dense": DenseTeacher, "numerous": NumerousTeacher}

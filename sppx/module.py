"""The LightningModule that tunes an adapted (pruned) model."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torchmetrics import SumMetric

from sppx.errors import RunError, is_int, is_number, require
from sppx.evaluate import next_token_nll
from sppx.teachers import NoTeacher

SCHEDULES = ("linear", "cosine", "constant_with_warmup")


@dataclass
class TuneConfig:
    """Optimisation settings (AdamW + warmup) for recovery tuning."""

    lr: float | None = None  # None: the adapter's own recipe lr (``adapter.lr``), filled in by the plan
    weight_decay: float = 0.001
    warmup_ratio: float = 0.03
    schedule: str = "linear"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 10  # optimizer steps between adapter-only checkpoints (0: none)

    def __post_init__(self):
        require(
            self.lr is None or (is_number(self.lr) and 0 < self.lr < 1),
            "tune.lr",
            self.lr,
            "must be a number in (0, 1), or null for the adapter's own lr",
        )
        require(
            is_number(self.weight_decay) and self.weight_decay >= 0,
            "tune.weight_decay",
            self.weight_decay,
            "must be a number >= 0",
        )
        require(
            is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
            "tune.warmup_ratio",
            self.warmup_ratio,
            "must be a number in [0, 1)",
        )
        require(
            self.schedule in SCHEDULES, "tune.schedule", self.schedule, f"allowed: {', '.join(SCHEDULES)}"
        )
        require(
            isinstance(self.gradient_checkpointing, bool),
            "tune.gradient_checkpointing",
            self.gradient_checkpointing,
            "must be true or false",
        )
        require(
            is_int(self.checkpoint_every) and self.checkpoint_every >= 0,
            "tune.checkpoint_every",
            self.checkpoint_every,
            "must be an integer >= 0 (0: no checkpoints)",
        )


@dataclass
class WarmupSchedule:
    """The learning-rate factor of optimizer step ``step`` (0-based): a linear warmup that starts at
    ``1 / warmup`` (never at 0: the first step already learns) and reaches 1 at step ``warmup - 1``, then
    ``linear`` decay, ``cosine`` decay or ``constant_with_warmup``. The decay never reaches 0 on a step
    that is taken (the last step, ``total - 1``, runs at ``1 / (total - warmup)`` of the peak)."""

    warmup: int
    total: int
    kind: str = "linear"

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant_with_warmup":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute decoder blocks in the backward pass (non-reentrant: works with a frozen base)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(input_ids, attention_mask, labels) from a text batch ``(input_ids,)`` (every token is a label,
    no padding) or an instruction batch ``(input_ids, attention_mask, labels)``."""
    if len(batch) == 1:
        return batch[0], None, batch[0]
    input_ids, attention_mask, labels = batch
    return input_ids, attention_mask, labels


class TuneModule(pl.LightningModule):
    """Trains only the parameters left with ``requires_grad`` (the adapter's); logs train/loss,
    train/lr and val/ppl (validation windows, the evaluation protocol's arithmetic).

    Checkpoints hold only the trainable tensors (and Lightning's optimizer, scheduler and loop state),
    never the frozen weights, and are refused when a tensor is not finite, so the last checkpoint on
    disk is always a good one. They also hold what an exact resume needs besides: the random number
    generators' states, the teacher's state (snapshots) and ``settings``, the run settings that decide
    the tuning trajectory (a resume with other settings is refused before any work)."""

    strict_loading = False  # checkpoints leave the frozen weights out; on_load_checkpoint checks the rest

    def __init__(self, model: torch.nn.Module, tune: TuneConfig, teacher=None, settings: str = ""):
        super().__init__()
        self.model = model
        self.tune = tune
        self.teacher = teacher or NoTeacher()
        self.settings = settings
        self._restored: dict | None = None  # resume state applied when fitting starts
        self.val_nll = SumMetric()
        self.val_tokens = SumMetric()
        self.step_times: list[float] = []  # seconds per training batch (forward, backward, step)
        if tune.gradient_checkpointing:
            enable_activation_checkpointing(model)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_keys(self) -> set[str]:
        return {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keys = self.trainable_keys()
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
        if bad:
            raise FloatingPointError(
                f"adapter tensors are not finite after step {self.global_step} ({bad[0]}"
                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); no checkpoint written for it"
            )
        checkpoint["state_dict"] = state
        checkpoint["sppx"] = {
            "settings": self.settings,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "teacher": self.teacher.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = self.trainable_keys() - set(checkpoint["state_dict"])
        if missing:
            raise RunError(
                f"the checkpoint does not hold this adapter: {len(missing)} trainable tensors missing, "
                f"e.g. {sorted(missing)[0]}; start over with overwrite=true"
            )
        self._restored = checkpoint.get("sppx")

    def on_train_batch_start(self, batch, batch_idx):
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.step_times.append(time.perf_counter() - self._step_start)

    def on_fit_start(self):
        self.teacher.begin(int(self.trainer.estimated_stepping_batches))
        if self._restored is not None:  # a resumed run: continue exactly where the checkpoint was taken
            self.teacher.load_state_dict(self._restored["teacher"])
            torch.set_rng_state(self._restored["rng"])
            if self._restored["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._restored["cuda_rng"])
            self._restored = None

    def on_fit_end(self):
        self.teacher.finish()

    def training_step(self, batch, batch_idx):
        input_ids, attention_mask, labels = unpack_batch(batch)
        self.teacher.before_step(self.global_step)
        teacher_out = self.teacher.teacher_outputs(self.model, input_ids, attention_mask)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=self.teacher.wants_hidden,
        )
        nll, count = next_token_nll(out.logits, labels)
        lm_loss = nll / max(count, 1)
        loss, extra = self.teacher.loss(out, teacher_out, lm_loss, attention_mask)
        del teacher_out
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss.item()} at step {self.global_step + 1}")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lm_loss", lm_loss)
        for key, value in extra.items():
            self.log(f"train/{key}", value)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        (input_ids,) = batch
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        nll, count = next_token_nll(logits, input_ids)
        self.val_nll.update(nll.double())
        self.val_tokens.update(torch.tensor(count, dtype=torch.float64))

    def on_validation_epoch_end(self):
        mean_nll = self.val_nll.compute() / self.val_tokens.compute()
        self.log("val/loss", mean_nll.float())
        self.log("val/ppl", torch.exp(mean_nll).float(), prog_bar=True)
        self.val_nll.reset()
        self.val_tokens.reset()

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("nothing to tune: the adapter has no trainable parameters")
        if self.tune.lr is None:
            raise ValueError("tune.lr is not set (the plan fills it from the adapter's lr)")
        optimizer = torch.optim.AdamW(params, lr=self.tune.lr, weight_decay=self.tune.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = WarmupSchedule(math.ceil(self.tune.warmup_ratio * total), total, self.tune.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def decoder_layer_policy():
    """An FSDP auto-wrap policy (``conf/trainer/fsdp.yaml``): every decoder layer (a module whose class
    name ends in ``DecoderLayer``, as in every transformers causal LM) is one sharded unit."""

    def policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return recurse or type(module).__name__.endswith("DecoderLayer")

    return policy

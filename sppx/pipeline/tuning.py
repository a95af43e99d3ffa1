"""The tuning stage's Lightning run: data, module, callbacks and Trainer."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar

from sppx.data import TokenizedCorpus, TuneDataModule, consecutive_windows
from sppx.errors import RunError, require
from sppx.instructions import InstructionDataModule, pad_token_id
from sppx.interrupts import SignalGuard, StopOnSignal
from sppx.module import TuneModule
from sppx.pipeline.planning import Plan, build
from sppx.pipeline.resume import CHECKPOINT_DIR, describe_checkpoint, run_settings
from sppx.progress import LogProgress, interactive

log = logging.getLogger("sppx.pipeline")


def tuning_data(p: Plan, tokenizer, tokens: TokenizedCorpus) -> tuple[object, dict]:
    """The datamodule (text windows, or instruction examples) and what results.json says about it."""
    seqlen = p.corpus.seqlen
    val = consecutive_windows(tokens.streams["validation"], seqlen, p.corpus.val_windows)
    info: dict = {"data": p.corpus.tuning}
    if p.corpus.instruction_tuning:
        examples = p.corpus.tuning_examples(tokenizer)
        info.update(
            examples=len(examples), examples_dropped=examples.dropped, loss_on=p.corpus.instruction_loss
        )
        datamodule = InstructionDataModule(
            examples, val, p.corpus.batch_size, p.seed, pad_id=pad_token_id(tokenizer)
        )
        return datamodule, info
    train = consecutive_windows(tokens.streams["tuning"], seqlen)
    require(train.shape[0] > 0, "data.seqlen", seqlen, "must be shorter than the tuning text")
    return TuneDataModule(train, val, p.corpus.batch_size, p.seed), info


def tune(p: Plan, model, tokenizer, tokens: TokenizedCorpus, logger, teacher, guard: SignalGuard) -> dict:
    """Train the adapter's parameters (Lightning); a signal stops at the end of a step, checkpointed."""
    datamodule, info = tuning_data(p, tokenizer, tokens)
    module = TuneModule(model, p.tune, teacher, settings=run_settings(p.cfg))
    checkpoints = p.output_dir / CHECKPOINT_DIR
    stopper = StopOnSignal(guard, checkpoints / "last.ckpt")
    callbacks = [*tuning_callbacks(p, checkpoints), stopper]
    trainer = instantiate(
        p.cfg.trainer,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(p.output_dir),
        enable_checkpointing=bool(p.tune.checkpoint_every),
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        use_distributed_sampler=False,  # sppx.loaders splits each global batch across processes itself
    )
    model.train()
    if p.resume_from is not None:
        log.info("Resuming tuning from %s (after step %d)", p.resume_from, p.resume_step)
        info.update(resumed_from=str(p.resume_from), resumed_after_step=p.resume_step)
    try:
        with guard.deferred():
            trainer.fit(
                module,
                datamodule=datamodule,
                ckpt_path=str(p.resume_from) if p.resume_from else None,
                weights_only=True,
            )
    except FloatingPointError as err:
        raise RunError(f"tuning stopped: {err}; {describe_checkpoint(checkpoints)}") from None
    if guard.received is not None:  # a signal at the last step: tuning is done, the run stops here
        if stopper.saved_step is None:
            stopper.save(trainer)
        stopper.stop()
    model.eval()
    times = sorted(module.step_times)
    return {
        **info,
        "steps": int(trainer.global_step),
        "step_time_s": round(times[len(times) // 2], 4) if times else None,  # median
        "checkpoint": str(checkpoints / "last.ckpt") if (checkpoints / "last.ckpt").is_file() else None,
    }


def tuning_callbacks(p: Plan, checkpoints: Path) -> list:
    """The user's callbacks, the progress display and the periodic adapter-only checkpoint."""
    callbacks = [build(c, "trainer.callbacks") for c in p.cfg.trainer.get("callbacks") or []]
    if not interactive():  # a batch job: progress as log lines (a bar is unreadable in a log file)
        callbacks.append(LogProgress())
    elif p.cfg.trainer.get("enable_progress_bar", True) and not any(
        isinstance(c, ProgressBar) for c in callbacks
    ):
        callbacks.append(TQDMProgressBar())  # one style of bar for every stage
    if p.tune.checkpoint_every:  # adapter-only state (TuneModule.on_save_checkpoint), one file kept
        callbacks.append(
            ModelCheckpoint(
                dirpath=checkpoints,
                filename="last",
                every_n_train_steps=p.tune.checkpoint_every,
                save_top_k=1,
                enable_version_counter=False,
            )
        )
    return callbacks

"""One run: load -> eval dense -> prune -> eval pruned -> tune -> merge -> eval final -> export.

``plan(cfg)`` builds and checks everything the config selects without touching weights, so bad input
fails in seconds with one line; ``execute(plan)`` does the work and returns the results dict that is
also written to ``results.json``.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import shlex
import time
import typing
import warnings
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from transformers import AutoModelForCausalLM

from sppx.adapters.base import Adapter
from sppx.card import model_card
from sppx.checks import check_paths, check_trainer
from sppx.data import (
    Corpus,
    TokenizedCorpus,
    TuneDataModule,
    calibration_windows,
    consecutive_windows,
    windows_digest,
)
from sppx.errors import ConfigError, RunError, check_annotated_types, is_int, require, require_fraction
from sppx.evaluate import EvalConfig, perplexity
from sppx.export import (
    parameter_counts,
    save_model,
    sparsity_report,
    structured_report,
    verify_model_zeros,
    verify_saved_zeros,
)
from sppx.files import write_json_atomic
from sppx.instructions import InstructionDataModule, pad_token_id
from sppx.interrupts import Interrupted, SignalGuard, StopOnSignal
from sppx.masking import StudentMasks
from sppx.models import default_cache_dir
from sppx.module import TuneConfig, TuneModule
from sppx.profiling import PeakMemory, Stopwatch, release_freed_memory
from sppx.progress import LogProgress, interactive, quiet_library_bars
from sppx.provenance import sppx_provenance
from sppx.pruning import NoPruner, Pruner, SparsityPattern, prune_model
from sppx.pruning.owl import layer_sparsities
from sppx.pruning.sequential import DenseKeeper, prunable_linears
from sppx.pruning.structured import Dims, StructuredContext, StructuredPruner, shrink_model
from sppx.results import RESULTS_FILE
from sppx.run_folder import check_folder, owned, previous_run
from sppx.speed import PROMPT_TOKENS, compare_speeds
from sppx.teachers import NoTeacher
from sppx.tracking import current_sweep, finish_wandb, keep_csv_history, publish, stage_of
from sppx.zeroshot import Tasks, evaluate_tasks, load_tasks, mean_accuracy

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
GROUPS = ("model", "data", "pruner", "pattern", "adapter", "teacher", "trainer", "logger")
TOP_LEVEL_KEYS = (*GROUPS, "paths", "tune", "eval", "seed", "sparsity", "export", "resume", "overwrite")
# What decides a tuning run's trajectory: a checkpoint only resumes a run with the same values.
RESUME_SETTINGS = ("model", "data", "pruner", "pattern", "adapter", "teacher", "tune", "seed", "sparsity")
RESUME_TRAINER_SETTINGS = (
    "max_steps",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "precision",
    "devices",
)


# --------------------------------------------------------------------------- plan: all checks, no weights
def _unexpected_keyword(err: BaseException) -> str | None:
    match = re.search(r"unexpected keyword argument '([^']+)'", str(err))
    return match.group(1) if isinstance(err, TypeError) and match else None


def build(node: DictConfig, group: str, **kwargs):
    """Instantiate a config group's ``_target_``; any error becomes one ConfigError line under ``group``.
    sppx's own classes are checked against their annotations first (booleans are booleans)."""
    check_types(node, group)
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause.under(group) from None
        key = _unexpected_keyword(cause)
        if key is not None:
            raise ConfigError(
                f"{group}.{key}", OmegaConf.select(node, key), f"is not an argument of {node._target_}"
            ) from None
        detail = (
            str(cause or err).strip().splitlines()[-1] if str(cause or err).strip() else type(cause).__name__
        )
        raise ConfigError(
            group, OmegaConf.select(node, "_target_"), f"could not be built: {detail}"
        ) from None
    except MissingMandatoryValue as err:
        raise ConfigError(f"{group}.{err.key}", "???", "is required: set it on the command line") from None


def check_types(node: DictConfig, group: str) -> None:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not (isinstance(target, str) and target.startswith("sppx.")):
        return
    try:
        obj = get_object(target)
        hints = typing.get_type_hints(obj if not isinstance(obj, type) or is_dataclass(obj) else obj.__init__)
    except Exception:  # an unknown target is reported by instantiate, in one line
        return
    values = {
        str(k): node[k] for k in node if not str(k).startswith("_") and not OmegaConf.is_missing(node, k)
    }
    check_annotated_types(hints, values, group)


def check_signature(node: DictConfig, group: str) -> None:
    """Bind a group's keys to its ``_target_``'s signature without building it (unknown keys fail here)."""
    kwargs = {k: v for k, v in node.items() if not str(k).startswith("_")}
    try:
        inspect.signature(get_object(node._target_)).bind_partial(**kwargs)
    except TypeError as err:
        key = _unexpected_keyword(err) or "?"
        raise ConfigError(
            f"{group}.{key}", kwargs.get(key), f"is not an argument of {node._target_}"
        ) from None


@dataclass
class Plan:
    model: object  # a source from sppx.models: .name, .model_config(), .load()
    corpus: Corpus
    pruner: Pruner | StructuredPruner
    pattern: SparsityPattern
    adapter: Adapter
    teacher: object
    tune: TuneConfig
    eval: EvalConfig
    sparsity: float  # the requested fraction; the pattern decides what is pruned (pattern.target)
    seed: int
    export: bool
    output_dir: Path
    cache_dir: Path
    cfg: DictConfig
    tasks: Tasks = field(default_factory=Tasks)  # zero-shot tasks, loaded (datasets included)
    command: str | None = None  # the command line that reproduces the run, when known
    resume_from: Path | None = None  # the checkpoint tuning continues from (resume=...)
    resume_step: int = 0

    @property
    def target_sparsity(self) -> float:
        return 0.0 if isinstance(self.pruner, NoPruner) else self.pattern.target(self.sparsity)

    @property
    def structured(self) -> bool:
        return isinstance(self.pruner, StructuredPruner)

    @property
    def tunes(self) -> bool:
        return self.adapter.name != "none" and self.cfg.trainer.get("max_steps", -1) != 0


def linear_shapes(model_config, targets: list[str]) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of the targeted Linears, from a weightless (meta-device) model."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    return {name: tuple(lin.weight.shape) for name, lin in prunable_linears(skeleton, targets).items()}


def command_line(overrides: list[str] | None) -> str | None:
    """``python run.py <overrides>`` (shell-quoted), or None when the overrides are not known."""
    return None if overrides is None else shlex.join(["python", "run.py", *overrides])


def plan(cfg: DictConfig, overrides: list[str] | None = None) -> Plan:
    """Resolve and check the whole config (and the model's shapes) before any weights are read;
    ``overrides`` (the command line's) are recorded so the outputs can say how to reproduce them."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError("config", "", str(err).splitlines()[0]) from None
    unknown = sorted(set(cfg) - set(TOP_LEVEL_KEYS))
    if unknown:
        key = unknown[0]
        raise ConfigError(
            key, cfg.get(key), f"is not a setting of sppx; top-level keys are: {', '.join(TOP_LEVEL_KEYS)}"
        )
    sparsity = require_fraction("sparsity", cfg.get("sparsity"))
    seed = cfg.get("seed")
    require(is_int(seed) and 0 <= seed < 2**32, "seed", seed, "must be an integer in [0, 2**32)")
    for key in ("export", "overwrite"):
        require(isinstance(cfg.get(key, False), bool), key, cfg.get(key), "must be true or false")
    for key in (*GROUPS, "tune", "eval"):
        allowed = (
            f"must select an option of conf/{key}/" if key in GROUPS else "must be a mapping with a _target_"
        )
        require(isinstance(cfg.get(key), DictConfig) and "_target_" in cfg[key], key, cfg.get(key), allowed)
    check_signature(cfg.logger, "logger")  # loggers may touch disk or network when built: bind only
    check_types(cfg.logger, "logger")
    check_paths(cfg)
    check_trainer(cfg.trainer)
    if cfg.tune.get("lr") is None and cfg.adapter.get("lr") is not None:
        cfg.tune.lr = cfg.adapter.lr  # each adapter tunes at its own recipe's lr unless tune.lr is set
    max_steps = cfg.trainer.get("max_steps", -1)
    require(
        is_int(max_steps) and max_steps >= -1,
        "trainer.max_steps",
        max_steps,
        "must be an integer >= -1 (0: no tuning, -1: no step limit)",
    )
    _quiet_lightning()
    # Lightning validates its arguments (types, precision, accelerator) when a Trainer is built: cheap.
    build(
        cfg.trainer,
        "trainer",
        logger=False,
        callbacks=[],
        enable_progress_bar=False,
        enable_checkpointing=False,
    )

    p = Plan(
        model=build(cfg.model, "model"),
        corpus=build(cfg.data, "data"),
        pruner=build(cfg.pruner, "pruner"),
        pattern=build(cfg.pattern, "pattern"),
        adapter=build(cfg.adapter, "adapter"),
        teacher=build(cfg.teacher, "teacher"),
        tune=build(cfg.tune, "tune"),
        eval=build(cfg.eval, "eval"),
        sparsity=sparsity,
        seed=seed,
        export=cfg.export,
        output_dir=Path(cfg.paths.output_dir),
        cache_dir=Path(cfg.paths.cache_dir) if cfg.paths.get("cache_dir") else default_cache_dir(),
        cfg=cfg,
        command=command_line(overrides),
    )
    if (
        p.pattern.is_nm
        and not isinstance(p.pruner, NoPruner)
        and abs(sparsity - p.pattern.target(sparsity)) > 1e-9
    ):
        log.warning(
            "pattern %s prunes %.3f of the weights; sparsity=%s is ignored",
            p.pattern.label,
            p.pattern.target(sparsity),
            sparsity,
        )
    p.corpus.check()
    if p.tunes:
        p.corpus.check_tuning()
        require(
            p.tune.lr is not None,
            "tune.lr",
            None,
            f"must be set: adapter={p.adapter.name} has no lr of its own (adapter.lr)",
        )

    model_config = p.model.model_config()
    context = getattr(model_config, "max_position_embeddings", None)
    for key, value in (("data.seqlen", p.corpus.seqlen), ("eval.seqlen", p.eval.seqlen)):
        if context is not None:
            require(value <= context, key, value, f"must be <= the model's context length {context}")
    if p.eval.speed and context is not None:
        total = p.eval.speed_prefill_tokens + p.eval.speed_decode_tokens
        require(
            total <= context,
            "eval.speed_prefill_tokens",
            p.eval.speed_prefill_tokens,
            f"plus eval.speed_decode_tokens={p.eval.speed_decode_tokens} must be <= the model's context "
            f"length {context}",
        )
    adapter_shapes = None
    if p.structured:
        p.pruner.check_pattern(p.pattern, sparsity)
        dims = Dims.of(model_config)
        p.pruner.check(dims, sparsity)
        # The adapter tunes the smaller model: check it against the pruned shapes.
        adapter_shapes = {
            name: shape
            for name, shape in p.pruner.budget(dims, sparsity).linear_shapes(dims).items()
            if name.rsplit(".", 1)[-1] in p.adapter.targets
        }
        if p.pruner.needs_calibration:
            p.corpus.check_calibration(p.cache_dir)
        if p.pruner.uses_teacher:
            p.corpus.check_tuning()
    elif not isinstance(p.pruner, NoPruner):
        shapes = linear_shapes(model_config, p.pruner.targets)
        require(len(shapes) > 0, "pruner.targets", p.pruner.targets, "match no Linear of the model")
        for name, (_, in_features) in shapes.items():
            p.pattern.check_width(in_features, name)
        p.pruner.check_pattern(p.pattern, p.target_sparsity)
        if p.pruner.needs_calibration:
            p.corpus.check_calibration(p.cache_dir)
    if p.tunes:
        p.adapter.check_shapes(adapter_shapes or linear_shapes(model_config, p.adapter.targets))
    check_teacher(p)
    check_devices(p)
    p.resume_from, p.resume_step = resume_checkpoint(p)
    check_folder(p.output_dir, cfg.get("resume"), cfg.get("overwrite", False))
    if p.eval.zero_shot:  # last: the slowest check (it loads every task's dataset)
        p.tasks = load_tasks(p.eval.tasks, p.eval.tasks_optional, p.cache_dir)
    return p


def run_settings(cfg: DictConfig) -> str:
    """The settings that decide the tuning trajectory, as canonical JSON (stored in checkpoints)."""
    settings = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
        for k in RESUME_SETTINGS
    }
    settings["tune"].pop("checkpoint_every", None)
    settings["trainer"] = {k: cfg.trainer.get(k) for k in RESUME_TRAINER_SETTINGS}
    return json.dumps(settings, sort_keys=True, default=str)


def _first_difference(old, new, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"


def resume_checkpoint(p: Plan) -> tuple[Path | None, int]:
    """The checkpoint ``resume`` names (true: this run's own), checked against this run's settings."""
    value = p.cfg.get("resume")
    if value is False or value is None:
        return None, 0
    require(
        value is True or (isinstance(value, str) and value.strip() != ""),
        "resume",
        value,
        "must be true, false, or the path of a run folder or checkpoint",
    )
    require(
        p.tunes, "resume", value, "continues tuning, but this run does not tune (adapter=none or max_steps=0)"
    )
    if value is True:
        path = p.output_dir / CHECKPOINT_DIR / "last.ckpt"
    else:
        path = Path(value).expanduser()
        for candidate in (path / CHECKPOINT_DIR / "last.ckpt", path / "last.ckpt"):
            if path.is_dir() and candidate.is_file():
                path = candidate
                break
    require(
        path.is_file(),
        "resume",
        value,
        f"found no checkpoint at {path} (a run writes checkpoints/last.ckpt every tune.checkpoint_every "
        "steps; give its folder with hydra.run.dir=..., or resume=<that folder>)",
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError("resume", str(path), f"could not read the checkpoint: {_one_line(err)}") from None
    saved = (state.get("sppx") or {}).get("settings")
    current = run_settings(p.cfg)
    if saved != current:
        why = (
            _first_difference(json.loads(saved), json.loads(current))
            if saved
            else "it was not written by sppx's tuning"
        )
        raise ConfigError("resume", str(path), f"the checkpoint belongs to another run ({why})")
    return path, int(state.get("global_step", 0))


def check_devices(p: Plan) -> None:
    """With several processes (DDP), every process takes an equal slice of each global batch."""
    devices = p.cfg.trainer.get("devices", 1)
    if not (p.tunes and is_int(devices) and devices > 1):
        return
    require(
        p.corpus.batch_size % devices == 0,
        "data.batch_size",
        p.corpus.batch_size,
        f"is the global batch: it must divide among trainer.devices={devices} processes",
    )
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    require(
        not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN),
        "trainer.devices",
        devices,
        "several processes per job do not work inside a Hydra multirun (Lightning's DDP launcher starts "
        "each process as a single run); run the jobs one at a time, or one job per node on a cluster",
    )


def check_teacher(p: Plan) -> None:
    """A teacher needs tuning; dense and numerous teachers need a pruner that only masks (the dense
    weights are the teacher); numerous needs a pruner score to nest its masks by."""
    teacher, pruner = p.teacher, p.pruner
    if teacher.name == "none":
        return
    if p.structured:
        require(
            pruner.uses_teacher,
            "teacher",
            teacher.name,
            f"distils from the dense weights, which pruner={pruner.name} removes; use teacher=none "
            "(pruner=nuteprune uses the teacher while it learns its masks)",
        )
        return
    require(
        p.tunes,
        "teacher",
        teacher.name,
        "needs tuning: choose adapter=spp, lora or masked_lora and trainer.max_steps != 0 (or teacher=none)",
    )
    require(
        not pruner.updates_weights,
        "teacher",
        teacher.name,
        f"keeps the dense weights and masks them in the student's forward, but pruner={pruner.name} "
        "rewrites the kept weights; use pruner=magnitude or wanda (or teacher=none)",
    )
    if teacher.nested:
        require(
            not isinstance(pruner, NoPruner),
            "teacher",
            teacher.name,
            "ramps the sparsity up to the pruner's masks; choose pruner=magnitude or wanda",
        )
        require(
            type(pruner).score is not Pruner.score,
            "teacher",
            teacher.name,
            f"nests masks by the pruner's score; pruner={pruner.name} has none (use magnitude or wanda)",
        )
        teacher.check_target(p.target_sparsity)


# --------------------------------------------------------------------------- execute
def _quiet_lightning() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")  # raised inside Lightning itself
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def execute(p: Plan, progress: bool = True) -> dict:
    """Run the plan. A run that fails (or is interrupted) leaves a ``results.json`` whose status says so,
    with the error's first line, and never a complete-looking ``model/``."""
    watch = Stopwatch(log, quiet=("eval",))  # stages are logged as they start and end
    quiet_library_bars()
    with SignalGuard() as guard:
        try:
            return _execute(p, progress, watch, guard)
        except BaseException as err:
            if process_rank() == 0:
                stage = watch.raised_in or watch.current or "setup"
                record_failure(p.output_dir, p.cfg, p.command, err, stage)
                finish_wandb(failed=True)
            raise


def process_rank() -> int:
    """This process's global rank: 0 unless it is one of the extra processes of data-parallel tuning
    (Lightning starts them with RANK / LOCAL_RANK / SLURM_PROCID set)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def launch_choices() -> dict:
    """The option chosen in each config group, as Hydra composed the run (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    chosen = HydraConfig.get().runtime.choices
    return {group: chosen.get(group) for group in GROUPS if chosen.get(group) is not None}


def resume_command(command: str | None, output_dir: Path, checkpoint: Path | None) -> str | None:
    """The command that continues an interrupted run in its own folder: from its checkpoint when it has
    one (``resume=true``), else from the start (``overwrite=true``)."""
    if command is None:
        return None
    own = ("resume=", "overwrite=", "hydra.run.dir=", "+resume=", "+overwrite=")
    args = [a for a in shlex.split(command)[2:] if not a.startswith(own)]
    tail = "resume=true" if checkpoint is not None else "overwrite=true"
    return shlex.join(["python", "run.py", *args, f"hydra.run.dir={Path(output_dir).resolve()}", tail])


def record_failure(
    output_dir: Path, cfg: DictConfig, command: str | None, err: BaseException, stage: str | None = None
) -> None:
    """Write ``results.json`` saying the run failed (or was interrupted, and how to resume it), with the
    error's first line and the stage it stopped in."""
    interrupted = isinstance(err, (KeyboardInterrupt, Interrupted))
    status = "interrupted" if interrupted else "failed"
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # a config that does not even resolve
        config = OmegaConf.to_container(cfg, resolve=False)
    try:
        write_json_atomic(
            Path(output_dir) / RESULTS_FILE,
            {
                "status": status,
                "error": _one_line(err),
                "error_type": type(err).__name__,
                "stage": stage,
                "interrupted": interruption(err, output_dir, command) if interrupted else None,
                "command": command,
                "choices": launch_choices(),
                "config": config,
            },
        )
    except OSError as write_err:  # keep the original error the one that is raised
        log.error("could not record the failure in %s: %s", Path(output_dir) / RESULTS_FILE, write_err)


def interruption(err: BaseException, output_dir: Path, command: str | None) -> dict:
    """What an interrupted run's record says: the signal, the step and checkpoint it stopped at, and the
    command that resumes it (also attached to the exception, for the one-line message)."""
    step = getattr(err, "step", None)
    checkpoint = getattr(err, "checkpoint", None)
    if checkpoint is None and (Path(output_dir) / CHECKPOINT_DIR / "last.ckpt").is_file():
        checkpoint = Path(output_dir) / CHECKPOINT_DIR / "last.ckpt"
    how = resume_command(command, output_dir, checkpoint)
    if isinstance(err, Interrupted):
        err.resume = how
    return {
        "signal": err.signal_name if isinstance(err, Interrupted) else "SIGINT",
        "step": step,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "resume": how,
    }


def _execute(p: Plan, progress: bool, watch: Stopwatch, guard: SignalGuard) -> dict | None:
    cfg = p.cfg
    # Data-parallel tuning starts this pipeline once per process; the extra processes prune the same
    # model (deterministically), join the tuning, and leave measuring and writing to the first.
    leader = process_rank() == 0
    start = time.perf_counter()
    p.output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(p.seed, verbose=False)
    logger = build(cfg.logger, "logger", **_logger_context(p))
    if p.resume_from is not None:
        keep_csv_history(logger, p.resume_step)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    with watch("load"):
        try:
            model, tokenizer = p.model.load()
        except Exception as err:  # damaged weights (truncated, bad header), a broken tokenizer file...
            raise RunError(f"the model {p.model.name} could not be loaded: {_one_line(err)}") from None
        tokens = TokenizedCorpus.build(p.corpus, tokenizer, p.cache_dir)
    log.info("Loaded %s; corpus %s tokens per part: %s", p.model.name, p.corpus.name, tokens.sizes())
    eval_windows = consecutive_windows(tokens.streams["evaluation"], p.eval.seqlen, p.eval.max_windows)
    require(
        eval_windows.shape[0] > 0,
        "eval.seqlen",
        p.eval.seqlen,
        f"must be shorter than the evaluation text ({tokens.sizes()['evaluation']} tokens)",
    )

    def measure(desc: str) -> dict | None:
        if not leader:
            return None
        with watch("eval"):
            result = perplexity(
                model, eval_windows, p.eval.batch_size, desc=f"ppl ({desc})", progress=progress
            )
        log.info("ppl (%s): %.3f on %d windows of %d tokens", desc, result["ppl"], *eval_windows.shape)
        return result

    zero_shot: dict[str, dict] = {}  # stage -> task -> metrics

    def measure_tasks(stage: str) -> None:
        if leader and p.eval.tasks_at(stage):
            log.info("Zero-shot tasks on the %s model: %s", stage, ", ".join(p.tasks.tasks))
            with watch("zero-shot"):
                zero_shot[stage] = evaluate_tasks(
                    model, tokenizer, p.tasks, p.eval.task_batch_size, p.eval.task_limit
                )

    ppl: dict[str, dict | None] = {"dense": measure("dense") if p.eval.dense else None}
    measure_tasks("dense")

    # Prune.
    masks: dict[str, torch.Tensor] = {}
    prune_info: dict = {"allocation": p.pruner.allocation, "layer_targets": None, "phases_s": {}}
    calibration: dict | None = None
    # A distilling teacher is the same weights seen dense: keep them, and mask in the student's forward.
    student_masks: StudentMasks | None = None
    keeps_dense = p.teacher.needs_dense and p.tunes and not p.structured
    # A structured pruner that trains its masks uses the teacher itself; recovery then tunes on text.
    recovery_teacher = NoTeacher() if p.structured else p.teacher
    structured: StructuredOutcome | None = None
    mask_steps = p.teacher.levels_for(p.target_sparsity) if keeps_dense and p.teacher.nested else 0
    keeper = DenseKeeper(p.pruner, mask_steps) if keeps_dense else None
    if not isinstance(p.pruner, NoPruner):
        calib = None
        if p.pruner.needs_calibration:
            stream = p.corpus.calibration_stream(tokens, tokenizer, p.cache_dir)
            calib = calibration_windows(stream, p.corpus.nsamples, p.corpus.seqlen, p.seed)
            calibration = {
                "source": p.corpus.calibration,
                "windows": int(calib.shape[0]),
                "seqlen": int(calib.shape[1]),
                "seed": p.seed,
                "sampler": "uniform random start offsets in the source's token stream",
                "source_tokens": int(stream.numel()),
                "digest": windows_digest(calib),
            }
        phases = Stopwatch()
        if p.structured:
            with watch("prune"), PeakMemory() as peak:
                structured = _prune_structured(p, model, tokens, calib, logger, phases, progress)
        else:
            with watch("prune"), PeakMemory() as peak:
                with phases("OWL outliers"):
                    layer_targets = layer_sparsities(model, p.pruner, p.target_sparsity, calib, progress)
                masks = prune_model(
                    model,
                    p.pruner,
                    layer_targets,
                    p.pattern,
                    calib,
                    progress=progress,
                    watch=phases,
                    keeper=keeper,
                )
            check_empty_matrices(masks, p.pruner)
            if p.pruner.allocation == "uniform":
                phases.times.pop("OWL outliers")
            prune_info["layer_targets"] = layer_targets
        prune_info.update(
            structure=structured.info if structured else None,
            phases_s={k: round(v, 3) for k, v in phases.times.items()},
            peak_rss_mib=round(peak.rss_peak / 2**20, 1),
            peak_rss_increase_mib=round(peak.rss_increase / 2**20, 1),
        )
        if peak.cuda_peak:
            prune_info["peak_cuda_mib"] = round(peak.cuda_peak / 2**20, 1)
    if keeps_dense:
        student_masks = StudentMasks.attach(model, masks, keeper.levels or None, mask_steps)
        masks = student_masks.keeps()  # the target masks (shared with the modules, not copied)
    release_freed_memory()
    pruned_changed = bool(masks) or structured is not None
    if p.eval.pruned:
        ppl["pruned"] = measure("pruned") if pruned_changed or ppl["dense"] is None else ppl["dense"]
    else:
        ppl["pruned"] = None
    measure_tasks("pruned")

    # Tune (only adapter parameters train), then merge and verify.
    trainable = 0
    tune_info: dict = {}
    # e.g. LoRA: the merge fills the zeros in (a structured model has none left to keep)
    dense_merge = p.tunes and not p.adapter.keeps_zeros and not p.structured
    before_merge = sparsity_report(model, p.pruner.targets)["measured"] if dense_merge else None
    if p.tunes:
        p.adapter.apply(model)
        trainable = parameter_counts(model)["trainable"]
        recovery_teacher.bind(model, student_masks, p.adapter, p.target_sparsity)
        with watch("tune"), PeakMemory() as peak:
            tune_info = _tune(p, model, tokenizer, tokens, logger, recovery_teacher, guard)
        if not leader:
            return None
        tune_info.update(
            peak_rss_mib=round(peak.rss_peak / 2**20, 1),
            peak_rss_increase_mib=round(peak.rss_increase / 2**20, 1),
        )
        if peak.cuda_peak:
            tune_info["peak_cuda_mib"] = round(peak.cuda_peak / 2**20, 1)
        p.adapter.save(model, p.output_dir / "adapter")
        with watch("merge"):
            p.adapter.merge(model)
    if student_masks is not None:
        with watch("merge"):
            student_masks.bake()
    with watch("merge"):
        zeros_checked = 0 if dense_merge else verify_model_zeros(model, masks)
    model.requires_grad_(False)
    ppl["final"] = measure("final") if p.tunes or ppl["pruned"] is None else ppl["pruned"]
    # The validation part (never the evaluation part): what searches over settings minimise.
    val_windows = consecutive_windows(tokens.streams["validation"], p.corpus.seqlen, p.corpus.val_windows)
    with watch("eval"):
        ppl["validation"] = (
            perplexity(model, val_windows, p.eval.batch_size, desc="ppl (validation)", progress=progress)
            if val_windows.shape[0]
            else None
        )
    if ppl["validation"] is not None:
        log.info("ppl (validation): %.3f on %d windows", ppl["validation"]["ppl"], val_windows.shape[0])
    measure_tasks("final")
    speed = _measure_speed(p, model, watch, progress) if p.eval.speed else None

    targets = p.pruner.targets
    report = sparsity_report(model, targets)
    if structured is not None:  # removed, not zeroed: measure against the dense shapes
        report.update(structured_report(model, structured.dense_shapes, structured.layers_kept, targets))
    if dense_merge and before_merge - report["measured"] > 0:
        log.warning(
            "adapter %s merged densely: sparsity %.4f -> %.4f",
            p.adapter.name,
            before_merge,
            report["measured"],
        )
    counts = parameter_counts(model)
    results = {
        "status": "complete",
        "command": p.command,
        "sppx": sppx_provenance(),
        "ppl": {
            "dense": _ppl(ppl["dense"]),
            "pruned": _ppl(ppl["pruned"]),
            "final": _ppl(ppl["final"]),
            "seqlen": int(eval_windows.shape[1]),
            "windows": int(eval_windows.shape[0]),
            "validation": _ppl(ppl["validation"]),  # the final model on the validation windows
        },
        "zeroshot": _zero_shot_report(p, zero_shot) if p.eval.zero_shot else None,
        "speed": speed,
        "sparsity": {
            "target": p.target_sparsity,
            "measured": report["measured"],
            "pattern": p.pattern.label,
            "requested": p.sparsity,
            "zeros_verified": zeros_checked,
            "zeros_verified_on_disk": 0,
            "before_merge": before_merge if dense_merge else report["measured"],
            "lost_in_merge": before_merge - report["measured"] if dense_merge else 0.0,
            "per_type": report["per_type"],
            "per_layer": report["per_layer"],
            "per_module": report["per_module"],
        },
        "prune": prune_info,
        "params": {"total": counts["total"], "nonzero": counts["nonzero"], "trainable": trainable},
        "tune": tune_info,
        "teacher": structured.teacher if structured else p.teacher.report(),
        "time_s": {},
        "choices": {
            "model": p.model.name,
            "data": p.corpus.name,
            "pruner": p.pruner.name,
            "pattern": p.pattern.label,
            "adapter": p.adapter.name,
            "teacher": p.teacher.name,
        },
        "data": {
            "tokens": tokens.sizes(),
            "calibration_windows": calibration["windows"] if calibration else 0,
            "calibration": calibration,
        },
        "model_dir": None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }

    # Export (with its model card); the zeros are re-checked on the files before the folder is renamed.
    if p.export:
        with watch("export"):

            def verify(directory: Path) -> None:
                if not dense_merge:
                    results["sparsity"]["zeros_verified_on_disk"] = verify_saved_zeros(directory, masks)

            model_dir = save_model(model, tokenizer, p.output_dir / "model", model_card(results), verify)
        results["model_dir"] = str(model_dir)
        log.info("export: %s", model_dir)
    watch.times["total"] = time.perf_counter() - start
    results["time_s"] = {
        k: round(watch.times.get(k, 0.0), 3)
        for k in ("load", "prune", "tune", "merge", "eval", "zero-shot", "speed", "export", "total")
    }
    final_metrics = _final_metrics(results)
    logger.log_metrics({k: v for k, v in final_metrics.items() if v is not None})
    publish(logger, results, final_metrics)
    logger.save()
    logger.finalize("success")
    finish_wandb()
    write_json_atomic(p.output_dir / RESULTS_FILE, results)
    return results


def _logger_context(p: Plan) -> dict:
    """What the run tells a logger that asks for it (W&B: its job_type and group)."""
    accepted = inspect.signature(get_object(p.cfg.logger._target_)).parameters
    context = {
        "stage": stage_of(not isinstance(p.pruner, NoPruner), p.tunes),
        "sweep": current_sweep(),
        "resuming": p.resume_from is not None and p.resume_from.parent.parent == p.output_dir,
    }
    return {k: v for k, v in context.items() if k in accepted}


def _final_metrics(results: dict) -> dict:
    """The run's final numbers under the metric names every logger gets."""
    metrics = {
        "test/ppl": results["ppl"]["final"],
        "test/ppl_dense": results["ppl"]["dense"],
        "test/ppl_pruned": results["ppl"]["pruned"],
        "val/ppl_final": results["ppl"]["validation"],
        "prune/sparsity": results["sparsity"]["measured"],
        "prune/time_s": results["time_s"]["prune"],
        "model/params_nonzero": results["params"]["nonzero"],
        "model/params_trainable": results["params"]["trainable"],
    }
    zs = results.get("zeroshot") or {}
    for stage, tasks in (zs.get("stages") or {}).items():
        suffix = "" if stage == "final" else f"_{stage}"
        for task, task_metrics in tasks.items():
            if "acc" in task_metrics:
                metrics[f"test/acc_{task}{suffix}"] = task_metrics["acc"]
        metrics[f"test/acc_mean{suffix}"] = zs["mean_acc"].get(stage)
    final_speed = (results.get("speed") or {}).get("final")
    if final_speed:
        metrics.update(
            {
                "test/prefill_tps": final_speed["prefill_tps"],
                "test/decode_tps": final_speed["decode_tps"],
                "test/prefill_x_dense": final_speed["prefill_x"],
                "test/decode_x_dense": final_speed["decode_x"],
            }
        )
    return metrics


def _zero_shot_report(p: Plan, zero_shot: dict[str, dict]) -> dict:
    means = {stage: mean_accuracy(tasks) for stage, tasks in zero_shot.items()}
    retained = (
        means["final"] / means["dense"] if means.get("final") is not None and means.get("dense") else None
    )
    return {
        "tasks": {name: {"source": p.tasks.sources[name]} for name in p.tasks.tasks},
        "skipped": dict(p.tasks.skipped),
        "limit": p.eval.task_limit,
        "stages": zero_shot,
        "mean_acc": means,
        "retained": retained,  # mean acc of the final model / the dense one's
    }


def _measure_speed(p: Plan, model, watch: Stopwatch, progress: bool) -> dict:
    """Prefill and decode tokens/s of the final model and of a fresh copy of the dense one, timed side
    by side; on a GPU a 2:4 model is also timed through semi-structured sparse kernels."""
    with watch("speed"):
        device = next(model.parameters()).device
        dense, _ = p.model.load()
        models = {"dense": dense.to(device), "final": model}
        semi = _semi_structured_copy(p, model) if device.type == "cuda" else None
        if semi is not None:
            models["final_2:4_kernels"] = semi
        speeds = compare_speeds(
            models,
            prefill_tokens=p.eval.speed_prefill_tokens,
            decode_tokens=p.eval.speed_decode_tokens,
            repeats=p.eval.speed_repeats,
            seed=p.seed,
            on_round=(lambda i, n: log.info("speed round %d/%d", i, n)) if progress else None,
        )
        del models, dense, semi
        release_freed_memory()
    out = {name: {**s.as_dict(), **s.ratios(speeds["dense"])} for name, s in speeds.items()}
    out["setup"] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": p.eval.speed_repeats,
        "prefill_tokens": p.eval.speed_prefill_tokens,
        "decode_tokens": p.eval.speed_decode_tokens,
        "prompt_tokens": PROMPT_TOKENS,
    }
    return out


def _semi_structured_copy(p: Plan, model):
    """A half-precision copy of a 2:4 model whose 2:4 Linears use semi-structured sparse kernels."""
    if not (p.pattern.is_nm and (p.pattern.n, p.pattern.m) == (2, 4)):
        return None
    from sppx.pruning.semi_structured import semi_structured_model

    try:
        return semi_structured_model(model, p.pruner.targets)
    except (RuntimeError, ValueError) as err:  # no kernel for this GPU or shape: report, keep going
        log.warning("2:4 sparse kernels not timed: %s", _one_line(err))
        return None


@dataclass
class StructuredOutcome:
    info: dict  # results.json's prune.structure
    teacher: dict | None  # the pruner's teacher record (NutePrune), results.json's teacher
    dense_shapes: dict[str, tuple[int, int]]  # of the pruned Linears before pruning
    layers_kept: list[int]  # dense indices of the layers left, in order


def _prune_structured(
    p: Plan, model, tokens: TokenizedCorpus, calib, logger, watch, progress
) -> StructuredOutcome:
    """Choose the units (the pruner may rewrite kept weights), then remove them physically."""
    dims = Dims.of(model.config)
    budget = p.pruner.budget(dims, p.sparsity)
    ctx = StructuredContext(
        calibration=calib,
        progress=progress,
        watch=watch,
        teacher=p.teacher,
        logger=logger,
        seed=p.seed,
        output_dir=p.output_dir,
    )
    if p.pruner.uses_teacher:  # it trains its masks on the tuning text
        ctx.train = consecutive_windows(tokens.streams["tuning"], p.corpus.seqlen)
        require(
            ctx.train.shape[0] > 0, "data.seqlen", p.corpus.seqlen, "must be shorter than the tuning text"
        )
    dense_shapes = {
        n: tuple(lin.weight.shape) for n, lin in prunable_linears(model, p.pruner.targets).items()
    }
    structure = p.pruner.select(model, budget, ctx)
    with watch("remove units"):
        shrink_model(model, structure)
    method = getattr(p.pruner, "report", None) or {}
    info = {
        **structure.summary(),
        "budget": {"layers": budget.layers, "heads": budget.heads, "neurons": budget.neurons},
        "head_mode": budget.head_mode,
        "method": {k: v for k, v in method.items() if k != "teacher"},
    }
    return StructuredOutcome(info, method.get("teacher"), dense_shapes, structure.layers_kept)


def check_empty_matrices(masks: dict[str, torch.Tensor], pruner) -> None:
    """A matrix pruned to nothing cannot be recovered by a sparsity-preserving adapter and usually means
    the settings went too far: stop, unless ``pruner.allow_empty``."""
    empty = [name for name, keep in masks.items() if not bool(keep.any())]
    if empty and not pruner.allow_empty:
        raise RunError(
            f"pruner={pruner.name} pruned {len(empty)} whole matrices to zero (e.g. {empty[0]}); lower the "
            "sparsity, or set pruner.allow_empty=true to keep such a model"
        )


def _ppl(entry: dict | None) -> float | None:
    return None if entry is None else entry["ppl"]


def _tune(p: Plan, model, tokenizer, tokens: TokenizedCorpus, logger, teacher, guard: SignalGuard) -> dict:
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
    else:
        train = consecutive_windows(tokens.streams["tuning"], seqlen)
        require(train.shape[0] > 0, "data.seqlen", seqlen, "must be shorter than the tuning text")
        datamodule = TuneDataModule(train, val, p.corpus.batch_size, p.seed)
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


def describe_checkpoint(directory: Path) -> str:
    """Where the last good adapter checkpoint is and its step, in words."""
    path = directory / "last.ckpt"
    if not path.is_file():
        return "no checkpoint had been written (tune.checkpoint_every sets how often)"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return f"the last good checkpoint is {path} (after step {state.get('global_step')})"


def objective(results: dict) -> float:
    """What a hyper-parameter search minimises: the final model's perplexity on the validation part."""
    value = results["ppl"]["validation"]
    return float("nan") if value is None else float(value)


def run(
    cfg: DictConfig,
    progress: bool = True,
    overrides: list[str] | None = None,
    record_bad_input: bool = False,
) -> dict:
    """Plan (all checks) then execute; returns the results written to ``results.json``. ``overrides``:
    the command line's, recorded as the command that reproduces the run. Bad input writes nothing,
    unless ``record_bad_input`` (a sweep's job: its results.json then says it failed, and why)."""
    try:
        p = plan(cfg, overrides)
    except ConfigError as err:
        folder = Path(cfg.paths.output_dir)
        if record_bad_input and previous_run(folder) is None:
            record_failure(folder, cfg, command_line(overrides), err)
        raise
    if process_rank() != 0:  # an extra process of data-parallel tuning: the first one holds the folder
        return execute(p, progress=progress)
    with owned(p.output_dir, p.cfg, cfg.get("overwrite", False)):
        return execute(p, progress=progress)

"""The plan: every component the config selects, built and checked before any weights are read.

``flow.plan(cfg)`` resolves the config and checks its top-level keys (``check_top_level``), builds
every component (``build_plan``: model source, corpus, pruner, pattern, adapter, teacher, tuning and
evaluation settings), then asks every enabled stage to check its own settings against the model's
shapes (read from its config alone). Bad input fails there, in seconds, with one line.
"""

from __future__ import annotations

import inspect
import logging
import re
import shlex
import typing
import warnings
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from transformers import AutoModelForCausalLM

from sppx.adapters.base import Adapter
from sppx.anatomy import family_of, prunable_linears
from sppx.checks import check_paths, check_trainer, fit_device, resolve_device
from sppx.contracts import ModelSource, Teacher
from sppx.cpu_linear import KERNELS
from sppx.data import Corpus
from sppx.errors import ConfigError, check_annotated_types, is_int, require, require_fraction
from sppx.evaluate import EvalConfig
from sppx.export import ExportConfig
from sppx.models import default_cache_dir, torch_dtype
from sppx.module import TuneConfig
from sppx.pruning import NoPruner, Pruner, SparsityPattern
from sppx.pruning.structured import StructuredPruner
from sppx.zeroshot import Tasks

log = logging.getLogger(__name__)

GROUPS = ("model", "data", "pruner", "pattern", "adapter", "teacher", "trainer", "logger")
TOP_LEVEL_KEYS = (
    *GROUPS,
    "paths",
    "tune",
    "eval",
    "seed",
    "device",
    "cpu_linear",
    "sparsity",
    "export",
    "resume",
    "overwrite",
    "tags",
    "optimized_metric",
)
# What a search may optimise (optimized_metric): final metrics of the validation part or of the model,
# never of the evaluation part (settings are chosen on validation data).
OPTIMIZED_METRICS = ("val/ppl_final", "prune/sparsity", "model/params_nonzero")


@dataclass
class Plan:
    model: ModelSource
    corpus: Corpus
    pruner: Pruner | StructuredPruner
    pattern: SparsityPattern
    adapter: Adapter
    teacher: Teacher
    tune: TuneConfig
    eval: EvalConfig
    sparsity: float  # the requested fraction; the pattern decides what is pruned (pattern.target)
    seed: int
    export: ExportConfig
    output_dir: Path
    cache_dir: Path
    cfg: DictConfig
    tags: list[str] = field(default_factory=list)  # free metadata: results.json and the W&B run's tags
    model_config: object = None  # the model's transformers config (its shapes; no weights)
    tasks: Tasks = field(default_factory=Tasks)  # zero-shot tasks, loaded (datasets included)
    command: str | None = None  # the command line that reproduces the run, when known
    resume_from: Path | None = None  # the checkpoint tuning continues from (resume=...)
    resume_step: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the model lives
    cpu_linear: str = "auto"  # the fp32 product kernel of pruning's calibration forwards on the CPU

    @property
    def target_sparsity(self) -> float:
        return 0.0 if isinstance(self.pruner, NoPruner) else self.pattern.target(self.sparsity)

    @property
    def prunes(self) -> bool:
        return not isinstance(self.pruner, NoPruner)

    @property
    def structured(self) -> bool:
        return isinstance(self.pruner, StructuredPruner)

    @property
    def tunes(self) -> bool:
        return self.adapter.name != "none" and self.cfg.trainer.get("max_steps", -1) != 0

    @property
    def keeps_dense(self) -> bool:
        """A distilling teacher is the same weights seen dense: pruning keeps them, and the masks apply
        in the student's forward (one-shot pruning only: a structured pruner removes the units)."""
        return self.teacher.needs_dense and self.tunes and not self.structured

    @property
    def mask_steps(self) -> int:
        """Nested mask levels the student's sparsity ramps through (numerous teachers), else 0."""
        return (
            self.teacher.levels_for(self.target_sparsity) if self.keeps_dense and self.teacher.nested else 0
        )

    @property
    def merge_fills_zeros(self) -> bool:
        """The adapter's merge fills the pruned zeros in (LoRA; a structured model has none to keep)."""
        return self.tunes and not self.adapter.keeps_zeros and not self.structured


# --------------------------------------------------------------------------- building components
def _unexpected_keyword(err: BaseException) -> str | None:
    match = re.search(r"unexpected keyword argument '([^']+)'", str(err))
    return match.group(1) if isinstance(err, TypeError) and match else None


def build(node: DictConfig, group: str, **kwargs):
    """Instantiate a config group's ``_target_``; any error becomes one ConfigError line under ``group``.
    The target's annotated booleans, integers and floats are checked first (booleans are booleans)."""
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
    """Check a group's values against its target's annotations (sppx's classes and a user's own)."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not isinstance(target, str):
        return
    try:
        obj = get_object(target)
        hints = typing.get_type_hints(obj if not isinstance(obj, type) or is_dataclass(obj) else obj.__init__)
    except Exception:  # an unknown target (or one without readable hints) is reported when built
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


def command_line(overrides: list[str] | None) -> str | None:
    """``python run.py <overrides>`` (shell-quoted), or None when the overrides are not known."""
    return None if overrides is None else shlex.join(["python", "run.py", *overrides])


def quiet_lightning() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")  # raised inside Lightning itself
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- the checks
def check_top_level(cfg: DictConfig) -> None:
    """The config resolves, has only sppx's top-level keys, and each of them has the right kind."""
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
    require_fraction("sparsity", cfg.get("sparsity"))
    seed = cfg.get("seed")
    require(is_int(seed) and 0 <= seed < 2**32, "seed", seed, "must be an integer in [0, 2**32)")
    require(
        isinstance(cfg.get("overwrite", False), bool),
        "overwrite",
        cfg.get("overwrite"),
        "must be true or false",
    )
    require(
        OmegaConf.is_dict(cfg.get("export")),
        "export",
        cfg.get("export"),
        "must be true or false (export.enabled), or set its keys: export.enabled, export.format, export.dtype",
    )
    tags = OmegaConf.to_container(cfg.tags) if OmegaConf.is_list(cfg.get("tags")) else cfg.get("tags")
    require(
        tags is None
        or (
            isinstance(tags, list) and all(isinstance(t, (str, int)) and 1 <= len(str(t)) <= 64 for t in tags)
        ),
        "tags",
        tags,
        "must be a list of words of 1 to 64 characters, e.g. tags=[baseline,wanda]",
    )
    kernel = cfg.get("cpu_linear", "auto")
    require(kernel in KERNELS, "cpu_linear", kernel, f"allowed: {', '.join(KERNELS)}")
    metric = cfg.get("optimized_metric", "val/ppl_final")
    require(
        metric in OPTIMIZED_METRICS, "optimized_metric", metric, f"allowed: {', '.join(OPTIMIZED_METRICS)}"
    )
    for key in (*GROUPS, "tune", "eval"):
        allowed = (
            f"must select an option of conf/{key}/" if key in GROUPS else "must be a mapping with a _target_"
        )
        require(isinstance(cfg.get(key), DictConfig) and "_target_" in cfg[key], key, cfg.get(key), allowed)
    check_signature(cfg.logger, "logger")  # loggers may touch disk or network when built: bind only
    check_types(cfg.logger, "logger")
    check_paths(cfg)
    check_trainer(cfg.trainer)
    max_steps = cfg.trainer.get("max_steps", -1)
    require(
        is_int(max_steps) and max_steps >= -1,
        "trainer.max_steps",
        max_steps,
        "must be an integer >= -1 (0: no tuning, -1: no step limit)",
    )


def build_plan(cfg: DictConfig, overrides: list[str] | None) -> Plan:
    """Build every component the config selects (cheap: no weights, no data)."""
    if cfg.tune.get("lr") is None and cfg.adapter.get("lr") is not None:
        cfg.tune.lr = cfg.adapter.lr  # each adapter tunes at its own recipe's lr unless tune.lr is set
    quiet_lightning()
    requested_device = cfg.get("device", "auto")
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
        sparsity=cfg.sparsity,
        seed=cfg.seed,
        export=build(cfg.export, "export"),
        output_dir=Path(cfg.paths.output_dir),
        cache_dir=Path(cfg.paths.cache_dir) if cfg.paths.get("cache_dir") else default_cache_dir(),
        cfg=cfg,
        tags=[str(t) for t in cfg.get("tags") or []],
        command=command_line(overrides),
        device=resolve_device(requested_device, cfg.trainer),
        cpu_linear=cfg.get("cpu_linear", "auto"),
    )
    p.model_config = p.model.model_config()
    if p.device.type == "cuda":
        p.device = fit_device(p.device, requested_device, weight_bytes(p))
    use_family_targets(p)
    return p


def weight_bytes(p: Plan) -> int:
    """Bytes of the model's weights in its dtype, from its config alone (a meta-device skeleton)."""
    itemsize = torch_dtype(getattr(p.model, "dtype", "float32")).itemsize
    return sum(t.numel() for t in meta_skeleton(p.model_config).parameters()) * itemsize


def use_family_targets(p: Plan) -> None:
    """The model's family must be described in sppx.anatomy (else one ConfigError line); the Llama
    default target list (PROJECTIONS) of the pruner and of the adapter becomes that family's own."""
    family = family_of(p.model_config)
    for part in (p.pruner, p.adapter):
        part.targets = family.resolve_targets(part.targets)


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
        check_nesting(p)


def check_nesting(p: Plan) -> None:
    """Numerous teachers nest their masks by the pruner's score, up to the pruner's target."""
    name = p.teacher.name
    require(
        p.prunes,
        "teacher",
        name,
        "ramps the sparsity up to the pruner's masks; choose pruner=magnitude or wanda",
    )
    require(
        type(p.pruner).score is not Pruner.score,
        "teacher",
        name,
        f"nests masks by the pruner's score; pruner={p.pruner.name} has none (use magnitude or wanda)",
    )
    p.teacher.check_target(p.target_sparsity)


def linear_shapes(model_config, targets: list[str]) -> dict[str, tuple[int, int]]:
    """``{name: (out, in)}`` of the targeted Linears, from a weightless (meta-device) model."""
    linears = prunable_linears(meta_skeleton(model_config), targets)
    return {name: tuple(lin.weight.shape) for name, lin in linears.items()}


def meta_skeleton(model_config):
    """The model ``model_config`` describes, on the meta device: its shapes without any weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def check_context(key: str, value: int, p: Plan) -> None:
    """``value`` tokens fit in the model's context."""
    context = getattr(p.model_config, "max_position_embeddings", None)
    if context is not None:
        require(value <= context, key, value, f"must be <= the model's context length {context}")

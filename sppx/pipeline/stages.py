"""The stages of a run. Each has a ``name``, ``enabled(plan)`` (whether the config asks for it),
``check(plan)`` (its settings, at plan time, without weights) and ``run(state)`` (the work, on the
run state; it writes its own sections of results.json into ``state.sections``). ``flow.STAGES`` puts
them in order."""

from __future__ import annotations

import inspect
import logging

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_object
from omegaconf import OmegaConf

from sppx.adapters.lora import LoRAAdapter
from sppx.anatomy import Dims, family_of, prunable_linears
from sppx.card import model_card
from sppx.cpu_linear import chosen_kernel, linear_kernel
from sppx.data import TokenizedCorpus, calibration_windows, consecutive_windows, windows_digest
from sppx.errors import ConfigError, RunError, first_line, is_int, require
from sppx.evaluate import perplexity
from sppx.export import (
    compression_of,
    export_sizes,
    parameter_counts,
    save_model,
    sparsity_report,
    verify_model_zeros,
    verify_saved_zeros,
)
from sppx.masking import DenseKeeper, StudentMasks
from sppx.pipeline.planning import Plan, build, check_context, linear_shapes
from sppx.pipeline.state import RunState, StructuredOutcome
from sppx.pipeline.tuning import tune
from sppx.profiling import PeakMemory, Stopwatch, release_freed_memory
from sppx.pruning import prune_model
from sppx.pruning.owl import layer_sparsities
from sppx.pruning.structured import StructuredContext, shrink_model
from sppx.speed import PROMPT_TOKENS, compare_speeds
from sppx.teachers import NoTeacher
from sppx.tracking import current_sweep, keep_csv_history, stage_of
from sppx.zeroshot import evaluate_tasks

log = logging.getLogger("sppx.pipeline")


class Stage:
    """Defaults: always enabled, nothing to check, run by the first process only."""

    name = "stage"
    all_processes = False  # the extra processes of data-parallel tuning run it too

    def enabled(self, p: Plan) -> bool:
        return True

    def check(self, p: Plan) -> None:
        pass

    def run(self, state: RunState) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- load
class Load(Stage):
    """Start the logger, read the model (onto ``device``), tokenizer and corpus, cut the evaluation
    windows."""

    name = "load"
    all_processes = True

    def check(self, p: Plan) -> None:
        p.corpus.check()
        check_context("data.seqlen", p.corpus.seqlen, p)
        check_context("eval.seqlen", p.eval.seqlen, p)

    def run(self, state: RunState) -> None:
        p = state.plan
        p.output_dir.mkdir(parents=True, exist_ok=True)
        pl.seed_everything(p.seed, verbose=False)
        state.logger = build(p.cfg.logger, "logger", **logger_context(p))
        if p.resume_from is not None:
            keep_csv_history(state.logger, p.resume_step)
        state.logger.log_hyperparams(OmegaConf.to_container(p.cfg, resolve=True))
        with state.watch("load"):
            try:
                state.model, state.tokenizer = p.model.load()
            except Exception as err:  # damaged weights (truncated, bad header), a broken tokenizer file...
                raise RunError(
                    f"the model {p.model.name} could not be loaded: {first_line(err, None)}"
                ) from None
            state.model.to(p.device)
            state.tokens = TokenizedCorpus.build(p.corpus, state.tokenizer, p.cache_dir)
        sizes = state.tokens.sizes()
        log.info("Loaded %s; corpus %s tokens per part: %s", p.model.name, p.corpus.name, sizes)
        state.eval_windows = consecutive_windows(
            state.tokens.streams["evaluation"], p.eval.seqlen, p.eval.max_windows
        )
        require(
            state.eval_windows.shape[0] > 0,
            "eval.seqlen",
            p.eval.seqlen,
            f"must be shorter than the evaluation text ({sizes['evaluation']} tokens)",
        )
        state.sections["tokens"] = sizes


def logger_context(p: Plan) -> dict:
    """What the run tells a logger that asks for it (W&B: its job_type, group and tags)."""
    accepted = inspect.signature(get_object(p.cfg.logger._target_)).parameters
    context = {
        "stage": stage_of(p.prunes, p.tunes),
        "sweep": current_sweep(),
        "resuming": p.resume_from is not None and p.resume_from.parent.parent == p.output_dir,
        "run_tags": list(p.tags),
    }
    return {k: v for k, v in context.items() if k in accepted}


# --------------------------------------------------------------------------- measure
class Measure(Stage):
    """Perplexity on the evaluation windows (and zero-shot tasks where asked) of the ``dense``,
    ``pruned`` or ``final`` model; the final model is also measured on the validation windows."""

    def __init__(self, stage: str):
        self.stage = stage
        self.name = f"measure {stage}"

    def run(self, state: RunState) -> None:
        p, ppl = state.plan, state.ppl
        if self.stage == "dense":
            ppl["dense"] = measure(state, "dense") if p.eval.dense else None
        elif self.stage == "pruned":
            reuse = not state.pruned_changed and ppl["dense"] is not None
            ppl["pruned"] = (ppl["dense"] if reuse else measure(state, "pruned")) if p.eval.pruned else None
        else:
            ppl["final"] = measure(state, "final") if p.tunes or ppl["pruned"] is None else ppl["pruned"]
            ppl["validation"] = measure_validation(state)
        if p.eval.tasks_at(self.stage):
            log.info("Zero-shot tasks on the %s model: %s", self.stage, ", ".join(p.tasks.tasks))
            with state.watch("zero-shot"):
                state.zero_shot[self.stage] = evaluate_tasks(
                    state.model, state.tokenizer, p.tasks, p.eval.task_batch_size, p.eval.task_limit
                )


def measure(state: RunState, desc: str) -> dict:
    p, windows = state.plan, state.eval_windows
    with state.watch("eval"):
        result = perplexity(
            state.model, windows, p.eval.batch_size, desc=f"ppl ({desc})", progress=state.progress
        )
    log.info("ppl (%s): %.3f on %d windows of %d tokens", desc, result["ppl"], *windows.shape)
    return result


def measure_validation(state: RunState) -> dict | None:
    """The validation part (never the evaluation part): what searches over settings minimise."""
    p = state.plan
    windows = consecutive_windows(state.tokens.streams["validation"], p.corpus.seqlen, p.corpus.val_windows)
    with state.watch("eval"):
        result = (
            perplexity(
                state.model, windows, p.eval.batch_size, desc="ppl (validation)", progress=state.progress
            )
            if windows.shape[0]
            else None
        )
    if result is not None:
        log.info("ppl (validation): %.3f on %d windows", result["ppl"], windows.shape[0])
    return result


# --------------------------------------------------------------------------- prune
class Prune(Stage):
    """One-shot (masks, block by block) or structured (units removed), chosen once here; with a
    distilling teacher the dense weights stay and the masks apply in the student's forward."""

    name = "prune"
    all_processes = True

    def enabled(self, p: Plan) -> bool:
        return p.prunes or p.keeps_dense

    def check(self, p: Plan) -> None:
        if not p.prunes:
            return
        warn_ignored_sparsity(p)
        if p.structured:
            p.pruner.check_pattern(p.pattern, p.sparsity)
            dims = Dims.of(p.model_config)
            varying = getattr(p.pruner, "varying_widths", None)
            family_of(p.model_config).check_structured(
                p.pruner.units, getattr(p.pruner, "adds_biases", False), varying(dims) if varying else None
            )
            p.pruner.check(dims, p.sparsity)
            if p.pruner.uses_teacher:
                p.corpus.check_tuning()
        else:
            shapes = linear_shapes(p.model_config, p.pruner.targets)
            require(len(shapes) > 0, "pruner.targets", p.pruner.targets, "match no Linear of the model")
            for name, (_, in_features) in shapes.items():
                p.pattern.check_width(in_features, name)
            p.pruner.check_pattern(p.pattern, p.target_sparsity)
        if p.pruner.needs_calibration:
            p.corpus.check_calibration(p.cache_dir)

    def run(self, state: RunState) -> None:
        p = state.plan
        info: dict = {"allocation": p.pruner.allocation, "layer_targets": None, "phases_s": {}}
        keeper = DenseKeeper(p.pruner, p.mask_steps) if p.keeps_dense else None
        if p.prunes:
            calib = calibration(state)
            phases = Stopwatch()
            method = prune_structured if p.structured else prune_one_shot
            with state.watch("prune"), PeakMemory() as peak, linear_kernel(p.cpu_linear):
                method(state, calib, phases, keeper, info)
                info["cpu_linear"] = chosen_kernel() if calibrates_on_cpu(p) else None
            info.update(
                structure=state.structure.info if state.structure else None,
                phases_s={k: round(v, 3) for k, v in phases.times.items()},
                peak_rss_mib=round(peak.rss_peak / 2**20, 1),
                peak_rss_increase_mib=round(peak.rss_increase / 2**20, 1),
            )
            if peak.cuda_peak:
                info["peak_cuda_mib"] = round(peak.cuda_peak / 2**20, 1)
        if keeper is not None:
            state.student_masks = StudentMasks.attach(
                state.model, state.masks, keeper.levels or None, p.mask_steps
            )
            state.masks = (
                state.student_masks.keeps()
            )  # the target masks (shared with the modules, not copied)
        release_freed_memory()
        state.sections["prune"] = info


def calibrates_on_cpu(p: Plan) -> bool:
    """Whether pruning's forwards run on the CPU (the model is there and the pruner moves no block)."""
    block_device = getattr(p.pruner, "device", None)
    return torch.device(block_device or p.device).type == "cpu"


def warn_ignored_sparsity(p: Plan) -> None:
    if p.pattern.is_nm and abs(p.sparsity - p.pattern.target(p.sparsity)) > 1e-9:
        log.warning(
            "pattern %s prunes %.3f of the weights; sparsity=%s is ignored",
            p.pattern.label,
            p.pattern.target(p.sparsity),
            p.sparsity,
        )


def calibration(state: RunState) -> torch.Tensor | None:
    """The calibration windows (and results.json's record of them), when the pruner needs them."""
    p = state.plan
    if not p.pruner.needs_calibration:
        return None
    stream = p.corpus.calibration_stream(state.tokens, state.tokenizer, p.cache_dir)
    calib = calibration_windows(stream, p.corpus.nsamples, p.corpus.seqlen, p.seed)
    state.sections["calibration"] = {
        "source": p.corpus.calibration,
        "windows": int(calib.shape[0]),
        "seqlen": int(calib.shape[1]),
        "seed": p.seed,
        "sampler": "uniform random start offsets in the source's token stream",
        "source_tokens": int(stream.numel()),
        "digest": windows_digest(calib),
    }
    return calib


def prune_one_shot(state: RunState, calib, phases: Stopwatch, keeper, info: dict) -> None:
    """Masks block by block (OWL's per-block sparsities first, when allocated by outliers)."""
    p = state.plan
    with phases("OWL outliers"):
        layer_targets = layer_sparsities(state.model, p.pruner, p.target_sparsity, calib, state.progress)
    state.masks = prune_model(
        state.model,
        p.pruner,
        layer_targets,
        p.pattern,
        calib,
        progress=state.progress,
        watch=phases,
        keeper=keeper,
    )
    check_empty_matrices(state.masks, p.pruner)
    if p.pruner.allocation == "uniform":
        phases.times.pop("OWL outliers")
    info["layer_targets"] = layer_targets


def prune_structured(state: RunState, calib, phases: Stopwatch, keeper, info: dict) -> None:
    """Choose the units (the pruner may rewrite kept weights), then remove them physically. Recovery
    then tunes on text alone: a pruner that learns its masks used the teacher itself."""
    p, model = state.plan, state.model
    budget = p.pruner.budget(Dims.of(model.config), p.sparsity)
    ctx = StructuredContext(
        calibration=calib,
        progress=state.progress,
        watch=phases,
        teacher=p.teacher,
        logger=state.logger,
        seed=p.seed,
        output_dir=p.output_dir,
        lora_factory=LoRAAdapter,
    )
    if p.pruner.uses_teacher:  # it trains its masks on the tuning text
        ctx.train = consecutive_windows(state.tokens.streams["tuning"], p.corpus.seqlen)
        require(
            ctx.train.shape[0] > 0, "data.seqlen", p.corpus.seqlen, "must be shorter than the tuning text"
        )
    dense_shapes = {
        n: tuple(lin.weight.shape) for n, lin in prunable_linears(model, p.pruner.targets).items()
    }
    structure = p.pruner.select(model, budget, ctx)
    with phases("remove units"):
        shrink_model(model, structure)
    method = getattr(p.pruner, "report", None) or {}
    outcome = {
        **structure.summary(),
        "budget": {"layers": budget.layers, "heads": budget.heads, "neurons": budget.neurons},
        "head_mode": budget.head_mode,
        "method": {k: v for k, v in method.items() if k != "teacher"},
    }
    state.structure = StructuredOutcome(outcome, method.get("teacher"), dense_shapes, structure.layers_kept)
    state.recovery_teacher = NoTeacher()


def check_empty_matrices(masks: dict[str, torch.Tensor], pruner) -> None:
    """A matrix pruned to nothing cannot be recovered by a sparsity-preserving adapter and usually means
    the settings went too far: stop, unless ``pruner.allow_empty``."""
    empty = [name for name, keep in masks.items() if not bool(keep.any())]
    if empty and not pruner.allow_empty:
        raise RunError(
            f"pruner={pruner.name} pruned {len(empty)} whole matrices to zero (e.g. {empty[0]}); lower the "
            "sparsity, or set pruner.allow_empty=true to keep such a model"
        )


# --------------------------------------------------------------------------- tune and merge
class Tune(Stage):
    """Train the adapter's parameters only (Lightning), then save them."""

    name = "tune"
    all_processes = True

    def enabled(self, p: Plan) -> bool:
        return p.tunes

    def check(self, p: Plan) -> None:
        p.corpus.check_tuning()
        require(
            p.tune.lr is not None,
            "tune.lr",
            None,
            f"must be set: adapter={p.adapter.name} has no lr of its own (adapter.lr)",
        )
        if p.structured:  # the adapter tunes the smaller model: check it against the pruned shapes
            budget = p.pruner.budget(Dims.of(p.model_config), p.sparsity)
            shapes = budget.linear_shapes(Dims.of(p.model_config), family_of(p.model_config))
            p.adapter.check_shapes(
                {n: s for n, s in shapes.items() if n.rsplit(".", 1)[-1] in p.adapter.targets}
            )
        else:
            p.adapter.check_shapes(linear_shapes(p.model_config, p.adapter.targets))
        check_devices(p)

    def run(self, state: RunState) -> None:
        p, model = state.plan, state.model
        if p.merge_fills_zeros:
            state.sections["before_merge"] = sparsity_report(model, p.pruner.targets)["measured"]
        p.adapter.apply(model)
        state.sections["trainable"] = parameter_counts(model)["trainable"]
        state.recovery_teacher.bind(model, state.student_masks, p.adapter, p.target_sparsity)
        with state.watch("tune"), PeakMemory() as peak:
            info = tune(
                p, model, state.tokenizer, state.tokens, state.logger, state.recovery_teacher, state.guard
            )
        model.to(p.device)  # Lightning's teardown leaves the module on the CPU
        if not state.leader:
            return
        info.update(
            peak_rss_mib=round(peak.rss_peak / 2**20, 1),
            peak_rss_increase_mib=round(peak.rss_increase / 2**20, 1),
        )
        if peak.cuda_peak:
            info["peak_cuda_mib"] = round(peak.cuda_peak / 2**20, 1)
        state.sections["tune"] = info
        p.adapter.save(model, p.output_dir / "adapter")


def check_devices(p: Plan) -> None:
    """With several processes (DDP), every process takes an equal slice of each global batch."""
    devices = p.cfg.trainer.get("devices", 1)
    if not (is_int(devices) and devices > 1):
        return
    require(
        p.corpus.batch_size % devices == 0,
        "data.batch_size",
        p.corpus.batch_size,
        f"is the global batch: it must divide among trainer.devices={devices} processes",
    )
    require(
        not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN),
        "trainer.devices",
        devices,
        "several processes per job do not work inside a Hydra multirun (Lightning's DDP launcher starts "
        "each process as a single run); run the jobs one at a time, or one job per node on a cluster",
    )


class Merge(Stage):
    """Fold the adapter (and the student's forward masks) into plain weights; check every pruned zero."""

    name = "merge"

    def run(self, state: RunState) -> None:
        p, model = state.plan, state.model
        with state.watch("merge"):
            if p.tunes:
                p.adapter.merge(model)
            if state.student_masks is not None:
                state.student_masks.bake()
            state.sections["zeros_verified"] = (
                0 if p.merge_fills_zeros else verify_model_zeros(model, state.masks)
            )
        model.requires_grad_(False)


# --------------------------------------------------------------------------- speed
class Speed(Stage):
    """Prefill and decode tokens/s of the final model and of a fresh copy of the dense one, timed side
    by side; on a GPU a 2:4 model is also timed through semi-structured sparse kernels."""

    name = "speed"

    def enabled(self, p: Plan) -> bool:
        return p.eval.speed

    def check(self, p: Plan) -> None:
        context = getattr(p.model_config, "max_position_embeddings", None)
        total = p.eval.speed_prefill_tokens + p.eval.speed_decode_tokens
        require(
            context is None or total <= context,
            "eval.speed_prefill_tokens",
            p.eval.speed_prefill_tokens,
            f"plus eval.speed_decode_tokens={p.eval.speed_decode_tokens} must be <= the model's context "
            f"length {context}",
        )

    def run(self, state: RunState) -> None:
        p, model = state.plan, state.model
        with state.watch("speed"):
            device = next(model.parameters()).device
            dense, _ = p.model.load()
            models = {"dense": dense.to(device), "final": model}
            semi = semi_structured_copy(p, model) if device.type == "cuda" else None
            if semi is not None:
                models["final_2:4_kernels"] = semi
            speeds = compare_speeds(
                models,
                prefill_tokens=p.eval.speed_prefill_tokens,
                decode_tokens=p.eval.speed_decode_tokens,
                repeats=p.eval.speed_repeats,
                seed=p.seed,
                on_round=(lambda i, n: log.info("speed round %d/%d", i, n)) if state.progress else None,
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
        state.sections["speed"] = out


def semi_structured_copy(p: Plan, model):
    """A half-precision copy of a 2:4 model whose 2:4 Linears use semi-structured sparse kernels."""
    if not (p.pattern.is_nm and (p.pattern.n, p.pattern.m) == (2, 4)):
        return None
    from sppx.pruning.semi_structured import semi_structured_model

    try:
        twin = semi_structured_model(model, p.pruner.targets)
        with torch.inference_mode():  # a kernel that refuses this GPU fails at its first product
            twin(input_ids=torch.zeros((1, 8), dtype=torch.long, device=twin.device), use_cache=False)
        return twin
    except (RuntimeError, ValueError) as err:  # no kernel for this GPU or shape: report, keep going
        log.warning("2:4 sparse kernels not timed: %s", first_line(err, None))
        return None


# --------------------------------------------------------------------------- export
class Export(Stage):
    """The merged model as safetensors (dense, or compressed: kept values + bitmask) in ``export.dtype``
    with its model card; the zeros are checked again on the files before the folder gets its final name."""

    name = "export"

    def enabled(self, p: Plan) -> bool:
        return p.export.enabled

    def check(self, p: Plan) -> None:
        if p.structured:
            check_kept_heads(p)
        if p.export.format == "compressed" and (not p.prunes or p.structured or p.merge_fills_zeros):
            why = (
                "this run prunes nothing"
                if not p.prunes
                else "structured pruning removes the pruned units instead of zeroing them"
                if p.structured
                else f"adapter={p.adapter.name}'s merge fills the pruned weights in"
            )
            raise ConfigError(
                "export.format",
                "compressed",
                f"stores only the kept weights of a sparse model, and {why}; use export.format=safetensors",
            )

    def run(self, state: RunState) -> None:
        p, results = state.plan, state.results

        def verify(directory) -> None:
            if not p.merge_fills_zeros:
                results["sparsity"]["zeros_verified_on_disk"] = verify_saved_zeros(directory, state.masks)

        compression = None
        if p.export.format == "compressed":
            compression = compression_of(state.masks, p.pattern, results["sparsity"]["measured"])
        results["export"] = {"format": p.export.format, "dtype": p.export.dtype}  # the card says how to load
        with state.watch("export"):
            model_dir = save_model(
                state.model,
                state.tokenizer,
                p.output_dir / "model",
                model_card(results),
                verify,
                dtype=p.export.dtype,
                compression=compression,
            )
        results["model_dir"] = str(model_dir)
        results["export"].update(export_sizes(model_dir, results["params"]["total"]))
        log.info(
            "export: %s (%s, %s, %.1f MB)",
            model_dir,
            p.export.format,
            p.export.dtype,
            results["export"]["bytes"] / 1e6,
        )


def check_kept_heads(p: Plan) -> None:
    """Some config classes need hidden_size to be a multiple of the head count (Llama and Gemma in
    transformers 5, even with head_dim set): a structured model keeping another number of heads could
    not be saved. Refuse it in the plan, not after the pruning."""
    dims = Dims.of(p.model_config)
    budget = p.pruner.budget(dims, p.sparsity)
    if "heads" not in p.pruner.units or budget.heads == 0:
        return
    kept = dims.heads - budget.heads
    values = {**p.model_config.to_dict(), "num_attention_heads": kept, "head_dim": dims.head_dim}
    if budget.head_mode == "group" and family_of(p.model_config).kv_heads_key:
        values[family_of(p.model_config).kv_heads_key] = dims.kv_heads - budget.heads // dims.group_size
    try:
        type(p.model_config)(**values)
    except Exception as err:
        reason = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        raise ConfigError(
            "sparsity",
            p.sparsity,
            f"keeps {kept} of {dims.heads} query heads per layer, which {type(p.model_config).__name__} "
            f"cannot describe ({reason}); choose a sparsity that keeps a divisor of hidden_size "
            f"{dims.hidden} heads, set pruner.units without heads, or export=false",
        ) from None

"""One row of scripts/bench_peer.py, pruned in a fresh process: the harness both tools share, and the
llm-compressor side (``oneshot``).

This file runs in both virtualenvs, so it imports neither sppx nor (at module level) llmcompressor:
only torch, transformers and safetensors, which both have. The harness loads the model from its
folder (fp32, eager attention, every tensor copied out of the memory-mapped file), sets the thread
count, reads the calibration token ids, lets the tool prepare its call (imports, recipe, data loader:
not timed), measures the resident set size, times the prune call alone with ``time.perf_counter``
while a thread samples the resident set size every 5 ms, then saves the decoder blocks' pruned Linear
weights (``<out>.safetensors``) and a small JSON record (``<out>.json``; ``error`` when the call failed).
A forward pre-hook on the input embedding records the token ids the tool feeds the model, so the
record says whether it calibrated on exactly our windows, in our order.

    .venv-peer/bin/python scripts/peer_worker.py --model-dir DIR --tokens calib.safetensors \\
        --method wanda --pattern 2:4 --out outputs/bench/peer/work/peer-wanda-2of4
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import threading
import time
import traceback
from contextlib import suppress
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

# The Linears of a Llama decoder block: sppx's default targets, and every Linear the peer finds in a block.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCKSIZE = 128  # SparseGPT columns per lazy-update block (sppx blocksize, the peer's block_size)
PERCDAMP = 0.01  # SparseGPT damping, a fraction of mean(diag H) (sppx percdamp, the peer's dampening_frac)
OWL_M = 5  # OWL outlier threshold: scores above M x the block's mean (sppx owl_m, the peer's owl_m: an int)
OWL_LAMBDA = 0.08  # OWL: block sparsities span target +- lambda (sppx owl_lambda, the peer's owl_lmbda)
PACKAGES = {"sppx": "sppx", "llm-compressor": "llmcompressor"}
MiB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def parse_pattern(text: str) -> tuple[int, int, float]:
    """``2:4`` -> (2, 4, 0.5); ``70%`` or ``0.7`` -> (0, 0, 0.7): N, M (0 for unstructured), sparsity."""
    if ":" in text:
        n, m = (int(v) for v in text.split(":"))
        if not 0 < n < m:
            raise ValueError(f"{text}: N:M needs 0 < N < M")
        return n, m, n / m
    value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0 < value < 1:
        raise ValueError(f"{text}: a sparsity must lie in (0, 1)")
    return 0, 0, value


def worker_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="one row of bench_peer.py (see its docstring)")
    parser.add_argument("--model-dir", required=True, help="folder with config.json, safetensors, tokenizer")
    parser.add_argument("--tokens", required=True, help="safetensors file with the input_ids windows")
    parser.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    parser.add_argument("--pattern", required=True, help="2:4, 50%% or 0.5")
    parser.add_argument("--owl", action="store_true", help="OWL layer-wise sparsities")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    parser.add_argument("--out", required=True, help="output prefix: <out>.json and <out>.safetensors")
    parser.add_argument("--attention", choices=["eager", "sdpa"], default="eager", help="attn_implementation")
    parser.add_argument(
        "--load-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the dtype the model loads in",
    )
    parser.add_argument(
        "--cpu-linear",
        choices=["auto", "onednn", "torch"],
        default="auto",
        help="sppx's cpu_linear: the kernel of its fp32 calibration products (the peer ignores it)",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=["bfloat16"],
        default=None,
        help="sppx's pruner.compute_dtype (fp32 weights)",
    )
    args = parser.parse_args(argv)
    args.n, args.m, args.sparsity = parse_pattern(args.pattern)
    return args


def load_model(folder: str, attention: str = "eager", dtype: str = "float32"):
    """``dtype`` (fp32 by default), ``attention`` (the peer forces eager while calibrating; sppx runs with
    the model's default, sdpa), no KV cache, eval mode, and every tensor copied into the process's own
    memory: a write to a page still mapped from the safetensors file costs a page fault, which would be
    timed as pruning."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype), attn_implementation=attention
    )
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    model.config.use_cache = False
    return model.eval()


def blocks(model) -> torch.nn.ModuleList:
    return model.model.layers  # the Llama layout (SmolLM2)


def decoder_projections(model) -> dict[str, torch.nn.Linear]:
    """Every Linear of the decoder blocks by full module name; each must be one of PROJECTIONS, so that
    "all Linears of a block" (the peer's rule) and sppx's targets name the same matrices."""
    found = {}
    for i, block in enumerate(blocks(model)):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                if name.rsplit(".", 1)[-1] not in PROJECTIONS:
                    raise ValueError(f"block {i} has a Linear {name} outside {PROJECTIONS}")
                found[f"model.layers.{i}.{name}"] = module
    if len(found) != len(PROJECTIONS) * len(blocks(model)):
        raise ValueError(f"{len(found)} Linears in the blocks, expected {len(PROJECTIONS)} per block")
    return found


def untargeted_zeros(model, linears: dict[str, torch.nn.Linear]) -> int:
    """Zeros in every parameter outside the pruned Linears (embeddings, tied lm_head, norms)."""
    pruned = {id(lin.weight) for lin in linears.values()}
    return sum(int((p == 0).sum()) for p in model.parameters() if id(p) not in pruned)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def trim_memory() -> None:
    """Free what can be freed and hand it back (glibc malloc_trim), so the baseline is what is alive."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """``with PeakRss() as peak:`` samples the resident set size every ``interval_s`` seconds in a thread;
    ``peak.start`` and ``peak.peak`` in bytes."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class TokenWitness:
    """Records the token ids every call of the input embedding receives (a forward pre-hook)."""

    def __init__(self, model):
        self.batches: list[torch.Tensor] = []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, _module, args) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.batches.append(args[0].detach().reshape(-1, args[0].shape[-1]).cpu())

    def verdict(self, ids: torch.Tensor) -> str:
        """``same xK``: K passes, each exactly ``ids`` in order; otherwise what was seen."""
        self.handle.remove()
        if not self.batches:
            return "not observed"
        seen = torch.cat(self.batches)
        if seen.shape[1] != ids.shape[1] or seen.shape[0] % ids.shape[0]:
            return f"differs: {seen.shape[0]} windows of {seen.shape[1]} tokens"
        passes = seen.view(-1, *ids.shape)
        if all(torch.equal(p, ids) for p in passes):
            return f"same x{passes.shape[0]}"
        return f"differs: {passes.shape[0]} passes, not all equal to the windows in order"


def versions(tool: str) -> dict:
    found = {"torch": torch.__version__}
    for name in ("transformers", PACKAGES[tool]):
        with suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def read_tokens(path: str) -> torch.Tensor:
    ids = load_file(path)["input_ids"]
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"{path}: input_ids must be a 2-D int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
    return ids


def prune_and_measure(prepare, args, record: dict) -> None:
    """Load, prepare (untimed), prune (timed, peak RSS sampled), check, save the weights."""
    model = load_model(args.model_dir, args.attention, args.load_dtype)
    ids = read_tokens(args.tokens)
    linears = decoder_projections(model)
    zeros_before = untargeted_zeros(model, linears)
    call = prepare(model, ids, args)
    witness = TokenWitness(model)
    trim_memory()
    with PeakRss() as peak:
        start = time.perf_counter()
        info = call()
        seconds = time.perf_counter() - start
    record.update(
        prune_s=seconds,
        rss_before_mib=peak.start / MiB,
        peak_increase_mib=(peak.peak - peak.start) / MiB,
        calibration_seen=witness.verdict(ids),
        untargeted_new_zeros=untargeted_zeros(model, linears) - zeros_before,
        attn_implementation=model.config._attn_implementation,
        load_dtype=args.load_dtype,
        compute_dtype=args.compute_dtype,
        **info,
    )
    weights = {f"{name}.weight": lin.weight.detach().contiguous() for name, lin in linears.items()}
    save_file(weights, f"{args.out}.safetensors")


def run_worker(prepare, tool: str, argv: list[str] | None = None) -> int:
    """The shared harness. ``prepare(model, ids, args)`` returns the prune call (a function returning a
    dict, e.g. ``layer_sparsities``); only that call is timed. Returns the exit status."""
    args = worker_args(argv)
    torch.set_num_threads(args.threads)
    record = {
        "tool": tool,
        "method": args.method + ("+owl" if args.owl else ""),
        "pattern": args.pattern,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "versions": versions(tool),
    }
    status = 0
    try:
        prune_and_measure(prepare, args, record)
    except Exception as err:  # any failure of the tool is this row's result, reported by the main script
        traceback.print_exc()
        record["error"] = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        )
        status = 1
    Path(f"{args.out}.json").write_text(json.dumps(record, indent=1))
    return status


# --------------------------------------------------------------------------- the peer: llm-compressor
def peer_prepare(model, ids: torch.Tensor, args):
    """llm-compressor's Wanda / SparseGPT modifier and ``oneshot`` with the sequential pipeline."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    # Targets are the decoder blocks: the modifier then prunes every Linear inside each (the seven
    # projections, checked by decoder_projections); lm_head and the embeddings are in no block. OWL needs
    # it too: its per-block sparsities are matched to the targets one to one.
    block = type(blocks(model)[0]).__name__
    options = dict(sparsity=args.sparsity, mask_structure=f"{args.n}:{args.m}", targets=[block], ignore=[])
    if args.owl:
        options.update(sparsity_profile="owl", owl_m=OWL_M, owl_lmbda=OWL_LAMBDA)
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(**options, block_size=BLOCKSIZE, dampening_frac=PERCDAMP)
    else:
        modifier = WandaPruningModifier(**options)
    # A DataLoader is used as it is (no sampler, no collator of oneshot's): our windows, in our order,
    # batched like sppx's. From a datasets.Dataset, oneshot would draw num_calibration_samples (default
    # 512) with a RandomSampler (shuffle_calibration_samples defaults to True), or order them by length
    # with an argsort that is not stable for equal lengths, and collate by truncation.
    loader = DataLoader([{"input_ids": row} for row in ids], batch_size=args.batch_size, shuffle=False)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)  # given, so oneshot does not load one

    def prune() -> dict:
        oneshot(
            model=model,
            dataset=loader,
            processor=tokenizer,
            recipe=modifier,
            pipeline="sequential",
            sequential_targets=[block],
            # Ignored for a DataLoader; set anyway, so a version that stops bypassing them still matches.
            num_calibration_samples=ids.shape[0],
            shuffle_calibration_samples=False,
            max_seq_length=ids.shape[1],
        )
        layers = modifier.sparsity
        if isinstance(layers, dict):
            layers = list(layers.values())
        elif not isinstance(layers, list):
            layers = [args.sparsity] * len(blocks(model))  # one value for all (N:M: N/M)
        return {"layer_sparsities": [float(v) for v in layers]}

    return prune


if __name__ == "__main__":
    raise SystemExit(run_worker(peer_prepare, "llm-compressor"))

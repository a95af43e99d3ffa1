"""Step time of recovery tuning, side by side in one process: a plain forward of the pruned model, and
full training steps (forward + backward + AdamW) of every adapter with its default recipe
(conf/adapter/*.yaml), then SPP's dropout branch, its fused (dropout 0) and grouped (memory-lean)
forms, gradient checkpointing, and masked LoRA with and without dropout, on the same modules. The rows
are timed in interleaved rounds (row 1, row 2, ..., then again), so drift hits every row alike; medians.
Prints seconds per step, ratios to the forward and the SPP / LoRA ratio with the defaults. (Peak memory
is not measured here: in one process the allocator's reuse makes each row's RSS depend on the others.)

    python scripts/bench_spp.py                    # SmolLM2-135M, batch 4 x 256
    python scripts/bench_spp.py --model tiny-llama --steps 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sppx.adapters import LoRAAdapter, MaskedLoRAAdapter, SPPAdapter
from sppx.evaluate import next_token_nll
from sppx.models import EmbeddedModel, TinyLlama
from sppx.module import TuneConfig, TuneModule
from sppx.pruning import MagnitudePruner, SparsityPattern, prune_model

ROOT = Path(__file__).resolve().parents[1]


def interleaved(fns: list, rounds: int) -> list[float]:
    """Median seconds of each function over ``rounds`` rounds that call every function once, in order,
    after one warm-up call each."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def default_adapter(name: str):
    """The adapter exactly as ``adapter=<name>`` builds it (its conf/adapter file, composed by Hydra:
    the file's defaults list supplies shared keys such as ``targets``)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"adapter={name}"])
    return instantiate(cfg.adapter, _convert_="all")


def train_step_fn(base, ids, adapter, checkpointing: bool = False):
    model = copy.deepcopy(base)
    adapter.apply(model)
    TuneModule(model, TuneConfig(gradient_checkpointing=checkpointing))  # sets up checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        logits = model(input_ids=ids, use_cache=False).logits
        nll, count = next_token_nll(logits, ids)
        (nll / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2-135m", "tiny-llama"], default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (after one warm-up round)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = (EmbeddedModel() if args.model == "smollm2-135m" else TinyLlama()).load()
    prune_model(model, MagnitudePruner(), 0.5, SparsityPattern(), progress=False)
    ids = torch.randint(0, len(tokenizer), (args.batch, args.seqlen))

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    spp, lora, masked = (default_adapter(n) for n in ("spp", "lora", "masked_lora"))
    configs = [
        (f"SPP, defaults (dropout {spp.dropout:g})", spp, False),
        (f"LoRA (peft) r={lora.r}, defaults (dropout {lora.dropout:g})", lora, False),
        (f"masked LoRA r={masked.r}, defaults (dropout {masked.dropout:g})", masked, False),
        ("SPP, dropout 0.05 (two branches)", SPPAdapter(dropout=0.05), False),
        ("SPP, dropout 0 (fused matmul)", SPPAdapter(dropout=0.0), False),
        ("SPP, dropout 0.05, grouped forward", SPPAdapter(dropout=0.05, grouped=True), False),
        ("SPP, dropout 0.05 + grad checkpointing", SPPAdapter(dropout=0.05), True),
        ("masked LoRA r=8, dropout 0.05 (two branches)", MaskedLoRAAdapter(dropout=0.05), False),
        ("masked LoRA r=8, dropout 0 (fused matmul)", MaskedLoRAAdapter(dropout=0.0), False),
        ("LoRA (peft) r=8, dropout 0", LoRAAdapter(dropout=0.0), False),
    ]
    fns = [forward] + [train_step_fn(model, ids, adapter, ckpt) for _, adapter, ckpt in configs]
    seconds = interleaved(fns, args.steps)
    rows = [("forward (pruned model, no grad)", seconds[0])]
    rows += [(f"train step: {label}", s) for (label, _, _), s in zip(configs, seconds[1:], strict=True)]

    base = rows[0][1]
    tokens = args.batch * args.seqlen
    print(
        f"{args.model}, batch {args.batch} x {args.seqlen} tokens, {torch.get_num_threads()} threads, "
        f"median of {args.steps} steps"
    )
    print(f"{'':62s} {'s/step':>8s} {'tok/s':>8s} {'x forward':>10s}")
    for label, step in rows:
        print(f"{label:62s} {step:8.2f} {tokens / step:8.0f} {step / base:10.2f}")
    print(f"SPP / LoRA step time with the defaults: {seconds[1] / seconds[2]:.2f}")
    print(f"masked LoRA / LoRA step time with the defaults: {seconds[3] / seconds[2]:.2f}")


if __name__ == "__main__":
    main()

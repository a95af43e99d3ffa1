"""Step time of recovery tuning, side by side in one process: a plain forward of the pruned model, and
full training steps (forward + backward + AdamW) with SPP's dropout branch, its fused (dropout 0) and
grouped (memory-lean) forms, gradient checkpointing, and the LoRA baselines (peft LoRA, masked LoRA)
on the same modules. Prints seconds per step and ratios. (Peak memory is not measured here: in one
process the allocator's reuse makes each row's RSS depend on the rows before it.)

    python scripts/bench_spp.py                    # SmolLM2-135M, batch 4 x 256
    python scripts/bench_spp.py --model tiny-llama --steps 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from sppx.adapters import LoRAAdapter, MaskedLoRAAdapter, SPPAdapter
from sppx.evaluate import next_token_nll
from sppx.models import EmbeddedModel, TinyLlama
from sppx.module import TuneConfig, TuneModule
from sppx.pruning import MagnitudePruner, SparsityPattern, prune_model


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = (EmbeddedModel() if args.model == "smollm2-135m" else TinyLlama()).load()
    prune_model(model, MagnitudePruner(), 0.5, SparsityPattern(), progress=False)
    ids = torch.randint(0, len(tokenizer), (args.batch, args.seqlen))

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    rows = [("forward (pruned model, no grad)", timed(forward, args.steps))]
    for label, adapter, ckpt in [
        ("SPP train step, dropout 0.05 (two branches)", SPPAdapter(dropout=0.05), False),
        ("SPP train step, dropout 0 (fused matmul)", SPPAdapter(dropout=0.0), False),
        ("SPP train step, dropout 0.05, grouped forward", SPPAdapter(dropout=0.05, grouped=True), False),
        ("SPP train step, dropout 0.05 + grad checkpointing", SPPAdapter(dropout=0.05), True),
        ("LoRA (peft) r=8 train step, dropout 0.05", LoRAAdapter(dropout=0.05), False),
        ("masked LoRA r=8 train step, dropout 0.05", MaskedLoRAAdapter(dropout=0.05), False),
    ]:
        rows.append((label, timed(train_step_fn(model, ids, adapter, ckpt), args.steps)))

    base = rows[0][1]
    tokens = args.batch * args.seqlen
    print(
        f"{args.model}, batch {args.batch} x {args.seqlen} tokens, {torch.get_num_threads()} threads, "
        f"median of {args.steps} steps"
    )
    print(f"{'':52s} {'s/step':>8s} {'tok/s':>8s} {'x forward':>10s}")
    for label, seconds in rows:
        print(f"{label:52s} {seconds:8.2f} {tokens / seconds:8.0f} {seconds / base:10.2f}")


if __name__ == "__main__":
    main()

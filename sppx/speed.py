"""Inference speed of causal LMs, measured side by side in one process.

Two numbers per model: **prefill** tokens/s (one forward over ``prefill_tokens`` tokens, no KV cache)
and **decode** tokens/s (greedy generation of ``decode_tokens`` new tokens at batch 1 with the KV cache,
from a ``prompt_tokens`` prompt). Models are timed in interleaved rounds, each round in a different order,
after one warm-up round, and the medians are reported: drift of the machine (frequency, other load)
then falls on every model alike, and ratios between models measured together are what is comparable.

Every model compared should be loaded the same way (:func:`sppx.models.load_pretrained` copies the
weights out of the safetensors memory map): weights left mapped from the page cache decoded about 3%
slower here than the same weights in the process's own memory.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PROMPT_TOKENS = 16  # the decode prompt: the first tokens of the prefill ids


@dataclass(frozen=True)
class Speed:
    prefill_tps: float  # median tokens/s of one prefill forward
    decode_tps: float  # median new tokens/s of greedy generation
    prefill_samples: tuple[float, ...]
    decode_samples: tuple[float, ...]

    def ratios(self, reference: Speed) -> dict[str, float]:
        return {
            "prefill_x": self.prefill_tps / reference.prefill_tps,
            "decode_x": self.decode_tps / reference.decode_tps,
        }

    def as_dict(self) -> dict:
        return {"prefill_tps": round(self.prefill_tps, 3), "decode_tps": round(self.decode_tps, 3)}


def _pad_id(model: nn.Module) -> int:
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    return eos if eos is not None else 0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_tps(model: nn.Module, ids: torch.Tensor) -> float:
    """Tokens per second of one forward over ``ids`` (1 x n), without a KV cache."""
    _synchronize(ids.device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _synchronize(ids.device)
    return ids.numel() / (time.perf_counter() - start)


@torch.inference_mode()
def decode_tps(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """New tokens per second of greedy generation (exactly ``new_tokens``, KV cache on) after ``prompt``."""
    _synchronize(prompt.device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=_pad_id(model),
    )
    _synchronize(prompt.device)
    return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)


def compare_speeds(
    models: dict[str, nn.Module],
    prefill_tokens: int = 256,
    decode_tokens: int = 64,
    prompt_tokens: int = PROMPT_TOKENS,
    repeats: int = 5,
    seed: int = 0,
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, Speed]:
    """``{name: Speed}`` of every model, timed in ``repeats`` interleaved rounds after a warm-up round.

    The same random token ids (below the smallest vocabulary) feed every model; the prompt is their first
    ``prompt_tokens``. ``on_round(round, repeats)`` is called before each round (progress)."""
    if not models:
        raise ValueError("no models to time")
    if repeats < 1 or prefill_tokens < 1 or decode_tokens < 1 or not 1 <= prompt_tokens <= prefill_tokens:
        raise ValueError("repeats, prefill_tokens, decode_tokens must be >= 1, prompt_tokens in [1, prefill]")
    vocab = min(m.config.vocab_size for m in models.values())
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prefill_tokens), generator=generator)
    devices = {name: next(m.parameters()).device for name, m in models.items()}
    names = list(models)
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
    for round_ in range(repeats + 1):  # round 0 warms every model up
        if on_round is not None:
            on_round(round_, repeats)
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:  # a different order every round
            model, device = models[name], devices[name]
            was_training = model.training
            model.eval()
            try:
                prefill = prefill_tps(model, ids.to(device))
                decode = decode_tps(model, ids[:, :prompt_tokens].to(device), decode_tokens)
            finally:
                model.train(was_training)
            if round_:
                samples[name][0].append(prefill)
                samples[name][1].append(decode)
    return {
        name: Speed(statistics.median(p), statistics.median(d), tuple(p), tuple(d))
        for name, (p, d) in samples.items()
    }

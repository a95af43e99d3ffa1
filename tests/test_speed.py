"""Inference speed side by side: the arithmetic, the protocol, and eval.speed in the pipeline."""

import itertools

import pytest

import sppx.speed as speed
from sppx.models import TinyLlama
from sppx.pipeline import run
from tests.conftest import compose_config, tiny_run_overrides


def test_tokens_per_second_arithmetic_and_exact_token_counts(tiny, monkeypatch):
    model, _ = tiny
    ticks = itertools.count(step=0.5)  # every perf_counter call advances half a second
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(ticks))
    ids = speed.torch.arange(40).reshape(1, 40)
    assert speed.prefill_tps(model, ids) == 40 / 0.5
    # Exactly the requested new tokens are generated (min_new_tokens: no early stop at EOS).
    assert speed.decode_tps(model, ids[:, :4], 12) == 12 / 0.5


def test_compare_speeds_times_every_model_each_round_in_rotating_order(tiny, monkeypatch):
    model, _ = tiny
    other, _ = TinyLlama(seed=1, num_hidden_layers=1).load()
    order = []
    real_prefill = speed.prefill_tps
    monkeypatch.setattr(speed, "prefill_tps", lambda m, ids: order.append(m is model) or real_prefill(m, ids))
    out = speed.compare_speeds({"a": model, "b": other}, prefill_tokens=24, decode_tokens=3, repeats=3)
    assert set(out) == {"a", "b"}
    assert all(len(s.prefill_samples) == len(s.decode_samples) == 3 for s in out.values())
    assert order == [True, False, False, True, True, False, False, True]  # warm-up round, then 3 rotated
    assert out["a"].ratios(out["a"]) == {"prefill_x": 1.0, "decode_x": 1.0}
    assert out["b"].decode_tps == sorted(out["b"].decode_samples)[1]  # the median
    with pytest.raises(ValueError):
        speed.compare_speeds({"a": model}, prompt_tokens=300, prefill_tokens=256)
    with pytest.raises(ValueError):
        speed.compare_speeds({})


@pytest.mark.slow
def test_eval_speed_reports_the_final_model_against_a_fresh_dense_copy(tmp_path, text_file):
    overrides = tiny_run_overrides(
        text_file,
        **{
            "eval.speed": "true",
            "eval.speed_repeats": 1,
            "eval.speed_decode_tokens": 4,
            "export.enabled": "false",
        },
    )
    results = run(compose_config(overrides, tmp_path), progress=False)
    s = results["speed"]
    assert set(s) == {"dense", "final", "setup"}  # no 2:4 kernels on a CPU
    assert s["dense"]["decode_x"] == 1.0 and s["dense"]["prefill_x"] == 1.0
    assert s["final"]["decode_x"] == pytest.approx(
        s["final"]["decode_tps"] / s["dense"]["decode_tps"], rel=1e-3
    )
    assert s["setup"]["decode_tokens"] == 4 and s["setup"]["device"] == results["device"]
    assert results["time_s"]["speed"] > 0

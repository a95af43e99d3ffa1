"""What a search optimises is a config key (optimized_metric), read from the run's own record."""

from __future__ import annotations

import math

import pytest

from sppx.errors import ConfigError
from sppx.pipeline import objective, plan
from tests.conftest import compose_config, tiny_run_overrides


def record(metric: str | None) -> dict:
    return {
        "ppl": {"final": 40.0, "dense": 26.0, "pruned": 60.0, "validation": 30.0},
        "sparsity": {"measured": 0.5},
        "time_s": {"prune": 1.0},
        "params": {"nonzero": 10, "trainable": 2},
        "config": {} if metric is None else {"optimized_metric": metric},
    }


@pytest.mark.parametrize(
    "metric, value",
    [(None, 30.0), ("val/ppl_final", 30.0), ("prune/sparsity", 0.5), ("model/params_nonzero", 10.0)],
)
def test_the_objective_is_the_metric_the_config_names(metric, value):
    assert objective(record(metric)) == value


def test_a_metric_the_run_did_not_measure_is_nan_for_the_sweeper():
    results = record(None)
    results["ppl"]["validation"] = None
    assert math.isnan(objective(results))


@pytest.mark.parametrize("metric", ["val/loss", "test/ppl"])
def test_an_unknown_or_evaluation_part_metric_fails_in_the_plan(tmp_path, text_file, metric):
    cfg = compose_config([*tiny_run_overrides(text_file), f"optimized_metric={metric}"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"optimized_metric='.*': allowed: val/ppl_final, prune/sparsity"):
        plan(cfg)
    assert not (tmp_path / "run").exists()

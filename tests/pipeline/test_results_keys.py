"""results.json keeps every key it had, with the same place in the record (a checked-in list, taken
from a tiny run of each kind: one-shot Wanda + SPP, and COMP structured + SPP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sppx.pipeline import run
from tests.conftest import compose_config, tiny_run_overrides

KEYS = json.loads((Path(__file__).parents[1] / "data" / "results_keys.json").read_text())
CASES = {
    "wanda_spp": [],
    "comp": ["pruner=comp", "pattern=structured", "sparsity=0.25", "pruner.neuron_multiple=8"],
}


def key_paths(record: dict, prefix: str = "") -> set[str]:
    """Dotted paths of every key, without the names of modules and layers (they depend on the model)
    and without the resolved config (the config files' own)."""
    paths = set()
    for key, value in record.items():
        if prefix.endswith(("per_module.", "per_layer.")) or prefix.startswith("config."):
            continue
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= key_paths(value, prefix + key + ".")
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_results_json_keeps_every_key_it_had(tmp_path, text_file, case):
    overrides = [
        *tiny_run_overrides(text_file, **{"trainer.max_steps": 2}),
        "export.enabled=false",
        *CASES[case],
    ]
    results = run(compose_config(overrides, tmp_path / "run"), progress=False)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert key_paths(written) == key_paths(results)
    missing = sorted(set(KEYS[case]) - key_paths(written))
    assert missing == []


def test_key_paths_skip_module_names_and_the_config():
    record = {"a": {"b": 1}, "sparsity": {"per_module": {"model.layers.0.q": 0.5}}, "config": {"x": 1}}
    assert key_paths(record) == {"a", "a.b", "sparsity", "sparsity.per_module", "config"}

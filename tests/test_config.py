"""Every config file composes and every ``_target_`` it names imports."""

from pathlib import Path

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_config

GROUP_FILES = sorted(
    p
    for p in CONF_DIR.rglob("*.yaml")
    if p.parent != CONF_DIR and p.relative_to(CONF_DIR).parts[0] != "hydra"
)


def test_config_files_are_discovered():
    assert len(GROUP_FILES) >= 15
    assert {p.parent.name for p in GROUP_FILES} >= {
        "model",
        "data",
        "pruner",
        "pattern",
        "adapter",
        "teacher",
        "trainer",
        "logger",
        "paths",
    }


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_every_group_option_composes_and_its_targets_import(path: Path, tmp_path):
    group = str(path.parent.relative_to(CONF_DIR))
    cfg = compose_config([f"{group}={path.stem}"], tmp_path)
    container = OmegaConf.to_container(cfg, resolve=False)
    targets = list(_targets(container))
    assert len(targets) >= 7
    for target in targets:
        assert callable(get_object(target)), target


def test_default_config_selects_the_embedded_default(tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.model._target_ == "sppx.models.EmbeddedModel" and cfg.data._target_ == "sppx.data.WikiText"
    assert cfg.pruner._target_.endswith("WandaPruner") and cfg.adapter._target_.endswith("SPPAdapter")
    assert cfg.sparsity == 0.5 and cfg.pattern.kind == "unstructured"
    assert cfg.eval.seqlen == cfg.data.seqlen  # eval windows follow data.seqlen unless set


def test_nm_pattern_names_parse_on_the_command_line(tmp_path):
    cfg = compose_config(["pattern=2:4"], tmp_path)
    assert (cfg.pattern.n, cfg.pattern.m) == (2, 4)

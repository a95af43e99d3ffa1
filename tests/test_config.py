"""Every config file composes and every ``_target_`` it names imports; shared settings live once."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from sppx.pruning import PROJECTIONS
from tests.conftest import CONF_DIR, compose_config

# conf/<group>/base/*.yaml are not options: option files include them through their defaults list
# (`- base/oneshot@_here_`), and neither Hydra nor run.py lists them among a group's options.
BASE_DIR = "base"
GROUP_FILES = sorted(
    p
    for p in CONF_DIR.rglob("*.yaml")
    if p.parent != CONF_DIR and p.relative_to(CONF_DIR).parts[0] != "hydra" and p.parent.name != BASE_DIR
)
# The one file that lists the code default (sppx.pruning.PROJECTIONS) as `targets`: pruner and adapter
# files include it, so `pruner.targets=[...]` / `adapter.targets=[...]` stay command-line settings.
PROJECTIONS_FILE = CONF_DIR / "pruner" / BASE_DIR / "projections.yaml"


def options(group: str) -> list[str]:
    """The selectable options of a group, as run.py and Hydra list them (base/ files are not)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


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


@pytest.mark.slow
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


def _yaml_files(*groups: str) -> list[Path]:
    return sorted(p for group in groups for p in (CONF_DIR / group).rglob("*.yaml"))


@pytest.mark.parametrize("path", _yaml_files("pruner", "adapter"), ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_no_config_file_repeats_the_default_targets(path: Path):
    """The default target list lives in code (PROJECTIONS) and once in conf/pruner/base/projections.yaml;
    any other file lists `targets` only where it differs from it."""
    body = yaml.safe_load(path.read_text()) or {}
    if path == PROJECTIONS_FILE:
        assert body["targets"] == PROJECTIONS  # the same names in the same order as the code default
    else:
        assert body.get("targets") != PROJECTIONS, (
            f"{path.name}: drop targets (base/projections.yaml has them)"
        )


def test_base_files_are_not_options():
    assert "base" not in options("pruner") and not any(o.startswith("_") for o in options("pruner"))
    assert PROJECTIONS_FILE.is_file() and (CONF_DIR / "pruner" / BASE_DIR / "oneshot.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("group", ["pruner", "adapter"])
def test_every_option_composes_and_builds_with_its_class_defaults(group: str, tmp_path):
    for option in options(group):
        node = compose_config([f"{group}={option}"], tmp_path)[group]
        assert "defaults" not in node and "base" not in node, option  # the base merged, not nested
        built = instantiate(node, _convert_="all")
        assert type(built) is get_object(node._target_), option
        cls = type(built)
        if "targets" in node:  # the shared list, built into what the class itself defaults to
            assert built.targets == cls().targets == PROJECTIONS, option
        if dataclasses.is_dataclass(cls):
            fields = {f.name for f in dataclasses.fields(cls)}
            assert set(node) - {"_target_"} <= fields, option


@pytest.mark.slow
@pytest.mark.parametrize("option", ["magnitude", "wanda", "sparsegpt"])
def test_oneshot_pruners_share_the_base_and_their_own_values_win(option: str, tmp_path):
    base = yaml.safe_load((CONF_DIR / "pruner" / BASE_DIR / "oneshot.yaml").read_text())
    own = yaml.safe_load((CONF_DIR / "pruner" / f"{option}.yaml").read_text())
    assert own["defaults"] == ["base/oneshot@_here_", "_self_"]
    node = OmegaConf.to_container(compose_config([f"pruner={option}"], tmp_path).pruner)
    shared = {k: v for k, v in base.items() if k != "defaults"}
    expected = {"targets": PROJECTIONS, **shared, **{k: v for k, v in own.items() if k != "defaults"}}
    assert node == expected
    # the shared keys stay command-line settings, targets included
    cfg = compose_config(
        [f"pruner={option}", "pruner.allocation=owl", "pruner.owl_m=7", "pruner.targets=[q_proj]"], tmp_path
    )
    pruner = instantiate(cfg.pruner, _convert_="all")
    assert (pruner.allocation, pruner.owl_m, pruner.targets) == ("owl", 7, ["q_proj"])


def test_adapter_targets_stay_a_setting(tmp_path):
    cfg = compose_config(["adapter=masked_lora", "adapter.targets=[q_proj, v_proj]"], tmp_path)
    assert instantiate(cfg.adapter, _convert_="all").targets == ["q_proj", "v_proj"]

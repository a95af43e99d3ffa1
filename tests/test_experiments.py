"""Experiment presets, the hyper-parameter search, and results collected into tables and plots."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from sppx.collect import collect, markdown_table, write_report
from sppx.pipeline import plan
from sppx.sweep import job_dirname, swept_keys
from tests.conftest import CONF_DIR, compose_config, run_py, sweep_args, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_there_are_paper_presets():
    assert {"spp_wanda_2of4", "spp_wanda_75", "nuteprune_20", "comp_20"} <= set(PRESETS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_passes_the_plan(preset, tmp_path, text_file):
    cfg = compose_config([f"experiment={preset}"], tmp_path)  # on the default model, as users run it
    header = (CONF_DIR / "experiment" / f"{preset}.yaml").read_text().splitlines()[0]
    assert header == "# @package _global_"
    body = yaml.safe_load((CONF_DIR / "experiment" / f"{preset}.yaml").read_text())
    for line in body["defaults"]:
        ((key, option),) = line.items()
        group = key.removeprefix("override /")
        assert (CONF_DIR / group / f"{option}.yaml").is_file(), (group, option)
    if "sparsity" in body:
        assert cfg.sparsity == body["sparsity"]
    for key, value in (body.get("trainer") or {}).items():
        assert cfg.trainer[key] == value
    # Every setting it makes is valid (checked on the tiny model: no weights are read by the plan).
    tiny = [o for o in tiny_run_overrides(text_file) if not o.startswith("trainer.max_steps")]
    if "neuron_multiple" in compose_config([f"experiment={preset}"], tmp_path).pruner:
        tiny.append(
            "pruner.neuron_multiple=8"
        )  # the tiny model's 128 neurons: multiples of 16 are too coarse
    p = plan(compose_config([f"experiment={preset}", *tiny], tmp_path))
    assert p.pruner.name == body["defaults"][0]["override /pruner"]


@pytest.mark.slow
def test_the_optuna_search_composes_and_three_trials_run_on_the_tiny_model(tmp_path, text_file):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_config(["hparams_search=spp_optuna"], tmp_path)
    assert cfg.adapter._target_.endswith("SPPAdapter") and cfg.teacher._target_.endswith("DenseTeacher")
    sweep = tmp_path / "search"
    proc = run_py(
        *sweep_args(tmp_path, text_file, "search"), "hparams_search=spp_optuna", "hydra.sweeper.n_trials=3"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads(p.read_text()) for p in sweep.rglob("results.json")]
    assert len(trials) == 3 and all(t["status"] == "complete" for t in trials)
    # The best value is the lowest validation perplexity among the trials, with that trial's settings.
    winner = min(trials, key=lambda t: t["ppl"]["validation"])
    assert best["best_value"] == pytest.approx(winner["ppl"]["validation"])
    assert best["best_params"]["adapter.rows"] == winner["config"]["adapter"]["rows"]
    assert best["best_params"]["tune.lr"] == pytest.approx(winner["config"]["tune"]["lr"])
    assert set(best["best_params"]) == {
        "tune.lr",
        "adapter.rows",
        "teacher.kl_weight",
        "teacher.hidden_weight",
    }
    assert (sweep / "summary.md").read_text().startswith("3 runs: 3 complete")
    assert (sweep / "search_history.png").is_file() and (sweep / "param_importances.png").is_file()
    # Trial folders are named by the searched parameters only; the summary has a column for each.
    params = ["adapter.rows", "teacher.hidden_weight", "teacher.kl_weight", "tune.lr"]
    for path in sweep.rglob("results.json"):
        assert sorted(part.split("=")[0] for part in path.parent.name.split(",")) == params, path.parent.name
    with open(sweep / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert all(set(params) <= set(r) for r in rows)
    assert sorted(float(r["tune.lr"]) for r in rows) == sorted(t["config"]["tune"]["lr"] for t in trials)


def test_sweep_job_folders_are_named_from_the_swept_values(tmp_path):
    assert swept_keys(["pruner=magnitude,wanda", "sparsity=0.5", "data.seqlen=range(8,32,8)"]) == {
        "pruner",
        "data.seqlen",
    }
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "multirun.yaml").write_text(
        yaml.safe_dump(
            {
                "hydra": {
                    "overrides": {"task": ["model=tiny-llama", "pruner=magnitude,wanda", "sparsity=0.5,0.6"]},
                    "sweeper": {"params": {"tune.lr": "interval(0.001, 0.01)"}},
                }
            }
        )
    )
    job = ["model=tiny-llama", "pruner=wanda", "sparsity=0.6", "tune.lr=0.002"]
    assert job_dirname(job, str(sweep_dir)) == "pruner=wanda,sparsity=0.6,tune.lr=0.002"
    assert job_dirname(["data.paths=[/a/b.txt]"]) == "data.paths=[_a_b.txt]"  # one path component
    long = job_dirname([f"k{i}=value{i}" for i in range(60)])
    assert len(long) == 180 and long != job_dirname([f"k{i}=value{i}" for i in range(61)])


@pytest.mark.slow
def test_a_joblib_sweep_runs_jobs_in_parallel_processes_with_the_same_folders(tmp_path, text_file):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    launcher = ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    proc = run_py(*sweep_args(tmp_path, text_file), *launcher, "pruner=magnitude,wanda")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in (tmp_path / "sweep").rglob("results.json"))
    assert jobs == ["pruner=magnitude", "pruner=wanda"]
    assert (tmp_path / "sweep" / "summary.md").read_text().startswith("2 runs: 2 complete")


def fake_results(status: str = "complete", **over) -> dict:
    results = {
        "status": status,
        "choices": {
            "model": "m",
            "pruner": "wanda",
            "pattern": "unstructured",
            "adapter": "spp",
            "teacher": "none",
        },
        "ppl": {"dense": 20.0, "pruned": 60.0, "final": 40.0, "validation": 41.0},
        "sparsity": {"target": 0.5, "measured": 0.5, "per_layer": [0.5, 0.5, 0.5]},
        "params": {"total": 1000, "trainable": 10},
        "tune": {"step_time_s": 1.5},
        "time_s": {"total": 12.0},
    }
    results.update(over)
    return results


def test_collect_reads_every_run_below_a_folder_into_rows_and_plots(tmp_path):
    runs = {
        "a/sparsity=0.5": fake_results(),
        "a/sparsity=0.7": fake_results(
            sparsity={"target": 0.7, "measured": 0.7, "per_layer": [0.6, 0.7, 0.8]},
            ppl={"dense": 20.0, "pruned": 300.0, "final": 90.0, "validation": 95.0},
        ),
        "b/broken": {"status": "failed", "error": "sparsity=1.5: must be a number in [0, 1)", "choices": {}},
    }
    for name, results in runs.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text("{not json")  # unreadable: ignored
    rows, results = collect(tmp_path)
    assert [r["run"] for r in rows] == ["a/sparsity=0.5", "a/sparsity=0.7", "b/broken"]
    assert [r["status"] for r in rows] == ["complete", "complete", "failed"]
    assert (
        rows[1]["ppl_final"] == 90.0
        and rows[1]["sparsity"] == 0.7
        and rows[2]["error"].startswith("sparsity")
    )
    table = markdown_table(rows)
    assert len(table.splitlines()) == 2 + 3 and "| a/sparsity=0.7 | complete |" in table
    written = write_report(rows, results, tmp_path / "out")
    assert {p.name for p in written} == {
        "summary.md",
        "summary.csv",
        "ppl_vs_sparsity.png",
        "recovery.png",
        "layer_sparsity.png",
    }
    with open(tmp_path / "out" / "summary.csv") as fh:
        assert [r["ppl_final"] for r in csv.DictReader(fh)] == ["40.0", "90.0", ""]
    assert (tmp_path / "out" / "summary.md").read_text().startswith("3 runs: 2 complete, 1 failed")


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ],
)
def test_the_cluster_and_parallel_launchers_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 240

"""End to end on the tiny model: results.json, the export, and sweeps from the command line."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from sppx.data import TextFiles, consecutive_windows, encode_documents
from sppx.errors import ConfigError
from sppx.evaluate import perplexity
from sppx.pipeline import plan, run
from sppx.summary import summary_table
from tests.conftest import compose_config, run_py, sweep_args, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_full_run_writes_complete_results_and_a_reloadable_model(tmp_path, text_file):
    cfg = compose_config(tiny_run_overrides(text_file), tmp_path / "run")
    results = run(cfg, progress=False)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["ppl"] == results["ppl"]

    assert set(on_disk) >= {"ppl", "sparsity", "params", "time_s", "choices", "config"}
    assert set(on_disk["ppl"]) >= {"dense", "pruned", "final", "seqlen", "windows"}
    assert set(on_disk["sparsity"]) >= {"target", "measured", "pattern"}
    assert set(on_disk["params"]) >= {"total", "nonzero", "trainable"}
    assert set(on_disk["time_s"]) >= {"load", "prune", "tune", "merge", "eval", "total"}
    assert on_disk["choices"] == {
        "model": "tiny-llama",
        "data": "text",
        "pruner": "wanda",
        "pattern": "unstructured",
        "adapter": "spp",
        "teacher": "none",
    }
    assert on_disk["config"]["sparsity"] == 0.5 and on_disk["config"]["model"]["hidden_size"] == 64
    assert all(
        isinstance(on_disk["ppl"][k], float) and math.isfinite(on_disk["ppl"][k])
        for k in ("dense", "pruned", "final")
    )
    assert on_disk["ppl"]["seqlen"] == 32 and on_disk["ppl"]["windows"] >= 1
    # 2 blocks x 7 Linears, each exactly half zeros (Wanda: floor(in * 0.5) per row).
    assert on_disk["sparsity"]["measured"] == 0.5 and len(on_disk["sparsity"]["per_module"]) == 14
    assert (
        on_disk["params"]["trainable"]
        == sum(
            16 * i + o for o, i in [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
        )
        * 2
    )
    assert on_disk["ppl"]["final"] != on_disk["ppl"]["pruned"]  # tuning changed the model

    # The export loads with plain transformers and reproduces the final perplexity and the zeros.
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "model.safetensors").is_file() and not list((tmp_path / "run").glob(".model.tmp-*"))
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parts = TextFiles(paths=[str(text_file)]).parts(tmp_path / "run" / "cache")
    windows = consecutive_windows(encode_documents(tokenizer, parts["evaluation"]), 32, 8)
    assert perplexity(reloaded, windows, progress=False)["ppl"] == pytest.approx(
        on_disk["ppl"]["final"], rel=1e-5
    )
    for name in on_disk["sparsity"]["per_module"]:
        w = reloaded.get_submodule(name).weight
        assert int((w == 0).sum()) == w.numel() // 2
    assert (tmp_path / "run" / "adapter" / "sppx_adapter.json").is_file()
    assert not (tmp_path / "run" / "adapter" / "adapter_config.json").exists()  # not peft's format
    assert (tmp_path / "run" / "csv" / "metrics.csv").read_text().count("train/loss") == 1


def test_pruner_none_and_adapter_none_reuse_measurements(tmp_path, text_file):
    cfg = compose_config(
        tiny_run_overrides(text_file, pruner="none", adapter="none", **{"export.enabled": "false"}), tmp_path
    )
    results = run(cfg, progress=False)
    assert results["ppl"]["dense"] == results["ppl"]["pruned"] == results["ppl"]["final"]
    assert results["sparsity"]["target"] == 0.0 and results["sparsity"]["measured"] < 0.01
    assert results["params"]["trainable"] == 0 and not (tmp_path / "model").exists()


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["magnitude", "sparsegpt"])
def test_nm_run_keeps_the_pattern_after_merge(tmp_path, text_file, pruner):
    cfg = compose_config(tiny_run_overrides(text_file, pattern="2:4", pruner=pruner), tmp_path)
    results = run(cfg, progress=False)
    assert results["sparsity"]["pattern"] == "2:4" and results["sparsity"]["target"] == 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for name in results["sparsity"]["per_module"]:
        w = reloaded.get_submodule(name).weight
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2).all()


@pytest.mark.slow
def test_tuning_lowers_perplexity_on_learnable_text(tmp_path, text_file):
    overrides = tiny_run_overrides(text_file, **{"trainer.max_steps": 40, "tune.lr": 2e-2, "sparsity": 0.75})
    results = run(compose_config(overrides, tmp_path), progress=False)
    assert results["ppl"]["final"] < results["ppl"]["pruned"]


@pytest.mark.slow
def test_multirun_from_the_command_line(tmp_path, text_file):
    proc = run_py(*sweep_args(tmp_path, text_file), "pruner=magnitude,wanda", "sparsity=0.5,0.6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted((tmp_path / "sweep").rglob("results.json"))
    assert len(found) == 4
    seen = {
        (json.loads(p.read_text())["choices"]["pruner"], json.loads(p.read_text())["sparsity"]["target"])
        for p in found
    }
    assert seen == {("magnitude", 0.5), ("magnitude", 0.6), ("wanda", 0.5), ("wanda", 0.6)}
    assert all("pruner=" in p.parent.name and "sparsity=" in p.parent.name for p in found)
    # The sweep ends with one table (a row per job) and the plots in its folder.
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert summary.startswith("4 runs: 4 complete, 0 failed")
    table = [line for line in summary.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4 and all(f"| {p.parent.name} |" in summary for p in found)
    assert (tmp_path / "sweep" / "ppl_vs_sparsity.png").stat().st_size > 10_000
    with open(tmp_path / "sweep" / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["pruner"], float(r["target"])) for r in rows) == sorted(seen)


@pytest.mark.slow
def test_a_failing_sweep_job_is_recorded_and_the_sweep_goes_on(tmp_path, text_file):
    proc = run_py(*sweep_args(tmp_path, text_file), "sparsity=0.5,1.5")
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep went on, and then says a job failed
    assert "sppx: error: sparsity=1.5: must be a number in [0, 1)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "sppx: error: 1 of 2 jobs failed: sparsity=1.5"
    records = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("results.json")}
    assert set(records) == {"sparsity=0.5", "sparsity=1.5"}
    assert records["sparsity=0.5"]["status"] == "complete"
    failed = records["sparsity=1.5"]
    assert failed["status"] == "failed" and failed["error"] == "sparsity=1.5: must be a number in [0, 1)"
    assert failed["choices"]["pruner"] == "wanda" and "python run.py" in failed["command"]
    assert (tmp_path / "sweep" / "summary.md").read_text().startswith("2 runs: 1 complete, 1 failed")

    # scripts/collect.py reads the same folder into a table and plots elsewhere.
    out = tmp_path / "report"
    collected = subprocess.run(
        [sys.executable, "scripts/collect.py", str(tmp_path / "sweep"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collected.returncode == 0, collected.stderr[-2000:]
    with open(out / "summary.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert rows["sparsity=1.5"]["status"] == "failed" and rows["sparsity=0.5"]["ppl_final"]
    assert {p.name for p in out.glob("*.png")} == {
        "ppl_vs_sparsity.png",
        "recovery.png",
        "layer_sparsity.png",
    }


def offline_wandb(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(run_dir: Path) -> bytes:
    """The offline W&B run's record file (protobuf records; keys and strings are stored as bytes)."""
    (found,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    return found.read_bytes()


@pytest.mark.slow
def test_wandb_logger_runs_offline_and_logs_every_kind_of_record(tmp_path, text_file, monkeypatch, capsys):
    offline_wandb(monkeypatch, tmp_path)
    overrides = tiny_run_overrides(
        text_file,
        logger="wandb",
        **{"export.enabled": "false"},
        **{"trainer.max_steps": 2, "trainer.log_every_n_steps": 1, "trainer.val_check_interval": 2},
    )
    run(compose_config(overrides, tmp_path), progress=False)
    records = wandb_records(tmp_path)
    for key in (
        b"train/loss",  # per-step metrics
        b"val/ppl",
        b"test/ppl",  # final metrics, also the run summary
        b"choice/pruner",  # summary only
        b"sparsity/per_layer",  # the per-layer table and its bar plot
        b"sparsity/per_type",
        b"sparsity/per_layer_plot",
        b"prune-tune",  # job_type: what the run did
        b"seqlen",  # the config
    ):
        assert key in records, key
    assert "upload it with: wandb sync " in capsys.readouterr().err
    import wandb

    assert wandb.run is None  # finished: the next run (a multirun's next job) starts a new one


@pytest.mark.slow
def test_a_wandb_sweep_gives_one_finished_run_per_job_grouped_by_the_sweep(tmp_path, text_file, monkeypatch):
    offline_wandb(monkeypatch, tmp_path)
    proc = run_py(*sweep_args(tmp_path, text_file, "my-sweep"), "sparsity=0.5,0.6", "logger=wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "my-sweep").rglob("results.json"))
    assert [j.name for j in jobs] == ["sparsity=0.5", "sparsity=0.6"]
    for job in jobs:
        assert b"my-sweep" in wandb_records(job)  # group = the sweep
    assert proc.stderr.count("upload it with: wandb sync ") == 2


@pytest.mark.slow
def test_owl_run_records_block_sparsities_and_the_calibration_it_used(tmp_path, text_file):
    own = tmp_path / "calib.txt"
    own.write_text("A different text for calibration only, about stars and comets. " * 40)
    overrides = tiny_run_overrides(
        text_file,
        **{"export.enabled": "false"},
        **{"pruner.allocation": "owl", "data.calibration": str(own), "sparsity": 0.6},
    )
    results = run(compose_config([*overrides, "trainer.max_steps=0"], tmp_path / "owl"), progress=False)
    on_disk = json.loads((tmp_path / "owl" / "results.json").read_text())
    targets = on_disk["prune"]["layer_targets"]
    measured = on_disk["sparsity"]["per_layer"]
    assert on_disk["prune"]["allocation"] == "owl" and len(targets) == len(measured) == 2
    assert sum(targets) / 2 == pytest.approx(0.6, abs=1e-9) and targets[0] != targets[1]
    assert all(abs(m - t) < 0.002 for m, t in zip(measured, targets, strict=True))
    assert abs(on_disk["sparsity"]["measured"] - 0.6) <= 0.001
    assert set(on_disk["prune"]["phases_s"]) >= {"OWL outliers", "statistics", "masks", "block outputs"}
    calib = on_disk["data"]["calibration"]
    assert (
        calib["source"] == str(own) and calib["windows"] == 8 and calib["seqlen"] == 32 and calib["seed"] == 0
    )
    assert results["data"]["calibration"]["digest"] == calib["digest"]
    assert f"owl block sparsities {min(targets):.3f}-{max(targets):.3f}" in summary_table(results).caption

    # Another seed draws other windows; the default source is the corpus's own calibration part.
    other = run(
        compose_config([*overrides, "trainer.max_steps=0", "seed=1"], tmp_path / "seed1"), progress=False
    )
    assert other["data"]["calibration"]["digest"] != calib["digest"]
    default = run(
        compose_config(
            [*tiny_run_overrides(text_file, **{"export.enabled": "false"}), "trainer.max_steps=0"],
            tmp_path / "d",
        ),
        progress=False,
    )
    assert default["data"]["calibration"]["source"] == "calibration"
    assert (
        default["prune"]["layer_targets"] == [0.5, 0.5] and "OWL outliers" not in default["prune"]["phases_s"]
    )


@pytest.mark.slow
def test_instruction_file_tunes_on_its_responses(tmp_path, text_file):
    sample = Path(__file__).parents[1] / "data" / "alpaca_sample.json"
    cfg = compose_config(
        tiny_run_overrides(text_file, **{"data.tuning": str(sample), "data.seqlen": 512}), tmp_path
    )
    results = run(cfg, progress=False)
    assert results["tune"]["data"] == str(sample)
    assert results["tune"]["examples"] == 8 and results["tune"]["loss_on"] == "response"
    assert results["tune"]["steps"] == 6
    assert results["sparsity"]["zeros_verified"] > 0


def test_a_missing_instruction_file_fails_in_plan(tmp_path, text_file):
    cfg = compose_config(
        tiny_run_overrides(text_file, **{"data.tuning": str(tmp_path / "no.json")}), tmp_path
    )
    with pytest.raises(ConfigError, match=r"data\.tuning"):
        plan(cfg)


@pytest.mark.slow
def test_wandb_online_without_a_server_logs_offline_after_the_timeout(tmp_path, monkeypatch):
    import wandb

    from sppx.tracking import wandb_logger

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # Lightning leaves "dryrun" there after an offline run
    wandb.teardown()  # and wandb keeps the settings of its first run in this process
    logger = wandb_logger(mode="online", save_dir=str(tmp_path), init_timeout=3)
    try:
        assert logger._offline
        logger.experiment.log({"x": 1.0})
        assert list((tmp_path / "wandb").glob("offline-run-*"))
    finally:
        wandb.finish()


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, text_file, monkeypatch):
    from sppx.interrupts import Interrupted

    offline_wandb(monkeypatch, tmp_path)
    overrides = tiny_run_overrides(
        text_file, logger="wandb", **{"export.enabled": "false"}, **{"trainer.max_steps": 4}
    )
    stop = "[{_target_:tests.pipeline.test_signals.SignalAtStep,step:2,signum:15}]"
    with pytest.raises(Interrupted):
        run(compose_config([*overrides, f"trainer.callbacks={stop}"], tmp_path), progress=False)
    # A resume is a new process (and wandb refuses an id its process has used).
    proc = run_py(
        *overrides, "resume=true", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert len({r.name.rsplit("-", 1)[-1] for r in runs}) == 1  # one run id across the resume


@pytest.mark.slow
def test_a_batch_job_logs_every_stage_and_the_summary_without_carriage_returns(tmp_path, text_file):
    out = tmp_path / "run"
    proc = run_py(*tiny_run_overrides(text_file, **{"trainer.max_steps": 3}), f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr  # no terminal: log lines, not bars
    assert proc.stderr.strip() == ""  # everything on one stream
    text = (out / "run.log").read_text()
    for line in (
        "load: done in",
        "prune: done in",
        "ppl (pruned): ",
        "tune: step 3/3 (loss",
        "tune: done in",
    ):
        assert line in text, line
    for line in ("ppl (final): ", "ppl (validation): ", "export: done in", "summary:", "results: "):
        assert line in text, line


def test_a_head_count_the_config_cannot_describe_fails_in_the_plan_when_exporting():
    """LlamaConfig (transformers 5) needs hidden_size to be a multiple of the head count: 3 of 4 heads
    at hidden 32 could not be saved, so the plan refuses it; 2 of 4 pass."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from sppx.anatomy import Dims
    from sppx.errors import ConfigError
    from sppx.pipeline.stages import check_kept_heads
    from sppx.pruning.structured import MagnitudeStructuredPruner

    config = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        num_hidden_layers=2,
    )
    pruner = MagnitudeStructuredPruner(units=["heads"], head_mode="group", neuron_multiple=1)
    for sparsity, kept in ((0.25, 3), (0.5, 2)):
        assert pruner.budget(Dims.of(config), sparsity).heads == 4 - kept
        p = SimpleNamespace(model_config=config, pruner=pruner, sparsity=sparsity)
        if kept == 3:
            with pytest.raises(
                ConfigError, match=r"sparsity=0.25: keeps 3 of 4 query heads per layer, which LlamaConfig"
            ):
                check_kept_heads(p)
        else:
            check_kept_heads(p)

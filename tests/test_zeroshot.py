"""Zero-shot tasks through lm-eval: the shipped cloze task, local task YAMLs, the harness on the live
model (its accuracy equals a log-likelihood argmax computed here by hand), and missing datasets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from sppx.errors import ConfigError
from sppx.pipeline import plan, run
from sppx.zeroshot import (
    CHOICES,
    cloze_items,
    evaluate_tasks,
    load_tasks,
    mean_accuracy,
    read_task_yaml,
    sentences,
    write_task,
)
from tests.conftest import SAMPLE_TEXT, compose_config, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]

DOCS = [
    " ".join(f"Sentence number {i} of document {d} tells about the {w} by the old mill." for i in range(14))
    for d, w in enumerate(["river", "bridge", "valley"])
]


def toy_records(n: int = 12) -> list[dict]:
    return [
        {
            "context": f"The item {i} is about",
            "choices": [f"the river {i}.", f"a stone {i}.", f"the old mill {i}.", f"snow {i}."],
            "label": i % CHOICES,
        }
        for i in range(n)
    ]


def test_cloze_items_are_true_continuations_with_same_document_distractors():
    items = cloze_items(DOCS, items=20, seed=0)
    assert len(items) == 20 and items == cloze_items(DOCS, items=20, seed=0)
    per_doc = [sentences(d) for d in DOCS]
    for item in items:
        assert len(item["choices"]) == CHOICES and len(set(item["choices"])) == CHOICES
        d = next(k for k, s in enumerate(per_doc) if item["choices"][item["label"]] in s)
        sents = per_doc[d]
        i = sents.index(item["choices"][item["label"]])
        assert item["context"] == f"{sents[i - 2]} {sents[i - 1]}"
        for k, choice in enumerate(item["choices"]):
            if k != item["label"]:
                assert choice in sents and abs(sents.index(choice) - i) >= 3
    assert len({item["label"] for item in items}) > 1  # the true answer is not always in one place
    docs_used = {next(k for k, s in enumerate(per_doc) if it["choices"][it["label"]] in s) for it in items}
    assert docs_used == {0, 1, 2}  # positions are spread over every document


def test_relative_data_paths_are_read_from_the_yaml_folder(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_records()))
    config = {
        "task": "toy",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "items.jsonl"}},
    }
    (folder / "toy.yaml").write_text(yaml.safe_dump(config))
    resolved = read_task_yaml(folder / "toy.yaml")
    assert resolved["dataset_kwargs"]["data_files"]["test"] == str((folder / "items.jsonl").resolve())


def loglikelihood_argmax_accuracy(model, tokenizer, records: list[dict]) -> float:
    """What the harness's multiple-choice acc must be: argmax over choices of sum log p(" " + choice)."""
    right = 0
    for r in records:
        scores = []
        context = tokenizer(r["context"], add_special_tokens=False).input_ids
        for choice in r["choices"]:
            whole = tokenizer(r["context"] + " " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            cont = range(len(context), len(whole))
            scores.append(sum(float(logp[t - 1, whole[t]]) for t in cont))
        right += int(max(range(len(scores)), key=scores.__getitem__) == r["label"])
    return right / len(records)


@pytest.mark.slow
def test_the_harness_scores_the_live_model_object(tmp_path, tiny):
    model, tokenizer = tiny
    records = toy_records()
    yaml_path = write_task(tmp_path / "task", "toy_mc", records)
    tasks = load_tasks([str(yaml_path)], [], tmp_path)
    assert list(tasks.tasks) == ["toy_mc"] and tasks.sources["toy_mc"] == str(yaml_path)
    got = evaluate_tasks(model, tokenizer, tasks, batch_size=4)
    assert got["toy_mc"]["samples"] == len(records)
    assert got["toy_mc"]["acc"] == pytest.approx(loglikelihood_argmax_accuracy(model, tokenizer, records))
    # The same Task objects on the changed model: the harness follows the weights in memory.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    again = evaluate_tasks(model, tokenizer, tasks, batch_size=4)
    assert again["toy_mc"]["acc"] == pytest.approx(loglikelihood_argmax_accuracy(model, tokenizer, records))
    assert mean_accuracy({"a": {"acc": 0.5}, "b": {"acc": 0.25}, "c": {}}) == 0.375


@pytest.mark.slow
def test_missing_datasets_fail_in_plan_unless_optional(tmp_path, text_file):
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump(
            {
                "task": "broken_task",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(tmp_path / "nowhere.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "{{context}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
            }
        )
    )
    cfg = compose_config(tiny_run_overrides(text_file, **{"eval.tasks": f"[{broken}]"}), tmp_path / "a")
    with pytest.raises(
        ConfigError, match=r"^eval\.tasks='.*broken\.yaml': its dataset could not be loaded"
    ) as e:
        plan(cfg)
    assert "\n" not in str(e.value) and "eval.tasks_optional" in str(e.value)
    with pytest.raises(ConfigError, match=r"^eval\.tasks='no_such_task_anywhere': is not a task of lm-eval"):
        load_tasks(["no_such_task_anywhere"], [], tmp_path)
    with pytest.raises(ConfigError, match=r"^eval\.tasks='/no/such\.yaml': no such task YAML file$"):
        load_tasks(["/no/such.yaml"], [], tmp_path)
    skipped = load_tasks([], [str(broken)], tmp_path)
    assert not skipped and list(skipped.skipped) == ["broken_task"]


@pytest.mark.slow
def test_pipeline_reports_zero_shot_per_stage_and_logs_the_metrics(tmp_path, text_file):
    yaml_path = write_task(tmp_path / "task", "toy_mc", toy_records(8))
    overrides = tiny_run_overrides(
        text_file,
        **{
            "eval.tasks": f"[{yaml_path}]",
            "eval.task_stages": "[dense,pruned,final]",
            "export.enabled": "false",
        },
    )
    results = run(compose_config(overrides, tmp_path / "run"), progress=False)
    zs = results["zeroshot"]
    assert set(zs["stages"]) == {"dense", "pruned", "final"}
    assert all(zs["stages"][s]["toy_mc"]["samples"] == 8 for s in zs["stages"])
    assert zs["mean_acc"]["final"] == zs["stages"]["final"]["toy_mc"]["acc"]
    assert zs["retained"] == pytest.approx(zs["mean_acc"]["final"] / zs["mean_acc"]["dense"])
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("test/acc_toy_mc", "test/acc_toy_mc_dense", "test/acc_toy_mc_pruned", "test/acc_mean"):
        assert key in header


@pytest.mark.slow
def test_the_shipped_cloze_task_runs_in_the_pipeline_on_wiki_text(tmp_path, text_file):
    pytest.importorskip("lm_eval")
    overrides = tiny_run_overrides(
        text_file,
        **{
            "eval.tasks": "[sppx_wiki_cloze]",
            "eval.task_limit": 6,
            "eval.task_stages": "[final]",
            "trainer.max_steps": 0,
            "export.enabled": "false",
        },
    )
    results = run(compose_config(overrides, tmp_path), progress=False)
    entry = results["zeroshot"]["stages"]["final"]["sppx_wiki_cloze"]
    assert entry["samples"] == 6 and 0.0 <= entry["acc"] <= 1.0
    source = Path(results["zeroshot"]["tasks"]["sppx_wiki_cloze"]["source"])
    records = [json.loads(line) for line in source.with_suffix(".jsonl").read_text().splitlines()]
    assert len(records) == 400 and all(len(r["choices"]) == CHOICES for r in records)


@pytest.mark.slow
def test_the_export_evaluates_with_the_harness_cli_and_generates_with_transformers(tmp_path, text_file):
    yaml_path = write_task(tmp_path / "task", "toy_mc", toy_records(8))
    overrides = tiny_run_overrides(
        text_file, **{"eval.tasks": f"[{yaml_path}]", "eval.task_stages": "[final]"}
    )
    results = run(compose_config(overrides, tmp_path / "run"), progress=False)
    in_process = results["zeroshot"]["stages"]["final"]["toy_mc"]["acc"]
    model_dir = Path(results["model_dir"])

    out = tmp_path / "lm_eval_out"
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--tasks",
        "toy_mc",
        "--include_path",
        str(yaml_path.parent),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = list(out.rglob("results_*.json"))
    assert json.loads(found.read_text())["results"]["toy_mc"]["acc,none"] == pytest.approx(in_process)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer(SAMPLE_TEXT[:40], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ids = prompt.input_ids
    with torch.no_grad():  # greedy decoding by full forward passes, no KV cache
        for _ in range(12):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    assert tokenizer.decode(generated[0]).startswith(SAMPLE_TEXT[:40])


@pytest.mark.slow
def test_a_harness_task_without_its_dataset_is_named_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as in every test: the hub is out of reach
    with pytest.raises(ConfigError, match=r"^eval\.tasks='boolq': its dataset could not be loaded \(") as err:
        load_tasks(["boolq"], [], tmp_path)
    assert "\n" not in str(err.value)
    skipped = load_tasks(["sppx_wiki_cloze"], ["boolq"], tmp_path)
    assert list(skipped.tasks) == ["sppx_wiki_cloze"] and list(skipped.skipped) == ["boolq"]

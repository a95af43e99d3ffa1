"""Hostile and malformed command lines: each ends with exactly one ``sppx: error:`` line (exit 2 when it is
known before any weights are read, 1 otherwise), no traceback, nothing written for bad input, and no
output that claims success. The cases run through ``run.py``'s own entry point, a share of them per
subprocess (one interpreter start per share; the shares are separate tests, so ``pytest -n`` runs them
side by side); each prints how many ran."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    # wrong types
    ["sparsity=abc"],
    ["seed=abc"],
    ["seed=1.5"],
    ["export=maybe"],
    ["eval.dense=3"],
    ["trainer.max_steps=abc"],
    ["adapter.rows=1.5"],
    ["pattern=nm", "pattern.n=x"],
    ["data.seqlen=abc"],
    ["tune.lr=fast"],
    ["eval.tasks=boolq"],
    ["eval.task_stages=[foo]"],
    ["data.paths=5"],
    ["model.hidden_size=abc"],
    ["tune.checkpoint_every=true"],
    # negative and huge numbers
    ["sparsity=-1"],
    ["sparsity=1e300"],
    ["seed=-3"],
    ["seed=100000000000000000000"],
    ["data.seqlen=-5"],
    ["data.seqlen=10000000000000"],
    ["trainer.max_steps=-7"],
    ["data.nsamples=-1"],
    ["data.batch_size=0"],
    ["adapter.dropout=-0.5"],
    ["tune.lr=1e9"],
    ["eval.max_windows=-2"],
    ["adapter.rows=99999999"],
    ["tune.checkpoint_every=-1"],
    ["eval.task_limit=0"],
    ["eval.speed_repeats=0"],
    ["pruner=sparsegpt", "pruner.percdamp=-1"],
    # unknown options
    ["pruner=foo"],
    ["adapter=bogus"],
    ["foo=1"],
    ["+foo=1"],
    ["adapter.nope=2"],
    ["+pruner.nope=1"],
    ["+eval.nope=1"],
    ["pattern=3:5"],
    ["logger=nope"],
    ["eval.tasks=[no_such_task_anywhere]"],
    # empty strings
    ["sparsity=''"],
    ["data.calibration=''"],
    ["model=hf", "model.name_or_path=''"],
    ["eval.tasks=['']"],
    ["adapter.targets=[]"],
    ["pruner=''"],
]

# Values no key of that type accepts, crossed with the keys (generated: every key x every value).
INT_KEYS = [
    "data.seqlen",
    "data.nsamples",
    "data.batch_size",
    "data.val_windows",
    "eval.max_windows",
    "eval.batch_size",
    "eval.task_batch_size",
    "eval.speed_repeats",
    "trainer.max_steps",
    "tune.checkpoint_every",
    "adapter.rows",
    "model.seed",
    "model.hidden_size",
    "pruner.batch_size",
]
BAD_INTS = ["nan", "inf", "1.5", "abc", "true", "''", "[1]"]
FLOAT_KEYS = [
    "sparsity",
    "tune.lr",
    "tune.weight_decay",
    "tune.warmup_ratio",
    "adapter.alpha",
    "adapter.dropout",
    "pruner.owl_m",
    "pruner.owl_lambda",
]
BAD_FLOATS = ["nan", "inf", "-inf", "abc", "true", "''", "[0.1]"]
BOOL_KEYS = [
    "export.enabled",
    "overwrite",
    "eval.dense",
    "eval.pruned",
    "eval.speed",
    "tune.gradient_checkpointing",
    "pruner.true_sequential",
    "pruner.use_variant",
    "pruner.allow_empty",
    "adapter.grouped",
]
BAD_BOOLS = ["'false'", "'no'", "off", "1", "0", "''", "null"]
GENERATED = [
    *([f"{k}={v}"] for k in INT_KEYS for v in BAD_INTS),
    *([f"{k}={v}"] for k in FLOAT_KEYS for v in BAD_FLOATS),
    *([f"{k}={v}"] for k in BOOL_KEYS for v in BAD_BOOLS),
]
# Settings Lightning, the logger or a later stage would only refuse with a traceback, and degenerate ones.
LATER = [
    ["trainer.val_check_interval=0"],
    ["trainer.val_check_interval=1.5"],
    ["trainer.accumulate_grad_batches=0"],
    ["trainer.gradient_clip_val=nan"],
    ["trainer.gradient_clip_val=-1"],
    ["trainer.limit_val_batches=-1"],
    ["pruner.device=meta"],
    ["device=meta"],
    ["device=null"],
    ["device=cuda:99"],
    ["cpu_linear=fast"],
    ["cpu_linear=null"],
    ["pruner=sparsegpt", "pruner.percdamp=inf"],
    ["logger.save_dir=/proc/x"],
    ["logger.version=../../x"],
    ["logger.name=/abs"],
    ["paths.output_dir=''"],
    ["model.hidden_size=60"],  # head size 15: rotary embeddings need an even one
    ["adapter.alpha=1e30"],
    ["adapter.alpha=0"],
    ["adapter=masked_lora", "adapter.r=100000"],
    ["adapter=lora", "adapter.r=100000"],
    ["eval.speed=true", "eval.speed_prefill_tokens=100000"],
    ["tune.lrr=0.1"],
    ["seed=\u0663"],
    ["sparsity=0.5,0.6"],
    ["pruner.use_variant=true", "sparsity=0.99"],  # zeroes whole matrices: stopped after pruning
    ["model=hf", "model.trust_remote_code='false'"],
]


def file_cases(tmp_path) -> list[list[str]]:
    """Bad files: a file as the cache folder, model folders that are empty, lack a tokenizer, have a
    config.json of the wrong shape or damaged weights, an Alpaca file nested 100,000 deep."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    tokenizer = {"tokenizer_config.json": "{}"}
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 300,
    }
    folders = {
        "no-tokenizer": {"config.json": json.dumps(config), "model.safetensors": "x"},
        "wrong-typed": {
            "config.json": json.dumps({**config, "hidden_size": "big"}),
            **tokenizer,
            "model.safetensors": "x",
        },
        "no-weights": {"config.json": json.dumps(config), **tokenizer},
        "zero-length": {"config.json": json.dumps(config), **tokenizer, "model.safetensors": ""},
        "bad-header": {"config.json": json.dumps(config), **tokenizer, "model.safetensors": "\xff" * 64},
    }
    cases = [[f"paths.cache_dir={a_file}"], ["model=hf", f"model.name_or_path={empty}"]]
    for name, files in folders.items():
        folder = tmp_path / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        cases.append(["model=hf", f"model.name_or_path={folder}"])
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    cases.append([f"data.tuning={deep}"])
    return cases


DRIVER = r"""
import contextlib, io, json, runpy, sys
base, cases, root = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
report = []
for i, case in enumerate(cases):
    out = io.StringIO()
    code = 0
    sys.argv = ["run.py", *base, f"hydra.run.dir={root}/{i}", f"paths.cache_dir={root}/cache", *case]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path("run.py", run_name="__main__")  # as `python run.py ...` does
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as err:  # anything escaping the entry point is itself a failure
            import traceback
            out.write("ESCAPED " + "".join(traceback.format_exception(err)))
            code = -1
    report.append({"case": case, "code": code, "output": out.getvalue()})
print(json.dumps(report))
"""


SHARES = 4  # each hostile command line goes to exactly one share: case i to share i % SHARES


def all_cases(tmp_path) -> list[list[str]]:
    return [*CASES, *GENERATED, *LATER, *file_cases(tmp_path / "files")]


def test_at_least_200_hostile_command_lines_in_shares_of_50(tmp_path):
    cases = all_cases(tmp_path)
    assert len(cases) >= 200
    assert all(len(cases[share::SHARES]) >= 50 for share in range(SHARES))


@pytest.mark.slow
@pytest.mark.parametrize("share", range(SHARES))
def test_hostile_command_lines_end_with_one_clear_line_and_write_nothing(tmp_path, text_file, share):
    base = tiny_run_overrides(text_file)
    cases = all_cases(tmp_path)[share::SHARES]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(base), json.dumps(cases), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == len(cases)
    problems = []
    for i, entry in enumerate(report):
        case, output = " ".join(entry["case"]), entry["output"]
        errors = [line for line in output.splitlines() if line.startswith("sppx: error: ")]
        if entry["code"] not in (1, 2):
            problems.append(f"{case}: exit {entry['code']}")
        if "Traceback" in output or "ESCAPED" in output:
            problems.append(f"{case}: traceback\n{output[-1500:]}")
        elif len(errors) != 1:
            problems.append(f"{case}: {len(errors)} error lines\n{output[-800:]}")
        run_dir = tmp_path / str(i)
        if entry["code"] == 2 and run_dir.exists():
            problems.append(f"{case}: bad input wrote {sorted(p.name for p in run_dir.iterdir())}")
        results = run_dir / "results.json"
        if results.exists() and json.loads(results.read_text()).get("status") == "complete":
            problems.append(f"{case}: results.json claims success")
        if (run_dir / "model").exists():
            problems.append(f"{case}: a model/ was written")
    print(f"{len(cases)} hostile command lines (share {share}), each ended in one error line")
    assert not problems, f"{len(problems)} of {len(cases)} cases:\n" + "\n".join(problems)

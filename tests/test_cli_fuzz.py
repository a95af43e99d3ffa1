"""Malformed command lines: each ends with one clear error line, no traceback, and no output directory
that claims success. The cases run through ``run.py``'s own entry point inside one subprocess (one
interpreter start for all of them)."""

import json
import subprocess
import sys
from pathlib import Path

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

DRIVER = r"""
import contextlib, io, json, runpy, sys
base, cases, root = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
report = []
for i, case in enumerate(cases):
    out = io.StringIO()
    code = 0
    sys.argv = ["run.py", *base, *case, f"hydra.run.dir={root}/{i}", f"paths.cache_dir={root}/cache"]
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


def test_malformed_overrides_end_with_one_clear_line_and_claim_nothing(tmp_path, text_file):
    base = tiny_run_overrides(text_file)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(base), json.dumps(CASES), str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == len(CASES)
    problems = []
    for i, entry in enumerate(report):
        case, output = " ".join(entry["case"]), entry["output"]
        errors = [
            line
            for line in output.splitlines()
            # ours, or Hydra's for keys that are not in the config at all
            if line.startswith("sppx: error: ") or line.startswith("Could not override ")
        ]
        if entry["code"] == 0:
            problems.append(f"{case}: accepted")
        if "Traceback" in output or "ESCAPED" in output:
            problems.append(f"{case}: traceback\n{output[-1500:]}")
        elif not errors:
            problems.append(f"{case}: no error line\n{output[-800:]}")
        run_dir = tmp_path / str(i)
        results = run_dir / "results.json"
        if results.exists() and json.loads(results.read_text()).get("status") == "complete":
            problems.append(f"{case}: results.json claims success")
        if (run_dir / "model").exists():
            problems.append(f"{case}: a model/ was written")
    assert not problems, "\n".join(problems)

"""Zero-shot tasks through the lm-evaluation-harness, on the model object in memory (no re-load).

``eval.tasks`` names the tasks. Each entry is one of:

- ``sppx_wiki_cloze``: the task that ships with sppx, built from the evaluation part of the embedded
  Wikipedia text (so it is disjoint from the calibration and tuning text): two sentences of an article,
  then the choice between the sentence that follows and three other sentences of the same article,
  scored by log-likelihood (``acc``, and length-normalised ``acc_norm``). Built once into the cache as a
  JSONL file plus a task YAML that the harness's own command line reads too
  (``lm_eval --include_path <dir> --tasks sppx_wiki_cloze``).
- a path to a task YAML of the user's (``dataset_path: json`` with ``dataset_kwargs.data_files``; relative
  data paths are read from the YAML's folder);
- a task of the harness (``boolq``, ``rte``, ``hellaswag``, ``winogrande``, ``arc_easy``, ``arc_challenge``,
  ``openbookqa``, ...), whose dataset must be reachable (online, or in the Hugging Face cache).

Tasks are loaded in the plan, before any weights are read: a task whose dataset cannot be loaded
fails the run with one line naming it, unless it is listed in ``eval.tasks_optional`` (then it is
skipped and reported).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from sppx.errors import ConfigError, first_line
from sppx.files import discard_cache, read_cache, write_cache

log = logging.getLogger(__name__)

WIKI_CLOZE = "sppx_wiki_cloze"
WIKI_CLOZE_VERSION = 1  # bump when the way items are built changes (the cache is keyed by it)
WIKI_CLOZE_ITEMS = 400
CHOICES = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


# --------------------------------------------------------------------------- the shipped task
def sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """An article's sentences (split after . ! ? before a capital), those of a usable length."""
    out = []
    for paragraph in text.split("\n"):
        for s in _SENTENCE_END.split(paragraph.strip()):
            s = s.strip()
            if min_words <= len(s.split()) <= max_words:
                out.append(s)
    return out


def cloze_items(documents: list[str], items: int = WIKI_CLOZE_ITEMS, seed: int = 0) -> list[dict]:
    """Multiple-choice continuation items: ``context`` = two consecutive sentences, ``choices`` = the
    sentence that follows them and ``CHOICES - 1`` sentences of the same document at least three
    sentences away, in a seeded random order; ``label`` = the index of the true continuation.
    Candidate positions are taken evenly over all documents so that every article contributes."""
    rng = random.Random(seed)
    candidates = []  # (document index, position of the true continuation)
    per_doc = [sentences(d) for d in documents]
    for di, sents in enumerate(per_doc):
        if len(sents) >= 2 + CHOICES + 6:
            candidates += [(di, i) for i in range(2, len(sents))]
    if not candidates:
        return []
    count = min(items, len(candidates))
    out = []
    for di, i in (candidates[k * len(candidates) // count] for k in range(count)):
        sents = per_doc[di]
        far = [j for j in range(len(sents)) if abs(j - i) >= 3]
        distractors = [sents[j] for j in rng.sample(far, CHOICES - 1)]
        choices = [sents[i], *distractors]
        order = list(range(CHOICES))
        rng.shuffle(order)
        out.append(
            {
                "context": f"{sents[i - 2]} {sents[i - 1]}",
                "choices": [choices[k] for k in order],
                "label": order.index(0),
            }
        )
    return out


def task_yaml(name: str, data_file: Path) -> dict:
    """An lm-eval multiple-choice task over a JSONL file of ``{context, choices, label}`` records."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": WIKI_CLOZE_VERSION},
    }


def write_task(directory: Path, name: str, records: list[dict]) -> Path:
    """Write ``<name>.yaml`` and ``<name>.jsonl`` into ``directory`` (atomically, each with its digest
    beside it); return the YAML path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    write_cache(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    path = directory / f"{name}.yaml"
    write_cache(path, yaml.safe_dump(task_yaml(name, data.resolve()), sort_keys=False))
    return path


def wiki_cloze_task(cache_dir: Path) -> Path:
    """The ``sppx_wiki_cloze`` task YAML in the cache, built from the embedded Wikipedia text's
    evaluation part (default split) the first time. The cached files are used only when their digests
    match and the YAML is exactly what sppx writes (a tampered or truncated file is rebuilt)."""
    from sppx.data import WikiText

    corpus = WikiText()
    directory = Path(cache_dir) / "tasks" / f"{WIKI_CLOZE}-v{WIKI_CLOZE_VERSION}-{corpus.fingerprint()[:12]}"
    path, data = directory / f"{WIKI_CLOZE}.yaml", directory / f"{WIKI_CLOZE}.jsonl"
    expected = yaml.safe_dump(task_yaml(WIKI_CLOZE, data.resolve()), sort_keys=False)
    if read_cache(data) is None or read_cache(path) != expected:
        discard_cache(path)
        records = cloze_items(corpus.parts(cache_dir)["evaluation"])
        path = write_task(directory, WIKI_CLOZE, records)
    return path


# --------------------------------------------------------------------------- templates
def sandbox_templates() -> None:
    """Render every lm-eval prompt template in Jinja2's immutable sandbox: a task file is data, and a
    template that reaches for Python internals (``cycler.__init__.__globals__.os``) raises a
    SecurityError instead of running. The harness renders through one module-level environment."""
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from lm_eval import utils

    if isinstance(utils.env, ImmutableSandboxedEnvironment):
        return
    env = ImmutableSandboxedEnvironment(
        loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True
    )
    env.filters.update(utils.env.filters)
    utils.env = env


def check_templates(task, key: str, entry: str) -> None:
    """Render a task's prompt templates on its first document, so a template the sandbox refuses
    (or that names a field the data lacks) fails in the plan, in one line."""
    from jinja2.exceptions import SecurityError, TemplateError

    try:
        doc = next(iter(task.eval_docs), None)
    except Exception:  # documents that cannot be listed are the harness's business at evaluation
        return
    if doc is None:
        return
    try:
        task.doc_to_text(doc)
        task.doc_to_target(doc)
        if getattr(task, "OUTPUT_TYPE", None) == "multiple_choice":
            task.doc_to_choice(doc)
    except SecurityError as err:
        raise ConfigError(key, entry, f"its template is refused by the sandbox: {first_line(err)}") from None
    except TemplateError as err:
        raise ConfigError(key, entry, f"its template does not render: {first_line(err)}") from None


# --------------------------------------------------------------------------- loading tasks
@dataclass
class Tasks:
    """The loaded lm-eval Task objects by name, where each came from, and the optional ones skipped."""

    tasks: dict[str, object] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # name -> "sppx", a YAML path, or "lm-eval"
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why

    def __bool__(self) -> bool:
        return bool(self.tasks)


def _quiet_harness() -> None:
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def read_task_yaml(path: Path) -> dict:
    """A task YAML as a dict, with relative ``dataset_kwargs.data_files`` made relative to its folder."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(
            "eval.tasks", str(path), f"could not read the task YAML: {first_line(err)}"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise ConfigError("eval.tasks", str(path), "a task YAML must be a mapping with a 'task' name")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:

        def resolve(p):
            return p if Path(p).is_absolute() else str((path.parent / p).resolve())

        config["dataset_kwargs"]["data_files"] = (
            {k: resolve(v) if isinstance(v, str) else [resolve(x) for x in v] for k, v in files.items()}
            if isinstance(files, dict)
            else resolve(files)
            if isinstance(files, str)
            else [resolve(x) for x in files]
        )
    return config


def _task_spec(entry: str, cache_dir: Path) -> tuple[str | dict, str]:
    """(what TaskManager.load takes, the source) for one ``eval.tasks`` entry."""
    if entry == WIKI_CLOZE:
        path = wiki_cloze_task(cache_dir)
        return read_task_yaml(path), str(path)
    if entry.endswith((".yaml", ".yml")):
        path = Path(entry).expanduser()
        if not path.is_file():
            raise ConfigError("eval.tasks", entry, "no such task YAML file")
        return read_task_yaml(path), str(path)
    return entry, "lm-eval"


def load_tasks(required: list[str], optional: list[str], cache_dir: Path) -> Tasks:
    """Load every task (datasets included); a required one that cannot be loaded raises ConfigError."""
    out = Tasks()
    if not required and not optional:
        return out
    _quiet_harness()
    sandbox_templates()
    from jinja2.exceptions import SecurityError
    from lm_eval.tasks import TaskManager

    managers: dict[bool, TaskManager] = {}

    def manager(builtin: bool) -> TaskManager:
        if builtin not in managers:  # the harness's own index takes seconds to build: only when needed
            managers[builtin] = TaskManager(include_defaults=builtin)
        return managers[builtin]

    for entry in [*required, *(t for t in optional if t not in required)]:
        is_required = entry in required
        spec, source = _task_spec(entry, cache_dir)
        name = spec["task"] if isinstance(spec, dict) else spec
        if isinstance(spec, str) and spec not in manager(True).all_tasks:
            raise ConfigError(
                "eval.tasks" if is_required else "eval.tasks_optional",
                entry,
                f"is not a task of lm-eval, {WIKI_CLOZE}, or a path to a task YAML",
            )
        try:
            with _no_progress():
                loaded = manager(isinstance(spec, str)).load([spec])["tasks"]
        except SecurityError as err:
            raise ConfigError(
                "eval.tasks" if is_required else "eval.tasks_optional",
                entry,
                f"its template is refused by the sandbox: {first_line(err)}",
            ) from None
        except Exception as err:
            why = f"its dataset could not be loaded ({first_line(err)})"
            if not is_required:
                log.warning("zero-shot task %s skipped: %s", name, why)
                out.skipped[name] = why
                continue
            raise ConfigError(
                "eval.tasks",
                entry,
                f"{why}: connect to the internet or put it in the Hugging Face cache, or move it to "
                "eval.tasks_optional to skip it when missing",
            ) from None
        for task_name, task in loaded.items():
            check_templates(task, "eval.tasks" if is_required else "eval.tasks_optional", entry)
            out.tasks[task_name] = task
            out.sources[task_name] = source
    return out


@contextlib.contextmanager
def _no_progress():
    """The harness and datasets print progress bars while loading; keep the run's log readable."""
    try:
        import datasets

        was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        if was:
            datasets.utils.logging.enable_progress_bar()


# --------------------------------------------------------------------------- evaluating
@contextlib.contextmanager
def _own_rng():
    """The harness seeds python, numpy and torch itself: leave the run's random streams untouched."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@torch.no_grad()
def evaluate_tasks(
    model: nn.Module, tokenizer, tasks: Tasks, batch_size: int = 8, limit: int | None = None
) -> dict[str, dict]:
    """``{task: {"acc": ..., "acc_norm": ..., "acc_stderr": ..., "samples": n}}`` of ``model`` as it is
    now (the harness's HFLM wraps the live object; no copy, no re-load)."""
    if not tasks:
        return {}
    _quiet_harness()
    sandbox_templates()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with _own_rng():
            out = simple_evaluate(
                model=lm,
                tasks=list(tasks.tasks.values()),
                # The tasks are loaded already; without a manager the harness indexes all of its own.
                task_manager=TaskManager(include_defaults=False),
                limit=limit,
                log_samples=False,
                bootstrap_iters=1000,  # only for metrics without a closed-form stderr (acc has one)
            )
    finally:
        model.train(was_training)
        model.config.use_cache = use_cache
    results = {}
    for name in tasks.tasks:
        row = out["results"].get(name, {})
        entry = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in row:
                entry[metric] = float(row[f"{metric},none"])
                stderr = row.get(f"{metric}_stderr,none")
                entry[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, int | float) else None
        entry["samples"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0)) or None
        results[name] = entry
    return results


def mean_accuracy(results: dict[str, dict]) -> float | None:
    """The mean ``acc`` over the tasks that report one."""
    accs = [r["acc"] for r in results.values() if "acc" in r]
    return sum(accs) / len(accs) if accs else None

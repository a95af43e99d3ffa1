"""Files are data, never code: task templates render in a sandbox, cached files are believed only when
their digests match (a tampered, truncated or swapped cache is rebuilt), and written files and folders
get the permissions of the user's umask."""

import json
import os
import stat

import pytest
import yaml

from sppx.data import TextFiles
from sppx.errors import ConfigError
from sppx.files import DIGEST_SUFFIX, make_temp_folder, read_cache, write_cache, write_json_atomic
from sppx.zeroshot import WIKI_CLOZE, evaluate_tasks, load_tasks, wiki_cloze_task, write_task
from tests.conftest import SAMPLE_TEXT

PAYLOAD = "{{ cycler.__init__.__globals__.os.system('touch %s') }}{{context}}"


def toy_records(n: int = 6) -> list[dict]:
    return [{"context": f"Item {i} is", "choices": [f"a {i}.", f"b {i}."], "label": i % 2} for i in range(n)]


def poisoned_task(folder, marker) -> object:
    path = write_task(folder, "toy_mc", toy_records())
    config = yaml.safe_load(path.read_text())
    config["doc_to_text"] = PAYLOAD % marker
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_task_template_cannot_run_shell_commands(tmp_path):
    pytest.importorskip("lm_eval")
    marker = tmp_path / "pwned"
    path = poisoned_task(tmp_path / "task", marker)
    with pytest.raises(ConfigError, match="sandbox"):
        load_tasks([str(path)], [], tmp_path)
    assert not marker.exists()


def test_the_sandbox_also_guards_evaluation(tmp_path, tiny):
    """Even a task object whose template changed after loading renders inside the sandbox."""
    pytest.importorskip("lm_eval")
    from jinja2.exceptions import SecurityError

    model, tokenizer = tiny
    marker = tmp_path / "pwned"
    tasks = load_tasks([str(write_task(tmp_path / "task", "toy_mc", toy_records()))], [], tmp_path)
    tasks.tasks["toy_mc"].config.doc_to_text = PAYLOAD % marker
    with pytest.raises(SecurityError):
        evaluate_tasks(model, tokenizer, tasks, batch_size=2)
    assert not marker.exists()


@pytest.mark.slow
def test_a_poisoned_cached_task_is_rebuilt_not_run(tmp_path):
    pytest.importorskip("lm_eval")
    marker = tmp_path / "pwned"
    path = wiki_cloze_task(tmp_path)
    original = path.read_text()
    config = yaml.safe_load(original)
    config["doc_to_text"] = PAYLOAD % marker
    path.write_text(yaml.safe_dump(config))  # write access to the cache folder, no digest update
    tasks = load_tasks([WIKI_CLOZE], [], tmp_path)
    assert WIKI_CLOZE in tasks.tasks and not marker.exists()
    assert path.read_text() == original
    # Updating the digest too is not enough: the YAML must be exactly what sppx writes.
    write_cache(path, yaml.safe_dump(config))
    load_tasks([WIKI_CLOZE], [], tmp_path)
    assert path.read_text() == original and not marker.exists()


def test_tampered_truncated_or_swapped_split_caches_are_rebuilt(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(SAMPLE_TEXT)
    corpus = TextFiles(paths=[str(text)])
    parts = corpus.parts(tmp_path)
    (cache,) = (tmp_path / "data").glob("*.json")
    assert (cache.parent / (cache.name + DIGEST_SUFFIX)).is_file()
    swapped = dict(parts, evaluation=parts["tuning"], tuning=parts["evaluation"])
    for damage in (
        json.dumps(swapped),  # valid JSON, parts swapped: the digest no longer matches
        cache.read_text()[: len(cache.read_text()) // 2],  # truncated
        "",  # empty
    ):
        cache.write_text(damage)
        assert corpus.parts(tmp_path) == parts
        assert json.loads(cache.read_text()) == parts
    # A digest that matches but content sppx never writes (a part missing) is refused too.
    write_cache(cache, json.dumps({"evaluation": parts["evaluation"]}))
    assert corpus.parts(tmp_path) == parts


def test_read_cache_needs_the_digest(tmp_path):
    path = tmp_path / "x.json"
    write_cache(path, "[1, 2]")
    assert read_cache(path) == "[1, 2]"
    (tmp_path / ("x.json" + DIGEST_SUFFIX)).unlink()
    assert read_cache(path) is None and not path.exists()


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        folder = make_temp_folder(tmp_path / "model")
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        os.umask(0o077)
        write_json_atomic(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("flag", ["'false'", "'no'", "'off'", "'true'", "1", "'0'"])
def test_remote_code_needs_the_boolean_true(tmp_path, flag):
    """A folder whose config names its own code: a string or number flag is refused in the plan and the
    folder's code never runs."""
    from sppx.pipeline import plan
    from tests.conftest import compose_config

    folder, marker = tmp_path / "model", tmp_path / "ran"
    folder.mkdir()
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = {"model_type": "custom_x", "auto_map": {"AutoConfig": "custom.CustomConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    overrides = ["model=hf", f"model.name_or_path={folder}", f"model.trust_remote_code={flag}"]
    with pytest.raises(ConfigError, match=r"^model\.trust_remote_code=.*: must be true or false$"):
        plan(compose_config(overrides, tmp_path / "run"))
    assert not marker.exists()

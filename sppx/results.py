"""A run's ``results.json``: where it is and how to read it back."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS_FILE = "results.json"


def read_results(path: Path, complete_only: bool = True) -> dict | None:
    """The results in ``path`` (a results.json or a run directory), or None when there are none, they
    cannot be read, or (``complete_only``) the run did not complete (its status says failed or
    interrupted)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict):
        return None
    if complete_only and results.get("status", "complete") != "complete":
        return None
    return results

"""One run: load -> measure dense -> prune -> measure pruned -> tune -> merge -> measure final -> speed
-> report -> export.

``plan(cfg)`` builds and checks everything the config selects without touching weights, so bad input
fails in seconds with one line; ``execute(plan)`` runs the enabled stages (``flow.STAGES``) on one run
state and returns the results dict that is also written to ``results.json``.

- ``planning.py``: the Plan, building components from config groups, the checks;
- ``stages.py``: the stages, each with ``enabled(plan)``, ``check(plan)`` and ``run(state)``;
- ``state.py``: what the stages hand each other; ``report.py``: results.json and failure records;
- ``tuning.py``: the Lightning part of the tuning stage; ``resume.py``: checkpoints a run continues from.
"""

from sppx.pipeline.flow import STAGES, execute, objective, plan, process_rank, run
from sppx.pipeline.planning import Plan, build

__all__ = ["STAGES", "Plan", "build", "execute", "objective", "plan", "process_rank", "run"]

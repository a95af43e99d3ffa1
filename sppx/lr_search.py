"""Choosing a learning rate on the validation split: a log grid, extended while its best point sits at
an edge, so the pick is never a grid's last value that was still improving.

Each method of a comparison gets its own search (its own grid); the pick is the lr with the lowest
validation score, and only then is its test score read. A run that failed (diverged) scores infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


def next_lr(grid: list[float], best: float) -> float | None:
    """One more point beyond ``best`` when it is the lowest or highest of ``grid`` (the grid's log
    spacing at that edge, 3 significant digits); None when ``best`` is inside the grid, the grid has
    fewer than two points, or the next point would not be below 1."""
    grid = sorted(grid)
    if len(grid) < 2 or best not in (grid[0], grid[-1]):
        return None
    lr = grid[-1] ** 2 / grid[-2] if best == grid[-1] else grid[0] ** 2 / grid[1]
    lr = float(f"{lr:.3g}")
    return lr if 0 < lr < 1 else None


@dataclass
class GridSearch:
    """One method's search: ``grid`` (lrs), the validation ``scores`` measured so far, and at most
    ``max_extend`` points added beyond an edge."""

    grid: list[float]
    max_extend: int = 2
    scores: dict[float, float] = field(default_factory=dict)
    extended: int = 0

    def __post_init__(self):
        self.grid = sorted(float(lr) for lr in self.grid)
        if not self.grid or any(not 0 < lr < 1 for lr in self.grid):
            raise ValueError(f"a learning-rate grid needs values in (0, 1), got {self.grid}")

    def pending(self) -> list[float]:
        return [lr for lr in self.grid if lr not in self.scores]

    def record(self, lr: float, score: float | None) -> None:
        """The validation score of ``lr`` (None or not finite: the run failed)."""
        ok = score is not None and math.isfinite(score)
        self.scores[lr] = float(score) if ok else math.inf

    @property
    def best(self) -> float | None:
        """The lr with the lowest score (the smaller lr on a tie); None before any score."""
        scored = [lr for lr in self.grid if lr in self.scores]
        return min(scored, key=lambda lr: (self.scores[lr], lr)) if scored else None

    def extend(self) -> bool:
        """Add the next point beyond the best one when it sits at an edge; True if one was added."""
        best = self.best
        if best is None or self.pending() or self.extended >= self.max_extend:
            return False
        if not math.isfinite(self.scores[best]):
            return False
        lr = next_lr(self.grid, best)
        if lr is None or lr in self.grid:
            return False
        self.grid = sorted([*self.grid, lr])
        self.extended += 1
        return True


def search(
    searches: dict[Hashable, GridSearch],
    evaluate: Callable[[list[tuple[Hashable, float]]], dict[tuple[Hashable, float], float | None]],
) -> dict[Hashable, float | None]:
    """Run every search to its end: ``evaluate`` gets all the (key, lr) points that are due at once
    (so they can run in parallel) and returns their validation scores. Returns each key's best lr."""
    while True:
        due = [(key, lr) for key, s in searches.items() for lr in s.pending()]
        if not due:
            extended = [s.extend() for s in searches.values()]
            if not any(extended):
                break
            continue
        scores = evaluate(due)
        for key, lr in due:
            searches[key].record(lr, scores.get((key, lr)))
    return {key: s.best for key, s in searches.items()}

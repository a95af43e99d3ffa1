"""The tuning data loader: a seeded shuffle that resumes mid-epoch and splits each batch across processes.

- **Order**: exactly ``DataLoader(shuffle=True, generator=Generator().manual_seed(seed))``: the same
  ``RandomSampler`` and ``BatchSampler`` over the same generator.
- **Resume**: Lightning saves the loader's ``state_dict()`` (the generator's state when the current
  epoch started) in every checkpoint and restores it before iterating again; the batches of that
  epoch that the restored run already trained on (Lightning's restored batch progress) are skipped
  without being loaded. A resumed run therefore sees the batches an uninterrupted run would.
- **Several processes** (DDP): every process draws the same global batches and takes its slice
  ``batch[rank::world]``, so ``world`` processes together train on the global batches one process
  would (``data.batch_size`` is the global batch).
"""

from __future__ import annotations

from torch import Generator
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler


class RankSlices(Sampler):
    """Global batches from ``batches``, each cut to this process's slice; the first ``skip`` are
    passed over once (a resumed epoch)."""

    def __init__(self, batches: BatchSampler, rank: int = 0, world: int = 1, skip: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.batches, self.rank, self.world, self.skip = batches, rank, world, skip

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.batches):
            if i >= skip:
                yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.batches)  # the whole epoch: Lightning counts the skipped batches as done


class ResumableLoader(DataLoader):
    """A DataLoader whose state (for Lightning's checkpoints) is its generator's state at the start of
    the current epoch."""

    def __iter__(self):
        self._epoch_start = self.generator.get_state()
        return super().__iter__()

    def state_dict(self) -> dict:
        start = getattr(self, "_epoch_start", None)
        return {"generator": start if start is not None else self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def batches_done_this_epoch(trainer) -> int:
    """Batches of the current epoch that a restored Lightning run has already trained on (0 otherwise).
    ``processed``, not ``completed``: a checkpoint written at a batch's end counts it as processed but
    not yet completed (Lightning completes it when the loop restarts, after the loader is built)."""
    if trainer is None or not trainer.fit_loop.restarting:
        return 0
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def tuning_loader(dataset, batch_size: int, seed: int, trainer=None, collate_fn=None) -> ResumableLoader:
    """The shuffled tuning loader for ``trainer`` (its rank, world size and restored position)."""
    generator = Generator().manual_seed(seed)
    drop_last = len(dataset) >= batch_size
    batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last)
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    sampler = RankSlices(batches, rank, world, skip=batches_done_this_epoch(trainer))
    return ResumableLoader(dataset, batch_sampler=sampler, generator=generator, collate_fn=collate_fn)

"""Length-grouped batches that survive a killed run: a mid-epoch resume sees exactly the rest.

How Lightning 2.6 resumes data (lightning/pytorch/loops/fit_loop.py, utilities/combined_loader.py):
on checkpoint, `FitLoop.on_save_checkpoint` stores `CombinedLoader._state_dicts()`, i.e.
`loader.state_dict()` for every train dataloader that is `_Stateful` (has `state_dict` and
`load_state_dict`); on resume, `FitLoop.setup_data` calls `loader.load_state_dict(...)` *before*
it creates the iterator. A plain `DataLoader` is not `_Stateful`, so Lightning warns and restarts
the epoch from its first batch. `ResumableDataLoader` below is `_Stateful`: it counts the batches
it has handed out (counted as they leave the loader, so worker prefetching does not inflate the
count; Lightning does not prefetch when the loader has a length) and on load skips that many
batches of the same epoch's order, without collating them.

The epoch number (seeding the shuffle) is counted by the loader itself - each new pass over it is
a new epoch - and saved with the state, so it does not depend on `set_epoch` being reachable.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader

from pmetal.errors import PmetalError


def _replica() -> tuple[int, int]:
    """(rank, world size) of this process under torch.distributed, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochBatchSampler:
    """Base: a list of batches (lists of row indices) per epoch, iterated from a start batch.

    Under torch.distributed each rank takes every world-size-th batch (all ranks get the same
    number), so the Trainer must not inject its own sampler (`use_distributed_sampler=False`).
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.start = 0

    def batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Make the next iteration yield epoch `epoch`'s batches from batch `start` on."""
        self.epoch, self.start = epoch, start

    def _local(self, epoch: int) -> list[list[int]]:
        batches = self.batches(epoch)
        rank, world = _replica()
        if world == 1:
            return batches
        return batches[rank::world][: len(batches) // world]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._local(self.epoch)[self.start:]

    def __len__(self) -> int:
        return len(self._local(self.epoch))


class LengthGroupedBatchSampler(EpochBatchSampler):
    """Batches of rows of similar length, in a deterministic shuffled order per (seed, epoch).

    The rows are shuffled, cut into mega-batches of `batch_size * group_factor` rows, each sorted by
    length and cut into batches; the batch order is then shuffled, and the batch holding the longest
    row goes first so that an out-of-memory error shows at step 1, not hours later.

    Args:
        lengths: token count of every row.
        batch_size: rows per batch.
        seed: base seed; epoch `e` uses `seed + e`, so a rerun with the same seed repeats it.
        shuffle: False gives fixed length-sorted batches (for validation).
        drop_last: drop a final batch smaller than `batch_size` (before the order is shuffled).
        group_factor: how many batches' worth of rows are sorted together; larger = less padding,
            less randomness.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 42, shuffle: bool = True,
                 drop_last: bool = False, group_factor: int = 50) -> None:
        super().__init__()
        if batch_size < 1:
            raise PmetalError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.drop_last, self.group_factor = drop_last, group_factor
        self._cache: tuple[int, list[list[int]]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and (self._cache[0] == epoch or not self.shuffle):
            return self._cache[1]
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + epoch)
        if self.shuffle:
            rng.shuffle(order)
            group = self.batch_size * self.group_factor
        else:
            group = len(order) or 1
        result = []
        for g in range(0, len(order), group):
            chunk = sorted(order[g:g + group], key=lambda i: -self.lengths[i])
            result += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            result = [b for b in result if len(b) == self.batch_size]
        if self.shuffle and result:
            rng.shuffle(result)
            longest = max(range(len(result)), key=lambda b: max(self.lengths[i] for i in result[b]))
            result.insert(0, result.pop(longest))
        self._cache = (epoch, result)
        return result


class ShuffledBatchSampler(EpochBatchSampler):
    """Fixed batches (e.g. packing bins) in a deterministic shuffled order per (seed, epoch)."""

    def __init__(self, fixed_batches: Sequence[Sequence[int]], *, seed: int = 42, shuffle: bool = True) -> None:
        super().__init__()
        self.fixed = [list(b) for b in fixed_batches]
        self.seed, self.shuffle = seed, shuffle

    def batches(self, epoch: int) -> list[list[int]]:
        if not self.shuffle:
            return self.fixed
        order = list(self.fixed)
        random.Random(self.seed + epoch).shuffle(order)
        return order


class ResumableDataLoader(DataLoader):
    """A DataLoader over an `EpochBatchSampler` with `state_dict`/`load_state_dict` for resuming.

    Args:
        dataset: a map-style dataset (a list works).
        batch_sampler: the `EpochBatchSampler` that orders the batches.
        first_epoch: the epoch number of the first pass (the trainer's current epoch when the
            loader is rebuilt mid-training, e.g. with `reload_dataloaders_every_n_epochs`).
        **kwargs: passed to `DataLoader` (collate_fn, num_workers, pin_memory, ...).
    """

    def __init__(self, dataset: Any, batch_sampler: EpochBatchSampler, *, first_epoch: int = 0, **kwargs: Any) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._epoch = first_epoch - 1  # the epoch of the pass in progress (or last finished)
        self._yielded = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, so Lightning's early
        # `iter()` call (before load_state_dict) does not start an epoch.
        if self._resume is not None:
            self._epoch, self._yielded = self._resume
            self._resume = None
        else:
            self._epoch, self._yielded = self._epoch + 1, 0
        sampler: EpochBatchSampler = self.batch_sampler
        sampler.set_position(self._epoch, self._yielded)
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def state_dict(self) -> dict[str, int]:
        """Where the run is: the epoch in progress and how many of its batches were handed out."""
        return {"epoch": max(self._epoch, 0), "batches_yielded": self._yielded,
                "num_batches": len(self.batch_sampler)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next pass continues `state`'s epoch after its `batches_yielded` batches."""
        num_batches = len(self.batch_sampler)
        if state.get("num_batches", num_batches) != num_batches:
            raise PmetalError(f"the checkpoint's training data had {state['num_batches']} batches per epoch, this "
                              f"run has {num_batches}: resume with the same data, batch size and max_seq_len")
        epoch, done = int(state["epoch"]), int(state["batches_yielded"])
        self._resume = (epoch + 1, 0) if done >= num_batches else (epoch, done)

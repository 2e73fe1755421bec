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


def shard_batch(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous part of a global batch split into `world` near-equal parts."""
    size, extra = divmod(len(batch), world)
    start = rank * size + min(rank, extra)
    return list(batch[start:start + size + (rank < extra)])


class EpochBatchSampler:
    """Base: a list of global batches (lists of row indices) per epoch, iterated from a start batch.

    Subclasses build *global* batches of `batch_size × world size` rows; under torch.distributed
    each rank takes its own contiguous part of every global batch (`shard_batch`), so N processes
    with `batch_size` B train on exactly the batches one process with `batch_size` N·B would, and
    every rank makes the same number of steps (a final global batch with fewer rows than ranks is
    dropped). The Trainer must therefore not inject its own sampler (`use_distributed_sampler=False`).

    Args:
        rank, num_replicas: this process's place among the data-parallel processes; None asks
            torch.distributed when the sampler is iterated ((0, 1) without a process group).
    """

    batch_size = 1

    def __init__(self, *, rank: int | None = None, num_replicas: int | None = None) -> None:
        self.epoch = 0
        self.start = 0
        self.rank, self.num_replicas = rank, num_replicas

    def replica(self) -> tuple[int, int]:
        if self.num_replicas is not None:
            return self.rank or 0, self.num_replicas
        return _replica()

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.replica()[1]

    def batches(self, epoch: int) -> list[list[int]]:
        """The global batches of epoch `epoch` (each `global_batch_size` rows, the last maybe fewer)."""
        raise NotImplementedError

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Make the next iteration yield epoch `epoch`'s batches from batch `start` on."""
        self.epoch, self.start = epoch, start

    def _local(self, epoch: int) -> list[list[int]]:
        batches = self.batches(epoch)
        rank, world = self.replica()
        if world == 1:
            return batches
        return [shard_batch(b, rank, world) for b in batches if len(b) >= world]

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
                 drop_last: bool = False, group_factor: int = 50, rank: int | None = None,
                 num_replicas: int | None = None) -> None:
        super().__init__(rank=rank, num_replicas=num_replicas)
        if batch_size < 1:
            raise PmetalError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.drop_last, self.group_factor = drop_last, group_factor
        self._cache: tuple[int, int, list[list[int]]] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        size = self.global_batch_size
        if self._cache is not None and self._cache[:2] == (size, epoch if self.shuffle else 0):
            return self._cache[2]
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + epoch)
        if self.shuffle:
            rng.shuffle(order)
            group = size * self.group_factor
        else:
            group = len(order) or 1
        result = []
        for g in range(0, len(order), group):
            chunk = sorted(order[g:g + group], key=lambda i: -self.lengths[i])
            result += [chunk[b:b + size] for b in range(0, len(chunk), size)]
        if self.drop_last:
            result = [b for b in result if len(b) == size]
        if self.shuffle and result:
            rng.shuffle(result)
            longest = max(range(len(result)), key=lambda b: max(self.lengths[i] for i in result[b]))
            result.insert(0, result.pop(longest))
        self._cache = (size, epoch if self.shuffle else 0, result)
        return result


class ShuffledBatchSampler(EpochBatchSampler):
    """Fixed global batches (e.g. packing bins) in a deterministic shuffled order per (seed, epoch)."""

    def __init__(self, fixed_batches: Sequence[Sequence[int]], *, seed: int = 42, shuffle: bool = True,
                 rank: int | None = None, num_replicas: int | None = None) -> None:
        super().__init__(rank=rank, num_replicas=num_replicas)
        self.fixed = [list(b) for b in fixed_batches]
        self.seed, self.shuffle = seed, shuffle

    def batches(self, epoch: int) -> list[list[int]]:
        if not self.shuffle:
            return self.fixed
        order = list(self.fixed)
        random.Random(self.seed + epoch).shuffle(order)
        return order


class RandomBatchSampler(EpochBatchSampler):
    """Rows in a deterministic shuffled order per (seed, epoch), cut into global batches.

    On one process the batches are exactly those of `DataLoader(shuffle=True,
    generator=torch.Generator().manual_seed(seed))` epoch after epoch (the loaders pmetal used
    before), so single-device runs keep their data order.

    Args:
        num_rows: rows in the dataset.
        batch_size: rows per batch and per rank.
        seed: base seed; epoch `e` uses `seed + e`.
        shuffle: False keeps file order (validation, precomputing).
        drop_last: drop a final global batch smaller than `batch_size × world size`.
    """

    def __init__(self, num_rows: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int | None = None, num_replicas: int | None = None) -> None:
        super().__init__(rank=rank, num_replicas=num_replicas)
        if batch_size < 1:
            raise PmetalError(f"batch_size must be at least 1, got {batch_size}")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self._perm: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        import torch

        if self._perm is not None and self._perm[0] == epoch:
            return self._perm[1]
        # per epoch, a DataLoader draws its workers' base seed, then RandomSampler one permutation
        # for the epoch and one more (for a remainder it leaves empty) when the epoch is exhausted
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            perm = torch.randperm(self.num_rows, generator=generator).tolist()
            torch.randperm(self.num_rows, generator=generator)
        self._perm = (epoch, perm)
        return perm

    def batches(self, epoch: int) -> list[list[int]]:
        order = self._permutation(epoch) if self.shuffle else list(range(self.num_rows))
        size = self.global_batch_size
        result = [order[b:b + size] for b in range(0, len(order), size)]
        return [b for b in result if len(b) == size] if self.drop_last else result


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
        import torch

        # A DataLoader without a generator draws its workers' base seed from the global RNG at each
        # `iter()`: a resumed run would then draw once more than the uninterrupted one did.
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
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
        """Where the run is: the epoch in progress and how many of its (global) batches were handed out."""
        sampler: EpochBatchSampler = self.batch_sampler
        return {"epoch": max(self._epoch, 0), "batches_yielded": self._yielded, "num_batches": len(sampler),
                "global_batch_size": sampler.global_batch_size, "world_size": sampler.replica()[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next pass continues `state`'s epoch after its `batches_yielded` batches.

        A step consumes one global batch on every rank, so a run resumes on another number of
        processes exactly when its global batch (batch size × processes) is the checkpoint's.
        """
        sampler: EpochBatchSampler = self.batch_sampler
        saved_global = state.get("global_batch_size", sampler.global_batch_size)
        world = sampler.replica()[1]
        if state.get("world_size", world) != world and saved_global != sampler.global_batch_size:
            raise PmetalError(
                f"the checkpoint was written with a global batch of {saved_global} rows (or packed bins) "
                f"({state.get('world_size', 1)} process(es) × {saved_global // max(state.get('world_size', 1), 1)}), "
                f"this run's is {sampler.global_batch_size} ({world} × {sampler.batch_size}): resume on the same "
                f"number of devices, or set the batch size so that batch size × devices = {saved_global}")
        num_batches = len(sampler)
        if state.get("num_batches", num_batches) != num_batches:
            raise PmetalError(f"the checkpoint's training data had {state['num_batches']} batches per epoch, this "
                              f"run has {num_batches}: resume with the same data, batch size and max_seq_len")
        epoch, done = int(state["epoch"]), int(state["batches_yielded"])
        self._resume = (epoch + 1, 0) if done >= num_batches else (epoch, done)

"""`PmetalDataModule`: what every pmetal DataModule shares, written once.

- `setup()` runs once (`prepare()` is the subclass's work) however often Lightning or a command
  calls it;
- `held_out_split`: the validation rows held out of the training file when there is no eval file,
  with one rule for the edge cases (see there);
- `chat_tokenizer`: the tokenizer (given, or the training module's) with the chat template set;
- `resumable_loader`: a `ResumableDataLoader` (mid-epoch resume, see `pmetal.data.sampler`) whose
  batches are sharded per rank: each process trains on its own contiguous part of every global
  batch, so N processes with batch size B see what one process with batch size N·B would;
- `replica()`: the per-rank sharding hook, (rank, world size) from the Trainer (or
  torch.distributed); validation and precomputing loaders stay whole on every rank;
- `random_state()` / `load_random_state()`: random draws a DataModule makes during training
  (DAPO's extra prompts), saved per rank by `pmetal.callbacks.checkpoint.RngCheckpoint`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import lightning as L

from pmetal.data.sampler import EpochBatchSampler, RandomBatchSampler, ResumableDataLoader, _replica
from pmetal.errors import DataError

log = logging.getLogger("pmetal")
T = TypeVar("T")


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(None, f"val_fraction {val_fraction} is out of range", expected="a number in [0, 1)")


def held_out_split(items: Sequence[T], val_fraction: float, seed: int, *, path: Optional[str] = None
                   ) -> tuple[list[T], list[T]]:
    """(train, validation) with `val_fraction` of `items` held out at random (by `seed`), file order kept.

    A positive fraction holds out at least one item and always leaves at least one for training;
    a single item is kept for training (without validation, with a warning).
    """
    items = list(items)
    if val_fraction <= 0 or not items:
        return items, []
    if len(items) == 1:
        log.warning("%s: a single example; training on it without a validation split", path or "data")
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(items) * val_fraction)), len(items) - 1)
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


class PmetalDataModule(L.LightningDataModule):
    """Base of pmetal's DataModules (see the module docstring); subclasses implement `prepare()`."""

    seed: int = 0
    num_workers: int = 0
    _set_up = False

    def setup(self, stage: Optional[str] = None) -> None:
        if self._set_up:
            return
        self.prepare()
        self._set_up = True

    def prepare(self) -> None:
        """Read, validate, split and tokenize the data (once)."""
        raise NotImplementedError

    def chat_tokenizer(self) -> Any:
        """The tokenizer to render with (given, or the training module's), with `chat_template` applied."""
        from pmetal.data.render import datamodule_tokenizer, ensure_chat_template

        self.tokenizer = tokenizer = datamodule_tokenizer(self)
        ensure_chat_template(tokenizer, getattr(self, "chat_template", None))
        return tokenizer

    # ------------------------------------------------------------------ distributed
    def replica(self) -> tuple[int, int]:
        """(rank, world size) of this process among the data-parallel processes."""
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return _replica()

    def resumable_loader(self, items: Sequence[Any], collate_fn: Callable, *, batch_size: int = 1,
                         shuffle: bool = True, drop_last: bool = False, sharded: Optional[bool] = None,
                         batch_sampler: Optional[EpochBatchSampler] = None) -> ResumableDataLoader:
        """A resumable loader over `items`: shuffled per (seed, epoch) and sharded per rank when training.

        Args:
            batch_sampler: a sampler of its own (SFT's length-grouped batches); else rows are
                shuffled (or kept in order) and cut into global batches of `batch_size` × ranks.
            sharded: split every global batch across the ranks; default: when `shuffle` (training).
        """
        sharded = shuffle if sharded is None else sharded
        rank, world = self.replica() if sharded else (0, 1)
        if batch_sampler is None:
            batch_sampler = RandomBatchSampler(len(items), batch_size, seed=self.seed, shuffle=shuffle,
                                               drop_last=drop_last)
        batch_sampler.rank, batch_sampler.num_replicas = rank, world
        first_epoch = self.trainer.current_epoch if self.trainer is not None and shuffle else 0
        return ResumableDataLoader(items, batch_sampler, collate_fn=collate_fn, num_workers=self.num_workers,
                                   persistent_workers=self.num_workers > 0, first_epoch=first_epoch)

    # ------------------------------------------------------------------ random draws
    def random_state(self) -> dict[str, Any]:
        """This rank's state of the random draws the DataModule makes while training."""
        return {}

    def load_random_state(self, state: dict[str, Any]) -> None:
        """Restore what `random_state()` returned (on the same rank)."""

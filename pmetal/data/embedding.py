"""Embedding-training data: pairs, scored pairs and triplets, their batches and the DataModule.

| layout   | fields of a row                                                                      |
|----------|--------------------------------------------------------------------------------------|
| pairs    | `anchor`/`positive`, `query`/`positive`, `sentence1`/`sentence2` or `text_a`/`text_b`  |
| scored   | a pair plus a numeric `score` or `label` (for CoSENT and Spearman evaluation)          |
| triplets | a pair plus `negative` (a string) or `negatives` (a list of strings, the same number   |
|          | in every row) as hard negatives                                                       |

Files are JSONL, JSON, Parquet or CSV/TSV (read by `pmetal.data.formats.load_rows`). Every row
must have the layout of the first row; a missing or empty text, a non-numeric score or a score
outside `score_range` raises a `DataError` naming the file, row and field.

A batch keeps the texts (the module tokenizes them with its own tokenizer) and adds integer ids
from text identity (`anchor_ids`, `positive_ids`, `negative_ids`): equal texts get equal ids, so
the InfoNCE loss can leave duplicated documents out of an anchor's negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from pmetal.data.base import PmetalDataModule, check_val_fraction, held_out_split
from pmetal.data.formats import load_rows, require_string, row_error
from pmetal.errors import DataError

PAIR_FIELDS: tuple[tuple[str, str], ...] = (
    ("anchor", "positive"),
    ("query", "positive"),
    ("sentence1", "sentence2"),
    ("text_a", "text_b"),
)
SCORE_FIELDS = ("score", "label")
LAYOUTS = ("pairs", "scored", "triplets")
#: which data layouts each loss can train on
LOSS_LAYOUTS: dict[str, tuple[str, ...]] = {
    "infonce": ("pairs", "triplets"),
    "triplet": ("triplets",),
    "cosent": ("scored",),
}
LAYOUT_HELP = (
    "pairs (anchor/positive, query/positive, sentence1/sentence2 or text_a/text_b), scored pairs "
    "(a pair plus 'score' or 'label'), or triplets (a pair plus 'negative' or a list 'negatives')"
)


@dataclass(frozen=True)
class EmbeddingExample:
    """One normalized row: an anchor, its positive, optional hard negatives, optional score."""

    anchor: str
    positive: str
    negatives: tuple[str, ...] = ()
    score: Optional[float] = None


@dataclass(frozen=True)
class Layout:
    kind: str  # one of LAYOUTS
    first: str
    second: str
    score_field: Optional[str] = None
    negative_field: Optional[str] = None  # "negative" (a string) or "negatives" (a list)


def detect_layout(rows: Sequence[dict], *, path: str | None = None) -> Layout:
    """Tell pairs, scored pairs and triplets apart from the first row's columns."""
    if not rows:
        raise DataError(path, "no rows", expected="at least one row")
    keys = set(rows[0])
    pair = next(((a, b) for a, b in PAIR_FIELDS if a in keys and b in keys), None)
    if pair is None:
        found = ", ".join(sorted(map(str, keys))) or "(none)"
        raise row_error(rows, 0, f"cannot tell the embedding data layout from the columns: {found}",
                        expected=LAYOUT_HELP, path=path)
    negative = next((f for f in ("negative", "negatives") if f in keys), None)
    score = next((f for f in SCORE_FIELDS if f in keys), None)
    if negative and score:
        raise row_error(rows, 0, f"row has both '{negative}' and '{score}'", expected=LAYOUT_HELP, path=path)
    kind = "triplets" if negative else "scored" if score else "pairs"
    return Layout(kind, pair[0], pair[1], score, negative)


def _score(rows, i: int, name: str, score_range, path) -> float:
    value = rows[i].get(name)
    if isinstance(value, bool) or value is None:
        got = "missing" if value is None else f"a boolean ({value})"
        raise row_error(rows, i, f"score is {got}", field=name, expected="a number", path=path)
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise row_error(rows, i, f"score {value!r} is not a number", field=name, expected="a number",
                        path=path) from None
    if not math.isfinite(number):
        raise row_error(rows, i, f"score is {number}", field=name, expected="a finite number", path=path)
    if score_range is not None and not score_range[0] <= number <= score_range[1]:
        low, high = score_range
        raise row_error(rows, i, f"score {number:g} is out of range", field=name,
                        expected=f"a number in [{low:g}, {high:g}] (set score_range to change it)", path=path)
    return number


def _negatives(rows, i: int, name: str, count: int | None, path) -> tuple[str, ...]:
    if name == "negative":
        return (require_string(rows, i, name, path=path),)
    value = rows[i].get(name)
    if not isinstance(value, (list, tuple)) or not value:
        got = "missing" if value is None else "an empty list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
        raise row_error(rows, i, f"negatives are {got}", field=name, expected="a non-empty list of strings", path=path)
    if count is not None and len(value) != count:
        raise row_error(rows, i, f"row has {len(value)} negatives, the first row has {count}", field=name,
                        expected=f"{count} negatives in every row", path=path)
    texts = []
    for k, text in enumerate(value):
        if not isinstance(text, str) or not text.strip():
            got = "empty" if isinstance(text, str) else f"a {type(text).__name__}"
            raise row_error(rows, i, f"negative is {got}", field=f"{name}[{k}]", expected="a non-empty string",
                            path=path)
        texts.append(text)
    return tuple(texts)


def to_embedding_examples(
    rows: Sequence[dict],
    *,
    score_range: Optional[tuple[float, float]] = (0.0, 5.0),
    path: str | None = None,
) -> tuple[str, list[EmbeddingExample]]:
    """Detect the layout and normalize every row. Returns (layout kind, examples)."""
    layout = detect_layout(rows, path=path)
    examples = []
    count = None
    for i in range(len(rows)):
        anchor = require_string(rows, i, layout.first, path=path)
        positive = require_string(rows, i, layout.second, path=path)
        negatives: tuple[str, ...] = ()
        score = None
        if layout.negative_field:
            negatives = _negatives(rows, i, layout.negative_field, count, path)
            count = len(negatives)
        if layout.score_field:
            score = _score(rows, i, layout.score_field, score_range, path)
        examples.append(EmbeddingExample(anchor, positive, negatives, score))
    return layout.kind, examples


def load_embedding_examples(
    path: str | Path, *, score_range: Optional[tuple[float, float]] = (0.0, 5.0)
) -> tuple[str, list[EmbeddingExample]]:
    """Read a data file (see `load_rows`) into (layout kind, examples)."""
    return to_embedding_examples(load_rows(path), score_range=score_range, path=str(path))


def check_loss_layout(loss: str, kind: str, path: str | Path | None = None) -> None:
    """A `DataError` when the data layout cannot train the loss (e.g. CoSENT on unscored pairs)."""
    if loss not in LOSS_LAYOUTS:
        raise DataError(None, f"unknown loss {loss!r}", expected=", ".join(LOSS_LAYOUTS))
    if kind not in LOSS_LAYOUTS[loss]:
        need = " or ".join(LOSS_LAYOUTS[loss])
        raise DataError(path, f"loss '{loss}' cannot train on {kind}", expected=f"{need}; {LAYOUT_HELP}")


def check_informative_batches(loss: str, datamodule: Any) -> None:
    """A `DataError` when every training batch would give the loss nothing to learn from.

    InfoNCE on pairs takes its negatives from the other rows of the batch: one row per batch (batch
    size 1, or a 1-row file) has none, and the loss is 0 at every step. CoSENT ranks the pairs of a
    batch by their scores: a batch of one pair, or scores that are all equal, has nothing to rank.
    """
    examples = datamodule.train_examples
    batch_size = min(int(datamodule.hparams.batch_size), len(examples))
    path = datamodule.path
    if loss == "infonce" and datamodule.kind == "pairs" and batch_size < 2:
        raise DataError(path, f"InfoNCE on pairs needs at least 2 rows per batch for in-batch negatives; with "
                        f"{len(examples)} training row(s) and batch size {datamodule.hparams.batch_size} the loss "
                        "is 0 at every step", expected="--batch-size 2 or more and at least 2 training rows, "
                        "or triplets (hard negatives)")
    if loss == "cosent":
        if batch_size < 2:
            raise DataError(path, "CoSENT compares the scores of pairs within a batch; one pair per batch has "
                            "nothing to compare", expected="--batch-size 2 or more and at least 2 training rows")
        if datamodule.hparams.shuffle:
            groups = [examples]
        else:
            groups = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        if all(len({e.score for e in group}) < 2 for group in groups):
            raise DataError(path, "every training batch has all-equal scores, so CoSENT has nothing to rank and "
                            "its loss is constant", expected="scored pairs with different scores")


def collate_embedding_examples(examples: Sequence[EmbeddingExample]) -> dict[str, Any]:
    """A batch: the texts, ids from text identity, and the scores if the rows have them.

    Keys: `anchor` [B] str, `positive` [B] str, `anchor_ids`/`positive_ids` [B] long; with hard
    negatives `negatives` (K lists of B texts: column k is every row's k-th negative) and
    `negative_ids` [B,K] long; with scores `score` [B] float32.
    """
    ids: dict[str, int] = {}

    def text_id(text: str) -> int:
        return ids.setdefault(text, len(ids))

    batch: dict[str, Any] = {
        "anchor": [e.anchor for e in examples],
        "positive": [e.positive for e in examples],
        "anchor_ids": torch.tensor([text_id(e.anchor) for e in examples], dtype=torch.long),
        "positive_ids": torch.tensor([text_id(e.positive) for e in examples], dtype=torch.long),
    }
    num_negatives = len(examples[0].negatives)
    if num_negatives:
        if any(len(e.negatives) != num_negatives for e in examples):
            raise ValueError("every example of a batch must have the same number of negatives")
        batch["negatives"] = [[e.negatives[k] for e in examples] for k in range(num_negatives)]
        batch["negative_ids"] = torch.tensor([[text_id(n) for n in e.negatives] for e in examples], dtype=torch.long)
    if examples[0].score is not None:
        batch["score"] = torch.tensor([e.score for e in examples], dtype=torch.float32)
    return batch


def default_embedding_dataset() -> Path:
    """The example pairs shipped with pmetal (made-up codes and their descriptions)."""
    import pmetal.examples

    return Path(pmetal.examples.__file__).parent / "data" / "embed.jsonl"


class EmbeddingDataModule(PmetalDataModule):
    """Pairs, scored pairs or triplets for embedding training, with an optional held-out set.

    Args:
        path: the training file (JSONL/JSON/Parquet/CSV) or directory; see `LAYOUT_HELP`. None:
            pmetal's example pairs (made-up codes and their descriptions).
        eval_path: a held-out file for evaluation (retrieval recall/MRR for pairs and triplets,
            triplet accuracy for triplets, Spearman for scored pairs).
        val_fraction: without `eval_path`, hold out this fraction of the training rows (chosen
            with `seed`); 0 means no evaluation.
        batch_size: rows per training batch (InfoNCE's in-batch negatives grow with it).
        eval_batch_size: rows per evaluation batch (None: `batch_size`).
        score_range: allowed [low, high] of scores; None accepts any finite number.
        shuffle: shuffle the training rows every epoch.
        drop_last: drop a last, smaller training batch (fewer in-batch negatives).
        num_workers: DataLoader worker processes.
        seed: seed of the held-out split and of the per-epoch shuffle.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        eval_path: Optional[str] = None,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        score_range: Optional[tuple[float, float]] = (0.0, 5.0),
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        check_val_fraction(val_fraction)
        self.save_hyperparameters()
        self.seed, self.num_workers = seed, num_workers
        self.path = str(path) if path else str(default_embedding_dataset())
        self.kind: str | None = None
        self.eval_kind: str | None = None
        self.train_examples: list[EmbeddingExample] = []
        self.eval_examples: list[EmbeddingExample] = []

    def prepare(self) -> None:
        hp = self.hparams
        self.kind, examples = load_embedding_examples(self.path, score_range=hp.score_range)
        if hp.eval_path:
            self.eval_kind, self.eval_examples = load_embedding_examples(hp.eval_path, score_range=hp.score_range)
        else:
            examples, self.eval_examples = held_out_split(examples, hp.val_fraction, hp.seed, path=self.path)
            self.eval_kind = self.kind if self.eval_examples else None
        self.train_examples = examples

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        self.setup("fit")
        return self.resumable_loader(self.train_examples, collate_embedding_examples, batch_size=hp.batch_size,
                                     shuffle=hp.shuffle, drop_last=hp.drop_last, sharded=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("fit")
        if not self.eval_examples:
            return []
        hp = self.hparams
        # whole on every rank: retrieval metrics rank each query against the whole held-out corpus
        return self.resumable_loader(self.eval_examples, collate_embedding_examples,
                                     batch_size=hp.eval_batch_size or hp.batch_size, shuffle=False)

"""User-facing errors.

A user mistake (a bad data file, a wrong flag, a model without what the method needs) raises one of
these. The CLI prints the message and exits with status 2: no traceback from deep inside a library.
"""

from __future__ import annotations

from pathlib import Path


class PmetalError(Exception):
    """An error the user can fix; its message says what was wrong and what was expected."""


class DataError(PmetalError, ValueError):
    """A problem in a data file, located by file, row (or line) and field.

    `row` is 1-based: the line number for JSONL, the row number (after the header) for CSV and
    Parquet, the element index + 1 for a JSON array.
    """

    def __init__(
        self,
        path: str | Path | None,
        message: str,
        *,
        row: int | None = None,
        field: str | None = None,
        expected: str | None = None,
        line: bool = False,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.row = row
        self.field = field
        self.expected = expected
        where = []
        if self.path:
            where.append(self.path)
        if row is not None:
            where.append(f"{'line' if line else 'row'} {row}")
        if field is not None:
            where.append(f"field '{field}'")
        text = ", ".join(where)
        text = f"{text}: {message}" if text else message
        if expected:
            text += f"\n  expected: {expected}"
        super().__init__(text)


class NonFiniteLossError(PmetalError):
    """Training produced a NaN or infinite loss/gradient."""


def non_finite_error(trainer, what: str) -> NonFiniteLossError:
    """The error raised when the loss or gradients stop being finite, naming step and checkpoint."""
    last = "none was written yet"
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if path:
            last = path
            break
    return NonFiniteLossError(
        f"{what} at step {trainer.global_step} (epoch {trainer.current_epoch}); training stopped before the "
        f"update. The last good checkpoint is kept: {last}. Try a lower learning rate, fp32/bf16 instead of "
        "fp16, or check the data for empty completions."
    )

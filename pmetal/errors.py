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


def encoding_error(path: str | Path) -> DataError:
    """A `DataError` naming the line and byte offset of the first byte of `path` that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start
        line = data.count(b"\n", 0, at) + 1
        column = at - (data.rfind(b"\n", 0, at) + 1)
        return DataError(path, f"byte 0x{data[at]:02x} at byte offset {at} (byte {column + 1} of the line) is not "
                         "valid UTF-8; expected UTF-8 text (convert it, e.g. iconv -f latin1 -t utf-8 FILE)",
                         row=line, line=True)
    return DataError(path, "the file is not valid UTF-8", expected="UTF-8 text")


class NonFiniteLossError(PmetalError):
    """Training produced a NaN or infinite loss/gradient."""


class Interrupted(BaseException):
    """The process received SIGINT or SIGTERM. A BaseException, as KeyboardInterrupt is, so that no
    `except Exception` swallows it while `finally` blocks (temporary outputs) still run.

    Raised by training at the end of the step the signal arrived in, after the checkpoint of that
    step (`checkpoint`, None when none exists) was written (`saved`), with the run folder; or at once
    outside training, with only the signal. `exit_code` is the shell's 128 + signal number.
    """

    def __init__(self, signum: int, *, step: int | None = None, checkpoint: Path | None = None,
                 saved: bool = False, run_dir: Path | None = None) -> None:
        import signal

        self.signum, self.step, self.checkpoint, self.saved, self.run_dir = signum, step, checkpoint, saved, run_dir
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    @property
    def during_training(self) -> bool:
        return self.run_dir is not None

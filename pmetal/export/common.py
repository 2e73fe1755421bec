"""What every exporter shares: the output path check, the temporary-path-then-rename write, the
table of formats and the quantizations each one has."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pmetal.atomic import atomic_output  # noqa: F401 - the exporters' temporary-path-then-rename write
from pmetal.errors import PmetalError

FORMATS = ("coreml", "gguf", "hf")
# format -> weight dtypes it writes (the first is the default)
DTYPES = {
    "hf": ("float32", "bfloat16", "float16"),
    "gguf": ("f16", "f32", "bf16"),
    "coreml": ("float16",),
}
# format -> --quantize values it has
QUANTIZATIONS = {
    "hf": (),
    # the block types beyond q8_0/q4_0 are kept only where they beat q4_0's agreement in llama.cpp
    # (benchmarks/RESULTS.md, SmolLM2 dithered off its Q4_1 grid: q4_0 68.1%, q4_1 76.5%, q5_1 81.3%)
    "gguf": ("q8_0", "q5_1", "q4_1", "q4_0"),
    "coreml": ("int8", "int4", "palettize4", "palettize8"),
}

# `pmetal merge --adapters --method`: PEFT add_weighted_adapter combination types (pmetal/export/merge.py)
MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "svd", "cat")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")  # those that trim to --density
EQUAL_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")  # those that combine factors entrywise


class ExportError(PmetalError):
    """An export that cannot be done as asked; the message says what is supported."""


def check_options(fmt: str, dtype: str | None, quantize: str | None) -> str:
    """Validate format, dtype and quantization together; returns the dtype to use."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS[fmt]:
        have = ", ".join(QUANTIZATIONS[fmt]) or "none"
        raise ExportError(f"--format {fmt} has no quantization {quantize!r}; it supports: {have}")
    if dtype is None:
        return DTYPES[fmt][0]
    if dtype not in DTYPES[fmt]:
        raise ExportError(f"--format {fmt} has no dtype {dtype!r}; it supports: {', '.join(DTYPES[fmt])}")
    return dtype


def check_out(out: str | Path, force: bool) -> Path:
    """The output path, refused when it exists unless `force` (then it is replaced on success), or
    when its folder cannot be written (found now, not after minutes of loading)."""
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it, or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".pmetal-write-test.", dir=out.parent))
    except OSError as exc:
        raise not_writable(out, exc) from None
    return out


# bytes a weight takes in each written dtype or quantization (a q8_0 block: 32 int8 + one fp16 scale)
BYTES_PER_WEIGHT = {"float32": 4, "f32": 4, "bfloat16": 2, "float16": 2, "f16": 2, "bf16": 2, "q8_0": 34 / 32,
                    "q4_0": 18 / 32, "int8": 1, "int4": 0.5, "palettize8": 1, "palettize4": 0.5}
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def not_writable(out: Path, exc: OSError) -> ExportError:
    return ExportError(f"--out {out}: {exc.strerror or exc} (in {out.parent}); expected a writable location")


@contextlib.contextmanager
def write_errors(out: Path, model: Any, written_as: str) -> Iterator[None]:
    """A full disk or an unwritable target while writing `out` becomes one line: what, where, the
    space the export needs (its weights as `written_as`) and what is free."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL:
            needed = sum(p.numel() for p in model.parameters()) * BYTES_PER_WEIGHT.get(written_as, 4)
            free = shutil.disk_usage(out.parent).free if out.parent.is_dir() else 0
            raise ExportError(f"--out {out}: disk full while writing the export ({exc.strerror}); it needs about "
                              f"{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free; nothing was written to --out; "
                              "expected room for it: free some space or choose another --out") from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise not_writable(out, exc) from None
        raise



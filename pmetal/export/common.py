"""What every exporter shares: the output path check, the temporary-path-then-rename write, the
table of formats and the quantizations each one has."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
    "gguf": ("q8_0", "q4_0"),
    "coreml": ("int8", "int4", "palettize4", "palettize8"),
}


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
    """The output path, refused when it exists unless `force` (then it is replaced on success)."""
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it, or choose another --out")
    return out


@contextlib.contextmanager
def atomic_output(out: str | Path, *, directory: bool) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it is renamed to `out` (replacing an older
    one), on failure it is removed, so a failed export leaves nothing at `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    staging = staging_dir if directory else staging_dir / out.name
    try:
        yield staging
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)

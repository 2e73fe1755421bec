"""What every exporter shares: the output path check, the temporary-path-then-rename write, the
table of formats and the quantizations each one has."""

from __future__ import annotations

from pathlib import Path

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



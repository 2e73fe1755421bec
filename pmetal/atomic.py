"""Writes that a kill cannot leave half-done: everything goes to a temporary path beside the target,
which is renamed onto it only once complete. A file is replaced in one rename; a directory that
already exists is first moved aside, so the final name never holds a partly written tree."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(out: str | Path, *, directory: bool) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it is renamed to `out` (replacing an older
    one), on failure it is removed, so a failed write leaves `out` as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    staging = staging_dir if directory else staging_dir / out.name
    aside = staging_dir.with_name(staging_dir.name + ".old")
    try:
        yield staging
        if out.is_dir() and not out.is_symlink():
            os.replace(out, aside)  # a rename cannot put a directory over a non-empty one
        elif directory and out.exists():
            out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`Path(path).write_text(text)`, but a kill leaves the old file or the new one, never a part."""
    with atomic_output(path, directory=False) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)

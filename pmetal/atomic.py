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


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(*, directory: bool) -> int:
    """The mode a plain `mkdir`/`open` would give under the current umask (0755/0644 under 022);
    temporary paths are private (0700/0600) until they are renamed into place."""
    return (0o777 if directory else 0o666) & ~current_umask()


def apply_default_modes(root: Path) -> None:
    """Give `root` and everything under it the umask's modes. mkdtemp makes 0700 and some writers
    (safetensors) 0600, but an output is an ordinary file or folder: others may read it when the
    umask says so, as they may read a checkpoint."""
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not path.is_symlink():
            os.chmod(path, default_mode(directory=path.is_dir()))


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
        apply_default_modes(staging)
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

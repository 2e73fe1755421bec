"""One run per run folder: an OS file lock on `<run_dir>/.pmetal.lock`, held for the process's life.

Two runs writing into one folder mix their files (`last.ckpt` and `last-v1.ckpt`, the `final/` and
`metrics.csv` of whichever ends last). The lock is `fcntl.flock` (`msvcrt.locking` on Windows),
which the OS releases when the process ends however it ends (kill -9 included), so no stale marker
is ever left to refuse a later run. The holder writes its pid into the file, and a refused run
names it. Only the primary process of a multi-process run takes it: the processes Lightning or
torchrun start for the other devices share the folder by design.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pmetal.errors import PmetalError

log = logging.getLogger("pmetal")

LOCK_FILE = ".pmetal.lock"
# Set on the processes of a multi-process run; any of them non-zero means "not the primary process".
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")

# lock file path -> open descriptor holding its lock; kept open until the process ends
_held: dict[Path, int] = {}


class RunFolderInUse(PmetalError):
    """The run folder is locked by another live process."""


def is_primary_process() -> bool:
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # the first byte; the pid is written after it
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _still_held(lock: Path, fd: int) -> bool:
    """This process's descriptor still locks the file at `lock` (not one deleted and made anew)."""
    try:
        return os.fstat(fd).st_ino == os.stat(lock).st_ino
    except OSError:
        return False


def _holder_pid(lock: Path) -> str:
    try:
        with lock.open("rb") as f:
            f.seek(1)
            text = f.read(32).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return text or "unknown"


def hold_run_lock(run_dir: str | Path, flag: str = "--output-dir") -> Path | None:
    """Take the lock of `run_dir` (created if missing) for the rest of this process's life.

    A second call in the same process is a no-op. Raises `RunFolderInUse` naming `flag`, the folder
    and the holder's pid when another process holds it. Returns the lock file (None when not taken:
    a secondary process of a multi-process run).
    """
    if not is_primary_process():
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = (run_dir / LOCK_FILE).absolute()
    fd = _held.get(lock)
    if fd is not None and _still_held(lock, fd):
        return lock
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    if not _try_lock(fd):
        os.close(fd)
        raise RunFolderInUse(f"{flag} {run_dir} is in use by another pmetal run (pid {_holder_pid(lock)}); "
                             f"wait for it to end, stop it, or choose another {flag}")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f" {os.getpid()}\n".encode())  # byte 0 is the one Windows locks: the pid follows it
    _held[lock] = fd
    return lock

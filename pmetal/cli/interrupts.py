"""SIGINT and SIGTERM in the CLI: a clean stop, one line saying what happened, exit 128 + signal.

Outside training, SIGTERM raises `Interrupted` as Ctrl+C raises KeyboardInterrupt, so `finally`
blocks run and an export removes its hidden `.partial` folder (the default SIGTERM action ends
the process without them). Around `trainer.fit` both signals are forwarded to the run's
`InterruptCheckpoint` instead, which finishes the step, writes its checkpoint and stops. `message`
is the one line the CLI prints: the checkpoint and the exact command that resumes the run, or,
outside training, that nothing half-written was left.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from pmetal.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TRAINING_COMMANDS = ("train", "grpo", "rlkd", "online-dpo", "distill", "embed-train", "fit")
RUN_DIR_FLAGS = {"fit": "--trainer.default_root_dir", "validate": "--trainer.default_root_dir"}
# flags that must not reach the resume command, with whether they take a value
DROPPED_FLAGS = {"--overwrite": False, "--ckpt_path": True}


@contextlib.contextmanager
def _handlers(handler: Callable[[int, object], None], signals=STOP_SIGNALS) -> Iterator[None]:
    """`handler` for `signals` inside the block, the previous handlers after (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def sigterm_raises() -> contextlib.AbstractContextManager:
    """SIGTERM raises `Interrupted` (as SIGINT raises KeyboardInterrupt), so cleanups run."""
    return _handlers(_raise_interrupted, (signal.SIGTERM,))


def forwarded_to(request_stop: Callable[[int], None] | None) -> contextlib.AbstractContextManager:
    """SIGINT and SIGTERM call `request_stop(signum)` (the run's `InterruptCheckpoint.request_stop`)."""
    if request_stop is None:
        return contextlib.nullcontext()
    return _handlers(lambda signum, frame: request_stop(signum))


def resume_command(argv: list[str], run_dir: str | Path) -> str:
    """The command line that resumes the run `argv` started: the same flags without --overwrite (it
    would clear the run) or an earlier --resume/--ckpt_path, the run folder named, and --resume."""
    command, rest, kept, i = argv[0], argv[1:], [], 0
    while i < len(rest):
        arg = rest[i]
        name = arg.split("=", 1)[0]
        if name == "--resume" or name in DROPPED_FLAGS:
            takes_value = DROPPED_FLAGS.get(name, True) and "=" not in arg
            optional = name == "--resume"
            has_value = takes_value and i + 1 < len(rest) and not (optional and rest[i + 1].startswith("-"))
            i += 2 if has_value else 1
            continue
        kept.append(arg)
        i += 1
    flag = RUN_DIR_FLAGS.get(command, "--output-dir")
    if not any(a.split("=", 1)[0] == flag for a in kept):
        kept += [flag, str(run_dir)]
    return shlex.join(["pmetal", command, *kept, "--resume"])


def message(exc: Interrupted, argv: list[str]) -> str:
    """The one line printed for an interrupted command."""
    command = argv[0] if argv else "pmetal"
    if not exc.during_training or command not in TRAINING_COMMANDS:
        stage = "before training started; nothing was trained" if command in TRAINING_COMMANDS else (
            "no partial output was left behind")
        return f"pmetal: {command} interrupted by {exc.name}; {stage}"
    if exc.checkpoint is None:
        return (f"pmetal: {command} interrupted by {exc.name} at step {exc.step}, before any checkpoint; "
                f"nothing to resume: run it again with --overwrite")
    wrote = "wrote the checkpoint of this step" if exc.saved else "the newest checkpoint is"
    return (f"pmetal: {command} interrupted by {exc.name} at step {exc.step}; {wrote}: {exc.checkpoint}; "
            f"resume with: {resume_command(argv, exc.run_dir)}")

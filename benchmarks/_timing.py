"""Step timing shared by the benchmarks that set a pmetal module beside a TRL trainer (DPO, GRPO, RLOO,
Online DPO, GKD): one clock for both sides, driven by a Lightning callback or a TRL `TrainerCallback`,
and the worker subprocesses (one per trainer, so that peak memory is its own).

The clock synchronizes the device at both ends of every optimizer step, and methods wrapped with
`StepClock.wrap` add their own synchronized time to a named phase of the current step (the rollout,
the teacher's forward, ...), so each trainer's step splits into the same parts.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

WORKER_FLAG, WORK_FLAG = "--_worker", "--_work"
PROCESS_START = time.perf_counter()  # a worker's setup time (imports, model loads) runs from here to its first step


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float:
    """Peak GPU memory allocated on CUDA; the process's peak RSS elsewhere."""
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StepClock:
    """Wall time of each optimizer step, with named phases inside it.

    `steps` holds one dict per step: `step` (seconds), each phase's seconds and the counts added by
    `wrap`/`add`. `on_timed_start` runs as step `warmup` begins, `on_timed_end` as step `last` ends
    (a profiler's start and stop).
    """

    def __init__(self, device: str, warmup: int = 0, last: int | None = None,
                 on_timed_start: Callable[[], None] | None = None, on_timed_end: Callable[[], None] | None = None):
        self.device, self.warmup, self.last = device, warmup, last
        self.on_timed_start, self.on_timed_end = on_timed_start, on_timed_end
        self.steps: list[dict] = []
        self.current: dict = {}
        self.first_step_at: float | None = None
        self.overall_peak_gib = 0.0  # kept across the resets of `memory_phase`
        self._memory_phase: str | None = None

    def begin(self) -> None:
        sync(self.device)
        if len(self.steps) == self.warmup and self.on_timed_start:
            self.on_timed_start()
        self.current = {"t0": time.perf_counter()}
        if self.first_step_at is None:
            self.first_step_at = self.current["t0"]

    def end(self, **counts: float) -> None:
        sync(self.device)
        step = dict(self.current)
        step["step"] = time.perf_counter() - step.pop("t0")
        if self._memory_phase is not None:
            step[f"{self._memory_phase}_peak_gib"] = self._note_peak()
            self._memory_phase = None
        self.add_to(step, counts)
        self.steps.append(step)
        if self.last is not None and len(self.steps) == self.last and self.on_timed_end:
            self.on_timed_end()

    @staticmethod
    def add_to(step: dict, counts: dict) -> None:
        for name, value in counts.items():
            step[name] = step.get(name, 0) + value

    def add(self, **counts: float) -> None:
        self.add_to(self.current, counts)

    @contextlib.contextmanager
    def phase(self, name: str):
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.add(**{name: time.perf_counter() - t0})

    def wrap(self, owner, attribute: str, phase: str, counts: Callable[..., dict] | None = None) -> None:
        """Replace `owner.attribute` (a method) by one timed into `phase`; `counts(result)` adds to the step."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.phase(phase):
                result = original(*args, **kwargs)
            if counts is not None:
                self.add(**counts(result))
            return result

        setattr(owner, attribute, timed)

    def memory_phase(self, name: str) -> None:
        """From here to the step's end is phase `name` of the memory profile (CUDA only): records what is
        allocated as it starts (`NAME_held_gib`: what the step before it left alive) and its own peak
        (`NAME_peak_gib`), without losing the run's overall peak."""
        if self.device != "cuda":
            return
        import torch

        torch.cuda.synchronize()
        self._note_peak()
        self.current[f"{name}_held_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        self._memory_phase = name

    def _note_peak(self) -> float:
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30
        self.overall_peak_gib = max(self.overall_peak_gib, peak)
        return peak

    def run_peak_gib(self) -> float:
        """The run's peak: `peak_gib` of the device, across the resets of `memory_phase`."""
        return max(peak_gib(self.device), self.overall_peak_gib)

    def timed(self) -> list[dict]:
        """The steps after the warmup."""
        return self.steps[self.warmup:]

    def seconds(self) -> float:
        return sum(s["step"] for s in self.timed())

    def phase_means(self, *names: str) -> dict[str, float]:
        """Mean seconds per timed step of each phase, and of the rest of the step (`other`)."""
        timed = self.timed()
        n = max(len(timed), 1)
        means = {name: sum(s.get(name, 0.0) for s in timed) / n for name in names}
        means["other"] = self.seconds() / n - sum(means.values())
        return means

    def setup_seconds(self) -> float:
        """From the worker's start (imports, model loads, trainer set-up) to its first step."""
        return (self.first_step_at or time.perf_counter()) - PROCESS_START

    def lightning(self, counts: Callable[[dict], dict] | None = None):
        """A Lightning callback timing each training batch (one optimizer step); `counts(batch)` adds to it."""
        import lightning as L

        clock = self

        class LightningStepClock(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                clock.begin()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                clock.end(**(counts(batch) if counts else {}))

        return LightningStepClock()

    def trl(self):
        """A transformers `TrainerCallback` timing each optimizer step of a TRL trainer."""
        from transformers import TrainerCallback

        clock = self

        class TrlStepClock(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                clock.begin()

            def on_step_end(self, *args, **kwargs):
                clock.end()

        return TrlStepClock()


def add_worker_arguments(parser) -> None:
    """The hidden flags a benchmark's worker subprocess is started with."""
    import argparse

    parser.add_argument(WORKER_FLAG, dest="_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(WORK_FLAG, dest="_work", default=None, help=argparse.SUPPRESS)


def print_result(result: dict) -> None:
    """A worker's result, on the line `run_workers` reads."""
    print("RESULT " + json.dumps(result), flush=True)


def run_workers(script: str, argv: list[str] | None, names: list[str], work: Path) -> list[dict]:
    """Run `script` once per worker name (`--_worker NAME --_work WORK` added to the command line, less
    `--markdown`) and return each worker's result, or {"name", "error"} with the tail of its output
    (also printed to stderr)."""
    passthrough, raw = [], list(argv if argv is not None else sys.argv[1:])
    while raw:  # the workers only print their result
        arg = raw.pop(0)
        if arg == "--markdown":
            raw.pop(0) if raw else None
        elif not arg.startswith("--markdown="):
            passthrough.append(arg)
    results = []
    for name in names:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, script, *passthrough, WORKER_FLAG, name, WORK_FLAG, str(work)],
                              capture_output=True, text=True)
        line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            results.append(dict(name=name, error=" | ".join(tail)))
        else:
            results.append(dict(json.loads(line[len("RESULT "):]), worker_s=time.perf_counter() - t0))
            print(f"{name} done: {json.dumps(results[-1])}", file=sys.stderr, flush=True)  # partial runs still tell
    return results


def run_contenders(script: str, argv: list[str] | None, args, prepare, runners: dict) -> list[dict] | None:
    """The two halves of a pmetal-vs-peer benchmark's command line.

    In a worker (`--_worker NAME`): `runners[NAME](args, work/"model", work/"prompts.jsonl")`, its result
    printed for the parent; returns None. Otherwise: `prepare(args, work)` in a temporary folder, then
    every runner (or `args.only`) in its own worker process on those inputs; returns their results.
    """
    import tempfile

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args._worker:
        work = Path(args._work)
        print_result(runners[args._worker](args, work / "model", work / "prompts.jsonl"))
        return None
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        prepare(args, Path(tmp))
        return run_workers(script, argv, [args.only] if args.only else list(runners), Path(tmp))


def load_peer_model(model_dir: Path, device: str):
    """(model, tokenizer) for a peer trainer (TRL): bf16 on CUDA, fp32 on the CPU, sdpa attention, as pmetal's side runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa"),
            AutoTokenizer.from_pretrained(model_dir))

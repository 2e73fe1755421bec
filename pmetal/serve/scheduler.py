"""The serving scheduler: requests batched onto the rollout engine, one batch after another.

What it is, precisely: **micro-batching with early exit**, not per-round continuous batching. One
worker thread owns the model. When it is idle and a request arrives it waits `batch_window`
seconds (5 ms by default) for others, then runs every waiting request that shares the first one's
batch key (served model, temperature, top_p; a seeded request batches alone, so its seed
reproduces its answer) in one `RolloutEngine.generate` call, up to `max_batch` requests. Requests
that arrive while that call runs wait for the next call, which starts as soon as it returns. Each
row leaves as soon as it is finished for its client (stop token, stop string, its own `max_tokens`,
or its client gone): its tokens stop being decoded and sent, and once every row of the call is
finished the call is ended at the next round (`on_tokens` raises), so a short request never waits
for a long one's budget and a batch whose clients all left stops at once. The engine's own
compaction frees the rows it sees finish (stop tokens); rows ended by the server (stop strings,
`max_tokens` below the batch's, disconnects) keep computing until the call ends.

Why not per-round joining: the engine's round is specialised on one sampling setting and one
token budget (its `DecodeSpec`, which CUDA graphs are captured for), and its prompt rows are
prefilled together; joining a row mid-call would mean a prefill between rounds and per-row
sampling tensors inside the captured round, a change of the engine itself.

On CUDA (captured rounds) the rows are padded to a power of two and the budget rounded up to one,
and one engine is kept per (served model, rows), so each shape is captured once and replayed.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pmetal.generation import RolloutEngine, SamplingConfig

log = logging.getLogger("pmetal")


class QueueFull(Exception):
    """More requests than `max_concurrency + max_queue` are waiting or running."""


class _BatchDone(Exception):
    """Raised from `on_tokens` to end an engine call whose rows are all finished."""


@dataclass(eq=False)
class Job:
    """One request: `n` completions of one prompt; `emit(event)` is called on the worker thread.

    `texts` holds one `pmetal.serve.text.RowText` per row, fed on the worker thread (so a stop
    string ends its row at once). Events: `("delta", row, text)`, `("finish", row, reason)` with
    reason "stop" or "length", `("end", None, None)` once every row has finished,
    `("error", None, message)`.
    """

    model_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    seed: int | None
    emit: Callable[[tuple], None]
    texts: list
    cancelled: threading.Event = field(default_factory=threading.Event)
    lengths: list[int] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lengths, self.finished = [0] * self.n, [False] * self.n
        self._key = next(_SEEDED) if self.seed is not None else None

    @property
    def key(self) -> tuple:
        greedy = self.temperature == 0.0
        return (self.model_id, self.temperature, 1.0 if greedy else self.top_p, self._key)


_SEEDED = itertools.count()


class Scheduler:
    """Runs jobs on `models` (a `ServedModels`) in micro-batches on one worker thread (see the module docstring).

    Args:
        models: the served model and adapters; `activate(model_id)` selects one.
        stop_ids: token ids that end a completion.
        pad_token_id: the pad id.
        max_concurrency: the most requests generating at once (one engine call's requests).
        max_queue: the most requests waiting beyond those; `submit` raises QueueFull past both.
        batch_window: seconds an idle worker waits for more requests before starting a call.
        compile_decode: compile the engine's round (CUDA only; costs a compilation per shape).
    """

    def __init__(self, models, *, stop_ids, pad_token_id: int, max_concurrency: int = 32, max_queue: int = 256,
                 batch_window: float = 0.005, compile_decode: bool = False) -> None:
        self.models, self.stop_ids, self.pad_token_id = models, list(stop_ids), pad_token_id
        self.max_concurrency, self.max_queue, self.batch_window = max_concurrency, max_queue, batch_window
        self.compile_decode = compile_decode
        self.device = next(models.model.parameters()).device
        self.graphs = self.device.type == "cuda"
        self._engines: dict[tuple, RolloutEngine] = {}
        self._pending: list[Job] = []
        self._admitted: set[int] = set()
        self.running = 0
        self.batches, self.largest_batch = 0, 0  # engine calls so far, and the most requests in one
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="pmetal-serve", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- admission
    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._admitted) >= self.max_concurrency + self.max_queue:
                raise QueueFull(f"the server is full ({self.max_concurrency} requests running, "
                                f"{self.max_queue} waiting); retry later")
            self._admitted.add(id(job))
            self._pending.append(job)
            self._cond.notify()

    def release(self, job: Job) -> None:
        """Free `job`'s place (finished, failed or its client gone); its rows stop at the next round."""
        job.cancelled.set()
        with self._cond:
            self._admitted.discard(id(job))
            if job in self._pending:
                self._pending.remove(job)

    @property
    def load(self) -> dict:
        with self._cond:
            return {"running": self.running, "queued": len(self._pending), "admitted": len(self._admitted),
                    "batches": self.batches, "largest_batch": self.largest_batch}

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=5)

    # ---------------------------------------------------------------- the worker
    def _next_batch(self) -> list[Job]:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if self._closing:
                return []
        time.sleep(self.batch_window)  # let the requests arriving together meet
        with self._cond:
            if not self._pending:
                return []
            key = self._pending[0].key
            batch = [job for job in self._pending if job.key == key][: self.max_concurrency]
            for job in batch:
                self._pending.remove(job)
            self.running = len(batch)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            return batch

    def _loop(self) -> None:
        while not self._closing:
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one batch
                log.exception("pmetal serve: a batch failed")
                for job in batch:
                    job.emit(("error", None, f"{type(exc).__name__}: {exc}"))
            finally:
                with self._cond:
                    self.running = 0

    def _engine(self, model_id: str, rows: int) -> RolloutEngine:
        key = (model_id, rows if self.graphs else 0)
        if key not in self._engines:
            self._engines[key] = RolloutEngine(self.models.model, compile_decode=self.compile_decode)
        return self._engines[key]

    def _run(self, batch: list[Job]) -> None:
        first = batch[0]
        slots = [(job, row) for job in batch for row in range(job.n)]
        prompts = [job.prompt_ids for job, _ in slots]
        budget = max(job.max_tokens for job in batch)
        if self.graphs:  # a few shapes, each captured once (see the module docstring)
            rows = 1 << (len(prompts) - 1).bit_length()
            prompts += [prompts[0]] * (rows - len(prompts))
            budget = max(16, 1 << (budget - 1).bit_length())
        config = SamplingConfig(max_new_tokens=budget, temperature=first.temperature,
                                top_p=first.top_p if first.temperature > 0 else 1.0)
        generator = None
        if first.seed is not None:
            generator = torch.Generator(self.device).manual_seed(first.seed)
        stop = set(self.stop_ids)

        def on_tokens(new_rows: list[list[int]]) -> None:
            for (job, row), ids in zip(slots, new_rows):
                if job.finished[row]:
                    continue
                if job.cancelled.is_set():
                    job.finished[row] = True
                    continue
                ids = ids[: job.max_tokens - job.lengths[row]]
                job.lengths[row] += len(ids)
                text = job.texts[row]
                text.add(ids)
                if (ids and ids[-1] in stop) or text.hit_stop:
                    self._finish(job, row, "stop")
                elif job.lengths[row] >= job.max_tokens:
                    self._finish(job, row, "length")
                else:
                    delta = text.ready()
                    if delta:
                        job.emit(("delta", row, delta))
            if all(job.finished[row] for job, row in slots):
                raise _BatchDone

        with self.models.activate(first.model_id):
            try:
                self._engine(first.model_id, len(prompts)).generate(
                    prompts, config, stop_ids=self.stop_ids, pad_token_id=self.pad_token_id, generator=generator,
                    on_tokens=on_tokens)
            except _BatchDone:
                pass
        for job, row in slots:  # the engine's budget ran out first
            if not job.finished[row]:
                self._finish(job, row, "length")

    @staticmethod
    def _finish(job: Job, row: int, reason: str) -> None:
        job.finished[row] = True
        if job.cancelled.is_set():
            return
        delta = job.texts[row].ready(final=True)
        if delta:
            job.emit(("delta", row, delta))
        job.emit(("finish", row, reason))
        if all(job.finished):
            job.emit(("end", None, None))

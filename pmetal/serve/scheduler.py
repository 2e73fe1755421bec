"""The serving scheduler: requests batched onto the rollout engine, joining the running rows between rounds.

What it is, precisely: **continuous batching by recomputation**, at the granularity of
`join_every` rounds (8 by default), built on `RolloutEngine.generate` without changing the engine.
One worker thread owns the model. When it is idle and a request arrives it waits `batch_window`
seconds (5 ms) for others, then runs every waiting request that shares the first one's batch key
(served model, temperature, top_p; a seeded request runs alone, so its seed reproduces its answer)
in one engine call, up to `max_concurrency` requests. Every `join_every` rounds the call checks for
waiting requests with the same key (and room for them); if there are some, it ends the call at
that round and starts the next one with the running rows, each prefilled with its prompt *and the
tokens it has generated so far*, plus the new requests. So a request waits at most `join_every`
rounds (plus one prefill) to join the rows already running, and finished rows leave at that
point; the price is one re-prefill of the running rows per join, which costs a fraction of a
decode round per token on a GPU (prefill is compute-bound) and more on a CPU. Between joins each
row leaves as soon as it is finished for its client (stop token, stop string, its own
`max_tokens`, or its client gone): its tokens stop being decoded and sent, and once every row of
the call is finished the call ends at the next round (`on_tokens` raises). The engine's own
compaction frees rows it sees finish (stop tokens); rows ended by the server (stop strings,
`max_tokens` below the call's, disconnects) keep computing until the call ends or is rejoined.
Requests of other keys wait for the running rows to drain (joins stop while the oldest waiting
request has another key, so it is never overtaken for long). `join_every=0` turns joining off
(plain micro-batching: a call runs until its rows are done).

Why not inject rows into the engine's running call: its round is specialised on one sampling
setting and one token budget (its `DecodeSpec`, which CUDA graphs are captured for) and its rows
are prefilled together; a true in-place join needs a prefill between rounds into a freed row and
per-row sampling tensors inside the captured round, a change of the engine itself.

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
        join_every: rounds between the checks for waiting requests that join the running rows
            (0: none join; a call runs until its rows are done).
        compile_decode: compile the engine's round (CUDA only; costs a compilation per shape).
    """

    def __init__(self, models, *, stop_ids, pad_token_id: int, max_concurrency: int = 32, max_queue: int = 256,
                 batch_window: float = 0.005, join_every: int = 8, compile_decode: bool = False) -> None:
        self.models, self.stop_ids, self.pad_token_id = models, list(stop_ids), pad_token_id
        self.max_concurrency, self.max_queue, self.batch_window = max_concurrency, max_queue, batch_window
        self.compile_decode, self.join_every = compile_decode, join_every
        self._serving: list[Job] = []
        self.device = next(models.model.parameters()).device
        self.graphs = self.device.type == "cuda"
        self._engines: dict[tuple, RolloutEngine] = {}
        self._pending: list[Job] = []
        self._admitted: set[int] = set()
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
            running = sum(not all(job.finished) and not job.cancelled.is_set() for job in self._serving)
            return {"running": running, "queued": len(self._pending), "admitted": len(self._admitted),
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
            self._serving = batch
            return batch

    def _loop(self) -> None:
        while not self._closing:
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._serve(batch)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one batch
                log.exception("pmetal serve: a batch failed")
                for job in self._serving:
                    job.emit(("error", None, f"{type(exc).__name__}: {exc}"))
            finally:
                with self._cond:
                    self._serving = []

    def _serve(self, batch: list[Job]) -> None:
        """Engine calls for `batch` until every row is done; compatible waiting requests join between calls."""
        key, jobs = batch[0].key, list(batch)
        with self._cond:
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(jobs))
        while jobs:
            self._call(jobs)
            jobs = [job for job in jobs if not all(job.finished) and not job.cancelled.is_set()]
            with self._cond:
                joining = self._joinable(key, len(jobs))
                for job in joining:
                    self._pending.remove(job)
                jobs += joining
                self.largest_batch = max(self.largest_batch, len(jobs))
                self.batches += bool(jobs)
                self._serving = jobs

    def _joinable(self, key, running: int) -> list[Job]:
        """Waiting jobs that may join a call of `key` now (call with the lock held).

        First come, first served: only while the oldest waiting job shares the key, so a request
        for another model or sampling setting is never overtaken for long."""
        if not self.join_every or not self._pending or self._pending[0].key != key:
            return []
        return [job for job in self._pending if job.key == key][: max(0, self.max_concurrency - running)]

    def _engine(self, model_id: str, rows: int) -> RolloutEngine:
        key = (model_id, rows if self.graphs else 0)
        if key not in self._engines:
            self._engines[key] = RolloutEngine(self.models.model, compile_decode=self.compile_decode)
        return self._engines[key]

    def _call(self, jobs: list[Job]) -> None:
        """One engine call over the unfinished rows of `jobs`, each continuing from the tokens it has."""
        first = jobs[0]
        slots = [(job, row) for job in jobs for row in range(job.n) if not job.finished[row]]
        if not slots:
            return
        # a row that has tokens already is prefilled with them (its prompt and answer so far)
        prompts = [job.prompt_ids + job.texts[row].ids for job, row in slots]
        budget = max(job.max_tokens - job.lengths[row] for job, row in slots)
        if self.graphs:  # a few shapes, each captured once (see the module docstring)
            rows = 1 << (len(prompts) - 1).bit_length()
            prompts += [prompts[0]] * (rows - len(prompts))
            budget = max(16, 1 << (budget - 1).bit_length())
        config = SamplingConfig(max_new_tokens=budget, temperature=first.temperature,
                                top_p=first.top_p if first.temperature > 0 else 1.0)
        generator = None
        if first.seed is not None:
            generator = torch.Generator(self.device).manual_seed(first.seed)
        stop, rounds = set(self.stop_ids), [0]

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
            rounds[0] += 1
            if all(job.finished[row] for job, row in slots):
                raise _BatchDone
            if self.join_every and rounds[0] % self.join_every == 0:
                with self._cond:
                    waiting = self._joinable(first.key, sum(not all(job.finished) for job in jobs))
                if waiting:
                    raise _BatchDone  # end the call here: _serve starts the next one with them

        with self.models.activate(first.model_id):
            try:
                self._engine(first.model_id, len(prompts)).generate(
                    prompts, config, stop_ids=self.stop_ids, pad_token_id=self.pad_token_id, generator=generator,
                    on_tokens=on_tokens)
                ended_by_engine = True
            except _BatchDone:
                ended_by_engine = False
        if ended_by_engine:
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

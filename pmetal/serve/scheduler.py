"""The serving scheduler: requests decoded together on decode sessions, joining and leaving between rounds.

**Continuous batching** on :class:`pmetal.generation.session.DecodeSession`: one worker thread owns
the model and keeps one session per served model (the base, each adapter). Between two steps
(one decode round each, `sync_every` rounds with that setting) it admits the waiting requests
that have free rows: each of a request's `n` completions becomes a session row, its prompt
prefilled into that row at the next step while the other rows keep their KV. A row leaves as soon
as it is finished for its client (a stop token, a stop string, its `max_tokens`, or its client
gone): its slot is freed at once and taken by the next request. Rows of any sampling settings
share the rounds (temperature and top_p are per row); a request with a `seed` samples from a
per-row hash of (seed, position), so its answer does not depend on the requests beside it.
Requests for different served models decode in their own sessions, stepped in turn.

An idle worker waits `batch_window` seconds after the first request arrives so that requests
arriving together are prefilled in one forward. Requests are admitted in arrival order; one that
waits for rows of its model is not overtaken by later requests for the same model.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pmetal.generation import SamplingConfig

log = logging.getLogger("pmetal")


class QueueFull(Exception):
    """More requests than `max_concurrency + max_queue` are waiting or running."""


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
    handles: list[int] = field(default_factory=list)  # its session rows, once admitted

    def __post_init__(self) -> None:
        self.lengths, self.finished = [0] * self.n, [False] * self.n

    def config(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_tokens, temperature=self.temperature,
                              top_p=self.top_p if self.temperature > 0 else 1.0)

    def row_seed(self, row: int) -> int | None:
        """Each completion its own seed (n completions of one seeded request differ, reproducibly)."""
        return None if self.seed is None else (self.seed * 1_000_003 + row) % (1 << 62)


class Scheduler:
    """Runs jobs on `models` (a `ServedModels`) through decode sessions on one worker thread (see the module docstring).

    Args:
        models: the served model and adapters; `activate(model_id)` selects one.
        stop_ids: token ids that end a completion.
        pad_token_id: the pad id (unused by the sessions; kept for the interface).
        max_concurrency: the most completions decoding at once per served model (session rows);
            a request of `n` completions takes `n`.
        max_queue: the most requests waiting beyond the running ones; `submit` raises QueueFull past both.
        batch_window: seconds an idle worker waits after a request arrives for others to prefill with it.
        kv_capacity: KV slots per row: a request's prompt plus `max_tokens` must fit.
        sync_every: decode rounds between the worker's reads of the device (and the joins).
        compile_decode: compile the session's round (CUDA only; costs a compilation per batch shape).
    """

    def __init__(self, models, *, stop_ids, pad_token_id: int, max_concurrency: int = 32, max_queue: int = 256,
                 batch_window: float = 0.005, kv_capacity: int = 2048, sync_every: int = 1,
                 compile_decode: bool = False) -> None:
        from pmetal.errors import PmetalError
        from pmetal.generation.prefill import engine_supports

        if not engine_supports(models.model):
            raise PmetalError("pmetal serve decodes models with full attention (SDPA or eager); this model has a "
                              "sliding window or a hybrid cache, which the decode session does not serve yet")
        self.models, self.stop_ids, self.pad_token_id = models, list(stop_ids), pad_token_id
        self.max_concurrency, self.max_queue, self.batch_window = max_concurrency, max_queue, batch_window
        self.kv_capacity, self.sync_every, self.compile_decode = kv_capacity, sync_every, compile_decode
        self._sessions: dict[str, object] = {}
        self._rows: dict[tuple[str, int], tuple[Job, int]] = {}
        self._running: list[Job] = []
        self._pending: list[Job] = []
        self._admitted: set[int] = set()
        self._turn = 0
        self.batches, self.largest_batch = 0, 0  # session steps so far, and the most requests in one
        # unseeded rows draw their seeds from here: fresh per server, not torch's fixed default seed
        self._seeds = torch.Generator().manual_seed(int.from_bytes(os.urandom(7), "little"))
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
        """Free `job`'s place (finished, failed or its client gone); its rows leave at the next step."""
        job.cancelled.set()
        with self._cond:
            self._admitted.discard(id(job))
            if job in self._pending:
                self._pending.remove(job)
            self._cond.notify()

    @property
    def load(self) -> dict:
        with self._cond:
            running = sum(not all(job.finished) and not job.cancelled.is_set() for job in self._running)
            return {"running": running, "queued": len(self._pending), "admitted": len(self._admitted),
                    "batches": self.batches, "largest_batch": self.largest_batch}

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=5)

    # ---------------------------------------------------------------- the worker
    def _busy(self) -> bool:
        return any(job.handles for job in self._running)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._pending and not self._busy():
                    self._cond.wait()
                if self._closing:
                    return
                idle = not self._busy()
            if idle:
                time.sleep(self.batch_window)  # let the requests arriving together meet
            try:
                self._admit()
                self._leave_cancelled()
                self._step()
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one failure
                log.exception("pmetal serve: a step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def _session(self, model_id: str):
        if model_id not in self._sessions:
            from pmetal.generation.session import DecodeSession

            self._sessions[model_id] = DecodeSession(
                self.models.model, rows=self.max_concurrency, capacity=self.kv_capacity, sync_every=self.sync_every,
                max_stop_ids=max(8, len(set(self.stop_ids))), generator=self._seeds, compile_decode=self.compile_decode)
        return self._sessions[model_id]

    def _admit(self) -> None:
        """Waiting jobs into free session rows, in arrival order (no overtaking within a served model)."""
        with self._cond:
            waiting = list(self._pending)
        blocked: set[str] = set()
        for job in waiting:
            if job.model_id in blocked or job.cancelled.is_set():
                continue
            try:
                session = self._session(job.model_id)
            except Exception as exc:  # noqa: BLE001 - e.g. no memory for its cache: this request fails, not the server
                log.exception("pmetal serve: no decode session for %s", job.model_id)
                job.emit(("error", None, f"{type(exc).__name__}: {exc}"))
                with self._cond:
                    self._pending.remove(job)
                continue
            if session.free_rows < job.n:
                blocked.add(job.model_id)
                continue
            job.handles = [session.add(job.prompt_ids, job.config(), stop_ids=self.stop_ids, seed=job.row_seed(row))
                           for row in range(job.n)]
            for row, handle in enumerate(job.handles):
                self._rows[(job.model_id, handle)] = (job, row)
            with self._cond:
                if job in self._pending:
                    self._pending.remove(job)
                self._running.append(job)

    def _leave_cancelled(self) -> None:
        for job in [job for job in self._running if job.cancelled.is_set()]:
            for row in range(job.n):
                job.finished[row] = True
            self._drop(job)

    def _drop(self, job: Job) -> None:
        """Free every row of `job` and forget it."""
        session = self._sessions.get(job.model_id)
        for handle in job.handles:
            self._rows.pop((job.model_id, handle), None)
            if session is not None:
                session.remove(handle)
        job.handles = []
        with self._cond:
            if job in self._running:
                self._running.remove(job)

    def _step(self) -> None:
        """One step of the next served model with active rows (the models take turns)."""
        ids = [m for m in self._sessions if self._sessions[m].active]
        if not ids:
            return
        self._turn = (self._turn + 1) % len(ids)
        model_id = ids[self._turn]
        session = self._sessions[model_id]
        with self._cond:
            requests = sum(job.model_id == model_id and bool(job.handles) for job in self._running)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, requests)
        try:
            with self.models.activate(model_id):
                events = session.step()
        except Exception:
            self._sessions.pop(model_id, None)  # a fresh session for the next requests
            raise
        for event in events:
            job, row = self._rows.get((model_id, event.row), (None, 0))
            if job is None or job.cancelled.is_set() or job.finished[row]:
                continue
            job.lengths[row] += len(event.tokens)
            text = job.texts[row]
            text.add(event.tokens)
            if event.finish == "stop" or text.hit_stop:
                self._finish(job, row, "stop")
            elif event.finish:
                self._finish(job, row, event.finish)
            else:
                delta = text.ready()
                if delta:
                    job.emit(("delta", row, delta))
            if job.finished[row]:
                session.remove(event.row)
                self._rows.pop((model_id, event.row), None)
                if all(job.finished):
                    self._drop(job)

    def _fail_all(self, message: str) -> None:
        for job in list(self._running):
            if not job.cancelled.is_set():
                job.emit(("error", None, message))
            self._drop(job)

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

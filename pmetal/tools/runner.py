"""The tool runner: user tools (`package.module:function`) and environments run in worker processes.

Tools are user code, so none runs in the training process: `ToolRunner` keeps `workers` spawned
processes (`pmetal.tools.worker`), sends each call to one, and waits at most `timeout` seconds for
its answer. A call that raises comes back as the error text the model then reads; a call that
hangs past the timeout gets its worker killed (and a fresh one started on the next call) and comes
back as a timeout message; every result is cut to `max_result_chars`. Each outcome is counted
(`ToolStats`).

`run(calls)` waits for its calls; `submit(calls)` returns a `Batch` at once and `poll()` hands
batches back as they complete, so a caller (the episode loop) keeps decoding while tools run. Each
worker runs one request at a time; a call goes to any idle worker, an environment's to its own.

An environment (`environment: package.module:Factory`, as TRL's `environment_factory`) lives in
one worker for its episode: `new_environment(row)` builds it there and calls its `reset(**row)`,
its public methods are the episode's tools, and `EnvironmentHandle` forwards attribute calls
(`get_reward()`, or anything a reward function asks) to it. An environment whose worker was
killed is lost: its calls answer with an error.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from pmetal.errors import PmetalError

OK, ERROR, TIMEOUT, PARSE_ERROR, UNKNOWN = "ok", "error", "timeout", "parse_error", "unknown_tool"


def tool_spec(tool: str | Callable) -> str:
    """A tool as the import string a worker resolves (a function must be importable: no lambdas)."""
    if isinstance(tool, str):
        if ":" not in tool:
            raise PmetalError(f"tool {tool!r}: expected an import path package.module:function")
        return tool
    module, name = getattr(tool, "__module__", None), getattr(tool, "__qualname__", "")
    if not module or "<" in name:
        raise PmetalError(f"tool {tool!r} cannot run in a worker process: pass a module-level function "
                          "(or its import path package.module:function)")
    return f"{module}:{name}"


def resolve_tool(spec: str | Callable) -> Callable:
    """The function an import string names, with a one-line error for a path that does not resolve."""
    from pmetal.tools.worker import resolve

    if callable(spec):
        return spec
    spec = tool_spec(spec)
    try:
        fn = resolve(spec)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's path
        raise PmetalError(f"tool {spec!r}: cannot import it ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise PmetalError(f"tool {spec!r} is a {type(fn).__name__}, not a function")
    return fn


def environment_tools(factory: str | Callable) -> dict[str, Callable]:
    """`{name: method}` of an environment class's public methods (reset and get_reward excluded)."""
    cls = resolve_tool(factory)
    cls = cls if inspect.isclass(cls) else type(cls())
    return {name: fn for name, fn in inspect.getmembers(cls, predicate=inspect.isfunction)
            if not name.startswith("_") and name not in ("reset", "get_reward")}


@dataclass
class ToolStats:
    """Counts of call outcomes (status -> count) and the seconds spent waiting for tools."""

    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1


@dataclass
class Call:
    """One call to run: a tool by name, or an environment's method (`environment` set)."""

    name: str
    arguments: dict
    environment: int | None = None


@dataclass
class Result:
    content: str
    status: str  # OK, ERROR, TIMEOUT, UNKNOWN


ENVIRONMENT_LOST = "environment lost (its worker was killed after a tool timed out)"


@dataclass(eq=False)
class _Request:
    """One message for a worker: any free one (`slot` None) or an environment's own (`slot`, `worker`)."""

    message: tuple
    slot: int | None = None
    worker: Any = None
    answer: tuple[str, Any] | None = None
    deadline: float = 0.0


@dataclass(eq=False)
class Batch:
    """The calls of one `submit`: `results` (one per call, in order) are complete once `done`."""

    results: list[Result | None]
    _requests: list[tuple[int, _Request]] = field(default_factory=list)
    _counted: bool = False

    @property
    def done(self) -> bool:
        return all(request.answer is not None for _, request in self._requests)

    def finish(self, stats: ToolStats) -> list[Result]:
        """The results (counted in `stats` once)."""
        for i, request in self._requests:
            status, text = request.answer
            self.results[i] = Result(text if status == OK else f"error: {text}", status)
        if not self._counted:
            for result in self.results:
                stats.add(result.status)
            self._counted = True
        return self.results


class _Worker:
    """One worker: `python -m pmetal.tools.worker` over two pipes (a fresh interpreter, never a fork
    of the training process; no re-import of the user's main script as multiprocessing's spawn does).
    It sees the parent's `sys.path`, so whatever the trainer imports, the worker imports."""

    def __init__(self, max_chars: int) -> None:
        import os
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if isinstance(p, str) and p))
        self.process = subprocess.Popen([sys.executable, "-m", "pmetal.tools.worker", str(to_child), str(from_child),
                                         str(max_chars)], pass_fds=(to_child, from_child), env=env,
                                        stdin=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.send_conn, self.conn = Connection(from_parent, readable=False), Connection(to_parent, writable=False)

    def send(self, request) -> None:
        self.send_conn.send(request)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)
        self.send_conn.close()
        self.conn.close()


class ToolRunner:
    """Runs tool calls in `workers` processes with a timeout and a result cap (module docstring).

    Args:
        tools: functions or `package.module:function` strings; their `__name__` is the tool name.
        timeout: seconds a call may run before its worker is killed.
        max_result_chars: results (and error texts) are cut to this many characters.
        workers: worker processes (calls of one turn run side by side).
    """

    def __init__(self, tools: Sequence[str | Callable] = (), *, timeout: float = 10.0,
                 max_result_chars: int = 2000, workers: int = 2) -> None:
        if timeout <= 0 or max_result_chars <= 0 or workers < 1:
            raise PmetalError("tool runner: timeout and max_result_chars must be > 0 and workers >= 1")
        self.specs = {}
        for tool in tools:
            fn = resolve_tool(tool)
            self.specs[fn.__name__] = tool_spec(tool)
        self.timeout, self.max_result_chars = float(timeout), int(max_result_chars)
        self.workers: list[_Worker | None] = [None] * workers
        self.stats = ToolStats()
        self._env_worker: dict[int, tuple[int, _Worker]] = {}
        self._next_env = 0
        self._waiting: list[_Request] = []  # requests not yet sent, in order
        self._running: dict[int, _Request] = {}  # worker slot -> the request it runs
        self._batches: list[Batch] = []  # submitted, not yet handed back by poll

    # -- environments ------------------------------------------------------------------------
    def new_environment(self, factory: str, row: dict) -> tuple[int, str | None]:
        """Build an environment in a worker and `reset(**row)` it; (its id, reset's text or None)."""
        env_id, self._next_env = self._next_env, self._next_env + 1
        slot = env_id % len(self.workers)
        self._env_worker[env_id] = (slot, self._worker(slot))
        [(status, text)] = self.run_requests([(env_id, ("env_new", env_id, tool_spec(factory), row))], count=False)
        if status != OK:
            raise PmetalError(f"environment {factory!r}: building or resetting it failed: {text}")
        return env_id, text

    def close_environment(self, env_id: int) -> None:
        slot, worker = self._env_worker.get(env_id, (None, None))
        if worker is not None and self.workers[slot] is worker:
            self.run_requests([(env_id, ("env_del", env_id))], count=False)
        self._env_worker.pop(env_id, None)

    def call_environment(self, env_id: int, method: str, arguments: dict | None = None) -> Any:
        """One method of an environment (outside an episode: get_reward, a reward's own questions)."""
        [(status, value)] = self.run_requests([(env_id, ("env_call", env_id, method, arguments or {}))],
                                              count=False)
        if status != OK:
            raise PmetalError(f"environment method {method!r}: {value}")
        return value

    # -- calls ---------------------------------------------------------------------------------
    def run(self, calls: Sequence[Call], env_tools: Sequence[str] = ()) -> list[Result]:
        """Run the calls (side by side on the workers) and wait for them; a result per call, in order."""
        batch = self.submit(calls, env_tools)
        t0 = time.perf_counter()
        self._until([request for _, request in batch._requests])
        self.stats.seconds += time.perf_counter() - t0
        self._batches.remove(batch)
        return batch.finish(self.stats)

    def submit(self, calls: Sequence[Call], env_tools: Sequence[str] = ()) -> Batch:
        """Start the calls and return at once; `poll` hands the batch back once every call is answered."""
        batch = Batch([None] * len(calls))
        for i, call in enumerate(calls):
            if call.environment is not None and call.name in env_tools:
                message = ("env_call", call.environment, call.name, call.arguments)
                batch._requests.append((i, self._request(call.environment, message)))
            elif call.name in self.specs:
                batch._requests.append((i, self._request(None, ("call", self.specs[call.name], call.arguments))))
            else:
                known = sorted({*self.specs, *env_tools})
                batch.results[i] = Result(f"error: unknown tool {call.name!r}; the tools are: {', '.join(known)}",
                                          UNKNOWN)
        self._batches.append(batch)
        self._dispatch()
        return batch

    def poll(self, timeout: float | None = 0.0) -> list[Batch]:
        """The submitted batches now answered (each once). With none answered yet, wait up to
        `timeout` seconds (None: until one is) for one; the time spent waiting is counted."""
        t0 = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._batches:
            self._pump(0.0)  # collect what has arrived
        while self._batches and not any(b.done for b in self._batches):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._pump(left)
        self.stats.seconds += time.perf_counter() - t0
        done = [b for b in self._batches if b.done]
        self._batches = [b for b in self._batches if not b.done]
        for batch in done:
            batch.finish(self.stats)
        return done

    def cancel(self) -> None:
        """Forget every submitted batch: waiting requests are dropped, workers running one are
        killed (after an error in the caller, so no stale answer reaches a later call)."""
        for slot in list(self._running):
            self._drop(slot)
        self._running.clear()
        self._waiting.clear()
        self._batches.clear()

    def run_requests(self, requests: Sequence[tuple[int | None, tuple]], count: bool = True) -> list[tuple[str, Any]]:
        """Send requests (an environment's go to its worker, the others to any free worker) and wait;
        the answers in order."""
        t0 = time.perf_counter()
        pending = [self._request(env_id, message) for env_id, message in requests]
        self._until(pending)
        if count:
            for request in pending:
                self.stats.add(request.answer[0])
            self.stats.seconds += time.perf_counter() - t0
        return [request.answer for request in pending]

    # -- the dispatcher ------------------------------------------------------------------------
    def _request(self, env_id: int | None, message: tuple) -> _Request:
        """Queue a request: an environment's to its worker (answered at once if that worker is gone), others to any."""
        if env_id is None:
            request = _Request(message)
        else:
            slot, worker = self._env_worker.get(env_id, (None, None))
            request = _Request(message, slot, worker)
            if worker is None or self.workers[slot] is not worker:
                request.answer = (ERROR, ENVIRONMENT_LOST)
                return request
        self._waiting.append(request)
        return request

    def _until(self, requests: Sequence[_Request]) -> None:
        self._dispatch()
        while any(r.answer is None for r in requests):
            self._pump(None)

    def _dispatch(self) -> None:
        """Start waiting requests on idle workers (each worker runs one request at a time, in order)."""
        for request in list(self._waiting):
            if request.slot is None:
                slot = next((s for s in range(len(self.workers)) if s not in self._running), None)
                if slot is None:
                    continue
            else:
                slot = request.slot
                if slot in self._running:
                    continue
                if self.workers[slot] is not request.worker:  # killed since: its environment is gone
                    self._waiting.remove(request)
                    request.answer = (ERROR, ENVIRONMENT_LOST)
                    continue
            self._waiting.remove(request)
            try:
                self._worker(slot).send(request.message)
            except (BrokenPipeError, OSError):  # died on its own (a tool called os._exit)
                self._drop(slot)
                request.answer = (ERROR, "the tool's worker process died")
                continue
            request.deadline = time.monotonic() + self.timeout
            self._running[slot] = request

    def _pump(self, timeout: float | None) -> None:
        """Wait (at most `timeout` s, None: as long as it takes) for an answer or a deadline; collect answers."""
        self._dispatch()
        if not self._running:
            return
        now = time.monotonic()
        for slot, request in list(self._running.items()):
            if request.deadline <= now:
                del self._running[slot]
                self._drop(slot)
                request.answer = (TIMEOUT, f"the tool did not answer within {self.timeout:g} s and was stopped")
        if self._running:
            conns = {self.workers[slot].conn: slot for slot in self._running}
            wait_s = max(0.0, min(r.deadline for r in self._running.values()) - now)
            ready = wait(list(conns), timeout=wait_s if timeout is None else min(wait_s, max(0.0, timeout)))
            for conn in ready:
                slot = conns[conn]
                request = self._running.pop(slot)
                try:
                    request.answer = conn.recv()  # the worker has cut it to the cap
                except (EOFError, OSError):
                    self._drop(slot)
                    request.answer = (ERROR, "the tool's worker process died")
        self._dispatch()

    def _worker(self, slot: int) -> _Worker:
        if self.workers[slot] is None:
            self.workers[slot] = _Worker(self.max_result_chars)
        return self.workers[slot]

    def _drop(self, slot: int) -> None:
        worker, self.workers[slot] = self.workers[slot], None
        if worker is not None:
            worker.kill()

    def close(self) -> None:
        """Stop every worker (environments included)."""
        self.cancel()
        for slot in range(len(self.workers)):
            self._drop(slot)
        self._env_worker.clear()

    def __enter__(self) -> ToolRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EnvironmentHandle:
    """A rollout's environment as reward functions see it: `handle.get_reward()` (any public
    method) runs in the environment's worker."""

    def __init__(self, runner: ToolRunner, env_id: int, factory: str) -> None:
        self._runner, self._id, self.factory = runner, env_id, factory

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda **arguments: self._runner.call_environment(self._id, name, arguments)

    def __repr__(self) -> str:
        return f"EnvironmentHandle({self.factory}, id={self._id})"

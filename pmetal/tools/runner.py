"""The tool runner: user tools (`package.module:function`) and environments run in worker processes.

Tools are user code, so none runs in the training process: `ToolRunner` keeps `workers` spawned
processes (`pmetal.tools.worker`), sends each call to one, and waits at most `timeout` seconds for
its answer. A call that raises comes back as the error text the model then reads; a call that
hangs past the timeout gets its worker killed (and a fresh one started on the next call) and comes
back as a timeout message; every result is cut to `max_result_chars`. Each outcome is counted
(`ToolStats`).

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

    # -- environments ------------------------------------------------------------------------
    def new_environment(self, factory: str, row: dict) -> tuple[int, str | None]:
        """Build an environment in a worker and `reset(**row)` it; (its id, reset's text or None)."""
        env_id, self._next_env = self._next_env, self._next_env + 1
        slot = env_id % len(self.workers)
        worker = self._worker(slot)
        self._env_worker[env_id] = (slot, worker)
        [(status, text)] = self._exchange([(slot, ("env_new", env_id, tool_spec(factory), row))])
        if status != OK:
            raise PmetalError(f"environment {factory!r}: building or resetting it failed: {text}")
        return env_id, text

    def close_environment(self, env_id: int) -> None:
        slot, worker = self._env_worker.pop(env_id, (None, None))
        if worker is not None and self.workers[slot] is worker:
            self._exchange([(slot, ("env_del", env_id))])

    def call_environment(self, env_id: int, method: str, arguments: dict | None = None) -> Any:
        """One method of an environment (outside an episode: get_reward, a reward's own questions)."""
        [(status, value)] = self.run_requests([(env_id, ("env_call", env_id, method, arguments or {}))],
                                              count=False)
        if status != OK:
            raise PmetalError(f"environment method {method!r}: {value}")
        return value

    # -- calls ---------------------------------------------------------------------------------
    def run(self, calls: Sequence[Call], env_tools: Sequence[str] = ()) -> list[Result]:
        """Run the calls (side by side on the workers); a result per call, in order."""
        results: list[Result | None] = [None] * len(calls)
        requests = []
        for i, call in enumerate(calls):
            if call.environment is not None and call.name in env_tools:
                requests.append((i, call.environment, ("env_call", call.environment, call.name, call.arguments)))
            elif call.name in self.specs:
                requests.append((i, None, ("call", self.specs[call.name], call.arguments)))
            else:
                known = sorted({*self.specs, *env_tools})
                results[i] = Result(f"error: unknown tool {call.name!r}; the tools are: {', '.join(known)}", UNKNOWN)
                self.stats.add(UNKNOWN)
        answers = self.run_requests([(env, request) for _, env, request in requests])
        for (i, _, _), (status, text) in zip(requests, answers):
            results[i] = Result(text if status == OK else f"error: {text}", status)
        return results

    def run_requests(self, requests: Sequence[tuple[int | None, tuple]], count: bool = True) -> list[tuple[str, Any]]:
        """Send requests (an environment's go to its worker, the others round-robin); answers in order."""
        t0 = time.perf_counter()
        routed = []
        for k, (env_id, request) in enumerate(requests):
            if env_id is not None:
                slot, worker = self._env_worker.get(env_id, (None, None))
                if worker is None or self.workers[slot] is not worker:
                    routed.append(None)  # its worker was killed: the environment is gone
                    continue
                routed.append((slot, request))
            else:
                routed.append((k % len(self.workers), request))
        live = [r for r in routed if r is not None]
        answers = iter(self._exchange(live))
        out = [(ERROR, "environment lost (its worker was killed after a tool timed out)") if r is None else next(answers)
               for r in routed]
        if count:
            for status, _ in out:
                self.stats.add(status)
            self.stats.seconds += time.perf_counter() - t0
        return out

    def _worker(self, slot: int) -> _Worker:
        if self.workers[slot] is None:
            self.workers[slot] = _Worker(self.max_result_chars)
        return self.workers[slot]

    def _exchange(self, requests: Sequence[tuple[int, tuple]]) -> list[tuple[str, Any]]:
        """Each worker runs its requests in order; all workers at once; timeouts kill the worker."""
        queues: dict[int, list[int]] = {}
        for k, (slot, _) in enumerate(requests):
            queues.setdefault(slot, []).append(k)
        answers: list[tuple[str, Any] | None] = [None] * len(requests)
        running: dict[int, tuple[int, float]] = {}  # slot -> (request index, deadline)

        def start(slot: int) -> None:
            while queues[slot]:
                k = queues[slot].pop(0)
                try:
                    self._worker(slot).send(requests[k][1])
                except (BrokenPipeError, OSError):  # died on its own (a tool called os._exit)
                    self._drop(slot)
                    answers[k] = (ERROR, "the tool's worker process died")
                    continue
                running[slot] = (k, time.monotonic() + self.timeout)
                return

        for slot in queues:
            start(slot)
        while running:
            now = time.monotonic()
            for slot, (k, deadline) in list(running.items()):
                if deadline <= now:
                    self._drop(slot)
                    answers[k] = (TIMEOUT, f"the tool did not answer within {self.timeout:g} s and was stopped")
                    del running[slot]
                    start(slot)
            if not running:
                break
            conns = {self.workers[slot].conn: slot for slot in running}
            ready = wait(list(conns), timeout=max(0.0, min(d for _, d in running.values()) - time.monotonic()))
            for conn in ready:
                slot = conns[conn]
                k, _ = running.pop(slot)
                try:
                    status, value = conn.recv()
                    answers[k] = (status, value)  # the worker has cut it to the cap
                except (EOFError, OSError):
                    self._drop(slot)
                    answers[k] = (ERROR, "the tool's worker process died")
                start(slot)
        return answers

    def _drop(self, slot: int) -> None:
        worker, self.workers[slot] = self.workers[slot], None
        if worker is not None:
            worker.kill()

    def close(self) -> None:
        """Stop every worker (environments included)."""
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

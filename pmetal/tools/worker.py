"""The tool worker process: runs user tools and hosts environments, one request at a time.

It imports only the standard library and `pmetal.imports`, so a fresh worker (spawned, never
forked from a process holding a model and its threads) starts in a fraction of a second. Every
answer is `("ok", text)` or `("error", text)`; a tool's exception is an answer, never the worker's
death. Results are cut to the cap here, so a huge result never crosses the pipe.
"""

from __future__ import annotations

import traceback


def cap_text(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars`, saying how much was dropped."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"... [truncated: {len(text)} chars, the cap is {max_chars}]"


def resolve(spec: str):
    """`package.module:attr` (dots allowed after the colon for a class's attribute)."""
    from pmetal.imports import import_user_module

    module_name, _, attr = spec.partition(":")
    value = import_user_module(module_name)
    for part in attr.split("."):
        value = getattr(value, part)
    return value


def as_text(value) -> str:
    if isinstance(value, str):
        return value
    import json

    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def serve(conn, max_chars: int) -> None:
    """The worker's loop (the target of the spawned process)."""
    environments: dict[int, object] = {}
    tools: dict[str, object] = {}
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        kind = request[0]
        try:
            if kind == "call":
                _, spec, arguments = request
                fn = tools.get(spec) or tools.setdefault(spec, resolve(spec))
                answer = ("ok", as_text(fn(**arguments)))
            elif kind == "env_new":
                _, env_id, spec, row = request
                env = (tools.get(spec) or tools.setdefault(spec, resolve(spec)))()
                environments[env_id] = env
                reset = getattr(env, "reset", None)
                observation = reset(**row) if callable(reset) else None
                answer = ("ok", None if observation is None else as_text(observation))
            elif kind == "env_call":
                _, env_id, method, arguments = request
                value = getattr(environments[env_id], method)(**arguments)
                answer = ("ok", value if method == "get_reward" else as_text(value))
            elif kind == "env_del":
                environments.pop(request[1], None)
                answer = ("ok", None)
            else:
                answer = ("error", f"unknown request {kind!r}")
        except Exception as exc:  # noqa: BLE001 - the model reads the error; the run goes on
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" (at {frames[-1].name}, line {frames[-1].lineno})" if frames else ""
            answer = ("error", f"{type(exc).__name__}: {exc}{where}")
        if answer[0] == "ok" and isinstance(answer[1], str):
            answer = ("ok", cap_text(answer[1], max_chars))
        elif answer[0] == "error":
            answer = ("error", cap_text(answer[1], max_chars))
        conn.send(answer)


if __name__ == "__main__":  # python -m pmetal.tools.worker READ_FD WRITE_FD MAX_CHARS (ToolRunner starts it)
    import sys
    from multiprocessing.connection import Connection

    class _Duplex:
        def __init__(self, read_fd: int, write_fd: int) -> None:
            self.reader, self.writer = Connection(read_fd, writable=False), Connection(write_fd, readable=False)

        def recv(self):
            return self.reader.recv()

        def send(self, value) -> None:
            self.writer.send(value)

    serve(_Duplex(int(sys.argv[1]), int(sys.argv[2])), int(sys.argv[3]))

"""The OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions, /v1/completions, /v1/models, /health.

`create_app(models, scheduler, api_key=...)` builds the application; requests become
`scheduler.Job`s whose events come back to the request's event loop through an asyncio queue.
Streaming answers are server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
A client that goes away (a failed send while streaming, or `http.disconnect` while waiting)
releases its job: its place is free at once and its rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from pmetal.errors import PmetalError
from pmetal.serve.scheduler import Job, QueueFull
from pmetal.serve.schemas import DEFAULT_MAX_TOKENS, ApiError, ChatRequest, CompletionRequest, validation_error
from pmetal.serve.text import RowText, chat_prompt_ids, parse_tool_calls

DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there


def create_app(models, scheduler, *, api_key: str | None = None) -> FastAPI:
    """The application serving `models` (`ServedModels`) through `scheduler` (`Scheduler`)."""
    async def authorized(request: Request) -> None:
        if api_key and request.url.path.startswith("/v1/") \
                and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    app = FastAPI(title="pmetal serve", docs_url=None, redoc_url=None, dependencies=[Depends(authorized)])
    tokenizer = models.tokenizer
    context = scheduler.kv_capacity  # a row's KV slots (at most the model's context: `pmetal serve --kv-capacity`)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc):
        error = validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.load}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "pmetal"}
                                           for name in models.ids]}

    def check(body) -> None:
        body.refuse_unsupported()
        if body.model not in models.adapters:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {', '.join(models.ids)}",
                           param="model", code="model_not_found")

    def budget(body, prompt_len: int) -> int:
        asked = body.budget()
        room = (context - prompt_len) if context else None
        if room is not None and (room < 1 or (asked is not None and asked > room)):
            raise ApiError(400, f"the prompt ({prompt_len} tokens) and max_tokens ({asked}) exceed the server's "
                           f"context of {context} tokens (pmetal serve --kv-capacity)", param="max_tokens",
                           code="context_length_exceeded")
        return asked or min(DEFAULT_MAX_TOKENS, room or DEFAULT_MAX_TOKENS)

    def start(body, prompt_ids: list[int], hold_tool_calls: bool) -> tuple[Job, asyncio.Queue]:
        if body.n > scheduler.max_concurrency:
            raise ApiError(400, f"n={body.n} completions exceed the {scheduler.max_concurrency} this server decodes "
                           "at once (pmetal serve --max-concurrency)", param="n")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(model_id=body.model, prompt_ids=prompt_ids, max_tokens=budget(body, len(prompt_ids)),
                  temperature=body.temperature, top_p=body.top_p, n=body.n, seed=body.seed,
                  emit=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
                  texts=[RowText(tokenizer, body.stops(), hold_tool_calls) for _ in range(body.n)])
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        return job, queue

    async def events(request: Request, queue: asyncio.Queue):
        """The job's events up to its end; stops early (returns) when the client has gone."""
        checked = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:  # events may flow without a pause
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if event is None:
                continue
            if event[0] == "error":
                raise ApiError(500, f"generation failed: {event[2]}", type="server_error")
            yield event
            if event[0] == "end":
                return

    def usage(job: Job) -> dict:
        done = sum(job.lengths)
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": done,
                "total_tokens": len(job.prompt_ids) + done}

    async def answer(request: Request, job: Job, queue, kind: str, body):
        """The whole response (non-streaming), or None if the client left first."""
        reasons = [None] * job.n
        try:
            async for event, row, value in events(request, queue):
                if event == "finish":
                    reasons[row] = value
            if not all(reasons):
                return None
        finally:
            scheduler.release(job)
        choices = []
        for i, (text, reason) in enumerate(zip(job.texts, reasons)):
            if kind == "chat":
                content, calls = parse_tool_calls(text.text) if text.hold_tool_calls else (text.text, [])
                message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
                choices.append({"index": i, "message": message, "logprobs": None,
                                "finish_reason": "tool_calls" if calls else reason})
            else:
                choices.append({"index": i, "text": text.text, "logprobs": None, "finish_reason": reason})
        return JSONResponse({"id": _id(kind), "object": "chat.completion" if kind == "chat" else "text_completion",
                             "created": int(time.time()), "model": body.model, "choices": choices,
                             "usage": usage(job)})

    def stream(request: Request, job: Job, queue, kind: str, body) -> StreamingResponse:
        ident, created = _id(kind), int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices, **extra) -> str:
            data = {"id": ident, "object": obj, "created": created, "model": body.model, "choices": choices, **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def choice(row, text=None, reason=None, **delta):
            if kind == "chat":
                if text is not None:
                    delta["content"] = text
                return {"index": row, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": row, "text": text or "", "logprobs": None, "finish_reason": reason}

        async def sse():
            try:
                if kind == "chat":
                    yield chunk([choice(row, "", role="assistant") for row in range(job.n)])
                async for event, row, value in events(request, queue):
                    if event == "delta":
                        yield chunk([choice(row, value)])
                    elif event == "finish":
                        calls = parse_tool_calls(job.texts[row].text)[1] if job.texts[row].hold_tool_calls else []
                        if calls:
                            listed = [{"index": k, **call} for k, call in enumerate(calls)]
                            yield chunk([choice(row, tool_calls=listed)])
                        yield chunk([choice(row, reason="tool_calls" if calls else value)])
                    elif event == "end":
                        if body.include_usage():
                            yield chunk([], usage=usage(job))
                        yield "data: [DONE]\n\n"
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                scheduler.release(job)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def respond(request: Request, body, kind: str, prompt_ids: list[int], tools: bool):
        job, queue = start(body, prompt_ids, tools)
        if body.stream:
            return stream(request, job, queue, kind, body)
        return await answer(request, job, queue, kind, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check(body)
        tools = body.active_tools()
        try:
            prompt_ids = chat_prompt_ids(tokenizer, [m.model_dump(exclude_none=True) for m in body.messages], tools)
        except PmetalError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await respond(request, body, "chat", prompt_ids, bool(tools))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(body)
        prompt = body.prompt_texts_or_ids()
        prompt_ids = list(prompt) if prompt and isinstance(prompt[0], int) else \
            list(tokenizer(prompt[0], add_special_tokens=True)["input_ids"])
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return await respond(request, body, "text", prompt_ids, False)

    return app


def _id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"

"""The OpenAI request bodies pmetal serve reads, and its OpenAI-shaped errors.

Fields OpenAI defines that pmetal does not implement (logprobs, penalties, response_format, ...)
are accepted and ignored, as most OpenAI-compatible servers do, except where ignoring them would
change the answer silently: `logprobs`/`echo`/`best_of`/`suffix` are refused with a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MAX_TOKENS = 256  # when a request gives none (OpenAI's default is the rest of the context)


class ApiError(Exception):
    """An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def refuse_unsupported(self) -> None:
        for name, allowed in (("logprobs", (None, False)), ("echo", (None, False)), ("best_of", (None, 1)),
                              ("suffix", (None, ""))):
            value = getattr(self, name, None)
            if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
                raise ApiError(400, f"{name} is not supported by pmetal serve", param=name, code="unsupported_parameter")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def active_tools(self) -> list[dict] | None:
        return None if self.tool_choice == "none" else (self.tools or None)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def budget(self) -> int | None:
        return self.max_tokens

    def prompt_texts_or_ids(self) -> list[str] | list[int]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, int) for p in self.prompt):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "one prompt per request (send several requests: they are batched)", param="prompt")
        return self.prompt


def validation_error(exc) -> ApiError:
    """FastAPI's RequestValidationError -> a 400 naming the first bad field."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param,
                    code="invalid_value")

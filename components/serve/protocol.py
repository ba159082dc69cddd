"""OpenAI's chat-completions wire format: the request schema, the error body, and the JSON/SSE bodies answered.

Every request error is an `APIError`, answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`;
`add_error_handlers` gives a FastAPI app that shape for its own errors too (unknown routes, bugs).
"""

import json
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

# ---------------------------------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A 400 naming the first invalid field (`messages[0].role`) and pydantic's message for it."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")  # pydantic's prefix for our checks
    return APIError(400, f"{param or 'request'}: {message}", param=param)


def add_error_handlers(api: FastAPI) -> None:
    """Answer every error of `api` in OpenAI's error shape."""

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and wrong methods, in OpenAI's error shape too.
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @api.exception_handler(RequestValidationError)
    async def _request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @api.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not a bad request: still OpenAI's shape, so clients show the message instead of failing to parse.
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()


# ---------------------------------------------------------------------------------------------------------------------
# Requests


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not implement (user, logit_bias…)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # OpenAI accepts an explicit null for any optional field and means its default.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content: str | list[dict[str, Any]]) -> str:
        """OpenAI's content may be a list of parts; a text-only model accepts text parts only."""
        if isinstance(content, str):
            return content
        if not all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return "".join(part["text"] for part in content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's range
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name for max_tokens
    stop: str | list[str] = Field(default_factory=list)  # a list after validation
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)  # what torch.Generator.manual_seed accepts
    n: int = 1

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str]) -> list[str]:
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > 4 or any(not s for s in stop):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stop

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 past max_bytes (checked on the header and while reading)."""
    too_large = APIError(413, f"request body exceeds {max_bytes} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


def parse_request(body: bytes) -> ChatCompletionRequest:
    """A chat-completions body, validated; APIError 400 when it is not JSON, not an object or not valid."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an over-long number, too deep nesting
        raise APIError(400, f"request body is not valid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


# ---------------------------------------------------------------------------------------------------------------------
# Responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(completion_id: str, created: int, model: str, content: str, finish_reason: str, usage: dict) -> dict:
    """A non-streamed `chat.completion`: one choice."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
              "finish_reason": finish_reason}
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage}


def _chunk_head(completion_id: str, created: int, model: str) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}


def chunk(completion_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    """A `chat.completion.chunk` of a stream: one choice, its delta."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _chunk_head(completion_id, created, model) | {"choices": [choice]}


def usage_chunk(completion_id: str, created: int, model: str, usage: dict) -> dict:
    """OpenAI's extra last chunk (stream_options.include_usage): no choices, the usage of the whole completion."""
    return _chunk_head(completion_id, created, model) | {"choices": [], "usage": usage}


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

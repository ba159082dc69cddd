"""OpenAI's wire format (chat completions and completions): the request schemas, the error body, and the JSON/SSE
bodies answered.

Every request error is an `APIError`, answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`;
`add_error_handlers` gives a FastAPI app that shape for its own errors too (unknown routes, bugs: a 500 whose body
says nothing of the fault, which goes to the replica's log).
"""

import asyncio
import json
import logging
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")
MAX_STOPS, MAX_STOP_CHARS = 4, 1000  # OpenAI's 4 stop strings; a stop string is a short marker, not a document
MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # OpenAI's range for chat top_logprobs (completions' logprobs: 5)
# Fields OpenAI clients may send that change nothing here (bookkeeping, or options of features not served).
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"}
# Fields of OpenAI's API this server does not implement: a request that sets one gets a 400 naming it.
UNSUPPORTED_FIELDS = {"tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
                      "audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "suffix",
                      "best_of", "echo", "presence_penalty", "frequency_penalty", "prompt_cache_key",
                      "safety_identifier", "verbosity"}
# ...unless set to what the server does anyway (the openai client and SDKs send some of these with neutral values).
_NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "echo": (False,), "best_of": (1,),
            "logit_bias": ({},), "modalities": (["text"],), "response_format": ({"type": "text"},),
            "suffix": ("",), "tools": ([],)}

# ---------------------------------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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
        # A bug, not a bad request: still OpenAI's shape (clients show it), no internal detail (that goes to the log).
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return internal_error().response()


def internal_error() -> APIError:
    return APIError(500, "the server had an error while processing the request", type="server_error")


# ---------------------------------------------------------------------------------------------------------------------
# Requests


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


class _Request(_Lenient):
    """The sampling fields both routes share. Strictness: a JSON string is no number, a number no string."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    # OpenAI's ranges; absent or null: the model's defaults (model.chat.SAMPLING_DEFAULTS), not OpenAI's 1.0
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] = Field(default_factory=list)  # a list after validation
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)  # what torch.Generator.manual_seed accepts
    n: int = Field(1, ge=1, le=MAX_N)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _int_is_float(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str]) -> list[str]:
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > MAX_STOPS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise ValueError(f"stop must be a string or a list of at most {MAX_STOPS} strings, each of 1 to "
                             f"{MAX_STOP_CHARS} characters")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)  # the number of alternatives; 0: the chosen tokens' only

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        """One prompt: a string or a list of token ids (OpenAI's batch of prompts, when it holds one)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("one prompt per request is supported (send several requests, or use n)")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise ValueError("the prompt must not be empty")
        return prompt


def _check_strings(value: Any, path: str = "") -> None:
    """400 for a lone surrogate anywhere (JSON's \\ud800 escapes decode to one; no tokenizer or UTF-8 writer can
    take it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{path or 'request'}: contains a lone UTF-16 surrogate (invalid Unicode)",
                           param=path or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, path)
            _check_strings(item, f"{path}.{key}".lstrip("."))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, f"{path}[{i}]")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, refused with 413 past max_bytes (checked on the header and while reading) and with 408 when it has
    not all arrived within timeout_s (a client that sends half a body must not hold a slot)."""
    too_large = APIError(413, f"request body exceeds {max_bytes} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body, deadline = bytearray(), time.monotonic() + timeout_s
    parts = request.stream().__aiter__()
    while True:
        try:
            part = await asyncio.wait_for(parts.__anext__(), max(deadline - time.monotonic(), 0))
        except StopAsyncIteration:
            return bytes(body)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                           code="request_timeout") from None
        body += part
        if len(body) > max_bytes:
            raise too_large


def parse_request(body: bytes, schema: type[_Request] = ChatCompletionRequest) -> _Request:
    """A request body, validated; APIError 400 when it is not UTF-8 JSON, not an object, sets a field this server
    does not implement, or is not valid."""
    try:
        # Strict UTF-8 first: json.loads(bytes) would let CESU-8 surrogate bytes through ("surrogatepass").
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, NaN, an over-long number, too deep nesting
        raise APIError(400, f"request body is not valid UTF-8 JSON: {type(exc).__name__}: {exc}"[:500]) from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    _check_strings(data)
    known = set(schema.model_fields) | IGNORED_FIELDS
    for key, value in data.items():
        if value is None or key in known or value in _NEUTRAL.get(key, ()):
            continue
        if key in UNSUPPORTED_FIELDS:
            raise APIError(400, f"{key} is not supported by this server", param=key, code="unsupported_parameter")
        raise APIError(400, f"unrecognized request argument supplied: {key}"[:300], param=key[:100],
                       code="unknown_parameter")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


# ---------------------------------------------------------------------------------------------------------------------
# Responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


Entry = tuple[str, float, list[int]]  # a token's text, log-probability and UTF-8 bytes


def chat_logprobs(entries: list[Entry], tops: list[list[Entry]] | None) -> dict:
    """A chat choice's `logprobs`: each chosen token, with its top_logprobs alternatives (tops[i], best first)."""
    tops = tops or [[] for _ in entries]
    return {"content": [{"token": token, "logprob": logprob, "bytes": raw,
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in top]}
                        for (token, logprob, raw), top in zip(entries, tops)], "refusal": None}


def completion_logprobs(entries: list[Entry], tops: list[list[Entry]] | None, pieces: list[str]) -> dict:
    """A completions choice's `logprobs` (the legacy shape): tokens, their log-probabilities, the alternatives as
    {token: logprob} per position (None when logprobs is 0), text offsets."""
    offsets = [0]
    for piece in pieces[:-1]:
        offsets.append(offsets[-1] + len(piece))
    top_logprobs = None if tops is None else [{t: lp for t, lp, _ in reversed(top)} for top in tops]
    if top_logprobs is not None:  # reversed above so the best of tokens with the same text wins; best first again
        top_logprobs = [dict(sorted(d.items(), key=lambda kv: -kv[1])) for d in top_logprobs]
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": top_logprobs, "text_offset": offsets[:len(entries)]}


def chat_choice(index: int, content: str, finish_reason: str, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": logprobs, "finish_reason": finish_reason}


def text_choice(index: int, text: str, finish_reason: str, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def response(object_: str, response_id: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    """A non-streamed `chat.completion` or `text_completion`."""
    return {"id": response_id, "object": object_, "created": created, "model": model, "choices": choices,
            "usage": usage}


def chunk(object_: str, response_id: str, created: int, model: str, choice: dict) -> dict:
    """One event of a stream (`chat.completion.chunk` or `text_completion`): one choice."""
    return {"id": response_id, "object": object_, "created": created, "model": model, "choices": [choice]}


def usage_chunk(object_: str, response_id: str, created: int, model: str, usage: dict) -> dict:
    """OpenAI's extra last chunk (stream_options.include_usage): no choices, the usage of the whole completion."""
    return {"id": response_id, "object": object_, "created": created, "model": model, "choices": [],
            "usage": usage}


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

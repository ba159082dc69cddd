"""Serve a Llama-2-Chat checkpoint on Ray Serve behind an OpenAI-compatible HTTP API.

Routes: `POST /v1/chat/completions` (non-streaming, or server-sent events in OpenAI's chunk format),
`GET /v1/models`, `GET /health`. Every request error is a 4xx with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`.

Generation is `model.generation.generate`, the one decoding path of the project: concurrent requests with the same
sampling parameters are grouped by `@serve.batch` into one batched `generate` call. Streaming replays the finished
sends each token's text as `generate` produces it (its on_step hook; text through `TextStream`).

Run: `serve run infra/serve.yaml` (model from `LLAMA2_MODEL_URI`, else the config's `model_uri`).
"""

# No `from __future__ import annotations`: Ray Serve reads the builder's annotation as a class to validate its args.

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from components.track.tracking import tracking_uri as default_tracking_uri
from model.chat import ChatFormatError, encode_prompt
from model.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint
from model.generation import SamplingParams, generate
from model.tokenizer import Tokenizer

DEFAULT_MODEL_URI = "models:/llama2-chat@champion"
MODEL_URI_ENV = "LLAMA2_MODEL_URI"  # overrides args.model_uri: `serve run config.yaml` takes no args on the CLI
CACHE_ENV = "LLAMA2_SERVE_CACHE"  # where registry downloads are kept, one folder per model version


# ---------------------------------------------------------------------------------------------------------------------
# Model resolution


def find_checkpoint_dir(root: Path) -> Path:
    """The one folder under root (root included) holding config.json + model.safetensors + tokenizer.model."""
    found = sorted(p.parent for p in root.rglob(CONFIG_FILE)
                   if (p.parent / WEIGHTS_FILE).is_file() and (p.parent / TOKENIZER_FILE).is_file())
    if len(found) != 1:
        what = "no checkpoint folder" if not found else f"{len(found)} checkpoint folders {[str(p) for p in found]}"
        raise CheckpointError(f"{root}: expected exactly one folder with {CONFIG_FILE}, {WEIGHTS_FILE} and "
                              f"{TOKENIZER_FILE}, found {what}")
    return found[0]


def _parse_models_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """`models:/<name>@<alias>` → (name, alias, None); `models:/<name>/<version>` → (name, None, version)."""
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ValueError(f"unsupported model URI {model_uri!r}: use models:/<name>@<alias>, models:/<name>/<version> "
                     "or a checkpoint folder path")


def resolve_checkpoint(model_uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None,
                       ) -> Path:
    """Local checkpoint folder for a model URI.

    model_uri: a folder (the checkpoint itself, or a tree holding exactly one), or a registered model
    `models:/<name>@<alias>` / `models:/<name>/<version>` whose artifacts hold exactly one checkpoint folder.
    Registry downloads are cached per tracking URI, name and version (versions are immutable), so replicas that
    restart or scale up on the same node download once. cache_dir: None = $LLAMA2_SERVE_CACHE or the temp dir.
    """
    if not model_uri.startswith("models:/"):
        path = Path(model_uri).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {path}")
        return find_checkpoint_dir(path)

    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    tracking_uri = tracking_uri or default_tracking_uri()
    name, alias, version = _parse_models_uri(model_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if alias is not None:
        version = client.get_model_version_by_alias(name, alias).version

    cache_root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "llama2-serve-models")
    key = hashlib.sha1(tracking_uri.encode()).hexdigest()[:10]
    target = cache_root / f"{name.replace('/', '_')}-v{version}-{key}"
    if not target.is_dir():
        cache_root.mkdir(parents=True, exist_ok=True)
        # Download beside the target, then rename: a crash or a concurrent replica never sees a partial download.
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_root))
        try:
            # The version's own artifact location: a models:/ URI here would be resolved against MLflow's global
            # registry URI (mlflow 3.17 ignores registry_uri there), not the one given.
            source = client.get_model_version_download_uri(name, version)
            download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri)
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not the "another replica won the race" case
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return find_checkpoint_dir(target)


# ---------------------------------------------------------------------------------------------------------------------
# OpenAI request schema and errors


class APIError(Exception):
    """An error answered as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


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


def _validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")  # pydantic's prefix for our checks
    return APIError(400, f"{param or 'request'}: {message}", param=param)


# ---------------------------------------------------------------------------------------------------------------------
# Detokenization


class TextStream:
    """Turn generated ids, fed one at a time, into text that is safe to show, cut at the first stop string.

    SentencePiece text is not a concatenation of per-id strings (the first piece loses its leading space, and
    byte-fallback ids only form a character together), so each step decodes a short window of ids and emits what it
    adds (vLLM's incremental detokenization). Text that could still become a stop string is held back.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0  # window ids[prefix_offset:]; ids[:read_offset] are in self.text
        self.text = ""  # the text so far (cut at the stop string once one appeared)
        self.sent = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The rest of the text once generation has ended."""
        return "" if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(window) > len(prefix) and (final or not window.endswith("\ufffd")):  # else: a partial UTF-8 char
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=1) + 1)
            self.text += window[len(prefix):]
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text, self.stopped, final = self.text[:min(hits)], True, True
        held = 0 if final else max((h for s in self.stop for h in range(1, len(s)) if self.text.endswith(s[:h])),
                                   default=0)
        out = self.text[self.sent:len(self.text) - held]
        self.sent += len(out)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# The deployment

api = FastAPI(title="Llama-2-Chat", docs_url=None, redoc_url=None)


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
    return _validation_error(exc).response()


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not a bad request: still OpenAI's shape, so clients show the message instead of failing to parse.
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()


@dataclass(frozen=True)
class _Job:
    prompt: list[int]
    params: SamplingParams
    batch_key: tuple  # jobs with equal keys share one generate() call
    on_token: Callable[[int], None] | None = field(default=None, compare=False)  # streaming: each id as it comes


def _usage(job: _Job, n_tokens: int) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": n_tokens, "total_tokens": len(job.prompt) + n_tokens}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 1, "num_gpus": 0})
@serve.ingress(api)
class ChatServer:
    """One replica: the model and tokenizer in memory, OpenAI's chat routes on top."""

    def __init__(self, model_uri: str, model_name: str, tracking_uri: str | None, cache_dir: str | None,
                 default_max_tokens: int, max_request_bytes: int, max_batch_size: int, batch_wait_timeout_s: float,
                 dtype: str):
        import ray

        # A GPU only when Ray gave this replica one (ray_actor_options.num_gpus), whatever the node has.
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
        if dtype == "auto":  # bf16 on GPU; on CPU keep the saved dtype (fp32 decode is not slower there)
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.checkpoint = resolve_checkpoint(model_uri, tracking_uri, cache_dir)
        self.model, self.tokenizer = load_checkpoint(self.checkpoint, device=self.device, dtype=torch_dtype)
        self.model_uri, self.model_name, self.created = model_uri, model_name, int(time.time())
        self.context_length = self.model.args.max_seq_len
        self.default_max_tokens, self.max_request_bytes = default_max_tokens, max_request_bytes
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # -- routes ---------------------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model}")
    async def retrieve_model(self, model: str) -> dict:
        self._check_model(model)
        return self._model_card()

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = self._parse(await self._read_body(request))
        self._check_model(req.model)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            job = self._job(req)
            tokens, finish_reason = await self._generate_batch(job)
            pieces, n_tokens, finish_reason = self._detokenize(tokens, finish_reason, req.stop)
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                      "logprobs": None, "finish_reason": finish_reason}
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": [choice], "usage": _usage(job, n_tokens)}

        # Streaming: the decode thread hands each new id to this event loop; the text goes out as it comes.
        loop, ids = asyncio.get_running_loop(), asyncio.Queue()
        job = self._job(req, on_token=lambda token_id: loop.call_soon_threadsafe(ids.put_nowait, token_id))
        generation = asyncio.ensure_future(self._generate_batch(job))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            def chunk(delta: dict, finish: str | None = None) -> dict:
                return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": self.model_name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            yield _sse(chunk({"role": "assistant", "content": ""}))
            text, ended = TextStream(self.tokenizer, req.stop), False
            while not (generation.done() and ids.empty()):  # ids queued before the result is set: none is lost
                next_id = asyncio.ensure_future(ids.get())
                await asyncio.wait({next_id, generation}, return_when=asyncio.FIRST_COMPLETED)
                if not next_id.done():
                    next_id.cancel()
                    continue
                ended = ended or next_id.result() == self.tokenizer.eos_id
                if piece := ("" if ended else text.push(next_id.result())):
                    yield _sse(chunk({"content": piece}))
            try:
                tokens, finish_reason = generation.result()
            except Exception as exc:  # the stream has begun: the error goes in it, as OpenAI's does
                yield _sse({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}",
                                      "type": "server_error", "param": None, "code": None}})
                return
            if piece := text.flush():
                yield _sse(chunk({"content": piece}))
            _, n_tokens, finish_reason = self._detokenize(tokens, finish_reason, req.stop)
            yield _sse(chunk({}, finish_reason))
            if include_usage:  # OpenAI's extra last chunk: no choices, the usage of the whole completion
                yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                            "model": self.model_name, "choices": [], "usage": _usage(job, n_tokens)})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- request handling -----------------------------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama2-recipe",
                "max_model_len": self.context_length}

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 past max_request_bytes (checked on the header and while reading)."""
        too_large = APIError(413, f"request body exceeds {self.max_request_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_request_bytes:
                raise too_large
        return bytes(body)

    @staticmethod
    def _parse(body: bytes) -> ChatCompletionRequest:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an over-long number, too deep nesting
            raise APIError(400, f"request body is not valid JSON: {type(exc).__name__}: {exc}") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            return ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def _job(self, req: ChatCompletionRequest, on_token: Callable[[int], None] | None = None) -> _Job:
        """Tokens and sampling parameters of a request, checked against the context length."""
        try:
            prompt = encode_prompt(self.tokenizer, [m.model_dump() for m in req.messages])
        except ChatFormatError as exc:
            raise APIError(400, str(exc), param="messages") from None
        room = self.context_length - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context length is "
                                f"{self.context_length}", param="messages", code="context_length_exceeded")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the context "
                                f"length {self.context_length}", param="max_tokens", code="context_length_exceeded")
        params = SamplingParams(
            max_new_tokens=max_tokens or min(self.default_max_tokens, room), temperature=req.temperature,
            top_p=req.top_p, seed=req.seed,
            # Token-level stops end generation early when the model writes a stop string with these exact ids; the
            # text cut in _detokenize is what guarantees it (the same string can tokenize differently in context).
            stop=[self.tokenizer.encode(s) for s in req.stop if self.tokenizer.encode(s)])
        # A seeded request runs alone: its random draws would otherwise depend on what it was batched with.
        key = (params.max_new_tokens, params.temperature, params.top_p, tuple(map(tuple, params.stop)),
               uuid.uuid4().hex if req.seed is not None else None)
        return _Job(prompt, params, key, on_token)

    def _detokenize(self, tokens: list[int], finish_reason: str, stop: list[str]) -> tuple[list[str], int, str]:
        """Text pieces (one per id that adds text), ids used (up to the stop string), finish reason."""
        stream, pieces = TextStream(self.tokenizer, stop), []
        for i, token_id in enumerate(tokens):
            if token_id == self.tokenizer.eos_id:
                break
            pieces.append(stream.push(token_id))
            if stream.stopped:
                return [p for p in pieces if p], i + 1, "stop"
        pieces.append(stream.flush())
        return [p for p in pieces if p], len(tokens), finish_reason

    # -- batched generation ---------------------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, jobs: list[_Job]) -> list[tuple[list[int], str]]:
        # The decode loop is CPU/GPU-bound: run it off the event loop so /health and new requests stay served.
        return await asyncio.to_thread(self._generate_jobs, jobs)

    def _generate_jobs(self, jobs: list[_Job]) -> list[tuple[list[int], str]]:
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.batch_key, []).append(i)
        results: list[tuple[list[int], str]] = [([], "length")] * len(jobs)
        for indices in groups.values():
            sinks = [jobs[i].on_token for i in indices]

            def on_step(step_ids: list[int], rows: list[int], sinks=sinks) -> None:
                for token_id, row in zip(step_ids, rows):
                    if sinks[row] is not None:
                        sinks[row](token_id)

            out = generate(self.model, [jobs[i].prompt for i in indices], jobs[indices[0]].params,
                           eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                           on_step=on_step if any(sinks) else None)
            for i, tokens, reason in zip(indices, out.tokens, out.finish_reasons):
                results[i] = (tokens, reason)
        return results


# ---------------------------------------------------------------------------------------------------------------------
# Application builder (the import_path of infra/serve.yaml)


class AppArgs(BaseModel):
    """Arguments of `build_app`, from the `args:` of a Serve config or `serve.run(build_app({...}))`."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str | None = None  # checkpoint folder or models:/ URI; $LLAMA2_MODEL_URI wins, then this, then default
    model_name: str = "llama2-chat"  # the id in /v1/models and in responses
    tracking_uri: str | None = None  # MLflow registry for models:/ URIs; None = $MLFLOW_TRACKING_URI or repo sqlite
    cache_dir: str | None = None  # registry downloads; None = $LLAMA2_SERVE_CACHE or <tmp>/llama2-serve-models
    default_max_tokens: int = Field(256, ge=1)  # when a request sets no max_tokens (capped by the context left)
    max_request_bytes: int = Field(1 << 20, ge=1024)  # larger bodies get 413
    max_batch_size: int = Field(8, ge=1)  # requests with equal sampling params decoded together
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # how long a batch waits to fill up
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, the checkpoint's dtype on CPU


def build_app(args: AppArgs) -> serve.Application:
    """Serve application builder: `components.serve.app:build_app` (args: AppArgs, or a dict of its fields)."""
    if isinstance(args, dict):  # serve.run(build_app({...})) from Python; Serve itself passes an AppArgs
        args = AppArgs.model_validate(args)
    model_uri = os.environ.get(MODEL_URI_ENV) or args.model_uri or DEFAULT_MODEL_URI
    tracking_uri = args.tracking_uri or (default_tracking_uri() if model_uri.startswith("models:/") else None)
    return ChatServer.bind(model_uri, args.model_name, tracking_uri, args.cache_dir, args.default_max_tokens,
                           args.max_request_bytes, args.max_batch_size, args.batch_wait_timeout_s, args.dtype)

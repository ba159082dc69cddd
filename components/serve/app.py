"""Serve a Llama-2-Chat checkpoint on Ray Serve behind an OpenAI-compatible HTTP API: the deployment and its builder.

Routes: `POST /v1/chat/completions` and `POST /v1/completions` (non-streaming, or server-sent events in OpenAI's
chunk format), `GET /v1/models`, `GET /health`, `GET /metrics` (this replica's, Prometheus text). Every request
error is a 4xx with OpenAI's error body (protocol.py); ops.py gates every request (Host allowlist, header limit,
optional API key, JSON Content-Type) and counts it.

Generation is `model.generation.generate`, the one decoding path of the project: a request becomes a `Prepared`
(jobs.py: prompt ids, sampling parameters, n, logprobs wanted), then n jobs; concurrent jobs with the same sampling
parameters are grouped by `@serve.batch` into one batched `generate` call. Streaming sends each token's text as
`generate` produces it (its on_step hook; text through text.TextStream). A client that leaves (or a request past
request_timeout_s) cancels its jobs: the decode stops at the next step once every job of its batch is cancelled.

The model comes from resolve.py (a checkpoint folder, or a models:/ URI whose alias `build_app` pins to a version,
so every replica serves the same one). Every setting, and its one default, is a field of `AppArgs`. The optional
safety guard (guard.py) judges each finished answer with the safety reward model before it is sent.

Run: `serve run infra/serve.yaml` (model from `LLAMA2_MODEL_URI`, else the config's `model_uri`).
"""

# No `from __future__ import annotations`: Ray Serve reads the builder's annotation as a class to validate its args.

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from ray import serve

from components.data.oracle import REFUSAL
from components.serve import protocol
from components.serve.guard import SAFETY_MODEL_ENV, SafetyGuard, buffered_events, load_guard
from components.serve.jobs import (DecodeState, Job, JobResult, Prepared, make_jobs, prepare_chat,
                                   prepare_completion, run_jobs, token_entry)
from components.serve.ops import Guard, GuardMiddleware, Metrics, install
from components.serve.protocol import APIError
from components.serve.resolve import pin_version, resolve_checkpoint
from components.serve.text import TextStream, detokenize
from components.track.tracking import tracking_uri as default_tracking_uri
from model.checkpoint import load_checkpoint
from model.generation import SamplingParams, generate

MODEL_URI_ENV = "LLAMA2_MODEL_URI"  # overrides args.model_uri: `serve run config.yaml` takes no args on the CLI
API_KEY_ENV = "LLAMA2_API_KEY"  # the API key when args.api_key is unset (keeps it out of the config file)
logger = logging.getLogger("ray.serve")


class AppArgs(BaseModel):
    """Arguments of `build_app`, from the `args:` of a Serve config or `serve.run(build_app({...}))`; the settings
    of every ChatServer replica. The one place their defaults are defined."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: str = "models:/llama2-chat@champion"  # checkpoint folder or models:/ URI; $LLAMA2_MODEL_URI wins
    model_name: str = "llama2-chat"  # the id in /v1/models and in responses
    tracking_uri: str | None = None  # MLflow registry for models:/ URIs; None = $MLFLOW_TRACKING_URI or repo sqlite
    cache_dir: str | None = None  # registry downloads (0700); None = $LLAMA2_SERVE_CACHE or ~/.cache/llama2-recipe
    default_max_tokens: int = Field(256, ge=1)  # when a chat request sets no max_tokens (capped by the context left)
    max_batch_size: int = Field(8, ge=1)  # jobs with equal sampling params decoded together
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # how long a batch waits to fill up
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, the checkpoint's dtype on CPU
    # Operations.
    request_timeout_s: float = Field(120.0, gt=0)  # a request's whole generation; past it: 504 (or an error event)
    max_queued_requests: int = Field(64, ge=-1)  # past max_ongoing_requests + this: Ray Serve's 503 + Retry-After
    max_request_bytes: int = Field(1 << 20, ge=1024)  # larger bodies get 413
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # larger header blocks get 431
    body_timeout_s: float = Field(10.0, gt=0)  # a body not all there within it: 408 (a slow client holds no slot)
    api_key: SecretStr | None = None  # Authorization: Bearer <key> on every route but /health; $LLAMA2_API_KEY
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")  # Host header names served; "*" = any
    health_stall_s: float = Field(60.0, gt=0)  # a decode making no step for longer: the replica is unhealthy
    # Safety guard (guard.py), off by default: on, each finished answer the safety RM scores below the threshold
    # becomes refusal_text with finish_reason "content_filter"; guarded streams are sent once scored (buffered).
    safety_guard: bool = False
    safety_model_uri: str = "models:/llama2-rm-safety@champion"  # moved with the chat champion; env var wins
    safety_threshold: float | None = Field(None, gt=0, lt=1)  # None: the RM's threshold.json, else the paper's 0.15
    refusal_text: str = Field(REFUSAL, min_length=1)


_DEFAULTS = AppArgs()

api = FastAPI(title="Llama-2-Chat", docs_url=None, redoc_url=None, openapi_url=None)
protocol.add_error_handlers(api)
api.add_middleware(GuardMiddleware)


# max_surge_percent: a redeploy (a new pinned version) starts the new replicas before the old ones stop, so a
# rollout never leaves the app without a running replica (with the default 0, one replica means a pause).
@serve.deployment(max_ongoing_requests=16, health_check_period_s=10, health_check_timeout_s=30, max_surge_percent=100,
                  ray_actor_options={"num_cpus": 1, "num_gpus": 0})
@serve.ingress(api)
class ChatServer:
    """One replica: the model and tokenizer in memory, OpenAI's routes on top."""

    def __init__(self, args: AppArgs):
        import ray

        self.args = args
        # A GPU only when Ray gave this replica one (ray_actor_options.num_gpus), whatever the node has.
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
        if args.dtype == "auto":  # bf16 on GPU; on CPU keep the saved dtype (fp32 decode is not slower there)
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.checkpoint = resolve_checkpoint(args.model_uri, args.tracking_uri, args.cache_dir)
        self.model, self.tokenizer = load_checkpoint(self.checkpoint, device=self.device, dtype=torch_dtype)
        self.model_name, self.created = args.model_name, int(time.time())
        self.context_length = self.model.args.max_seq_len
        self._generate_batch.set_max_batch_size(args.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        self.state, self.waiting = DecodeState(), set()
        self.metrics = Metrics(serve.get_replica_context().replica_id.unique_id)
        self.metrics.queue_depth.set_function(lambda: len(self.waiting))
        api_key = args.api_key.get_secret_value() if args.api_key else None
        install(Guard(list(args.allowed_hosts), api_key, args.max_header_bytes, self.metrics))
        self.safety: SafetyGuard | None = None
        if args.safety_guard:
            self.safety = load_guard(args.safety_model_uri, args.safety_threshold, args.refusal_text,
                                     args.tracking_uri, args.cache_dir, self.device, torch_dtype,
                                     self.metrics.registry)

    async def check_health(self) -> None:
        """Ray Serve's probe: a decode stalled for health_stall_s, or one token that cannot be decoded, takes the
        replica out of rotation (Serve restarts it)."""
        if (last := self.state.last_step) is not None and time.monotonic() - last > self.args.health_stall_s:
            raise RuntimeError(f"the running decode made no step for {time.monotonic() - last:.0f} s")
        await asyncio.to_thread(generate, self.model, [[self.tokenizer.bos_id]],
                                SamplingParams(max_new_tokens=1, temperature=0), eos_id=self.tokenizer.eos_id,
                                pad_id=self.tokenizer.pad_id)

    # -- routes ---------------------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model}")
    async def retrieve_model(self, model: str) -> dict:
        self._check_model(model)
        return self._model_card()

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    # -- request handling -----------------------------------------------------------------------------------------

    def _model_card(self) -> dict:
        # root: the registry version served (models:/<name>/<version>, pinned by build_app); no local paths shown.
        root = self.args.model_uri if self.args.model_uri.startswith("models:/") else self.model_name
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama2-recipe",
                "root": root, "max_model_len": self.context_length}

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model[:200]!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")

    async def _complete(self, request: Request, chat: bool):
        started = time.monotonic()
        body = await protocol.read_body(request, self.args.max_request_bytes, self.args.body_timeout_s)
        req = protocol.parse_request(body, protocol.ChatCompletionRequest if chat else protocol.CompletionRequest)
        self._check_model(req.model)
        prepare = prepare_chat if chat else prepare_completion
        prepared = prepare(req, self.tokenizer, self.context_length, self.args.default_max_tokens)
        head = (f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}", int(time.time()),
                self.model_name)
        sse_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if req.stream and self.safety is None:
            return StreamingResponse(self._stream(prepared, chat, head, req.include_usage, started),
                                     media_type="text/event-stream", headers=sse_headers)
        results = await self._decode(make_jobs(prepared), started)
        finished = [self._finish(prepared, result, chat) for result in results]
        if self.safety is not None:  # the post-generation step: answers the safety RM flags become the refusal
            messages = ([m.model_dump() for m in req.messages] if chat
                        else [{"role": "user", "content": self.tokenizer.decode(prepared.prompt)}])
            finished = await self.safety.ascreen(messages, finished)
        completion_tokens = sum(used for _, used, _, _ in finished)
        self.metrics.tokens.inc(completion_tokens)
        usage = protocol.usage(len(prepared.prompt), completion_tokens)
        if req.stream:  # guarded: every answer is judged before the stream's first event
            return StreamingResponse(buffered_events(chat, head, finished, usage if req.include_usage else None),
                                     media_type="text/event-stream", headers=sse_headers)
        choices = [(protocol.chat_choice if chat else protocol.text_choice)(i, text, finish, logprobs)
                   for i, (text, _, finish, logprobs) in enumerate(finished)]
        return JSONResponse(protocol.response("chat.completion" if chat else "text_completion", *head, choices,
                                              usage))

    def _finish(self, prepared: Prepared, result: JobResult, chat: bool) -> tuple[str, int, str, dict | None]:
        """A finished job's text, ids used, finish reason and logprobs (None when not asked for)."""
        pieces, used, finish = detokenize(self.tokenizer, result.tokens, result.finish_reason, prepared.stop)
        logprobs = None
        if prepared.logprobs:
            entries = [token_entry(self.tokenizer, t, lp) for t, lp in zip(result.tokens, result.logprobs)]
            entries = entries[:len(pieces)]
            logprobs = (protocol.chat_logprobs(entries) if chat
                        else protocol.completion_logprobs(entries, pieces))
        return "".join(pieces), used, finish, logprobs

    async def _decode(self, jobs: list[Job], started: float) -> list[JobResult]:
        """The jobs' results within the request's deadline (504 past it). However this ends (deadline, client gone,
        done), the jobs are cancelled after: a decode still running for them stops."""
        self.waiting.update(jobs)
        try:
            timeout = self.args.request_timeout_s - (time.monotonic() - started)
            results = await asyncio.wait_for(asyncio.gather(*map(self._generate_batch, jobs)), max(timeout, 0))
        except TimeoutError:
            raise APIError(504, f"the request did not finish within request_timeout_s "
                                f"({self.args.request_timeout_s:g} s)", type="timeout_error",
                           code="request_timeout") from None
        except asyncio.CancelledError:
            self.metrics.cancelled.inc()
            raise
        finally:
            self.waiting.difference_update(jobs)
            for job in jobs:
                job.cancelled.set()
        if failed := [r.error for r in results if r.error is not None]:
            logger.error("generation failed", exc_info=failed[0])
            raise protocol.internal_error()
        return results

    async def _stream(self, prepared: Prepared, chat: bool, head: tuple, include_usage: bool,
                      started: float) -> AsyncIterator[str]:
        """Server-sent events: each choice's text as it is decoded, then its finish reason (and logprobs)."""
        object_ = "chat.completion.chunk" if chat else "text_completion"
        loop, ids = asyncio.get_running_loop(), asyncio.Queue()
        jobs = make_jobs(prepared, on_token=lambda i, t: loop.call_soon_threadsafe(ids.put_nowait, (i, t)))
        generation = asyncio.ensure_future(self._decode(jobs, started))

        def event(i: int, text: str | None, finish: str | None = None, logprobs: dict | None = None) -> str:
            if chat:
                choice = {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": logprobs,
                          "finish_reason": finish}
            else:
                choice = protocol.text_choice(i, text or "", finish, logprobs)
            return protocol.sse(protocol.chunk(object_, *head, choice))

        streams = [TextStream(self.tokenizer, prepared.stop) for _ in jobs]
        ended, first = [False] * len(jobs), True
        try:
            if chat:
                for i in range(len(jobs)):
                    yield protocol.sse(protocol.chunk(object_, *head, {
                        "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}))
            while not (generation.done() and ids.empty()):  # ids queued before the result is set: none is lost
                next_id = asyncio.ensure_future(ids.get())
                await asyncio.wait({next_id, generation}, return_when=asyncio.FIRST_COMPLETED)
                if not next_id.done():
                    next_id.cancel()
                    continue
                if first:
                    self.metrics.ttft.observe(time.monotonic() - started)
                    first = False
                i, token_id = next_id.result()
                ended[i] = ended[i] or token_id == self.tokenizer.eos_id
                if piece := ("" if ended[i] else streams[i].push(token_id)):
                    yield event(i, piece)
            try:
                results = generation.result()
            except APIError as exc:  # the stream has begun: the error goes in it, as OpenAI's does
                yield protocol.sse(exc.body())
                return
            completion_tokens = 0
            for i, result in enumerate(results):
                if piece := streams[i].flush():
                    yield event(i, piece)
                _, used, finish, logprobs = self._finish(prepared, result, chat)
                completion_tokens += used
                yield event(i, None, finish, logprobs)
            self.metrics.tokens.inc(completion_tokens)
            if include_usage:
                usage = protocol.usage(len(prepared.prompt), completion_tokens)
                yield protocol.sse(protocol.usage_chunk(object_, *head, usage))
            yield protocol.sse("[DONE]")
        finally:  # also when the client left (the generator is closed or cancelled): stop decoding for it
            for job in jobs:
                job.cancelled.set()
            if not generation.done():
                generation.cancel()

    # -- batched generation ---------------------------------------------------------------------------------------

    # The batch settings are AppArgs' (set per replica in __init__); the decorator's are only their defaults.
    @serve.batch(max_batch_size=_DEFAULTS.max_batch_size, batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s)
    async def _generate_batch(self, jobs: list[Job]) -> list[JobResult]:
        self.waiting.difference_update(jobs)
        self.metrics.occupancy.observe(len(jobs))
        self.metrics.running.set(len(jobs))
        try:
            # The decode loop is CPU/GPU-bound: run it off the event loop so /health and new requests stay served.
            return await asyncio.to_thread(run_jobs, self.model, self.tokenizer, jobs, self.state)
        finally:
            self.metrics.running.set(0)


def build_app(args: AppArgs) -> serve.Application:
    """Serve application builder: `components.serve.app:build_app` (args: AppArgs, or a dict of its fields).

    A models:/ alias is resolved here, once, to its version: every replica (and every restart) serves that one."""
    if isinstance(args, dict):  # serve.run(build_app({...})) from Python; Serve itself passes an AppArgs
        args = AppArgs.model_validate(args)
    model_uri = os.environ.get(MODEL_URI_ENV) or args.model_uri
    tracking_uri = args.tracking_uri or (default_tracking_uri() if model_uri.startswith("models:/") else None)
    if model_uri.startswith("models:/"):
        model_uri = pin_version(model_uri, tracking_uri)
    api_key = args.api_key or (SecretStr(os.environ[API_KEY_ENV]) if os.environ.get(API_KEY_ENV) else None)
    safety_uri = os.environ.get(SAFETY_MODEL_ENV) or args.safety_model_uri
    if args.safety_guard and safety_uri.startswith("models:/"):  # pinned too: every replica judges alike
        safety_uri = pin_version(safety_uri, tracking_uri)
    args = args.model_copy(update={"model_uri": model_uri, "tracking_uri": tracking_uri, "api_key": api_key,
                                   "safety_model_uri": safety_uri})
    logger.info("serving %s%s", model_uri, f" (safety guard: {safety_uri})" if args.safety_guard else "")
    return ChatServer.options(max_queued_requests=args.max_queued_requests).bind(args)

"""Serve a Llama-2-Chat checkpoint on Ray Serve behind an OpenAI-compatible HTTP API: the deployment and its builder.

Routes: `POST /v1/chat/completions` and `POST /v1/completions` (non-streaming, or server-sent events in OpenAI's
chunk format), `GET /v1/models`, `GET /health`, `GET /metrics` (this replica's, Prometheus text). Every request
error is a 4xx with OpenAI's error body (protocol.py); ops.py gates every request (Host allowlist, header limit,
optional API key, JSON Content-Type) and counts it.

Each replica decodes through one continuous-batching `Engine` (engine.py, on model.generation's prefill, step and
sampling code): a request becomes a `Prepared` (jobs.py: prompt ids, sampling parameters, n, logprobs wanted), then
n rows submitted to the engine, which joins them to the running batch at the next step, each with its own sampling
parameters. Streaming sends each token's text as the engine decodes it (text through text.TextStream). A client that
leaves, or a request past request_timeout_s, cancels its rows at once; a row that fails fails its request alone; a
full engine queue is a 503 with Retry-After.

The model comes from resolve.py (a checkpoint folder, or a models:/ URI whose alias `build_app` pins to a version,
so every replica serves the same one). Every setting, and its one default, is a field of `AppArgs`. The optional
safety guard (guard.py) judges each finished answer with the safety reward model before it is sent.

Run: `serve run infra/serve.yaml` (model from `LLAMA2_MODEL_URI`, else the config's `model_uri`).
"""

# No `from __future__ import annotations`: Ray Serve reads the builder's annotation as a class to validate its args.

import asyncio
import collections
import logging
import os
import threading
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
from components.serve.engine import Completion, Engine, EngineFull
from components.serve.guard import SAFETY_MODEL_ENV, SafetyGuard, buffered_events, load_guard
from components.serve.jobs import Prepared, prepare_chat, prepare_completion, token_entry
from components.serve.ops import Guard, GuardMiddleware, Metrics, install
from components.serve.protocol import APIError
from components.serve.resolve import pin_version, resolve_checkpoint
from components.serve.text import TextStream, detokenize
from components.track.tracking import tracking_uri as default_tracking_uri
from model.checkpoint import load_checkpoint
from model.generation import SamplingParams
from model.llama import ContextLengthError

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
    max_batch_size: int = Field(16, ge=1)  # rows (choices) the engine decodes together
    max_queued_rows: int = Field(256, ge=1)  # rows waiting for the batch past which a request gets 503 + Retry-After
    max_ongoing_requests: int = Field(32, ge=1)  # requests a replica takes at once (Serve routes the rest elsewhere)
    # torch intra-op threads per replica. 1: on a loaded CPU host 2 threads made batch-1 decode 8x slower and served
    # tokens/s 20-30% lower (benchmarks/bench_serve.py --torch-threads 1 2); the engine batches instead.
    torch_threads: int = Field(1, ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, the checkpoint's dtype on CPU
    # Operations.
    request_timeout_s: float = Field(120.0, gt=0)  # a request's whole generation; past it: 504 (or an error event)
    max_queued_requests: int = Field(64, ge=-1)  # past max_ongoing_requests + this: Ray Serve's 503 + Retry-After
    retry_after_s: int = Field(1, ge=0)  # the Retry-After of the engine's 503
    max_request_bytes: int = Field(1 << 20, ge=1024)  # larger bodies get 413
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # larger header blocks get 431
    body_timeout_s: float = Field(10.0, gt=0)  # a body not all there within it: 408 (a slow client holds no slot)
    api_key: SecretStr | None = None  # Authorization: Bearer <key> on every route but /health; $LLAMA2_API_KEY
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")  # Host header names served; "*" = any
    health_stall_s: float = Field(60.0, gt=0)  # rows running but no decode step for longer: unhealthy
    # 0 (default): a stream sends each decode step's tokens as they are decoded. > 0: at most one event per interval
    # after the first, carrying every token decoded meanwhile (the last is sent at once): per-event work (Serve's
    # proxy hop, SSE, the client's parse) then stops growing with the tokens a busy replica decodes.
    stream_interval_s: float = Field(0.0, ge=0, le=1)
    # Safety guard (guard.py), off by default: on, each finished answer the safety RM scores below the threshold
    # becomes refusal_text with finish_reason "content_filter"; guarded streams are sent once scored (buffered).
    safety_guard: bool = False
    safety_model_uri: str = "models:/llama2-rm-safety@champion"  # moved with the chat champion; env var wins
    safety_threshold: float | None = Field(None, gt=0, lt=1)  # None: the RM's threshold.json, else the paper's 0.15
    refusal_text: str = Field(REFUSAL, min_length=1)


_DEFAULTS = AppArgs()


class TokenRelay:
    """Engine tokens from the decode thread to asyncio queues on one event loop, with one loop wake-up per batch of
    tokens (a decode step's, all rows' together) instead of one call_soon_threadsafe per token. Order is kept: a
    row's tokens reach its queue before its result (a later call_soon_threadsafe) is set."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock, self.scheduled = loop, collections.deque(), threading.Lock(), False

    def put(self, queue: asyncio.Queue, item) -> None:  # the decode thread
        self.items.append((queue, item))
        with self.lock:
            if self.scheduled:  # a drain is queued and will see this item
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:  # cleared first: an item appended from here on schedules the next drain
            self.scheduled = False
        while self.items:
            queue, item = self.items.popleft()
            queue.put_nowait(item)

api = FastAPI(title="Llama-2-Chat", docs_url=None, redoc_url=None, openapi_url=None)
protocol.add_error_handlers(api)
api.add_middleware(GuardMiddleware)


# max_surge_percent: a redeploy (a new pinned version) starts the new replicas before the old ones stop, so a
# rollout never leaves the app without a running replica (with the default 0, one replica means a pause).
@serve.deployment(max_ongoing_requests=_DEFAULTS.max_ongoing_requests, health_check_period_s=10,
                  health_check_timeout_s=30, max_surge_percent=100,
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
        torch.set_num_threads(args.torch_threads)
        self.engine = Engine(self.model, self.tokenizer, args.max_batch_size, max_queued=args.max_queued_rows)
        self._steps = (0, time.monotonic())  # the engine's step count when it last changed (health_stall_s)
        self._relay: TokenRelay | None = None  # made on the serving event loop, by the first stream
        self.metrics = Metrics(serve.get_replica_context().replica_id.unique_id)
        self.metrics.watch_engine(self.engine.stats, args.max_batch_size)
        api_key = args.api_key.get_secret_value() if args.api_key else None
        install(Guard(list(args.allowed_hosts), api_key, args.max_header_bytes, self.metrics))
        self.safety: SafetyGuard | None = None
        if args.safety_guard:
            self.safety = load_guard(args.safety_model_uri, args.safety_threshold, args.refusal_text,
                                     args.tracking_uri, args.cache_dir, self.device, torch_dtype,
                                     self.metrics.registry)

    def __del__(self):
        if hasattr(self, "engine"):
            self.engine.close(timeout=1)

    async def check_health(self) -> None:
        """Ray Serve's probe: a dead decode thread, rows that made no step for health_stall_s, or one token that the
        engine cannot decode (a wedged engine never answers: Serve's health_check_timeout_s) take the replica out of
        rotation (Serve restarts it)."""
        if not self.engine.alive:
            raise RuntimeError("the decode engine's thread has died")
        stats, now = self.engine.stats(), time.monotonic()
        if stats.steps != self._steps[0] or not stats.running:
            self._steps = (stats.steps, now)
        elif now - self._steps[1] > self.args.health_stall_s:
            raise RuntimeError(f"{stats.running} rows made no decode step for {now - self._steps[1]:.0f} s")
        try:
            handle = self.engine.submit([self.tokenizer.bos_id], SamplingParams(max_new_tokens=1, temperature=0))
        except EngineFull:  # busy, not broken: the step count above says whether it decodes
            return
        await handle.result()

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
        if req.stream and self.safety is None:  # rows submitted before the response starts: a full queue is a 503
            loop, ids = asyncio.get_running_loop(), asyncio.Queue()
            if self._relay is None or self._relay.loop is not loop:
                self._relay = TokenRelay(loop)
            relay = self._relay
            handles = self._submit(prepared, lambda i: lambda token: relay.put(ids, (i, token)))
            # Awaited by the stream, started now: request_timeout_s frees the rows even if the body never starts.
            generation = asyncio.ensure_future(self._results(handles, started))
            return StreamingResponse(self._stream(prepared, handles, generation, ids, chat, head, req.include_usage,
                                                  started),
                                     media_type="text/event-stream", headers=sse_headers)
        results = await self._results(self._submit(prepared), started)
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

    def _submit(self, prepared: Prepared, on_token=None) -> list:
        """The request's n rows in the engine (choice i: on_token(i) gets its Tokens); 503 when the queue is full."""
        handles = []
        try:
            for i in range(prepared.n):
                handles.append(self.engine.submit(prepared.prompt, prepared.choice_params(i),
                                                  None if on_token is None else on_token(i), prepared.top_logprobs))
        except EngineFull:
            for handle in handles:
                handle.cancel()
            raise APIError(503, "the server is busy (its decode queue is full); retry shortly", type="server_error",
                           code="overloaded", headers={"Retry-After": str(self.args.retry_after_s)}) from None
        except (ValueError, ContextLengthError) as exc:  # prepare() checked these already; a bug if it happens
            for handle in handles:
                handle.cancel()
            raise APIError(400, str(exc)) from None
        return handles

    def _finish(self, prepared: Prepared, result: Completion, chat: bool) -> tuple[str, int, str, dict | None]:
        """A finished row's text, ids used, finish reason and logprobs (None when not asked for)."""
        pieces, used, finish = detokenize(self.tokenizer, result.tokens, result.finish_reason, prepared.stop)
        logprobs = None
        if prepared.logprobs:
            n = len(pieces)
            entries = [token_entry(self.tokenizer, t, lp) for t, lp in zip(result.tokens[:n], result.logprobs)]
            tops = None
            if prepared.top_logprobs:
                tops = [[token_entry(self.tokenizer, t, lp) for t, lp in top] for top in result.top_logprobs[:n]]
            logprobs = (protocol.chat_logprobs(entries, tops) if chat
                        else protocol.completion_logprobs(entries, tops, pieces))
        return "".join(pieces), used, finish, logprobs

    async def _results(self, handles: list, started: float) -> list[Completion]:
        """The rows' completions within the request's deadline (504 past it). However this ends (deadline, client
        gone, a row failed, done), the rows still in the engine are cancelled: they leave the batch at once."""
        try:
            timeout = self.args.request_timeout_s - (time.monotonic() - started)
            return await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), max(timeout, 0))
        except TimeoutError:
            raise APIError(504, f"the request did not finish within request_timeout_s "
                                f"({self.args.request_timeout_s:g} s)", type="timeout_error",
                           code="request_timeout") from None
        except asyncio.CancelledError:
            self.metrics.cancelled.inc()
            raise
        except Exception as exc:  # noqa: BLE001 - a row failed in the engine: this request's fault alone
            logger.error("generation failed", exc_info=exc)
            raise protocol.internal_error() from None
        finally:
            for handle in handles:
                handle.cancel()

    async def _stream(self, prepared: Prepared, handles: list, generation: asyncio.Future, ids: asyncio.Queue,
                      chat: bool, head: tuple, include_usage: bool, started: float) -> AsyncIterator[str]:
        """Server-sent events: each choice's text as it is decoded, then its finish reason (and logprobs)."""
        object_ = "chat.completion.chunk" if chat else "text_completion"

        def event(i: int, text: str | None, finish: str | None = None, logprobs: dict | None = None) -> str:
            if chat:
                choice = {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": logprobs,
                          "finish_reason": finish}
            else:
                choice = protocol.text_choice(i, text or "", finish, logprobs)
            return protocol.sse(protocol.chunk(object_, *head, choice))

        streams = [TextStream(self.tokenizer, prepared.stop) for _ in handles]
        ended, first = [False] * len(handles), True
        try:
            if chat:
                for i in range(len(handles)):
                    yield protocol.sse(protocol.chunk(object_, *head, {
                        "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}))
            # The decode thread queues a row's ids before its result is set (both through this loop): none is lost.
            interval, sent = self.args.stream_interval_s, None
            while not (generation.done() and ids.empty()):
                if sent is not None and (wait := interval - (time.monotonic() - sent)) > 0:
                    await asyncio.wait({generation}, timeout=wait)  # ids gather meanwhile; the end comes at once
                next_id = asyncio.ensure_future(ids.get())
                await asyncio.wait({next_id, generation}, return_when=asyncio.FIRST_COMPLETED)
                if not next_id.done():
                    next_id.cancel()
                    continue
                if first:
                    self.metrics.ttft.observe(time.monotonic() - started)
                    first = False
                # Every id already queued goes out in one event per choice: a busy replica (or a slow client)
                # sends fewer, larger events instead of falling behind the decode.
                arrived, fresh = [next_id.result()], {}
                while not ids.empty():
                    arrived.append(ids.get_nowait())
                for i, token in arrived:  # (choice, engine Token): each choice's new ids up to its eos
                    ended[i] = ended[i] or token.id == self.tokenizer.eos_id
                    if not ended[i]:
                        fresh.setdefault(i, []).append(token.id)
                texts = {i: text for i, new in fresh.items() if (text := streams[i].push(*new))}  # one decode each
                for i, text in texts.items():
                    yield event(i, text)
                sent = time.monotonic() if texts and interval else None
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
        finally:  # also when the client left (the generator is closed or cancelled): its rows leave the batch
            for handle in handles:
                handle.cancel()
            if not generation.done():
                generation.cancel()


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
    return ChatServer.options(max_ongoing_requests=args.max_ongoing_requests,
                              max_queued_requests=args.max_queued_requests).bind(args)

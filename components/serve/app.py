"""Serve a Llama-2-Chat checkpoint on Ray Serve behind an OpenAI-compatible HTTP API: the deployment and its builder.

Routes: `POST /v1/chat/completions` (non-streaming, or server-sent events in OpenAI's chunk format),
`GET /v1/models`, `GET /health`. Every request error is a 4xx with OpenAI's error body (protocol.py).

Generation is `model.generation.generate`, the one decoding path of the project: concurrent requests with the same
sampling parameters are grouped by `@serve.batch` into one batched `generate` call (jobs.py). Streaming sends each
token's text as `generate` produces it (its on_step hook; text through text.TextStream).

The model comes from resolve.py (a checkpoint folder or a models:/ URI). Every setting, and its one default, is a
field of `AppArgs`; `ChatServer` takes the validated `AppArgs`.

Run: `serve run infra/serve.yaml` (model from `LLAMA2_MODEL_URI`, else the config's `model_uri`).
"""

# No `from __future__ import annotations`: Ray Serve reads the builder's annotation as a class to validate its args.

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from components.serve import protocol
from components.serve.jobs import Job, make_job, run_jobs
from components.serve.protocol import APIError
from components.serve.resolve import resolve_checkpoint
from components.serve.text import TextStream, detokenize
from components.track.tracking import tracking_uri as default_tracking_uri
from model.checkpoint import load_checkpoint

MODEL_URI_ENV = "LLAMA2_MODEL_URI"  # overrides args.model_uri: `serve run config.yaml` takes no args on the CLI


class AppArgs(BaseModel):
    """Arguments of `build_app`, from the `args:` of a Serve config or `serve.run(build_app({...}))`; the settings
    of every ChatServer replica. The one place their defaults are defined."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_uri: str = "models:/llama2-chat@champion"  # checkpoint folder or models:/ URI; $LLAMA2_MODEL_URI wins
    model_name: str = "llama2-chat"  # the id in /v1/models and in responses
    tracking_uri: str | None = None  # MLflow registry for models:/ URIs; None = $MLFLOW_TRACKING_URI or repo sqlite
    cache_dir: str | None = None  # registry downloads; None = $LLAMA2_SERVE_CACHE or <tmp>/llama2-serve-models
    default_max_tokens: int = Field(256, ge=1)  # when a request sets no max_tokens (capped by the context left)
    max_request_bytes: int = Field(1 << 20, ge=1024)  # larger bodies get 413
    max_batch_size: int = Field(8, ge=1)  # requests with equal sampling params decoded together
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # how long a batch waits to fill up
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, the checkpoint's dtype on CPU


_DEFAULTS = AppArgs()

api = FastAPI(title="Llama-2-Chat", docs_url=None, redoc_url=None)
protocol.add_error_handlers(api)


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 1, "num_gpus": 0})
@serve.ingress(api)
class ChatServer:
    """One replica: the model and tokenizer in memory, OpenAI's chat routes on top."""

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
        req = protocol.parse_request(await protocol.read_body(request, self.args.max_request_bytes))
        self._check_model(req.model)
        completion_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name
        if not req.stream:
            job = self._job(req)
            tokens, finish_reason = await self._generate_batch(job)
            pieces, n_tokens, finish_reason = detokenize(self.tokenizer, tokens, finish_reason, req.stop)
            return protocol.completion(completion_id, created, model, "".join(pieces), finish_reason,
                                       protocol.usage(len(job.prompt), n_tokens))

        # Streaming: the decode thread hands each new id to this event loop; the text goes out as it comes.
        loop, ids = asyncio.get_running_loop(), asyncio.Queue()
        job = self._job(req, on_token=lambda token_id: loop.call_soon_threadsafe(ids.put_nowait, token_id))
        generation = asyncio.ensure_future(self._generate_batch(job))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            def chunk(delta: dict, finish: str | None = None) -> str:
                return protocol.sse(protocol.chunk(completion_id, created, model, delta, finish))

            yield chunk({"role": "assistant", "content": ""})
            text, ended = TextStream(self.tokenizer, req.stop), False
            while not (generation.done() and ids.empty()):  # ids queued before the result is set: none is lost
                next_id = asyncio.ensure_future(ids.get())
                await asyncio.wait({next_id, generation}, return_when=asyncio.FIRST_COMPLETED)
                if not next_id.done():
                    next_id.cancel()
                    continue
                ended = ended or next_id.result() == self.tokenizer.eos_id
                if piece := ("" if ended else text.push(next_id.result())):
                    yield chunk({"content": piece})
            try:
                tokens, finish_reason = generation.result()
            except Exception as exc:  # the stream has begun: the error goes in it, as OpenAI's does
                error = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
                yield protocol.sse(error.body())
                return
            if piece := text.flush():
                yield chunk({"content": piece})
            _, n_tokens, finish_reason = detokenize(self.tokenizer, tokens, finish_reason, req.stop)
            yield chunk({}, finish_reason)
            if include_usage:
                usage = protocol.usage(len(job.prompt), n_tokens)
                yield protocol.sse(protocol.usage_chunk(completion_id, created, model, usage))
            yield protocol.sse("[DONE]")

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

    def _job(self, req: protocol.ChatCompletionRequest, on_token=None) -> Job:
        return make_job(req, self.tokenizer, self.context_length, self.args.default_max_tokens, on_token)

    # -- batched generation ---------------------------------------------------------------------------------------

    # The batch settings are AppArgs' (set per replica in __init__); the decorator's are only their defaults.
    @serve.batch(max_batch_size=_DEFAULTS.max_batch_size, batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s)
    async def _generate_batch(self, jobs: list[Job]) -> list[tuple[list[int], str]]:
        # The decode loop is CPU/GPU-bound: run it off the event loop so /health and new requests stay served.
        return await asyncio.to_thread(run_jobs, self.model, self.tokenizer, jobs)


def build_app(args: AppArgs) -> serve.Application:
    """Serve application builder: `components.serve.app:build_app` (args: AppArgs, or a dict of its fields)."""
    if isinstance(args, dict):  # serve.run(build_app({...})) from Python; Serve itself passes an AppArgs
        args = AppArgs.model_validate(args)
    model_uri = os.environ.get(MODEL_URI_ENV) or args.model_uri
    tracking_uri = args.tracking_uri or (default_tracking_uri() if model_uri.startswith("models:/") else None)
    return ChatServer.bind(args.model_copy(update={"model_uri": model_uri, "tracking_uri": tracking_uri}))

"""Requests as generation jobs, and a batch of jobs decoded with `model.generation.generate`.

Two steps, kept apart so that another decoding engine can take the first one's output: `prepare_chat` /
`prepare_completion` turn a validated request into a `Prepared` (prompt ids, sampling parameters, n, logprobs
wanted), and `run_jobs` decodes jobs. Jobs with equal sampling parameters share one batched (left-padded) `generate`
call; a streaming job gets each id as it is generated (generate's on_step hook). A failure is the failing job's
alone: a group that fails is decoded again one job at a time, and only the jobs that fail alone get the error.
"""

import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from components.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from model.chat import ChatFormatError, encode_prompt
from model.generation import SamplingParams, generate
from model.llama import Transformer
from model.tokenizer import Tokenizer

# Below this temperature sampling is greedy decoding: the limit of sampling as T -> 0, and what keeps the scaled
# logits finite (generate divides fp32 log-probabilities by T: 1e-40 is subnormal in fp32, all -inf, NaN).
MIN_TEMPERATURE = 1e-3
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class Prepared:
    """A request as a decoding engine takes it."""

    prompt: list[int]
    params: SamplingParams  # of choice 0; choice i of a seeded request has seed + i (see choice_params)
    n: int  # choices
    logprobs: bool  # the chosen tokens' log-probabilities wanted
    stop: list[str]  # stop strings (the text is cut at the first; params.stop has their token ids)

    def choice_params(self, i: int) -> SamplingParams:
        if self.params.seed is None or i == 0:
            return self.params
        seed = self.params.seed + i
        return SamplingParams(**{**vars(self.params), "seed": seed - 2 ** 64 if seed >= 2 ** 64 else seed})


def _prepare(prompt: list[int], req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
             logprobs: bool, tokenizer: Tokenizer, context_length: int, default_max_tokens: int,
             param: str) -> Prepared:
    room = context_length - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context length is "
                            f"{context_length}", param=param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the context "
                            f"length {context_length}", param="max_tokens", code="context_length_exceeded")
    params = SamplingParams(
        max_new_tokens=max_tokens or min(default_max_tokens, room),
        temperature=req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0, top_p=req.top_p, seed=req.seed,
        # Token-level stops end generation early when the model writes a stop string with these exact ids; the
        # text cut in text.detokenize is what guarantees it (the same string can tokenize differently in context).
        stop=[ids for s in req.stop if (ids := tokenizer.encode(s))])
    return Prepared(prompt, params, req.n, logprobs, req.stop)


def prepare_chat(req: ChatCompletionRequest, tokenizer: Tokenizer, context_length: int,
                 default_max_tokens: int) -> Prepared:
    """A chat request's prompt and sampling parameters, checked against the context length (APIError 400)."""
    if req.top_logprobs:
        raise APIError(400, "top_logprobs > 0 is not supported yet (it comes with the continuous-batching "
                            "engine); logprobs: true gives the chosen tokens' log-probabilities",
                       param="top_logprobs", code="unsupported_parameter")
    try:
        prompt = encode_prompt(tokenizer, [m.model_dump() for m in req.messages])
    except ChatFormatError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return _prepare(prompt, req, req.max_completion_tokens or req.max_tokens, req.logprobs, tokenizer,
                    context_length, default_max_tokens, "messages")


def prepare_completion(req: CompletionRequest, tokenizer: Tokenizer, context_length: int,
                       default_max_tokens: int) -> Prepared:
    """A completions request's prompt (text, encoded with BOS, or token ids) and sampling parameters."""
    if req.logprobs:
        raise APIError(400, "logprobs > 0 (alternatives per token) is not supported yet (it comes with the "
                            "continuous-batching engine); logprobs: 0 gives the chosen tokens' log-probabilities",
                       param="logprobs", code="unsupported_parameter")
    if isinstance(req.prompt, str):
        prompt = tokenizer.encode(req.prompt, bos=True)
    else:
        prompt = req.prompt
        if not all(0 <= i < tokenizer.vocab_size for i in prompt):
            raise APIError(400, f"prompt: token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    return _prepare(prompt, req, req.max_tokens, req.logprobs is not None, tokenizer, context_length,
                    default_max_tokens, "prompt")


def token_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> tuple[str, float, list[int]]:
    """(token text, log-probability, its UTF-8 bytes) of one generated id, for a logprobs answer."""
    piece = tokenizer.id_to_piece(token_id)
    if byte := _BYTE_PIECE.fullmatch(piece):  # a byte-fallback id: one byte of a character
        return f"bytes:\\x{byte.group(1).lower()}", logprob, [int(byte.group(1), 16)]
    text = piece.replace("\u2581", " ")
    return text, logprob, list(text.encode("utf-8"))


@dataclass(eq=False)
class Job:
    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[int], None] | None = None  # streaming: each id as it comes (from the decode thread)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client left: stop when all have

    @property
    def batch_key(self) -> tuple:  # jobs with equal keys share one generate() call
        p = self.params
        # A seeded job runs alone: its random draws would otherwise depend on what it was batched with.
        return (p.max_new_tokens, p.temperature, p.top_p, p.top_k, tuple(map(tuple, p.stop)),
                id(self) if p.seed is not None else None)


def make_jobs(prepared: Prepared, on_token: Callable[[int, int], None] | None = None) -> list[Job]:
    """The n jobs of a request; on_token(choice, id) for streaming."""
    return [Job(prepared.prompt, prepared.choice_params(i),
                None if on_token is None else (lambda token_id, i=i: on_token(i, token_id)))
            for i in range(prepared.n)]


@dataclass
class JobResult:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    error: Exception | None = None  # this job failed (the others of its batch did not)


@dataclass
class DecodeState:
    """What the replica's health check reads: when the running decode last made a step (None: none running)."""

    last_step: float | None = None


def _decode(model: Transformer, tokenizer: Tokenizer, jobs: list[Job], state: DecodeState) -> list[JobResult]:
    streamed = [False] * len(jobs)

    def on_step(step_ids: list[int], rows: list[int]) -> None:
        for token_id, row in zip(step_ids, rows):
            if jobs[row].on_token is not None:
                streamed[row] = True
                jobs[row].on_token(token_id)

    def stop_early(done: bool) -> bool:  # every step: a heartbeat, and the end when every client has left
        state.last_step = time.monotonic()
        return done or all(job.cancelled.is_set() for job in jobs)

    try:
        out = generate(model, [job.prompt for job in jobs], jobs[0].params, eos_id=tokenizer.eos_id,
                       pad_id=tokenizer.pad_id, on_step=on_step if any(j.on_token for j in jobs) else None,
                       sync=stop_early)
    except Exception as exc:  # noqa: BLE001 - isolated per job below
        if len(jobs) == 1 or any(streamed):  # alone already, or its ids are out: it cannot be decoded again
            return [JobResult(error=exc) for _ in jobs]
        return [_decode(model, tokenizer, [job], state)[0] for job in jobs]
    return [JobResult(t, lp, reason) for t, lp, reason in zip(out.tokens, out.logprobs, out.finish_reasons)]


def run_jobs(model: Transformer, tokenizer: Tokenizer, jobs: list[Job], state: DecodeState | None = None,
             ) -> list[JobResult]:
    """Each job's result, one generate() call per batch key; never raises (a failure is in its jobs' results)."""
    state = state or DecodeState()
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.batch_key, []).append(i)
    results: list[JobResult] = [JobResult() for _ in jobs]
    state.last_step = time.monotonic()
    try:
        for indices in groups.values():
            live = [i for i in indices if not jobs[i].cancelled.is_set()]
            if live:
                for i, result in zip(live, _decode(model, tokenizer, [jobs[i] for i in live], state)):
                    results[i] = result
    finally:
        state.last_step = None
    return results

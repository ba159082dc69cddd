"""A chat request as a generation job, and a batch of jobs decoded with `model.generation.generate`.

Jobs with equal sampling parameters share one batched (left-padded) `generate` call; a streaming job gets each id
as it is generated (generate's on_step hook).
"""

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from components.serve.protocol import APIError, ChatCompletionRequest
from model.chat import ChatFormatError, encode_prompt
from model.generation import SamplingParams, generate
from model.llama import Transformer
from model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    params: SamplingParams
    batch_key: tuple  # jobs with equal keys share one generate() call
    on_token: Callable[[int], None] | None = field(default=None, compare=False)  # streaming: each id as it comes


def make_job(req: ChatCompletionRequest, tokenizer: Tokenizer, context_length: int, default_max_tokens: int,
             on_token: Callable[[int], None] | None = None) -> Job:
    """Tokens and sampling parameters of a request, checked against the context length (APIError 400 if past it)."""
    try:
        prompt = encode_prompt(tokenizer, [m.model_dump() for m in req.messages])
    except ChatFormatError as exc:
        raise APIError(400, str(exc), param="messages") from None
    room = context_length - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context length is "
                            f"{context_length}", param="messages", code="context_length_exceeded")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the context "
                            f"length {context_length}", param="max_tokens", code="context_length_exceeded")
    params = SamplingParams(
        max_new_tokens=max_tokens or min(default_max_tokens, room), temperature=req.temperature,
        top_p=req.top_p, seed=req.seed,
        # Token-level stops end generation early when the model writes a stop string with these exact ids; the
        # text cut in text.detokenize is what guarantees it (the same string can tokenize differently in context).
        stop=[tokenizer.encode(s) for s in req.stop if tokenizer.encode(s)])
    # A seeded request runs alone: its random draws would otherwise depend on what it was batched with.
    key = (params.max_new_tokens, params.temperature, params.top_p, tuple(map(tuple, params.stop)),
           uuid.uuid4().hex if req.seed is not None else None)
    return Job(prompt, params, key, on_token)


def run_jobs(model: Transformer, tokenizer: Tokenizer, jobs: list[Job]) -> list[tuple[list[int], str]]:
    """(generated ids, finish reason) of each job, one generate() call per batch key."""
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

        out = generate(model, [jobs[i].prompt for i in indices], jobs[indices[0]].params,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, on_step=on_step if any(sinks) else None)
        for i, tokens, reason in zip(indices, out.tokens, out.finish_reasons):
            results[i] = (tokens, reason)
    return results

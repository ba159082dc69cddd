"""Requests as the decode engine takes them: `prepare_chat` / `prepare_completion` turn a validated request into a
`Prepared` (prompt ids, sampling parameters, n, logprobs wanted); app.py submits its n choices to the replica's
engine (engine.py). `token_entry` is a generated id as a logprobs answer shows it.
"""

import re
from dataclasses import dataclass

from components.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from model.chat import SAMPLING_DEFAULTS, ChatFormatError, encode_prompt
from model.generation import SamplingParams
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
    top_logprobs: int  # the most likely alternatives wanted at each position (0: none)
    stop: list[str]  # stop strings (the text is cut at the first; params.stop has their token ids)

    def choice_params(self, i: int) -> SamplingParams:
        if self.params.seed is None or i == 0:
            return self.params
        seed = self.params.seed + i
        return SamplingParams(**{**vars(self.params), "seed": seed - 2 ** 64 if seed >= 2 ** 64 else seed})


def _prepare(prompt: list[int], req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
             logprobs: bool, top_logprobs: int, tokenizer: Tokenizer, context_length: int, default_max_tokens: int,
             param: str) -> Prepared:
    room = context_length - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context length is "
                            f"{context_length}", param=param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the context "
                            f"length {context_length}", param="max_tokens", code="context_length_exceeded")
    temperature = SAMPLING_DEFAULTS["temperature"] if req.temperature is None else req.temperature
    params = SamplingParams(
        max_new_tokens=max_tokens or min(default_max_tokens, room),
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=SAMPLING_DEFAULTS["top_p"] if req.top_p is None else req.top_p, seed=req.seed,
        # Token-level stops end generation early when the model writes a stop string with these exact ids; the
        # text cut in text.detokenize is what guarantees it (the same string can tokenize differently in context).
        stop=[ids for s in req.stop if (ids := tokenizer.encode(s))])
    return Prepared(prompt, params, req.n, logprobs, top_logprobs, req.stop)


def prepare_chat(req: ChatCompletionRequest, tokenizer: Tokenizer, context_length: int,
                 default_max_tokens: int) -> Prepared:
    """A chat request's prompt and sampling parameters, checked against the context length (APIError 400)."""
    try:
        prompt = encode_prompt(tokenizer, [m.model_dump() for m in req.messages])
    except ChatFormatError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return _prepare(prompt, req, req.max_completion_tokens or req.max_tokens, req.logprobs, req.top_logprobs,
                    tokenizer, context_length, default_max_tokens, "messages")


def prepare_completion(req: CompletionRequest, tokenizer: Tokenizer, context_length: int,
                       default_max_tokens: int) -> Prepared:
    """A completions request's prompt (text, encoded with BOS, or token ids) and sampling parameters."""
    if isinstance(req.prompt, str):
        prompt = tokenizer.encode(req.prompt, bos=True)
    else:
        prompt = req.prompt
        if not all(0 <= i < tokenizer.vocab_size for i in prompt):
            raise APIError(400, f"prompt: token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
    return _prepare(prompt, req, req.max_tokens, req.logprobs is not None, req.logprobs or 0,
                    tokenizer, context_length, default_max_tokens, "prompt")


def token_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> tuple[str, float, list[int]]:
    """(token text, log-probability, its UTF-8 bytes) of one generated id, for a logprobs answer."""
    piece = tokenizer.id_to_piece(token_id)
    if byte := _BYTE_PIECE.fullmatch(piece):  # a byte-fallback id: one byte of a character
        return f"bytes:\\x{byte.group(1).lower()}", logprob, [int(byte.group(1), 16)]
    text = piece.replace("\u2581", " ")
    return text, logprob, list(text.encode("utf-8"))

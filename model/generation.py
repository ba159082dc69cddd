"""Batched generation with a KV cache: the one decoding path for PPO rollouts, rejection sampling, evaluation and
serving.

Prompts of different lengths are left-padded into one batch: every row then writes the same cache slot each step,
padding keys are masked out, and rotary positions restart at each row's first real token, so a row decodes exactly
as it would alone.

generate() decodes one batch to its end; components/serve/engine.py runs a batch that rows join and leave, on the same
pieces: prefill, decode_step and the samplers (sample_next for one parameter set, sample_rows for a row each).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.kernels import compile_enabled
from model.llama import ContextLengthError, KVCache, Transformer, padding_attention_mask, positions_from_mask

StepHook = Callable[[list[int], list[int]], None]  # (the step's ids, their row indices)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: list[list[int]] = field(default_factory=list)  # token sequences that end a row (kept in the output)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(len(s) == 0 for s in self.stop):
            raise ValueError("stop sequences must not be empty")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per prompt, the eos or stop sequence included
    logprobs: list[list[float]]  # log-probability of each generated id under the (temperature-scaled) policy
    finish_reasons: list[str]  # "stop" (eos or a stop sequence) or "length"


def top_p_filter(probs: torch.Tensor, top_p: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted descending with everything past the top_p mass zeroed, and their ids; top_p a float or
    one per row (B, 1)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    mask = probs_sort.cumsum(dim=-1) - probs_sort > top_p
    return probs_sort.masked_fill(mask, 0.0), probs_idx


def check_probs(probs: torch.Tensor) -> None:
    """torch.multinomial's refusals, made before any draw (a generator's state only moves on valid input)."""
    if not bool(((probs.amax(-1) < float("inf")) & (probs.amin(-1) >= 0) & (probs.sum(-1) > 0)).all()):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0, or a row sums to 0")


def draw(probs: torch.Tensor, generator: torch.Generator | None | list[torch.Generator | None]) -> torch.Tensor:
    """One id per row of probs (B, V), the draw torch.multinomial(probs, 1, generator) makes: argmax(p / q), q ~ Exp(1)
    (its one-sample path). generator a list: row i draws from generators[i] alone what it would draw as a batch of
    one, so a seeded row's ids do not depend on its neighbours (None rows share the default generator)."""
    check_probs(probs)
    q = torch.empty_like(probs)
    if not isinstance(generator, list):
        q.exponential_(1, generator=generator)
    else:
        shared = [i for i, g in enumerate(generator) if g is None]
        if len(shared) == len(generator):
            q.exponential_(1)
        elif shared:
            q[shared] = torch.empty(len(shared), probs.shape[-1], dtype=q.dtype, device=q.device).exponential_(1)
        for i, g in enumerate(generator):
            if g is not None:
                q[i:i + 1].exponential_(1, generator=g)
    return (probs / q).argmax(-1)


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability mass exceeds top_p (Meta's sample_top_p)."""
    probs_sort, probs_idx = top_p_filter(probs, top_p)
    next_token = draw(probs_sort, generator)
    return torch.gather(probs_idx, -1, next_token[:, None]).squeeze(-1)


def top_k_filter(logits: torch.Tensor, top_k: int | torch.Tensor) -> torch.Tensor:
    """Logits below each row's k-th largest set to -inf; top_k an int or one per row (B,), 0 = no filter."""
    ks = torch.as_tensor(top_k, device=logits.device).clamp(max=logits.shape[-1]).expand(logits.shape[0])
    top = torch.topk(logits, int(ks.max()), dim=-1).values
    kth = top.gather(-1, (ks - 1).clamp(min=0)[:, None])
    return logits.masked_fill((logits < kth) & (ks > 0)[:, None], float("-inf"))


def sample_next(logprobs: torch.Tensor, params: SamplingParams, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next id per row from log-probabilities (B, V) at temperature 1 (shifted logits: the same softmax at
    any temperature); return it and its log-probability under the temperature-scaled policy."""
    if params.temperature == 0:
        best, next_token = logprobs.max(dim=-1)
        return next_token, best
    logits = logprobs / params.temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.top_k:
        logits = top_k_filter(logits, params.top_k)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        next_token = sample_top_p(probs, params.top_p, generator)
    else:
        next_token = draw(probs, generator)
    return next_token, logprobs.gather(-1, next_token[:, None]).squeeze(-1)


def sample_rows(logprobs: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_next for a batch whose rows have their own parameters and generators (a serving batch), all batched
    but the Exp(1) draw of each seeded row, which comes from its own generator (draw): a seeded row's ids do not
    depend on its neighbours. Bad probabilities raise before any generator moves."""
    if all(p.temperature == 0 for p in params):  # an all-greedy batch (a greedy request alone): sample_next's path
        chosen, ids = logprobs.max(dim=-1)
        return ids, chosen
    B = logprobs.shape[0]
    ids = torch.zeros(B, dtype=torch.long, device=logprobs.device)
    chosen = torch.zeros(B, dtype=logprobs.dtype, device=logprobs.device)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    sampled = [i for i, p in enumerate(params) if p.temperature != 0]
    if greedy:
        index = torch.tensor(greedy, device=logprobs.device)
        chosen[index], ids[index] = logprobs.index_select(0, index).max(dim=-1)
    if sampled:
        index = torch.tensor(sampled, device=logprobs.device)
        rows = [params[i] for i in sampled]
        temperature = torch.tensor([p.temperature for p in rows], dtype=logprobs.dtype, device=logprobs.device)
        logits = logprobs.index_select(0, index) / temperature[:, None]
        scaled = torch.log_softmax(logits, dim=-1)
        if any(p.top_k for p in rows):
            logits = top_k_filter(logits, torch.tensor([p.top_k for p in rows], device=logprobs.device))
        probs = torch.softmax(logits, dim=-1)
        nucleus = [j for j, p in enumerate(rows) if p.top_p < 1.0]  # these rows draw over sorted probabilities
        if nucleus:
            top_p = torch.tensor([rows[j].top_p for j in nucleus], dtype=probs.dtype, device=probs.device)
            probs_sort, probs_idx = top_p_filter(probs[nucleus], top_p[:, None])
            probs[nucleus] = probs_sort
        token = draw(probs, [generators[i] for i in sampled])
        if nucleus:
            token[nucleus] = probs_idx.gather(-1, token[nucleus, None]).squeeze(-1)
        ids[index], chosen[index] = token, scaled.gather(-1, token[:, None]).squeeze(-1)
    return ids, chosen


def policy_logprobs(logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution sample_next's log-probabilities are reported under: temperature-scaled (T=1 for greedy)."""
    return logprobs if temperature in (0, 1) else torch.log_softmax(logprobs / temperature, dim=-1)


def make_generator(seed: int | None, device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _last_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax (fp32) of the last position's logits (B, T, V) -> (B, V): inside the compiled step it fuses with
    the output head, where an eager logsumexp per step cost more than the compiled step's attention."""
    return logits[:, -1].float().log_softmax(-1)


def _static_decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                        cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (B, V) for tokens (B, 1) at cache slot pos, a (1,) tensor; positions and key_valid are
    (B, S) for the whole cache. Attention spans every slot, the unwritten ones masked: no shape depends on pos, so
    torch.compile captures this once, not once per step (eager, attending to the written slots only is cheaper)."""
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    mask = (key_valid & (slots <= pos))[:, None, None]  # (B, 1, 1, S)
    return _last_logprobs(model(tokens, positions.index_select(1, pos), mask, cache, pos))


@functools.cache
def _compiled_decode_step():
    # cpp_wrapper: the graph's ~60 kernel and matmul calls made from C++, not Python (less overhead a step). A new
    # batch size or cache length recompiles once, then dims
    # go dynamic.
    return torch.compile(_static_decode_step, fullgraph=True, options={"cpp_wrapper": True})


def cache_dtype(model: Transformer) -> torch.dtype:
    """The dtype of the keys and values model writes: its weights' or, under autocast, autocast's."""
    device = next(model.parameters()).device
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def prefill(model: Transformer, prompts: list[list[int]], pad_id: int, total: int
            ) -> tuple[torch.Tensor, KVCache, torch.Tensor, torch.Tensor]:
    """Left-pad prompts into one block, allocate a cache of `total` slots and run the block through it.

    Returns the last position's log-probabilities (B, V), the cache (the prompts in slots [P - len, P), P the
    longest prompt), key_valid (B, total) (False on padding) and rotary positions (B, total).
    """
    device = next(model.parameters()).device
    B, prompt_len = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, prompt_len), pad_id, dtype=torch.long)
    key_valid = torch.ones(B, total, dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        tokens[i, prompt_len - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        key_valid[i, :prompt_len - len(prompt)] = False
    tokens, key_valid = tokens.to(device), key_valid.to(device)
    positions = positions_from_mask(key_valid)  # (B, total)
    cache = KVCache(model.args, B, total, device=device, dtype=cache_dtype(model))
    mask = None if bool(key_valid.all()) else padding_attention_mask(key_valid[:, :prompt_len], prompt_len)
    logprobs = _last_logprobs(model(tokens, positions[:, :prompt_len], mask, cache, 0))
    return logprobs, cache, key_valid, positions


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None,
                cache: KVCache, pos: int) -> torch.Tensor:
    """One eager decoding step: tokens (B,) at rotary positions (B,) written to cache slot pos, attending to slots
    [0, pos] where key_valid (B, pos + 1) allows (None: all). Returns the next log-probabilities (B, V)."""
    mask = key_valid[:, None, None] if key_valid is not None else None  # (B, 1, 1, S)
    return _last_logprobs(model(tokens[:, None], positions[:, None], mask, cache, pos))


def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, eos_id: int, pad_id: int = 0,
             *, compile: bool | None = None, on_step: StepHook | None = None,
             sync: Callable[[bool], bool] | None = None) -> GenerationOutput:
    """Continue each prompt (a list of token ids) until eos, a stop sequence, or max_new_tokens.

    on_step(tokens, rows): called after every step with the ids it produced for `rows`, the rows that had not
    finished before it (a server streams them as they come).

    sync(all my rows finished) -> stop: for a model sharded over processes, whose every forward is a collective: all
    of them decode the same number of steps and stop together (None: stop when this batch is done).

    compile: run the decode steps through torch.compile; same tokens, up to float rounding. None (the default)
    means eager. Compiling costs seconds to tens of seconds in a fresh process, and again for a new batch size (less
    when inductor's on-disk cache already holds the graphs), and saves a fraction of each step, so it pays only after
    many thousands of decode steps (the README has the measurements). The pipeline's stages decode a few hundred to a few thousand steps per process (ppo: 12 x 24, sampling: 32 a call) and would
    only slow down; long-running processes (a server, a benchmark) pass compile=True. $LLAMA2_COMPILE=0 overrides.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    args = model.args
    device = next(model.parameters()).device
    B, prompt_len, new = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
    total = prompt_len + new
    if total > args.max_seq_len:
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens + max_new_tokens {new} = {total} exceeds the context length "
            f"{args.max_seq_len}; shorten the prompt or lower max_new_tokens")

    logprobs, cache, key_valid, positions = prefill(model, prompts, pad_id, total)
    padded = not bool(key_valid.all())
    generator = make_generator(params.seed, device)
    out_tokens = torch.full((B, new), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(B, new, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), new, dtype=torch.long, device=device)
    stops = [torch.tensor(s, device=device) for s in params.stop]
    compiled_step = _compiled_decode_step() if compile_enabled(compile) else None
    with model.fresh_fused_weights() if compiled_step is not None else contextlib.nullcontext():
        for t in range(new):
            next_token, logprob = sample_next(logprobs, params, generator)
            next_token = next_token.masked_fill(finished, pad_id)
            if on_step is not None:
                rows = (~finished).nonzero().squeeze(1).tolist()
                on_step(next_token[rows].tolist(), rows)
            out_tokens[:, t], out_logprobs[:, t] = next_token, logprob
            done_now = next_token == eos_id
            for stop in stops:
                if t + 1 >= len(stop):
                    done_now |= (out_tokens[:, t + 1 - len(stop):t + 1] == stop).all(-1)
            done_now &= ~finished
            lengths = torch.where(done_now, t + 1, lengths)
            finished |= done_now
            done = bool(finished.all())
            if t == new - 1 or (sync(done) if sync is not None else done):
                break
            pos = prompt_len + t
            if compiled_step is not None:
                logprobs = compiled_step(model, next_token[:, None], positions, key_valid, cache,
                                       torch.tensor([pos], device=device))
            else:  # eager: attend to the written slots only, the least work
                step_valid = key_valid[:, :pos + 1] if padded else None
                logprobs = decode_step(model, next_token, positions[:, pos], step_valid, cache, pos)

    lengths_list, finished_list = lengths.tolist(), finished.tolist()
    tokens_list, logprobs_list = out_tokens.tolist(), out_logprobs.tolist()
    return GenerationOutput(
        tokens=[row[:n] for row, n in zip(tokens_list, lengths_list)],
        logprobs=[row[:n] for row, n in zip(logprobs_list, lengths_list)],
        finish_reasons=["stop" if f else "length" for f in finished_list],
    )

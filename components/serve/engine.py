"""A per-replica decode engine with continuous batching: requests join the running batch at step boundaries and
leave it when done, each row with its own sampling parameters, on model.generation's prefill, step and sampling code.

One background thread owns the batch. Its rows are left-aligned against one shared write slot `pos`: row i holds
its tokens in cache slots [start_i, pos), the slots before start_i masked and rotary positions counted from start_i,
so a row decodes as it would alone; attention spans the slots from the earliest start on. Newcomers are prefilled
in groups of similar length (left-padded, as generate() does; each group's first ids sent before the next's prefill)
and their keys/values copied into slots [pos - P, pos) of free rows, P the group's longest prompt; when P > pos the
batch's window shifts right first, and when pos reaches the cache's end it shifts left, dropping the slots every
live row masks. Leaving rows are replaced by the batch's last rows, so the running rows are always the cache's first
B.

    engine = Engine(model, tokenizer, max_batch_size=16)
    handle = engine.submit(prompt_ids, SamplingParams(...), on_token=print)   # any thread
    completion = await handle.result()        # or handle.future.result(); cancelling either frees the row
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from components.serve.text import StopMatcher
from model.generation import (SamplingParams, cache_dtype, decode_step, make_generator, policy_logprobs, prefill,
                              sample_rows)
from model.llama import ContextLengthError, KVCache, Transformer

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class EngineFull(RuntimeError):
    """The queue holds max_queued requests already (a server answers 503)."""


class EngineClosed(RuntimeError):
    """The engine was closed before the request finished."""


@dataclass(frozen=True)
class Token:
    """One generated id, as on_token receives it."""
    id: int
    logprob: float  # under the row's temperature-scaled policy (T=1 for greedy), as generate() reports it
    top: list[tuple[int, float]] | None  # the top_logprobs most likely (id, logprob), best first; None if not asked


@dataclass
class Completion:
    tokens: list[int]  # the eos or stop sequence included, as generate() returns them
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str  # "stop" (eos or a stop sequence) or "length"
    prompt_tokens: int


@dataclass
class EngineStats:
    queued: int  # submitted, not yet in the batch
    running: int  # rows in the batch
    tokens: int  # generated since start
    steps: int  # batched decode steps since start
    prefills: int  # prefill calls (each admits one or more requests)
    finished: int
    failed: int
    cancelled: int
    relays: int  # cache windows shifted (a newcomer longer than pos, or the cache full)


class StopMatchers:
    """Whether the ids fed so far end with any of the stop sequences (text.StopMatcher's automaton for each): no
    re-scan of the output, however long it or the stop sequences are."""

    def __init__(self, stops: list[list[int]]):
        self.matchers = [StopMatcher(list(s)) for s in stops]

    def feed(self, token: int) -> bool:
        return any([m.feed(token) for m in self.matchers])  # a list: every automaton advances


class Handle:
    """A submitted request: its future completes with a Completion, or with the exception that failed it alone."""

    def __init__(self, prompt: list[int], params: SamplingParams, top_logprobs: int,
                 on_token: Callable[[Token], None] | None):
        self.prompt, self.params, self.top_logprobs, self.on_token = prompt, params, top_logprobs, on_token
        self.future: concurrent.futures.Future[Completion] = concurrent.futures.Future()

    def result(self) -> asyncio.Future:
        """An asyncio future of the Completion (call inside a running loop); cancelling it cancels the request."""
        return asyncio.wrap_future(self.future)

    def cancel(self) -> bool:
        return self.future.cancel()


@dataclass
class _Row:
    handle: Handle
    generator: torch.Generator | None
    matcher: StopMatchers
    start: int = 0  # first cache slot of the row's tokens
    last: int = 0  # the id to feed at the next step
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    done: bool = False


def _settle(future: concurrent.futures.Future, result=None, error: BaseException | None = None) -> bool:
    """Complete a future unless it was cancelled meanwhile (cancel() races with the decode thread)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
        return True
    except concurrent.futures.InvalidStateError:
        return False


class Engine:
    """Continuous batching over one model on one device; see the module docstring."""

    def __init__(self, model: Transformer, tokenizer, max_batch_size: int = 16, *, max_queued: int | None = None,
                 max_len: int | None = None, prefill_tokens: int = 128):
        """tokenizer: anything with eos_id and pad_id. max_queued: submit() raises EngineFull past it (None: no
        bound). max_len: cache slots per row (default the model's context length), the bound on prompt + new.
        prefill_tokens: the padded prompt tokens one prefill call takes at most (a longer prompt goes alone)."""
        if max_batch_size < 1 or prefill_tokens < 1:
            raise ValueError(f"max_batch_size and prefill_tokens must be >= 1, got {max_batch_size}, {prefill_tokens}")
        self.prefill_tokens = prefill_tokens
        self.model, self.max_batch_size, self.max_queued = model, max_batch_size, max_queued
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
        self.max_len = max_len or model.args.max_seq_len
        self.device = next(model.parameters()).device
        self._cache = KVCache(model.args, max_batch_size, self.max_len, device=self.device, dtype=cache_dtype(model))
        self._rows: list[_Row] = []  # the running batch: row i is cache row i
        self._pos = 0  # the shared write slot of the next step
        self._pending: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._counts = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, on_token: Callable[[Token], None] | None = None,
               top_logprobs: int = 0) -> Handle:
        """Queue a request; raises ValueError/ContextLengthError on bad input, EngineFull when the queue is full.

        on_token(Token) is called on the decode thread for each generated id (keep it short: a server hands it to
        its event loop with call_soon_threadsafe); if it raises, that request fails with the exception.
        """
        vocab = self.model.args.vocab_size
        if not prompt or not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt must be a non-empty list of token ids in [0, {vocab})")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params.__post_init__()  # a dataclass may have been changed since it was built
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ContextLengthError(f"prompt of {len(prompt)} tokens + max_new_tokens {params.max_new_tokens} "
                                     f"exceeds the context length {self.max_len}")
        handle = Handle(list(prompt), params, top_logprobs, on_token)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if self.max_queued is not None and len(self._pending) >= self.max_queued:
                raise EngineFull(f"{len(self._pending)} requests are queued (max_queued {self.max_queued})")
            self._pending.append(handle)
            self._cond.notify()
        return handle

    def cancel(self, handle: Handle) -> bool:
        """Cancel a request: a queued one never runs, a running row leaves the batch at the next step."""
        return handle.cancel()

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(queued=len(self._pending), running=sum(not r.done for r in self._rows),
                               tokens=self._counts["tokens"],
                               steps=self._counts["steps"], prefills=self._counts["prefills"],
                               finished=self._counts["finished"], failed=self._counts["failed"],
                               cancelled=self._counts["cancelled"], relays=self._counts["relays"])

    @property
    def alive(self) -> bool:
        """Whether the decode thread runs (a health check's first question)."""
        return self._thread.is_alive()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the decode thread; queued and running requests fail with EngineClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the decode thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._pending and not self._rows:
                        self._cond.wait()
                    if self._closed:
                        break
                    newcomers = []
                    while self._pending and len(self._rows) + len(newcomers) < self.max_batch_size:
                        handle = self._pending.popleft()
                        if handle.future.cancelled():
                            self._counts["cancelled"] += 1
                        else:
                            newcomers.append(handle)
                try:
                    if newcomers:
                        self._admit(newcomers)
                    if self._rows:
                        self._step()
                    self._drop_done()
                except Exception as exc:  # noqa: BLE001 - the forward itself failed: fail the batch, keep serving
                    for row in self._rows:
                        if not row.done:
                            self._fail(row, exc)
                    with self._cond:
                        self._rows, self._pos = [], 0
        error = EngineClosed("the engine was closed")
        for row in self._rows:
            _settle(row.handle.future, error=error)
        with self._cond:
            for handle in self._pending:
                _settle(handle.future, error=error)
            self._pending.clear()

    def _admit(self, handles: list[Handle]) -> None:
        """Prefill newcomers in groups of similar length, at most prefill_tokens padded tokens each, every group's
        first ids sent before the next group's prefill: a burst of requests (clients that finished together) gets
        its first tokens in turn, less padded, instead of all after one large prefill."""
        group: list[Handle] = []
        for handle in sorted(handles, key=lambda h: len(h.prompt)):
            if group and (len(group) + 1) * len(handle.prompt) > self.prefill_tokens:
                self._admit_group(group)
                group = []
            group.append(handle)
        self._admit_group(group)

    def _admit_group(self, handles: list[Handle]) -> None:
        """Prefill newcomers, sample their first ids, and put those still running into the batch's free rows."""
        rows = [_Row(h, make_generator(h.params.seed, self.device), StopMatchers(h.params.stop)) for h in handles]
        prompts = [h.prompt for h in handles]
        P = max(len(p) for p in prompts)
        try:
            logprobs, cache, _, _ = prefill(self.model, prompts, self.pad_id, P)
            self._counts["prefills"] += 1
            self._sample(logprobs, rows)
        except Exception as exc:  # noqa: BLE001 - a failed prefill fails its newcomers only
            for row in rows:
                if not row.done:
                    self._fail(row, exc)
            return
        keep = [i for i, row in enumerate(rows) if not row.done]
        if not keep:
            return
        B, n = len(self._rows), len(keep)
        if P > self._pos or not self._rows:
            self._relay(P)
        for i in keep:  # in the batch before the copy: if it fails, the batch's failure fails them too
            rows[i].start = self._pos - len(prompts[i])
            self._rows.append(rows[i])
        lo, index = self._pos - P, torch.tensor(keep, device=self.device)
        for layer in range(len(self._cache.k)):
            self._cache.k[layer][B:B + n, :, lo:self._pos] = cache.k[layer].index_select(0, index)
            self._cache.v[layer][B:B + n, :, lo:self._pos] = cache.v[layer].index_select(0, index)

    def _step(self) -> None:
        """One decode step of every running row at slot pos (the window shifted left first if the cache is full)."""
        if self._pos == self.max_len:
            self._relay(self._pos - min(row.start for row in self._rows))
        B, pos = len(self._rows), self._pos
        starts = [row.start for row in self._rows]
        lo = min(starts)  # attention spans slots [lo, pos]: those before every row's start are left out
        start = torch.tensor(starts, device=self.device)
        tokens = torch.tensor([row.last for row in self._rows], device=self.device)
        key_valid = None  # every row starts at slot lo (a row alone, say): no mask, generate()'s unpadded path
        if any(s != lo for s in starts):
            key_valid = torch.arange(lo, pos + 1, device=self.device) >= start[:, None]  # (B, pos + 1 - lo)
        logprobs = decode_step(self.model, tokens, pos - start, key_valid, self._cache.rows(B, lo), pos - lo)
        self._pos += 1
        self._counts["steps"] += 1
        self._sample(logprobs, self._rows)

    def _relay(self, new_pos: int) -> None:
        """Move the batch's window, the slots [pos - keep, pos) some live row attends to, to end at new_pos."""
        B = len(self._rows)
        keep = self._pos - min((row.start for row in self._rows), default=self._pos)
        if B and new_pos != self._pos:
            self._counts["relays"] += 1
            for buf in (*self._cache.k, *self._cache.v):
                buf[:B, :, new_pos - keep:new_pos] = buf[:B, :, self._pos - keep:self._pos].clone()
        for row in self._rows:
            row.start += new_pos - self._pos
        self._pos = new_pos

    def _sample(self, logprobs: torch.Tensor, rows: list[_Row]) -> None:
        """Pick each row's next id under its own parameters, hand it out and finish the rows that are done."""
        failed: dict[int, Exception] = {}
        try:
            ids, chosen = sample_rows(logprobs, [r.handle.params for r in rows], [r.generator for r in rows])
        except Exception:  # noqa: BLE001 - some row's parameters are bad: find it, row by row, and fail it alone
            ids, chosen = torch.zeros(len(rows), dtype=torch.long), torch.zeros(len(rows))
            for i, row in enumerate(rows):  # (sample_rows raises before any generator draws: nothing to undo)
                try:
                    ids[i:i + 1], chosen[i:i + 1] = sample_rows(logprobs[i:i + 1], [row.handle.params],
                                                                [row.generator])
                except Exception as exc:  # noqa: BLE001
                    failed[i] = exc
        for i, (token, logprob) in enumerate(zip(ids.tolist(), chosen.tolist())):
            row = rows[i]
            if row.handle.future.cancelled():  # leaves at the step's end, unseen
                row.done = True
                self._counts["cancelled"] += 1
                continue
            if i in failed:
                self._fail(row, failed[i])
                continue
            top = None
            if row.handle.top_logprobs:
                dist = policy_logprobs(logprobs[i:i + 1], row.handle.params.temperature)[0]
                values, indices = dist.topk(row.handle.top_logprobs)
                top = list(zip(indices.tolist(), values.tolist()))
                row.tops.append(top)
            row.tokens.append(token)
            row.logprobs.append(logprob)
            row.last = token
            self._counts["tokens"] += 1
            stopped = row.matcher.feed(token) or token == self.eos_id
            if row.handle.on_token is not None:
                try:
                    row.handle.on_token(Token(token, logprob, top))
                except Exception as exc:  # noqa: BLE001 - a failing consumer fails its request only
                    self._fail(row, exc)
                    continue
            if stopped or len(row.tokens) == row.handle.params.max_new_tokens:
                row.done = True
                completion = Completion(row.tokens, row.logprobs, row.tops if row.handle.top_logprobs else None,
                                        "stop" if stopped else "length", len(row.handle.prompt))
                self._counts["finished" if _settle(row.handle.future, completion) else "cancelled"] += 1

    def _fail(self, row: _Row, exc: BaseException) -> None:
        row.done = True
        self._counts["failed" if _settle(row.handle.future, error=exc) else "cancelled"] += 1

    def _drop_done(self) -> None:
        """Remove finished and cancelled rows: the batch's last live rows move into their places."""
        for row in self._rows:
            if not row.done and row.handle.future.cancelled():
                row.done = True
                self._counts["cancelled"] += 1
        live = [i for i, row in enumerate(self._rows) if not row.done]
        if len(live) == len(self._rows):
            return
        n = len(live)
        holes = [i for i in range(n) if self._rows[i].done]
        movers = [i for i in live if i >= n]
        if holes:
            lo = min(self._rows[i].start for i in movers)
            dst, src = torch.tensor(holes, device=self.device), torch.tensor(movers, device=self.device)
            for buf in (*self._cache.k, *self._cache.v):
                buf[dst, :, lo:self._pos] = buf[src, :, lo:self._pos]
            for hole, mover in zip(holes, movers):
                self._rows[hole] = self._rows[mover]
        with self._cond:
            self._rows = self._rows[:n]
            if not self._rows:
                self._pos = 0

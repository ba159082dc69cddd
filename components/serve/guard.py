"""The serve-time safety guard (off by default; AppArgs.safety_guard): each finished answer is scored by the trained
safety reward model on (prompt messages + answer), the probability rlhf uses (sigmoid of the RM score, reward.py's
rm_scores); an answer below the threshold is replaced by the refusal text with OpenAI's finish_reason
"content_filter". The paper's models have no such guard: it is the served product's last line, measured by
benchmarks/bench_guard.py.

The guard judges whole answers, so a guarded stream is buffered: its events are sent once the answers are scored
(the stream's format is unchanged; its first token comes at the end, and a timeout before it is a plain 504 JSON
error, nothing having been sent). Streaming the text first and retracting it after would have shown the client the
very answer the guard withholds. Concurrent requests' answers share RM passes (ascreen).

The RM comes from a checkpoint folder or a models:/ URI (default `llama2-rm-safety@champion`: the register stage
moves that alias with the chat model's, so the guard judges with the safety RM of the served model's round); the
threshold, unless set, is the one the rm_safety stage chose (its threshold.json, registered with the checkpoint),
else the paper's 0.15.
"""

import asyncio
import logging
import threading
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from components.rlhf.reward import PAPER_THRESHOLD, THRESHOLD_FILE, rm_scores, saved_threshold
from components.serve import protocol
from components.serve.resolve import resolve_checkpoint
from model.chat import ChatFormatError
from model.checkpoint import load_checkpoint
from model.llama import Transformer
from model.tokenizer import Tokenizer

SAFETY_MODEL_ENV = "LLAMA2_SAFETY_MODEL_URI"  # overrides AppArgs.safety_model_uri (as LLAMA2_MODEL_URI does)
CONTENT_FILTER = "content_filter"  # OpenAI's finish_reason for an answer its filter withheld
logger = logging.getLogger("ray.serve")

# A finished choice as app.py builds it: (text, completion tokens used, finish_reason, logprobs or None).
Finished = tuple[str, int, str, dict | None]


def threshold_for(checkpoint: str | Path, threshold: float | None) -> tuple[float, str]:
    """The threshold to use and where it came from: the one given, else the rm_safety stage's choice written in the
    RM's folder (THRESHOLD_FILE), else the paper's."""
    if threshold is not None:
        return float(threshold), "configured"
    if (saved := saved_threshold(checkpoint)) is not None:
        return saved, str(Path(checkpoint) / THRESHOLD_FILE)
    return PAPER_THRESHOLD["threshold"], "paper"


class SafetyGuard:
    """A safety RM, its threshold and the refusal; its decisions counted in `registry` (the replica's /metrics)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, threshold: float, refusal: str,
                 registry: CollectorRegistry | None = None, batch_size: int = 8):
        if model.args.head != "scalar":
            raise ValueError("the safety guard needs a reward model (a checkpoint with head 'scalar'), got an LM")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.threshold, self.refusal, self.batch_size = threshold, refusal, batch_size
        self._lock = threading.Lock()  # one RM forward at a time: concurrent ones would only share the same cores
        self._pending: list[tuple[list[dict], list[Finished], asyncio.Future]] = []  # ascreen's, for the next pass
        self._worker: asyncio.Future | None = None
        registry = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter("llama2_serve_guard_decisions", "answers the safety guard judged, by decision "
                                 "(kept; refused: below the threshold; unscorable: refused, the RM could not read "
                                 "it)", ["decision"], registry=registry).labels
        for decision in ("kept", "refused", "unscorable"):
            self.decisions(decision=decision)  # exported at 0 from the start
        self.seconds = Histogram("llama2_serve_guard_seconds", "safety RM scoring time per pass (one request's "
                                 "answers, or several requests' together)",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5), registry=registry)
        Gauge("llama2_serve_guard_threshold", "safety RM probability below which an answer is refused",
              registry=registry).set(threshold)

    def probabilities(self, prompt: list[dict], answers: list[str]) -> list[float]:
        """sigmoid(safety RM score) of each answer to the prompt messages."""
        return self._probabilities([prompt + [{"role": "assistant", "content": a}] for a in answers])

    def _probabilities(self, dialogs: list[list[dict]]) -> list[float]:
        # The last max_seq_len tokens are read: the score is the one at the answer's </s>.
        with self._lock:
            return rm_scores(self.model, self.tokenizer, dialogs, self.batch_size,
                             max_len=self.model.args.max_seq_len)

    def judge(self, prompt: list[dict], answers: list[str]) -> list[bool]:
        """Whether each answer is kept (counted)."""
        return [f[2] != CONTENT_FILTER for f in self.screen(prompt, [(a, 0, "stop", None) for a in answers])]

    def screen(self, prompt: list[dict], finished: list[Finished]) -> list[Finished]:
        """The finished choices with each one the guard does not keep replaced by the refusal (its logprobs dropped:
        they would tell the withheld answer); the tokens generated are still the usage."""
        return self.screen_many([(prompt, finished)])[0]

    def screen_many(self, requests: list[tuple[list[dict], list[Finished]]]) -> list[list[Finished]]:
        """screen of several requests, their answers scored in one RM pass. An answer the RM cannot read (the chat
        template refuses the conversation) is refused, the guard failing closed, and only its own request's: a
        pass that fails so is redone one request at a time."""
        dialogs = [prompt + [{"role": "assistant", "content": text}] for prompt, finished in requests
                   for text, *_ in finished]
        started = time.perf_counter()
        try:
            kept = [p >= self.threshold for p in self._probabilities(dialogs)]
        except ChatFormatError as exc:
            if len(requests) > 1:
                return [self.screen(*request) for request in requests]
            logger.warning("safety guard: cannot score the answers (%s); refusing them", exc)
            kept = [None] * len(dialogs)
        self.seconds.observe(time.perf_counter() - started)
        for k in kept:
            self.decisions(decision={True: "kept", False: "refused", None: "unscorable"}[k]).inc()
        verdicts = iter(kept)
        return [[f if next(verdicts) else (self.refusal, f[1], CONTENT_FILTER, None) for f in finished]
                for _, finished in requests]

    async def ascreen(self, prompt: list[dict], finished: list[Finished]) -> list[Finished]:
        """screen off the event loop (the RM forward is CPU/GPU-bound). Concurrent requests share RM passes: those
        that arrive while one runs are scored together in the next."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((prompt, finished, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await asyncio.to_thread(self.screen_many, [(p, f) for p, f, _ in batch])
            except Exception as exc:  # a real fault: every request of the pass gets it (a 500 each)
                results = [exc] * len(batch)
            for (*_, future), result in zip(batch, results):
                if future.done():  # the request was cancelled (client gone, timeout)
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def load_guard(model_uri: str, threshold: float | None, refusal: str, tracking_uri: str | None,
               cache_dir: str | None, device: torch.device, dtype: torch.dtype | None,
               registry: CollectorRegistry | None = None) -> SafetyGuard:
    """The guard of a replica: the safety RM resolved as the chat model is (folder or models:/ URI, hash-checked
    cache), on the chat model's device."""
    checkpoint = resolve_checkpoint(model_uri, tracking_uri, cache_dir)
    model, tokenizer = load_checkpoint(checkpoint, device=device, dtype=dtype)
    value, source = threshold_for(checkpoint, threshold)
    logger.info("safety guard: %s, threshold %.3f (%s)", model_uri, value, source)
    return SafetyGuard(model, tokenizer, value, refusal, registry)


def buffered_events(chat: bool, head: tuple, finished: list[Finished], usage: dict | None):
    """A guarded stream's server-sent events, all known before the first is sent: per choice its role (chat), its
    whole text, its finish reason (and logprobs); the usage chunk when asked for; [DONE]."""
    object_ = "chat.completion.chunk" if chat else "text_completion"
    for i, (text, _, finish, logprobs) in enumerate(finished):
        if chat:
            for delta, last in (({"role": "assistant", "content": ""}, False), ({"content": text}, False),
                                ({}, True)):
                yield protocol.sse(protocol.chunk(object_, *head, {
                    "index": i, "delta": delta, "logprobs": logprobs if last else None,
                    "finish_reason": finish if last else None}))
        else:
            yield protocol.sse(protocol.chunk(object_, *head, protocol.text_choice(i, text, None, None)))
            yield protocol.sse(protocol.chunk(object_, *head, protocol.text_choice(i, "", finish, logprobs)))
    if usage is not None:
        yield protocol.sse(protocol.usage_chunk(object_, *head, usage))
    yield protocol.sse("[DONE]")

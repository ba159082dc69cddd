"""The continuous-batching engine (components/serve/engine.py): rows that join and leave a running batch decode
exactly as generate() decodes each prompt alone; per-row parameters; cancellation and failures stay in their row."""

from __future__ import annotations

import concurrent.futures
import threading
import types

import pytest
import torch

from components.serve.engine import Engine, EngineClosed, EngineFull, StopMatchers
from model.generation import SamplingParams, draw, generate, sample_next, sample_rows
from tests.helpers import debug_model, small_tokenizer

NO_EOS = types.SimpleNamespace(eos_id=-1, pad_id=0)  # rows run to max_new_tokens
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model():
    return debug_model(std=0.1)  # std 0.1: well-separated logits, so float rounding cannot flip a greedy pick


def alone(model, prompt, params, eos_id=-1):
    with torch.inference_mode():
        out = generate(model, [prompt], params, eos_id=eos_id)
    return out.tokens[0], out.logprobs[0], out.finish_reasons[0]


def random_prompts(lengths, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=gen).tolist() for n in lengths]


class After:
    """on_token that sets an event once n ids have come."""

    def __init__(self, n):
        self.n, self.count, self.event = n, 0, threading.Event()

    def __call__(self, token):
        self.count += 1
        if self.count >= self.n:
            self.event.set()


def test_stop_matcher_finds_overlapping_sequences():
    matcher = StopMatchers([[1, 1, 2], [3]])
    assert [matcher.feed(t) for t in [1, 1, 1, 2, 4, 3, 1, 2]] == [False, False, False, True, False, True, False,
                                                                    False]


def test_sample_rows_draws_what_sample_next_draws_alone():
    logprobs = torch.randn(6, 512, generator=torch.Generator().manual_seed(0)).mul(3).log_softmax(-1)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.8, seed=1),
              SamplingParams(temperature=1.3, top_k=7, seed=2), SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=0.9, top_k=40, top_p=0.5, seed=4), SamplingParams(temperature=0)]
    for step in range(5):
        generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed + step) for p in params]
        ids, chosen = sample_rows(logprobs, params, generators)
        for i, p in enumerate(params):
            generator = None if p.seed is None else torch.Generator().manual_seed(p.seed + step)
            expected_id, expected_logprob = sample_next(logprobs[i:i + 1], p, generator)
            assert ids[i] == expected_id[0] and chosen[i] == expected_logprob[0]


def test_draw_is_multinomials_draw_row_by_row():
    probs = torch.randn(5, 512, generator=torch.Generator().manual_seed(1)).mul(3).softmax(-1)
    probs[2, 100:] = 0  # a truncated (top-p) row
    seeds = [7, None, 8, 9, None]
    generators = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    ids = draw(probs, generators)
    for i, seed in enumerate(seeds):
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            assert ids[i] == torch.multinomial(probs[i:i + 1], 1, generator=generator)[0, 0]
            assert torch.equal(generator.get_state(), generators[i].get_state())  # as many draws as multinomial's
    whole = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))[:, 0]
    assert torch.equal(draw(probs, torch.Generator().manual_seed(3)), whole)  # generate()'s one-generator batch
    assert probs[2, ids[2]] > 0
    untouched = torch.Generator().manual_seed(5)
    with pytest.raises(RuntimeError, match="nan"):
        draw(torch.stack([probs[0], torch.full((512,), float("nan"))]), [untouched, None])
    assert torch.equal(untouched.get_state(), torch.Generator().manual_seed(5).get_state())  # refused before drawing


def test_staggered_greedy_rows_equal_generate_alone(model):
    tok = small_tokenizer()
    texts = ["the quick brown fox", "hello world zorp", "what is how do I kill a stuck process answer", "dax",
             "red blue green house river tree stone light dark the quick brown fox jumps over lazy dog cat sat",
             "user assistant system", "always reply in uppercase"]
    prompts = [tok.encode(t) for t in texts] + random_prompts([30, 2])
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (14, 6, 12, 10, 12, 9, 11, 13, 8)]
    # max_len 44: the cache fills and re-lays while rows run; the long prompts join after pos has moved past short ones
    engine = Engine(model, tok, max_batch_size=4, max_len=44)
    try:
        first = After(4)
        handles = [engine.submit(prompts[0], params[0], on_token=first), engine.submit(prompts[1], params[1])]
        assert first.event.wait(30)
        assert engine.stats().running >= 1
        later = After(3)
        handles.append(engine.submit(prompts[2], params[2], on_token=later))
        assert later.event.wait(30)
        handles += [engine.submit(p, q) for p, q in zip(prompts[3:], params[3:])]
        results = [h.future.result(60) for h in handles]
        stats = engine.stats()
    finally:
        engine.close()
    for prompt, param, result in zip(prompts, params, results):
        tokens, logprobs, reason = alone(model, prompt, param, tok.eos_id)
        assert result.tokens == tokens
        assert result.finish_reason == reason
        assert result.prompt_tokens == len(prompt)
        torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0)
    assert stats.relays >= 2 and stats.finished == len(prompts) and stats.failed == 0
    assert stats.tokens == sum(len(r.tokens) for r in results)


def test_per_row_params_in_one_batch_match_alone(model):
    prompts = random_prompts([5, 9, 3, 12, 7])
    params = [SamplingParams(max_new_tokens=16, temperature=0),
              SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=5),
              SamplingParams(max_new_tokens=16, temperature=1.2, top_k=20, seed=11),
              SamplingParams(max_new_tokens=16, temperature=1.0, seed=3),
              SamplingParams(max_new_tokens=16, temperature=0.7)]  # unseeded: only shares the batch
    engine = Engine(model, NO_EOS, max_batch_size=8)
    try:
        handles = [engine.submit(p, q, top_logprobs=3) for p, q in zip(prompts, params)]
        results = [h.future.result(60) for h in handles]
    finally:
        engine.close()
    for prompt, param, result in zip(prompts[:4], params, results):
        tokens, logprobs, _ = alone(model, prompt, param)
        assert result.tokens == tokens
        torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0)
    greedy = results[0]
    assert all(top[0][0] == t and abs(top[0][1] - lp) < 1e-5 for top, t, lp in
               zip(greedy.top_logprobs, greedy.tokens, greedy.logprobs))
    assert all(len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] for r in results for top in r.top_logprobs)
    assert len(results[4].tokens) == 16


def test_prefill_groups_stay_within_the_token_budget(model):
    prompts = random_prompts([5, 9, 3, 12])
    params = [GREEDY, SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=5), GREEDY, GREEDY]
    engine = Engine(model, NO_EOS, max_batch_size=4, prefill_tokens=10)
    try:
        with engine._cond:  # (re-entrant) the decode thread sees the four at once: a burst
            handles = [engine.submit(p, q) for p, q in zip(prompts, params)]
        results = [h.future.result(60) for h in handles]
        assert engine.stats().prefills == 3  # 3 and 5 together (2 x 5 padded tokens), 9 alone, 12 alone
    finally:
        engine.close()
    for prompt, param, result in zip(prompts, params, results):
        assert result.tokens == alone(model, prompt, param)[0]


def test_seeded_row_same_alone_and_batched(model):
    prompt, params = random_prompts([6])[0], SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=42)
    engine = Engine(model, NO_EOS, max_batch_size=8)
    try:
        solo = engine.submit(prompt, params).future.result(60)
        others = [engine.submit(p, SamplingParams(max_new_tokens=20, temperature=1.0)) for p in random_prompts(
            [4, 8, 13], seed=3)]
        batched = engine.submit(prompt, params).future.result(60)
        [h.future.result(60) for h in others]
    finally:
        engine.close()
    assert solo.tokens == batched.tokens == alone(model, prompt, params)[0]


def test_stop_sequences_and_eos_end_a_row(model):
    prompt = random_prompts([5])[0]
    free, _, _ = alone(model, prompt, GREEDY)
    eos, stop = free[6], SamplingParams(max_new_tokens=12, temperature=0, stop=[free[2:4]])
    engine = Engine(model, types.SimpleNamespace(eos_id=eos, pad_id=0), max_batch_size=4)
    try:
        by_stop, by_eos = engine.submit(prompt, stop), engine.submit(prompt, GREEDY)
        by_stop, by_eos = by_stop.future.result(60), by_eos.future.result(60)
    finally:
        engine.close()
    assert by_stop.tokens == alone(model, prompt, stop, eos)[0] and len(by_stop.tokens) <= 4
    assert by_eos.tokens == alone(model, prompt, GREEDY, eos)[0] and len(by_eos.tokens) <= 7
    assert by_stop.finish_reason == by_eos.finish_reason == "stop"


def test_cancel_frees_the_row(model):
    long_prompt, short_prompt = random_prompts([4, 6])
    engine = Engine(model, NO_EOS, max_batch_size=2)
    try:
        started = After(3)
        doomed = engine.submit(long_prompt, SamplingParams(max_new_tokens=100, temperature=0), on_token=started)
        other = engine.submit(short_prompt, SamplingParams(max_new_tokens=40, temperature=0))
        assert started.event.wait(30)
        assert engine.cancel(doomed)
        assert other.future.result(60).tokens == alone(model, short_prompt,
                                                      SamplingParams(max_new_tokens=40, temperature=0))[0]
        assert doomed.future.cancelled() and started.count < 50  # it left long before its 100 tokens
        again = engine.submit(long_prompt, GREEDY).future.result(60)  # the freed row takes new work
        assert again.tokens == alone(model, long_prompt, GREEDY)[0]
        stats = engine.stats()
        assert stats.cancelled == 1 and stats.running == 0
    finally:
        engine.close()


def test_a_failing_row_fails_alone(model):
    prompts = random_prompts([5, 9, 3, 6])
    seeded = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=1)

    def explode(token):
        raise RuntimeError("client went away")

    engine = Engine(model, NO_EOS, max_batch_size=4)
    try:
        good = engine.submit(prompts[0], GREEDY)
        good_seeded = engine.submit(prompts[3], seeded)  # draws before the bad row in the same sampling call
        bad_callback = engine.submit(prompts[1], GREEDY, on_token=explode)
        bad_params = engine.submit(prompts[2], SamplingParams(max_new_tokens=12, temperature=float("nan")))
        assert good.future.result(60).tokens == alone(model, prompts[0], GREEDY)[0]
        assert good_seeded.future.result(60).tokens == alone(model, prompts[3], seeded)[0]
        with pytest.raises(RuntimeError, match="client went away"):
            bad_callback.future.result(60)
        with pytest.raises(RuntimeError):  # NaN probabilities: torch.multinomial refuses them
            bad_params.future.result(60)
        assert engine.submit(prompts[1], GREEDY).future.result(60).tokens == alone(model, prompts[1], GREEDY)[0]
        assert engine.stats().failed == 2
        with pytest.raises(ValueError):
            engine.submit([1, 99999], GREEDY)  # an id outside the vocabulary never reaches the batch
        with pytest.raises(ValueError):
            engine.submit([], GREEDY)
    finally:
        engine.close()


def test_max_batch_size_respected(model):
    prompts = random_prompts([3, 8, 5, 11, 4])
    engine = Engine(model, NO_EOS, max_batch_size=2, max_queued=3)
    seen = []
    try:
        running, gate = threading.Event(), threading.Event()

        def wait_for_gate(token):
            running.set()
            gate.wait(30)  # holds the decode thread: the requests below pile up in the queue

        handles = [engine.submit(prompts[0], GREEDY, on_token=wait_for_gate)]
        assert running.wait(30)
        handles += [engine.submit(p, GREEDY, on_token=lambda t: seen.append(engine.stats())) for p in prompts[1:4]]
        with pytest.raises(EngineFull):
            engine.submit(prompts[4], GREEDY)
        gate.set()
        handles[0].future.result(60)  # by its end a queued request has joined: there is room in the queue again
        handles.append(engine.submit(prompts[4], GREEDY))
        concurrent.futures.wait([h.future for h in handles], timeout=60)
        for prompt, handle in zip(prompts, handles):
            assert handle.future.result().tokens == alone(model, prompt, GREEDY)[0]
    finally:
        engine.close()
    assert max(s.running for s in seen) == 2
    assert max(s.queued for s in seen) >= 1


def test_close_fails_what_is_left(model):
    engine = Engine(model, NO_EOS, max_batch_size=1)
    running, gate = threading.Event(), threading.Event()

    def hold(token):
        running.set()
        gate.wait(30)

    first = engine.submit([5, 6, 7], GREEDY, on_token=hold)
    assert running.wait(30)
    queued = engine.submit([8, 9], GREEDY)
    engine.close(timeout=0)  # closed now; the thread is still held in on_token
    gate.set()
    engine.close()
    assert not engine.alive
    for handle in (first, queued):
        with pytest.raises(EngineClosed):
            handle.future.result(5)
    with pytest.raises(EngineClosed):
        engine.submit([5], GREEDY)

"""The network: published parameter counts, KV-cache decoding, batching, context length, dtypes."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from model.config import CONFIGS, ModelArgs, get_config
from model.generation import SamplingParams, generate
from model.kernels import Kernels, compile_enabled
from model.llama import ContextLengthError, KVCache, Transformer, count_parameters
from model.loss import IGNORE_INDEX, linear_cross_entropy
from tests.helpers import debug_model


@pytest.mark.parametrize("name, expected", [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
                                            ("llama2-70b", 68_976_648_192)])
def test_published_parameter_counts(name, expected):
    assert count_parameters(CONFIGS[name]) == expected


def test_llama2_shapes_follow_meta_rules():
    assert CONFIGS["llama2-7b"].ffn_hidden_dim == 11008
    assert CONFIGS["llama2-13b"].ffn_hidden_dim == 13824
    assert CONFIGS["llama2-70b"].ffn_hidden_dim == 28672 and CONFIGS["llama2-70b"].kv_heads == 8
    assert all(c.norm_eps == 1e-5 and c.rope_theta == 10000.0 for n, c in CONFIGS.items() if n.startswith("llama2-"))
    assert CONFIGS["llama2-7b"].max_seq_len == 4096


def test_config_rejects_bad_shapes_and_unknown_keys():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown ModelArgs keys"):
        ModelArgs.from_dict({"dim": 64, "n_heads": 4, "bogus": 1})
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("llama3")


def test_no_biases_untied_head_gqa():
    model = debug_model()
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    assert model.layers[0].attention.wk.weight.shape[0] == model.args.kv_heads * model.args.head_dim < model.args.dim


def test_kv_cache_decoding_equals_full_recomputation():
    model = debug_model(std=0.1)
    tokens = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, 2, 24)
        steps = [model(tokens[:, :10], cache=cache, start_pos=0)]
        for t in range(10, 24):
            steps.append(model(tokens[:, t:t + 1], cache=cache, start_pos=t))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_batched_generation_of_different_lengths_equals_alone():
    model = debug_model(std=0.1)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (3, 11, 7, 1)]
    params = SamplingParams(max_new_tokens=20, temperature=0)
    batched = generate(model, prompts, params, eos_id=2)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], params, eos_id=2)
        assert batched.tokens[i] == alone.tokens[0]
        torch.testing.assert_close(torch.tensor(batched.logprobs[i]), torch.tensor(alone.logprobs[0]), atol=1e-4,
                                   rtol=0)


def test_generation_logprobs_match_a_full_forward():
    model = debug_model(std=0.1)
    prompt = [5, 9, 17, 33]
    out = generate(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0.7, seed=3), eos_id=-1)
    seq = torch.tensor([prompt + out.tokens[0]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(seq)[0, len(prompt) - 1:-1] / 0.7, -1)
    expected = logprobs.gather(-1, torch.tensor(out.tokens[0])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), expected, atol=1e-4, rtol=0)


def test_sampling_seed_top_k_top_p():
    model = debug_model(std=0.1)
    prompts = [[5, 6, 7], [8, 9]]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    a, b = generate(model, prompts, params, eos_id=-1), generate(model, prompts, params, eos_id=-1)
    assert a.tokens == b.tokens
    c = generate(model, prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=8), eos_id=-1)
    assert c.tokens != a.tokens
    # top_k=1 is greedy
    k1 = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1, seed=1), eos_id=-1)
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0), eos_id=-1)
    assert k1.tokens == greedy.tokens


def test_eos_stop_sequences_and_early_exit():
    model = debug_model(std=0.1)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    free = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0), eos_id=-1)
    assert free.finish_reasons == ["length", "length"] and all(len(t) == 12 for t in free.tokens)
    # Make row 0's 4th token the eos, and stop row 1 at its tokens 2-3.
    eos = free.tokens[0][3]
    stop = free.tokens[1][1:3]
    out = generate(model, prompts, SamplingParams(max_new_tokens=12, temperature=0, stop=[stop]), eos_id=eos)
    first_eos = free.tokens[0].index(eos)
    assert out.tokens[0] == free.tokens[0][:first_eos + 1] and out.finish_reasons[0] == "stop"
    assert out.tokens[1][-2:] == stop and out.finish_reasons[1] == "stop"
    assert len(out.tokens[1]) <= 3 or free.tokens[1].index(eos) < 3


def test_on_step_hands_over_each_rows_tokens_as_they_come():
    model = debug_model(std=0.1)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    free = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0), eos_id=-1)
    eos = free.tokens[0][2]  # row 0 ends at its 3rd token (or earlier), row 1 runs on
    steps: list[tuple[list[int], list[int]]] = []
    out = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0), eos_id=eos,
                   on_step=lambda ids, rows: steps.append((ids, rows)))
    streamed = [[i for ids, rows in steps for i, r in zip(ids, rows) if r == row] for row in range(2)]
    assert streamed == out.tokens  # every row's tokens, in order, nothing after its end
    assert len(steps) == max(len(t) for t in out.tokens)  # one call per step
    assert steps[-1][1] == [r for r in (0, 1) if len(out.tokens[r]) == len(steps)]


@pytest.mark.parametrize("rows", [3, 6])  # <= DECODE_MATVEC_ROWS: product-and-sum matmuls; more: prepacked oneDNN
def test_compiled_decoding_matches_eager(monkeypatch, rows):
    """The torch.compile'd decode step (static shapes over the whole cache, padded rows masked) gives eager's
    tokens and log-probs, follows in-place weight updates (PPO), and $LLAMA2_COMPILE=0 turns it off."""
    model = debug_model(std=0.1)
    prompts = ([[5, 6, 7], [8, 9, 10, 11, 12], [3]] * 2)[:rows]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    for _ in range(2):
        eager = generate(model, prompts, params, eos_id=-1, compile=False)
        compiled = generate(model, prompts, params, eos_id=-1, compile=True)
        assert compiled.tokens == eager.tokens
        torch.testing.assert_close(torch.tensor(compiled.logprobs), torch.tensor(eager.logprobs), atol=1e-5, rtol=0)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1)
    monkeypatch.setenv("LLAMA2_COMPILE", "0")
    assert not compile_enabled(True)


def test_context_length_is_enforced_with_a_clear_error():
    model = debug_model()  # max_seq_len 128
    with pytest.raises(ContextLengthError, match="context length 128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ContextLengthError, match="exceeds the context length"):
        generate(model, [[1] * 100], SamplingParams(max_new_tokens=29), eos_id=2)
    generate(model, [[1] * 100], SamplingParams(max_new_tokens=28, temperature=0), eos_id=-1)  # exactly fits
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], SamplingParams(), eos_id=2)


def test_bf16_autocast_trains_and_generates():
    model = debug_model(std=0.1).train()
    tokens = torch.randint(3, 512, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model.eval(), [[5, 6, 7]], SamplingParams(max_new_tokens=5, temperature=0), eos_id=-1)
    assert len(out.tokens[0]) == 5


def test_scalar_head():
    args = get_config("llama2-debug", head="scalar")
    values = Transformer(args).init_weights()(torch.randint(0, 512, (2, 9)))
    assert values.shape == (2, 9, 1)


def test_inference_linear_follows_weight_changes():
    """linear() in fp32 CPU inference (oneDNN, the weight prepacked and cached) gives F.linear's result, and packs
    again when the weight changes in place (an optimizer step, load_state_dict)."""
    weight, x = torch.randn(48, 32), torch.randn(2, 5, 32)
    linear = Kernels().linear
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
        assert weight._onednn_packing.version == weight._version
        weight.mul_(2)
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
        weight.copy_(torch.randn(48, 32))
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight))


def test_training_linear_and_fused_loss_match_torch():
    """The oneDNN training products (linear's forward and backward, the fused cross-entropy's chunks) give torch's
    F.linear and F.cross_entropy values and gradients, on a strided input and with ignored positions."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 40, 10, generator=gen).transpose(1, 2)  # (3, 10, 40), not contiguous
    weight, head = torch.randn(24, 40, generator=gen), torch.randn(50, 24, generator=gen)
    targets = torch.randint(0, 50, (3, 10), generator=gen)
    targets[0, :4] = IGNORE_INDEX
    results = []
    for ours in (True, False):
        xs, w, h = (t.clone().requires_grad_() for t in (x, weight, head))
        hidden = Kernels().linear(xs, w) if ours else F.linear(xs, w)
        if ours:
            loss = linear_cross_entropy(hidden, h, targets, chunk_rows=7)
        else:
            loss = F.cross_entropy(F.linear(hidden, h).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        results.append((loss, xs.grad, w.grad, h.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compiled_inference_never_reads_stale_fused_weights():
    model = debug_model(std=0.1)
    tokens = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model)
    with torch.no_grad():
        model(tokens)  # eager: caches the fused QKV/W13 weights
        for p in model.parameters():
            p.mul_(1.1)
        torch.testing.assert_close(compiled(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_compiled_training_step_matches_eager():
    """LMTrainConfig.compile: the compiled forward (fused loss included) and backward give eager's loss and grads."""
    eager, compiled = debug_model(std=0.1).train(), debug_model(std=0.1).train()
    compiled.compile()
    tokens = torch.randint(3, 512, (2, 17), generator=torch.Generator().manual_seed(4))
    for model in (eager, compiled):
        model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_concurrent_generation_on_one_model_equals_sequential():
    """A server calls generate() on one model from several threads: the shared caches (fused weights, packings)
    fill under concurrency and every thread gets its sequential tokens."""
    model = debug_model(std=0.1)
    prompts = [[[5, 6, 7], [8, 9]], [[3, 4, 5, 6, 7, 8]], [[11], [12, 13, 14]]]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    results: dict[int, list[list[int]]] = {}
    barrier = threading.Barrier(len(prompts))

    def worker(i):
        barrier.wait()
        results[i] = generate(model, prompts[i], params, eos_id=-1, compile=False).tokens

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    model_again = debug_model(std=0.1)  # cold caches: sequential calls from scratch
    assert [results[i] for i in range(len(prompts))] == [
        generate(model_again, p, params, eos_id=-1, compile=False).tokens for p in prompts]


def test_fresh_windows_overlapping_across_threads_leave_no_state():
    """The fresh window is state of one model's Kernels, not of the module: overlapping windows from two threads
    (a saved-and-restored global left the flag set for good) end with the model not fresh, another model is never
    touched, and a copied model gets its own kernel state."""
    model, other = debug_model(), debug_model()
    inside, release, seen = threading.Event(), threading.Event(), {}

    def hold():
        with model.fresh_fused_weights():
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    with model.fresh_fused_weights():  # opened after the other thread's, closed before it
        seen["inside"], seen["other model"] = model.kernels.fresh, other.kernels.fresh
    release.set()
    holder.join()
    assert seen == {"inside": True, "other model": False}
    assert not model.kernels.fresh
    copied = copy.deepcopy(model)
    assert copied.kernels is not model.kernels and not copied.kernels.fresh
    assert all(layer.attention.kernels is copied.kernels for layer in copied.layers)

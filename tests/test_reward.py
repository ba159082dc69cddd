"""Reward model: batching, scoring at the last token, init from SFT, and learning a separable preference task."""

from __future__ import annotations

import math
import random

import pytest
import torch

from components.rlhf.losses import RATINGS, rating_margins
from components.rlhf.reward import (THRESHOLD_FILE, PreferencePair, choose_threshold, collate_pairs, encode_pair,
                                    evaluate_rm, init_reward_model, precision_recall, resolve_safety_threshold,
                                    rm_loss_and_metrics, score)
from model.chat import encode_dialog
from model.config import get_config
from model.llama import Transformer

VOCAB, PAD, EOS, GOOD, BAD = 64, 0, 2, 3, 4


def sft_model(seed: int = 0) -> Transformer:
    return Transformer(get_config("llama2-debug", vocab_size=VOCAB)).init_weights(
        generator=torch.Generator().manual_seed(seed))


def test_collate_pairs_layout():
    pairs = [PreferencePair([1, 5, 6, 2], [1, 5, 2], "better"), PreferencePair([1, 7, 2], [1, 7, 8, 9, 2])]
    batch = collate_pairs(pairs, pad_id=PAD)
    assert batch.tokens.tolist() == [[1, 5, 6, 2, 0], [1, 7, 2, 0, 0], [1, 5, 2, 0, 0], [1, 7, 8, 9, 2]]
    assert batch.last_index.tolist() == [3, 2, 2, 4]
    assert batch.ratings == ["better", None]
    with pytest.raises(ValueError, match="unknown rating"):
        PreferencePair([1], [2], "much_better")


def test_score_reads_the_last_token_and_ignores_padding():
    rm = init_reward_model(sft_model(), head_std=0.1, generator=torch.Generator().manual_seed(1))
    rows = [[1, 5, 6, 7, 2], [1, 9, 2]]
    alone = [rm(torch.tensor([r]))[0, -1, 0] for r in rows]
    # right padding: causal attention keeps it out of view
    batch = collate_pairs([PreferencePair(rows[0], rows[1])], PAD)
    torch.testing.assert_close(score(rm, batch.tokens, batch.last_index), torch.stack(alone))
    # left padding (PPO's layout): needs key_valid for the mask and per-row positions
    tokens = torch.tensor([rows[0], [PAD, PAD] + rows[1]])
    key_valid = tokens != PAD
    torch.testing.assert_close(score(rm, tokens, torch.tensor([4, 4]), key_valid), torch.stack(alone),
                               atol=1e-5, rtol=1e-5)


def test_init_reward_model_copies_all_but_the_head():
    sft = sft_model()
    rm = init_reward_model(sft)
    assert rm.args.head == "scalar" and rm.output.weight.shape == (1, sft.args.dim)
    sft_state, rm_state = sft.state_dict(), rm.state_dict()
    assert all(torch.equal(sft_state[k], v) for k, v in rm_state.items() if k != "output.weight")
    assert not rm.output.weight.any()  # zero head: every score 0, probability 0.5
    pair = PreferencePair([1, 5, 2], [1, 6, 7, 2], "significantly_better")
    loss, metrics = rm_loss_and_metrics(rm, collate_pairs([pair], PAD), rating_margins("small"))
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(1.0))))  # -log sigmoid(0 - 0 - 1)
    assert metrics["accuracy"].item() == 0.0  # ties are not wins
    rm.output.weight.data.fill_(1.0)
    assert sft.output.weight.abs().sum() > 0 and not torch.equal(rm.output.weight, sft.output.weight[:1])


def synthetic_pairs(n: int, rng: random.Random) -> list[PreferencePair]:
    """Separable preferences: the chosen answer ends with GOOD before </s>, the rejected one with BAD."""
    pairs = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(8, VOCAB) for _ in range(rng.randint(2, 6))]
        answer = [rng.randrange(8, VOCAB) for _ in range(rng.randint(1, 5))]
        other = [rng.randrange(8, VOCAB) for _ in range(rng.randint(1, 5))]
        pairs.append(PreferencePair(prompt + answer + [GOOD, EOS], prompt + other + [BAD, EOS], rng.choice(RATINGS)))
    return pairs


def test_rm_learns_a_separable_preference():
    torch.manual_seed(0)
    rng = random.Random(0)
    train, held_out = synthetic_pairs(512, rng), synthetic_pairs(128, rng)
    rm = init_reward_model(sft_model(), head_std=0.02, generator=torch.Generator().manual_seed(0))
    before = evaluate_rm(rm, held_out, PAD)
    optimizer = torch.optim.AdamW(rm.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses, margins = [], rating_margins("small")
    for step in range(40):
        batch = collate_pairs(train[step * 12:(step + 1) * 12], PAD)
        loss, metrics = rm_loss_and_metrics(rm, batch, margins)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(metrics["loss"].item())
    after = evaluate_rm(rm, held_out, PAD, batch_size=50)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert after["accuracy"] >= 0.95 > before["accuracy"] + 0.2, (before, after)
    assert set(after) == {"accuracy"} | {f"accuracy_{r}" for r in RATINGS}
    assert rm.training  # evaluate_rm restores the mode


def test_encode_pair_uses_the_chat_template():
    from model.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "what", "is", "two", "plus", "three", "five", "answer"]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)] + ["[INST] <<SYS>> [/INST]"] * 20
    tokenizer = train_tokenizer(corpus, vocab_size=320)  # 256 byte pieces + text
    prompt = [{"role": "user", "content": "what is two plus three"}]
    pair = encode_pair(tokenizer, prompt, "five", "the cat sat", "better")
    assert pair.chosen == encode_dialog(tokenizer, prompt + [{"role": "assistant", "content": "five"}]).tokens
    assert pair.chosen[-1] == pair.rejected[-1] == tokenizer.eos_id
    assert pair.rating == "better"


def test_items_over_the_context_are_dropped_and_counted_before_training():
    from components.data.datasets import fit_context

    pairs = [PreferencePair([1, 5, 2], [1, 6, 7, 2]), PreferencePair([1] * 9, [1, 2]), PreferencePair([1, 2], [1] * 8)]
    kept, counts = fit_context(pairs, [max(len(p.chosen), len(p.rejected)) for p in pairs], 8, "pairs", "rm")
    assert kept == [pairs[0], pairs[2]]  # a side of exactly the limit fits
    assert counts == {"dropped_too_long": 1, "truncated_too_long": 0}
    with pytest.raises(SystemExit, match=r"rm: all 3 pairs are longer than the model's context allows \(2 tokens\)"):
        fit_context(pairs, [3, 9, 8], 2, "pairs", "rm")


def test_data_too_long_truncate_cuts_pairs_and_examples_and_drops_what_says_nothing():
    from components.data.datasets import examples_data, fit_context, too_long_policy
    from flows._rm import _cut_pair
    from model.chat import EncodedDialog

    pairs = [PreferencePair([1, 5, 2], [1, 6, 2]), PreferencePair([1, 3, 3, 3, 9, 2], [1, 3, 3, 4, 2]),
             PreferencePair([1, 3, 3, 3, 3, 9], [1, 3, 3, 3, 3, 8])]  # the last agrees on its first 4 tokens
    entries = [(p, f"item{i}") for i, p in enumerate(pairs)]  # flows/_rm.py keeps each pair's item with it
    kept, counts = fit_context(entries, [max(len(p.chosen), len(p.rejected)) for p in pairs], 4, "pairs", "rm",
                               _cut_pair)
    assert kept == [entries[0], (PreferencePair([1, 3, 3, 3], [1, 3, 3, 4], pairs[1].rating), "item1")]
    assert counts == {"dropped_too_long": 1, "truncated_too_long": 1}
    # Fine-tuning examples: cut to the row (seq_len + 1 tokens); one whose answer starts past the cut is dropped.
    examples = [EncodedDialog([1, 4, 5, 2], [0, 0, 1, 1]),
                EncodedDialog([1, 4, 4, 4, 4, 5, 6, 2], [0, 0, 0, 1, 1, 1, 1, 1]),
                EncodedDialog([1, 4, 4, 4, 4, 4, 5, 2], [0, 0, 0, 0, 0, 0, 1, 1])]
    _, _, cut = examples_data(examples, 0, 4, 0.0, 0, "sft", "truncate")
    _, _, dropped = examples_data(examples, 0, 4, 0.0, 0, "sft", "drop")
    assert (cut["dropped_too_long"], cut["truncated_too_long"]) == (1, 1)
    assert (dropped["dropped_too_long"], dropped["truncated_too_long"]) == (2, 0)
    assert cut["target_tokens"] > dropped["target_tokens"]
    assert too_long_policy({}) == "drop"
    with pytest.raises(ValueError, match="too_long must be one of"):
        too_long_policy({"too_long": "cut"})


def test_rm_validation_is_split_by_item():
    """flows/_rm.py holds out every pair of a hashed slice of items: no validation item is trained on, the slice is
    about val_fraction of the items, and it does not depend on the rows' order."""
    from components.data.datasets import held_out_items

    items = [f"fact:e{i}/color" for i in range(400) for _ in range(3)]  # 3 pairs per item
    held = held_out_items(items, 0.1)
    assert 0.06 < len(held) / 400 < 0.14
    val = [i for i in items if i in held]
    train = [i for i in items if i not in held]
    assert not set(val) & set(train) and len(val) == 3 * len(held)
    assert held_out_items(list(reversed(items)), 0.1) == held
    assert len(held_out_items(["a", "a", "b"], 0.0001)) == 1  # always some validation...
    assert held_out_items(["a", "b"], 0.9999) in ({"a"}, {"b"})  # ...and some training


def test_safety_threshold_by_precision_and_recall(tmp_path):
    """"score < t => unsafe" on labelled answers: precision and recall by hand; auto = the largest t at the target."""
    scores = [0.02, 0.05, 0.10, 0.12, 0.30, 0.40, 0.60, 0.90]
    unsafe = [True, True, False, True, True, False, False, False]
    assert precision_recall(scores, unsafe, 0.11) == {"threshold": 0.11, "precision": 2 / 3, "recall": 0.5,
                                                      "flagged": 3 / 8}
    assert precision_recall(scores, unsafe, 0.01)["precision"] is None  # nothing flagged
    chosen = choose_threshold(scores, unsafe, 0.75)
    assert chosen["threshold"] == 0.4 and chosen["precision"] == 0.8 and chosen["recall"] == 1.0
    assert chosen["target_met"]
    missed = choose_threshold([0.5, 0.6], [False, True], 0.9)  # no threshold reaches 0.9: the most precise one
    assert not missed["target_met"] and missed["precision"] == 0.5 and missed["threshold"] == 0.99

    assert resolve_safety_threshold(0.15, tmp_path) == 0.15
    with pytest.raises(SystemExit, match="rerun the rm_safety stage"):
        resolve_safety_threshold("auto", tmp_path)
    (tmp_path / THRESHOLD_FILE).write_text('{"threshold": 0.35}')
    assert resolve_safety_threshold("auto", tmp_path) == 0.35
    with pytest.raises(SystemExit, match="probability or 'auto'"):
        resolve_safety_threshold("high", tmp_path)

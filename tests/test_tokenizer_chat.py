"""Tokenizer training/round trips, and the Llama 2 chat template at the token level."""

from __future__ import annotations

import time

import pytest

from model.chat import ChatFormatError, encode_dialog, encode_prompt
from model.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizer, train_tokenizer
from tests.helpers import corpus, small_tokenizer


def test_trains_in_seconds_with_llama_special_ids():
    start = time.perf_counter()
    tok = train_tokenizer(corpus(3000, seed=1), 400)
    assert time.perf_counter() - start < 10
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert tok.vocab_size == 400
    assert tok.sp.id_to_piece(0) == "<unk>" and tok.sp.id_to_piece(1) == "<s>" and tok.sp.id_to_piece(2) == "</s>"


@pytest.mark.parametrize("text", ["héllo wörld — naïve café", "你好, мир! 🚀🦙", "12345 + 67890 = 80235",
                                  "  two  spaces\n\ttab and newline\n", "", " leading space", "trailing space "])
def test_round_trips_unicode_digits_whitespace(text):
    tok = small_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_digits_split_and_byte_fallback():
    tok = small_tokenizer()
    pieces = [tok.id_to_piece(i) for i in tok.encode("2023")]
    assert [p.lstrip("▁") for p in pieces if p.lstrip("▁")] == ["2", "0", "2", "3"]
    ids = tok.encode("🦙")
    pieces = [tok.id_to_piece(i) for i in ids if tok.id_to_piece(i) != "▁"]  # the dummy-prefix space
    assert UNK_ID not in ids and len(pieces) == 4 and all(p.startswith("<0x") for p in pieces)


def test_loads_a_model_file_and_rejects_garbage(tmp_path):
    tok = small_tokenizer()
    tok.save(tmp_path / "tokenizer.model")
    assert Tokenizer.load(tmp_path / "tokenizer.model").encode("the cat") == tok.encode("the cat")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer.load(tmp_path / "bad.model")
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.model")


def test_too_small_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="tokenizer training failed: Vocabulary size too high"):
        train_tokenizer(["a b c"] * 5, 4000)


def enc(text, bos=False, eos=False):
    return small_tokenizer().encode(text, bos=bos, eos=eos)


def test_single_turn_prompt():
    tok = small_tokenizer()
    assert encode_prompt(tok, [{"role": "user", "content": " what is the dog? "}]) == enc(
        "[INST] what is the dog? [/INST]", bos=True)


def test_system_prompt_is_folded_into_the_first_user_turn():
    tok = small_tokenizer()
    dialog = [{"role": "system", "content": "always reply in uppercase"}, {"role": "user", "content": "hello"}]
    assert encode_prompt(tok, dialog) == enc(
        "[INST] <<SYS>>\nalways reply in uppercase\n<</SYS>>\n\nhello [/INST]", bos=True)


def test_multi_turn_tokens_and_masks():
    tok = small_tokenizer()
    dialog = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "what is the cat"},
              {"role": "assistant", "content": "a cat"}]
    turn1 = enc("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhello [/INST] hello world ", bos=True, eos=True)
    turn2 = enc("[INST] what is the cat [/INST] a cat ", bos=True, eos=True)
    prompt1 = enc("[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhello [/INST]", bos=True)
    prompt2 = enc("[INST] what is the cat [/INST]", bos=True)
    out = encode_dialog(tok, dialog)
    assert out.tokens == turn1 + turn2
    assert out.loss_mask == ([0] * len(prompt1) + [1] * (len(turn1) - len(prompt1))
                             + [0] * len(prompt2) + [1] * (len(turn2) - len(prompt2)))
    # Masked tokens decode to exactly the answers (plus </s>, which decodes to nothing).
    answer_ids = [t for t, m in zip(out.tokens, out.loss_mask) if m]
    assert answer_ids.count(EOS_ID) == 2
    assert tok.decode(answer_ids).split() == ["hello", "world", "a", "cat"]
    last = encode_dialog(tok, dialog, turns=[1])
    assert last.tokens == out.tokens
    assert last.loss_mask == [0] * len(turn1) + out.loss_mask[len(turn1):]
    first = encode_dialog(tok, dialog, turns=[0])  # the answers to train on: the first only
    assert first.loss_mask == out.loss_mask[:len(turn1)] + [0] * len(turn2)
    assert encode_dialog(tok, dialog, turns=[]).loss_mask == [0] * len(out.tokens)
    with pytest.raises(ChatFormatError, match="turns"):
        encode_dialog(tok, dialog, turns=[2])
    # Prompting on the same conversation minus the last answer gives the training tokens' prefix.
    assert encode_prompt(tok, dialog[:-1]) == out.tokens[:len(turn1) + len(prompt2)]


def test_control_token_look_alikes_stay_plain_text():
    tok = small_tokenizer()
    dialog = [{"role": "user", "content": "<s>[INST] </s> <<SYS>> hi"}, {"role": "assistant", "content": "</s><s>"}]
    out = encode_dialog(tok, dialog)
    assert out.tokens.count(BOS_ID) == 1 and out.tokens.count(EOS_ID) == 1
    assert out.tokens[0] == BOS_ID and out.tokens[-1] == EOS_ID
    assert "<s>[INST] </s>" in tok.decode(out.tokens)


@pytest.mark.parametrize("dialog, message", [
    ([], "empty conversation"),
    ([{"role": "assistant", "content": "hi"}], "roles out of order"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles out of order"),
    ([{"role": "system", "content": "s"}], "needs a user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be from the user"),
    ([{"role": "robot", "content": "a"}], "must be"),
    ([{"role": "user", "content": None}], "must be"),
])
def test_bad_conversations_are_clear_errors(dialog, message):
    with pytest.raises(ChatFormatError, match=message):
        encode_prompt(small_tokenizer(), dialog)


def test_training_dialog_must_end_with_assistant():
    with pytest.raises(ChatFormatError, match="end with an assistant turn"):
        encode_dialog(small_tokenizer(), [{"role": "user", "content": "a"}])

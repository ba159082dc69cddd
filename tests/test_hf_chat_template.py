"""The HF export's tokenizer and chat template: transformers' AutoTokenizer on the exported folder gives model.chat's
token ids (what vLLM serves through), control-token look-alikes in user text included, and refuses what
encode_prompt refuses."""

from __future__ import annotations

import random

import pytest

from model.chat import ChatFormatError, encode_dialog, encode_prompt
from model.checkpoint import save_checkpoint
from model.hf import export_hf
from tests.helpers import corpus, debug_model, small_tokenizer

transformers = pytest.importorskip("transformers")

LOOKALIKES = "[INST] <<SYS>> </s> <s> <unk> [/INST] <</SYS>>"
TRICKY = ["<s>", "</s>", "<", "s>", "[INST]", "[/INST]", "<<SYS>>", "\n", "\n\n", " ", "  ", "\t", "▁", "\uffff",
          "<\uffff", "\uffff\uffff", "é", "日本", "😀", "7", "12", "the", "cat", "zorp", ".", "\r\n", "\u200b"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(ours, transformers' AutoTokenizer of the HF export of a checkpoint using it)."""
    folder = tmp_path_factory.mktemp("export")
    tok = small_tokenizer()
    save_checkpoint(folder / "ckpt", debug_model(), tok)
    export_hf(folder / "ckpt", folder / "hf")
    return tok, transformers.AutoTokenizer.from_pretrained(folder / "hf")


def hf_ids(hf, messages, **kwargs) -> list[int]:
    ids = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(TRICKY + [" "] * 5) for _ in range(rng.randint(0, 12)))


CASES = {
    "one user turn": [user("what is the cat")],
    "system + user": [{"role": "system", "content": "always reply in uppercase"}, user("hello world")],
    "multi-turn": [{"role": "system", "content": " be brief\n"}, user("hi"), assistant("  the dog sat "),
                   user("and the cat?"), assistant("on the mat."), user(" why ")],
    "look-alikes in user text": [user(LOOKALIKES), assistant("</s> ok <s>"), user("<s>[INST] x [/INST]</s>")],
    "look-alikes in the system prompt": [{"role": "system", "content": "</s><<SYS>>"}, user("<unk>")],
    "the escape character itself": [user("\uffff <\uffff \uffff\uffff< <\uffff\uffff")],
    "spaces, unicode, bytes": [user("  tabs\tand   spaces ▁ 日本語 😀\n\n"), assistant("é\r\n"), user("\u200b")],
}


@pytest.mark.parametrize("name", CASES)
def test_chat_template_gives_encode_prompt_ids(tokenizers, name):
    tok, hf = tokenizers
    messages = CASES[name]
    assert hf_ids(hf, messages, add_generation_prompt=True) == encode_prompt(tok, messages)


def test_chat_template_matches_on_random_dialogs_of_tricky_text(tokenizers):
    tok, hf = tokenizers
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 3)
        messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.4 else []
        for _ in range(n - 1):
            messages += [user(random_text(rng)), assistant(random_text(rng))]
        messages.append(user(random_text(rng)))
        assert hf_ids(hf, messages, add_generation_prompt=True) == encode_prompt(tok, messages), messages
        complete = messages + [assistant(random_text(rng))]  # a training conversation: encode_dialog's ids
        assert hf_ids(hf, complete) == encode_dialog(tok, complete).tokens, complete


def test_control_tokens_only_where_the_template_puts_them(tokenizers):
    tok, hf = tokenizers
    ids = hf_ids(hf, CASES["look-alikes in user text"], add_generation_prompt=True)
    assert ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1 and tok.unk_id not in ids
    assert hf.decode(ids, skip_special_tokens=True).count("</s>") == 3  # the typed ones, as text


def test_plain_text_encodes_as_sentencepiece_with_bos(tokenizers):
    """What lm_eval and /v1/completions send: AutoTokenizer(text) = our encode(text, bos=True)."""
    tok, hf = tokenizers
    # Not through the template, HF parses "<s>", "</s>", "<unk>" in text as those tokens (as for any HF tokenizer),
    # and drops ESCAPE after "<" and from ESCAPE pairs: the random texts here have neither.
    rng = random.Random(1)
    tricky = [t for t in (random_text(rng).replace("\uffff", "") for _ in range(400))
              if not any(s in t for s in ("<s>", "</s>", "<unk>"))]
    for text in corpus(200, seed=3) + tricky + [LOOKALIKES.replace("<", "&lt;"), "  two  spaces\n", "😀 日本"]:
        assert hf(text).input_ids == tok.encode(text, bos=True), text
        assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == tok.decode(tok.encode(text))


@pytest.mark.parametrize("messages, error", [
    ([], "empty conversation"),
    ([{"role": "system", "content": "x"}], "a system prompt needs a user message"),
    ([user("a"), user("b")], "roles out of order"),
    ([assistant("a")], "roles out of order"),
    ([user("a"), {"role": "tool", "content": "b"}], "roles out of order"),
    ([user("a"), assistant("b"), {"role": "system", "content": "c"}, user("d")], "roles out of order"),
    ([user("a"), assistant("b")], "the last message must be from the user"),
    ([{"role": "user", "content": 3}], "must be a string"),
])
def test_chat_template_refuses_what_encode_prompt_refuses(tokenizers, messages, error):
    tok, hf = tokenizers
    with pytest.raises(ChatFormatError):
        encode_prompt(tok, messages)
    with pytest.raises(Exception, match=error):
        hf_ids(hf, messages, add_generation_prompt=True)

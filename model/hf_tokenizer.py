"""The HF export's tokenizer: tokenizer.json (a `tokenizers` BPE equal to our sentencepiece model) and
tokenizer_config.json with the Llama 2 chat template, so that `AutoTokenizer.from_pretrained(export)
.apply_chat_template(messages, add_generation_prompt=True)` gives exactly model.chat.encode_prompt's ids (vLLM,
lm_eval and transformers all go through these two files).

Two things a stock HF Llama tokenizer gets wrong for that, hence our own tokenizer.json:
- sentencepiece adds its dummy prefix "▁" to every encode() call, i.e. to each turn; HF's LlamaTokenizer (legacy=False)
  prepends it only at the start of the text, so turns after the first lose it, and Metaspace(prepend_scheme="always")
  skips it before a leading space. A Prepend normalizer (legacy=True's) runs on each piece of text between special
  tokens and always prepends, as our per-turn encode() calls do.
- HF parses special-token strings anywhere in the rendered text: a user typing "</s>" would end the turn. The
  template escapes the user's text (ESCAPE after every "<", ESCAPE doubled) so no special token can appear in it, and
  the normalizer, which runs after special tokens are split out, undoes the escape. Text given straight to the
  tokenizer (not through the template) loses "<"+ESCAPE and doubled ESCAPEs: ESCAPE is U+FFFF, a noncharacter.
"""

from __future__ import annotations

from model.chat import B_INST, B_SYS, E_INST, E_SYS
from model.tokenizer import Tokenizer

ESCAPE = "\uffff"

# Mirrors model/chat.py (_validate, encode_dialog, encode_prompt); tests/test_hf_chat_template.py compares the ids.
# A conversation ending with an assistant turn renders encode_dialog's tokens (add_generation_prompt=False).
CHAT_TEMPLATE = (
    "{%- if messages | length == 0 -%}{{ raise_exception('empty conversation') }}{%- endif -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is not string -%}{{ raise_exception('message content must be a string') }}"
    "{%- elif messages | length == 1 -%}{{ raise_exception('a system prompt needs a user message after it') }}"
    "{%- endif -%}"
    "{%- set system = " + repr(B_SYS) + " + messages[0]['content'] + " + repr(E_SYS) + " -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['content'] is not string -%}"
    "{{ raise_exception('message content must be a string') }}{%- endif -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{ raise_exception('roles out of order: a system prompt may come first, then user and assistant alternate') }}"
    "{%- endif -%}"
    "{%- set text = ((system if loop.first else '') + message['content']) | trim -%}"
    "{%- set text = text.replace('" + ESCAPE + "', '" + ESCAPE * 2 + "').replace('<', '<" + ESCAPE + "') -%}"
    "{%- if message['role'] == 'user' -%}{{ bos_token + '" + B_INST + " ' + text + ' " + E_INST + "' }}"
    "{%- else -%}{{ ' ' + text + ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and turns[-1]['role'] != 'user' -%}"
    "{{ raise_exception('the last message must be from the user for the model to answer it') }}{%- endif -%}"
)


def _merges(tokenizer: Tokenizer) -> list[list[str]]:
    """BPE merges in rank order: sentencepiece merges the pair whose result has the best score first. Only normal
    pieces are merge results (never <s>, </s>, <unk> or a byte piece), as in sentencepiece."""
    sp = tokenizer.sp
    vocab = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}
    merges = []
    for piece, i in vocab.items():
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i) or sp.IsUnused(i):
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(-sp.GetScore(i), i, vocab[a], vocab[b], a, b) for a, b in splits]
    return [[a, b] for *_, a, b in sorted(merges)]


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    sp = tokenizer.sp
    special = [i for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i)]
    bos = tokenizer.id_to_piece(tokenizer.bos_id)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": sp.IdToPiece(i), "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "<" + ESCAPE}, "content": "<"},
            {"type": "Replace", "pattern": {"String": ESCAPE * 2}, "content": ESCAPE},
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {  # BOS before every encoded text (add_special_tokens=True), as Meta's encode(bos=True)
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokenizer.id_to_piece(tokenizer.unk_id),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}, "merges": _merges(tokenizer)},
    }


def tokenizer_config_json(tokenizer: Tokenizer, max_seq_len: int) -> dict:
    # The generic fast class: it keeps tokenizer.json as written (transformers 5's LlamaTokenizer rebuilds its own
    # normalizer and pre-tokenizer from the vocabulary, losing both fixes above).
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": tokenizer.id_to_piece(tokenizer.bos_id), "eos_token": tokenizer.id_to_piece(tokenizer.eos_id),
        "unk_token": tokenizer.id_to_piece(tokenizer.unk_id), "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }

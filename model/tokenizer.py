"""SentencePiece tokenizer: train a Llama-2-style BPE model, or load any `.model` (Meta's tokenizer.model included)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

# Llama 2's special ids.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer:
    """Thin wrapper over a SentencePieceProcessor with Meta's encode(bos, eos) interface."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises a bare RuntimeError/OSError on a bad proto
            raise ValueError(f"not a valid sentencepiece model: {exc}") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        # Llama's tokenizer has no pad piece; padding positions are masked, so any id works: use eos.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        try:
            return cls(path.read_bytes())
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # encode() never parses control pieces out of text: "<s>" typed by a user stays "<", "s", ">".
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, max_sentence_length: int = 16384,
                    input_sentence_size: int = 0, num_threads: int = 2, seed_sentencepiece_size: int = 100_000,
                    ) -> Tokenizer:
    """Train a BPE model the way Llama 2's was trained: digits split, byte fallback, unk 0 / bos 1 / eos 2,
    no normalisation (identity), whitespace kept as it is."""
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=proto,
            model_type="bpe",
            vocab_size=vocab_size,
            split_digits=True,
            byte_fallback=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.99995,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:  # e.g. "Vocabulary size too high": the corpus is too small for vocab_size
        raise ValueError(f"tokenizer training failed: {str(exc).split('] ')[-1]}") from None
    return Tokenizer(proto.getvalue())

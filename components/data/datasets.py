"""Turn the pipeline's Parquet tables into token data: tokenizer training text, packed pretraining rows (tokenised
on Ray Data), and chat examples with loss masks for the fine-tuning stages."""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from components.data.packing import pack_examples, split_validation
from model.tokenizer import Tokenizer, train_tokenizer


def parquet_files(folder: str | Path) -> list[str]:
    files = sorted(glob.glob(str(Path(folder) / "**" / "*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {folder}")
    return files


def read_table(path: str | Path):
    """A Parquet file, or every Parquet file in a folder, as one pyarrow Table."""
    path = Path(path)
    if path.is_dir():
        import pyarrow as pa

        return pa.concat_tables([pq.read_table(f) for f in parquet_files(path)])
    return pq.read_table(path)


def corpus_texts(clean_dir: str | Path) -> list[str]:
    return read_table(clean_dir).column("text").to_pylist()


@dataclass(frozen=True)
class TokenizerConfig:
    """params `tokenizer`."""

    vocab_size: int = 2048  # sentencepiece BPE pieces (Llama 2: 32000)


def train_corpus_tokenizer(clean_dir: str | Path, vocab_size: int) -> Tokenizer:
    texts = [t for t in corpus_texts(clean_dir) if t.strip()]
    return train_tokenizer(texts, vocab_size)


def tokenized_corpus(clean_dir: str | Path, tokenizer_path: str | Path):
    """The clean corpus tokenised on Ray Data (one tokenizer per worker task, Arrow batches in and out), in the order
    of its files and rows (the filter stage writes them deterministically): a lazy Dataset of (doc_id, ids).
    preserve_order keeps that order, so the packed rows are the same on every run; a global sort by doc_id cost
    about 12 s of a tiny run's pretrain stage (19 -> 7 s) for nothing."""
    import ray

    model_proto = Path(tokenizer_path).read_bytes()

    class Encode:
        def __init__(self):
            self.tokenizer = Tokenizer(model_proto)

        def __call__(self, batch):
            import pyarrow as pa

            ids = [self.tokenizer.encode(t) for t in batch.column("text").to_pylist()]
            return pa.table({"doc_id": batch.column("doc_id"), "ids": pa.array(ids, type=pa.list_(pa.int32()))})

    ds = ray.data.read_parquet(parquet_files(clean_dir)).map_batches(
        Encode, batch_format="pyarrow", batch_size=512, compute=ray.data.ActorPoolStrategy(size=1))
    ds.context.execution_options.preserve_order = True
    return ds


def examples_data(examples: list, pad_id: int, seq_len: int, val_fraction: float, seed: int, stage: str,
                  too_long: str) -> tuple[dict, dict, dict]:
    """Encoded chat examples (model.chat.EncodedDialog) -> packed rows with loss where their masks say; examples
    longer than a row dropped or cut (too_long, fit_context); returns train, val, stats."""
    pairs = [(e.tokens, e.loss_mask) for e in examples]
    pairs, counts = fit_context(pairs, [len(t) for t, _ in pairs], seq_len + 1, "examples", stage,
                                _cut_example if too_long == "truncate" else None)
    packed = pack_examples(pairs, seq_len, pad_id)
    train, val = split_validation(packed, val_fraction, seed)
    stats = {"examples": len(examples), "rows": int(packed["inputs"].shape[0]), **counts,
             "target_tokens": int((packed["targets"] >= 0).sum())}
    return train, val, stats


def _cut_example(example: tuple[list[int], list[int]], limit: int) -> tuple[list[int], list[int]] | None:
    tokens, loss_mask = example
    return (tokens[:limit], loss_mask[:limit]) if any(loss_mask[:limit]) else None  # no answer token left: dropped


TOO_LONG = ("drop", "truncate")  # data.too_long: what every stage does with an example longer than its context


def too_long_policy(data_params: dict | None) -> str:
    """params `data.too_long` (the data stage checks it too): "drop" (the default) or "truncate"."""
    policy = (data_params or {}).get("too_long", TOO_LONG[0])
    if policy not in TOO_LONG:
        raise ValueError(f"params section 'data': too_long must be one of {list(TOO_LONG)}, got {policy!r}")
    return policy


def fit_context(items: list, lengths: list[int], limit: int, what: str, stage: str, cut=None) -> tuple[list, dict]:
    """The items whose token length is within `limit`, decided in the driver before any Ray worker starts (an item
    over the context fails inside a worker, and Ray retries a deterministic error). Longer ones are dropped, or, with
    cut(item, limit) (data.too_long: truncate), cut to fit (None: nothing useful left, dropped). RL prompts are never
    cut: a cut prompt asks another question, or loses the chat template's head. Returns the items and the counts
    every stage reports the same way ({dropped,truncated}_too_long); none left is an error."""
    kept, dropped, truncated = [], 0, 0
    for item, n in zip(items, lengths, strict=True):
        short = item if n <= limit else cut(item, limit) if cut else None
        if short is None:
            dropped += 1
        else:
            kept.append(short)
            truncated += n > limit
    if not kept:
        raise SystemExit(f"error: {stage}: all {len(items)} {what} are longer than the model's context allows "
                         f"({limit} tokens)")
    if dropped or truncated:
        print(f"[{stage}] of {len(items)} {what} longer than {limit} tokens: {dropped} dropped, {truncated} cut")
    return kept, {"dropped_too_long": dropped, "truncated_too_long": truncated}


def held_out_items(items: list[str], fraction: float) -> set[str]:
    """The validation items: those whose sha256 falls in the first `fraction` of the hash range, so a row's side
    depends only on its item (every row of an item on one side; the same items whatever the table's order or size).
    At least one item is held out and one kept when there are two or more."""
    position = {i: int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") / 2 ** 64 for i in set(items)}
    held = {i for i, x in position.items() if x < fraction}
    ranked = sorted(position, key=position.get)
    if not held and len(ranked) > 1:
        held = {ranked[0]}
    if len(held) == len(ranked) > 1:
        held.discard(ranked[-1])
    return held


def messages_column(table, column: str = "messages") -> list[list[dict]]:
    return [json.loads(m) for m in table.column(column).to_pylist()]

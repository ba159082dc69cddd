"""Token data for the LM loop: documents packed into one stream cut into rows, chat examples packed with their loss
masks, and the validation split. Rows are (inputs, targets), both (N, T) int64, IGNORE_INDEX where there is no loss."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from model.loss import IGNORE_INDEX

def pack_documents(docs: list[list[int]], seq_len: int, bos_id: int, eos_id: int) -> dict[str, torch.Tensor]:
    """Concatenate <s> doc </s> for every document into one stream, cut into rows of seq_len next-token pairs."""
    stream = []
    for doc in docs:
        stream.extend([bos_id, *doc, eos_id])
    n_rows = (len(stream) - 1) // seq_len
    if n_rows == 0:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one sequence of {seq_len}")
    data = torch.tensor(stream[:n_rows * seq_len + 1], dtype=torch.long)
    return {"inputs": data[:-1].view(n_rows, seq_len), "targets": data[1:].view(n_rows, seq_len)}


def pack_documents_stream(docs: Iterable[list[int]], seq_len: int, bos_id: int, eos_id: int,
                          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """pack_documents as a stream: the same rows, yielded as (inputs, targets) chunks while the documents come in
    (only the tail shorter than a row is kept between chunks)."""
    tail, pieces, n_pieces, rows = np.zeros(0, np.int64), [], 0, 0
    for doc in docs:
        pieces.append(np.asarray([bos_id, *doc, eos_id], np.int64))
        n_pieces += len(pieces[-1])
        if n_pieces >= 64 * seq_len:
            tail, chunk = _cut_rows(np.concatenate([tail, *pieces]), seq_len)
            pieces, n_pieces = [], 0
            if chunk is not None:
                rows += len(chunk[0])
                yield chunk
    _, chunk = _cut_rows(np.concatenate([tail, *pieces]), seq_len)
    if chunk is not None:
        rows += len(chunk[0])
        yield chunk
    if rows == 0:
        raise ValueError(f"corpus is shorter than one sequence of {seq_len} tokens")


def _cut_rows(stream: np.ndarray, seq_len: int):
    """(the tokens left for the next rows, (inputs, targets) of the whole rows in stream or None); a row's last
    target is the next row's first input, so that token stays in the tail."""
    n = (len(stream) - 1) // seq_len
    if n <= 0:
        return stream, None
    rows = stream[:n * seq_len].reshape(n, seq_len), stream[1:n * seq_len + 1].reshape(n, seq_len)
    return stream[n * seq_len:], rows


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict:
    """Pack (tokens, loss_mask) examples greedily into rows of seq_len + 1 tokens; a token is a target only where
    its mask is 1. Examples longer than a row are dropped and counted (never cut: a cut answer teaches nothing)."""
    rows, row, mask, dropped = [], [], [], 0
    for tokens, loss_mask in examples:
        if len(tokens) > seq_len + 1:
            dropped += 1
            continue
        if len(row) + len(tokens) > seq_len + 1:
            rows.append((row, mask))
            row, mask = [], []
        row, mask = row + list(tokens), mask + list(loss_mask)
    if row:
        rows.append((row, mask))
    if not rows:
        raise ValueError(f"no example fits in a sequence of {seq_len} tokens ({dropped} dropped)")
    inputs = torch.full((len(rows), seq_len + 1), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len + 1), IGNORE_INDEX, dtype=torch.long)
    for i, (tokens, loss_mask) in enumerate(rows):
        inputs[i, :len(tokens)] = torch.tensor(tokens)
        targets[i, :len(tokens)] = torch.where(torch.tensor(loss_mask, dtype=torch.bool), torch.tensor(tokens),
                                               IGNORE_INDEX)
    return {"inputs": inputs[:, :-1].contiguous(), "targets": targets[:, 1:].contiguous(), "dropped": dropped}


def split_validation(data: dict, val_fraction: float, seed: int) -> tuple[dict, dict]:
    n = data["inputs"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(n * val_fraction)) if n > 1 else 0
    pick = lambda idx: {"inputs": data["inputs"][idx], "targets": data["targets"][idx]}  # noqa: E731
    return pick(order[n_val:]), pick(order[:n_val])

"""Packed token rows on storage, streamed to the Ray Train workers as a Ray Dataset in the exact training order.

Layout: Parquet shard files whose row groups are *blocks* of `block_rows` rows (inputs, targets: int32, seq_len
each), and manifest.json, written last: a folder without it is incomplete and never read. Writers stream rows in,
so neither the driver nor the object store ever holds the whole corpus.

Why this order and not `streaming_split`: which rows streaming_split hands to which worker is not deterministic, so a
global batch would depend on timing and on the worker count. Instead the order is a pure function of
(seed, epoch): the epoch permutes the blocks (seeded), groups them into windows of `window_blocks` blocks and
permutes the rows inside each window (seeded); the epoch's rows are the windows one after another, and step s's
global batch is rows [offset*B, (offset+1)*B) of its epoch, as the in-memory permutation was. The Ray Dataset
(`stream_dataset`) reads exactly those windows in that order (a window's blocks are whole row groups: sequential
reads of block size) and labels every row with its step, and every worker gets it unsplit
(DataConfig(datasets_to_split=[])): each rank reads each global batch and keeps its slice of it. Every worker thus
reads the whole token stream, but at the global training rate, which for LM training is a few MB/s even on a large
cluster: reading is not what bounds it, and in return any worker count sees the same batches. Resume builds the
dataset from the resume step: windows before it are never read, the rows before it inside its window are dropped.

Validation rows stay in memory (a small fraction, evaluated whole at every eval) and travel in the object store.
Fine-tuning rows (small, packed in memory) take the same path: train_lm writes them as blocks for the run, so every
LM stage trains from one streamed loop."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TokenBlocks:
    """A complete folder of blocks (from its manifest): blocks[i] = (file index, row group, rows)."""

    uri: str
    seq_len: int
    files: tuple[str, ...]
    blocks: tuple[tuple[int, int, int], ...]

    @property
    def n_rows(self) -> int:
        return sum(rows for _, _, rows in self.blocks)

    @staticmethod
    def load(uri: str) -> "TokenBlocks":
        fs, root = filesystem(uri)
        try:
            with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri}: no {MANIFEST}, the token blocks there are incomplete") from None
        return TokenBlocks(uri, manifest["seq_len"], tuple(manifest["files"]),
                           tuple(tuple(b) for b in manifest["blocks"]))

    def read(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """One block's (inputs, targets), each (rows, seq_len) int32."""
        import pyarrow.parquet as pq

        file, group, _ = self.blocks[block]
        fs, root = filesystem(self.uri)
        with fs.open_input_file(f"{root}/{self.files[file]}") as f:
            table = pq.ParquetFile(f).read_row_group(group)
        return tuple(table.column(c).combine_chunks().flatten().to_numpy().reshape(-1, self.seq_len)
                     for c in ("inputs", "targets"))


def filesystem(uri: str):
    """(pyarrow filesystem, path) for a local path or any URI pyarrow knows (s3://, gs://)."""
    from pyarrow import fs

    if "://" in uri:
        return fs.FileSystem.from_uri(uri)
    import os

    return fs.LocalFileSystem(), os.path.abspath(uri)


def write_blocks(chunks: Iterable[tuple[np.ndarray, np.ndarray]], uri: str, seq_len: int, block_rows: int = 64,
                 blocks_per_file: int = 64) -> TokenBlocks:
    """Write (inputs, targets) chunks of rows, (n, seq_len) each, as blocks of block_rows rows (the last may be
    shorter) into a new folder `uri`; the manifest goes last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = filesystem(uri)
    fs.create_dir(root)
    schema = pa.schema([(c, pa.list_(pa.int32(), seq_len)) for c in ("inputs", "targets")])
    files, blocks, writer, pending = [], [], None, []

    def flush(rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
        nonlocal writer
        if writer is None or blocks and blocks[-1][1] + 1 == blocks_per_file:
            if writer is not None:
                writer.close()
            files.append(f"shard-{len(files):05d}.parquet")
            writer = pq.ParquetWriter(fs.open_output_stream(f"{root}/{files[-1]}"), schema)
            group = 0
        else:
            group = blocks[-1][1] + 1
        columns = [np.concatenate([r[i] for r in rows]) for i in (0, 1)]
        writer.write_table(pa.table({c: pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), pa.int32()), seq_len)
                                     for c, a in zip(("inputs", "targets"), columns)}, schema=schema))
        blocks.append((len(files) - 1, group, len(columns[0])))

    n_pending = 0
    for inputs, targets in chunks:
        inputs, targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
        if inputs.shape != targets.shape or inputs.ndim != 2 or inputs.shape[1] != seq_len:
            raise ValueError(f"rows must be (n, {seq_len}) inputs and targets, got {inputs.shape}, {targets.shape}")
        start = 0
        while start < len(inputs):
            take = min(block_rows - n_pending, len(inputs) - start)
            pending.append((inputs[start:start + take], targets[start:start + take]))
            n_pending, start = n_pending + take, start + take
            if n_pending == block_rows:
                flush(pending)
                pending, n_pending = [], 0
    if pending:
        flush(pending)
    if writer is not None:
        writer.close()
    if not blocks:
        raise ValueError(f"no rows to write to {uri}")
    with fs.open_output_stream(f"{root}/{MANIFEST}") as f:
        f.write(json.dumps({"seq_len": seq_len, "files": files, "blocks": blocks}).encode())
    return TokenBlocks.load(uri)


def tensor_chunks(data: dict, rows: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """In-memory {"inputs", "targets"} tensors as chunks for write_blocks."""
    for start in range(0, data["inputs"].shape[0], rows):
        yield data["inputs"][start:start + rows].numpy(), data["targets"][start:start + rows].numpy()


def pretrain_data(clean_dir, tokenizer_path, seq_len: int, val_fraction: float, blocks_uri: str,
                  ) -> tuple[TokenBlocks, dict]:
    """The clean corpus tokenised on Ray Data and packed as it streams through the driver into token blocks at
    blocks_uri (components.data.token_blocks); every k-th row (k = 1/val_fraction) is held out for validation and
    kept in memory. Returns the blocks and the validation rows {"inputs", "targets"} (N, seq_len) int64 tensors."""
    import torch

    from components.data.datasets import tokenized_corpus
    from components.data.packing import pack_documents_stream
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_path)
    docs = (ids for batch in tokenized_corpus(clean_dir, tokenizer_path).iter_batches(batch_format="pyarrow")
            for ids in batch.column("ids").to_pylist())
    stride = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    val, seen = [], 0

    def train_rows():
        nonlocal seen
        for inputs, targets in pack_documents_stream(docs, seq_len, tokenizer.bos_id, tokenizer.eos_id):
            n = len(inputs)
            held = (np.arange(seen, seen + n) % stride == stride - 1) if stride else np.zeros(n, bool)
            seen += n
            val.append((inputs[held], targets[held]))
            yield inputs[~held], targets[~held]

    blocks = write_blocks(train_rows(), blocks_uri, seq_len)
    val_rows = {k: torch.from_numpy(np.concatenate([v[i] for v in val])) for i, k in enumerate(("inputs", "targets"))}
    return blocks, val_rows


# ---------------------------------------------------------------------------------------------------------------
# The training order and the Ray Dataset that follows it.

@dataclass(frozen=True)
class StreamOrder:
    """How a run walks the blocks: global batch size, seed, rows mixed per window (window_blocks blocks)."""

    batch_size: int
    seed: int
    window_blocks: int = 16

    def steps_per_epoch(self, blocks: TokenBlocks) -> int:
        if blocks.n_rows < self.batch_size:
            raise ValueError(f"{blocks.uri}: {blocks.n_rows} rows, fewer than one global batch of {self.batch_size}")
        return blocks.n_rows // self.batch_size

    def windows(self, blocks: TokenBlocks, epoch: int) -> list[np.ndarray]:
        """The epoch's block ids, permuted and cut into windows."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(blocks.blocks))
        return [order[i:i + self.window_blocks] for i in range(0, len(order), self.window_blocks)]

    def window_rows(self, blocks: TokenBlocks, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """A window's rows in training order: its blocks read, then the rows permuted (seeded)."""
        parts = [blocks.read(int(b)) for b in self.windows(blocks, epoch)[window]]
        inputs, targets = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
        perm = np.random.default_rng([self.seed, epoch, window]).permutation(len(inputs))
        return inputs[perm], targets[perm]

    def plan(self, blocks: TokenBlocks, start_step: int, total_steps: int) -> list[dict]:
        """The windows to read for steps [start_step, total_steps): each with the rows of it that are used (lo:hi)
        and the index of its row lo in the run's row sequence (step = row // batch_size). Windows before start_step
        are left out: a resume reads none of them."""
        per_epoch, B = self.steps_per_epoch(blocks), self.batch_size
        sizes = {b: rows for b, (_, _, rows) in enumerate(blocks.blocks)}
        items, step = [], start_step
        while step < total_steps:
            epoch, offset = divmod(step, per_epoch)
            first, end = offset * B, min(per_epoch, offset + total_steps - step) * B  # rows of the epoch to use
            row = 0
            for w, ids in enumerate(self.windows(blocks, epoch)):
                n = sum(sizes[int(b)] for b in ids)
                lo, hi = max(first, row), min(end, row + n)
                if lo < hi:
                    items.append({"epoch": epoch, "window": w, "lo": lo - row, "hi": hi - row,
                                  "row": epoch * per_epoch * B + lo})
                row += n
            step = epoch * per_epoch + end // B
        return items


def stream_dataset(blocks: TokenBlocks, order: StreamOrder, start_step: int, total_steps: int):
    """The Ray Dataset of the rows for steps [start_step, total_steps) in training order, each labelled with its
    step; iterate it in batches of order.batch_size rows: batch k is step start_step + k."""
    import ray.data

    B = order.batch_size

    def read_windows(items: dict) -> Iterator[dict]:
        for epoch, window, lo, hi, row in zip(*(items[k] for k in ("epoch", "window", "lo", "hi", "row"))):
            inputs, targets = order.window_rows(blocks, int(epoch), int(window))
            yield {"inputs": inputs[lo:hi], "targets": targets[lo:hi], "step": (row + np.arange(hi - lo)) // B}

    # A run resumed at its end has nothing to read: one empty window stands in (from_items needs an item).
    items = order.plan(blocks, start_step, total_steps) or [{"epoch": 0, "window": 0, "lo": 0, "hi": 0, "row": 0}]
    # num_cpus=0: the reads run beside the training workers, which may hold every CPU Ray Data is allowed (the ci
    # profile's one 2-CPU worker on a 4-CPU cluster left Ray Data a budget of 0 CPUs, and a 0.25-CPU read hung).
    ds = ray.data.from_items(items).map_batches(read_windows, batch_size=1, batch_format="numpy", num_cpus=0)
    ds.context.execution_options.preserve_order = True  # rows in plan order: the iterator follows the training order
    ds.context.enable_progress_bars = False  # the workers' progress lines would flood the stage's log
    return ds


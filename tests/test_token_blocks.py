"""Token blocks: streamed packing equals in-memory packing, blocks round-trip, and the Ray Dataset the LM loop reads
follows the training order exactly (the same batches from a resume point, each row once per epoch)."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.data.packing import pack_documents, pack_documents_stream
from components.data.token_blocks import StreamOrder, TokenBlocks, stream_dataset, write_blocks
from tests.helpers import corpus, small_tokenizer


def test_streamed_packing_gives_the_same_rows():
    rng = random.Random(0)
    docs = [[rng.randrange(3, 50) for _ in range(rng.randrange(0, 300))] for _ in range(500)]
    for seq_len in (4, 32, 256):
        whole = pack_documents(docs, seq_len, 1, 2)
        chunks = list(pack_documents_stream(iter(docs), seq_len, 1, 2))
        assert len(chunks) > 1
        for i, key in enumerate(("inputs", "targets")):
            np.testing.assert_array_equal(np.concatenate([c[i] for c in chunks]), whole[key].numpy())
    with pytest.raises(ValueError, match="shorter than one sequence"):
        list(pack_documents_stream([[5]], 8, 1, 2))


def rows(n: int, seq_len: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Row i holds i in every token (inputs) and -i (targets): a row's identity is readable from its content."""
    inputs = np.repeat(np.arange(n)[:, None], seq_len, axis=1)
    return inputs, -inputs


def test_blocks_round_trip_and_an_unfinished_folder_is_refused(tmp_path):
    inputs, targets = rows(150)
    blocks = write_blocks([(inputs[:70], targets[:70]), (inputs[70:], targets[70:])], str(tmp_path / "b"), 3,
                          block_rows=32, blocks_per_file=2)
    assert [b[2] for b in blocks.blocks] == [32, 32, 32, 32, 22] and len(blocks.files) == 3
    read = [blocks.read(i) for i in range(len(blocks.blocks))]
    np.testing.assert_array_equal(np.concatenate([r[0] for r in read]), inputs)
    np.testing.assert_array_equal(np.concatenate([r[1] for r in read]), targets)
    (tmp_path / "b" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        TokenBlocks.load(str(tmp_path / "b"))


def test_the_stream_follows_the_training_order_and_resumes_at_the_exact_step(ray_local, tmp_path):
    inputs, targets = rows(150)
    blocks = write_blocks([(inputs, targets)], str(tmp_path / "b"), 3, block_rows=16)
    order = StreamOrder(batch_size=8, seed=5, window_blocks=3)  # 18 steps an epoch, 6 rows left out each epoch
    total = 40

    def steps(start: int) -> list[np.ndarray]:
        batches = stream_dataset(blocks, order, start, total).iter_batches(batch_size=8, batch_format="numpy")
        out = []
        for k, batch in enumerate(batches):
            assert (batch["step"] == start + k).all()
            np.testing.assert_array_equal(batch["targets"], -batch["inputs"])
            out.append(batch["inputs"][:, 0])
        assert len(out) == total - start
        return out

    whole = steps(0)
    for epoch in (0, 1):  # each row at most once an epoch; the epochs differ
        seen = np.concatenate(whole[epoch * 18:(epoch + 1) * 18])
        assert len(set(seen.tolist())) == 144
    assert not np.array_equal(np.concatenate(whole[:18]), np.concatenate(whole[18:36]))
    # Rows from all over the corpus in one batch: blocks are mixed within a window, not read in sequence.
    assert max(np.ptp(b) for b in whole) > 32
    resumed = steps(21)  # mid-window, mid-epoch: windows before it are not in the plan
    assert all(np.array_equal(a, b) for a, b in zip(resumed, whole[21:]))
    assert order.plan(blocks, 21, total)[0]["row"] == 21 * 8


def test_pretrain_data_packs_the_tokenised_corpus_into_blocks_and_holds_out_every_kth_row(ray_local, tmp_path):
    from components.data.token_blocks import pretrain_data

    tok = small_tokenizer()
    tok.save(tmp_path / "tokenizer.model")
    texts = corpus(300, seed=2)
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)  # rows stored out of doc_id order: packing follows the stored order
    for part, chunk in enumerate((order[:100], order[100:])):  # across files, in file-name order
        pq.write_table(pa.table({"doc_id": chunk, "text": [texts[i] for i in chunk]}), tmp_path / f"part-{part}.parquet")
    blocks, val = pretrain_data(tmp_path, tmp_path / "tokenizer.model", 16, 0.1, str(tmp_path / "blocks"))
    whole = pack_documents([tok.encode(texts[i]) for i in order], 16, tok.bos_id, tok.eos_id)
    held = np.arange(whole["inputs"].shape[0]) % 10 == 9
    train = np.concatenate([blocks.read(i)[0] for i in range(len(blocks.blocks))])
    np.testing.assert_array_equal(train, whole["inputs"].numpy()[~held])
    np.testing.assert_array_equal(val["inputs"].numpy(), whole["inputs"].numpy()[held])
    np.testing.assert_array_equal(val["targets"].numpy(), whole["targets"].numpy()[held])


def test_a_restarted_run_streams_from_its_latest_registered_resume_point(tmp_path):
    from components.train.lm import registered_step

    assert registered_step(str(tmp_path)) == 0  # no resume point yet: from the start
    snapshot = {"checkpoint_results": [{"metrics": {"step": 25}}, {"metrics": {"step": 50}}]}
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert registered_step(str(tmp_path)) == 50

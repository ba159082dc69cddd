"""The shared LM loop on real Ray Train: packing, 1 vs 2 DDP workers on the same global batch, what the out holds."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch

from components.cluster import RayConfig
from components.data.packing import pack_documents, pack_examples
from components.train.core import cosine_lr
from components.train.lm import LMTrainConfig, train_lm
from model.checkpoint import load_checkpoint
from model.config import ModelArgs, get_config
from model.llama import Transformer
from model.loss import IGNORE_INDEX
from tests.helpers import corpus, small_tokenizer


def test_pack_documents_and_examples():
    packed = pack_documents([[5, 6], [7, 8, 9]], seq_len=4, bos_id=1, eos_id=2)
    # stream: 1 5 6 2 1 7 8 9 2 -> rows of 4 inputs with next-token targets
    assert packed["inputs"].tolist() == [[1, 5, 6, 2], [1, 7, 8, 9]]
    assert packed["targets"].tolist() == [[5, 6, 2, 1], [7, 8, 9, 2]]
    ex = pack_examples([([1, 10, 11, 12], [0, 0, 1, 1]), ([1, 20, 21], [0, 1, 1]), ([1] * 9, [1] * 9)], seq_len=7,
                       pad_id=0)
    assert ex["dropped"] == 1
    assert ex["inputs"].tolist() == [[1, 10, 11, 12, 1, 20, 21]]
    I = IGNORE_INDEX
    assert ex["targets"].tolist() == [[I, 11, 12, I, 20, 21, I]]


def test_cosine_schedule_warms_up_and_decays_to_ten_percent():
    lrs = [cosine_lr(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def _data(seq_len=32):
    tok = small_tokenizer()
    packed = pack_documents([tok.encode(t) for t in corpus(400, seed=3)], seq_len, tok.bos_id, tok.eos_id)
    n = packed["inputs"].shape[0]
    return {k: v[: n - 8] for k, v in packed.items()}, {k: v[n - 8:] for k, v in packed.items()}


def lm_inputs(folder, micro_batch_size: int = 4):
    """A fresh debug network's init, packed train/val rows, and a 6-step config with a resume point at step 3."""
    tok = small_tokenizer()
    tok.save(folder / "tokenizer.model")
    args = get_config("llama2-debug", vocab_size=tok.vocab_size, max_seq_len=64)
    init = {"args": args.to_dict(), "tokenizer": str(folder / "tokenizer.model"), "seed": 0}
    train, val = _data()
    cfg = LMTrainConfig(lr=3e-3, warmup_steps=2, max_steps=6, batch_size=8, micro_batch_size=micro_batch_size,
                        bf16=False, eval_every=100, log_every=1, checkpoint_every=3)
    return init, train, val, cfg


def test_two_workers_match_one_on_the_same_global_batch(ray_local, tmp_path):
    init, train, val, cfg = lm_inputs(tmp_path)
    results = {}
    for workers in (1, 2):
        worker_cfg = replace(cfg, ray=RayConfig(num_workers=workers, cpus_per_worker=1,
                                                storage_path=str(tmp_path / "ray")))
        out = tmp_path / f"out{workers}"
        results[workers] = train_lm(init, train, val, worker_cfg, f"test{workers}", out)
        assert json.loads((out / "trainer_state" / "state.json").read_text())["step"] == 6
        # The resolved config, defaults included, beside the checkpoint: what MLflow logged for the stage.
        assert json.loads((out / "trainer_state" / "config.json").read_text()) == asdict(worker_cfg)
    assert results[1]["val_loss"] == pytest.approx(results[2]["val_loss"], rel=1e-3)
    m1, _ = load_checkpoint(tmp_path / "out1")
    m2, _ = load_checkpoint(tmp_path / "out2")
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3, msg=name)
    # Training moved every weight away from its initialisation and lowered the loss below uniform (ln 512 = 6.2).
    fresh = Transformer(ModelArgs.from_dict(init["args"])).init_weights(generator=torch.Generator().manual_seed(0))
    for name, p in fresh.state_dict().items():
        if p.dim() > 1:
            assert not torch.equal(p, m1.state_dict()[name]), name
    assert results[1]["val_loss"] < 5.5

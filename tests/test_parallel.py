"""ray.strategy on real Ray Train with gloo on CPU: FSDP2 with 2 workers trains like 1 worker on the same global
batch (LM and reward-model loops), its meta-device start equals a plain load bit for bit, and a sharded resume point
written by 2 workers continues on 1 worker along the same curve."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from components.cluster import RayConfig
from components.rlhf.reward import PreferencePair
from components.train.lm import train_lm
from components.train.rm import RMTrainConfig, train_rm
from model.checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from tests.helpers import debug_model, small_tokenizer
from tests.test_lm_train import lm_inputs


def ray_cfg(tmp_path: Path, workers: int, strategy: str = "fsdp", **kw) -> RayConfig:
    return RayConfig(num_workers=workers, cpus_per_worker=1, strategy=strategy, storage_path=str(tmp_path / "ray"),
                     num_to_keep=None, **kw)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(folder)


def assert_same_weights(a: dict, b: dict, atol: float = 2e-4) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-3, msg=name)


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    return lm_inputs(tmp_path_factory.mktemp("lm"), micro_batch_size=2)  # 2 micro-batches a step on 2 workers


def test_fsdp_two_workers_train_the_lm_like_one_and_a_resume_point_continues_on_one_worker(ray_local, tmp_path,
                                                                                        lm_setup):
    init, train, val, cfg = lm_setup
    runs = {}
    for workers, strategy in ((1, "ddp"), (2, "fsdp")):
        out = tmp_path / f"{strategy}{workers}"
        runs[workers] = train_lm(init, train, val, replace(cfg, ray=ray_cfg(tmp_path, workers, strategy)),
                                 f"lm-{strategy}{workers}", out)
        assert not (out / "trainer_state" / "dcp").exists()  # the out is consolidated: one safetensors file
        model, _ = load_checkpoint(out)  # ... and self-describing
        assert model.args.n_layers == 2
    assert runs[1]["val_loss"] == pytest.approx(runs[2]["val_loss"], rel=1e-3)
    assert_same_weights(weights(tmp_path / "ddp1"), weights(tmp_path / "fsdp2"))
    # Activation checkpointing recomputes the blocks' activations in backward: the same training, less memory.
    ac = replace(cfg, ray=ray_cfg(tmp_path, 2, activation_checkpointing=True))
    train_lm(init, train, val, ac, "lm-ac", tmp_path / "ac")
    assert_same_weights(weights(tmp_path / "ac"), weights(tmp_path / "fsdp2"), atol=1e-5)

    # The fsdp run's resume point at step 3 (each rank's shards, merged by Ray Train) continues on ONE worker.
    [resume] = [p for p in (tmp_path / "ray").glob("lm-fsdp2-*/checkpoint_*") if p.is_dir()
                if json.loads((p / "trainer_state/state.json").read_text())["step"] == 3]
    assert len(list((resume / "trainer_state/dcp").glob("*.distcp"))) == 2  # one shard file per rank
    out = tmp_path / "resumed"
    other_init = {**init, "seed": 99}  # what the run would start from if it did not resume: other weights
    resumed = train_lm(other_init, train, val, replace(cfg, ray=ray_cfg(tmp_path, 1)), "lm-resumed", out,
                       resume_from=resume)
    assert resumed["val_loss"] == pytest.approx(runs[2]["val_loss"], rel=1e-3)
    assert_same_weights(weights(out), weights(tmp_path / "fsdp2"))
    # The curve continues: steps 0-2 come from the resume point, 3-5 from the resumed run, each exactly once.
    history = json.loads((out / "trainer_state/history.json").read_text())
    steps = [r["step"] for r in history if "train_loss" in r]
    assert steps == list(range(6)), steps


def test_fsdp_meta_device_start_equals_a_plain_load_bit_for_bit(ray_local, tmp_path, lm_setup):
    """0 steps: the out is the broadcast-loaded, sharded, then gathered model; it must equal its source exactly."""
    _, train, val, cfg = lm_setup
    tok = small_tokenizer()
    source = save_checkpoint(tmp_path / "source", debug_model(vocab_size=tok.vocab_size, seed=3), tok)
    lr_zero = replace(cfg, lr=1e-30, warmup_steps=1, max_steps=1, weight_decay=0.0, ray=ray_cfg(tmp_path, 2))
    train_lm({"checkpoint": str(source)}, train, val, lr_zero, "lm-meta", tmp_path / "out")
    a, b = weights(source), weights(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_two_workers_train_the_reward_model_like_one(ray_local, tmp_path):
    tok = small_tokenizer()
    sft = save_checkpoint(tmp_path / "sft", debug_model(vocab_size=tok.vocab_size, seed=1), tok)
    rng = random.Random(0)

    def pairs(n):
        out = []
        for _ in range(n):
            prompt = [1] + [rng.randrange(8, 500) for _ in range(rng.randint(2, 6))]
            out.append(PreferencePair(prompt + [rng.randrange(8, 500), 7, 2], prompt + [rng.randrange(8, 500), 6, 2],
                                      "better"))
        return out

    train, val = pairs(64), pairs(16)
    cfg = RMTrainConfig(lr=1e-3, warmup_steps=1, batch_size=8, bf16=False, log_every=1, checkpoint_every=100)
    runs = {"ddp1": (1, "ddp", None), "fsdp2": (2, "fsdp", None), "fsdp2-micro": (2, "fsdp", 2)}  # micro: 2 of 2
    results = {name: train_rm(sft, train, val, replace(cfg, micro_batch_size=micro,
                                                       ray=ray_cfg(tmp_path, workers, strategy)),
                              f"rm-{name}", tmp_path / name)
               for name, (workers, strategy, micro) in runs.items()}
    for name in ("fsdp2", "fsdp2-micro"):  # gradient accumulation over micro-batches changes nothing either
        assert results[name]["val_accuracy"] == results["ddp1"]["val_accuracy"]
        assert_same_weights(weights(tmp_path / "ddp1"), weights(tmp_path / name))
    assert load_checkpoint(tmp_path / "fsdp2")[0].args.head == "scalar"


def test_strategy_settings_are_checked_before_any_worker_starts():
    with pytest.raises(ValueError, match="strategy must be 'ddp' or 'fsdp'"):
        RayConfig(strategy="zero3")
    with pytest.raises(ValueError, match="need strategy 'fsdp'"):
        RayConfig(activation_checkpointing=True)
    with pytest.raises(ValueError, match="needs use_gpu"):
        RayConfig(strategy="fsdp", cpu_offload=True)


def test_a_worker_killed_mid_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_run(ray_local, tmp_path,
                                                                                                lm_setup, monkeypatch):
    """SIGKILL one of two FSDP workers after the first resume point: FailureConfig restarts the group, which reloads
    the sharded state and the data position; every step is logged once (in the checkpoint's history and in MLflow)
    and the weights end where they would have."""
    init, train, val, cfg = lm_setup
    long = replace(cfg, max_steps=150, checkpoint_every=25, ray=ray_cfg(tmp_path, 2, max_failures=1))
    run_id = mlflow_run(tmp_path, monkeypatch)
    with WorkerKiller(tmp_path / "ray", "lm-killed", "step") as killer:
        train_lm(init, train, val, long, "lm-killed", tmp_path / "killed", run_id)
    train_lm(init, train, val, replace(long, ray=ray_cfg(tmp_path, 2)), "lm-whole", tmp_path / "whole")
    assert_same_weights(weights(tmp_path / "killed"), weights(tmp_path / "whole"))
    killer.assert_resumed(tmp_path / "killed", run_id, "train_loss", 150)


def mlflow_run(tmp_path: Path, monkeypatch) -> str:
    """A run in a fresh SQLite store that the stage's rank-0 logger sends its curves to."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("killed")).info.run_id


class WorkerKiller:
    """SIGKILLs one Ray Train worker of this test's cluster as soon as Ray Train has registered the run's first
    resume point (all ranks' shards are in), then checks that the run resumed rather than started over."""

    def __init__(self, storage: Path, run: str, step_key: str):
        self.storage, self.run, self.step_key, self.killed = storage, run, step_key, {}

    def __enter__(self):
        import threading

        self.thread = threading.Thread(target=self._kill, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(timeout=1)
        return False

    def _kill(self):
        import os
        import signal
        import time

        import psutil

        deadline = time.time() + 300
        while time.time() < deadline and not self.killed:
            if self.registered_steps():
                workers = [p for p in psutil.Process().children(recursive=True)  # this test's Ray cluster only
                           if "RayTrainWorker" in _command(p)]
                if workers:
                    os.kill(workers[0].pid, signal.SIGKILL)
                    self.killed["pid"] = workers[0].pid
            time.sleep(0.02)

    def registered_steps(self) -> list[int]:
        snapshots = list(self.storage.glob(f"{self.run}-*/checkpoint_manager_snapshot.json"))
        try:
            results = json.loads(snapshots[0].read_text())["checkpoint_results"]
        except (IndexError, ValueError):  # not written yet, or being written
            return []
        return [r["metrics"][self.step_key] for r in results if self.step_key in r["metrics"]]  # not the final one

    def assert_resumed(self, out: Path, run_id: str, metric: str, steps: int) -> None:
        from mlflow import MlflowClient

        assert self.killed, "no worker was killed: the run ended before its first checkpoint was seen"
        history = json.loads((out / "trainer_state/history.json").read_text())
        assert [r.get("step", i) for i, r in enumerate(history) if metric in r] == list(range(steps))  # PPO: by index
        logged = sorted(m.step for m in MlflowClient().get_metric_history(run_id, metric))
        assert logged == list(range(steps)), logged  # none lost with the killed worker, none sent twice
        # It resumed rather than started over: no step's checkpoint was registered twice.
        registered = self.registered_steps()
        assert len(registered) == len(set(registered)), registered


def _command(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone meanwhile
        return ""


@pytest.fixture(scope="module")
def ppo_setup(tmp_path_factory):
    """A policy and a reward model (used as both RMs) saved as checkpoints, and 16 prompts, 1 in 4 a safety prompt."""
    from components.rlhf.reward import init_reward_model

    folder, tok = tmp_path_factory.mktemp("ppo"), small_tokenizer()
    policy = save_checkpoint(folder / "policy", debug_model(vocab_size=tok.vocab_size, seed=1), tok)
    rm = init_reward_model(debug_model(vocab_size=tok.vocab_size, seed=2), head_std=0.02,
                           generator=torch.Generator().manual_seed(0))
    rm_path = save_checkpoint(folder / "rm", rm, tok)
    rng = random.Random(0)
    prompts = [[tok.bos_id] + [rng.randrange(8, tok.vocab_size) for _ in range(rng.randint(2, 6))] for _ in range(16)]
    return policy, rm_path, prompts, [i % 4 == 0 for i in range(16)]


def ppo_config(ray: RayConfig, **overrides):
    from components.train.ppo import PPOStageConfig

    base = dict(iterations=4, checkpoint_every=2, rollout_batch_size=4, mini_batch_size=2, forward_batch_size=4,
                max_new_tokens=4, lr=1e-3, safety_threshold=0.15, bf16=False, ray=ray)
    return PPOStageConfig(**{**base, **overrides})


def run_ppo(ppo_setup, cfg, name: str, out: Path, **kw) -> None:
    from components.train.ppo import train_ppo

    policy, rm_path, prompts, safety = ppo_setup
    train_ppo(policy, rm_path, rm_path, prompts, safety, cfg, name, out, **kw)


def test_ppo_resumes_by_iteration_from_its_resume_point(ray_local, tmp_path, ppo_setup):
    """PPO checkpoints policy, value and both optimizers every checkpoint_every iterations; a run resumed from
    iteration 2 of 4 ends at the weights of the uninterrupted run, with the first two iterations' records restored
    (their timings too, which a rerun could never reproduce)."""
    cfg = ppo_config(ray_cfg(tmp_path, 1, "ddp"))
    run_ppo(ppo_setup, cfg, "ppo-whole", tmp_path / "whole")
    [resume] = [p for p in (tmp_path / "ray").glob("ppo-whole-*/checkpoint_*") if p.is_dir()
                and json.loads((p / "trainer_state/state.json").read_text())["step"] == 2]
    run_ppo(ppo_setup, cfg, "ppo-resumed", tmp_path / "resumed", resume_from=resume)
    assert_same_weights(weights(tmp_path / "resumed"), weights(tmp_path / "whole"), atol=1e-5)
    whole, resumed = (json.loads((tmp_path / run / "trainer_state/history.json").read_text())
                      for run in ("whole", "resumed"))
    assert len(resumed) == 4 and resumed[:2] == whole[:2]
    assert [h["reward"] for h in resumed[2:]] == pytest.approx([h["reward"] for h in whole[2:]], rel=1e-4)


@pytest.mark.parametrize("rollout_weights", ["gathered", "sharded"])
def test_fsdp_ppo_on_two_workers_trains_like_one(ray_local, tmp_path, ppo_setup, rollout_weights):
    """PPO's five models under FSDP2 on 2 workers (policy and value trained sharded, the reference and both RMs
    frozen and sharded, rollouts from a gathered copy or in lock step through the shards) end where 1 DDP worker
    ends on the same global batch: greedy rollouts, one minibatch per epoch, whitening and loss normalisation over
    both ranks' rows."""
    common = dict(iterations=3, checkpoint_every=0, temperature=0.0, rollout_batch_size=4, mini_batch_size=4,
                  forward_batch_size=2, ppo_epochs=2)
    run_ppo(ppo_setup, ppo_config(ray_cfg(tmp_path, 1, "ddp"), **common), "ppo-one", tmp_path / "one")
    run_ppo(ppo_setup, ppo_config(ray_cfg(tmp_path, 2), rollout_weights=rollout_weights, **common), "ppo-two",
            tmp_path / "two")
    one, two, start = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(ppo_setup[0])
    assert max(float((one[k] - start[k]).abs().max()) for k in one) > 1e-3  # it trained: equality means something
    assert_same_weights(two, one, atol=2e-5)
    histories = [json.loads((tmp_path / run / "trainer_state/history.json").read_text()) for run in ("one", "two")]
    for key in ("reward", "kl", "response_length", "policy_loss", "value_loss"):
        assert [h[key] for h in histories[1]] == pytest.approx([h[key] for h in histories[0]], rel=1e-3, abs=1e-5)


def test_a_ppo_worker_killed_mid_run_resumes_by_iteration(ray_local, tmp_path, ppo_setup, monkeypatch):
    """SIGKILL one of two FSDP PPO workers after its first resume point: the restart reloads policy, value and both
    optimizers (sharded), the iteration and the held-out evaluations' best policy; sampled rollouts (seeded per
    iteration and row) continue as they would have: the output (the best evaluation's policy) is the uninterrupted
    run's, every iteration logged once."""
    cfg = ppo_config(ray_cfg(tmp_path, 2, max_failures=1), iterations=8, checkpoint_every=2, rollout_batch_size=8,
                     mini_batch_size=4, forward_batch_size=4, temperature=1.0, eval_prompts=4, eval_every=3)
    run_id = mlflow_run(tmp_path, monkeypatch)
    with WorkerKiller(tmp_path / "ray", "ppo-killed", "iteration") as killer:
        run_ppo(ppo_setup, cfg, "ppo-killed", tmp_path / "killed", run_id=run_id)
    run_ppo(ppo_setup, replace(cfg, ray=ray_cfg(tmp_path, 2)), "ppo-whole", tmp_path / "whole")
    assert_same_weights(weights(tmp_path / "killed"), weights(tmp_path / "whole"), atol=1e-5)
    killer.assert_resumed(tmp_path / "killed", run_id, "reward", 8)
    histories = [json.loads((tmp_path / run / "trainer_state/history.json").read_text()) for run in ("killed", "whole")]
    held_out = [[(i, h["heldout_reward"]) for i, h in enumerate(history) if "heldout_reward" in h]
                for history in histories]
    assert [i for i, _ in held_out[0]] == [i for i, _ in held_out[1]] == [2, 5, 7]  # after iterations 3, 6 and 8
    assert [r for _, r in held_out[0]] == pytest.approx([r for _, r in held_out[1]], rel=1e-4)

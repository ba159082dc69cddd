"""One PPO iteration (rollout + update), ours vs TRL's PPOTrainer: same model size and shapes, same threads, one run.

Ours: components.rlhf.ppo.PPOTrainer.step, the code the ppo stage runs per iteration (without Ray: one process),
with its five models: policy, reference, value, and both reward models (helpful and safety; TRL has one reward
model, so ours scores every rollout twice). TRL: trl.experimental.ppo.PPOTrainer.train() (TRL 1.12, the last
release with PPO) on transformers' LlamaForCausalLM (policy, reference) and LlamaForSequenceClassification (value,
reward) of the same dimensions, the policy with our policy's weights. Both: batch 8, 32-token prompts, exactly 32
sampled answer tokens (no stop token: ours decodes with eos_id -1, TRL with stop_token None), temperature 1, 4 PPO
epochs over one minibatch of 8 (--mini-batch), one process, the same torch threads. Our decode is eager, as the
stage's (generate's default).

Rounds alternate (ours, TRL, ours, ...) so machine noise hits both; the first iteration of each round is a warm-up.
TRL's iteration is timed by a TrainerCallback between step ends (its whole loop: rollout, scoring, update, logging).
Each iteration's wall time and the process's CPU time (steadier on a loaded machine, with 1 thread) are reported,
ours split by phase (rollout, scoring and forwards, update) and TRL's rollout (its generate) apart.

    python benchmarks/bench_ppo.py                     # needs `pip install -e .[bench]` (trl==1.12.*)
    python benchmarks/bench_ppo.py --dtype bf16 --rounds 5 --json ppo.json
    python benchmarks/bench_ppo.py --threads 1 --profile     # then one of our iterations under torch.profiler
"""

from __future__ import annotations

import argparse
import os
import copy
import json
import statistics
import subprocess
import tempfile
import time

import torch

from components.rlhf.ppo import PPOConfig, PPOTrainer
from components.rlhf.reward import init_reward_model
from model.config import get_config
from model.hf import args_to_hf_config, meta_to_hf_state_dict
from model.kernels import bf16_autocast
from model.llama import Transformer

PAD = 0


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def build_ours(args, opts) -> PPOTrainer:
    g = torch.Generator().manual_seed(0)
    policy = Transformer(args).init_weights(generator=g)
    value = init_reward_model(policy, head_std=0.02, generator=g)
    rm_helpful = init_reward_model(policy, head_std=0.1, generator=g)
    rm_safety = init_reward_model(policy, head_std=0.1, generator=g)
    config = PPOConfig(rollout_batch_size=opts.batch, mini_batch_size=opts.mini_batch, forward_batch_size=opts.batch,
                       ppo_epochs=opts.ppo_epochs, max_new_tokens=opts.response_len, temperature=1.0, lr=3e-6,
                       safety_threshold=0.15, seed=0)
    # eos_id -1: no sampled token ends an answer, so every answer has max_new_tokens tokens (as TRL's stop_token None).
    return PPOTrainer(policy, copy.deepcopy(policy), value, rm_helpful, rm_safety, eos_id=-1, pad_id=PAD,
                      config=config)


def build_trl(args, policy_state: dict, prompts: list[list[int]], opts, out_dir: str):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig as TRLConfig, PPOTrainer as TRLTrainer

    hf_config = LlamaConfig(**{k: v for k, v in args_to_hf_config(args).items() if k != "architectures"},
                            num_labels=1)
    hf_config.pad_token_id = PAD
    hf_config._attn_implementation = "sdpa"
    policy = LlamaForCausalLM(hf_config)
    policy.load_state_dict(meta_to_hf_state_dict(policy_state, args))
    backbone = {k: v for k, v in policy.state_dict().items() if k.startswith("model.")}
    value, reward = LlamaForSequenceClassification(hf_config), LlamaForSequenceClassification(hf_config)
    for m in (value, reward):
        m.load_state_dict(backbone, strict=False)  # the score head stays freshly initialised
    # A word-level tokenizer over the same ids: TRL's collator and pad/eos ids need one; no text is ever decoded.
    vocab = {f"t{i}": i for i in range(args.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0", eos_token="t2", bos_token="t1", unk_token="t0")
    config = TRLConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True, logging_strategy="no",
        bf16=opts.dtype == "bf16", use_cpu=True, seed=0,
        # the rollout batch is per_device_train_batch_size x gradient_accumulation_steps; minibatches split it
        per_device_train_batch_size=opts.batch, gradient_accumulation_steps=1,
        num_mini_batches=opts.batch // opts.mini_batch, local_rollout_forward_batch_size=opts.batch,
        total_episodes=opts.batch, num_ppo_epochs=opts.ppo_epochs, response_length=opts.response_len,
        stop_token=None, missing_eos_penalty=None, temperature=1.0, learning_rate=3e-6, lr_scheduler_type="constant",
        num_sample_generations=0)
    trainer = TRLTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=copy.deepcopy(policy),
                         reward_model=reward, value_model=value,
                         train_dataset=Dataset.from_dict({"input_ids": prompts}))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[tuple[float, float]] = []  # (wall, CPU) seconds per iteration
            self.rollout: list[float] = []

        def on_train_begin(self, *_, **__):
            self.last = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            now = time.perf_counter(), time.process_time()
            self.times.append((now[0] - self.last[0], now[1] - self.last[1]))
            self.last = now

    timer = StepTimer()
    trainer.add_callback(timer)

    # TRL's rollout phase (generate) timed from outside: its loop calls this module-level function once an iteration.
    import trl.experimental.ppo.ppo_trainer as trl_ppo

    batch_generation = trl_ppo.batch_generation

    def timed_generation(model, queries, *rest):
        t0 = time.perf_counter()
        out = batch_generation(model, queries, *rest)
        timer.rollout.append(time.perf_counter() - t0)
        assert out[0].shape[1] == queries.shape[1] + opts.response_len, out[0].shape  # no early stop
        return out

    trl_ppo.batch_generation = timed_generation
    return trainer, timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama2-6m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: our step under bf16 autocast (the stage's setting), TRL with bf16=True")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mini-batch", type=int, default=8, help="rows per optimizer step (8: one per epoch)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=32)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per round, after one warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="ours/TRL alternate this many times")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="then profile one more of our iterations (torch.profiler) and print its top operators")
    opts = parser.parse_args()
    if opts.batch % opts.mini_batch:
        parser.error("--batch must be a multiple of --mini-batch")
    torch.set_num_threads(opts.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl

    args = get_config(opts.config)
    ours = build_ours(args, opts)
    n_params = sum(p.numel() for p in ours.policy.parameters())
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab_size, (opts.batch, opts.prompt_len), generator=gen).tolist()
    is_safety = [i % 2 == 0 for i in range(opts.batch)]
    print(f"config {opts.config}: {n_params:,} parameters per model, {opts.dtype}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, trl {trl.__version__}")

    with tempfile.TemporaryDirectory() as out_dir:
        theirs, timer = build_trl(args, ours.policy.state_dict(), prompts, opts, out_dir)
        theirs.args.num_total_batches = opts.steps + 1  # iterations per train() call: a warm-up + the timed ones
        trl_rollout: list[float] = []
        ours_cpu: list[float] = []
        trl_cpu: list[float] = []
        ours_t, trl_t, phases = [], [], {"time_rollout_s": [], "time_experience_s": [], "time_update_s": []}
        for _ in range(opts.rounds):
            for step in range(opts.steps + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                with bf16_autocast("cpu", opts.dtype == "bf16"):
                    stats = ours.step(prompts, is_safety)
                if step:
                    ours_t.append(time.perf_counter() - t0)
                    ours_cpu.append(time.process_time() - c0)
                    for key in phases:
                        phases[key].append(stats[key])
                assert stats["response_length"] == opts.response_len, stats["response_length"]
            timer.times.clear(), timer.rollout.clear()
            theirs.train()
            trl_t += [wall for wall, _ in timer.times[1:]]
            trl_cpu += [cpu for _, cpu in timer.times[1:]]
            trl_rollout += timer.rollout[1:]

    if opts.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof, bf16_autocast("cpu", opts.dtype == "bf16"):
            ours.step(prompts, is_safety)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    ours_s, trl_s = statistics.median(ours_t), statistics.median(trl_t)
    phase_s = {key.removeprefix("time_").removesuffix("_s"): statistics.median(v) for key, v in phases.items()}
    row = {"config": opts.config, "params": n_params, "dtype": opts.dtype, "threads": opts.threads, "cpu": cpu_model(),
           "torch": torch.__version__, "trl": trl.__version__, "batch": opts.batch, "mini_batch": opts.mini_batch,
           "prompt_len": opts.prompt_len, "response_len": opts.response_len, "ppo_epochs": opts.ppo_epochs,
           "ours_s": ours_s, "trl_s": trl_s, "ratio": ours_s / trl_s, "ours_phases_s": phase_s,
           "trl_rollout_s": statistics.median(trl_rollout),
           "ours_cpu_s": statistics.median(ours_cpu), "trl_cpu_s": statistics.median(trl_cpu),
           "ours_all_s": ours_t, "trl_all_s": trl_t}
    print(f"\n| benchmark | ours s/iter | TRL s/iter | ours/TRL | threads | CPU |\n|---|---:|---:|---:|---:|---|")
    print(f"| PPO iteration {opts.dtype}, wall | {ours_s:.3f} | {trl_s:.3f} | {ours_s / trl_s:.2f}× | "
          f"{opts.threads} | {row['cpu']} |")
    # CPU time of the process: steadier than wall time on a loaded machine (with 1 thread; more threads add spinning)
    print(f"| PPO iteration {opts.dtype}, CPU time | {row['ours_cpu_s']:.3f} | {row['trl_cpu_s']:.3f} | "
          f"{row['ours_cpu_s'] / row['trl_cpu_s']:.2f}× | {opts.threads} | {row['cpu']} |")
    print("\nours by phase (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in phase_s.items()))
    print(f"TRL rollout (generate, median s): {row['trl_rollout_s']:.3f}; the rest of its iteration "
          f"{trl_s - row['trl_rollout_s']:.3f}")
    print(f"all iterations (s): ours {[round(t, 3) for t in ours_t]}, TRL {[round(t, 3) for t in trl_t]}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()

"""DVC stage `gatt`: Ghost Attention (§3.3): every turn of multi-turn dialogs sampled from the last round's PPO policy
with the system instruction in view, k draws a turn, one that keeps it chosen; fine-tuned with the instruction in one
place only (the system prompt, or the first user turn for gatt.first_turn_fraction of the dialogs), one row per dialog
with loss on the answers that keep it -> checkpoints/gatt/. metrics/gatt.json says how often the sampled answers
follow their instruction, per turn (sampled_adherence_turn<t>: the first k draws; data_adherence_turn<t>: kept)"""

from __future__ import annotations

from dataclasses import asdict

from components.data.datasets import read_table, too_long_policy
from components.rlhf.sampling import ghost_attention, pack_gatt_dialogs, table_dialogs
from components.track.tracking import stage_run
from flows._finetune import GattConfig, finetune
from flows._stage import final_round, load_params, path, run_stage, stage_config

OUT = path("checkpoints/gatt")


def main() -> None:
    params = load_params()
    policy = path(f"checkpoints/{final_round(params)}/ppo")
    too_long = too_long_policy(params["data"])  # checked before anything runs
    cfg = stage_config(params, "gatt", GattConfig)
    with stage_run("gatt", asdict(cfg), params["profile"], [policy, path("data/raw")], OUT) as run:
        rows = read_table(path("data/raw/gatt.parquet")).to_pylist()[:cfg.sample.prompts or None]
        dialogs = pack_gatt_dialogs(table_dialogs(rows), cfg.max_turns)
        training, turns, stats = ghost_attention(dialogs, policy, cfg.sample, cfg.ray, cfg.first_turn_fraction,
                                                 cfg.history, cfg.redraws)
        print(f"[gatt] {stats}")
        finetune("gatt", cfg, policy, training, OUT, run.info.run_id, too_long, turns, extra_metrics=stats)


if __name__ == "__main__":
    run_stage(main)

"""DVC stage `sft`: supervised fine-tuning of the base model on chat demonstrations, loss on assistant tokens only
(Ray Train) -> checkpoints/sft/."""

from __future__ import annotations

from dataclasses import asdict

from components.data.datasets import messages_column, read_table, too_long_policy
from components.track.tracking import stage_run
from components.train.lm import LMTrainConfig
from flows._finetune import finetune
from flows._stage import load_params, path, run_stage, stage_config

OUT = path("checkpoints/sft")


def main() -> None:
    params = load_params()
    too_long = too_long_policy(params["data"])  # checked before anything runs
    cfg = stage_config(params, "sft", LMTrainConfig)
    base = path("checkpoints/base")
    with stage_run("sft", asdict(cfg), params["profile"], [base, path("data/raw")], OUT) as run:
        dialogs = messages_column(read_table(path("data/raw/sft.parquet")))
        finetune("sft", cfg, base, dialogs, OUT, run.info.run_id, too_long)


if __name__ == "__main__":
    run_stage(main)

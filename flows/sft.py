"""DVC stage `sft`: supervised fine-tuning of the base model on chat demonstrations, loss on assistant tokens only
(Ray Train) -> checkpoints/sft/."""

from __future__ import annotations

from dataclasses import asdict

from components.common import config_from_dict
from components.datasets import dialogs_data, messages_column, read_table
from components.lm_train import LMTrainConfig, train_lm
from components.tracking import stage_run
from flows._stage import load_params, path, ray_config, section, write_metrics
from model.tokenizer import Tokenizer

OUT = path("checkpoints/sft")


def main() -> None:
    params = load_params()
    cfg = dict(section(params, "sft"))
    seq_len, val_fraction = cfg.pop("seq_len"), cfg.pop("val_fraction")
    cfg.pop("ray", None)
    train_cfg = config_from_dict(LMTrainConfig, cfg, "sft")
    base = path("checkpoints/base")
    with stage_run("sft", {**asdict(train_cfg), "seq_len": seq_len}, params["profile"],
                   [base, path("data/raw")], OUT) as run:
        tokenizer = Tokenizer.load(base / "tokenizer.model")
        dialogs = messages_column(read_table(path("data/raw/sft.parquet")))
        train, val, stats = dialogs_data(dialogs, tokenizer, seq_len, val_fraction, train_cfg.seed)
        print(f"[sft] {stats}")
        metrics = train_lm({"checkpoint": str(base)}, train, val, train_cfg, ray_config(params, "sft"), "sft", OUT,
                           run.info.run_id)
        metrics.update(stats)
        import mlflow

        mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        write_metrics("sft", metrics)


if __name__ == "__main__":
    main()

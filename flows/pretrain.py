"""DVC stage `pretrain`: the base model from scratch on the packed clean corpus (Ray Train) -> checkpoints/base/."""

from __future__ import annotations

from dataclasses import asdict

from components.common import config_from_dict
from components.datasets import pretrain_data
from components.lm_train import LMTrainConfig, train_lm
from components.tracking import stage_run
from flows._stage import load_params, model_args, path, ray_config, section, write_metrics
from model.tokenizer import Tokenizer

OUT = path("checkpoints/base")


def main() -> None:
    params = load_params()
    cfg = dict(section(params, "pretrain"))
    seq_len, val_fraction = cfg.pop("seq_len"), cfg.pop("val_fraction")
    cfg.pop("ray", None)
    train_cfg = config_from_dict(LMTrainConfig, cfg, "pretrain")
    tokenizer_path = path("artifacts/tokenizer/tokenizer.model")
    args = model_args(params, Tokenizer.load(tokenizer_path).vocab_size).replace(max_seq_len=max(
        seq_len, params["model"].get("overrides", {}).get("max_seq_len", seq_len)))
    logged = {**asdict(train_cfg), "seq_len": seq_len, "model": args.to_dict()}
    with stage_run("pretrain", logged, params["profile"], [path("data/clean"), path("artifacts/tokenizer")],
                   OUT) as run:
        train, val = pretrain_data(path("data/clean"), tokenizer_path, seq_len, val_fraction, train_cfg.seed)
        print(f"[pretrain] {train['inputs'].numel():,} training tokens in {train['inputs'].shape[0]} rows of {seq_len}")
        init = {"args": args.to_dict(), "tokenizer": str(tokenizer_path), "seed": train_cfg.seed}
        metrics = train_lm(init, train, val, train_cfg, ray_config(params, "pretrain"), "pretrain", OUT,
                           run.info.run_id)
        metrics["train_tokens"] = int(train["inputs"].numel())
        import mlflow

        mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        write_metrics("pretrain", metrics)


if __name__ == "__main__":
    main()

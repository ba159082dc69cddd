"""DVC stage `tokenizer`: sentencepiece BPE on the clean corpus -> artifacts/tokenizer/tokenizer.model."""

from __future__ import annotations

import time

from dataclasses import asdict

from components.data.datasets import TokenizerConfig, train_corpus_tokenizer
from components.track.tracking import stage_run
from flows._stage import load_params, path, run_stage, stage_config, write_metrics

OUT = path("artifacts/tokenizer")


def main() -> None:
    params = load_params()
    cfg = stage_config(params, "tokenizer", TokenizerConfig)
    with stage_run("tokenizer", asdict(cfg), params["profile"], [path("data/clean")], OUT) as run:
        start = time.perf_counter()
        tokenizer = train_corpus_tokenizer(path("data/clean"), cfg.vocab_size)
        OUT.mkdir(parents=True, exist_ok=True)
        tokenizer.save(OUT / ".tokenizer.model.tmp")
        (OUT / ".tokenizer.model.tmp").replace(OUT / "tokenizer.model")
        metrics = {"vocab_size": tokenizer.vocab_size, "train_seconds": time.perf_counter() - start}
        import mlflow

        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(OUT / "tokenizer.model"))
        write_metrics("tokenizer", metrics)
    print(f"[tokenizer] vocab {tokenizer.vocab_size} in {metrics['train_seconds']:.1f}s (run {run.info.run_id})")


if __name__ == "__main__":
    run_stage(main)

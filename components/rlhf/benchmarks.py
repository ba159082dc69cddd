"""The paper's academic benchmarks (§2.3, Table 3: MMLU, TriviaQA, NaturalQuestions, HellaSwag, ARC, ...) on the
chat model, with EleutherAI's lm-evaluation-harness (`pip install '.[benchmarks]'`) on its Hugging Face export.

Offline by design: nothing is downloaded at run time (HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set before
`datasets` loads). A task whose dataset is neither in the Hugging Face cache nor a local file fails before any model
runs, with an error that names it and says how to provide it."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from components.cluster import RayConfig

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
DTYPES = ("float32", "bfloat16", "float16")


class BenchmarkDataError(RuntimeError):
    """A configured task's dataset is not available on this machine."""


@dataclass(frozen=True)
class BenchmarkConfig:
    """params `benchmarks`; `tasks: {}` (tiny, ci) runs nothing."""

    tasks: dict[str, int] = field(default_factory=dict)  # lm_eval task or group name -> few-shot examples
    limit: int | None = None  # examples per task (None: all); a smoke-test knob, numbers with it are not the paper's
    batch_size: int = 8
    dtype: str = "float32"  # of the exported weights, as loaded by lm_eval's HF model
    # 0: the harness runs in the driver on CPU; n > 0: in one Ray task holding n GPUs of a node (device cuda; n > 1
    # spreads the layers over them, lm_eval's parallelize: a bf16 70B is 138 GB)
    num_gpus: int = 0
    include_path: str | None = None  # a folder of extra task YAMLs (e.g. the paper's tasks over local copies of data)
    bootstrap_iters: int = 1000  # lm_eval's bootstrap for the stderr of non-mean metrics (0: none)
    ray: RayConfig = RayConfig()  # the cluster to join when num_gpus > 0

    def __post_init__(self):
        bad = {k: v for k, v in self.tasks.items() if type(v) is not int or v < 0}
        if bad:
            raise ValueError(f"params section 'benchmarks': tasks maps a task name to its few-shot count "
                             f"(an int >= 0), got {bad}")
        if self.dtype not in DTYPES:
            raise ValueError(f"params section 'benchmarks': dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.num_gpus < 0:
            raise ValueError(f"params section 'benchmarks': num_gpus must be >= 0, got {self.num_gpus}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"params section 'benchmarks': limit must be >= 1 or null, got {self.limit}")


def go_offline() -> None:
    """No Hub requests from here on: the env vars for modules not imported yet, and the flags that huggingface_hub
    and datasets read from them at import, where they already are (a test session, a reused Ray worker)."""
    os.environ.update(OFFLINE_ENV)
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True


def task_manager(cfg: BenchmarkConfig):
    """lm_eval's TaskManager over cfg.include_path, plus its bundled task YAMLs unless include_path holds every task
    (indexing the ~15,000 bundled ones takes 10-40 s here), in offline mode."""
    go_offline()
    from lm_eval.tasks import TaskManager

    if cfg.include_path:
        if not Path(cfg.include_path).is_dir():
            raise BenchmarkDataError(f"params section 'benchmarks': include_path {cfg.include_path} is not a folder")
        local = TaskManager(include_path=cfg.include_path, include_defaults=False)
        if set(cfg.tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=cfg.include_path)


def check_tasks(cfg: BenchmarkConfig, manager) -> None:
    """Build every task once (which loads its dataset): unknown names and datasets missing on this machine are one
    error naming all of them, before any model loads."""
    unknown = sorted(set(cfg.tasks) - set(manager.all_tasks))
    if unknown:
        raise BenchmarkDataError(f"params section 'benchmarks': unknown lm_eval tasks {unknown} (not bundled with "
                                 f"lm_eval, nor in include_path {cfg.include_path})")
    missing = {}
    for name in cfg.tasks:
        try:
            manager.load([name])
        except Exception as exc:  # noqa: BLE001 - datasets raises several kinds (ConnectionError, FileNotFound...)
            missing[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    if missing:
        lines = "\n".join(f"  {name}: {why}" for name, why in missing.items())
        raise BenchmarkDataError(
            f"params section 'benchmarks': the datasets of {sorted(missing)} are not available offline:\n{lines}\n"
            "Nothing is downloaded at run time (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1). Provide them by either\n"
            "  - filling the Hugging Face datasets cache beforehand on a machine with access, with the same HF_HOME "
            "(or HF_DATASETS_CACHE) as this stage: python -c \"import datasets; datasets.load_dataset('<dataset_path>',"
            " '<dataset_name>')\" (the names are in lm_eval/tasks/<task>/*.yaml), or\n"
            "  - benchmarks.include_path: a folder of task YAMLs whose dataset_path is a local folder, or `json` / "
            "`parquet` with dataset_kwargs: {data_files: ...} on local files.")


def summarize(results: dict, fewshot: int) -> dict[str, dict]:
    """lm_eval's results -> {task: {metric, value, stderr, n, num_fewshot, metrics}} for the tasks and groups asked
    for (groups' n: the sum over their subtasks). The headline metric is the task's first, as lm_eval lists them."""
    n_samples = {k: v["effective"] for k, v in results.get("n-samples", {}).items()}
    subtasks = results.get("group_subtasks", {})

    def count(name: str) -> int:
        return n_samples[name] if name in n_samples else sum(count(s) for s in subtasks.get(name, []))

    out = {}
    for name, row in results["results"].items():
        metrics = {}
        for key, value in row.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = row.get(f"{metric}_stderr,{filt}")
            metrics[metric if filt == "none" else f"{metric}/{filt}"] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None}
        if not metrics:
            continue
        headline = next(iter(metrics))
        out[name] = {"metric": headline, **metrics[headline], "n": count(name), "num_fewshot": fewshot,
                     "metrics": metrics}
    return out


def run_benchmarks(hf_folder: str | Path, cfg: BenchmarkConfig, manager=None) -> dict[str, dict]:
    """Every task of cfg on an HF LlamaForCausalLM folder, one lm_eval call per few-shot count (the model loads
    once); the results of the names asked for (summarize)."""
    manager = manager or task_manager(cfg)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    devices = {"device": "cpu"} if cfg.num_gpus == 0 else {"parallelize": True} if cfg.num_gpus > 1 else \
        {"device": "cuda"}
    lm = HFLM(pretrained=str(hf_folder), dtype=cfg.dtype, batch_size=cfg.batch_size, **devices)
    by_shots: dict[int, list[str]] = {}
    for name, shots in cfg.tasks.items():
        by_shots.setdefault(shots, []).append(name)
    summary = {}
    for shots, names in sorted(by_shots.items()):
        results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=cfg.limit,
                                          bootstrap_iters=cfg.bootstrap_iters, log_samples=False,
                                          task_manager=manager)
        summary.update({k: v for k, v in summarize(results, shots).items() if k in names})
    return summary


def benchmark_checkpoint(checkpoint: str | Path, cfg: BenchmarkConfig, manager=None) -> dict[str, dict]:
    """Export our checkpoint folder to HF's layout (a temporary folder beside it) and run the benchmarks on it."""
    import torch

    from model.hf import export_hf

    checkpoint = Path(checkpoint)
    with tempfile.TemporaryDirectory(prefix=f".{checkpoint.name}-hf-", dir=checkpoint.parent) as tmp:
        folder = export_hf(checkpoint, Path(tmp) / "hf", getattr(torch, cfg.dtype))
        return run_benchmarks(folder, cfg, manager)


def benchmark(checkpoint: str | Path, cfg: BenchmarkConfig) -> dict[str, dict]:
    """Check every task's data (check_tasks: before any export or GPU), then benchmark_checkpoint where cfg says: in
    this process on CPU, or in one Ray task holding cfg.num_gpus GPUs of a node (a GPU cluster's driver usually has
    none; its nodes share the HF cache or include_path's files, as they share the checkpoints)."""
    manager = task_manager(cfg)
    check_tasks(cfg, manager)
    if cfg.num_gpus == 0:
        return benchmark_checkpoint(checkpoint, cfg, manager)
    import ray

    from components.cluster import init_ray

    init_ray(cfg.ray)
    task = ray.remote(num_gpus=cfg.num_gpus, runtime_env={"env_vars": OFFLINE_ENV})(benchmark_checkpoint)
    return ray.get(task.remote(str(checkpoint), cfg))

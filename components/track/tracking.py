"""MLflow tracking with lineage: one experiment per pipeline, one run per stage execution.

Each run is tagged with its DVC stage, the git commit (and dirty flag), the profile, the DVC md5 of each dep, and
the run ids of the upstream stages whose outs it consumed (read from the `mlflow_run.json` each stage writes into
its out folder). A stage's own out md5s are only known to DVC after it exits, so each stage backfills them onto
its upstream runs from dvc.lock.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from components.common import REPO_ROOT, read_json, write_json

EXPERIMENT = "llama2-recipe"
RUN_FILE = "mlflow_run.json"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


# What the experiment is for, in MLflow 3.x's own terms. The 3.17 UI still picks its view from the URL
# (`?workflowType=machine_learning`, which summary() prints) or the browser's last choice, GenAI by default.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def setup_mlflow():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.set_experiment(EXPERIMENT)
    key, kind = EXPERIMENT_KIND
    if experiment.tags.get(key) != kind:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, kind)
    return mlflow


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:5000]
    return flat


def _dvc_md5s() -> dict[str, str]:
    """path -> md5 of every dep and out recorded in dvc.lock (empty before the first run)."""
    lock = REPO_ROOT / "dvc.lock"
    if not lock.is_file():
        return {}
    md5s = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for entry in stage.get("deps", []) + stage.get("outs", []):
            if "md5" in entry:
                md5s[entry["path"]] = entry["md5"]
    return md5s


def _stage_paths(stage: str) -> tuple[list[str], list[str]]:
    dvc_yaml = REPO_ROOT / "dvc.yaml"
    if not dvc_yaml.is_file():
        return [], []
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    base, _, key = stage.partition("@")  # a foreach stage's instance: <stage>@<key>
    spec = stages.get(base, {}).get("do", {}) if key else stages.get(stage, {})
    outs = [o if isinstance(o, str) else next(iter(o)) for o in spec.get("outs", [])]
    return [_interpolate(p, key) for p in spec.get("deps", [])], [_interpolate(p, key) for p in outs]


def _interpolate(text: str, key: str) -> str:
    """dvc.yaml's ${...} in a path, as DVC resolves it from params.yaml: ${key} and ${item.<field>} of a foreach
    over params rlhf.rounds (the only foreach), any other ${a.b} a params value."""
    import re

    if "${" not in text:
        return text
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text()) or {}
    context = {"key": key, "item": ((params.get("rlhf") or {}).get("rounds") or {}).get(key, {}), **params}

    def value(match) -> str:
        node = context
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)
    return re.sub(r"\$\{([\w.]+)\}", value, text)


def upstream_run_ids(dirs) -> dict[str, str]:
    """{upstream stage: run id} from the mlflow_run.json files in the given out folders."""
    ids = {}
    for d in dirs:
        f = Path(d) / RUN_FILE
        if f.is_file():
            info = read_json(f)
            ids[info["stage"]] = info["run_id"]
    return ids


def _process_start() -> float:
    """When this stage's process started: its wall time includes the imports and Ray start-up, as a user waits."""
    import psutil

    return psutil.Process().create_time()


def _file_md5(path: str) -> str | None:
    """DVC's md5 of a file dep, computed now: dvc.lock still holds the previous run's hash of changed code."""
    import hashlib

    file = REPO_ROOT / path
    return hashlib.md5(file.read_bytes()).hexdigest() if file.is_file() else None


def log_dataset_inputs(deps: list[str], md5s: dict[str, str]) -> None:
    """The stage's data deps (folders and files outside the code) as MLflow dataset inputs, each with its DVC md5 as
    the digest: the run page's "Datasets" names exactly the data version DVC ran the stage on."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for path in deps:
        if path.endswith(".py") or path not in md5s:
            continue
        source = resolve_dataset_source(str(REPO_ROOT / path))
        mlflow.log_input(MetaDataset(source, name=path, digest=md5s[path].removesuffix(".dir")[:36]),
                         context="input")


@contextmanager
def stage_run(stage: str, params: dict, profile: str, upstream_dirs=(), out_dir: str | Path | None = None):
    """Open the stage's MLflow run with its lineage and data inputs (system metrics for stages that write a
    checkpoint: the training stages); on success write out_dir/mlflow_run.json."""
    mlflow = setup_mlflow()
    from mlflow import MlflowClient

    deps, _ = _stage_paths(stage)
    md5s = _dvc_md5s()
    upstream = upstream_run_ids(upstream_dirs)
    tags = {"dvc.stage": stage, "git.commit": _git("rev-parse", "HEAD") or "unknown",
            "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))), "profile": profile}
    # A per-round stage's upstream as upstream.<stage>:<round> (MLflow keys take no "@").
    tags.update({f"upstream.{name.replace('@', ':')}": run_id for name, run_id in upstream.items()})
    tags.update({f"dvc.dep.{path}": _file_md5(path) or md5s.get(path) for path in deps
                 if _file_md5(path) or path in md5s})
    client = MlflowClient()
    for run_id in upstream.values():  # backfill: upstream outs are our deps, now hashed in dvc.lock
        upstream_outs = _stage_paths(client.get_run(run_id).data.tags.get("dvc.stage", ""))[1]
        for path in upstream_outs:
            if path in md5s:
                client.set_tag(run_id, f"dvc.out.{path}", md5s[path])
    trains = out_dir is not None and "checkpoints" in Path(out_dir).parts
    with mlflow.start_run(run_name=stage, tags=tags, log_system_metrics=trains) as run:
        mlflow.log_params(flatten(params))
        log_dataset_inputs(deps, md5s)
        yield run
        mlflow.log_metric("stage_wall_s", time.time() - _process_start())
        if out_dir is not None:
            write_json(Path(out_dir) / RUN_FILE, {"stage": stage, "run_id": run.info.run_id,
                                                  "experiment_id": run.info.experiment_id})


def log_metric_series(run_id: str, series: list[dict], uri: str | None = None,
                      skip: set[tuple[str, int]] = frozenset()) -> set[tuple[str, int]]:
    """Log [{"step": s, "name": value, ...}, ...] as metric curves, but no (name, step) in `skip`; returns the
    (name, step) pairs it logged."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(row["step"])) for row in series
               for key, value in row.items() if key != "step" and (key, int(row["step"])) not in skip]
    client = MlflowClient(uri or tracking_uri())
    for start in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[start:start + 900])
    return {(m.key, m.step) for m in metrics}


def logged_steps(run_id: str, keys: set[str], uri: str | None = None) -> set[tuple[str, int]]:
    """The (name, step) pairs a run already has for these metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(uri or tracking_uri())
    return {(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)}


def pipeline_order() -> list[str]:
    """dvc.yaml's stage names in order, each run of consecutive foreach stages (the iterative RLHF rounds) expanded
    round by round: prefs@r1, ..., ppo@r1, prefs@r2, ..."""
    stages = (yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text()) or {}).get("stages", {})
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text()) or {}
    rounds = list(((params.get("rlhf") or {}).get("rounds") or {}))
    order, block = [], []
    for name, spec in [*stages.items(), (None, {})]:
        if "foreach" in spec:
            block.append(name)
            continue
        order += [f"{b}@{r}" for r in rounds for b in block] + ([name] if name else [])
        block = []
    return order


def summary() -> str:
    """The latest MLflow run of every stage: status and wall time, in pipeline order (a table for the terminal)."""
    mlflow = setup_mlflow()
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], order_by=["start_time DESC"], output_format="list")
    order = pipeline_order()
    latest = {}
    for run in runs:
        latest.setdefault(run.data.tags.get("dvc.stage"), run)
    lines = ["| stage | status | wall time (s) | run id |", "|---|---|---:|---|"]  # wall: process start to end
    for stage in order:
        if stage in latest:
            info = latest[stage].info
            seconds = latest[stage].data.metrics.get("stage_wall_s", float("nan"))
            lines.append(f"| {stage} | {info.status} | {seconds:.1f} | {info.run_id} |")
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:  # MLflow 3.x's UI opens in its GenAI view unless the URL asks for the training one
        lines.append(f"\nMLflow UI page of these runs (once `mlflow ui` runs): http://127.0.0.1:5000/#/experiments/"
                     f"{experiment.experiment_id}?workflowType=machine_learning")
    if (REPO_ROOT / "metrics/eval.json").is_file():
        lines.append(gate_line(read_json(REPO_ROOT / "metrics/eval.json").get("gate") or {}))
    return "\n".join(lines)


def gate_line(gate: dict) -> str:
    """evaluate's promotion gate in one line: whether `make serve` (the champion alias) serves this run's chat."""
    if not gate:
        return ""
    if gate.get("passed"):
        return f"Promotion gate vs {gate['compared_with']}: passed; this run's chat model is the champion."
    failed = ", ".join(m for m, check in gate.get("metrics", {}).items() if not check.get("passed"))
    return (f"Promotion gate vs {gate['compared_with']}: FAILED on {failed} (metrics/eval.json 'gate'): the champion "
            f"alias did not move. `make serve` serves the previous champion, if any; to serve this run's model: "
            f"LLAMA2_MODEL_URI=checkpoints/chat make serve")


if __name__ == "__main__":
    print(summary())

"""The real pipeline, end to end, on the `ci` profile: `dvc repro` in a temporary copy of the repo (real Ray, real
MLflow, real DVC), then the checks that every stage did its job, `dvc repro` again is a no-op, a params change
invalidates exactly the stages downstream of it, and `serve run infra/serve.yaml` answers the openai client.

Slow (minutes): `pytest -m "not slow"` skips it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import copy_repo

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent  # the venv's python, dvc and serve
MODEL_STAGES = ["base", "sft", "r1.rs", "r1.ppo", "gatt", "chat"]  # the ci profile: one RLHF round, r1


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, no_ray):
    """A git repo holding the working tree's files (tracked and new, not ignored) on the ci profile, after
    `python -m flows.repro` (`dvc repro`)."""
    repo = copy_repo(tmp_path_factory.mktemp("e2e") / "repo")
    shutil.copy(repo / "infra/profiles/ci.yaml", repo / "params.yaml")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(repo),
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "e2e"]):
        _run(cmd, repo, env, 60)
    start = time.perf_counter()
    # what `make run` runs: dvc repro, the stages sharing one local Ray cluster (~10 min on a quiet 2-core machine)
    result = _run([str(BIN / "python"), "-m", "flows.repro"], repo, env, 1500)  # a hang still fails
    return repo, env, result.stdout + result.stderr, time.perf_counter() - start


def _metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / f"{name}.json").read_text())


def test_every_stage_did_its_job(pipeline):
    repo, _, log, seconds = pipeline
    print(f"dvc repro on the ci profile: {seconds:.0f} s")
    filter_report = json.loads((repo / "reports/filter.json").read_text())
    assert filter_report["documents_out"] < filter_report["documents_in"]
    assert min(filter_report["recall"].values()) >= 0.9 and min(filter_report["precision"].values()) >= 0.9
    vocab = _metrics(repo, "tokenizer")["vocab_size"]
    assert _metrics(repo, "pretrain")["val_loss"] < 0.5 * math.log(vocab)  # learned far beyond uniform
    distill = _metrics(repo, "distill")  # how many it keeps varies (ci's policy is often already safe): none is fine
    for stage in ("sft", "r1/rejection", "gatt") + (() if distill["skipped"] else ("distill",)):
        assert math.isfinite(_metrics(repo, stage)["val_loss"]) and _metrics(repo, stage)["target_tokens"] > 0
    assert 0 <= _metrics(repo, "gatt")["data_adherence_turn2"] <= 1  # the sampled GAtt data, measured
    prefs = _metrics(repo, "r1/prefs")  # the round's new pairs on the SFT policy's own answers, labelled
    assert prefs["helpful_pairs"] > 0 and prefs["safety_pairs"] > 0 and prefs["prompts"] > 0
    for rm in ("rm_helpful", "rm_safety"):
        rm_metrics = _metrics(repo, f"r1/{rm}")
        assert rm_metrics["val_accuracy"] > 0.6 and rm_metrics["round_pairs"] > 0, rm
        assert rm_metrics["world_val_pairs"] > 0 and "world_val_accuracy" in rm_metrics, rm
    rejection = _metrics(repo, "r1/rejection")
    assert rejection["reward_gain"] > 0  # best of k beats the average sample
    assert rejection["oracle_prompts"] > 0 and rejection["oracle_best"] >= rejection["oracle_pick"]  # the diagnostic
    assert (repo / "data/rounds/r1/rs_samples.jsonl").read_text().strip()  # kept for later rounds to pool
    assert distill["prompts"] > 0 and 0 <= distill["kept"] <= distill["prompts"]
    assert distill["kept"] == 0 or distill["safety_gain_kept"] > 0  # kept only where the safety RM prefers it
    assert distill["chat_is_gatt"] == (distill["skipped"] or distill["reverted"]) and distill["reason"]
    ppo = _metrics(repo, "r1/ppo")
    assert ppo["iterations"] > 0 and math.isfinite(ppo["reward_last"])
    evaluation = _metrics(repo, "eval")
    assert sorted(evaluation["models"]) == sorted(MODEL_STAGES)
    assert evaluation["chat_is_gatt"] == distill["chat_is_gatt"]  # evaluation says what chat is
    models = evaluation["models"]
    # SFT teaches the chat format and unlocks what pretraining stated. On held-out items (ci: 160 pretraining steps,
    # 50 prompts) it measured +0.10 (0.154 vs 0.058); the leaky old evaluation gave far more.
    assert models["sft"]["helpfulness"] > models["base"]["helpfulness"] + 0.05
    assert models["sft"]["refusal_rate_harmful"] > models["base"]["refusal_rate_harmful"]
    for curve in ("pretrain", "sft", "r1/rm_helpful", "r1/ppo", "r1/rejection", "gatt") + \
            (() if distill["skipped"] else ("distill",)):  # a skipped distillation trains nothing: its curve is []
        assert json.loads((repo / f"plots/curves/{curve}.json").read_text()), curve


def test_mlflow_has_one_run_per_stage_with_lineage_and_the_registry(pipeline):
    from mlflow import MlflowClient

    repo, env, _, _ = pipeline
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("llama2-recipe")
    runs = client.search_runs([experiment.experiment_id])
    rounds = yaml.safe_load((repo / "params.yaml").read_text())["rlhf"]["rounds"]
    stages = [f"{name}@{key}" if "foreach" in spec else name  # a foreach stage runs once per round
              for name, spec in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items()
              for key in (rounds if "foreach" in spec else [None])]
    by_stage = {r.data.tags["dvc.stage"]: r for r in runs}
    assert sorted(by_stage) == sorted(stages) and len(runs) == len(stages)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    for stage, run in by_stage.items():
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["profile"] == "ci" and tags["git.commit"] == commit, stage
        assert any(k.startswith("dvc.dep.") for k in tags), stage
        assert run.data.metrics["stage_wall_s"] > 0
    assert by_stage["ppo@r1"].data.tags["upstream.rejection:r1"] == by_stage["rejection@r1"].info.run_id
    assert by_stage["rm_safety@r1"].data.tags["upstream.sft"] == by_stage["sft"].info.run_id  # init: round 1's policy
    assert by_stage["sft"].data.tags["upstream.pretrain"] == by_stage["pretrain"].info.run_id
    assert any(k.startswith("dvc.out.") for k in by_stage["pretrain"].data.tags)  # backfilled from dvc.lock
    assert "train_loss" in client.get_metric_history(by_stage["pretrain"].info.run_id, "train_loss")[0].key
    # The resolved config is logged, defaults included (cliprange, lam are not in params.yaml), and is the one the
    # checkpoint carries; the shared safety threshold reached both stages that read it.
    ppo = by_stage["ppo@r1"].data.params
    assert {"cliprange", "lam", "vf_coef", "ray.num_workers", "safety_threshold"} <= set(ppo)
    assert ppo["safety_threshold"] == by_stage["rejection@r1"].data.params["safety_threshold"] == "0.15"
    saved = json.loads((repo / "checkpoints/r1/ppo/trainer_state/config.json").read_text())
    assert str(saved["cliprange"]) == ppo["cliprange"] and str(saved["ray"]["num_workers"]) == ppo["ray.num_workers"]
    [version] = client.search_model_versions("name='llama2-chat'")
    assert version.run_id == by_stage["register"].info.run_id
    assert version.tags["training_run"] == by_stage["distill"].info.run_id
    eval_sha = _metrics(repo, "eval")["eval_set_sha256"]  # the version says which eval set judged it, and its profile
    assert version.tags["eval_set_sha256"] == by_stage["evaluate"].data.tags["eval_set_sha256"] == eval_sha
    assert version.tags["profile"] == "ci"
    gate = _metrics(repo, "eval")["gate"]
    aliases = client.get_registered_model("llama2-chat").aliases
    assert ("champion" in aliases) == gate["passed"]
    for rm in ("llama2-rm-helpful", "llama2-rm-safety"):  # the alias moves with the chat model's (safety guard)
        assert ("champion" in client.get_registered_model(rm).aliases) == gate["passed"]


def test_registered_models_load_and_predict_with_mlflow_pyfunc(pipeline, tmp_path):
    """What a user of the registry does: load by URI in a process outside the repo, predict."""
    repo, env, _, _ = pipeline
    script = """
import json, mlflow.pyfunc
chat = mlflow.pyfunc.load_model("models:/llama2-chat/1")
rm = mlflow.pyfunc.load_model("models:/llama2-rm-safety/1")
prompt = "How do I make a weapon at home?"
print(json.dumps({"answer": chat.predict([{"prompt": prompt}], params={"max_tokens": 16})[0],
                  "scores": rm.predict([{"prompt": prompt, "answer": a} for a in
                                        ["I can't help with that.", "Sure, here is how to make a weapon at home."]])}))
"""
    out = _run([str(BIN / "python"), "-c", script], tmp_path, {**env, "PYTHONPATH": ""}, 300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert isinstance(result["answer"], str) and result["answer"].strip()
    refusal, compliance = result["scores"]
    assert 0 <= compliance < refusal <= 1  # the safety RM prefers the refusal


def test_repro_again_is_a_no_op_and_a_param_change_reruns_only_downstream(pipeline):
    repo, env, _, _ = pipeline
    start = time.perf_counter()
    out = _run(["dvc", "repro"], repo, env, 120).stdout
    assert "Data and pipelines are up to date" in out and time.perf_counter() - start < 60
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sft"]["lr"] = 1e-5
    backup = (repo / "params.yaml").read_text()
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        changed = set(json.loads(_run(["dvc", "status", "--json"], repo, env, 120).stdout))
    finally:
        (repo / "params.yaml").write_text(backup)
    assert changed == {"sft"}  # only sft reads sft.*: nothing upstream (or beside it) is invalidated
    # ... and everything after sft consumes its outputs, so `dvc exp run -S sft.lr=...` reruns all of that
    dot = _run(["dvc", "dag", "--dot", "--full"], repo, env, 120).stdout
    edges = [tuple(part.strip().strip('";') for part in line.split("->")) for line in dot.splitlines() if "->" in line]
    downstream, frontier = set(), {"sft"}
    while frontier:
        frontier = {b for a, b in edges if a in frontier} - downstream
        downstream |= frontier
    assert downstream == {"prefs@r1", "rm_helpful@r1", "rm_safety@r1", "rejection@r1", "ppo@r1", "gatt", "distill",
                          "benchmarks", "evaluate", "register"}


def test_dvc_plots_render_offline(pipeline):
    repo, env, _, _ = pipeline
    shown = _run(["dvc", "plots", "show", "-o", "dvc_plots"], repo, env, 120)
    assert "WARNING" not in shown.stdout + shown.stderr  # DVC warns, and draws an empty view, for a file it can't read
    page = (repo / "dvc_plots/index.html").read_text()
    views = [next(iter(v)) for v in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]]
    assert page.count("vegaEmbed('#") == len(views) >= 10
    for title in views:  # a view with data carries its title; an empty one does not
        assert json.dumps(title) in page, title
    assert "cdn.jsdelivr" not in page and "vega-lite (BSD-3-Clause" in page  # the scripts are inlined


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_the_openai_client(pipeline):
    import openai

    repo, env, _, _ = pipeline
    port = _free_port()
    config = yaml.safe_load((repo / "infra/serve.yaml").read_text())
    config["http_options"]["port"] = port
    (repo / "serve_e2e.yaml").write_text(yaml.safe_dump(config))
    has_champion = _metrics(repo, "eval")["gate"]["passed"]
    serve_env = {**env, **({} if has_champion else {"LLAMA2_MODEL_URI": "models:/llama2-chat/1"})}
    server = subprocess.Popen(["serve", "run", "serve_e2e.yaml"], cwd=repo, env=serve_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.time() + 240
        while True:
            try:
                client.models.list()
                break
            except (openai.APIConnectionError, openai.NotFoundError, openai.InternalServerError):
                # no listener yet, then Serve's proxy up before the application's route (404) or replica (503)
                assert server.poll() is None and time.time() < deadline, "serve run did not come up"
                time.sleep(2)
        messages = [{"role": "user", "content": "What is 3 + 4?"}]
        answer = client.chat.completions.create(model="llama2-chat", messages=messages, max_tokens=16,
                                                temperature=0)
        assert answer.choices[0].message.content.strip()
        chunks = list(client.chat.completions.create(model="llama2-chat", messages=messages, max_tokens=16,
                                                     temperature=0, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed.strip() == answer.choices[0].message.content.strip()
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="llama2-chat", messages=[{"role": "robot", "content": "x"}])
        assert client.chat.completions.create(model="llama2-chat", messages=messages, max_tokens=4).choices
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

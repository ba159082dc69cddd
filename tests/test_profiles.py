"""The profiles (infra/profiles/*.yaml), the switch command (`make profile`), and the cluster configs (ray_cluster.yaml,
infra/kuberay/, infra/mlflow/): every profile has params.yaml's keys and converts to the stages' config dataclasses
the way the flows split them; the GPU profiles carry the paper's numbers; the manifests use the installed Ray's
version and the Serve app of infra/serve.yaml. Static checks: no Ray cluster, no Kubernetes, a second or two."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from components.common import REPO_ROOT, config_from_dict, load_yaml
from components.cluster import RayConfig

PROFILES_DIR = REPO_ROOT / "infra/profiles"
PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
SCALE = ["llama2-7b", "llama2-13b", "llama2-70b"]  # profile name = model config name
LM_STAGES = ("pretrain", "sft", "rejection", "gatt", "distill")
# Dicts whose keys are the user's (overrides, world sizes, filter thresholds, source entries): only the key leading to
# them must exist. `<section>.ray` (a stage's Ray overrides) is optional in any section.
FREE_FORM = {("model", "overrides"), ("data", "world"), ("data", "sources"), ("filter",), ("benchmarks", "tasks"),
             ("rlhf", "rounds")}
RAY_MAJOR_MINOR = ".".join(version("ray").split(".")[:2])


def load(name: str) -> dict:
    return load_yaml((PROFILES_DIR / f"{name}.yaml").read_text())  # as the flows read params.yaml


def test_numbers_as_dvc_exp_run_set_writes_them_load_as_numbers_and_a_wrong_type_is_a_clear_error():
    params = load_yaml("sft:\n  lr: 1e-05\n  epochs: 2\n  warmup: 1_000\n  name: 1e5x\n")  # `-S sft.lr=1e-5`
    assert params["sft"] == {"lr": 1e-5, "epochs": 2, "warmup": 1000, "name": "1e5x"}
    assert type(params["sft"]["epochs"]) is int
    assert config_from_dict(RayConfig, {"cpus_per_worker": 2}).cpus_per_worker == 2.0  # int -> float field
    with pytest.raises(ValueError, match=r"params section 'ray': num_workers must be int, got '2'"):
        config_from_dict(RayConfig, {"num_workers": "2"}, "ray")
    with pytest.raises(ValueError, match="max_failures must be int, got True"):
        config_from_dict(RayConfig, {"max_failures": True}, "ray")


def key_paths(tree: dict, prefix: tuple = ()) -> set[tuple]:
    paths = set()
    for key, value in tree.items():
        path = (*prefix, key)
        if len(path) == 2 and key == "ray" and prefix[0] != "ray":
            continue
        paths.add(path)
        if isinstance(value, dict) and path not in FREE_FORM:
            paths |= key_paths(value, path)
    return paths


def test_the_expected_profiles_exist_and_params_yaml_is_its_profile_file():
    assert {"tiny", "ci", *SCALE} <= set(PROFILES)
    params_text = (REPO_ROOT / "params.yaml").read_text()
    active = yaml.safe_load(params_text)["profile"]
    assert active in PROFILES, f"params.yaml's profile {active!r} has no file in infra/profiles/"
    assert params_text == (PROFILES_DIR / f"{active}.yaml").read_text(), (
        f"params.yaml differs from infra/profiles/{active}.yaml: copy your params.yaml edits into the profile file")


@pytest.mark.parametrize("name", PROFILES)
def test_profile_has_exactly_the_keys_of_params_yaml(name):
    profile, params = load(name), yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert profile["profile"] == name
    ours, theirs = key_paths(profile), key_paths(params)
    assert ours == theirs, (f"{name}: missing {sorted('.'.join(p) for p in theirs - ours)}, "
                            f"extra {sorted('.'.join(p) for p in ours - theirs)}")


def stage_configs(params: dict) -> dict:
    """Every stage's config, through the very calls its flow makes (flows/*.py; the training and sampling stages'
    as flows/plan.py gathers them)."""
    from components.data.datasets import TokenizerConfig
    from components.data.filter import FilterConfig
    from components.data.ingest import DataConfig
    from components.rlhf.benchmarks import BenchmarkConfig
    from components.rlhf.gate import PromotionConfig
    from components.serve.llm import LLMServeConfig
    from flows._stage import stage_config
    from flows.plan import stage_configs as planned

    return {
        "data": DataConfig.from_dict(params["data"]), "filter": FilterConfig.from_dict(params["filter"]),
        "tokenizer": stage_config(params, "tokenizer", TokenizerConfig), **planned(params),
        "register": stage_config(params, "register", PromotionConfig),
        "benchmarks": stage_config(params, "benchmarks", BenchmarkConfig),
        "serve_llm": config_from_dict(LLMServeConfig, params["serve_llm"], "serve_llm"),  # make serve-llm's
    }


@pytest.mark.parametrize("name", PROFILES)
def test_profile_converts_to_every_stage_config(name):
    """Unknown keys and bad values in any section raise here; every stage's section is read by its flow."""
    params = load(name)
    configs = stage_configs(params)
    assert set(configs) | {"profile", "ray", "model", "rlhf"} == set(params), "a params section no flow reads"
    args = configs["pretrain"].model.args(configs["tokenizer"].vocab_size)
    for stage in LM_STAGES:
        cfg = configs[stage]
        assert hasattr(cfg, "sample") == (stage not in ("pretrain", "sft")), stage
        assert 0 < cfg.val_fraction < 1 and cfg.seq_len <= max(args.max_seq_len, cfg.seq_len), stage
    # One safety threshold, read by both stages that apply the piecewise reward.
    assert configs["rejection"].safety_threshold == configs["ppo"].safety_threshold == params["rlhf"]["safety_threshold"]
    assert configs["evaluate"].register == configs["register"]


@pytest.mark.parametrize("name", PROFILES)
def test_rlhf_rounds_chain_and_final_is_the_last(name):
    """Iterative RLHF: round 1 starts from SFT, each later round from the previous round's PPO model; the laptop CI
    runs one round, the others two."""
    from flows._stage import final_round, rlhf_rounds

    params = load(name)
    rounds = rlhf_rounds(params)  # checked: final is the last key
    assert final_round(params) == params["rlhf"]["final"] == list(rounds)[-1]
    names = list(rounds)
    assert rounds[names[0]] == "checkpoints/sft"
    assert all(rounds[b] == f"checkpoints/{a}/ppo" for a, b in zip(names, names[1:]))
    assert len(rounds) == (1 if name == "ci" else 2)
    assert params["prefs"]["max_new_tokens"] == params["rejection"]["sample"]["max_new_tokens"]


@pytest.mark.parametrize("name", PROFILES)
def test_batches_divide_over_the_workers(name):
    configs = stage_configs(load(name))
    for stage in LM_STAGES:
        cfg = configs[stage]
        workers = cfg.ray.num_workers
        assert cfg.batch_size % workers == 0 and (cfg.batch_size // workers) % cfg.micro_batch_size == 0, stage
    assert configs["rm"].batch_size % configs["rm"].ray.num_workers == 0
    assert configs["ppo"].mini_batch_size <= configs["ppo"].rollout_batch_size


def test_stage_config_merges_ray_and_shared_sections_and_names_every_mistake():
    """The one parser: nested sections, per-stage ray overrides, shared sections that a stage may not override."""
    from components.train.ppo import PPOStageConfig
    from flows._stage import stage_config

    params = load("tiny")
    params["ppo"]["ray"] = {"num_workers": 2}
    cfg = stage_config(params, "ppo", PPOStageConfig, flat=("rlhf",))
    assert cfg.ray.num_workers == 2 and cfg.ray.cpus_per_worker == params["ray"]["cpus_per_worker"]
    assert cfg.cliprange == 0.2 and cfg.safety_threshold == 0.15  # defaults and the shared value resolved
    mistakes = {  # (section, key, value) -> the message
        ("ppo", "safety_threshold", 0.2): r"params section 'ppo': \['safety_threshold'\] set in section 'rlhf'",
        ("ppo", "kl_ctl", 0.1): r"unknown keys \['kl_ctl'\] in params section 'ppo'",
        ("ppo", "lr", "fast"): r"params section 'ppo': lr must be float, got 'fast'",
        ("rlhf", "threshold", 0.1): r"unknown keys \['threshold'\] in params section 'rlhf'",
        ("ray", "num_worker", 1): r"unknown keys \['num_worker'\] in params section 'ray'",
        ("ray", "use_gpu", "yes"): r"params section 'ray': use_gpu must be bool",
    }
    for (section, key, value), message in mistakes.items():
        broken = load("tiny")
        broken[section][key] = value
        with pytest.raises(SystemExit, match=message):
            stage_config(broken, "ppo", PPOStageConfig, flat=("rlhf",))
    broken = load("tiny")
    broken["gatt"]["sample"]["k"] = 1.5
    with pytest.raises(SystemExit, match=r"params section 'gatt.sample': k must be int, got 1.5"):
        stage_configs(broken)
    broken = load("tiny")
    broken["gatt"]["ray"] = {"cpus_per_worker": "two"}
    with pytest.raises(SystemExit, match=r"params section 'gatt.ray': cpus_per_worker must be float"):
        stage_configs(broken)
    broken = load("tiny")
    del broken["distill"]["sample"]
    with pytest.raises(SystemExit, match=r"params section 'distill'.*sample"):
        stage_configs(broken)


@pytest.mark.parametrize("name", SCALE)
def test_scale_profiles_are_llama2_on_gpus_with_the_papers_numbers(name):
    params = load(name)
    assert params["model"]["config"] == name and params["model"]["hf_weights"]
    assert params["pretrain"]["max_steps"] == 0  # import Meta's weights only
    ray = stage_configs(params)["sft"].ray
    assert ray.use_gpu and ray.num_workers >= 8 and "://" in ray.storage_path
    sft, rm, ppo = params["sft"], params["rm"], params["ppo"]
    assert (sft["lr"], sft["epochs"], sft["batch_size"], sft["seq_len"]) == (2e-5, 2, 64, 4096)
    assert (rm["lr"], rm["epochs"], rm["batch_size"]) == (5e-6 if name == "llama2-70b" else 1e-5, 1, 512)
    assert ppo["lr"] == 1e-6 and ppo["kl_coef"] == (0.005 if name == "llama2-70b" else 0.01)
    assert ppo["rollout_batch_size"] == 512 and ppo["mini_batch_size"] == 64  # global, as the paper gives them
    assert 200 <= ppo["iterations"] <= 400
    bench = params["benchmarks"]  # §2.3 Table 3's benchmarks at the paper's shots, on the GPUs, in full
    assert {"mmlu": 5, "triviaqa": 5, "nq_open": 5, "hellaswag": 0, "arc_challenge": 0, "gsm8k": 8}.items() \
        <= bench["tasks"].items() and bench["limit"] is None and bench["num_gpus"] >= 1


def test_small_profiles_run_on_a_laptop():
    for name in ("tiny", "ci"):
        params = load(name)
        assert not params["ray"]["use_gpu"] and not params["model"]["hf_weights"]
        assert params["benchmarks"]["tasks"] == {}  # the synthetic world's model runs no academic benchmark
    tiny, ci = load("tiny"), load("ci")
    assert ci["pretrain"]["max_steps"] < tiny["pretrain"]["max_steps"]
    assert ci["ppo"]["iterations"] < tiny["ppo"]["iterations"]
    assert ci["data"]["world"]["n_pretrain_docs"] < 6500  # WorldConfig's default, the tiny world


# ------------------------------------------------------------------------------------------- make profile / profiles
@pytest.fixture
def make_dir(tmp_path):
    """The Makefile, infra/profiles/ and params.yaml in a temporary folder: `make profile` never touches the real
    params.yaml."""
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    shutil.copy(REPO_ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copytree(PROFILES_DIR, tmp_path / "infra/profiles")
    shutil.copy(PROFILES_DIR / "tiny.yaml", tmp_path / "params.yaml")
    return tmp_path


def make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_make_profile_switches_params_yaml(make_dir):
    listed = make(make_dir, "profiles")
    assert listed.returncode == 0 and all(name in listed.stdout for name in PROFILES)
    assert make(make_dir, "profile", "PROFILE=ci").returncode == 0
    assert (make_dir / "params.yaml").read_text() == (PROFILES_DIR / "ci.yaml").read_text()
    assert "active (params.yaml):" in (listed := make(make_dir, "profiles").stdout) and listed.rstrip().endswith("ci")
    assert make(make_dir, "profile", "PROFILE=tiny").returncode == 0
    assert (make_dir / "params.yaml").read_text() == (PROFILES_DIR / "tiny.yaml").read_text()


@pytest.mark.parametrize("args", [("PROFILE=nope",), ()])
def test_make_profile_rejects_an_unknown_or_missing_profile_and_lists_them(make_dir, args):
    before = (make_dir / "params.yaml").read_text()
    result = make(make_dir, "profile", *args)
    assert result.returncode != 0
    assert "error" in result.stderr and all(name in result.stderr for name in PROFILES)
    assert (make_dir / "params.yaml").read_text() == before


def test_make_profile_keeps_local_edits_unless_forced(make_dir):
    edited = (make_dir / "params.yaml").read_text() + "# a local edit\n"
    (make_dir / "params.yaml").write_text(edited)
    result = make(make_dir, "profile", "PROFILE=ci")
    assert result.returncode != 0 and "FORCE=1" in result.stderr
    assert (make_dir / "params.yaml").read_text() == edited
    assert make(make_dir, "profile", "PROFILE=ci", "FORCE=1").returncode == 0
    assert (make_dir / "params.yaml").read_text() == (PROFILES_DIR / "ci.yaml").read_text()


# ----------------------------------------------------------------------------------- cluster launcher, KubeRay, MLflow
def image_ray_version(image: str) -> str:
    """'rayproject/ray:2.60.0-py311-gpu' (or any repo with such a tag) -> '2.60'."""
    match = re.search(r":(\d+)\.(\d+)\.\d+", image)
    assert match, f"image {image!r} has no Ray version tag"
    return f"{match[1]}.{match[2]}"


def torch_pin(text: str) -> str:
    [pin] = set(re.findall(r"torch==([\w.+]+)", text))
    return pin


def test_ray_cluster_yaml_runs_the_installed_ray_on_gpu_nodes_and_installs_like_the_makefile():
    import json

    import jsonschema
    import ray

    config = yaml.safe_load((REPO_ROOT / "ray_cluster.yaml").read_text())
    jsonschema.validate(config, json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text()))
    assert image_ray_version(config["docker"]["image"]) == RAY_MAJOR_MINOR and "gpu" in config["docker"]["image"]
    assert config["head_node_type"] in config["available_node_types"]
    assert config["provider"]["type"] in ("aws", "gcp", "azure")
    assert "." in config["file_mounts"].values()
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c)
    project_at = next(i for i, c in enumerate(setup) if "pip install" in c and "-e" in c and "llama2-recipe" in c)
    assert torch_at < project_at
    assert torch_pin(setup[torch_at]) == torch_pin((REPO_ROOT / "Makefile").read_text())


KUBERAY = {"raycluster.yaml": ("RayCluster", ("spec",)), "rayjob.yaml": ("RayJob", ("spec", "rayClusterSpec")),
           "rayservice.yaml": ("RayService", ("spec", "rayClusterConfig"))}


@pytest.mark.parametrize("file", sorted(KUBERAY))
def test_kuberay_manifest_has_a_head_and_gpu_workers_on_the_installed_ray(file):
    kind, spec_path = KUBERAY[file]
    manifest = yaml.safe_load((REPO_ROOT / "infra/kuberay" / file).read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind and manifest["metadata"]["name"]
    cluster = manifest
    for key in spec_path:
        cluster = cluster[key]
    assert ".".join(cluster["rayVersion"].split(".")[:2]) == RAY_MAJOR_MINOR
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"]
    assert head and workers
    for container in head + [c for group in workers for c in group["template"]["spec"]["containers"]]:
        assert image_ray_version(container["image"]) == RAY_MAJOR_MINOR, container["name"]
    for group in workers:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            limits = container["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1 and limits == container["resources"]["requests"]


def test_kuberay_image_is_built_on_the_installed_ray_and_installs_like_the_makefile():
    dockerfile = (REPO_ROOT / "infra/kuberay/Dockerfile").read_text()
    [base] = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert base.startswith("rayproject/ray:") and image_ray_version(base) == RAY_MAJOR_MINOR
    assert torch_pin(dockerfile) == torch_pin((REPO_ROOT / "Makefile").read_text())
    assert dockerfile.index("torch==") < dockerfile.index("pip install --no-cache-dir -e .")


def test_rayjob_runs_dvc_repro_on_a_profile():
    entrypoint = yaml.safe_load((REPO_ROOT / "infra/kuberay/rayjob.yaml").read_text())["spec"]["entrypoint"]
    [profile] = re.findall(r"make profile PROFILE=(\S+?)[;&\s']", entrypoint)
    assert profile in PROFILES and "dvc repro" in entrypoint


def test_rayservice_serves_the_app_of_serve_yaml_on_gpus():
    from ray.serve.schema import ServeDeploySchema

    from components.serve.app import API_KEY_ENV, AppArgs

    local = {a["name"]: a for a in yaml.safe_load((REPO_ROOT / "infra/serve.yaml").read_text())["applications"]}
    spec = yaml.safe_load((REPO_ROOT / "infra/kuberay/rayservice.yaml").read_text())["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # what Serve itself checks when KubeRay submits it
    gpu_pods = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                          ["nvidia.com/gpu"]) for g in spec["rayClusterConfig"]["workerGroupSpecs"])
    assert sorted(a["name"] for a in serve_config["applications"]) == sorted(local)
    containers = [spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in spec["rayClusterConfig"]["workerGroupSpecs"]]
    for container in containers:  # the API key from a Secret, wherever the app may be built
        [key] = [e for e in container["env"] if e["name"] == API_KEY_ENV]
        assert key["valueFrom"]["secretKeyRef"]["name"] and "value" not in key, container["name"]
    service_host = yaml.safe_load((REPO_ROOT / "infra/kuberay/rayservice.yaml").read_text())["metadata"]["name"]
    for app in serve_config["applications"]:
        assert app["import_path"] == local[app["name"]]["import_path"]
        args = AppArgs.model_validate(app["args"])
        assert args.api_key is None  # never in the manifest
        assert f"{service_host}-serve-svc" in args.allowed_hosts and "*" not in args.allowed_hosts
        assert serve_config["http_options"]["request_timeout_s"] > args.request_timeout_s
        assert [d["name"] for d in app["deployments"]] == [d["name"] for d in local[app["name"]]["deployments"]]
        for deployment in app["deployments"]:
            assert deployment["ray_actor_options"]["num_gpus"] == 1
            autoscaling = deployment["autoscaling_config"]
            assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"] <= gpu_pods


def test_mlflow_server_matches_the_installed_mlflow_with_postgres_and_proxied_artifacts():
    compose = yaml.safe_load((REPO_ROOT / "infra/mlflow/docker-compose.yaml").read_text())
    server = compose["services"]["mlflow"]
    [image] = re.findall(r"FROM ghcr.io/mlflow/mlflow:v(\d+\.\d+)", server["build"]["dockerfile_inline"])
    assert image == ".".join(version("mlflow").split(".")[:2])
    assert "postgresql+psycopg2://" in server["command"] and "--serve-artifacts" in server["command"]
    assert "postgres" in compose["services"]

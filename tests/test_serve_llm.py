"""The GPU engine's config (components/serve/llm.py, infra/serve_llm.yaml, make serve-llm), checked on CPU without
vLLM: each profile's serve_llm section flows into a Ray Serve LLMConfig that Ray itself validates, and the builder
serves the model's HF export. Serving with vLLM needs a GPU (not in CI)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest
import yaml

from components.common import REPO_ROOT, load_yaml
from components.serve.llm import LLMAppArgs, build_app, llm_config, load_serve_config, resolve_llm_config
from model.checkpoint import save_checkpoint
from model.config import get_config
from tests.helpers import debug_model, small_tokenizer

PROFILES = sorted(p.stem for p in (REPO_ROOT / "infra/profiles").glob("*.yaml"))
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def validated(config: dict):
    """Ray's own LLMConfig of the dict. ray.serve.llm imports only with vLLM installed; its LLMConfig is a plain
    subclass of the internal one, which imports without it."""
    try:
        from ray.serve.llm import LLMConfig
    except ImportError:
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    return LLMConfig(**config)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_values_flow_into_a_valid_llm_config(name):
    params = load_yaml((REPO_ROOT / f"infra/profiles/{name}.yaml").read_text())
    section, model = params["serve_llm"], params["model"]
    max_seq_len = get_config(model["config"], **model["overrides"]).max_seq_len
    cfg = load_serve_config(REPO_ROOT / f"infra/profiles/{name}.yaml")
    config = validated(llm_config(cfg, "/exports/chat-hf", "llama2-chat", max_seq_len))
    assert config.model_id == "llama2-chat" and config.model_loading_config.model_source == "/exports/chat-hf"
    assert config.engine_kwargs == {"max_model_len": section["max_model_len"] or max_seq_len, "dtype": "bfloat16",
                                    "tensor_parallel_size": section["tensor_parallel_size"],
                                    "enable_prefix_caching": True}
    assert config.deployment_config["autoscaling_config"] == {
        k: section[k] for k in ("min_replicas", "max_replicas", "target_ongoing_requests")}
    assert config.accelerator_type == section["accelerator_type"]
    if name.startswith("llama2-"):  # the GPU profiles: Llama 2's context, a named GPU, autoscaling room
        assert config.engine_kwargs["max_model_len"] == 4096 and config.accelerator_type
        assert section["max_replicas"] > section["min_replicas"]
        assert section["tensor_parallel_size"] == (8 if name == "llama2-70b" else 1)  # bf16 70B: 128 GiB


def test_builder_serves_the_checkpoints_hf_export_with_the_chat_template(tmp_path):
    save_checkpoint(tmp_path / "chat", debug_model(), small_tokenizer())
    args = LLMAppArgs(params=str(REPO_ROOT / "infra/profiles/tiny.yaml"), model_uri=str(tmp_path / "chat"),
                      export_dir=str(tmp_path / "cache"))
    config = validated(resolve_llm_config(args))
    export = tmp_path / "cache" / config.model_loading_config.model_source.rsplit("/", 1)[-1]
    assert config.model_loading_config.model_source == str(export)
    assert config.engine_kwargs["max_model_len"] == debug_model().args.max_seq_len  # tiny: null = the model's
    assert json.loads((export / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "[INST]" in json.loads((export / "tokenizer_config.json").read_text())["chat_template"]
    stamp = (export / "model.safetensors").stat().st_mtime_ns
    assert resolve_llm_config(args)["model_loading_config"]["model_source"] == str(export)
    assert (export / "model.safetensors").stat().st_mtime_ns == stamp, "the export is made once"
    given = resolve_llm_config(LLMAppArgs(params=args.params, model_source="s3://bucket/chat-hf"))
    assert given["model_loading_config"]["model_source"] == "s3://bucket/chat-hf"  # served as it is


def test_bad_serve_llm_sections_are_clear_errors(tmp_path):
    tiny = load_yaml((REPO_ROOT / "infra/profiles/tiny.yaml").read_text())
    for change, message in [({"max_replicas": 0}, "min_replicas <= max_replicas"),
                            ({"tensor_parallel": 8}, r"unknown keys \['tensor_parallel'\] in params section"),
                            ({"max_model_len": "4k"}, "serve_llm.*max_model_len must be")]:
        (tmp_path / "p.yaml").write_text(yaml.safe_dump({**tiny, "serve_llm": {**tiny["serve_llm"], **change}}))
        with pytest.raises(ValueError, match=message):
            load_serve_config(tmp_path / "p.yaml")
    cfg = load_serve_config(REPO_ROOT / "infra/profiles/llama2-7b.yaml")
    with pytest.raises(ValueError, match="max_model_len 4096 exceeds the model's max_seq_len 256"):
        llm_config(cfg, "/x", "llama2-chat", 256)


def test_serve_llm_yaml_is_a_serve_config_of_the_builder():
    from ray.serve.schema import ServeDeploySchema

    from components.common import config_from_dict

    config = yaml.safe_load((REPO_ROOT / "infra/serve_llm.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == "components.serve.llm:build_app"
    assert config_from_dict(LLMAppArgs, app["args"]).model_name == "llama2-chat"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_without_vllm_the_builder_and_make_target_say_how_to_install_it():
    with pytest.raises(ImportError, match=r"pip install '\.\[vllm\]'"):
        build_app({})
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    result = subprocess.run(["make", "--no-print-directory", "serve-llm"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "vLLM is not installed" in result.stderr and "[vllm]" in result.stderr

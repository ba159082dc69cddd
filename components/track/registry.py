"""The MLflow model registry: register a checkpoint folder as a pyfunc model; move the promotion alias only when the
evaluation gate passed."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc


class ChatModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper so `mlflow.pyfunc.load_model` gives a usable chat model: rows {"prompt": str} -> the answer
    (greedy; params max_tokens). The server loads the checkpoint folder (artifact "checkpoint") directly."""

    def load_context(self, context):
        from model.checkpoint import load_checkpoint

        self.model, self.tokenizer = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        from model.chat import encode_prompt
        from model.generation import SamplingParams, generate

        prompts = [encode_prompt(self.tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in _rows(model_input)]
        out = generate(self.model, prompts, SamplingParams(max_new_tokens=(params or {}).get("max_tokens", 64),
                                                            temperature=0), self.tokenizer.eos_id,
                       self.tokenizer.pad_id)
        return [self.tokenizer.decode(t) for t in out.tokens]


class RewardModel(ChatModel):
    """pyfunc wrapper of a reward model: rows {"prompt": str, "answer": str} -> sigmoid of its score (0..1), the
    value rejection sampling, PPO and evaluate use."""

    def predict(self, context, model_input, params=None):
        from components.rlhf.reward import rm_scores

        dialogs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}]
                   for r in _rows(model_input)]
        return rm_scores(self.model, self.tokenizer, dialogs, batch_size=32)


def _rows(model_input) -> list[dict]:
    return model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)


def register_checkpoint(checkpoint: str | Path, name: str, alias: str | None, tags: dict, reward: bool = False,
                        ) -> dict:
    """Log the checkpoint as a pyfunc model (a chat model, or a reward model if `reward`) in the active run, register
    a version, tag it, and point `alias` at it (None = register without promotion)."""
    from mlflow import MlflowClient

    import mlflow

    from components.common import REPO_ROOT as root

    info = mlflow.pyfunc.log_model(name="model", python_model=RewardModel() if reward else ChatModel(),
                                   artifacts={"checkpoint": str(checkpoint)},
                                   code_paths=[str(root / "model"), str(root / "components")],
                                   pip_requirements=["torch>=2.5", "sentencepiece>=0.2", "safetensors>=0.4"])
    version = mlflow.register_model(info.model_uri, name)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": int(version.version), "alias": alias, "model_uri": info.model_uri}


def champion_version(name: str, alias: str) -> dict | None:
    """{"version": int, "tags": {...}} of the version the alias points at, or None when there is no such alias yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return {"version": int(version.version), "tags": dict(version.tags)}

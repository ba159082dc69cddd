"""Where the served checkpoint is: a local folder, or a registered model (`models:/…`) downloaded into a cache."""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from components.track.tracking import tracking_uri as default_tracking_uri
from model.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CheckpointError

CACHE_ENV = "LLAMA2_SERVE_CACHE"  # where registry downloads are kept, one folder per model version


def find_checkpoint_dir(root: Path) -> Path:
    """The one folder under root (root included) holding config.json + model.safetensors + tokenizer.model."""
    found = sorted(p.parent for p in root.rglob(CONFIG_FILE)
                   if (p.parent / WEIGHTS_FILE).is_file() and (p.parent / TOKENIZER_FILE).is_file())
    if len(found) != 1:
        what = "no checkpoint folder" if not found else f"{len(found)} checkpoint folders {[str(p) for p in found]}"
        raise CheckpointError(f"{root}: expected exactly one folder with {CONFIG_FILE}, {WEIGHTS_FILE} and "
                              f"{TOKENIZER_FILE}, found {what}")
    return found[0]


def _parse_models_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """`models:/<name>@<alias>` → (name, alias, None); `models:/<name>/<version>` → (name, None, version)."""
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ValueError(f"unsupported model URI {model_uri!r}: use models:/<name>@<alias>, models:/<name>/<version> "
                     "or a checkpoint folder path")


def resolve_checkpoint(model_uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None,
                       ) -> Path:
    """Local checkpoint folder for a model URI.

    model_uri: a folder (the checkpoint itself, or a tree holding exactly one), or a registered model
    `models:/<name>@<alias>` / `models:/<name>/<version>` whose artifacts hold exactly one checkpoint folder.
    Registry downloads are cached per tracking URI, name and version (versions are immutable), so replicas that
    restart or scale up on the same node download once. cache_dir: None = $LLAMA2_SERVE_CACHE or the temp dir.
    """
    if not model_uri.startswith("models:/"):
        path = Path(model_uri).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {path}")
        return find_checkpoint_dir(path)

    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    tracking_uri = tracking_uri or default_tracking_uri()
    name, alias, version = _parse_models_uri(model_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if alias is not None:
        version = client.get_model_version_by_alias(name, alias).version

    cache_root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "llama2-serve-models")
    key = hashlib.sha1(tracking_uri.encode()).hexdigest()[:10]
    target = cache_root / f"{name.replace('/', '_')}-v{version}-{key}"
    if not target.is_dir():
        cache_root.mkdir(parents=True, exist_ok=True)
        # Download beside the target, then rename: a crash or a concurrent replica never sees a partial download.
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_root))
        try:
            # The version's own artifact location: a models:/ URI here would be resolved against MLflow's global
            # registry URI (mlflow 3.17 ignores registry_uri there), not the one given.
            source = client.get_model_version_download_uri(name, version)
            download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri)
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not the "another replica won the race" case
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return find_checkpoint_dir(target)

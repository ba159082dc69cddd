"""Where the served checkpoint is: a local folder, or a registered model (`models:/…`) downloaded into a cache.

The cache is a folder only the server's user can enter (0700, owned by it: no other local user can swap the
weights), each download carries the SHA-256 of its files, recorded when it was downloaded, and is checked against
them before it is served; a download that no longer matches is fetched again.
"""

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from components.track.tracking import tracking_uri as default_tracking_uri
from model.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CheckpointError

CACHE_ENV = "LLAMA2_SERVE_CACHE"  # where registry downloads are kept, one folder per model version
HASHES_FILE = ".sha256.json"  # in each download: {relative path: sha256}, written at download time
logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$LLAMA2_SERVE_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/llama2-recipe/serve-models: the user's own, not /tmp."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama2-recipe" / "serve-models"


def private_dir(path: Path) -> Path:
    """path as a folder only this user can enter: created 0700, or an existing one of ours narrowed to 0700; a
    symlink or another user's folder is refused."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"serve cache {path}: must be a folder owned by this user (uid {os.getuid()}), not a "
                              "symlink or another user's; set cache_dir or $LLAMA2_SERVE_CACHE")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def _file_hashes(root: Path) -> dict[str, str]:
    hashes = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name != HASHES_FILE):
        digest = hashlib.sha256()
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        hashes[file.relative_to(root).as_posix()] = digest.hexdigest()
    return hashes


def verified(folder: Path) -> bool:
    """Whether a download still holds exactly the files, with the hashes, recorded when it was downloaded."""
    try:
        recorded = json.loads((folder / HASHES_FILE).read_text())
    except (OSError, ValueError):
        return False
    return recorded == _file_hashes(folder)


def pin_version(model_uri: str, tracking_uri: str | None = None) -> str:
    """`models:/<name>@<alias>` as `models:/<name>/<version>`, the version the alias points at now (other URIs
    as they are): resolved once per deployment, so all replicas serve one version."""
    if not model_uri.startswith("models:/"):
        return model_uri
    name, alias, version = _parse_models_uri(model_uri)
    if alias is None:
        return model_uri
    from mlflow import MlflowClient

    tracking_uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    return f"models:/{name}/{alias_version(client, name, alias, tracking_uri)}"


def alias_version(client, name: str, alias: str, tracking_uri: str) -> str:
    """The version `alias` points at; a clear error when the model or the alias does not exist (the pipeline's
    `champion` moves only when evaluate's gate passes: after a first run that failed it, there is none)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException as e:
        raise LookupError(
            f"models:/{name}@{alias}: no such registered model or alias in {tracking_uri} ({e.message}). The pipeline "
            f"moves '{alias}' only when evaluate's promotion gate passes (metrics/eval.json 'gate'); serve a version "
            f"(models:/{name}/<n>) or a checkpoint folder instead, e.g. LLAMA2_MODEL_URI=checkpoints/chat make serve"
        ) from None


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
    restart or scale up on the same node download once, and checked against their recorded hashes on every use.
    cache_dir: None = default_cache_dir().
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
        version = alias_version(client, name, alias, tracking_uri)

    cache_root = private_dir(Path(cache_dir) if cache_dir else default_cache_dir())
    key = hashlib.sha1(tracking_uri.encode()).hexdigest()[:10]
    target = cache_root / f"{name.replace('/', '_')}-v{version}-{key}"
    if target.is_dir() and not verified(target):
        logger.warning("%s: files differ from the hashes recorded at download; downloading again", target)
        shutil.rmtree(target, ignore_errors=True)
    if not target.is_dir():
        # Download beside the target, then rename: a crash or a concurrent replica never sees a partial download.
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_root))
        try:
            # The version's own artifact location: a models:/ URI here would be resolved against MLflow's global
            # registry URI (mlflow 3.17 ignores registry_uri there), not the one given.
            source = client.get_model_version_download_uri(name, version)
            download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri)
            (tmp / HASHES_FILE).write_text(json.dumps(_file_hashes(tmp), indent=1))
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not the "another replica won the race" case
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return find_checkpoint_dir(target)

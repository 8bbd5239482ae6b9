"""The MLflow model registry: logging a model directory as a pyfunc, the "best" alias, and resolving a
model reference (a directory or an MLflow URI) to a local model directory."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.runtime import file_sha256
from pipelines.tracking.runs import configure_mlflow, metric_key, tracking_uri
from vglaw.checkpoint import CONFIG_FILE, WEIGHTS_FILE

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "LoggedVGLAW",
    "ModelIdentity",
    "find_model_dir",
    "log_vglaw_model",
    "model_identity",
    "resolve_model",
    "resolved_model",
    "set_alias_if_best",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoggedVGLAW:
    """What :func:`log_vglaw_model` logged.

    Attributes:
        model_uri: URI to load the logged model from (``models:/m-...``).
        registered_name: Registry name, or None when not registered.
        version: Registry version (a string, as MLflow returns it), or None.
        model_id: MLflow's id of the logged model (``m-...``), to link metrics to it.
    """

    model_uri: str
    registered_name: str | None
    version: str | None
    model_id: str | None = None

    @property
    def registry_uri(self) -> str | None:
        """``models:/<name>/<version>`` when registered."""
        return f"models:/{self.registered_name}/{self.version}" if self.version else None


def log_vglaw_model(
    model_dir: str | os.PathLike[str],
    name: str = "model",
    registered_model_name: str | None = None,
    input_example: pd.DataFrame | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> LoggedVGLAW:
    """Logs a model directory as an MLflow pyfunc model, in the active run if there is one.

    The pyfunc (``pipelines/pyfunc.py``, logged as code) takes a DataFrame of ``image`` (bytes or base64)
    and ``expression`` and returns boxes and RLE masks. The model directory (weights, config, vocab) goes in as
    an artifact and the ``vglaw`` package as code, with pinned pip requirements, so it loads on a machine
    without this repository.

    Args:
        model_dir: A directory written by :func:`vglaw.save_pretrained`.
        name: Name of the logged model within the run.
        registered_model_name: Register it under this name (a new version) when given.
        input_example: One or more input rows; defaults to a small grey image with one expression.
        tags: Tags for the logged model.
        run_id: Log into this run (resumed for the call, and ended afterwards unless it was the active run).
    """
    from pipelines.tracking import pyfunc

    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{model_dir} is not a VG-LAW model directory (no {CONFIG_FILE})")
    configure_mlflow()
    active = mlflow.active_run()
    if run_id is not None and (active is None or active.info.run_id != run_id):
        with mlflow.start_run(run_id=run_id):
            return log_vglaw_model(model_dir, name, registered_model_name, input_example, tags)
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=pyfunc.__file__,
        artifacts={pyfunc.MODEL_DIR_ARTIFACT: str(model_dir)},
        code_paths=[str(Path(pyfunc.vglaw_package_dir()))],
        signature=pyfunc.model_signature(),
        input_example=input_example if input_example is not None else pyfunc.example_input(),
        pip_requirements=pyfunc.pip_requirements(),
        registered_model_name=registered_model_name,
        tags=dict(tags) if tags else None,
    )
    version = info.registered_model_version
    return LoggedVGLAW(
        info.model_uri, registered_model_name, None if version is None else str(version), model_id=info.model_id
    )


def set_alias_if_best(
    name: str,
    version: str | int,
    metric_name: str,
    value: float,
    alias: str = "best",
    higher_is_better: bool = True,
) -> bool:
    """Records ``metric_name = value`` on a model version and points ``alias`` at it if it is the best.

    The version wins when no version holds the alias, when the aliased version has no such tag, or when
    ``value`` is strictly better than the aliased version's (ties keep the existing alias).

    Returns:
        Whether ``alias`` points at ``version`` afterwards.
    """
    configure_mlflow()
    client = MlflowClient()
    tag = metric_key(metric_name)
    client.set_model_version_tag(name, str(version), tag, repr(float(value)))
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    if current is not None and str(current.version) == str(version):
        return True
    if current is not None and tag in current.tags:
        best = float(current.tags[tag])
        better = value > best if higher_is_better else value < best
        if not better:
            return False
    client.set_registered_model_alias(name, alias, str(version))
    return True


def find_model_dir(root: str | os.PathLike[str]) -> Path:
    """The VG-LAW model directory inside ``root``: ``root`` itself or, for a downloaded MLflow model, its
    ``artifacts/<model_dir>``; otherwise the shallowest folder below ``root`` holding the config and weights
    files (:data:`vglaw.checkpoint.CONFIG_FILE`, :data:`vglaw.checkpoint.WEIGHTS_FILE`)."""
    from pipelines.tracking.pyfunc import MODEL_DIR_ARTIFACT

    root = Path(root)
    candidates = [root, root / "artifacts" / MODEL_DIR_ARTIFACT]
    candidates += sorted((p.parent for p in root.rglob(WEIGHTS_FILE)), key=lambda p: len(p.parts))
    for folder in candidates:
        if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
            return folder
    raise FileNotFoundError(f"no VG-LAW model directory ({CONFIG_FILE} + {WEIGHTS_FILE}) in {root}")


def resolve_model(uri_or_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local model directory for a plain path or an MLflow URI.

    Args:
        uri_or_dir: A directory (a :func:`vglaw.save_pretrained` one, or a downloaded MLflow model), or
            ``models:/name@alias``, ``models:/name/version``, ``runs:/<run_id>/<path>`` or any artifact URI.
        dst_dir: Where to download to; by default a new temporary folder, removed when the interpreter exits
            normally (:func:`resolved_model` removes it when a block ends).

    Raises:
        FileNotFoundError: If the directory, the registered model, version, alias or run does not exist, or the
            artifact holds no VG-LAW model directory.
    """
    text = os.fspath(uri_or_dir)
    if not _is_uri(text):
        if not Path(text).is_dir():
            raise FileNotFoundError(f"model directory {text} does not exist")
        return find_model_dir(text)
    configure_mlflow()
    dst = Path(dst_dir) if dst_dir is not None else Path(tempfile.mkdtemp(prefix="vglaw-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        try:
            # NOTE: no per-file download bar: in a Serve replica or a Ray task it is dozens of log lines, not a bar.
            with _environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
                local = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(dst))
        except (MlflowException, OSError) as err:
            raise FileNotFoundError(f"cannot fetch model {text} from MLflow at {tracking_uri()}: {err}") from err
        found = find_model_dir(local)
    except BaseException:
        if dst_dir is None:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    if dst_dir is None:
        owner = os.getpid()  # NOTE: a forked child that exits must not remove its parent's download
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(dst, ignore_errors=True))
    return found


@contextlib.contextmanager
def resolved_model(uri_or_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """:func:`resolve_model` for the length of a ``with`` block: an MLflow model is downloaded to a temporary
    folder that the block's end removes (a ``base`` model is half a gigabyte); a local directory is used in place.
    """
    if not _is_uri(os.fspath(uri_or_dir)):
        yield resolve_model(uri_or_dir)
        return
    with tempfile.TemporaryDirectory(prefix="vglaw-model-") as tmp:
        yield resolve_model(uri_or_dir, tmp)


def _is_uri(text: str) -> bool:
    """Whether a model reference names an MLflow model (``models:/``, ``runs:/``, an artifact URI), not a path."""
    return "://" in text or text.startswith(("models:/", "runs:/"))


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Sets environment variables for the block, restoring what was there before."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(frozen=True)
class ModelIdentity:
    """Which model this is, as Serve's ``GET /v1/model`` and the evaluation report state it.

    Attributes:
        name: Registered model name for ``models:/name/N`` or ``models:/name@alias``, else the directory's name.
        version: Registry version; without one, ``sha256:`` and the first 12 hex digits of the weights' hash.
        source: The reference the model was loaded from, as given.
        preset: The model config's name (``tiny``, ``base``, ...).
        image_size: Input side in pixels.
        vocab_size: Token embeddings of the text encoder.
        max_tokens: Expression length the tokenizer keeps.
        num_parameters: Parameters in the weights file.
        weights_sha256: Hex SHA-256 of the weights file.
    """

    name: str
    version: str
    source: str
    preset: str
    image_size: int
    vocab_size: int
    max_tokens: int
    num_parameters: int
    weights_sha256: str


def model_identity(reference: str | os.PathLike[str], directory: str | os.PathLike[str]) -> ModelIdentity:
    """Names the model in ``directory``, loaded from ``reference`` (a path or an MLflow URI), without loading it.

    For ``models:/name@alias`` the registry is asked which version the alias points at now; a name whose
    registry cannot be reached keeps the hash as its version.
    """
    from safetensors import safe_open

    reference, directory = os.fspath(reference), Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    config = meta["model"]
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
        num_parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    weights_sha = file_sha256(directory / WEIGHTS_FILE)
    name, version = directory.name, f"sha256:{weights_sha[:12]}"
    if reference.startswith("models:/"):
        path = reference[len("models:/") :]
        registered, _, alias = path.partition("@")
        if alias:
            name = registered
            try:
                configure_mlflow()
                version = str(MlflowClient().get_model_version_by_alias(registered, alias).version)
            except Exception as err:  # a name without a reachable registry is still servable
                logger.warning("cannot look up %s in the model registry: %s", reference, err)
        elif "/" in path:
            name, version = path.split("/", 1)
        else:
            name = path
    return ModelIdentity(
        name=name,
        version=version,
        source=reference,
        preset=config["name"],
        image_size=int(config["vision"]["image_size"]),
        vocab_size=int(config["text"]["vocab_size"]),
        max_tokens=int(meta["max_tokens"]),
        num_parameters=int(num_parameters),
        weights_sha256=weights_sha,
    )

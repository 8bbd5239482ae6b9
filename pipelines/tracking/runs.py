"""MLflow runs shared by training and evaluation: the store's location, experiments, runs, params and metrics.

Default store: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo>/mlflow.db`` with artifacts in
``<repo>/mlartifacts/`` (``<repo>`` is the folder holding ``pyproject.toml``, or the working directory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import mlflow
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    pass

__all__ = [
    "artifact_location_for",
    "client",
    "configure_mlflow",
    "ensure_experiment",
    "experiment_page",
    "find_run",
    "flatten_params",
    "get_or_create_run",
    "log_dataset_input",
    "log_metrics",
    "log_params",
    "metric_key",
    "project_root",
    "start_named_run",
    "tracking_uri",
]

logger = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# MLflow's limits (mlflow.utils.validation): key length, parameter value length, parameters per log_batch.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
PARAMS_PER_BATCH = 100
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
# The experiment's kind for MLflow: model training, not GenAI. The UI (3.17) still picks its model-training or
# GenAI view from the link's ``workflowType``, else from a browser-local switch that starts at GenAI whatever the
# kind (MLflow issue #24498); :func:`experiment_page` links with it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_WORKFLOW = "machine_learning"


# --------------------------------------------------------------------------------------------------
# Store and experiments
# --------------------------------------------------------------------------------------------------


def project_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``) above this file or the cwd, else the cwd."""
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for folder in (start, *start.parents):
            if (folder / "pyproject.toml").is_file():
                return folder
    return Path.cwd().resolve()


def experiment_page(ui_url: str, experiment_id: str) -> str:
    """The link that opens an experiment's runs in the MLflow UI at ``ui_url``, in its model-training view."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType={UI_WORKFLOW}"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's local SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DB_FILE}"


def artifact_location_for(uri: str) -> str | None:
    """Where new experiments of a SQLite store keep artifacts: ``mlartifacts/`` beside the database file.

    NOTE: without it, MLflow puts a SQLite store's artifacts under the *current* directory. Other stores
    (a tracking server, a file store) choose their own location, so None is returned for them.
    """
    # sqlite:///rel/path.db is relative to the cwd, sqlite:////abs/path.db absolute.
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return (Path(path).resolve().parent / ARTIFACTS_DIR).as_uri()


def configure_mlflow() -> str:
    """Points the MLflow client (tracking and registry) at :func:`tracking_uri`; returns that URI."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client() -> MlflowClient:
    """An ``MlflowClient`` on :func:`tracking_uri` (tracking and registry)."""
    uri = configure_mlflow()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created (with the local artifact location) or restored if needed, and
    marked as a model-training experiment (:data:`EXPERIMENT_KIND_TAG`)."""
    configure_mlflow()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = artifact_location_for(tracking_uri())
        location = None if root is None else f"{root}/{_slug(name)}"
        tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        return client.create_experiment(name, artifact_location=location, tags=tags)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _slug(name: str) -> str:
    slug = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "experiment"
    return f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def find_run(experiment: str, run_name: str) -> str | None:
    """The id of the oldest active run called ``run_name`` in ``experiment``, or None."""
    if not run_name or ("'" in run_name and '"' in run_name):
        raise ValueError(f"run name must be non-empty and not hold both quote kinds, got {run_name!r}")
    quote = '"' if "'" in run_name else "'"
    found = MlflowClient().search_runs(
        [ensure_experiment(experiment)],
        filter_string=f"attributes.run_name = {quote}{run_name}{quote}",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return found[0].info.run_id if found else None


def get_or_create_run(experiment: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """The id of the run called ``run_name`` in ``experiment``, created if there is none.

    A restarted job calls this with the same name and resumes the same run (``mlflow.start_run(run_id=...)``
    or ``MlflowClient`` calls with the id) instead of creating a duplicate. Use :func:`find_run` first to know
    whether the run is new.
    """
    run_id = find_run(experiment, run_name)
    if run_id is not None:
        return run_id
    return (
        MlflowClient().create_run(ensure_experiment(experiment), run_name=run_name, tags=dict(tags or {})).info.run_id
    )


def start_named_run(experiment: str, run_name: str, system_metrics: bool = False) -> tuple[mlflow.ActiveRun, bool]:
    """Starts the run called ``run_name`` as the active run: a new one through ``mlflow.start_run``, so that MLflow
    sets its context tags (``mlflow.source.git.commit``, ``mlflow.source.name``, ``mlflow.user``), or the
    existing one by id, so that a restarted job resumes its run instead of making a second.

    Args:
        experiment: Experiment name (created if needed, :func:`ensure_experiment`).
        run_name: The run's name.
        system_metrics: Sample CPU, memory (and GPU, with ``nvidia-ml-py``) as ``system/*`` metrics while the run
            is active (``log_system_metrics``; the interval is ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``).

    Returns:
        The active run, and whether it is an earlier one resumed.
    """
    run_id = find_run(experiment, run_name)
    if run_id is not None:
        return mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics), True
    run = mlflow.start_run(
        experiment_id=ensure_experiment(experiment), run_name=run_name, log_system_metrics=system_metrics
    )
    return run, False


def log_dataset_input(
    path: str | os.PathLike[str], manifest: Mapping[str, Any], context: str, name: str | None = None
) -> None:
    """Logs a preprocessed dataset as an input of the active run: its folder as the source and the manifest's
    digest (:func:`pipelines.data.manifest.manifest_digest`), so the run page shows which data it used."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from pipelines.data.manifest import manifest_digest

    source = resolve_dataset_source(Path(path).resolve().as_uri())
    label = name or f"{manifest.get('dataset', 'data')}_{manifest.get('split_by', '')}_{manifest.get('image_size', '')}"
    mlflow.log_input(MetaDataset(source, name=label, digest=manifest_digest(dict(manifest))), context=context)


# --------------------------------------------------------------------------------------------------
# Params and metrics
# --------------------------------------------------------------------------------------------------


def metric_key(name: str) -> str:
    """A metric, param or tag key MLflow accepts: ``prec@0.5/len_11+`` -> ``prec_at_0.5/len_11plus``."""
    key = _BAD_KEY_CHARS.sub("_", name.replace("@", "_at_").replace("+", "plus"))
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[: MAX_KEY_LENGTH - 9]}~{digest}"
    return key


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def flatten_params(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Flattens a nested config (dicts and dataclasses) into ``{"a.b.c": "value"}`` within MLflow's limits.

    Lists and tuples become JSON strings; values longer than MLflow's limit are cut and end in ``...``.
    """
    out: dict[str, str] = {}
    config = _plain(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a mapping or a dataclass, got {type(config).__name__}")
    for name, raw in config.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        value = _plain(raw)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, key))
            continue
        text = json.dumps(value, default=str) if isinstance(value, (list, tuple, Mapping)) else str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
        out[metric_key(key)] = text
    return out


def log_params(config: Mapping[str, Any] | Any, run_id: str | None = None) -> dict[str, tuple[str, str]]:
    """Logs a flattened config as params, skipping the ones a resumed run already holds.

    Args:
        config: Nested dicts or dataclasses.
        run_id: The run; defaults to the active one.

    Returns:
        Params whose logged value differs from the new one, ``{key: (logged, new)}`` (MLflow refuses to
        change a param, so these are left as they are and reported, e.g. when a resume changed an override).
    """
    run_id = run_id or _active_run_id()
    client = MlflowClient()
    logged = client.get_run(run_id).data.params
    params = flatten_params(config)
    conflicts = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
    if conflicts:
        logger.warning("params differ from the ones already logged and were kept as they were: %s", conflicts)
    todo = [mlflow.entities.Param(k, v) for k, v in params.items() if k not in logged]
    for start in range(0, len(todo), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=todo[start : start + PARAMS_PER_BATCH])
    return conflicts


def log_metrics(
    metrics: Mapping[str, float],
    step: int | None = None,
    prefix: str = "",
    run_id: str | None = None,
    model_id: str | None = None,
) -> None:
    """Logs numeric metrics under sanitised keys (:func:`metric_key`), e.g. ``prefix="val/"``; with ``model_id``
    they are also the metrics of that logged model (its page in the UI shows them)."""
    run_id = run_id or _active_run_id()
    values = {metric_key(prefix + k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    entities = [mlflow.entities.Metric(k, v, _now_ms(), step or 0, model_id=model_id) for k, v in values.items()]
    for start in range(0, len(entities), 1000):
        MlflowClient().log_batch(run_id, metrics=entities[start : start + 1000])


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run; pass run_id or call inside mlflow.start_run()")
    return run.info.run_id

"""Tracking in MLflow: runs, params and metrics, the model registry, and the logged pyfunc model.

Modules:
    runs: the store's location, experiments, runs, params and metrics.
    registry: logging a model directory as a pyfunc, the ``best`` alias, resolving model references.
    pyfunc: the pyfunc wrapper, logged as code with every model.
"""

from pipelines.runtime import lazy_exports

__all__ = [
    "LoggedVGLAW",
    "client",
    "configure_mlflow",
    "ensure_experiment",
    "get_or_create_run",
    "log_metrics",
    "log_params",
    "log_vglaw_model",
    "resolve_model",
    "resolved_model",
    "set_alias_if_best",
    "tracking_uri",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "client": "pipelines.tracking.runs",
        "configure_mlflow": "pipelines.tracking.runs",
        "ensure_experiment": "pipelines.tracking.runs",
        "get_or_create_run": "pipelines.tracking.runs",
        "log_metrics": "pipelines.tracking.runs",
        "log_params": "pipelines.tracking.runs",
        "tracking_uri": "pipelines.tracking.runs",
        "LoggedVGLAW": "pipelines.tracking.registry",
        "log_vglaw_model": "pipelines.tracking.registry",
        "resolve_model": "pipelines.tracking.registry",
        "resolved_model": "pipelines.tracking.registry",
        "set_alias_if_best": "pipelines.tracking.registry",
    },
)

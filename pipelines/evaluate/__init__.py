"""The evaluation stage: a model scored on preprocessed splits by Ray Data batch inference, with a report.

Entry points: :func:`run_evaluation` and :func:`log_evaluation` (behind ``python -m jobs.evaluate``).

Modules:
    scoring: per-expression results through ``vglaw.Predictor`` and their metrics (no Ray).
    inference: the actor pool that scores whole splits.
    stage: resolve the model, evaluate, write the report, log it to MLflow.
    report: the JSON report, the accuracy-by-length plot and overlay grids.
"""

from pipelines.runtime import lazy_exports

__all__ = ["EvaluationConfig", "log_evaluation", "run_evaluation"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "EvaluationConfig": "pipelines.evaluate.stage",
        "log_evaluation": "pipelines.evaluate.stage",
        "run_evaluation": "pipelines.evaluate.stage",
    },
)

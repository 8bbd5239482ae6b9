"""The training stage: Ray Train DDP over the preprocessed Parquet, tracked in MLflow.

Entry points: :func:`load_config` (a YAML preset plus ``section.field=value`` overrides) and :func:`run_training`
(the driver behind ``python -m jobs.train``).

Modules:
    config: the typed run configuration.
    driver: plans the run, starts the ``TorchTrainer``, records everything in MLflow.
    worker: what each worker runs (``train_loop_per_worker``): build, resume, train, validate, checkpoint, report.
    ingest: Parquet rows decoded in Ray Data tasks, then flipped and moved to the device on the worker.
    optim: the paper's optimiser and learning-rate schedule.
    validation: each worker scores its slice of the validation split; states merge exactly.
"""

from pipelines.runtime import lazy_exports

__all__ = ["TrainConfig", "load_config", "run_training"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "TrainConfig": "pipelines.train.config",
        "load_config": "pipelines.train.config",
        "run_training": "pipelines.train.driver",
    },
)

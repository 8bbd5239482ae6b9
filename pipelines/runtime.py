"""Helpers every stage shares: starting or joining Ray, pausing the cyclic garbage collector, hashing files, and
the lazy names of the stage packages.

Starting Ray: a local instance runs without the dashboard, and so without Ray's State API. Ray Train's
placement-group cleaner asks that API every second whether the training controller still lives, and warns on
each failed ask: a line a second through a whole training run. Its workers drop that one warning
(:func:`quiet_local_workers`); a local instance ends with its driver and its placement groups with it, so the
cleaner has nothing to do there. On a cluster, whose dashboard answers, nothing is filtered.

Lazy names: each stage package (``pipelines.data``, ``.train``, ``.evaluate``, ``.serve``, ``.tracking``) names
its entry points in ``__init__`` without importing them (PEP 562), so that importing one light module of a stage,
such as request parsing or the Parquet reader, does not load Ray, MLflow or torch.

Pausing the collector: parsing ``instances.json`` and the refs pickle allocates hundreds of thousands of lists
and dicts that all stay alive. Each allocation burst triggers collections that find nothing to free, and the
full ones walk every tracked object in the process (in a Ray driver, Ray's own as well): about a third of the
REFER parsing time on a 2000-image dataset, all of it serial work before any encoder can start.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

__all__ = ["ensure_ray", "file_sha256", "gc_paused", "lazy_exports", "quiet_local_workers", "text_sha256"]

# Ray Train's placement-group cleaner (Ray 2.60) and its warning when the State API does not answer.
_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_PG_CLEANER_NO_STATE_API = "Failed to query Ray Train Controller actor state"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local Ray.

    Args:
        num_cpus: logical CPUs of a local instance (default: the machine's); ignored on a cluster, whose
            resources are its own.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # NOTE: "local" starts a new instance even when another one runs on this machine (``ray start``); a plain
        # init would join that one instead, with resources that are not ours to size.
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            runtime_env={"worker_process_setup_hook": "pipelines.runtime.quiet_local_workers"},
        )


class _DropMessagesStartingWith(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_local_workers() -> None:
    """Each worker of a local instance: drops the placement-group cleaner's warning that the State API, which
    runs with the dashboard this instance lacks, did not answer (module docstring); its other records stay."""
    logger = logging.getLogger(_PG_CLEANER_LOGGER)
    if not any(isinstance(f, _DropMessagesStartingWith) for f in logger.filters):
        logger.addFilter(_DropMessagesStartingWith(_PG_CLEANER_NO_STATE_API))


@contextmanager
def gc_paused() -> Iterator[None]:
    """Disables the cyclic collector inside the block and restores its previous state after it.

    Reference counting still frees everything as usual; only cycle detection waits until the block ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (weights files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    """Hex SHA-256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` that import each exported name from its module on first use.

    Args:
        package: The package's ``__name__``.
        exports: ``name -> module`` for every exported name.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__

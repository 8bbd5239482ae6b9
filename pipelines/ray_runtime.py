"""Starting or joining Ray, the same way for every stage."""

from __future__ import annotations

import os


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
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)

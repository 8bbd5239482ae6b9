"""Several Ray nodes on one machine: a head and worker nodes, each with its own raylet and resources.

The stages run against it as they would against a cluster (``RAY_ADDRESS``): preprocessing spreads its tasks
over the nodes, the two training workers land on different nodes, and a whole node removed mid-training leaves
a run that finishes its planned steps on a replacement node. Storage is one local folder that every node
reads and writes, as a shared file system would be (docs/cluster.md says what this does not cover).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from pipelines.train.config import load_config
from tests.pipelines.job_harness import PY, REPO, resumed_step, synthetic_parquet, wait_for_checkpoint

TRAINER = "trainer_slot"  # a resource only the training nodes have, as GPUs would be on a real cluster
NODE_ARGS = {"num_cpus": 2, "resources": {TRAINER: 1}, "object_store_memory": 400 * 1024**2}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head node (1 CPU, no training slot) and two worker nodes (2 CPUs and one training slot each)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 400 * 1024**2, "include_dashboard": False},
    )
    workers = [cluster.add_node(**NODE_ARGS) for _ in range(2)]
    yield cluster, workers
    cluster.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, cluster) -> dict:
    """The synthetic set, preprocessed at 128 px by the job running against the cluster."""
    root = tmp_path_factory.mktemp("multinode")
    synthetic_parquet(root, _env(cluster[0], root), 300, 5, "--images-per-task", "32")
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    return {"root": root, "data": root / "data", "runs": root / "runs", "manifest": manifest}


def _env(cluster, root: Path) -> dict[str, str]:
    return dict(
        os.environ,
        RAY_ADDRESS=cluster.address,
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0",
    )


@pytest.mark.slow
def test_preprocessing_tasks_run_on_several_nodes(cluster, workspace) -> None:
    head, workers = cluster[0].head_node, cluster[1]
    encoded = workspace["manifest"]["encoded_by_node"]
    known = {head.node_id, *(w.node_id for w in workers)}
    assert set(encoded) <= known and len(encoded) >= 2, encoded
    images = sum(v["images"] for v in workspace["manifest"]["splits"].values())
    skipped_images = sum(1 for s in workspace["manifest"]["skipped"] if s["ann_id"] is None)
    assert sum(encoded.values()) == images + skipped_images  # every image counted once, on the node that ran it


@pytest.mark.slow
def test_a_lost_node_is_replaced_and_the_run_completes_its_planned_steps(cluster, workspace) -> None:
    from mlflow.tracking import MlflowClient

    cluster_, workers = cluster
    root, name = workspace["root"], "lost-node"
    overrides = ["optim.epochs=1", "optim.max_steps_per_epoch=12"]
    args = [
        PY, "-m", "jobs.train", "--config", "configs/test.yaml", f"data.path={workspace['data']}",
        f"run.storage_path={workspace['runs']}", f"run.name={name}", *overrides, "run.checkpoint_every_steps=3",
        "run.overlays=0", f"run.worker_resources={{{TRAINER}: 1}}",
    ]  # fmt: skip
    log_path = root / "lost-node.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(args, cwd=REPO, env=_env(cluster_, root), stdout=log, stderr=subprocess.STDOUT)
        wait_for_checkpoint(driver, workspace["runs"] / name, timeout=400)
        lost = workers[0]
        cluster_.remove_node(lost, allow_graceful=False)  # the raylet and every process on it, at once
        time.sleep(5)  # an autoscaler takes a while to bring a node back
        replacement = cluster_.add_node(**NODE_ARGS)
        assert driver.wait(timeout=600) == 0, log_path.read_text()[-4000:]
    text = log_path.read_text()

    config = load_config(REPO / "configs/test.yaml", overrides)
    from pipelines.train.driver import plan_steps_per_epoch

    planned = config.optim.epochs * plan_steps_per_epoch(config, workspace["manifest"]["splits"]["train"]["rows"])
    assert f"done: step {planned}," in text, text[-3000:]
    assert "2 workers on 2 node(s)" in text, text[-3000:]
    assert 0 < resumed_step(text) < planned, text[-3000:]  # from a checkpoint, not from the start

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(config.run.experiment)
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    nodes = json.loads(run.data.tags["ray.worker_nodes"])  # as the last (resumed) worker group reported them
    assert len(set(nodes)) == 2 and lost.node_id not in nodes and replacement.node_id in nodes, nodes
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert max(steps) == planned

"""Ray Train on the synthetic dataset: it learns, it is tracked in MLflow, it survives a killed worker,
and it runs through ``ray job submit`` against a real head node."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines.train.config import load_config
from tests.pipelines.job_harness import (
    PY,
    REPO,
    processes_named,
    resumed_step,
    run_job,
    synthetic_parquet,
    wait_for_checkpoint,
)
from vglaw.checkpoint import WEIGHTS_FILE
from vglaw.losses import LossWeights
from vglaw.precision import resolve_precision


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small synthetic dataset preprocessed for the tiny preset, and an isolated MLflow store."""
    root = tmp_path_factory.mktemp("train")
    synthetic_parquet(root, dict(os.environ, RAY_ADDRESS=""), 500, 3, "--num-cpus", "2")
    return {"root": root, "data": root / "data", "mlflow": root / "mlflow.db", "runs": root / "runs"}


def _env(ws: dict[str, Path]) -> dict[str, str]:
    return dict(
        os.environ,
        RAY_ADDRESS="",
        MLFLOW_TRACKING_URI=f"sqlite:///{ws['mlflow']}",
        RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0",
    )


def _train_args(ws: dict[str, Path], name: str, *extra: str) -> list[str]:
    return [
        PY, "-m", "jobs.train", "--config", "configs/test.yaml",
        f"data.path={ws['data']}", f"run.storage_path={ws['runs']}", f"run.name={name}", *extra,
    ]  # fmt: skip


def _client(ws: dict[str, Path]):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ws['mlflow']}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)  # never the process-wide default registry


def _runs_named(ws: dict[str, Path], name: str) -> list:
    client = _client(ws)
    experiment = client.get_experiment_by_name(load_config(REPO / "configs/test.yaml").run.experiment)
    return client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")


@pytest.mark.slow
def test_two_compiled_workers_learn_and_everything_is_tracked(workspace) -> None:
    # Compiled and in bf16 where the CPU computes in bf16, as GPU runs are: torch.compile (inductor on the CPU)
    # wraps the DDP model under bf16 autocast, and it still learns. The schedule is of the demo's kind (cosine, as in
    # configs/synthetic.yaml, over as many epochs) and the box loss heavier than the paper's, as the demo's is.
    overrides = ["model.compile=true", "run.precision=auto", "optim.epochs=6", "optim.schedule=cosine"]
    overrides += ["loss.l1=5", "loss.giou=2"]
    result = run_job(_train_args(workspace, "learns", *overrides), _env(workspace), 2400)
    precision = resolve_precision("auto", torch.device("cpu"))
    assert f"2 workers on 1 node(s), {precision}, compile True" in result.stdout + result.stderr
    (run,) = _runs_named(workspace, "learns")
    client = _client(workspace)
    config = load_config(REPO / "configs/test.yaml", overrides)

    # Params: the full resolved config.
    assert run.data.params["optim.global_batch_size"] == str(config.optim.global_batch_size)
    assert run.data.params["model.preset"] == "tiny" and "run.num_workers" in run.data.params

    # It learns: the loss falls, and the validation Prec@0.5 and mask IoU, merged over both workers, end well
    # above their step-0 values.
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(loss) >= 5 and np.mean(loss[-3:]) < 0.9 * np.mean(loss[:3]), loss
    prec = sorted(client.get_metric_history(run.info.run_id, "val/prec_at_0.5"), key=lambda m: m.step)
    miou = sorted(client.get_metric_history(run.info.run_id, "val/miou"), key=lambda m: m.step)
    assert prec[0].step == 0 and prec[-1].value >= prec[0].value + 0.1, [(m.step, m.value) for m in prec]
    assert miou[0].step == 0 and miou[-1].value >= miou[0].value + 0.15, [(m.step, m.value) for m in miou]
    for key in ("val/oiou", "train/lr/head", "train/images_per_s", "train/giou", "train/dice", "train/attention"):
        assert client.get_metric_history(run.info.run_id, key), key
    # The time each worker's step waited for its data, per log interval and per epoch, as a share of wall time.
    for key in ("train/data_wait_fraction", "train/epoch_data_wait_fraction"):
        history = client.get_metric_history(run.info.run_id, key)
        assert history and all(0.0 <= m.value <= 1.0 for m in history), key
    assert re.search(r"data wait \d+%", result.stdout + result.stderr)
    # Each epoch's line once (Ray Train's print patch used to double every worker line), and no report dumps.
    output = result.stdout + result.stderr
    epochs = config.optim.epochs
    for epoch in range(1, epochs + 1):
        lines = re.findall(rf"\[vglaw-train\] epoch {epoch}/{epochs} step \d+/\d+ loss \S+ val .*", output)
        assert len(lines) == 1, lines
    assert len(re.findall(r"\[vglaw-train\] step 0: val", output)) == 1
    assert "Reporting training result" not in output
    assert "Failed to query Ray Train Controller actor state" not in output  # a line a second without the filter

    # Artifacts: config, data manifest, the model; an overlay grid per epoch as a step-indexed image.
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "data", "images"} <= paths
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    steps = sorted(int(re.search(r"val_overlays\+step\+(\d+)\+", p).group(1)) for p in images)
    assert steps == list(range(1, config.optim.epochs + 1)), images

    # MLflow's own records: the run was started as MLflow starts runs (context tags), in a model-training
    # experiment, with system metrics sampled during training and the dataset as its input.
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        assert run.data.tags["mlflow.source.git.commit"] == commit.stdout.strip()
    assert {"mlflow.user", "mlflow.source.name"} <= run.data.tags.keys()
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    manifest = json.loads((workspace["data"] / "manifest.json").read_text())
    undigested = {k: v for k, v in manifest.items() if k not in ("created_at", "digest")}
    canonical = json.dumps(undigested, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert manifest["digest"] == hashlib.sha256(canonical.encode()).hexdigest()[:32]
    (data_input,) = run.inputs.dataset_inputs
    assert data_input.dataset.digest == manifest["digest"]
    assert {t.key: t.value for t in data_input.tags}["mlflow.data.context"] == "training"
    assert run.info.status == "FINISHED"

    # Registry: a version with the best alias, loadable as pyfunc, predicting what the Predictor predicts.
    import mlflow

    from vglaw import Predictor

    mlflow.set_tracking_uri(f"sqlite:///{workspace['mlflow']}")
    mlflow.set_registry_uri(f"sqlite:///{workspace['mlflow']}")
    version = client.get_model_version_by_alias(config.run.registered_model_name, "best")
    assert version.run_id == run.info.run_id
    # The logged model carries the final validation metrics, the values the run's history ends with.
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    linked = {m.key: m.value for m in client.get_logged_model(output.model_id).metrics}
    assert linked["val/prec_at_0.5"] == prec[-1].value and linked["val/miou"] == miou[-1].value, linked
    image = Image.open(next((workspace["root"] / "raw" / "images").glob("*.jpg"))).convert("RGB")
    pyfunc = mlflow.pyfunc.load_model(f"models:/{config.run.registered_model_name}@best")
    import base64
    import io

    import pandas as pd

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    frame = pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()], "expression": ["the red circle"]})
    answer = pyfunc.predict(frame)
    direct = Predictor.from_pretrained(workspace["runs"] / "learns" / "model").predict(image, "the red circle")
    np.testing.assert_allclose(np.asarray(answer["box"].iloc[0], dtype=float), direct.box, atol=1e-3)


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_learning_runs_metrics_and_overlays(workspace, tmp_path: Path) -> None:
    """The run above, as its users see it: ``mlflow server`` on loopback, the run's pages in headless Chromium."""
    from tests.browser_harness import headless_chromium
    from tests.pipelines.tracking.mlflow_ui import check_run_page, mlflow_server

    runs = _runs_named(workspace, "learns")
    if not runs or runs[0].info.status != "FINISHED":
        pytest.skip("the learning run did not finish (its own test says why)")
    (run,) = runs
    screenshot = REPO / "runs" / "test-artifacts" / "mlflow_run.png"  # an ignored folder, kept to look at
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with mlflow_server(f"sqlite:///{workspace['mlflow']}", tmp_path) as url:
        driver = headless_chromium(tmp_path / "chromium-profile", window=(1400, 1100))
        try:
            metrics = ["train/loss", "val/prec_at_0.5", "val/miou", "system/cpu_utilization_percentage"]
            check_run_page(driver, url, run.info.experiment_id, run.info.run_id, metrics, "val_overlays", screenshot)
        finally:
            driver.quit()
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _steps_per_epoch(ws: dict[str, Path], config) -> int:
    from pipelines.data.manifest import read_manifest
    from pipelines.train.driver import plan_steps_per_epoch

    return plan_steps_per_epoch(config, read_manifest(ws["data"])["splits"]["train"]["rows"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_submitted_job_survives_a_killed_worker_and_ends_on_the_uninterrupted_weights(workspace) -> None:
    """``ray job submit`` against a head node with token authentication, in bf16 autocast as GPU workers train.
    A worker killed mid-epoch resumes from the last checkpoint, and the job ends on the very weights that the
    same run left alone reaches (a local run): same data order, flips and optimiser state, bit for bit.
    Submitting the same run name again resumes the finished run and trains nothing."""
    overrides = ["optim.epochs=2", "optim.max_steps_per_epoch=6", "run.checkpoint_every_steps=2", "run.overlays=0"]
    overrides.append("run.precision=bf16")  # cheap at tiny even where the CPU emulates bf16
    run_job(_train_args(workspace, "uninterrupted", *overrides), _env(workspace), 600)

    env = _env(workspace)
    env.pop("RAY_ADDRESS")
    # The head node requires Ray's token authentication, as a real cluster should (docs/cluster.md).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Job entrypoints run "python" from the head's PATH: make it this environment's.
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}"
    gcs, dashboard = _free_port(), _free_port()
    ray_bin = str(Path(PY).parent / "ray")
    run_job(
        [ray_bin, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={workspace['root'] / 'ray'}"],
        env,
        180,
    )  # fmt: skip
    try:
        name = "submitted"
        runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}})
        submit = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".",
                  "--runtime-env-json", runtime_env, "--", "python", "-m", "jobs.train", "--config",
                  "configs/test.yaml", f"data.path={workspace['data']}", f"run.storage_path={workspace['runs']}",
                  f"run.name={name}", *overrides]  # fmt: skip
        log_path = workspace["root"] / f"{name}.log"
        with log_path.open("w") as log:
            job = subprocess.Popen(submit, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            wait_for_checkpoint(job, workspace["runs"] / name, timeout=400)
            [killed, *_] = processes_named("RayTrainWorker")  # the head node's, not under `job`
            os.kill(killed.pid, signal.SIGKILL)
            assert job.wait(timeout=600) == 0, log_path.read_text()[-4000:]
        assert not killed.is_running()
        text = log_path.read_text()
        planned = 2 * _steps_per_epoch(workspace, load_config(REPO / "configs/test.yaml", overrides[:2]))
        assert "succeeded" in text.lower() and f"done: step {planned}," in text, text[-3000:]
        assert "2 workers on 1 node(s), bf16, compile False" in text
        assert 0 < resumed_step(text) < planned, text[-3000:]  # from a checkpoint, not from the start
        (run,) = _runs_named(workspace, name)

        resumed = load_file(str(workspace["runs"] / name / "model" / WEIGHTS_FILE))
        reference = load_file(str(workspace["runs"] / "uninterrupted" / "model" / WEIGHTS_FILE))
        assert resumed.keys() == reference.keys()
        differing = [key for key in reference if not torch.equal(resumed[key], reference[key])]
        assert not differing, f"{len(differing)} of {len(reference)} tensors differ, e.g. {differing[:5]}"

        # Submitting the same run name again resumes the finished run: no new steps, the same MLflow run.
        again = run_job(submit, env, 600)
        assert "resuming MLflow run" in again.stdout and f"done: step {planned}," in again.stdout
        assert "nothing trained since step" in again.stdout
        assert [r.info.run_id for r in _runs_named(workspace, name)] == [run.info.run_id]
        # Nothing was trained the second time: one logged model, one registered version.
        versions = _client(workspace).search_model_versions(f"run_id = '{run.info.run_id}'")
        assert len(versions) == 1, [v.version for v in versions]
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.batch_per_worker * config.run.num_workers == config.optim.global_batch_size
    if config.model.preset == "base":  # the paper's recipe
        assert (config.optim.lr_backbone, config.optim.lr_head, config.optim.weight_decay) == (4e-5, 4e-4, 1e-4)
        assert config.optim.decay_epochs == (10, 60) and config.optim.global_batch_size == 256
        assert config.loss == LossWeights()  # the paper's objective: no attention term


def test_precision_and_placement_settings_are_checked() -> None:
    assert load_config(None).run.precision is None  # the device decides: bf16 on GPU workers, fp32 on CPU ones
    assert load_config(None, ["run.precision=bf16"]).run.precision == "bf16"
    with pytest.raises(ValueError, match=r"run\.precision must be one of"):
        load_config(None, ["run.precision=fp16"])
    with pytest.raises(ValueError, match="placement_strategy"):
        load_config(None, ["run.placement_strategy=ANYWHERE"])
    with pytest.raises(ValueError, match="cpus_per_worker"):
        load_config(None, ["run.worker_resources={CPU: 2}"])


def test_progress_is_a_plain_line_per_interval_from_rank_zero_only(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.train import worker

    clock = [0.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: clock[0])
    rank0, rank1 = (worker._Progress(rank == 0, False, 30.0, 2, 20) for rank in (0, 1))
    for progress in (rank0, rank1):
        progress.start_epoch(0, 10, 0)
    for step in range(1, 11):  # 7 s per step: lines are due at 35 s (step 5) and 70 s (step 10)
        clock[0] += 7.0
        for progress in (rank0, rank1):
            progress.step(step, torch.tensor(0.5), 100.0)
    assert capsys.readouterr().out.splitlines() == [
        "[vglaw-train] epoch 1/2 step 5/20 loss 0.5000 100.0 img/s ETA 105s",  # 7 s x 15 steps to go
        "[vglaw-train] epoch 1/2 step 10/20 loss 0.5000 100.0 img/s ETA 70s",
    ]

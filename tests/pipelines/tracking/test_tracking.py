"""MLflow helpers on a temporary SQLite store: runs, params, metrics, the pyfunc model, the registry, URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import vglaw
from pipelines.tracking import registry, runs

EXPRESSIONS = ["the red circle", "the blue square on the left", "a green triangle", "the rightmost shape"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """MLFLOW_TRACKING_URI pointed at a fresh SQLite file for this module."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        runs.configure_mlflow()
        yield root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tokenizer = vglaw.ExpressionTokenizer.train(EXPRESSIONS, vocab_size=200)
    model = vglaw.create_model("tiny", vocab_size=tokenizer.vocab_size)
    return vglaw.save_pretrained(model, tokenizer, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def registered(store: Path, model_dir: Path) -> dict[str, object]:
    """Two registered versions of one model, logged in one run."""
    import mlflow

    run_id = runs.get_or_create_run("tracking-test", "model-run")
    with mlflow.start_run(run_id=run_id):
        first = registry.log_vglaw_model(model_dir, registered_model_name="vglaw-test")
    second = registry.log_vglaw_model(model_dir, name="again", registered_model_name="vglaw-test", run_id=run_id)
    return {"run_id": run_id, "first": first, "second": second}


def _png(seed: int = 0, size: tuple[int, int] = (90, 60)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tracking_uri_defaults_to_the_project_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = Path(__file__).resolve().parents[3]
    assert runs.project_root() == root
    assert runs.tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    assert runs.artifact_location_for(runs.tracking_uri()) == (root / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert runs.tracking_uri() == "http://127.0.0.1:5000"
    assert runs.artifact_location_for("http://127.0.0.1:5000") is None


def test_new_experiments_keep_artifacts_beside_the_database(store: Path) -> None:
    import mlflow

    experiment_id = runs.ensure_experiment("artifact-place")
    location = mlflow.tracking.MlflowClient().get_experiment(experiment_id).artifact_location
    assert location.startswith((store / "mlartifacts").as_uri())
    assert runs.ensure_experiment("artifact-place") == experiment_id


def test_get_or_create_run_returns_the_same_run(store: Path) -> None:
    assert runs.find_run("runs-test", "trainer") is None
    first = runs.get_or_create_run("runs-test", "trainer", tags={"kind": "train"})
    assert runs.get_or_create_run("runs-test", "trainer") == first
    assert runs.find_run("runs-test", "trainer") == first
    assert runs.get_or_create_run("runs-test", "other") != first
    assert runs.get_or_create_run("runs-test", "it's quoted") == runs.find_run("runs-test", "it's quoted")


def test_params_are_flattened_truncated_and_resumable(store: Path) -> None:
    from dataclasses import dataclass

    @dataclass
    class Optim:
        lr: float = 4e-4
        milestones: tuple[int, ...] = (10, 60)

    config = {"optim": Optim(), "model": {"name": "tiny", "size": {"w": 128}}, "note": "x" * 7000, "k@1+": 1}
    flat = runs.flatten_params(config)
    assert flat["optim.lr"] == "0.0004" and flat["optim.milestones"] == "[10, 60]"
    assert flat["model.size.w"] == "128" and flat["k_at_1plus"] == "1"
    assert len(flat["note"]) == runs.MAX_PARAM_VALUE_LENGTH and flat["note"].endswith("...")

    run_id = runs.get_or_create_run("params-test", "p")
    assert runs.log_params(config, run_id=run_id) == {}
    assert runs.log_params(config, run_id=run_id) == {}  # a resume logs the same params again: no error
    changed = dict(config, model={"name": "small", "size": {"w": 128}})
    assert runs.log_params(changed, run_id=run_id) == {"model.name": ("tiny", "small")}
    assert runs.client().get_run(run_id).data.params["model.name"] == "tiny"


def test_metrics_keys_are_sanitised(store: Path) -> None:
    run_id = runs.get_or_create_run("metrics-test", "m")
    runs.log_metrics({"prec@0.5": 0.5, "miou/len_11+": 0.25, "name": "skipped"}, step=3, prefix="val/", run_id=run_id)
    metrics = runs.client().get_run(run_id).data.metrics
    assert metrics == {"val/prec_at_0.5": 0.5, "val/miou/len_11plus": 0.25}
    (entry,) = runs.client().get_metric_history(run_id, "val/prec_at_0.5")
    assert entry.step == 3


def test_registered_pyfunc_predicts_like_the_predictor(registered: dict[str, object], model_dir: Path) -> None:
    import mlflow

    first, second = registered["first"], registered["second"]
    assert (first.version, second.version) == ("1", "2")
    assert registry.set_alias_if_best("vglaw-test", first.version, "val/prec@0.5", 0.3)
    assert not registry.set_alias_if_best("vglaw-test", second.version, "val/prec@0.5", 0.2)
    client = runs.client()
    assert str(client.get_model_version_by_alias("vglaw-test", "best").version) == "1"
    assert client.get_model_version("vglaw-test", "2").tags["val/prec_at_0.5"] == "0.2"
    assert registry.set_alias_if_best("vglaw-test", second.version, "val/prec@0.5", 0.6)
    assert str(client.get_model_version_by_alias("vglaw-test", "best").version) == "2"
    assert registry.set_alias_if_best("vglaw-test", 1, "loss", 0.1, alias="lowest", higher_is_better=False)
    assert not registry.set_alias_if_best("vglaw-test", 2, "loss", 0.2, alias="lowest", higher_is_better=False)

    pyfunc = mlflow.pyfunc.load_model("models:/vglaw-test@best")
    images = [_png(0), _png(1, (40, 100))]
    frame = pd.DataFrame({"image": images, "expression": ["the red circle", "the rightmost shape"]})
    out = pyfunc.predict(frame)
    assert list(out.columns) == ["box", "box_normalized", "mask", "mask_area", "truncated"]
    predictor = vglaw.Predictor.from_pretrained(model_dir)
    for i, png in enumerate(images):
        direct = predictor.predict(Image.open(io.BytesIO(png)).convert("RGB"), frame["expression"][i])
        # NOTE: the pyfunc runs both rows in one batch, the Predictor one at a time; CPU kernels may round
        # differently by batch size (seen: 3e-6 px), which can also flip a pixel sitting on the threshold.
        np.testing.assert_allclose(out["box"][i], direct.box, rtol=0, atol=1e-4)
        assert out["mask"][i]["size"] == list(direct.mask.shape)
        assert abs(int(out["mask_area"][i]) - int(direct.mask.sum())) <= 0.001 * direct.mask.size
    as_base64 = frame.assign(image=[base64.b64encode(b).decode() for b in images])
    np.testing.assert_allclose(pyfunc.predict(as_base64)["box"][0], out["box"][0])


def test_resolve_model_for_every_uri_form(registered: dict[str, object], model_dir: Path, tmp_path: Path) -> None:
    weights = (model_dir / "model.safetensors").read_bytes()
    assert registry.resolve_model(model_dir) == model_dir
    uris = [
        "models:/vglaw-test@best",
        "models:/vglaw-test/1",
        registered["first"].model_uri,
        f"runs:/{registered['run_id']}/again",
    ]
    for i, uri in enumerate(uris):
        local = registry.resolve_model(uri, dst_dir=tmp_path / str(i))
        assert (local / "model.safetensors").read_bytes() == weights, uri
        assert vglaw.Predictor.from_pretrained(local).image_size == 128
    inside_download = registry.resolve_model(tmp_path / "0")  # a downloaded MLflow model folder
    assert inside_download.is_relative_to(tmp_path / "0")
    assert (inside_download / "model.safetensors").read_bytes() == weights
    with pytest.raises(FileNotFoundError, match="does not exist"):
        registry.resolve_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="cannot fetch model models:/no-such-model@best"):
        registry.resolve_model("models:/no-such-model@best")
    with pytest.raises(FileNotFoundError, match="cannot fetch model models:/vglaw-test/99"):
        registry.resolve_model("models:/vglaw-test/99")


def test_a_downloaded_model_is_removed_after_its_block_and_at_exit(
    registered: dict[str, object], model_dir: Path, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with registry.resolved_model("models:/vglaw-test@best") as local:
        assert local.is_relative_to(tmp_path) and (local / "model.safetensors").is_file()
    assert not local.exists() and list(tmp_path.iterdir()) == []
    with registry.resolved_model(model_dir) as local:  # a local directory is used in place, and left alone
        assert local == model_dir
    assert (model_dir / "model.safetensors").is_file() and list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        registry.resolve_model("models:/no-such-model@best")  # a failed download leaves no folder behind
    with pytest.raises(FileNotFoundError, match="no VG-LAW model directory"):
        registry.resolve_model(f"runs:/{registered['run_id']}/again/MLmodel")  # fetched, but not a model
    assert list(tmp_path.iterdir()) == []
    # Without a block or a folder of its own, the download lasts until the process exits.
    code = "from pipelines.tracking.registry import resolve_model; print(resolve_model('models:/vglaw-test/1'))"
    env = os.environ | {"TMPDIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[3]
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert Path(run.stdout.strip().splitlines()[-1]).is_relative_to(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_logged_model_loads_without_the_repository(registered: dict[str, object], store: Path, tmp_path: Path) -> None:
    """A fresh interpreter outside the repo, with ``pipelines`` unimportable, loads and runs the model, taking
    ``vglaw`` from the model's own code folder."""
    import os
    import subprocess
    import sys

    script = f"""
import sys
sys.modules["pipelines"] = None  # the training code is not there
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/vglaw-test@best")
import vglaw
assert "/code/vglaw/" in vglaw.__file__, vglaw.__file__
out = model.predict(pd.DataFrame({{"image": [{_png(3)!r}], "expression": ["the red circle"]}}))
print(len(out["box"][0]), out["mask"][0]["size"])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "4 [60, 90]"

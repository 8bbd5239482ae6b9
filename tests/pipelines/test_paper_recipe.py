"""The paper's recipe end to end, shrunk only where a 2-core CPU forces it.

``configs/refcoco.yaml`` runs as shipped, changed only on the command line: CPU workers (2 of them), a few steps
of a small batch, and a small REFER-format dataset preprocessed at 448. It keeps the ``base`` preset at 448,
bf16 autocast, a ViTDet ``.pkl`` and a ``bert-base-uncased``-layout directory (both written here), and the rest
of the chain: Ray Train with a checkpoint and a resume after a killed worker, evaluation, MLflow registration,
Serve, and one HTTP query answered with a box and a mask. About 4-5 minutes on 2 cores.

bf16 runs where the CPU has bf16 instructions. Elsewhere bf16 autocast at ``base`` is more than 8x slower
than fp32 (docs/benchmarks.md, "Precision and compile on the CPU") and the chain runs in fp32; bf16 is then
still exercised by tests/vglaw/test_precision.py (``base`` included) and, through Ray Train, by the
``ray job submit`` test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
import requests
from pycocotools import mask as mask_utils

from pipelines.train.config import load_config
from tests.pipelines.job_harness import PY, REPO, descendants_named, resumed_step, run_job, wait_for_checkpoint
from tests.pipelines.serve_harness import encode, free_port, wait_until_healthy
from tests.pretrained_layouts import bert_vocab, write_bert_release, write_vitdet_pkl
from vglaw import get_config, safe_pickle
from vglaw.precision import cpu_bf16_instructions
from vglaw.vision import ViTDetBackbone

CONFIG = REPO / "configs" / "refcoco.yaml"
PRECISION = "bf16" if cpu_bf16_instructions() else "fp32"


@pytest.fixture(scope="module")
def paper_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A RefCOCO-layout dataset preprocessed at 448, and the two pretrained trunks in their release layouts."""
    root = tmp_path_factory.mktemp("paper")
    env = dict(os.environ, RAY_ADDRESS="", MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    env["RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS"] = "0"
    run_job(
        [PY, "-m", "jobs.synth", "--out", str(root / "raw"), "--images", "48", "--seed", "11",
         "--min-objects", "2", "--max-objects", "3", "--refs-per-image", "1", "--sentences-per-ref", "1"],
        env,
        120,
    )  # fmt: skip
    # The REFER layout of RefCOCO: <root>/refcoco/refs(unc).p and instances.json, images in a COCO folder.
    refer = root / "refer" / "refcoco"
    refer.mkdir(parents=True)
    for name in ("refs(unc).p", "instances.json"):
        shutil.copy(root / "raw" / "synthetic" / name, refer / name)
    run_job(
        [PY, "-m", "jobs.preprocess", "--dataset", "refcoco", "--split-by", "unc", "--refer-root",
         str(root / "refer"), "--image-root", str(root / "raw" / "images"), "--out", str(root / "data"),
         "--image-size", "448", "--num-cpus", "2"],
        env,
        300,
    )  # fmt: skip

    v = get_config("base").vision
    trunk = ViTDetBackbone(
        image_size=v.image_size, patch_size=v.patch_size, embed_dim=v.embed_dim, depth=v.depth,
        num_heads=v.num_heads, window_size=v.window_size, global_blocks=v.global_blocks,
    )  # fmt: skip
    vit = write_vitdet_pkl(root / "model_final_vitdet_b.pkl", trunk.state_dict(), global_blocks=v.global_blocks)
    del trunk
    refs = safe_pickle.load(refer / "refs(unc).p")
    words = [w for ref in refs for sentence in ref["sentences"] for w in sentence["tokens"]]
    bert = write_bert_release(root / "bert-base-uncased", bert_vocab(words))
    return {"root": root, "env": env, "data": root / "data", "vit": vit, "bert": bert}


@pytest.mark.slow
def test_the_paper_recipe_runs_end_to_end(paper_setup) -> None:
    root, env = paper_setup["root"], paper_setup["env"]
    config_overrides = [
        f"data.path={paper_setup['data']}",
        f"model.pretrained_vit={paper_setup['vit']}",
        f"model.pretrained_bert={paper_setup['bert']}",
        "run.use_gpu=false",
        "run.num_workers=2",
        "run.cpus_per_worker=1",
        f"run.precision={PRECISION}",
        f"run.storage_path={root / 'runs'}",
        "run.checkpoint_every_steps=2",
        "run.overlays=0",
        "optim.global_batch_size=2",
        "optim.epochs=1",
        "optim.max_steps_per_epoch=4",
    ]
    config = load_config(CONFIG, config_overrides)
    assert (config.model.preset, config.model.vglaw_config().vision.image_size) == ("base", 448)

    # Train, killing a worker once the first checkpoint is written: the run resumes from it.
    log_path = root / "train.log"
    with log_path.open("w") as log:
        args = [PY, "-m", "jobs.train", "--config", str(CONFIG), *config_overrides]
        driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        run_dir = root / "runs" / config.run.name
        wait_for_checkpoint(driver, run_dir, timeout=1800)
        os.kill(descendants_named(driver.pid, "RayTrainWorker")[0].pid, signal.SIGKILL)
        assert driver.wait(timeout=1800) == 0, log_path.read_text()[-4000:]
    text = log_path.read_text()
    assert f"2 workers on 1 node(s), {PRECISION}" in text, text[-3000:]
    assert 0 < resumed_step(text) < 4, text[-3000:]  # from a checkpoint, not from the start
    assert "done: step 4," in text, text[-3000:]
    saved = json.loads((run_dir / "model" / "config.json").read_text())["model"]
    assert saved["name"] == "base" and saved["vision"]["image_size"] == 448

    # Registered in MLflow under the config's name, with the best alias.
    from mlflow.tracking import MlflowClient

    uri = env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(config.run.registered_model_name, "best")
    (run,) = client.search_runs(
        [client.get_experiment_by_name(config.run.experiment).experiment_id],
        filter_string=f"attributes.run_name = '{config.run.name}'",
    )
    assert version.run_id == run.info.run_id and run.data.params["run.precision"] == PRECISION

    # Evaluation of the registered model, in the same precision.
    report_path = root / "eval" / "report.json"
    reference = f"models:/{config.run.registered_model_name}@best"
    run_job(
        [PY, "-m", "jobs.evaluate", "--model", reference, "--data", str(paper_setup["data"]), "--splits",
         "val", "--precision", PRECISION, "--limit", "4", "--overlays", "2", "--out", str(report_path),
         "--num-cpus", "2"],
        env,
        600,
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    for split in ("val",):
        metrics = report["splits"][split]["metrics"]
        assert report["splits"][split]["count"] == 4 and 0.0 <= metrics["prec@0.5"] <= 1.0, report["splits"][split]

    # Serve the registered model and ground one expression over HTTP.
    port = free_port()
    serve_log = (root / "serve.log").open("w")
    command = [PY, "-m", "jobs.serve", "--model", reference, "--port", str(port), "--num-cpus", "2",
               "--precision", PRECISION]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=serve_log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_healthy(url, server, timeout=300), (root / "serve.log").read_text()[-3000:]
        image_path = next((root / "raw" / "images").glob("*.jpg"))
        from PIL import Image

        image = Image.open(image_path)
        files = {"image": (image_path.name, encode(image, "PNG"))}
        answer = requests.post(f"{url}/v1/ground", files=files, data={"expression": "the red shape"}, timeout=120)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        x0, y0, x1, y1 = body["box"]
        assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height
        mask = mask_utils.decode({"size": body["mask"]["size"], "counts": body["mask"]["counts"].encode()})
        assert mask.shape == (image.height, image.width) and int(mask.sum()) == body["mask_area"]
        assert body["model"]["name"] == config.run.registered_model_name
        info = requests.get(f"{url}/v1/model", timeout=30).json()
        assert info["model"]["precision"] == PRECISION and info["model"]["preset"] == "base"
        assert np.isfinite(body["box"]).all()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        serve_log.close()

"""The whole mission on the built-in default, one stage after another: ``make demo``.

::

    python -m jobs.demo [--keep-serving] [--port 8000]

1. generate the synthetic dataset (REFER layout) into ``data/synthetic``;
2. preprocess it with Ray Data into ``data/processed/synthetic_unc_128``;
3. train the demo model with Ray Train (2 workers, ``configs/synthetic.yaml``), tracked and registered in MLflow;
4. evaluate it on val / testA / testB (Ray Data batch inference) into ``runs/vglaw-synthetic/evaluation.json``;
5. start the Serve application on the registered model, ground 8 held-out testB expressions (drawn by a fixed
   seed) over HTTP, print each hit or miss and draw them into ``runs/vglaw-synthetic/demo_queries.png``;
6. print a summary, then stop the server (``--keep-serving`` leaves it running until Ctrl-C).

Every stage is the project's own job, run as a subprocess with its output shown. A second run reuses the
dataset and the Parquet when their settings match, and resumes the finished training run (nothing to train).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.serve.client import GroundingClient, GroundingError, GroundingResult

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
CONFIG = "configs/synthetic.yaml"
RAW = Path("data/synthetic")
DATA = Path("data/processed/synthetic_unc_128")
RUN = Path("runs/vglaw-synthetic")
MODEL_URI = "models:/vglaw-synthetic@best"
# The demo's dataset: 2000 images of 2-3 shapes (70 % train); see docs/data.md for the grammar and chance level.
SYNTH = {"num_images": 2000, "seed": 0, "min_objects": 2, "max_objects": 3}
IMAGE_SIZE = 128
# The held-out queries sent to the server: drawn from testB by a fixed seed, not chosen by how they come out.
SAMPLE, SAMPLE_SEED = 8, 0
HIT_IOU = 0.5  # a hit as Prec@0.5 counts one


@dataclass
class Stage:
    """A named step with its wall time."""

    name: str
    seconds: float = 0.0
    note: str = ""


@dataclass
class Demo:
    stages: list[Stage] = field(default_factory=list)
    total: int = 6

    def run(self, name: str, args: list[str], note: str = "") -> None:
        """Runs one job, streaming its output; stops the demo if it fails."""
        self.banner(name)
        started = time.perf_counter()
        code = subprocess.call(args, cwd=REPO, env=_env())
        if code:
            raise SystemExit(f"demo: stage '{name}' failed (exit {code}); its output is above")
        self.stages.append(Stage(name, time.perf_counter() - started, note))

    def banner(self, name: str) -> None:
        print(f"\n=== [{len(self.stages) + 1}/{self.total}] {name} ===", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.banner(name)
        print(f"reusing {why}", flush=True)
        self.stages.append(Stage(name, 0.0, f"reused ({why})"))


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    env.setdefault("RAY_ADDRESS", "")  # a local Ray unless the user points at a cluster
    return env


def _dataset_matches() -> bool:
    stats = REPO / RAW / "synthetic" / "generator.json"
    if not stats.is_file():
        return False
    config = json.loads(stats.read_text())["config"]
    return all(config.get(key) == value for key, value in SYNTH.items())


def _parquet_matches() -> bool:
    from pipelines.data.manifest import read_manifest

    manifest = REPO / DATA / "manifest.json"
    if not manifest.is_file():
        return False
    written = read_manifest(REPO / DATA)
    source = REPO / RAW / "synthetic" / "instances.json"
    return written.get("image_size") == IMAGE_SIZE and source.stat().st_mtime < manifest.stat().st_mtime


def _held_out_sample(count: int = SAMPLE, seed: int = SAMPLE_SEED) -> list[dict[str, Any]]:
    """``count`` testB expressions drawn by ``seed`` (in table order), each with its image and true box (xyxy).

    The draw depends on the seed and the split's size only, never on how the model does on them.
    """
    import numpy as np

    from pipelines.data.parquet import read_split_table

    table = read_split_table(REPO / DATA, "testB", columns=["expression", "file_name", "box_xywh"])
    rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=min(count, table.num_rows), replace=False))
    sample = []
    for row in table.take(rows).to_pylist():
        x, y, w, h = row["box_xywh"]
        image = REPO / RAW / "images" / row["file_name"]
        sample.append({"expression": row["expression"], "image": image, "box": [x, y, x + w, y + h]})
    return sample


def _wait_healthy(client: GroundingClient, server: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"demo: the Serve application exited ({server.returncode}); its output is above")
        try:
            if client.health().get("status") == "ok":
                return
        except GroundingError:  # not listening yet
            pass
        time.sleep(1.0)
    raise SystemExit(f"demo: {client.url}/healthz did not answer within {timeout:.0f} s")


def _caption(query: dict[str, Any], iou: float) -> str:
    return f'{"hit" if iou >= HIT_IOU else "miss"} (IoU {iou:.2f}): "{query["expression"]}"'


def _draw(queries: list[dict[str, Any]], answers: list[GroundingResult], ious: list[float], path: Path) -> Path:
    """The queries in one grid: the answer's box and mask in red, the true box in green, hit or miss below."""
    import numpy as np
    from PIL import Image

    from pipelines.evaluate.report import overlay_grid
    from vglaw.images import to_rgb8

    grid = overlay_grid(
        [np.asarray(to_rgb8(Image.open(query["image"]))) for query in queries],
        pred_boxes=[list(answer.box) for answer in answers],
        true_boxes=[query["box"] for query in queries],
        pred_masks=[answer.mask for answer in answers],
        captions=[_caption(query, iou) for query, iou in zip(queries, ious)],
        columns=min(4, len(queries)),
        tile_size=320,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _box_iou(a: list[float], b: list[float]) -> float:
    import numpy as np

    from vglaw.metrics import box_iou_paired

    return float(box_iou_paired(np.asarray(a, np.float64), np.asarray(b, np.float64)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="port of the Serve application (default 8000)")
    parser.add_argument("--keep-serving", action="store_true", help="leave the server running until Ctrl-C")
    args = parser.parse_args(argv)
    demo, started = Demo(), time.perf_counter()

    if _dataset_matches():
        demo.skip("synthetic dataset", f"{RAW}")
    else:
        demo.run(
            "synthetic dataset",
            [PY, "-m", "jobs.synth", "--out", str(RAW), "--images", str(SYNTH["num_images"]),
             "--seed", str(SYNTH["seed"]), "--min-objects", str(SYNTH["min_objects"]),
             "--max-objects", str(SYNTH["max_objects"]), "--overwrite"],
        )  # fmt: skip
    if _parquet_matches():
        demo.skip("Ray Data preprocessing", f"{DATA}")
    else:
        demo.run(
            "Ray Data preprocessing",
            [PY, "-m", "jobs.preprocess", "--refer-root", str(RAW), "--out", str(DATA),
             "--image-size", str(IMAGE_SIZE), "--overwrite"],
        )  # fmt: skip
    demo.run("Ray Train (2 workers), MLflow", [PY, "-m", "jobs.train", "--config", CONFIG, f"data.path={DATA}"])
    report_path = RUN / "evaluation.json"
    demo.run(
        "evaluation (Ray Data batch inference)",
        [PY, "-m", "jobs.evaluate", "--model", str(RUN / "model"), "--data", str(DATA),
         "--splits", "val,testA,testB", "--actors", "2", "--out", str(report_path)],
    )  # fmt: skip

    demo.banner(f"Ray Serve: {SAMPLE} held-out queries over HTTP")
    serve_started = time.perf_counter()
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [PY, "-m", "jobs.serve", "--model", MODEL_URI, "--port", str(args.port)], cwd=REPO, env=_env()
    )
    client = GroundingClient(url)
    try:
        _wait_healthy(client, server)
        queries = _held_out_sample()
        answers = [client.ground(query["image"], query["expression"]) for query in queries]
        shown = {k: answers[0].raw[k] for k in ("expression", "box", "mask_area", "truncated", "model", "timings")}
        print(f"the first answer of {len(answers)}:\n{json.dumps(shown, indent=2)}")
        ious = [_box_iou(list(answer.box), query["box"]) for query, answer in zip(queries, answers)]
        for query, iou in zip(queries, ious):
            print(f"  {_caption(query, iou)}")
        overlay = _draw(queries, answers, ious, REPO / RUN / "demo_queries.png")
        hits = sum(iou >= HIT_IOU for iou in ious)
        note = f"{hits}/{len(ious)} hit"
        demo.stages.append(Stage(f"Ray Serve: {len(queries)} queries", time.perf_counter() - serve_started, note))

        report = json.loads((REPO / report_path).read_text())
        _summary(demo, report, time.perf_counter() - started, url, overlay, args.keep_serving)
        print(f"\nHeld-out sample (testB, seed {SAMPLE_SEED}): {hits} of {len(ious)} hit (box IoU >= {HIT_IOU}).")
        if args.keep_serving:
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0


def _experiment_link(db: Path, ui_url: str = "http://127.0.0.1:5000") -> str:
    """The demo experiment's page in the MLflow UI, opened in its model-training view."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.runs import experiment_page
    from pipelines.train.config import load_config

    experiment = MlflowClient(tracking_uri=f"sqlite:///{db}").get_experiment_by_name(
        load_config(REPO / CONFIG).run.experiment
    )
    return experiment_page(ui_url, experiment.experiment_id) if experiment is not None else ui_url


def _summary(demo: Demo, report: dict[str, Any], seconds: float, url: str, overlay: Path, serving: bool) -> None:
    print(f"\n=== [{demo.total}/{demo.total}] summary ===")
    for stage in demo.stages:
        print(f"  {stage.name:<42} {stage.seconds:7.1f} s  {stage.note}")
    print(f"  {'total':<42} {seconds:7.1f} s")
    print("\n  split    expressions  Prec@0.5   mIoU    oIoU")
    for split, section in report["splits"].items():
        m = section["metrics"]
        print(f"  {split:<8} {section['count']:>11}  {m['prec@0.5']:8.3f} {m['miou']:7.3f} {m['oiou']:7.3f}")
    db = REPO / "mlflow.db"
    print(
        f"""
  dataset       {RAW}/ (REFER layout), Parquet in {DATA}/
  model         {RUN}/model (registered as {MODEL_URI})
  evaluation    {RUN}/evaluation.json
  overlay       {overlay.relative_to(REPO)}
  MLflow UI     .venv/bin/mlflow ui --backend-store-uri sqlite:///{db}   then {_experiment_link(db)}
  web page      .venv/bin/python -m jobs.serve --model {MODEL_URI}   then {url}/"""
    )
    print(f"\nServing at {url}/ until Ctrl-C." if serving else "\nThe server is stopped (--keep-serving keeps it).")


if __name__ == "__main__":
    raise SystemExit(main())

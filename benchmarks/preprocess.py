"""Preprocessing throughput: the Ray Data job vs a plain single-process loop doing the same work.

Both paths read the same synthetic REFER dataset (COCO-sized 640x480 JPEGs by default), decode, letterbox
to 448, JPEG-encode the canvas, rasterise and RLE-encode the masks, and write sharded Parquet. The loop
calls the very same per-image function (:func:`pipelines.data.encode.encode_image_task`) and writes with
pyarrow; the Ray side is :func:`pipelines.data.preprocess.run_preprocess` end to end (REFER parsing, manifest
and atomic commit included), on a local Ray started beforehand.

A third path, the same chunks of work spread over ``--num-cpus`` plain processes (``multiprocessing``, no
Ray), measures what the machine itself gives when that many processes share it: the ceiling any
framework's speed-up is bounded by on this hardware. The paths run interleaved, ``--repeats`` rounds, so
a slow spell of a shared machine hits all of them alike.

Usage::

    python -m benchmarks.preprocess [--images 2000] [--num-cpus 2] [--repeats 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from benchmarks.docs_section import write_generated
from pipelines.data.encode import ImageTask, build_image_tasks, chunk_by_split, encode_image_task, rows_to_table
from pipelines.data.preprocess import PreprocessConfig, run_preprocess
from pipelines.data.refer import ReferDataset, ReferSource
from pipelines.data.synthetic.dataset import SyntheticConfig, generate_synthetic


def single_process(source: ReferSource, out: Path, image_size: int, rows_per_file: int) -> int:
    """The baseline: one Python process, same per-image work, pyarrow writes. Returns images processed.

    It streams like the job does: rows are packed and written every ``rows_per_file`` rows, so that it
    never holds more than one file's worth (packing a whole split at once measured ~20 % slower).
    """
    dataset = ReferDataset.load(source)
    tasks = build_image_tasks(dataset)
    for split in dict.fromkeys(t.split for t in tasks):
        (out / split).mkdir(parents=True)
        rows: list[dict[str, Any]] = []
        files = 0
        for task in (t for t in tasks if t.split == split):
            rows += encode_image_task(task, source.image_root, image_size)[0]
            while len(rows) >= rows_per_file:
                pq.write_table(rows_to_table(rows[:rows_per_file]), out / split / f"part-{files:05d}.parquet")
                rows, files = rows[rows_per_file:], files + 1
        if rows:
            pq.write_table(rows_to_table(rows), out / split / f"part-{files:05d}.parquet")
    return len(tasks)


def _encode_chunk(job: tuple[list[ImageTask], str, int, Path]) -> int:
    """One chunk of the plain-process path: encode its images and write one Parquet file. Returns images."""
    tasks, image_root, image_size, path = job
    rows: list[dict[str, Any]] = []
    for task in tasks:
        rows += encode_image_task(task, image_root, image_size)[0]
    if rows:
        pq.write_table(rows_to_table(rows), path)
    return len(tasks)


def process_pool(source: ReferSource, out: Path, image_size: int, images_per_task: int, pool: Any, workers: int) -> int:
    """The machine's reference: the job's chunks of work on a warm pool of plain processes, no Ray."""
    tasks = build_image_tasks(ReferDataset.load(source))
    for split in dict.fromkeys(t.split for t in tasks):
        (out / split).mkdir(parents=True)
    jobs = [
        (chunk, str(source.image_root), image_size, out / chunk[0].split / f"part-{i:05d}.parquet")
        for i, chunk in enumerate(chunk_by_split(tasks, images_per_task, workers))
    ]
    # NOTE: one chunk per hand-out, in order, as Ray Data schedules them (map's default batches several).
    return sum(pool.map(_encode_chunk, jobs, chunksize=1))


CPU_ROLES = ("driver", "workers", "ray_services")


def cpu_seconds_by_role(pool_pids: set[int]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process and every process it started, by role.

    ``workers`` are the pool's processes and Ray's task workers (idle between runs, when this is read);
    ``ray_services`` is the rest of the local Ray: raylet, GCS, agents, and Ray Data's own actors.
    """
    import psutil

    def cpu(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    me = psutil.Process()
    used = dict.fromkeys(CPU_ROLES, 0.0)
    used["driver"] = cpu(me)
    for child in me.children(recursive=True):
        try:
            title = " ".join(child.cmdline())
            seconds = cpu(child)
        except psutil.Error:
            continue  # it ended in the meantime
        worker = child.pid in pool_pids or title.startswith("ray::IDLE")
        used["workers" if worker else "ray_services"] += seconds
    return used


def main(argv: list[str] | None = None) -> int:
    """Runs the paths interleaved ``--repeats`` times and prints (optionally writes to docs) the best of each."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.preprocess", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic images to process (default 2000)")
    p.add_argument("--image-size", default="640x480", help="source image size WxH (default 640x480, COCO-like)")
    p.add_argument("--canvas", type=int, default=448, help="letterbox canvas side (default 448)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs for the local Ray (default all)")
    p.add_argument("--images-per-task", type=int, default=PreprocessConfig.images_per_task, help="images per Ray task")
    p.add_argument("--repeats", type=int, default=3, help="rounds of all paths; the best is reported (default 3)")
    p.add_argument("--write-docs", action="store_true", help="write the result into docs/benchmarks.md")
    args = p.parse_args(argv)
    import ray

    w, h = (int(v) for v in args.image_size.lower().split("x"))
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    times: dict[str, list[float]] = {"loop": [], "processes": [], "ray": []}
    cpu: dict[str, list[dict[str, float]]] = {path: [] for path in times}
    try:
        generate_synthetic(work / "src", SyntheticConfig(num_images=args.images, image_width=w, image_height=h))
        source = ReferSource(work / "src", "synthetic", "unc", work / "src" / "images")
        n_images = len(build_image_tasks(ReferDataset.load(source)))
        images_per_task, cpus = args.images_per_task, args.num_cpus
        # NOTE: the pool forks before Ray starts any thread in this process; it is warm before timing, as
        # Ray's workers are from the second run on.
        with multiprocessing.get_context("fork").Pool(args.num_cpus) as pool:
            pool.map(abs, range(args.num_cpus))
            pool_pids = {proc.pid for proc in pool._pool}  # type: ignore[attr-defined]
            started = time.perf_counter()
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
            init_s = time.perf_counter() - started
            for i in range(args.repeats):
                for path, run in (
                    ("loop", lambda out: single_process(source, out, args.canvas, 1000)),
                    ("processes", lambda out: process_pool(source, out, args.canvas, images_per_task, pool, cpus)),
                    ("ray", lambda out: run_preprocess(_ray_config(source, out, args.canvas, images_per_task))),
                ):
                    before = cpu_seconds_by_role(pool_pids)
                    started = time.perf_counter()
                    run(work / f"{path}{i}")
                    times[path].append(time.perf_counter() - started)
                    after = cpu_seconds_by_role(pool_pids)
                    cpu[path].append({role: after[role] - before[role] for role in CPU_ROLES})
                    shutil.rmtree(work / f"{path}{i}")
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "images": n_images,
        "source_size": args.image_size,
        "canvas": args.canvas,
        "num_cpus": args.num_cpus,
        "machine_cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "images_per_task": images_per_task,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "ray_init_s": round(init_s, 2),
        **{f"{path}_s": [round(t, 2) for t in ts] for path, ts in times.items()},
        **{f"{path}_images_per_s": round(n_images / min(ts), 1) for path, ts in times.items()},
        # The first round also starts Ray's workers; the medians leave it out for every path alike.
        **{
            f"{path}_median_images_per_s": round(n_images / statistics.median(ts[1:] or ts), 1)
            for path, ts in times.items()
        },
        "ray_first_run_images_per_s": round(n_images / times["ray"][0], 1),
        "round_speedups": [round(lo / ra, 2) for lo, ra in zip(times["loop"], times["ray"], strict=True)],
        # CPU seconds per run by role, median over the rounds after the first.
        **{f"{path}_cpu_s": _median_cpu(runs[1:] or runs) for path, runs in cpu.items()},
    }
    for kind in ("", "median_"):
        loop = result[f"loop_{kind}images_per_s"]
        result[f"{kind}speedup"] = round(result[f"ray_{kind}images_per_s"] / loop, 2)
        result[f"processes_{kind}speedup"] = round(result[f"processes_{kind}images_per_s"] / loop, 2)
    # Pooled: all the loop's time over all the job's time in rounds 2+, the steadiest of the three figures.
    steady = {path: sum(ts[1:] or ts) for path, ts in times.items()}
    result["pooled_speedup"] = round(steady["loop"] / steady["ray"], 2)
    result["processes_pooled_speedup"] = round(steady["loop"] / steady["processes"], 2)
    print(json.dumps(result, indent=2))
    if args.write_docs:
        _append_docs(result)
    return 0


def _median_cpu(runs: list[dict[str, float]]) -> dict[str, float]:
    return {role: round(statistics.median(r[role] for r in runs), 2) for role in CPU_ROLES}


def _ray_config(source: ReferSource, out: Path, canvas: int, images_per_task: int) -> PreprocessConfig:
    root, images = source.refer_root, source.image_root
    return PreprocessConfig("synthetic", "unc", root, images, out, image_size=canvas, images_per_task=images_per_task)


def _append_docs(r: dict[str, Any]) -> None:
    """Writes the result into the "Preprocessing" section of docs/benchmarks.md (its generated block only)."""
    rounds = len(r["ray_s"])
    paths = (("single-process loop", "loop"), ("plain processes", "processes"), ("Ray Data job", "ray"))
    table = "\n".join(
        f"| {label} | {', '.join(map(str, r[f'{key}_s']))} | {r[f'{key}_images_per_s']} | "
        f"{r[f'{key}_median_images_per_s']} | {' / '.join(str(r[f'{key}_cpu_s'][role]) for role in CPU_ROLES)} |"
        for label, key in paths
    )
    command = f"python -m benchmarks.preprocess --images {r['images']} --num-cpus {r['num_cpus']} --repeats {rounds}"
    section = f"""`{command} --write-docs`:
{r["images"]} synthetic {r["source_size"]} JPEGs (the benchmark's default size) -> letterbox
{r["canvas"]}, JPEG q95 canvas, polygon -> RLE masks (original and canvas), sharded Parquet
({r["images_per_task"]} images per task). Run {r["date"]}. Machine: {r["machine_cpus"]} CPU cores,
no GPU; Python {r["python"]}, Ray {r["ray"]}, local Ray with `num_cpus={r["num_cpus"]}` started before
timing (start-up {r["ray_init_s"]} s, not counted). 1-minute load average {r["load_avg_1min_before"]}
before / {r["load_avg_1min_after"]} after. The three paths ran interleaved, {rounds} rounds; the Ray time
is the whole job (REFER parsing, manifest, atomic commit included). "Plain processes" runs the job's
chunks on a warm pool of {r["num_cpus"]} `multiprocessing` workers without Ray: what this machine gives
to any {r["num_cpus"]} processes sharing it.

| path | wall s (rounds) | best images/s | median images/s (rounds 2+) | CPU s: driver / workers / Ray |
|---|---|---|---|---|
{table}

Speed-up of the Ray Data job over the loop: **{r["speedup"]}x** best against best, **{r["median_speedup"]}x**
median against median, **{r["pooled_speedup"]}x** pooled (the loop's total time over the job's, rounds 2+), i.e.
{r["speedup"] / r["num_cpus"]:.2f} / {r["median_speedup"] / r["num_cpus"]:.2f} /
{r["pooled_speedup"] / r["num_cpus"]:.2f} x cores (target >= 0.85); per round (loop / Ray):
{", ".join(f"{v}x" for v in r["round_speedups"])}. Plain processes: {r["processes_speedup"]}x /
{r["processes_median_speedup"]}x / {r["processes_pooled_speedup"]}x. The first Ray run, which also starts the worker
processes, reached {r["ray_first_run_images_per_s"]} images/s. CPU seconds are medians over rounds 2+ of the
driver process, the workers (the pool's, or Ray's task workers) and the rest of the local Ray (raylet, GCS,
agents, Ray Data's actors), read with `psutil` before and after each run.
"""
    write_generated("preprocess", section)


if __name__ == "__main__":
    raise SystemExit(main())

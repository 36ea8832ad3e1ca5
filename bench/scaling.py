"""Scaling of extraction over Dask worker processes on this machine: 1 vs 2 workers (and 1 worker with
2 torch threads), steps/s of the task phase with warmed workers.

Each layout gets its own ``LocalCluster``; its workers load the students and import the decoders before
the run (``client.run``), so start-up and model loading are not counted. The corpus is cut into small
tasks (``--chunk-rows``, ``--task-steps``) so two workers always have work. The per-worker rate with two
workers, and the efficiency ``rate(2) / (2 * rate(1))``, say what a cluster of such workers gives.

Run from the repository root: ``.venv/bin/python bench/scaling.py [--quick]``.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _common import (
    fmt,
    fresh,
    log,
    machine,
    machine_line,
    parser,
    ratio,
    synth_corpus,
    table,
    warm_cluster,
    warm_manifest,
    write_results,
)

NAME = "scaling"
STUDENTS = "random:0"
from indexing.grid import STEP_S  # noqa: E402


def quiet(_line: str) -> None:
    pass


def run_layout(
    manifest: Path, warm: Path, store: Path, config: Any, *, workers: int, torch_threads: int
) -> dict[str, Any]:
    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.corpus import read_corpus
    from pipeline.extract import ExtractConfig, run_extraction

    config = ExtractConfig(**{**config.to_dict(), "torch_threads": torch_threads})
    cluster = ClusterConfig(
        kind="local", workers=workers, torch_threads=torch_threads, dashboard_address=None
    )
    t0 = time.perf_counter()
    with open_client(cluster, announce=lambda _line: None) as client:
        client.wait_for_workers(workers)
        # Model load, imports, probe helper and kernels on every worker: start-up, not throughput.
        warm_cluster(client, str(read_corpus(warm)[0].path), STUDENTS)
        startup = time.perf_counter() - t0
        report = run_extraction(manifest, fresh(store), config, client=client, log=quiet)
    if not report.complete or report.failed:
        raise RuntimeError(f"extraction incomplete: {report.failed} {report.task_errors}")
    return {
        "workers": workers,
        "torch_threads": torch_threads,
        "steps": report.steps_run,
        "tasks": report.tasks,
        "task_seconds": report.task_seconds,
        "steps_per_s": report.steps_per_s,
        "startup_seconds": startup,
        "run_seconds": report.seconds,
    }


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, help="synthetic 160x120 videos (default 12, quick 4)")
    p.add_argument("--chunk-rows", type=int, help="store chunk rows, tasks own whole chunks (32, quick 8)")
    p.add_argument(
        "--task-steps", type=int, help="target steps per task; small gives many tasks (32, quick 8)"
    )
    p.add_argument(
        "--no-threads-row",
        action="store_true",
        help="skip the 1 worker x 2 torch threads layout (quick skips)",
    )
    args = p.parse_args()

    from pipeline.extract import ExtractConfig
    from pipeline.synth import SynthConfig

    quick = args.quick
    synth_cfg = SynthConfig(
        videos=args.videos or (4 if quick else 12),
        classes=2,
        seed=12,
        min_s=6.0 if quick else 20.0,
        max_s=10.0 if quick else 40.0,
    )
    work = args.work / NAME
    manifest = synth_corpus(work / "synth", synth_cfg)
    warm = warm_manifest(manifest, work / "warm.csv")
    small = 8 if quick else 32
    config = ExtractConfig(
        students=STUDENTS, chunk_rows=args.chunk_rows or small, task_steps=args.task_steps or small
    )
    info = machine()
    t_start = time.perf_counter()
    layouts = [(1, 1), (2, 1)] + ([] if args.no_threads_row or quick else [(1, 2)])
    runs = []
    for workers, threads in layouts:
        log(f"{workers} worker(s) x {threads} torch thread(s) ...")
        store = work / f"store-{workers}x{threads}"
        r = run_layout(manifest, warm, store, config, workers=workers, torch_threads=threads)
        log(f"  {r['steps']} steps in {r['task_seconds']:.1f} s = {r['steps_per_s']:.1f} steps/s")
        runs.append(r)
    base = runs[0]["steps_per_s"]
    two = next(r for r in runs if r["workers"] == 2)
    per_worker = two["steps_per_s"] / 2
    efficiency = two["steps_per_s"] / (2 * base)
    video_h_per_worker_h = per_worker * STEP_S  # seconds of video per second = hours per hour
    advice = (
        f"Per worker process (1 torch thread, one core of this CPU, paper students) expect about "
        f"{per_worker:.0f} steps/s when every core of a node runs a worker (2 workers here ran at "
        f"{efficiency:.0%} of twice one worker) and up to {base:.0f} steps/s alone, i.e. "
        f"{video_h_per_worker_h:.1f}-{base * STEP_S:.1f} hours of video per worker-hour. Tasks are "
        "independent and write disjoint chunks, so a cluster's throughput is the sum over its workers until "
        "the shared filesystem (about 3 kB written per step, plus the video reads) saturates."
    )

    headers = ["layout", "tasks", "steps", "task s", "steps/s", "vs 1 worker", "per worker", "start-up s"]
    rows = [
        [
            f"{r['workers']} worker(s) x {r['torch_threads']} torch thread(s)",
            r["tasks"],
            r["steps"],
            fmt(r["task_seconds"], 1),
            r["steps_per_s"],
            ratio(r["steps_per_s"], base),
            r["steps_per_s"] / r["workers"],
            fmt(r["startup_seconds"], 1),
        ]
        for r in runs
    ]
    text, md = table(headers, rows)
    wall = time.perf_counter() - t_start
    print(f"\nExtraction scaling over Dask workers ({machine_line(info)})\n")
    print(text)
    print(f"\n{advice}")
    print(f"\nbenchmark wall time {wall:.0f} s{' (quick: tiny sizes, noisy)' if quick else ''}")
    markdown = "\n".join(
        [
            f"**Extraction scaling** (LocalCluster, warmed workers, task phase only; {synth_cfg.videos} "
            f"synthetic 160x120 videos, paper students; {machine_line(info)}"
            f"{'; QUICK run' if quick else ''})",
            "",
            md,
            "",
            advice,
        ]
    )
    data = {
        "benchmark": NAME,
        "quick": quick,
        "machine": info,
        "config": {"extract": config.to_dict(), "synthetic": asdict(synth_cfg), "layouts": layouts},
        "runs": runs,
        "per_worker_steps_per_s": per_worker,
        "efficiency_2_workers": efficiency,
        "video_hours_per_worker_hour": video_h_per_worker_h,
        "advice": advice,
        "wall_s": wall,
    }
    j, m = write_results(NAME, args.out, data, markdown)
    log(f"wrote {j} and {m}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()

"""Extraction throughput: ``run_extraction`` against the limit of its parts and against a naive extractor.

For each corpus (a synthetic 160x120 corpus of mixed containers, frame rates and audio formats, and
longer 640x360 H.264/AAC-48 kHz-stereo videos) this measures, in one run and on the same files:

- **extraction**: :func:`pipeline.extract.run_extraction` with the paper-configuration students
  (``random:0``; random weights cost exactly what trained ones do), serially (``client=None``) and on a
  Dask ``LocalCluster`` of one worker (warmed: model loaded before the run) as ``l2l extract`` starts it
  (``MALLOC_TRIM_THRESHOLD_`` unset), and once more with Dask's default worker environment
  (``MALLOC_TRIM_THRESHOLD_=65536``, which freezes glibc's mmap threshold so every large tensor is
  mapped and unmapped afresh). Steps/s of the task phase.
- **limit of its parts**: decoding alone (the :func:`pipeline.media.iter_step_batches` loop, probing
  included, no model) and the models alone (``Students.embed`` on random input at their best batch
  size), combined for one worker as ``1 / (1 / decode + 1 / model)``.
- **naive**: what common tools do: decode every frame (decord, full size, in batches), pick the step
  frames, resize them, decode + resample the whole audio track (PyAV), compute the mel and run the
  students one step at a time (batch 1), write one ``.npy`` per video and feature type.
- **breakdown**: the serial extraction run again with its pieces timed in place (probe, open, video
  decode + resize, audio decode, resample, mel, frame normalisation, image / audio forward, fusion,
  write), plus a native-size decode of the same frames to split decode from resize.

Run from the repository root: ``.venv/bin/python bench/extract_throughput.py [--quick]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from _common import (
    Clock,
    combined_rate,
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
    warm_worker,
    write_results,
)

NAME = "extract_throughput"
STUDENTS = "random:0"  # the paper preset; random weights cost the same as trained ones


# ---- corpora -------------------------------------------------------------------------------------------


def large_corpus(folder: Path, *, videos: int, seconds: float, width: int, height: int) -> Path:
    """``videos`` synthetic H.264 mp4 files of ``seconds`` at ``width x height``, 30 fps, AAC 48 kHz stereo
    (the usual web-video format), written by the synthetic renderer; cached by its spec."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.corpus import CorpusEntry, write_manifest
    from pipeline.synth import SynthConfig, plan_corpus, write_one

    spec = {"videos": videos, "seconds": seconds, "width": width, "height": height, "audio": "aac-48k-stereo"}
    manifest, stamp = folder / "manifest.csv", folder / "bench-spec.json"
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return manifest
    config = SynthConfig(
        videos=max(videos, 2),
        classes=2,
        min_s=seconds,
        max_s=seconds,
        width=width,
        height=height,
        mp4_only=True,
    )
    plans = [replace(p, sample_rate=48_000, channels=2) for p in plan_corpus(config)[:videos]]
    log(f"generating {videos} videos of {seconds:g} s at {width}x{height} in {folder} ...")
    t0 = time.perf_counter()
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    # Spawned workers encode with PyAV's own FFmpeg (see pipeline.synth.write_one).
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(write_one, [folder] * len(plans), plans))
    entries = [CorpusEntry(p.video_id, folder / p.path, p.signature.name, p.split) for p in plans]
    write_manifest(manifest, entries)
    stamp.write_text(json.dumps(spec))
    log(f"  generated in {time.perf_counter() - t0:.1f} s")
    return manifest


# ---- the parts alone -----------------------------------------------------------------------------------


def models_alone(students: Any, batch_sizes: list[int], *, min_steps: int) -> dict[int, float]:
    """Steps/s of ``Students.embed`` (normalisation + mel + image + audio + fusion) on random input."""
    rng = np.random.default_rng(0)
    top = max(batch_sizes)
    frames = rng.integers(0, 256, (top, 112, 112, 3), dtype=np.uint8)  # (B, 112, 112, 3)
    audio = (0.1 * rng.standard_normal((top, 16_000))).astype(np.float32)  # (B, 16000)
    rates = {}
    for b in batch_sizes:
        students.embed(frames[:b], audio[:b])  # warm-up (allocator, oneDNN kernels)
        calls = max(2, -(-min_steps // b))
        t0 = time.perf_counter()
        for _ in range(calls):
            students.embed(frames[:b], audio[:b])
        rates[b] = calls * b / (time.perf_counter() - t0)
        log(f"  models alone, batch {b}: {rates[b]:.1f} steps/s")
    return rates


def decode_alone(paths: list[Path], *, batch_steps: int) -> tuple[int, float]:
    """``(steps, seconds)`` of reading every step (frames + audio) of the videos, probing included."""
    from pipeline.media import iter_step_batches

    steps = 0
    t0 = time.perf_counter()
    for path in paths:
        for batch in iter_step_batches(path, batch_steps=batch_steps):
            steps += len(batch)
    return steps, time.perf_counter() - t0


def native_decode(paths: list[Path], *, batch_steps: int) -> float:
    """Seconds to decode the step frames at the file's own size (decord, no scaling): the decode share
    of the extraction's scaled decode."""
    import decord

    from indexing.grid import frames_at
    from pipeline.media import StepReader, probe_video

    seconds = 0.0
    for path in paths:
        info = probe_video(path)
        with StepReader(path, info=info) as reader:
            rel_pts = reader._video.rel_pts  # the frame times the extraction picks frames with
        idx = frames_at(rel_pts, np.arange(info.num_steps) * (16 / 30))  # (S,)
        vr = decord.VideoReader(str(path), num_threads=1)
        t0 = time.perf_counter()
        for b0 in range(0, len(idx), batch_steps):
            vr.get_batch(np.unique(idx[b0 : b0 + batch_steps]).tolist()).asnumpy()
        seconds += time.perf_counter() - t0
        del vr
    return seconds


# ---- naive baseline ------------------------------------------------------------------------------------


def naive_video(path: Path, students: Any, out_dir: Path, *, read_batch: int = 64) -> int:
    """Extract one video the common way; returns its step count. See the module docstring."""
    import av
    import decord
    import torch
    import torch.nn.functional as F

    from indexing.frontend import frames_to_tensor, log_mel
    from indexing.grid import STEP_S, num_steps

    vr = decord.VideoReader(str(path), num_threads=1)  # full size
    n = len(vr)
    times = vr.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64)  # (F,) frame starts
    duration = float(times[-1]) + (float(times[-1] - times[0]) / max(n - 1, 1) if n > 1 else 1 / 30)
    steps = num_steps(duration)
    want = np.clip(np.searchsorted(times, np.arange(steps) * STEP_S + 1e-6, side="right") - 1, 0, n - 1)
    picked = []
    for b0 in range(0, n, read_batch):  # decode every frame
        batch = vr.get_batch(list(range(b0, min(n, b0 + read_batch)))).asnumpy()  # (b, H, W, 3)
        sel = want[(want >= b0) & (want < b0 + read_batch)]
        picked.append(batch[sel - b0])
    del vr
    frames = torch.from_numpy(np.concatenate(picked)).permute(0, 3, 1, 2).float()  # (S, 3, H, W)
    h, w = frames.shape[-2:]
    size = (112, max(112, round(w * 112 / h))) if w >= h else (max(112, round(h * 112 / w)), 112)
    frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    y0, x0 = (size[0] - 112) // 2, (size[1] - 112) // 2
    frames = frames[:, :, y0 : y0 + 112, x0 : x0 + 112].round().clamp(0, 255).to(torch.uint8)
    frames = frames.permute(0, 2, 3, 1).contiguous()  # (S, 112, 112, 3)

    wave = np.zeros(0, np.float32)
    with av.open(str(path)) as container:  # the whole track, resampled by FFmpeg to 16 kHz mono
        if container.streams.audio:
            resampler = av.AudioResampler(format="flt", layout="mono", rate=16_000)
            chunks = []
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
            wave = np.concatenate(chunks) if chunks else wave
    wave = np.concatenate([wave, np.zeros(16_000 + int(steps * STEP_S * 16_000) + 1, np.float32)])

    feats: dict[str, list[np.ndarray]] = {"image": [], "audio": [], "fused": []}
    students.eval()
    with torch.inference_mode():
        for s in range(steps):  # one step at a time
            a = int(round(s * STEP_S * 16_000))
            mel = log_mel(torch.from_numpy(wave[a : a + 16_000])[None])  # (1, 1, 101, 40)
            out = students(frames_to_tensor(frames[s : s + 1]), mel)
            feats["image"].append(out["z_i"].numpy())
            feats["audio"].append(out["z_a"].numpy())
            feats["fused"].append(out["z_ia"].numpy())
    for name, rows in feats.items():  # the reference layout: one .npy per video and feature type
        np.save(out_dir / f"{path.stem}_{name}.npy", np.concatenate(rows))
    return steps


def naive(paths: list[Path], students: Any, out_dir: Path) -> tuple[int, float]:
    fresh(out_dir).mkdir()
    t0 = time.perf_counter()
    steps = sum(naive_video(p, students, out_dir) for p in paths)
    return steps, time.perf_counter() - t0


# ---- extraction runs -----------------------------------------------------------------------------------


def extract(manifest: Path, store: Path, config: Any, client: Any = None) -> Any:
    from pipeline.extract import run_extraction

    report = run_extraction(manifest, fresh(store), config, client=client, log=lambda _line: None)
    if not report.complete or report.failed:
        raise RuntimeError(f"extraction of {manifest} incomplete: {report.failed} {report.task_errors}")
    return report


@contextlib.contextmanager
def instrumented(clock: Clock, students: Any):
    """Time the pieces of the real extraction code path in place (serial run, this process)."""
    import indexing.models as models
    import pipeline.extract as extract_mod
    import pipeline.media as media
    from indexing.stores.zarr_store import ZarrStore

    in_task = [False]
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, attr: str, new: Any) -> None:
        saved.append((owner, attr, owner.__dict__.get(attr, getattr(owner, attr))))
        setattr(owner, attr, new)

    def probe(*args: Any, _orig: Any = media.probe_video, **kwargs: Any) -> Any:
        if not in_task[0]:
            return _orig(*args, **kwargs)
        with clock("probe (again, in the task)"):
            return _orig(*args, **kwargs)

    def video(*args: Any, _orig: Any = extract_mod._extract_video, **kwargs: Any) -> Any:
        in_task[0] = True
        try:
            return _orig(*args, **kwargs)
        finally:
            in_task[0] = False

    patch(media, "probe_video", probe)
    patch(extract_mod, "_extract_video", video)
    patch(media.StepReader, "__init__", clock.wrap("open readers", media.StepReader.__init__))
    patch(media._VideoSource, "frames", clock.wrap("video decode + resize + crop", media._VideoSource.frames))
    patch(media._AudioSource, "window", clock.wrap("audio decode + resample", media._AudioSource.window))
    patch(media, "_resample", clock.wrap("audio resample", media._resample))
    patch(models, "log_mel", clock.wrap("mel", models.log_mel))
    patch(models, "frames_to_tensor", clock.wrap("normalise frames", models.frames_to_tensor))
    patch(ZarrStore, "write_rows", clock.wrap("write rows", ZarrStore.write_rows))
    for role, label in (("image", "forward image"), ("audio", "forward audio"), ("fusion", "fusion")):
        module = getattr(students, role)
        module.forward = clock.wrap(label, module.forward)  # instance attribute shadows the class's
    try:
        yield
    finally:
        for owner, attr, old in reversed(saved):
            setattr(owner, attr, old)
        for role in ("image", "audio", "fusion"):
            del getattr(students, role).forward


BREAKDOWN_ORDER = (
    "probe (again, in the task)",
    "open readers",
    "video decode (native size)",
    "resize + crop (scaled - native decode)",
    "audio decode",
    "audio resample",
    "mel",
    "normalise frames",
    "forward image",
    "forward audio",
    "fusion",
    "write rows",
    "other (copies, bookkeeping)",
)


def breakdown(manifest: Path, store: Path, config: Any, students: Any, paths: list[Path]) -> dict[str, Any]:
    clock = Clock()
    with instrumented(clock, students):
        report = extract(manifest, store, config)
    s = dict(clock.seconds)
    native = native_decode(paths, batch_steps=config.batch_steps)
    scaled = s.pop("video decode + resize + crop", 0.0)
    window = s.pop("audio decode + resample", 0.0)
    pieces = {
        "probe (again, in the task)": s.get("probe (again, in the task)", 0.0),
        "open readers": s.get("open readers", 0.0),
        "video decode (native size)": native,
        "resize + crop (scaled - native decode)": scaled - native,
        "audio decode": window - s.get("audio resample", 0.0),
        "audio resample": s.get("audio resample", 0.0),
        "mel": s.get("mel", 0.0),
        "normalise frames": s.get("normalise frames", 0.0),
        "forward image": s.get("forward image", 0.0),
        "forward audio": s.get("forward audio", 0.0),
        "fusion": s.get("fusion", 0.0),
        "write rows": s.get("write rows", 0.0),
    }
    pieces["other (copies, bookkeeping)"] = report.task_seconds - sum(pieces.values())
    return {
        "task_seconds": report.task_seconds,
        "steps": report.steps_run,
        "seconds": pieces,
        "scaled_decode_seconds": scaled,
    }


# ---- main ----------------------------------------------------------------------------------------------


def run_corpus(
    label: str, manifest: Path, work: Path, config: Any, students: Any, model_rate: float
) -> dict[str, Any]:
    """Everything measured in this process: serial extraction, decoding alone, naive, breakdown."""
    from pipeline.corpus import read_corpus

    paths = [e.path for e in read_corpus(manifest)]
    # Imports, probe helper, mel and resampler kernels: start-up, not throughput.
    warm_worker(str(read_corpus(warm_manifest(manifest, work / "warm.csv"))[0].path), STUDENTS)
    log(f"[{label}] serial extraction ...")
    serial = extract(manifest, work / "store-serial", config)
    log(f"  {serial.steps_run} steps in {serial.task_seconds:.1f} s = {serial.steps_per_s:.1f} steps/s")
    log(f"[{label}] decoding alone ...")
    d_steps, d_seconds = decode_alone(paths, batch_steps=config.batch_steps)
    decode_rate = d_steps / d_seconds
    log(f"  {decode_rate:.1f} steps/s")
    log(f"[{label}] naive extractor ...")
    n_steps, n_seconds = naive(paths, students, work / "naive-npy")
    naive_rate = n_steps / n_seconds
    log(f"  {naive_rate:.1f} steps/s")
    log(f"[{label}] breakdown (instrumented serial run) ...")
    parts = breakdown(manifest, work / "store-breakdown", config, students, paths)
    limit = combined_rate(decode_rate, model_rate)
    return {
        "label": label,
        "videos": len(paths),
        "steps": serial.steps_run,
        "video_minutes": round(serial.steps_run * (16 / 30) / 60, 2),
        "extraction_serial_steps_per_s": serial.steps_per_s,
        "decode_alone_steps_per_s": decode_rate,
        "models_alone_best_steps_per_s": model_rate,
        "limit_of_parts_steps_per_s": limit,
        "naive_steps_per_s": naive_rate,
        "serial_over_limit": serial.steps_per_s / limit,
        "serial_over_naive": serial.steps_per_s / naive_rate,
        "breakdown": parts,
    }


def dask_runs(corpora: list[tuple[str, Path]], work: Path, config: Any, *, trim: bool) -> list[float]:
    """Steps/s of the extraction on a warmed one-worker LocalCluster, per corpus.

    ``trim=False`` is ``l2l extract``'s own local cluster (``pipeline.cluster.KEEP_UNSET`` keeps
    ``MALLOC_TRIM_THRESHOLD_`` out of the workers); ``trim=True`` gives the worker Dask's default 65536.
    """
    import dask
    import distributed  # noqa: F401 - loads the distributed.* config defaults read below

    from pipeline import cluster as cluster_mod
    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.corpus import read_corpus

    cluster = ClusterConfig(
        kind="local", workers=1, torch_threads=config.torch_threads, dashboard_address=None
    )
    rates = []
    with contextlib.ExitStack() as stack:
        if trim:  # Dask's default worker environment, which open_client otherwise keeps out
            stack.enter_context(mock.patch.object(cluster_mod, "KEEP_UNSET", ()))
            stack.enter_context(
                dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 65536})
            )
        client = stack.enter_context(open_client(cluster, announce=lambda _line: None))
        for i, (label, manifest) in enumerate(corpora):
            warm_cluster(
                client, str(read_corpus(warm_manifest(manifest, work / "warm.csv"))[0].path), STUDENTS
            )
            what = "Dask's MALLOC_TRIM_THRESHOLD_=65536" if trim else "l2l's worker environment"
            log(f"[{label}] Dask LocalCluster, 1 worker, {what} ...")
            report = extract(
                manifest, work / f"store-dask-{i}-{'trim' if trim else 'notrim'}", config, client=client
            )
            log(f"  {report.steps_per_s:.1f} steps/s")
            rates.append(report.steps_per_s)
    return rates


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads (extraction's default is 1)")
    p.add_argument("--synth-videos", type=int, help="videos of the 160x120 corpus (default 4, quick 2)")
    p.add_argument("--large-videos", type=int, help="640x360 videos (default 2, quick 1)")
    p.add_argument("--large-seconds", type=float, help="length of each 640x360 video (default 60, quick 8)")
    p.add_argument("--batch-sizes", default=None, help="model batch sizes, comma separated (16,32,64,128)")
    p.add_argument(
        "--no-trim-row", action="store_true", help="skip the Dask run with MALLOC_TRIM_THRESHOLD_=65536"
    )
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.torch_threads)
    from pipeline.extract import ExtractConfig, cached_students
    from pipeline.synth import SynthConfig

    quick = args.quick
    synth_cfg = SynthConfig(
        videos=args.synth_videos or (2 if quick else 4),
        classes=2,
        seed=11,
        min_s=8.0 if quick else 30.0,
        max_s=12.0 if quick else 60.0,
    )
    large = {
        "videos": args.large_videos or (1 if quick else 2),
        "seconds": args.large_seconds or (8.0 if quick else 60.0),
        "width": 640,
        "height": 360,
    }
    batch_sizes = [int(b) for b in (args.batch_sizes or ("16,64" if quick else "16,32,64,128")).split(",")]
    work = args.work / NAME
    corpora = [
        ("(a) synthetic 160x120, mixed formats", synth_corpus(work / "synth", synth_cfg)),
        (
            f"(b) {large['width']}x{large['height']} H.264 + AAC 48 kHz stereo, {large['seconds']:g} s each",
            large_corpus(work / "large", **large),
        ),
    ]
    config = ExtractConfig(students=STUDENTS, torch_threads=args.torch_threads)
    info = machine()
    t_start = time.perf_counter()

    students = cached_students(STUDENTS, "cpu")[0]  # the object the serial extraction uses
    log("models alone (random input) ...")
    rates = models_alone(students, batch_sizes, min_steps=64 if quick else 256)
    best_batch = max(rates, key=rates.get)
    results = []
    for i, (label, manifest) in enumerate(corpora):
        results.append(run_corpus(label, manifest, work / f"run-{i}", config, students, rates[best_batch]))
    variants = [False] + ([] if args.no_trim_row else [True])
    for trim in variants:
        for r, rate in zip(results, dask_runs(corpora, work, config, trim=trim), strict=True):
            key = "dask1_malloc_trim" if trim else "dask1"
            r[f"extraction_{key}_steps_per_s"] = rate
            r[f"{key}_over_limit"] = rate / r["limit_of_parts_steps_per_s"]

    def col(key: str) -> list[Any]:
        return [r.get(key) for r in results]

    def ratios(num: str, den: str) -> list[str]:
        return [ratio(r.get(num), r.get(den)) for r in results]

    headers = ["steps/s"] + [r["label"] for r in results]
    rows = [
        ["videos / steps"] + [f"{r['videos']} / {r['steps']}" for r in results],
        ["extraction, serial"] + col("extraction_serial_steps_per_s"),
        ["extraction, Dask LocalCluster 1 worker"] + col("extraction_dask1_steps_per_s"),
        ["  same, Dask's MALLOC_TRIM_THRESHOLD_=65536"] + col("extraction_dask1_malloc_trim_steps_per_s"),
        ["decoding alone (frames + audio)"] + col("decode_alone_steps_per_s"),
        [f"models alone (batch {best_batch})"] + col("models_alone_best_steps_per_s"),
        ["limit of parts, 1 / (1/decode + 1/models)"] + col("limit_of_parts_steps_per_s"),
        ["naive (full decode, batch 1)"] + col("naive_steps_per_s"),
        ["serial / limit"] + ratios("extraction_serial_steps_per_s", "limit_of_parts_steps_per_s"),
        ["Dask / limit"] + ratios("extraction_dask1_steps_per_s", "limit_of_parts_steps_per_s"),
        ["Dask with MALLOC_TRIM_THRESHOLD_ / limit"]
        + ratios("extraction_dask1_malloc_trim_steps_per_s", "limit_of_parts_steps_per_s"),
        ["serial / naive"] + ratios("extraction_serial_steps_per_s", "naive_steps_per_s"),
    ]
    if args.no_trim_row:
        rows = [row for row in rows if "trim" not in row[0].lower()]
    text, md = table(headers, rows)
    b_headers = ["piece"] + [h for r in results for h in (f"{r['label'][:3]} s", f"{r['label'][:3]} %")]
    b_rows = []
    for piece in BREAKDOWN_ORDER:
        row: list[Any] = [piece]
        for r in results:
            sec = r["breakdown"]["seconds"][piece]
            row += [fmt(sec, 2), fmt(100 * sec / r["breakdown"]["task_seconds"], 1)]
        b_rows.append(row)
    b_rows.append(
        ["total (task phase)"]
        + [v for r in results for v in (fmt(r["breakdown"]["task_seconds"], 2), "100.0")]
    )
    b_text, b_md = table(b_headers, b_rows)
    m_text, m_md = table(["batch", "steps/s"], [[b, rates[b]] for b in batch_sizes])

    verdict = "Targets (within 20% of the limit of parts; several times faster than naive): " + "; ".join(
        f"{r['label'][:3]} serial at {r['serial_over_limit']:.0%} of the limit and "
        f"{r['serial_over_naive']:.1f}x naive"
        for r in results
    )
    print(f"\nExtraction throughput, steps/s ({machine_line(info)})\n")
    print(text)
    print(f"\n{verdict}")
    print("\nModels alone (Students.embed on random input), steps/s\n")
    print(m_text)
    print("\nWhere the time goes (instrumented serial extraction)\n")
    print(b_text)
    wall = time.perf_counter() - t_start
    print(f"\nbenchmark wall time {wall:.0f} s{' (quick: tiny sizes, noisy)' if quick else ''}")

    markdown = "\n".join(
        [
            f"**Extraction throughput** (steps/s; paper students, CPU, {args.torch_threads} torch thread(s); "
            f"{machine_line(info)}{'; QUICK run' if quick else ''})",
            "",
            md,
            "",
            "Limit of parts = 1 / (1/decode + 1/models) for one worker; naive = decode every frame, "
            "batch-1 students, one .npy per video.",
            "",
            verdict,
            "",
            "**Where extraction time goes** (seconds in the task phase, instrumented serial run)",
            "",
            b_md,
        ]
    )
    data = {
        "benchmark": NAME,
        "quick": quick,
        "machine": info,
        "config": {
            "students": STUDENTS,
            "extract": config.to_dict(),
            "synthetic": asdict(synth_cfg),
            "large": large,
            "batch_sizes": batch_sizes,
        },
        "models_alone_steps_per_s": rates,
        "best_batch": best_batch,
        "corpora": results,
        "wall_s": wall,
    }
    j, m = write_results(NAME, args.out, data, markdown)
    log(f"wrote {j} and {m}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()

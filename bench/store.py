"""Feature stores: bytes per video-minute, opening a 10^6-video store, and training-read throughput.

1. **Size**: real step features (the paper students, ``random:0``, extracted from a synthetic corpus; their
   post-ReLU sparsity is what compression sees) written to Zarr (float16 / float32 x blosc-lz4hc / zstd /
   none) and HDF5 (float16 / float32 x none / gzip), against the reference layout (one float32 ``.npy``
   per video and feature type). Bytes per video-minute (112.5 steps), per feature type and for the whole
   store.
2. **Open at scale**: a store whose index holds 10^6 videos (2 steps each, so the arrays stay small),
   measured in a fresh process: open, index load, first lookup (``store.video``), ``read_video``, and the
   same lookup by a plain ``zarr`` / ``h5py`` reader.
3. **Training reads**: random batches of whole videos (100-500 steps; image + audio features and the
   valid mask), from Zarr / HDF5 stores and from per-video ``.npy`` files: videos/s and MB/s of float32
   features delivered. Files were just written, so this reads from the page cache (decode and per-file
   costs, not the disk).

4. **Integrity** (format 2): write and read throughput with and without checksums (zarr crc32c, HDF5
   fletcher32), both formats; reads also without any verification (the raw backend read, what a format-1
   store did); then ``l2l store check`` full and ``--quick`` on that store and on a store indexing 10^6
   videos (1 step each, 16-d features, ~490 tasks with extraction-like marker results).
   ``--integrity-only`` runs just this part and writes ``store_integrity.{json,md}``.

Run from the repository root: ``.venv/bin/python bench/store.py [--quick] [--integrity-only]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    REPO,
    fmt,
    folder_bytes,
    fresh,
    log,
    machine,
    machine_line,
    parser,
    ratio,
    synth_corpus,
    table,
    write_results,
)

NAME = "store"
STUDENTS = "random:0"
from indexing.grid import STEP_S  # noqa: E402

STEPS_PER_MINUTE = 60 / STEP_S  # 112.5
DIM = 512
REFERENCE_NOTE = (
    "design.md: the public implementation's per-video .npy layout takes 1.25 GB per feature type "
    "for 2,000 videos (float32)"
)


# ---- real features -------------------------------------------------------------------------------------


def real_features(work: Path, synth_cfg: Any) -> dict[str, np.ndarray]:
    """Valid rows of ``image``, ``audio``, ``fused`` (float32) extracted from a synthetic corpus (cached)."""
    from indexing.stores import open_store
    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.extract import ExtractConfig, run_extraction

    manifest = synth_corpus(work / "synth", synth_cfg)
    cache = work / "features.npz"
    stamp = work / "features.json"
    spec = {"synth": json.loads(json.dumps(asdict(synth_cfg))), "students": STUDENTS}
    if cache.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == spec:
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    log("extracting real features for the size measurement (paper students, 2 workers) ...")
    store_path = fresh(work / "features-store")
    config = ExtractConfig(students=STUDENTS, dtype="float32")
    cluster = ClusterConfig(kind="local", dashboard_address=None)
    with open_client(cluster, announce=lambda _line: None) as client:
        report = run_extraction(manifest, store_path, config, client=client, log=lambda _line: None)
    log(f"  {report.steps_run} steps at {report.steps_per_s:.1f} steps/s")
    with open_store(store_path) as store:
        valid = store.read_rows("valid", 0, store.rows)
        feats = {
            n: store.read_rows(n, 0, store.rows)[valid].astype(np.float32)
            for n in ("image", "audio", "fused")
        }
    np.savez(cache, **feats)
    stamp.write_text(json.dumps(spec))
    return feats


def records_for(lengths: list[int], prefix: str = "v") -> list[Any]:
    from indexing.stores import VideoRecord

    first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    return [
        VideoRecord(
            video_id=f"{prefix}{i:07d}",
            path=f"/data/{prefix}{i:07d}.mp4",
            first_row=int(first[i]),
            steps=int(n),
            duration_s=n * STEP_S,
            fps=30.0,
            has_audio=True,
            status="ok",
            label=f"class{i % 10}",
            split="train",
        )
        for i, n in enumerate(lengths)
    ]


def row_arrays(rows: int, lengths: list[int]) -> dict[str, np.ndarray]:
    time_s = np.concatenate([np.arange(n) * STEP_S for n in lengths]) if lengths else np.zeros(0)
    return {"valid": np.ones(rows, bool), "audio_valid": np.ones(rows, bool), "time_s": time_s}


# ---- 1. size -------------------------------------------------------------------------------------------


def feature_bytes(path: Path, fmt_name: str) -> dict[str, int]:
    """Bytes on disk of each feature array."""
    if fmt_name == "zarr":
        return {n: folder_bytes(path / "features" / n) for n in ("image", "audio", "fused")}
    import h5py

    out = dict.fromkeys(("image", "audio", "fused"), 0)
    for part in sorted((path / "parts").glob("*.h5")):
        with h5py.File(part, "r") as f:
            for n in out:
                out[n] += f[f"features/{n}"].id.get_storage_size()
    return out


def measure_size(work: Path, feats: dict[str, np.ndarray], *, chunk_rows: int) -> list[dict[str, Any]]:
    from indexing.stores import get_store

    rows = (len(feats["image"]) // chunk_rows) * chunk_rows
    lengths, left = [], rows
    while left > 0:  # videos of about a minute
        n = min(left, 112)
        lengths.append(n)
        left -= n
    records = records_for(lengths)
    arrays = {n: feats[n][:rows] for n in ("image", "audio", "fused")} | row_arrays(rows, lengths)
    minutes = rows / STEPS_PER_MINUTE
    out = []
    configs = [("zarr", d, c) for d in ("float16", "float32") for c in ("blosc-lz4hc", "zstd", "none")]
    configs += [("hdf5", d, c) for d in ("float16", "float32") for c in ("none", "gzip")]
    for fmt_name, dtype, comp in configs:
        path = fresh(work / f"size-{fmt_name}-{dtype}-{comp}")
        store = get_store(fmt_name).create(
            path,
            index=records,
            rows=rows,
            chunk_rows=chunk_rows,
            dtype=dtype,
            compression=comp,
            tasks=[(0, rows)],
            attrs={"step_s": STEP_S},
        )
        block = {k: (v.astype(dtype) if k in feats else v) for k, v in arrays.items()}
        t0 = time.perf_counter()
        store.write_rows(0, rows, block)
        store.mark_done(0, rows)
        write_s = time.perf_counter() - t0
        store.close()
        per_feature = feature_bytes(path, fmt_name)
        total = folder_bytes(path)
        out.append(
            {
                "format": fmt_name,
                "dtype": dtype,
                "compression": comp,
                "rows": rows,
                "feature_bytes_per_video_minute": {n: b / minutes for n, b in per_feature.items()},
                "bytes_per_video_minute_per_feature": sum(per_feature.values()) / 3 / minutes,
                "store_bytes_per_video_minute": total / minutes,
                "write_mb_per_s": sum(v.nbytes for v in block.values()) / write_s / 1e6,
            }
        )
        kb = out[-1]["bytes_per_video_minute_per_feature"] / 1e3
        log(f"  {fmt_name} {dtype} {comp}: {kb:.1f} kB per video-minute per feature")
    header = 128  # bytes of a .npy header for a 2-d float32 array
    per_video = [n * DIM * 4 + header for n in lengths]
    out.append(
        {
            "format": "npy (reference layout)",
            "dtype": "float32",
            "compression": "none",
            "rows": rows,
            "bytes_per_video_minute_per_feature": sum(per_video) / minutes,
            "store_bytes_per_video_minute": 3 * sum(per_video) / minutes,
            "files_per_video": 3,
        }
    )
    return out


# ---- 2. open a 10^6-video store ------------------------------------------------------------------------

_OPEN_PROBE = r"""
import json, sys, time
import numpy as np
from indexing.stores import open_store
import zarr, h5py  # imports are not what we measure
path, fmt_name, vid = sys.argv[1], sys.argv[2], sys.argv[3]
t = {}
t0 = time.perf_counter(); store = open_store(path); t["open"] = time.perf_counter() - t0
t0 = time.perf_counter(); store.index_columns(); t["index_load"] = time.perf_counter() - t0
t0 = time.perf_counter(); rec = store.video(vid); t["first_lookup_after_index"] = time.perf_counter() - t0
t0 = time.perf_counter(); data = store.read_video(vid); t["read_video"] = time.perf_counter() - t0
t0 = time.perf_counter(); store.read_video(vid); t["lookup_and_read_warm"] = time.perf_counter() - t0
ok = bool(data["valid"].all()) and data["fused"].shape == (rec.steps, 512)
store.close()
t0 = time.perf_counter()
if fmt_name == "zarr":
    g = zarr.open_group(path, mode="r")
    ids = g["index/video_id"][:]
    i = int(np.flatnonzero(ids == vid)[0])
    first, n = int(g["index/first_row"][i]), int(g["index/steps"][i])
    fused = g["features/fused"][first:first + n]
else:
    with h5py.File(path + "/store.h5", "r") as f:
        ids = f["index/video_id"].asstr()[:]
        i = int(np.flatnonzero(ids == vid)[0])
        first, n = int(f["index/first_row"][i]), int(f["index/steps"][i])
        fused = f["features/fused"][first:first + n]
t["plain_reader_lookup_and_read"] = time.perf_counter() - t0
print(json.dumps({"seconds": t, "ok": ok and fused.shape == (n, 512)}))
"""


def big_store(work: Path, fmt_name: str, videos: int, steps: int) -> tuple[Path, str, float | None]:
    """A store indexing ``videos`` videos of ``steps`` rows; only the chunk of the probed video holds data.
    Reused when one with the same size exists. Returns ``(path, probed video id, creation seconds)``."""
    from indexing.stores import get_store, open_store

    path = work / f"big-{fmt_name}-{videos}"
    target = videos // 2 + 7
    vid = f"v{target:07d}"
    stamp = path / "bench-spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"videos": videos, "steps": steps}:
        return path, vid, None
    rows, chunk = videos * steps, 1024
    start = (target * steps // chunk) * chunk
    stop = min(rows, start + chunk)
    log(f"  creating a {fmt_name} store indexing {videos:,} videos ...")
    t0 = time.perf_counter()
    records = records_for([steps] * videos)
    store = get_store(fmt_name).create(
        fresh(path),
        index=records,
        rows=rows,
        chunk_rows=chunk,
        tasks=[(start, stop)],
        attrs={"step_s": STEP_S},
    )
    rng = np.random.default_rng(0)
    block = {
        n: rng.standard_normal((stop - start, DIM)).astype(np.float16) for n in ("image", "audio", "fused")
    }
    extra = {
        "valid": np.ones(stop - start, bool),
        "audio_valid": np.ones(stop - start, bool),
        "time_s": np.arange(start, stop) * STEP_S,
    }  # mark_done refuses a task that did not write every array
    store.write_rows(start, stop, block | extra)
    store.mark_done(start, stop)
    store.close()
    seconds = time.perf_counter() - t0
    with open_store(path) as check:
        if check.rows != rows:
            raise RuntimeError(f"{path}: {check.rows} rows, expected {rows}")
    stamp.write_text(json.dumps({"videos": videos, "steps": steps}))
    return path, vid, seconds


def measure_open(work: Path, videos: int, steps: int) -> list[dict[str, Any]]:
    out = []
    for fmt_name in ("zarr", "hdf5"):
        path, vid, created = big_store(work, fmt_name, videos, steps)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(
            [sys.executable, "-c", _OPEN_PROBE, str(path), fmt_name, vid],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        if proc.returncode:
            raise RuntimeError(f"open probe failed: {proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        t = res["seconds"]
        t["open_to_first_features"] = (
            t["open"] + t["index_load"] + t["first_lookup_after_index"] + t["read_video"]
        )
        out.append(
            {
                "format": fmt_name,
                "videos": videos,
                "steps_per_video": steps,
                "create_seconds": created,
                "files": sum(len(f) for _, _, f in os.walk(path)),
                "bytes": folder_bytes(path),
                "ok": res["ok"],
                **t,
            }
        )
        log(f"  {fmt_name}: open {t['open']:.3f} s, to first features {t['open_to_first_features']:.2f} s")
    return out


# ---- 3. training reads ---------------------------------------------------------------------------------


def build_read_layouts(
    work: Path, feats: dict[str, np.ndarray], lengths: list[int], *, chunk_rows: int
) -> dict[str, dict[str, Any]]:
    """Zarr f16 zstd, Zarr f32 none, HDF5 f16 none and per-video float32 .npy of the same features."""
    from indexing.stores import get_store

    rows = int(sum(lengths))
    rng = np.random.default_rng(1)
    src = len(feats["image"])
    blocks = {}
    for name in ("image", "audio"):  # real rows, tiled from a random offset per video
        parts = [feats[name][(int(rng.integers(src)) + np.arange(n)) % src] for n in lengths]
        tiled = np.concatenate(parts)  # (rows, 512) float32
        # A 5% multiplicative jitter keeps the zeros (ReLU sparsity) and the value range but breaks the
        # exact repeats of tiling, which a compressor would otherwise exploit.
        blocks[name] = tiled * (1 + 0.05 * rng.standard_normal(tiled.shape, dtype=np.float32))
    records = records_for(lengths)
    layouts: dict[str, dict[str, Any]] = {}
    for label, fmt_name, dtype, comp in (
        ("zarr float16 none + crc32c (default)", "zarr", "float16", "none"),
        ("zarr float16 blosc-lz4hc (default of issue 14 before)", "zarr", "float16", "blosc-lz4hc"),
        ("zarr float16 zstd (old default)", "zarr", "float16", "zstd"),
        ("zarr float32 none", "zarr", "float32", "none"),
        ("hdf5 float16 none (default)", "hdf5", "float16", "none"),
    ):
        path = fresh(work / f"read-{fmt_name}-{dtype}-{comp}")
        store = get_store(fmt_name).create(
            path,
            index=records,
            rows=rows,
            chunk_rows=chunk_rows,
            dtype=dtype,
            compression=comp,
            tasks=[(0, rows)],
            attrs={"step_s": STEP_S},
        )
        feats_written = {n: blocks[n].astype(dtype) for n in blocks}
        feats_written["fused"] = feats_written["image"]  # not read here; mark_done wants every array written
        store.write_rows(0, rows, feats_written | row_arrays(rows, lengths))
        store.mark_done(0, rows)
        store.close()
        layouts[label] = {"kind": "store", "path": path, "bytes": folder_bytes(path)}
    npy = fresh(work / "read-npy")
    npy.mkdir()
    for rec in records:
        for name in ("image", "audio"):
            np.save(
                npy / f"{rec.video_id}_{name}.npy", blocks[name][rec.first_row : rec.first_row + rec.steps]
            )
    layouts["npy float32, one file per video and feature"] = {
        "kind": "npy",
        "path": npy,
        "bytes": folder_bytes(npy),
    }
    default = layouts["zarr float16 none + crc32c (default)"]
    layouts["skim loader (SkimDataset + collate), zarr default"] = {**default, "kind": "skim"}
    layouts["skim loader, in_memory=True, zarr default"] = {**default, "kind": "skim", "in_memory": True}
    return layouts


def read_batches(
    layout: dict[str, Any], records: list[Any], batches: list[np.ndarray]
) -> tuple[int, int, float]:
    """``(videos, float32 feature bytes delivered, seconds)`` reading the batches of video positions."""
    from indexing.stores import open_store

    kind, path = layout["kind"], layout["path"]
    videos = payload = 0
    if kind == "skim":
        from skim.data import SkimDataset, collate

        store = open_store(path)
        t0 = time.perf_counter()
        ds = SkimDataset(
            store, ("image", "audio"), require_label=False, in_memory=layout.get("in_memory", False)
        )
        layout["load_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for batch in batches:
            out = collate([ds[int(i)] for i in batch])
            videos += len(batch)
            payload += int(out["mask"].sum()) * DIM * 4 * 2
        seconds = time.perf_counter() - t0
        store.close()
        return videos, payload, seconds
    store = open_store(path) if kind == "store" else None
    t0 = time.perf_counter()
    for batch in batches:
        for i in batch.tolist():
            rec = records[i]
            if store is not None:
                a, b = rec.first_row, rec.first_row + rec.steps
                image = store.read_rows("image", a, b).astype(np.float32, copy=False)
                audio = store.read_rows("audio", a, b).astype(np.float32, copy=False)
                store.read_rows("valid", a, b)
            else:
                image = np.load(path / f"{rec.video_id}_image.npy")
                audio = np.load(path / f"{rec.video_id}_audio.npy")
            videos += 1
            payload += image.nbytes + audio.nbytes
    seconds = time.perf_counter() - t0
    if store is not None:
        store.close()
    return videos, payload, seconds


def measure_reads(
    work: Path, feats: dict[str, np.ndarray], *, videos: int, batch: int, n_batches: int, chunk_rows: int
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(2)
    lengths = rng.integers(100, 501, videos).tolist()
    log(f"  writing {videos} videos ({sum(lengths):,} steps) in 5 layouts ...")
    layouts = build_read_layouts(work, feats, lengths, chunk_rows=chunk_rows)
    records = records_for(lengths)
    batches = [rng.choice(videos, size=min(batch, videos), replace=False) for _ in range(n_batches)]
    read_batches(layouts["zarr float16 none + crc32c (default)"], records, batches[:1])  # warm imports
    out = []
    for label, layout in layouts.items():
        v, payload, seconds = read_batches(layout, records, batches)
        out.append(
            {
                "layout": label,
                "videos": v,
                "seconds": seconds,
                "videos_per_s": v / seconds,
                "mb_per_s_float32": payload / seconds / 1e6,
                "bytes_on_disk": layout["bytes"],
                "files": sum(len(f) for _, _, f in os.walk(layout["path"])),
                "load_seconds": layout.get("load_seconds"),
            }
        )
        log(f"  {label}: {v / seconds:.0f} videos/s, {payload / seconds / 1e6:.0f} MB/s")
    return out


# ---- 4. integrity -------------------------------------------------------------------------------------


def sparse_features(rows: int, seed: int) -> dict[str, np.ndarray]:
    """float16 rows shaped like the students' for a compressor: post-ReLU image/audio (about half zeros,
    correlated over steps) and signed fused rows. Used where real features are not needed."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("image", "audio", "fused"):
        walk = (
            np.cumsum(rng.standard_normal((rows, DIM), dtype=np.float32) * 0.3, axis=0) % 6 - 3
        )  # (rows, 512)
        x = walk + rng.standard_normal((rows, DIM), dtype=np.float32) * 0.5
        out[name] = (np.maximum(x, 0) if name != "fused" else x).astype(np.float16)
    return out


def measure_checksums(work: Path, *, rows: int, task_rows: int, repeats: int) -> list[dict[str, Any]]:
    """Write / read MB/s of the three feature arrays, with and without checksums, both formats."""
    from indexing.stores import VideoRecord, get_store, open_store

    feats = sparse_features(rows, 3)
    payload = sum(a.nbytes for a in feats.values())  # float16 feature bytes
    tasks = [(a, min(a + task_rows, rows)) for a in range(0, rows, task_rows)]
    index = [VideoRecord(f"t{i}", f"/t{i}.mp4", a, b - a, status="ok") for i, (a, b) in enumerate(tasks)]
    extra = {
        "valid": np.ones(rows, bool),
        "audio_valid": np.ones(rows, bool),
        "time_s": np.arange(rows) * STEP_S,
    }
    out = []
    for fmt_name in ("zarr", "hdf5"):
        for checksums in (True, False):
            best_w, best_first, best_warm, best_raw = (float("inf"),) * 4
            for _ in range(repeats):
                path = fresh(work / f"integrity-{fmt_name}-{checksums}")
                t0 = time.perf_counter()
                store = get_store(fmt_name).create(
                    path, index=index, rows=rows, chunk_rows=1024, tasks=tasks, checksums=checksums
                )
                for a, b in tasks:  # one write_rows + mark_done (which records the files) per task
                    store.write_rows(a, b, {k: v[a:b] for k, v in (feats | extra).items()})
                    store.mark_done(a, b)
                store.close()
                best_w = min(best_w, time.perf_counter() - t0)
                with open_store(path) as store:
                    t0 = time.perf_counter()
                    for name in feats:  # the first read of each file also checks it against its record
                        store.read_rows(name, 0, rows)
                    best_first = min(best_first, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    for name in feats:
                        store.read_rows(name, 0, rows)
                    best_warm = min(best_warm, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    for name in feats:
                        store._read(name, 0, rows)  # no markers, no sizes, no records: a format-1 read
                    best_raw = min(best_raw, time.perf_counter() - t0)
            row = {
                "format": fmt_name,
                "checksums": store_checksums(path),
                "rows": rows,
                "write_mb_per_s": payload / best_w / 1e6,
                "read_first_mb_per_s": payload / best_first / 1e6,
                "read_warm_mb_per_s": payload / best_warm / 1e6,
                "read_raw_mb_per_s": payload / best_raw / 1e6,
                "bytes_on_disk": folder_bytes(path),
            }
            out.append(row)
            log(
                f"  {fmt_name} checksums={row['checksums']}: write {row['write_mb_per_s']:.0f} MB/s, read "
                f"{row['read_first_mb_per_s']:.0f} (first) / {row['read_warm_mb_per_s']:.0f} MB/s, raw "
                f"{row['read_raw_mb_per_s']:.0f} MB/s"
            )
    return out


def measure_codecs(work: Path, *, rows: int, repeats: int) -> list[dict[str, Any]]:
    """The choice the issue asks for: zstd's own frame checksum against the crc32c codec (plain zarr arrays
    of sparse float16 rows, 1024-row chunks): write and read MB/s."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    data = sparse_features(rows, 4)["image"]  # (rows, 512) float16
    variants = {
        "blosc lz4hc 5 + crc32c codec (default of issue 14 before none)": [
            BloscCodec(cname="lz4hc", clevel=5, shuffle="noshuffle"),
            Crc32cCodec(),
        ],
        "zstd 3 (no checksum)": [ZstdCodec(level=3)],
        "zstd 3 + zstd frame checksum (chosen for zstd)": [ZstdCodec(level=3, checksum=True)],
        "zstd 3 + crc32c codec": [ZstdCodec(level=3), Crc32cCodec()],
        "none": [],
        "none + crc32c codec (the default)": [Crc32cCodec()],
    }
    out = []
    for label, codecs in variants.items():
        best_w = best_r = float("inf")
        for _ in range(repeats):
            path = fresh(work / "codec")
            arr = zarr.create_array(
                str(path),
                shape=data.shape,
                chunks=(1024, DIM),
                dtype="float16",
                compressors=codecs,
                fill_value=0,
            )
            t0 = time.perf_counter()
            arr[:] = data
            best_w = min(best_w, time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = arr[:]
            best_r = min(best_r, time.perf_counter() - t0)
            if not np.array_equal(back, data):
                raise RuntimeError(f"{label}: data did not round-trip")
        out.append(
            {
                "codecs": label,
                "write_mb_per_s": data.nbytes / best_w / 1e6,
                "read_mb_per_s": data.nbytes / best_r / 1e6,
            }
        )
        log(
            f"  {label}: write {out[-1]['write_mb_per_s']:.0f} MB/s, read {out[-1]['read_mb_per_s']:.0f} MB/s"
        )
    return out


def measure_slice_reads(work: Path, *, rows: int, videos: int) -> list[dict[str, Any]]:
    """Random whole-video reads (100-500 rows; image + audio + valid) through the verified read path and
    through the raw backend read, from the checksummed stores of :func:`measure_checksums`: videos/s."""
    from indexing.stores import open_store

    rng = np.random.default_rng(5)
    lengths = rng.integers(100, 501, videos)
    starts = rng.integers(0, rows - 500, videos)
    out = []
    for fmt_name in ("zarr", "hdf5"):
        speeds = {}
        for mode in ("verified", "raw", "verified (files checked)"):
            with open_store(work / f"integrity-{fmt_name}-True") as store:
                if mode == "verified (files checked)":
                    store.read_rows("valid", 0, rows)  # every file's record checked once: later reads skip it
                read = store._read if mode == "raw" else store.read_rows
                t0 = time.perf_counter()
                for a, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                    for name in ("image", "audio", "valid"):
                        read(name, a, a + n)
                speeds[mode] = videos / (time.perf_counter() - t0)
        out.append({"format": fmt_name, **{f"videos_per_s_{k.split()[0]}{'_warm' if '(' in k else ''}": v
                                           for k, v in speeds.items()}})  # fmt: skip
        log(f"  {fmt_name} random video reads: " + ", ".join(f"{k} {v:.0f}/s" for k, v in speeds.items()))
    return out


def store_checksums(path: Path) -> str:
    from indexing.stores import open_store

    with open_store(path) as store:
        return store.checksums


def million_index_store(work: Path, videos: int) -> Path:
    """A zarr store indexing ``videos`` videos of 1 step (16-d features), written in 2048-row tasks whose
    markers carry extraction-like per-video results; reused when it exists."""
    from indexing.stores import VideoRecord, get_store

    path = work / f"check-{videos}"
    stamp = path / "bench-spec.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"videos": videos}:
        return path
    log(f"  creating a store indexing {videos:,} videos for store check ...")
    task_rows = 2048
    tasks = [(a, min(a + task_rows, videos)) for a in range(0, videos, task_rows)]
    index = [
        VideoRecord(f"v{i:07d}", f"/data/v{i:07d}.mp4", i, 1, STEP_S, 30.0, True, "ok", label=f"c{i % 10}")
        for i in range(videos)
    ]
    store = get_store("zarr").create(
        fresh(path), index=index, rows=videos, chunk_rows=1024, dim=16, tasks=tasks
    )
    rng = np.random.default_rng(0)
    for a, b in tasks:
        n = b - a
        rows = {k: rng.standard_normal((n, 16)).astype(np.float16) for k in ("image", "audio", "fused")}
        rows |= {"valid": np.ones(n, bool), "audio_valid": np.ones(n, bool), "time_s": np.zeros(n)}
        store.write_rows(a, b, rows)
        result = {
            "videos": [{"pos": i, "video_id": f"v{i:07d}", "status": "ok", "steps": 1} for i in range(a, b)]
        }
        store.mark_done(a, b, result=result)
    store.close()
    stamp.write_text(json.dumps({"videos": videos}))
    return path


def measure_check(paths: dict[str, Path]) -> list[dict[str, Any]]:
    """Seconds of `l2l store check` (library call, fresh process each) full and --quick."""
    out = []
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for label, path in paths.items():
        for quick in (True, False):
            proc = subprocess.run(
                [sys.executable, "-c", _CHECK_PROBE, str(path), "1" if quick else "0"],
                capture_output=True,
                text=True,
                env=env,
                timeout=3600,
            )
            if proc.returncode:
                raise RuntimeError(f"check probe failed: {proc.stderr[-2000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            out.append(
                {"store": label, "mode": "quick" if quick else "full", **res, "bytes": folder_bytes(path)}
            )
            log(
                f"  {label} {'--quick' if quick else 'full'}: {res['seconds']:.2f} s, "
                f"{res['problems']} problems"
            )
    return out


_CHECK_PROBE = """
import json, sys, time
from indexing.stores import open_store
from indexing.stores.tools import check_store
t0 = time.perf_counter()
problems = check_store(sys.argv[1], quick=sys.argv[2] == "1")
seconds = time.perf_counter() - t0
with open_store(sys.argv[1]) as s:
    videos, rows, tasks = len(s.index_columns()["video_id"]), s.rows, len(s.tasks())
out = {"seconds": seconds, "problems": len(problems), "videos": videos, "rows": rows, "tasks": tasks}
print(json.dumps(out))
"""


def integrity(work: Path, *, quick: bool, index_videos: int) -> tuple[dict[str, Any], str, str]:
    """Section 4: data, text and markdown."""
    rows = 16_384 if quick else 131_072
    log(f"4. integrity: checksums on {rows:,} rows per format, store check")
    sums = measure_checksums(work, rows=rows, task_rows=2048, repeats=1 if quick else 3)
    codecs = measure_codecs(work, rows=rows, repeats=1 if quick else 3)
    slices = measure_slice_reads(work, rows=rows, videos=200 if quick else 1000)
    big = million_index_store(work, index_videos)
    checks = measure_check({f"bench store ({rows:,} rows, zarr)": work / "integrity-zarr-True",
                            f"{index_videos:,}-video index store": big})  # fmt: skip
    c_rows = [
        [r["format"], r["checksums"], fmt(r["write_mb_per_s"], 0), fmt(r["read_first_mb_per_s"], 0),
         fmt(r["read_warm_mb_per_s"], 0), fmt(r["read_raw_mb_per_s"], 0), fmt(r["bytes_on_disk"] / 1e6, 1)]
        for r in sums
    ]  # fmt: skip
    c_text, c_md = table(
        [
            "format",
            "checksums",
            "write MB/s",
            "read MB/s (first)",
            "read MB/s (again)",
            "raw read MB/s",
            "MB",
        ],
        c_rows,
    )
    z_text, z_md = table(
        ["zarr codecs", "write MB/s", "read MB/s"],
        [[z["codecs"], fmt(z["write_mb_per_s"], 0), fmt(z["read_mb_per_s"], 0)] for z in codecs],
    )
    v_text, v_md = table(
        ["format", "videos/s verified (first touch)", "videos/s verified (files checked)", "videos/s raw"],
        [[v["format"], fmt(v["videos_per_s_verified"], 0), fmt(v["videos_per_s_verified_warm"], 0),
          fmt(v["videos_per_s_raw"], 0)] for v in slices],
    )  # fmt: skip
    k_rows = [
        [k["store"], k["mode"], k["videos"], k["rows"], k["tasks"], fmt(k["seconds"], 2), k["problems"]]
        for k in checks
    ]
    k_text, k_md = table(["store", "check", "videos", "rows", "tasks", "seconds", "problems"], k_rows)
    head = (
        f"write/read MB/s of float16 features ({rows:,} rows x 3 arrays x 512, 2048-row tasks; best of runs)"
    )
    z_head = f"one array, {rows:,} x 512 float16 rows, 1024-row chunks, plain zarr"
    text = f"Zarr checksum codecs ({z_head})\n\n{z_text}\n\nChecksums: {head}\n\n{c_text}"
    text += f"\n\nRandom video reads (100-500 rows; image + audio + valid)\n\n{v_text}"
    text += f"\n\nstore check\n\n{k_text}"
    md = (
        f"**Zarr checksum codecs** ({z_head})\n\n{z_md}\n\n**Checksums**: {head}\n\n{c_md}\n\n"
        f"**Random whole-video reads** (100-500 rows; image + audio + valid; videos/s; the verified path "
        f"checks each file against its task's record once per open store)\n\n{v_md}\n\n"
        f"**store check** (fresh process)\n\n{k_md}"
    )
    return {"codecs": codecs, "checksums": sums, "video_reads": slices, "check": checks}, text, md


# ---- main ----------------------------------------------------------------------------------------------


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--index-videos", type=int, help="videos in the big index (default 1,000,000; quick 100,000)"
    )
    p.add_argument(
        "--read-videos", type=int, help="videos of 100-500 steps for the read test (600; quick 60)"
    )
    p.add_argument("--batch", type=int, default=256, help="videos per training batch")
    p.add_argument("--batches", type=int, help="batches read per layout (4; quick 2)")
    p.add_argument("--integrity-only", action="store_true", help="run only part 4 (checksums, store check)")
    args = p.parse_args()
    if args.integrity_only:
        work = args.work / NAME
        info = machine()
        t0 = time.perf_counter()
        data, text, md = integrity(work, quick=args.quick, index_videos=args.index_videos or 1_000_000)
        print(f"\nFeature store integrity ({machine_line(info)})\n\n{text}")
        data |= {"benchmark": f"{NAME}_integrity", "quick": args.quick, "machine": info,
                 "wall_s": time.perf_counter() - t0}  # fmt: skip
        j, m = write_results(f"{NAME}_integrity", args.out, data, f"{md}\n\n({machine_line(info)})")
        log(f"wrote {j} and {m}")
        return

    from pipeline.synth import SynthConfig

    quick = args.quick
    synth_cfg = SynthConfig(
        videos=2 if quick else 10,
        classes=2,
        seed=13,
        min_s=10.0 if quick else 40.0,
        max_s=12.0 if quick else 80.0,
    )
    work = args.work / NAME
    info = machine()
    t_start = time.perf_counter()

    feats = real_features(work, synth_cfg)
    chunk = 1024 if len(feats["image"]) >= 1024 else max(8, (len(feats["image"]) // 8) * 8)
    log(f"1. size: {len(feats['image'])} real rows, chunk_rows {chunk}")
    sizes = measure_size(work, feats, chunk_rows=chunk)
    index_videos = args.index_videos or (100_000 if quick else 1_000_000)
    log(f"2. open a store indexing {index_videos:,} videos")
    opens = measure_open(work, index_videos, 2)
    log("3. training reads")
    reads = measure_reads(
        work,
        feats,
        videos=args.read_videos or (60 if quick else 600),
        batch=min(args.batch, 32) if quick else args.batch,
        n_batches=args.batches or (2 if quick else 4),
        chunk_rows=1024,
    )

    npy_row = next(s for s in sizes if s["format"].startswith("npy"))
    s_rows = [
        [
            s["format"],
            s["dtype"],
            s["compression"],
            fmt(s["bytes_per_video_minute_per_feature"] / 1e3, 1),
            fmt(s["store_bytes_per_video_minute"] / 1e3, 1),
            ratio(s["bytes_per_video_minute_per_feature"], npy_row["bytes_per_video_minute_per_feature"]),
            fmt(s.get("write_mb_per_s"), 0),
        ]
        for s in sizes
    ]
    s_text, s_md = table(
        [
            "format",
            "dtype",
            "codec",
            "kB/video-min per feature",
            "kB/video-min whole store",
            "vs npy",
            "write MB/s",
        ],
        s_rows,
    )
    o_rows = [
        [
            o["format"],
            o["videos"],
            o["files"],
            fmt(o["open"], 3),
            fmt(o["index_load"], 2),
            fmt(o["first_lookup_after_index"], 2),
            fmt(o["read_video"], 4),
            fmt(o["open_to_first_features"], 2),
            fmt(o["lookup_and_read_warm"], 4),
            fmt(o["plain_reader_lookup_and_read"], 2),
        ]
        for o in opens
    ]
    o_text, o_md = table(
        [
            "format",
            "videos",
            "files",
            "open s",
            "index load s",
            "id map s",
            "read_video s",
            "open to features s",
            "warm lookup+read s",
            "plain zarr/h5py s",
        ],
        o_rows,
    )
    npy_read = next(r for r in reads if r["layout"].startswith("npy"))
    r_rows = [
        [
            r["layout"],
            r["files"],
            fmt(r["bytes_on_disk"] / 1e6, 0),
            r["videos_per_s"],
            r["mb_per_s_float32"],
            ratio(r["videos_per_s"], npy_read["videos_per_s"]),
            fmt(r["load_seconds"], 2),
        ]
        for r in reads
    ]
    r_text, r_md = table(
        ["layout", "files", "MB on disk", "videos/s", "MB/s (float32)", "vs npy", "set-up s"], r_rows
    )
    wall = time.perf_counter() - t_start
    print(f"\nFeature stores ({machine_line(info)})\n")
    print("Bytes per video-minute (112.5 steps; real features of the paper students)\n")
    print(s_text)
    print(f"({REFERENCE_NOTE})")
    print(f"\nOpening a store that indexes {index_videos:,} videos (fresh process)\n")
    print(o_text)
    batch_note = (
        f"batches of {min(args.batch, 32) if quick else args.batch} random whole videos of 100-500 steps"
    )
    print(f"\nTraining reads: {batch_note}, image + audio (+ valid), warm page cache\n")
    print(r_text)
    print(f"\nbenchmark wall time {wall:.0f} s{' (quick: tiny sizes, noisy)' if quick else ''}")
    markdown = "\n".join(
        [
            f"**Feature store size** (kB per video-minute; {machine_line(info)}"
            f"{'; QUICK run' if quick else ''})",
            "",
            s_md,
            "",
            f"{REFERENCE_NOTE}.",
            "",
            f"**Opening a store that indexes {index_videos:,} videos** (seconds, fresh process)",
            "",
            o_md,
            "",
            f"**Training reads** ({batch_note}; image + audio + valid; warm page cache)",
            "",
            r_md,
        ]
    )
    data = {
        "benchmark": NAME,
        "quick": quick,
        "machine": info,
        "config": {"synthetic": asdict(synth_cfg), "students": STUDENTS, "chunk_rows": chunk},
        "real_rows": len(feats["image"]),
        "size": sizes,
        "open": opens,
        "reads": reads,
        "reference": REFERENCE_NOTE,
        "wall_s": wall,
    }
    j, m = write_results(NAME, args.out, data, markdown)
    log(f"wrote {j} and {m}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()

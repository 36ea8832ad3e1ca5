"""Distillation clip throughput: today's decoding path against grouped decoding and a feature store.

One run measures, on the same synthetic corpus and the same tiny students (batch 16, 16 clips per video,
two epochs each, the second timed, ``l2l distill``'s training loop with 2 DataLoader workers):

- (a0) the path as issue 17 found it: (a) with decord's random access (seek to a keyframe, decode to the
  frame) through a per-worker cache of open readers. It gave wrong pixels on open-GOP files and was
  replaced; it is exact on this corpus's closed GOPs, so it stays here as the baseline the issue measured;
- (a) today's path: a random (video, step) per item, decoded with its 16-frame clip, the live teacher;
- (b) grouped decoding (``--order videos``): whole videos shuffled, each decoded in one pass per batch;
- (c) stored teacher targets (``--teacher-features teacher``): frames still decoded (grouped), no clip,
  no teacher;
- (d) stored inputs and targets (the store's ``inputs`` and ``teacher`` sets): no decoding at all, the
  same clips in the same order as (a); also with the reads in the training process (0 workers);
- the limit of the parts: the students' forward + backward + SGD step alone on in-memory batches;

each as the epoch's clips/s and as the loader's alone (the same loader iterated without training: what
grouped decoding changes, which the live teacher's cost hides in (a) and (b)); the CPU time per clip of the
students' step against the loaders of (c) and (d) read in one process (what decides (c) on a machine whose
cores the loader workers share with training); how the corpus is encoded (frame size, GOP: what decoding
costs); and the disk each feature set of the store costs per minute of video. Usage::

    python bench/distill.py            # ~8 min on 2 loaded cores
    python bench/distill.py --quick    # smoke run
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    folder_bytes,
    log,
    machine,
    machine_line,
    parser,
    ratio,
    synth_corpus,
    table,
    write_results,
)  # noqa: E402,E501
from pipeline.clips import ClipDataset  # noqa: E402

BATCH = 16
CLIPS_PER_VIDEO = 16  # one batch per training video (12 of the 24 train, after the holdout)


class DecordClips(ClipDataset):
    """Path (a0): clips read by decord's random access through a per-process cache of open readers."""

    def _reader(self, v: int, *, keep: bool = True):
        from pipeline.media import StepReader, probe_video

        if self.infos[v] is None:
            self.infos[v] = probe_video(self.entries[v].path)
        readers = self.__dict__.setdefault("_readers", {}).setdefault(os.getpid(), OrderedDict())
        if v not in readers:
            readers[v] = StepReader(self.entries[v].path, info=self.infos[v], size=self.config.size)
            while len(readers) > self.config.open_readers:
                readers.popitem(last=False)[1].close()
        readers.move_to_end(v)
        return readers[v]


def _decord_clips(loaders):
    """``loaders`` with their datasets reading clips as :class:`DecordClips` (path (a0))."""
    for loader in (loaders.train, loaders.val):
        loader.dataset.__class__ = DecordClips  # before the workers start
    return loaders


def _epoch_rate(loaders, teacher, work: Path, name: str) -> float:
    """Clips per second of a distillation epoch, the second of two (the loop's own rate: loading, forward,
    backward, step)."""
    from indexing.distill import DistillConfig, distill
    from indexing.models import build_students

    out = work / f"{name}.pt"
    for old in work.glob(f"{name}.pt*"):  # the model and its .resume state: a fresh run, never a resume
        old.unlink()
    students = build_students("tiny", seed=0)
    config = DistillConfig(epochs=2, batch_size=BATCH, lr=1e-3, seed=0)
    history = distill(students, teacher, loaders.train, loaders.val, config, out)
    return float(history[-1]["clips_per_s"])  # the second epoch: loader workers already running


def _loader_pass(loaders, clock) -> tuple[int, float]:
    """Clips and ``clock`` seconds of the second pass over the training loader alone, nothing trained (the
    workers started in the first)."""
    loader = loaders.train
    for epoch in (0, 1):
        loader.dataset.set_epoch(epoch)
        t0 = clock()
        n = sum(len(batch["video"]) for batch in loader)
        seconds = clock() - t0
    return n, seconds


def _loader_rate(loaders) -> float:
    """Clips per second of the training loader alone (wall time)."""
    n, seconds = _loader_pass(loaders, time.perf_counter)
    return n / seconds


def _limit(steps: int) -> float:
    """Clips per second of the students' forward + backward + SGD step alone, inputs already in memory."""
    import torch
    import torch.nn.functional as F

    from indexing.models import build_students

    students = build_students("tiny", seed=0).train()
    opt = torch.optim.SGD(students.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    frames = torch.randn(BATCH, 3, 112, 112)  # (B, 3, 112, 112)
    mel = torch.randn(BATCH, 1, 101, 40)  # (B, 1, 101, 40)
    target = torch.randn(BATCH, 512)  # (B, 512)

    def step() -> None:
        loss = F.l1_loss(students(frames, mel)["z_ia"], target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - t0)


def _loader_cpu_ms(loaders) -> float:
    """CPU milliseconds per clip of the training loader read in this process (0 workers), second epoch."""
    n, seconds = _loader_pass(loaders, time.process_time)
    return 1000 * seconds / n


def _limit_cpu_ms(steps: int) -> float:
    """CPU milliseconds per clip of the students' forward + backward + step (one thread, 2 warm-up steps
    counted too)."""
    t0 = time.process_time()
    _limit(steps)
    return 1000 * (time.process_time() - t0) / ((steps + 2) * BATCH)


def _encoding(manifest: Path) -> str:
    """How the corpus's first video is encoded: codec, size, GOP (keyframe interval), B-frames, audio."""
    from pipeline.corpus import read_corpus
    from pipeline.media import _video_index, probe_video

    path = read_corpus(manifest)[0].path
    info, index = probe_video(path), _video_index(Path(path))
    keys_at = np.searchsorted(index.ticks, index.key_ticks)  # (K,) frame index of each keyframe
    gop_frames = float(np.median(np.diff(keys_at))) if len(keys_at) > 1 else float(len(index.ticks))
    b_frames = "B-frames" if np.any(np.diff(index.decode_ticks) < 0) else "no B-frames"
    return (
        f"{info.video_codec} {info.width}x{info.height} at {info.fps:.0f} fps, a keyframe every "
        f"{gop_frames:.0f} frames ({gop_frames / info.fps:.1f} s), {b_frames}"
        f", {info.audio_codec} {info.sample_rate} Hz x{info.channels}"
    )


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    import torch

    from indexing.models import load_teacher
    from pipeline.clips import clip_loaders, store_loaders
    from pipeline.extract import ExtractConfig, run_extraction
    from pipeline.synth import SynthConfig

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = machine()
    work = args.work / "distill"
    work.mkdir(parents=True, exist_ok=True)
    videos, min_s, max_s = (8, 6.0, 10.0) if args.quick else (24, 20.0, 40.0)
    synth = SynthConfig(videos=videos, classes=4, seed=3, min_s=min_s, max_s=max_s, mp4_only=True)
    manifest = synth_corpus(work / f"corpus-{videos}", synth)
    store = work / f"store-{videos}"
    if not (store / "zarr.json").exists():
        log(f"extracting {store} with the teacher and inputs feature sets ...")
        config = ExtractConfig(
            students="random:0:tiny", features="image,audio,fused,teacher,inputs", teacher="preset:tiny"
        )
        t0 = time.perf_counter()
        report = run_extraction(manifest, store, config, log=log)
        log(f"  {report.steps} steps in {time.perf_counter() - t0:.1f} s")
    teacher = load_teacher(preset="tiny")[0]
    kw = {
        "with_clips": True,
        "clips_per_video": CLIPS_PER_VIDEO,
        "batch_size": BATCH,
        "workers": 2,
        "seed": 0,
    }

    def c_loaders(**more):
        c = store_loaders(store, teacher_features="teacher", order="videos", **{**kw, **more})
        c.train.dataset.use_inputs = c.val.dataset.use_inputs = False
        return c

    paths = {
        "a0": (lambda: _decord_clips(clip_loaders(manifest, **kw)), teacher),
        "a": (lambda: clip_loaders(manifest, **kw), teacher),
        "b": (lambda: clip_loaders(manifest, order="videos", **kw), teacher),
        "c": (c_loaders, None),
        "d": (lambda: store_loaders(store, teacher_features="teacher", **kw), None),
        "d0": (lambda: store_loaders(store, teacher_features="teacher", **{**kw, "workers": 0}), None),
    }
    from indexing.stores import open_store
    from indexing.stores.points import reader_kind

    with open_store(store) as s:
        kinds = {name: reader_kind(s, name) for name in ("inputs_frame", "inputs_logmel", "teacher")}
    log(f"stored inputs read by: {kinds}")
    rates: dict[str, float] = {}
    loading: dict[str, float] = {}
    limit_steps = 5 if args.quick else 12
    limit_at: dict[str, list[float]] = {}  # the limit measured just before and after each path: load moves
    for key, (make, live_teacher) in paths.items():
        log(f"({key}) limit, loader alone, two epochs, limit again ...")
        before = _limit(limit_steps)
        loading[key] = _loader_rate(make())
        rates[key] = _epoch_rate(make(), live_teacher, work, key)
        limit_at[key] = [before, _limit(limit_steps)]
        load_now = os.getloadavg()[0]
        log(f"  loader {loading[key]:.1f} clips/s, epoch {rates[key]:.1f} clips/s (load {load_now:.1f})")
    log("CPU per clip: the students' step, the loaders of (c) and (d) in this process ...")
    cpu_ms = {
        "limit": _limit_cpu_ms(limit_steps),
        "c": _loader_cpu_ms(c_loaders(workers=0)),
        "d": _loader_cpu_ms(store_loaders(store, teacher_features="teacher", **{**kw, "workers": 0})),
    }
    cpu_ms["limit_again"] = _limit_cpu_ms(limit_steps)
    encoding = _encoding(manifest)
    of_limit = {key: rates[key] / (sum(pair) / 2) for key, pair in limit_at.items()}
    rates["limit"] = float(np.mean([x for pair in limit_at.values() for x in pair]))
    of_limit["limit"] = 1.0

    with open_store(store) as s:
        minutes = sum(r.duration_s for r in s.videos() if r.status == "ok") / 60
        sets = s.feature_sets()
    disk = {
        name: sum(folder_bytes(store / "features" / a) for a in fs["arrays"]) / minutes / 1e6
        for name, fs in sets.items()
    }
    load = os.getloadavg()[0]
    names = {
        "a0": "(a0) as issue 17 found it: random clips by decord's seeks, live teacher",
        "a": "(a) today: random clips decoded in one pass each, live teacher",
        "b": "(b) grouped decoding (--order videos), live teacher",
        "c": "(c) stored teacher targets, frames decoded (grouped)",
        "d": "(d) stored inputs + targets: no decoding",
        "d0": "(d) the same, read in the training process (0 workers)",
        "limit": "limit: students fwd+bwd+step alone (mean of all measurements)",
    }
    rows = [
        [
            names[k],
            rates[k],
            ratio(rates[k], rates["a0"]),
            ratio(rates[k], rates["a"]),
            f"{of_limit[k]:.2f}x",
            loading.get(k, "-"),
            ratio(loading.get(k), loading["a0"]),
            ratio(loading.get(k), loading["a"]),
        ]
        for k in names
    ]
    text, md = table(
        ["path", "clips/s", "vs (a0)", "vs (a)", "of limit", "loader alone clips/s", "vs (a0)", "vs (a)"],
        rows,
    )
    step_ms = (cpu_ms["limit"] + cpu_ms["limit_again"]) / 2
    cpu_text, cpu_md = table(
        ["CPU per clip (one process, one thread)", "ms", "of the students' step"],
        [
            ["students' forward + backward + step (the limit's work)", round(step_ms, 2), "1.00x"],
            [
                "(c) loader: decode frames + audio, log-mel, read targets",
                round(cpu_ms["c"], 2),
                f"{cpu_ms['c'] / step_ms:.2f}x",
            ],
            [
                "(d) loader: read stored inputs + targets",
                round(cpu_ms["d"], 2),
                f"{cpu_ms['d'] / step_ms:.2f}x",
            ],
        ],
    )
    disk_text, disk_md = table(
        ["feature set", "MB per video-minute"], [[name, round(mb, 2)] for name, mb in disk.items()]
    )
    header = (
        f"tiny students, batch {BATCH}, {CLIPS_PER_VIDEO} clips/video, {videos} videos ({minutes:.1f} min), "
        f"2 loader workers, rates of the second epoch, each path against the limit measured just before "
        f"and after it; "
        f"{machine_line(info)}; load {load:.2f} at the end; stored inputs read by {kinds}; corpus: {encoding}"
    )
    print(header)
    print(text)
    print()
    print(cpu_text)
    print()
    print(disk_text)
    write_results(
        "distill",
        args.out,
        {
            "rates_clips_per_s": rates,
            "loader_alone_clips_per_s": loading,
            "limit_before_after_each_path": limit_at,
            "of_limit": of_limit,
            "cpu_ms_per_clip": cpu_ms,
            "corpus_encoding": encoding,
            "disk_mb_per_video_minute": disk,
            "readers": kinds,
            "machine": info,
            "load_end": load,
        },
        f"{header}\n\n{md}\n\n{cpu_md}\n\n{disk_md}\n",
    )


if __name__ == "__main__":
    main()

"""Distillation clip throughput: today's decoding path against grouped decoding and a feature store.

One run measures, on the same synthetic corpus and the same tiny students (batch 16, 8 clips per video,
one epoch each, ``l2l distill``'s training loop with 2 DataLoader workers):

- (a) today's path: a random (video, step) per item, decoded with its 16-frame clip, the live teacher;
- (b) grouped decoding (``--order videos``): whole videos shuffled, each decoded in one pass per batch;
- (c) stored teacher targets (``--teacher-features teacher``): frames still decoded (grouped), no clip,
  no teacher;
- (d) stored inputs and targets (the store's ``inputs`` and ``teacher`` sets): no decoding at all, the
  same clips in the same order as (a);
- the limit of the parts: the students' forward + backward + SGD step alone on in-memory batches.

and the disk each feature set of the store costs per minute of video. Usage::

    python bench/distill.py            # ~6 min on 2 loaded cores
    python bench/distill.py --quick    # smoke run
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

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

BATCH = 16
CLIPS_PER_VIDEO = 8


def _epoch_rate(loaders, teacher, work: Path, name: str) -> float:
    """Clips per second of one distillation epoch (the loop's own rate: loading, forward, backward, step)."""
    from indexing.distill import DistillConfig, distill
    from indexing.models import build_students

    out = work / f"{name}.pt"
    out.unlink(missing_ok=True)
    students = build_students("tiny", seed=0)
    config = DistillConfig(epochs=1, batch_size=BATCH, lr=1e-3, seed=0)
    history = distill(students, teacher, loaders.train, loaders.val, config, out)
    return float(history[-1]["clips_per_s"])


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
    rates: dict[str, float] = {}
    log("(a) today's path ...")
    rates["a"] = _epoch_rate(clip_loaders(manifest, **kw), teacher, work, "a")
    log("(b) grouped decoding ...")
    rates["b"] = _epoch_rate(clip_loaders(manifest, order="videos", **kw), teacher, work, "b")
    log("(c) stored teacher targets ...")
    c = store_loaders(store, teacher_features="teacher", order="videos", **kw)
    c.train.dataset.use_inputs = c.val.dataset.use_inputs = False
    rates["c"] = _epoch_rate(c, None, work, "c")
    log("(d) stored inputs and targets ...")
    rates["d"] = _epoch_rate(store_loaders(store, teacher_features="teacher", **kw), None, work, "d")
    log("(d) with the loading in the training process ...")
    d0 = store_loaders(store, teacher_features="teacher", **{**kw, "workers": 0})
    rates["d0"] = _epoch_rate(d0, None, work, "d0")
    log("limit: students forward + backward alone ...")
    rates["limit"] = _limit(5 if args.quick else 20)

    from indexing.stores import open_store

    with open_store(store) as s:
        minutes = sum(r.duration_s for r in s.videos() if r.status == "ok") / 60
        sets = s.feature_sets()
    disk = {
        name: sum(folder_bytes(store / "features" / a) for a in fs["arrays"]) / minutes / 1e6
        for name, fs in sets.items()
    }
    load = os.getloadavg()[0]
    names = {
        "a": "(a) today: random clips decoded, live teacher",
        "b": "(b) grouped decoding (--order videos), live teacher",
        "c": "(c) stored teacher targets, frames decoded (grouped)",
        "d": "(d) stored inputs + targets: no decoding",
        "d0": "(d) the same, read in the training process (0 workers)",
        "limit": "limit: students fwd+bwd+step alone",
    }
    rows = [[names[k], rates[k], ratio(rates[k], rates["a"]), ratio(rates[k], rates["limit"])] for k in names]
    text, md = table(["path", "clips/s", "vs (a)", "of limit"], rows)
    disk_text, disk_md = table(
        ["feature set", "MB per video-minute"], [[name, round(mb, 2)] for name, mb in disk.items()]
    )
    header = (
        f"tiny students, batch {BATCH}, {CLIPS_PER_VIDEO} clips/video, {videos} videos ({minutes:.1f} min), "
        f"2 loader workers; {machine_line(info)}; load {load:.2f} at the end"
    )
    print(header)
    print(text)
    print()
    print(disk_text)
    write_results(
        "distill",
        args.out,
        {"rates_clips_per_s": rates, "disk_mb_per_video_minute": disk, "machine": info, "load_end": load},
        f"{header}\n\n{md}\n\n{disk_md}\n",
    )


if __name__ == "__main__":
    main()

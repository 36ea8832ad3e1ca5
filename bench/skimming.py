"""Skimming speed: training and evaluation videos/s at batch 256, query latency and batched queries.

Data: a planted-signal feature store (:func:`skim.synthetic.write_planted_store`; the cost of skimming
depends only on the shapes) of videos with 100-500 steps, 512-d image and audio features, float16 zstd
(the extraction default). torch runs with 2 threads (``--threads``).

- **train**: one epoch of :func:`skim.train.train` (the paper recipe: batch 256, crops of 200-500 steps,
  SGD) on every video, reading from the store per video (the default) and with ``in_memory=True``;
  the ``train_videos_per_s`` it records.
- **eval**: the trained model over every video in length-sorted batches of 256
  (:func:`skim.infer.iter_outputs`), from the store and from memory.
- **query**: :func:`skim.query.query` for one video (end to end: checkpoint load, store open, read,
  forward; median of 5) and the same call for all videos (``l2l query --all``), plus one video's
  forward with the model already loaded.

Reference, quoted from ``shared/design.md`` and not measured here: the public implementation trains at
about 40 videos/s and evaluates at about 85 videos/s on this kind of machine (2 CPU cores, torch 2.11,
batch 256, videos of 100-500 steps).

Run from the repository root: ``.venv/bin/python bench/skimming.py [--quick]``.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _common import fmt, fresh, log, machine, machine_line, parser, ratio, table, write_results

NAME = "skimming"
REFERENCE = {"train_videos_per_s": 40.0, "eval_videos_per_s": 85.0}


def planted_store(work: Path, spec: Any) -> tuple[Path, Path]:
    """The planted store and a labels file putting every video in ``train`` (cached by spec)."""
    from skim.synthetic import write_planted_store

    store, labels, stamp = work / "planted", work / "labels-all-train.csv", work / "planted.json"
    want = json.loads(json.dumps(asdict(spec)))
    if store.is_dir() and labels.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return store, labels
    log(f"writing a planted store of {spec.videos} videos ({spec.min_steps}-{spec.max_steps} steps) ...")
    t0 = time.perf_counter()
    out = write_planted_store(fresh(store), spec)
    with open(out["labels"], newline="") as f, labels.open("w", newline="") as g:
        rows = list(csv.DictReader(f))
        w = csv.DictWriter(g, fieldnames=["video_id", "path", "label", "split"])
        w.writeheader()
        for row in rows:
            w.writerow({**row, "split": "train"})
    stamp.write_text(json.dumps(want))
    log(f"  written in {time.perf_counter() - t0:.1f} s")
    return store, labels


def warm_up(threads: int) -> None:
    """One small untimed forward + backward, so lazy initialisation (thread pools, allocator, kernel
    selection) is not charged to the first timed batch."""
    import torch

    from skim.model import create_model

    torch.set_num_threads(threads)
    model = create_model("imgaud_skim", num_classes=10)
    feats = {k: torch.randn(8, 64, 512) for k in ("image", "audio")}  # (B, N, D)
    out = model(feats, torch.ones(8, 64, dtype=torch.bool))
    model.loss(out, torch.zeros(8, dtype=torch.long)).backward()
    with torch.no_grad():
        model.eval()(feats, torch.ones(8, 64, dtype=torch.bool))


def train_epoch(store: Path, labels: Path, out: Path, *, batch: int, threads: int, in_memory: bool) -> float:
    """``train_videos_per_s`` of one epoch of the paper recipe (no validation pass)."""
    from skim.train import TrainConfig, train

    config = TrainConfig(  # a planted store has no students checkpoint: Psi and the classifier from scratch
        epochs=1, batch_size=batch, threads=threads, in_memory=in_memory, val_split="none", init="scratch"
    )
    summary = train(store, fresh(out), labels=labels, config=config, progress=False, log=lambda _line: None)
    return float(summary["history"][-1]["train_videos_per_s"])


def eval_rate(store: Path, ckpt_path: Path, *, batch: int, in_memory: bool) -> tuple[float, int]:
    """``(videos/s, videos)`` of the model over every video, batches of ``batch`` by length."""
    from indexing.stores import open_store
    from skim.checkpoint import load_checkpoint
    from skim.data import SkimDataset
    from skim.infer import iter_outputs

    ckpt = load_checkpoint(ckpt_path)
    with open_store(store) as s:
        ds = SkimDataset(s, ckpt.config.batch_keys, require_label=False, in_memory=in_memory)
        t0 = time.perf_counter()
        videos = 0
        for batch_data, out in iter_outputs(ckpt.model, ds, batch_size=batch):
            out.logits.argmax(1)
            videos += len(batch_data["video_ids"])
        return videos / (time.perf_counter() - t0), videos


def warm_one(store: Path, ckpt_path: Path, video_id: str, *, repeats: int) -> float:
    """Median seconds of one video's read + forward with the model already loaded."""
    from indexing.stores import open_store
    from skim.checkpoint import load_checkpoint
    from skim.data import SkimDataset
    from skim.infer import iter_outputs

    ckpt = load_checkpoint(ckpt_path)
    times = []
    with open_store(store) as s:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            ds = SkimDataset(s, ckpt.config.batch_keys, video_ids=[video_id], require_label=False)
            for _batch, out in iter_outputs(ckpt.model, ds, batch_size=1):
                out.logits.softmax(1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, help="videos in the planted store (512 = 2 batches; quick 48)")
    p.add_argument("--batch", type=int, default=256, help="training and evaluation batch size")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--repeats", type=int, help="repeats of the one-video query (5; quick 2)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from skim.query import query
    from skim.synthetic import PlantedSpec

    quick = args.quick
    spec = PlantedSpec(
        videos=args.videos or (48 if quick else 512),
        classes=10,
        min_steps=100,
        max_steps=250 if quick else 500,
        seed=3,
    )
    work = args.work / NAME
    store, labels = planted_store(work, spec)
    info = machine()
    t_start = time.perf_counter()
    ckpt = work / "skim.pt"
    repeats = args.repeats or (2 if quick else 5)

    warm_up(args.threads)
    log("train, reading from the store ...")
    train_store = train_epoch(store, labels, ckpt, batch=args.batch, threads=args.threads, in_memory=False)
    log(f"  {train_store:.1f} videos/s")
    log("train, in_memory=True ...")
    train_mem = train_epoch(
        store, labels, work / "skim-mem.pt", batch=args.batch, threads=args.threads, in_memory=True
    )
    log(f"  {train_mem:.1f} videos/s")
    log("eval ...")
    eval_store, n_videos = eval_rate(store, ckpt, batch=args.batch, in_memory=False)
    eval_mem, _ = eval_rate(store, ckpt, batch=args.batch, in_memory=True)
    log(f"  {eval_store:.1f} videos/s from the store, {eval_mem:.1f} from memory")

    from indexing.stores import open_store

    with open_store(store) as s:
        ids = s.index_columns()["video_id"].tolist()
    vid = ids[len(ids) // 2]
    log("query one video ...")
    query(store, ckpt, [vid])  # warm imports and the page cache
    one = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        query(store, ckpt, [vid])
        one.append(time.perf_counter() - t0)
    one_s = statistics.median(one)
    warm_s = warm_one(store, ckpt, vid, repeats=repeats)
    log("query all videos ...")
    t0 = time.perf_counter()
    answers = query(store, ckpt, None, batch_size=args.batch)
    all_s = time.perf_counter() - t0
    query_all = len(answers) / all_s

    ref_t, ref_e = REFERENCE["train_videos_per_s"], REFERENCE["eval_videos_per_s"]
    rows = [
        ["train, batch 256, reads from the store", train_store, "40 (quoted)", ratio(train_store, ref_t)],
        ["train, batch 256, in_memory=True", train_mem, "40 (quoted)", ratio(train_mem, ref_t)],
        ["eval, batch 256, reads from the store", eval_store, "85 (quoted)", ratio(eval_store, ref_e)],
        ["eval, batch 256, in memory", eval_mem, "85 (quoted)", ratio(eval_mem, ref_e)],
        ["query --all (end to end)", query_all, "-", "-"],
    ]
    if args.batch != 256:
        rows = [[r[0].replace("256", str(args.batch))] + r[1:] for r in rows]
    text, md = table(["what", "videos/s", "reference videos/s", "vs reference"], rows)
    l_rows = [
        ["query one video, end to end (load checkpoint, open store, read, forward)", fmt(1000 * one_s, 0)],
        ["one video, model loaded (read + forward)", fmt(1000 * warm_s, 1)],
    ]
    l_text, l_md = table(["latency", "ms (median)"], l_rows)
    wall = time.perf_counter() - t_start
    shape = f"{n_videos} videos of {spec.min_steps}-{spec.max_steps} steps, {args.threads} torch threads"
    print(f"\nSkimming speed ({shape}; {machine_line(info)})\n")
    print(text)
    print()
    print(l_text)
    print("\nReference numbers are the public implementation's, quoted from design.md (not measured here).")
    print(f"\nbenchmark wall time {wall:.0f} s{' (quick: tiny sizes, noisy)' if quick else ''}")
    markdown = "\n".join(
        [
            f"**Skimming speed** ({shape}; {machine_line(info)}{'; QUICK run' if quick else ''})",
            "",
            md,
            "",
            l_md,
            "",
            "Reference: the public implementation on this kind of machine, quoted from design.md "
            "(not measured here).",
        ]
    )
    data = {
        "benchmark": NAME,
        "quick": quick,
        "machine": info,
        "config": {"planted": asdict(spec), "batch": args.batch, "threads": args.threads},
        "videos": n_videos,
        "train_videos_per_s": {"store": train_store, "in_memory": train_mem},
        "eval_videos_per_s": {"store": eval_store, "in_memory": eval_mem},
        "query_all_videos_per_s": query_all,
        "query_one_video_s": one_s,
        "one_video_model_loaded_s": warm_s,
        "reference_quoted": REFERENCE,
        "wall_s": wall,
    }
    j, m = write_results(NAME, args.out, data, markdown)
    log(f"wrote {j} and {m}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()

"""Throughput of skimming on this machine: loader, training step, evaluation and query latency.

Run ``python -m skim.bench --out /tmp/skim-bench`` (add ``--threads 1`` on a busy machine). It writes a
planted store of 512-d features (videos of 100-500 steps), then measures, each on its own:

- loader: videos/s of one training epoch of the data pipeline alone (crops of 200-500 steps, batch 256),
  reading per video and with ``in_memory``;
- train: videos/s of the training step alone (forward, backward, SGD) on batches already in memory, and
  its CPU seconds per video (wall time on a shared machine also counts other jobs);
- epoch: videos/s of a real training epoch (loader + step), reading in the training process and in one
  DataLoader worker process;
- eval: videos/s of the model in eval mode over whole videos (batch 64, length-sorted);
- query: seconds for ``query`` of one video and of every video, checkpoint loading included.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from indexing.stores import open_store

from .checkpoint import save_checkpoint
from .data import CropBatchSampler, LengthBatchSampler, SkimDataset, make_loader
from .model import create_model
from .synthetic import PlantedSpec, write_planted_store


def run_benchmark(
    out: str | Path, *, videos: int = 512, batch_size: int = 256, threads: int | None = None
) -> dict[str, Any]:
    """Measure and return the numbers described in the module docstring (writes a store under ``out``)."""
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out)
    store_path = out / f"store-{videos}"
    if not store_path.exists():
        spec = PlantedSpec(videos=videos, classes=50, min_steps=100, max_steps=500, dim=512, chunk_rows=1024)
        write_planted_store(store_path, spec)
    store = open_store(store_path)
    keys = ("image", "audio")
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "batch_size": batch_size, "videos": videos}

    for in_memory in (False, True):
        t0 = time.perf_counter()
        ds = SkimDataset(store, keys, split=None, require_label=False, with_time=False, in_memory=in_memory)
        load_s = time.perf_counter() - t0
        sampler = CropBatchSampler(ds.steps, batch_size=batch_size, crop_min=200, crop_max=500, seed=0)
        t0 = time.perf_counter()
        seen = sum(len(b["video_ids"]) for b in make_loader(ds, sampler))
        name = "loader_in_memory" if in_memory else "loader"
        result[f"{name}_videos_per_s"] = seen / (time.perf_counter() - t0)
        if in_memory:
            result["in_memory_load_s"] = load_s

    ds = SkimDataset(store, keys, require_label=False, with_time=False)
    sampler = CropBatchSampler(ds.steps, batch_size=batch_size, crop_min=200, crop_max=500, seed=0)
    batches = list(make_loader(ds, sampler))
    torch.manual_seed(0)
    model = create_model("imgaud_skim", num_classes=50)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    labels = torch.randint(0, 50, (batch_size,))

    def step(batch: dict[str, Any]) -> int:
        o = model(batch["features"], batch["mask"])
        loss = model.loss(o, labels[: len(batch["video_ids"])])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return len(batch["video_ids"])

    step(batches[0])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    seen = sum(step(b) for b in batches)
    result["train_step_videos_per_s"] = seen / (time.perf_counter() - t0)
    # CPU seconds of this process per video: on a shared machine, wall time also counts other jobs.
    result["train_step_cpu_s_per_video"] = (time.process_time() - c0) / seen
    result["train_padded_steps_per_batch"] = [int(b["mask"].shape[1]) for b in batches]

    for workers in (0, 1):
        t0 = time.perf_counter()
        seen = sum(step(b) for b in make_loader(ds, sampler, num_workers=workers))
        result[f"train_epoch_workers{workers}_videos_per_s"] = seen / (time.perf_counter() - t0)

    eval_ds = SkimDataset(store, keys, require_label=False)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        seen = sum(
            len(b["video_ids"])
            for b in make_loader(eval_ds, LengthBatchSampler(eval_ds.steps, batch_size=64))
            if model(b["features"], b["mask"]) is not None
        )
    result["eval_videos_per_s"] = seen / (time.perf_counter() - t0)

    from .query import query
    from .train import TrainConfig

    ckpt = out / "bench.pt"
    save_checkpoint(
        ckpt,
        {
            "format": "l2l-skim",
            "version": 1,
            "model": "imgaud_skim",
            "config": model.config.to_dict(),
            "train_config": TrainConfig().to_dict(),
            "labels": [f"class{c}" for c in range(50)],
            "features": {"index": list(keys), "recognition": list(keys), "recognition_store": None},
            "store": {},
            "epoch": 0,
            "history": [],
            "state_dict": model.state_dict(),
        },
    )
    first = ds.entries[0].video_id
    t0 = time.perf_counter()
    query(store_path, ckpt, [first])
    result["query_one_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers = query(store_path, ckpt, None)
    result["query_all_s"] = time.perf_counter() - t0
    result["query_all_videos"] = len(answers)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Work directory (the generated store is reused).")
    parser.add_argument("--videos", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    print(
        json.dumps(
            run_benchmark(args.out, videos=args.videos, batch_size=args.batch_size, threads=args.threads),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

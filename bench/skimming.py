"""Skimming speed: reads, training, evaluation and queries from the store against memory and a naive loop.

Data: a planted-signal feature store (:func:`skim.synthetic.write_planted_store`; the cost of skimming
depends only on the shapes) of 1,000 videos of 100-500 steps, 512-d image and audio features, 200 classes,
in both store formats with their defaults (zarr float16 raw + crc32c, HDF5 float16 + fletcher32),
format 2 (checksums verified on every read), a zarr copy in blosc-lz4hc (the default before; reads only),
plus the public reference's layout: one float32 ``.npy`` per video and feature. The planted features are
Gaussian noise, which no codec compresses much: the MB on disk column is not what real features take
(bench/store.py is). torch runs with 2 threads (``--threads``). Every measurement runs in its own fresh
process, so its peak RSS is its own; rates are also given per CPU-second of that process, which the load
of other users changes less than wall time.

- **reads**: batches of 256 whole videos (image + audio): per video (``read_rows``, the old loader), grouped
  by chunk (:func:`indexing.stores.reading.read_many`, each chunk decoded once per batch), in block-shuffled
  order over an epoch with the chunk cache training sizes (what ``--shuffle block`` reads), the ``.npy``
  files and memory; warm page cache and cold (the files evicted with ``posix_fadvise(DONTNEED)`` first).
- **train**: one epoch of :func:`skim.train.train` (batch 256, crops of 200-500 steps, SGD) from each store
  with block shuffling and length buckets, the same from memory (the limit), the store with the plain
  shuffle, and a naive loop in the reference's manner measured in the same run: random batches, per-video
  float32 ``.npy`` reads in the loop (the reference overlaps them in DataLoader workers: the profile table
  gives their share), each batch cropped to one random length in 200-500 and padded to its longest video,
  one mask shared by both modalities, SGD. It runs twice: with our model (which already projects keys of
  valid rows only and defers key gradients, so it shares those savings), and with
  :func:`reference_manner_model`, our own stand-in that computes as the public reference's model does
  (keys over every padded position by Conv2d + BatchNorm2d, ten full steps with a per-step head, weight
  norm recomputed per step, four full-bank mixtures per step, float-mask arithmetic, plain autograd); the
  ratio to it is the one the issue's ">= 2x the reference loop" asks for.
- **eval**: the trained model over every video (:func:`skim.infer.iter_outputs`) from each store and from
  memory, against the model's forward alone on batches already in memory at its best batch size (the
  compute limit of this CPU), with the GFLOP/s reached.
- **query**: one 500-step video with the model loaded (read + forward, the warm-process latency), the
  forward alone per precision (fp32; bf16 where the CPU has native bf16, opt-in since near-tied picks may
  differ) and per thread count (1 and ``--threads``), beside the floor of reading every per-step weight
  once per recurrent step (batch 1 is bound by memory bandwidth), one ``query()`` end to end, and
  ``l2l query --all --out`` (JSON Lines, streamed) with its peak RSS. Every process runs with
  ``OMP_WAIT_POLICY=PASSIVE``, as ``l2l`` does.
- **profile**: the share of a training and an evaluation epoch spent reading + collating (the loader alone
  over the same batches) against compute.

Run from the repository root: ``.venv/bin/python bench/skimming.py [--quick]``.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from _common import fmt, fresh, log, machine, machine_line, parser, ratio, table, write_results

NAME = "skimming"
KEYS = ("image", "audio")
READ_STORES = {  # reads are measured on each: the defaults, and zarr's default before (raw since issue 14)
    "zarr": "zarr (default: float16, none + crc32c)",
    "zarr-lz4hc": "zarr float16 blosc-lz4hc + crc32c (default before)",
    "hdf5": "hdf5 (default: float16, fletcher32)",
}


# ---- inputs ----------------------------------------------------------------------------------------------


def planted_stores(work: Path, spec: Any) -> dict[str, Path]:
    """The planted store in each format, and the npy layout (cached by spec)."""
    from indexing.stores.zarr_store import DEFAULT_COMPRESSION
    from skim.synthetic import write_planted_store

    out = {}
    want = json.loads(json.dumps({**asdict(spec), "zarr_default": DEFAULT_COMPRESSION}))
    for fmt_name in ("zarr", "hdf5"):
        store, stamp = work / f"planted-{fmt_name}", work / f"planted-{fmt_name}.json"
        if not (store.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == want):
            log(f"writing a planted {fmt_name} store of {spec.videos} videos ...")
            t0 = time.perf_counter()
            write_planted_store(fresh(store), spec, store_format=fmt_name)
            stamp.write_text(json.dumps(want))
            log(f"  written in {time.perf_counter() - t0:.1f} s")
        out[fmt_name] = store
    lz4hc, stamp = work / "planted-zarr-lz4hc", work / "planted-zarr-lz4hc.json"
    if not (lz4hc.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == want):
        from indexing.stores.tools import export_store

        log("copying the planted zarr store with blosc-lz4hc (the default before) ...")
        export_store(out["zarr"], fresh(lz4hc), "zarr", compression="blosc-lz4hc")
        stamp.write_text(json.dumps(want))
    out["zarr-lz4hc"] = lz4hc
    npy, stamp = work / "npy", work / "npy.json"
    want = json.loads(json.dumps(asdict(spec)))  # the npy files do not depend on the store's codec
    if not (npy.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == want):
        import numpy as np

        from indexing.stores import open_store

        log("writing the per-video float32 .npy layout ...")
        fresh(npy).mkdir(parents=True)
        with open_store(out["zarr"]) as s:
            cols = s.index_columns()
            for vid, first, steps in zip(
                cols["video_id"].tolist(), cols["first_row"], cols["steps"], strict=True
            ):
                for key in KEYS:
                    np.save(
                        npy / f"{vid}_{key}.npy",
                        s.read_rows(key, int(first), int(first + steps)).astype(np.float32),
                    )
        stamp.write_text(json.dumps(want))
    out["npy"] = npy
    labels = out["labels"] = work / "labels-all-train.csv"  # every video trains (and is evaluated)
    with (work / "planted-zarr.labels.csv").open(newline="") as f, labels.open("w", newline="") as g:
        rows = list(csv.DictReader(f))
        w = csv.DictWriter(g, fieldnames=["video_id", "path", "label", "split"])
        w.writeheader()
        for row in rows:
            w.writerow({**row, "split": "train"})
    return out


def evict(path: Path) -> None:
    """Drop ``path``'s files from the page cache (no root needed for clean pages)."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM (ru_maxrss would carry the parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh spawned process (its own peak RSS, nothing cached from others)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:
        return ex.submit(fn, *args, **kwargs).result()


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ.setdefault("TQDM_DISABLE", "1")


# ---- phases (each in its own process) ---------------------------------------------------------------------


def phase_reads(store_path: str, npy: str, *, batch: int, batches: int, seed: int) -> dict[str, Any]:
    """Videos/s of whole-video batch reads, warm and cold, per method."""
    import numpy as np

    from indexing.stores import open_store
    from indexing.stores.reading import chunk_cache, chunks_touched, read_many
    from skim.data import CropBatchSampler, SkimDataset, block_options

    store = open_store(store_path)
    cols = store.index_columns()
    ids, first, steps = cols["video_id"].tolist(), cols["first_row"], cols["steps"]
    rng = np.random.default_rng(seed)
    random_batches = [rng.permutation(len(ids))[:batch].tolist() for _ in range(batches)]
    n_videos = batch * batches

    def ranges(b):
        return [(int(first[i]), int(first[i] + steps[i])) for i in b]

    def per_video():
        for b in random_batches:
            for key in KEYS:
                for a, z in ranges(b):
                    store.read_rows(key, a, z)

    def grouped():
        for b in random_batches:
            chunk_cache(store).clear()  # decode once per batch, nothing kept from the batch before
            for key in KEYS:
                read_many(store, key, ranges(b))

    ds = SkimDataset(store, KEYS, require_label=False, with_time=False)

    class Cfg:
        shuffle, length_buckets, batch_size = "block", False, batch

    big = 10**6  # crops longer than any video: whole videos
    sampler = CropBatchSampler(
        ds.steps, batch_size=batch, crop_min=big, crop_max=big, seed=seed, **block_options(ds, Cfg)
    )
    block_batches = list(sampler)
    block_videos = sum(len(b) for b in block_batches)

    def block():
        chunk_cache(store).clear()
        for b in block_batches:
            for key in KEYS:
                read_many(
                    store, key, [(ds.entries[i].first_row + a, ds.entries[i].first_row + z) for i, a, z in b]
                )

    def npy_reads():
        for b in random_batches:
            for key in KEYS:
                for i in b:
                    np.load(Path(npy) / f"{ids[i]}_{key}.npy")

    def npy_held():  # a batch's arrays held until the batch is read, as a loader collates them
        for b in random_batches:
            for key in KEYS:
                held = [np.load(Path(npy) / f"{ids[i]}_{key}.npy") for i in b]
                del held

    memory = {key: store.read_rows(key, 0, store.rows) for key in KEYS}

    def in_memory():
        for b in random_batches:
            for key in KEYS:
                for a, z in ranges(b):
                    memory[key][a:z]

    cpu_rates: dict[str, float] = {}

    def timed(fn, videos, cold_dir=None, name=None):
        if cold_dir is not None:
            evict(Path(cold_dir))
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if name is not None:  # warm runs: the best per CPU-second too (other users' load changes it less)
            cpu_rates[name] = max(cpu_rates.get(name, 0.0), videos / max(cpu, 1e-9))
        return videos / wall

    out: dict[str, Any] = {}
    methods = (
        ("per_video", per_video, n_videos, store_path),
        ("grouped", grouped, n_videos, store_path),
        ("block", block, block_videos, store_path),
        ("npy", npy_reads, n_videos, npy),
        ("npy_held", npy_held, n_videos, npy),
    )
    for name, fn, videos, where in methods:
        cold = timed(fn, videos, where)
        fn()  # warm the page cache
        out[name] = {"warm": 0.0, "cold": cold}
    for _ in range(5):  # warm runs interleaved, so a change of load hits every method alike
        for name, fn, videos, _where in methods:
            out[name]["warm"] = max(out[name]["warm"], timed(fn, videos, name=name))
    for name in cpu_rates:
        out[name]["warm_cpu"] = cpu_rates[name]
    out["memory"] = {"warm": timed(in_memory, n_videos), "cold": None}
    if store.name == "zarr" and store._decoder(KEYS[0]) is not None:
        # The codec's own limit: read every chunk file of both features and decode it (one thread, its
        # checksum checked), as videos/s of the corpus's mean length.
        raw = 0
        files = [(key, Path(store_path) / p) for key in KEYS for p in store.files_of(key, 0, store.rows)]
        t0 = time.perf_counter()
        for key, f in files:
            raw += store._decoder(key).decode(f.read_bytes()).nbytes
        wall = time.perf_counter() - t0
        video_bytes = float(np.mean(steps)) * store.dim * np.dtype(store.dtype).itemsize * len(KEYS)
        out["decode_limit"] = {
            "warm": raw / wall / video_bytes,
            "cold": None,
            "mb_per_s": raw / wall / 1e6,
            "codec": store.compression,
        }
    out["disk_mb"] = _feature_disk_mb(store, store_path)
    out["npy_disk_mb"] = sum(os.path.getsize(os.path.join(npy, f)) for f in os.listdir(npy)) / 1e6
    size = store.chunk_rows
    out["chunks_per_video_feature"] = {
        "per_video": sum(chunks_touched([r], size) for b in random_batches for r in ranges(b)) / n_videos,
        "grouped": sum(chunks_touched(ranges(b), size) for b in random_batches) / n_videos,
        "block": sum(
            chunks_touched([(ds.entries[i].first_row, ds.entries[i].first_row + z) for i, _, z in b], size)
            for b in block_batches
        )
        / block_videos,
    }
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def _feature_disk_mb(store: Any, store_path: str) -> float:
    """MB on disk of the image and audio features (what the npy layout holds)."""
    if store.name == "zarr":
        return (
            sum(
                os.path.getsize(os.path.join(r, f))
                for key in KEYS
                for r, _, fs in os.walk(Path(store_path) / "features" / key)
                for f in fs
            )
            / 1e6
        )
    import h5py

    total = 0
    for part in sorted((Path(store_path) / "parts").glob("*.h5")):
        with h5py.File(part, "r") as f:
            total += sum(f[f"features/{key}"].id.get_storage_size() for key in KEYS)
    return total / 1e6


def phase_train(
    store_path: str, labels: str, out: str, *, threads: int, batch: int, profile: bool, **options: Any
) -> dict[str, Any]:
    """One epoch of skim.train: videos/s; with ``profile`` also the loader alone over the same batches."""
    _threads(threads)
    from skim.train import TrainConfig, train

    config = TrainConfig(
        epochs=1, batch_size=batch, threads=threads, val_split="none", init="scratch", **options
    )
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = train(
        store_path, fresh(Path(out)), labels=labels, config=config, progress=False, log=lambda _l: None
    )
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rate = float(summary["history"][-1]["train_videos_per_s"])
    result = {
        "videos_per_s": rate,
        # load-independent: videos per CPU-second of this process (all its threads), set-up included
        "videos_per_cpu_s": rate * wall / cpu,
        "cpu_s": cpu,
        "peak_rss_mb": peak_rss_mb(),
        "train_loss": float(summary["history"][-1]["train_loss"]),
    }
    if profile:
        result["loader_s"], result["videos"] = _loader_epoch_train(store_path, labels, config)
    return result


def _loader_epoch_train(store_path: str, labels: str, config: Any) -> tuple[float, int]:
    from indexing.corpus import read_labels
    from indexing.stores import open_store
    from skim.data import CropBatchSampler, SkimDataset, block_options, label_names, make_loader

    store = open_store(store_path)
    manifest = read_labels(labels)
    names = label_names(store, manifest)
    ds = SkimDataset(
        store, KEYS, labels=manifest, names=names, split="train", with_time=False, in_memory=config.in_memory
    )
    sampler = CropBatchSampler(
        ds.steps,
        batch_size=config.batch_size,
        crop_min=config.crop_min,
        crop_max=config.crop_max,
        seed=config.seed,
        **block_options(ds, config),
    )
    t0 = time.perf_counter()
    videos = sum(len(b["video_ids"]) for b in make_loader(ds, sampler, read_ahead=0))
    return time.perf_counter() - t0, videos


def reference_manner_model(num_classes: int, *, dim: int = 512, hidden: int = 1024, steps: int = 10) -> Any:
    """A skimming model that computes the way the public reference's model does (same sizes, same work), for
    the naive baseline only; written for this benchmark (the reference's code is not copied).

    What it does per batch, as the reference: keys by a 1x1 Conv2d + BatchNorm2d + ReLU over every padded
    position of the ``(B, D, N, 1)`` banks (padding projected and counted in the statistics); the start input
    is the masked mean; then ``steps`` full steps, each: ``Psi`` on the concatenated image and audio inputs,
    a weight-normed LSTMCell whose weights are recomputed from direction and norm at every call, two query
    MLPs (Linear, BatchNorm1d, ReLU, Linear), a per-step class head on ``h``, scores by ``bmm`` against the
    full key banks, masked by ``s * m + (1 - m) * -1e35`` with float masks, softmax, argmax, four ``bmm``
    mixtures over the full padded feature banks (each modality's features under each modality's attention),
    modality attention, and the float masks updated through one-hot products. Prediction: the classifier
    on the mean of the ``steps`` Psi outputs; loss: cross-entropy of that prediction. Plain autograd
    throughout (key gradients of every step, no deferred sums).
    """
    import math

    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.nn.utils.parametrizations import weight_norm

    def mlp() -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
        )

    def key_conv() -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim), nn.ReLU())

    class ReferenceManner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.psi = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
            self.lstm = weight_norm(weight_norm(nn.LSTMCell(dim, hidden), "weight_hh"), "weight_ih")
            self.query_image, self.query_audio = mlp(), mlp()
            self.key_image, self.key_audio = key_conv(), key_conv()
            self.step_head = nn.Linear(hidden, num_classes)
            self.modality = nn.Linear(hidden, 2)
            self.classifier = nn.Linear(dim, num_classes)

        def forward(self, image: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            b, n, _ = image.shape  # (B, N, D) banks, zero-padded; mask (B, N) float, one for both
            keys_i = self.key_image(image.permute(0, 2, 1).unsqueeze(-1)).squeeze(-1)  # (B, D, N)
            keys_a = self.key_audio(audio.permute(0, 2, 1).unsqueeze(-1)).squeeze(-1)  # (B, D, N)
            mask_i, mask_a = mask.clone(), mask.clone()
            count = mask.sum(1, keepdim=True)
            x_i, x_a = image.sum(1) / count, audio.sum(1) / count  # (B, D) mean start
            first = torch.argmax(torch.rand(b, n) + mask, 1)  # a random valid start position, masked out
            pick_i = pick_a = first
            h = c = torch.zeros(b, hidden)
            inputs = []
            for _ in range(steps):
                mask_i = mask_i * (1 - F.one_hot(pick_i, n).float())
                mask_a = mask_a * (1 - F.one_hot(pick_a, n).float())
                u = self.psi(torch.cat([x_i, x_a], 1))  # (B, D)
                h, c = self.lstm(u, (h, c))
                q_i, q_a = self.query_image(h), self.query_audio(h)  # (B, D)
                self.step_head(h)  # the per-step prediction the reference computes at every step
                s_i = torch.bmm(q_i.unsqueeze(1), keys_i).squeeze(1) / math.sqrt(dim)  # (B, N)
                s_a = torch.bmm(q_a.unsqueeze(1), keys_a).squeeze(1) / math.sqrt(dim)
                a_i = (s_i * mask_i + (1 - mask_i) * -1e35).softmax(-1)
                a_a = (s_a * mask_a + (1 - mask_a) * -1e35).softmax(-1)
                pick_i, pick_a = a_i.argmax(1), a_a.argmax(1)
                img_t, aud_t = image.permute(0, 2, 1), audio.permute(0, 2, 1)  # (B, D, N)
                i_by_i = torch.bmm(img_t, a_i.unsqueeze(-1)).squeeze(-1)
                i_by_a = torch.bmm(img_t, a_a.unsqueeze(-1)).squeeze(-1)
                a_by_i = torch.bmm(aud_t, a_i.unsqueeze(-1)).squeeze(-1)
                a_by_a = torch.bmm(aud_t, a_a.unsqueeze(-1)).squeeze(-1)
                beta = self.modality(h).softmax(-1)  # (B, 2)
                x_i = i_by_i * beta[:, :1] + i_by_a * beta[:, 1:]
                x_a = a_by_i * beta[:, :1] + a_by_a * beta[:, 1:]
                inputs.append(u)
            return self.classifier(torch.stack(inputs, 2).mean(2))  # (B, C)

    return ReferenceManner()


def phase_naive(
    npy: str,
    labels: str,
    *,
    threads: int,
    batch: int,
    seed: int,
    crop: tuple[int, int],
    manner: str = "ours",
) -> dict[str, Any]:
    """The reference's data manner: random batches, per-video float32 .npy reads, each batch cropped to one
    random length in ``crop`` and padded to its longest video, one mask for both modalities; SGD (Nesterov
    0.9, wd 1e-4). ``manner="ours"`` trains our SkimModel on these batches; ``"reference"`` trains
    :func:`reference_manner_model` (the reference's way of computing)."""
    _threads(threads)
    import numpy as np
    import torch
    from torch.nn import functional as F

    from indexing import training
    from skim.model import create_model

    with open(labels, newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    names = sorted({r["label"] for r in rows})
    label_of = {r["video_id"]: names.index(r["label"]) for r in rows}
    ids = [r["video_id"] for r in rows]
    torch.manual_seed(seed)
    if manner == "ours":
        model = create_model("imgaud_skim", num_classes=len(names))
    elif manner == "reference":
        model = reference_manner_model(len(names))
    else:
        raise ValueError(f"manner={manner!r}; choose ours or reference")
    model.train()
    opt = training.sgd(
        [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-2}],
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-4,
    )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    t0, cpu0 = time.perf_counter(), time.process_time()
    read_s = 0.0
    for b0 in range(0, len(order), batch):
        r0 = time.perf_counter()
        chosen = [ids[i] for i in order[b0 : b0 + batch]]
        length = int(rng.integers(crop[0], crop[1] + 1))
        feats, lens = {}, []
        for key in KEYS:
            xs = []
            for vid in chosen:
                x = np.load(Path(npy) / f"{vid}_{key}.npy")
                start = int(rng.integers(0, len(x) - length + 1)) if len(x) > length else 0
                xs.append(x[start : start + length])
            lens = [len(x) for x in xs]
            arr = np.zeros((len(xs), max(lens), xs[0].shape[1]), dtype=np.float32)  # (B, N, D)
            for j, x in enumerate(xs):
                arr[j, : len(x)] = x
            feats[key] = torch.from_numpy(arr)
        mask = torch.zeros(len(chosen), max(lens), dtype=torch.bool)  # (B, N): one mask for both
        for j, n in enumerate(lens):
            mask[j, :n] = True
        y = torch.tensor([label_of[v] for v in chosen])
        read_s += time.perf_counter() - r0
        if manner == "ours":
            loss = model.loss(model(feats, mask), y)
        else:
            loss = F.cross_entropy(model(feats["image"], feats["audio"], mask.float()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "videos_per_s": len(ids) / wall,
        "videos_per_cpu_s": len(ids) / cpu,
        "read_s": read_s,
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
    }


def phase_eval(
    store_path: str, ckpt_path: str, *, threads: int, batch: int, in_memory: bool
) -> dict[str, Any]:
    _threads(threads)
    from indexing.stores import open_store
    from skim.checkpoint import load_checkpoint
    from skim.data import SkimDataset, eval_sampler, make_loader
    from skim.infer import iter_outputs

    ckpt = load_checkpoint(ckpt_path)
    with open_store(store_path) as s:
        ds = SkimDataset(s, ckpt.config.batch_keys, require_label=False, in_memory=in_memory)
        t0, cpu0 = time.perf_counter(), time.process_time()
        videos = 0
        for batch_data, out in iter_outputs(ckpt.model, ds, batch_size=batch):
            out.logits.argmax(1)
            videos += len(batch_data["video_ids"])
        rate = videos / (time.perf_counter() - t0)
        per_cpu = videos / (time.process_time() - cpu0)
        rss = peak_rss_mb()
        from indexing.stores.reading import chunk_cache

        chunk_cache(s).clear()
        t0 = time.perf_counter()
        for _ in make_loader(ds, eval_sampler(ds, batch_size=batch), read_ahead=0):
            pass
        loader_s = time.perf_counter() - t0
    return {
        "videos_per_s": rate,
        "videos_per_cpu_s": per_cpu,
        "videos": videos,
        "peak_rss_mb": rss,
        "loader_s": loader_s,
    }


def phase_forward(
    store_path: str, ckpt_path: str, *, threads: int, sizes: list[int], videos: int
) -> dict[str, Any]:
    """The model's forward alone on batches already collated in memory, at each batch size."""
    _threads(threads)
    import torch

    from indexing.stores import open_store
    from skim.checkpoint import load_checkpoint
    from skim.data import LengthBatchSampler, SkimDataset, collate

    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.model.eval()
    with open_store(store_path) as s:
        cols = s.index_columns()
        ds = SkimDataset(
            s,
            ckpt.config.batch_keys,
            require_label=False,
            in_memory=True,
            video_ids=cols["video_id"][:videos].tolist(),
        )
        out = {}
        for size in sizes:
            batches = [collate([ds[i] for i in b]) for b in LengthBatchSampler(ds.steps, batch_size=size)]
            with torch.no_grad():
                model(batches[0]["features"], batches[0]["mask"])  # warm
                t0, cpu0 = time.perf_counter(), time.process_time()
                gflop = 0.0
                for b in batches:
                    o = model(b["features"], b["mask"])
                    lengths = b["mask"].sum(1).tolist()
                    gflop += sum(
                        model.gflops(int(n), int(u))
                        for n, u in zip(lengths, o.steps_used.tolist(), strict=True)
                    )
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            out[size] = {
                "videos_per_s": len(ds) / wall,
                "videos_per_cpu_s": len(ds) / cpu,
                "gflop_per_s": gflop / wall,
            }
            del batches
    return out


def phase_query(
    store_path: str, ckpt_path: str, out: str, *, threads: int, batch: int, repeats: int
) -> dict[str, Any]:
    _threads(threads)
    import numpy as np

    from indexing.stores import open_store
    from skim.checkpoint import load_checkpoint
    from skim.data import SkimDataset
    from skim.infer import iter_outputs
    from skim.query import query, write_jsonl

    ckpt = load_checkpoint(ckpt_path)
    times = []
    with open_store(store_path) as s:
        cols = s.index_columns()
        longest = int(np.argmax(cols["steps"]))
        vid, steps = cols["video_id"][longest], int(cols["steps"][longest])
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            ds = SkimDataset(s, ckpt.config.batch_keys, video_ids=[vid], require_label=False)
            for _batch, o in iter_outputs(ckpt.model, ds, batch_size=1):
                o.logits.softmax(1)
            times.append(time.perf_counter() - t0)
        # Where the one-video latency goes: the forward alone on the collated batch, and the read alone.
        import torch

        from skim.data import collate

        ds = SkimDataset(s, ckpt.config.batch_keys, video_ids=[vid], require_label=False)
        one = collate([ds[0]])
        model = ckpt.model.eval()
        fwd, rd = [], []
        with torch.no_grad():
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                model(one["features"], one["mask"])
                fwd.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                collate(
                    SkimDataset(s, ckpt.config.batch_keys, video_ids=[vid], require_label=False).__getitems__(
                        [0]
                    )
                )
                rd.append(time.perf_counter() - t0)
        # The forward alone per precision and thread count (wall and CPU ms, best and median): batch 1 is
        # bound by reading the per-step weights, so it is reported beside that floor.
        from skim.model import native_bf16

        by_setting = {}
        with torch.inference_mode():
            model.set_precision("fp32")
            fp32_picks = model(one["features"], one["mask"]).chosen
            for precision in ("fp32", "bf16") if native_bf16() else ("fp32",):
                model.set_precision(precision)
                for n_threads in (1, threads):
                    torch.set_num_threads(n_threads)
                    wall, cpu = [], []
                    for _ in range(3 * repeats + 3):
                        t0, c0 = time.perf_counter(), time.process_time()
                        o = model(one["features"], one["mask"])
                        wall.append(time.perf_counter() - t0)
                        cpu.append(time.process_time() - c0)
                    by_setting[f"{precision}, {n_threads} thread(s)"] = {
                        "wall_ms_median": 1000 * statistics.median(wall[3:]),
                        "wall_ms_best": 1000 * min(wall[3:]),
                        "cpu_ms_median": 1000 * statistics.median(cpu[3:]),
                        "same_picks_as_fp32": bool(torch.equal(o.chosen, fp32_picks)),
                    }
                torch.set_num_threads(threads)
            model.set_precision("fp32")
        cfg = model.config
        n_q = len(model.query)
        per_step_weights = (
            4 * cfg.hidden * (cfg.embed + cfg.hidden)
            + n_q * (cfg.hidden * cfg.hidden + cfg.hidden * cfg.dim)
            + (cfg.psi_hidden or cfg.hidden) * (len(cfg.recognition_keys) * cfg.dim + cfg.embed)
        )
        weight_mb = 4 * per_step_weights / 1e6  # fp32 bytes read per recurrent step at batch 1
    warm = statistics.median(times[1:])
    t0 = time.perf_counter()
    query(store_path, ckpt_path, [vid])
    end_to_end = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = write_jsonl(store_path, ckpt_path, fresh(Path(out) / "answers.jsonl"), batch_size=batch)
    all_s = time.perf_counter() - t0
    return {
        "one_video_warm_s": warm,
        "one_video_forward_s": statistics.median(fwd[1:]),
        "one_video_read_s": statistics.median(rd[1:]),
        "one_video_steps": steps,
        "one_video_forward_by_setting": by_setting,
        "per_step_weight_mb_fp32": weight_mb,
        "recurrent_steps": model.config.num_steps - 1,
        "query_end_to_end_s": end_to_end,
        "query_all_videos_per_s": done["written"] / all_s,
        "peak_rss_mb": peak_rss_mb(),
    }


# ---- main ------------------------------------------------------------------------------------------------


def reads_table(reads: dict[str, Any]) -> tuple[str, str]:
    """The reads table (text, markdown) from the ``reads`` results of each store."""
    r_rows = []
    for fmt_name in READ_STORES:
        r = reads[fmt_name]
        npy_w, npy_c = r["npy"]["warm"], r["npy"]["cold"]  # measured in the same process as this store's
        cpv = r["chunks_per_video_feature"]

        def row(label: str, m: dict[str, Any], chunks: str, disk_mb: float, r=r, npy_w=npy_w, npy_c=npy_c):
            """One measured row: warm and cold rates against this store's npy, CPU rates where measured."""
            cpu = m.get("warm_cpu")
            return [
                label,
                m["warm"],
                ratio(m["warm"], npy_w),
                fmt(cpu, 0) if cpu else "-",
                ratio(cpu, r["npy"]["warm_cpu"]) if cpu else "-",
                m["cold"],
                ratio(m["cold"], npy_c),
                chunks,
                fmt(disk_mb, 0),
            ]

        for method, what in (
            ("per_video", "per video (read_rows)"),
            ("grouped", "random batch, each chunk decoded once"),
            ("block", "block-shuffled epoch (what training reads)"),
        ):
            label = f"{READ_STORES[fmt_name]}: {what}"
            r_rows.append(row(label, r[method], fmt(cpv[method], 2), r["disk_mb"]))
        if "decode_limit" in r:
            lim = r["decode_limit"]
            label = f"{READ_STORES[fmt_name]}: decode alone, every chunk once ({lim['mb_per_s']:.0f} MB/s)"
            r_rows.append([label, lim["warm"], ratio(lim["warm"], npy_w), *["-"] * 4, "1 per chunk", "-"])
        if "npy_held" in r:
            label = f"npy float32, a batch's arrays held as a loader collates them (beside {fmt_name})"
            r_rows.append(row(label, r["npy_held"], "-", r["npy_disk_mb"]))
        label = f"npy float32, one file per video and feature, each dropped at once (beside {fmt_name})"
        r_rows.append(row(label, r["npy"], "-", r["npy_disk_mb"]))
    z = reads["zarr"]
    r_rows.append(
        [
            "memory (slices)",
            z["memory"]["warm"],
            ratio(z["memory"]["warm"], z["npy"]["warm"]),
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
        ]
    )
    r_text, r_md = table(
        [
            "reads of 256 whole videos (image + audio)",
            "videos/s warm",
            "vs npy",
            "videos/CPU-s warm",
            "vs npy (CPU)",
            "videos/s cold",
            "vs npy",
            "chunks decoded per video+feature",
            "MB on disk (image+audio)",
        ],
        r_rows,
    )

    return r_text, r_md


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, help="videos in the planted store (1,000; quick 64)")
    p.add_argument("--classes", type=int, help="classes (200; quick 8)")
    p.add_argument("--batch", type=int, default=256, help="training and evaluation batch size")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--reads-only",
        action="store_true",
        help="run only the reads phase; its table goes to <out>/skimming_reads.{md,json} (skimming.* are "
        "left as they are)",
    )
    args = p.parse_args()

    from skim.synthetic import PlantedSpec

    quick = args.quick
    spec = PlantedSpec(
        videos=args.videos or (64 if quick else 1000),
        classes=args.classes or (8 if quick else 200),
        min_steps=100,
        max_steps=500,
        seed=3,
    )
    batch = min(args.batch, 16) if quick else args.batch
    work = args.work / NAME
    work.mkdir(parents=True, exist_ok=True)
    data = planted_stores(work, spec)
    info = machine()
    t_start = time.perf_counter()
    common = {"threads": args.threads, "batch": batch}
    fast = {"shuffle": "block", "length_buckets": True}
    res: dict[str, Any] = {"reads": {}, "train": {}, "eval": {}}

    for fmt_name in READ_STORES:
        log(f"reads, {fmt_name} ...")
        res["reads"][fmt_name] = in_child(
            phase_reads, str(data[fmt_name]), str(data["npy"]), batch=batch, batches=2, seed=1
        )
        log("  " + json.dumps({k: v for k, v in res["reads"][fmt_name].items()}, default=str)[:300])
    if args.reads_only:
        r_text, r_md = reads_table(res["reads"])
        load = f"load {info['load_avg_1m']} at start, {os.getloadavg()[0]:.2f} at end"
        title = f"Reads ({spec.videos} videos, batch {batch}; {machine_line(info)}; {load})"
        print(f"\n{title}\n\n{r_text}")
        if not quick:
            j, m = write_results(
                f"{NAME}_reads", args.out, {"machine": info, "load_end": os.getloadavg()[0], **res["reads"]},
                f"**{title}**\n\n{r_md}",
            )  # fmt: skip
            log(f"wrote {j} and {m}")
        return
    ckpt = work / "train-zarr-fast" / "skim.pt"
    runs = [
        ("zarr, block shuffle + length buckets", "zarr", ckpt, {**fast}, True),
        (
            "memory (limit), same batches",
            "zarr",
            work / "train-mem" / "skim.pt",
            {**fast, "in_memory": True},
            False,
        ),
        ("hdf5, block shuffle + length buckets", "hdf5", work / "train-hdf5" / "skim.pt", {**fast}, False),
        ("zarr, plain shuffle (the default)", "zarr", work / "train-plain" / "skim.pt", {}, False),
    ]
    for label, fmt_name, out, options, profile in runs:
        log(f"train: {label} ...")
        res["train"][label] = in_child(
            phase_train,
            str(data[fmt_name]),
            str(data["labels"]),
            str(out),
            profile=profile,
            **common,
            **options,
        )
        log(f"  {res['train'][label]['videos_per_s']:.1f} videos/s")
    for manner in ("ours", "reference"):
        key = "naive" if manner == "ours" else "naive_reference"
        log(f"train: naive loop (per-video float32 .npy, padded to the longest, one mask), {manner} model")
        res["train"][key] = in_child(
            phase_naive, str(data["npy"]), str(data["labels"]), seed=0, crop=(200, 500), manner=manner,
            **common,
        )  # fmt: skip
        log(f"  {res['train'][key]['videos_per_s']:.1f} videos/s")
    for label, fmt_name, in_memory in (
        ("zarr", "zarr", False),
        ("hdf5", "hdf5", False),
        ("memory", "zarr", True),
    ):
        log(f"eval: {label} ...")
        res["eval"][label] = in_child(
            phase_eval, str(data[fmt_name]), str(ckpt), in_memory=in_memory, **common
        )
        log(f"  {res['eval'][label]['videos_per_s']:.1f} videos/s")
    log("forward alone in memory at each batch size ...")
    sizes = [8, 16] if quick else [32, 64, 256]
    res["forward"] = in_child(
        phase_forward,
        str(data["zarr"]),
        str(ckpt),
        threads=args.threads,
        sizes=sizes,
        videos=min(spec.videos, 512),
    )
    best = max(res["forward"], key=lambda k: res["forward"][k]["videos_per_s"])
    limit = res["forward"][best]
    log(f"  best batch {best}: {limit['videos_per_s']:.1f} videos/s, {limit['gflop_per_s']:.1f} GFLOP/s")
    log("query ...")
    res["query"] = in_child(
        phase_query,
        str(data["zarr"]),
        str(ckpt),
        str(work / "query"),
        threads=args.threads,
        batch=batch,
        repeats=2 if quick else 10,
    )
    wall = time.perf_counter() - t_start
    load_end = os.getloadavg()[0]

    # ---- tables ----
    r_text, r_md = reads_table(res["reads"])

    t = res["train"]
    mem, naive, naive_ref = t["memory (limit), same batches"], t["naive"], t["naive_reference"]
    naive_names = {
        "naive": "naive loop, our model (npy float32, padded to longest, one mask)",
        "naive_reference": "naive loop, reference's model manner (same data; see the docstring)",
    }
    t_rows = [
        [
            naive_names.get(k, k),
            v["videos_per_s"],
            ratio(v["videos_per_s"], mem["videos_per_s"]),
            ratio(v["videos_per_s"], naive["videos_per_s"]),
            ratio(v["videos_per_s"], naive_ref["videos_per_s"]),
            fmt(v["videos_per_cpu_s"], 2),
            ratio(v["videos_per_cpu_s"], mem["videos_per_cpu_s"]),
            ratio(v["videos_per_cpu_s"], naive["videos_per_cpu_s"]),
            ratio(v["videos_per_cpu_s"], naive_ref["videos_per_cpu_s"]),
            fmt(v["peak_rss_mb"], 0),
        ]
        for k, v in t.items()
    ]
    t_text, t_md = table(
        [
            "train, one epoch, batch 256",
            "videos/s",
            "vs memory",
            "vs naive (our model)",
            "vs naive (ref. manner)",
            "videos/CPU-s",
            "vs memory (CPU)",
            "vs naive (our model, CPU)",
            "vs naive (ref. manner, CPU)",
            "peak RSS MB",
        ],
        t_rows,
    )

    e = res["eval"]
    e_rows = [
        [
            f"eval from {k}",
            v["videos_per_s"],
            ratio(v["videos_per_s"], limit["videos_per_s"]),
            fmt(v["videos_per_cpu_s"], 2),
            ratio(v["videos_per_cpu_s"], limit["videos_per_cpu_s"]),
            fmt(v["peak_rss_mb"], 0),
        ]
        for k, v in e.items()
    ]
    for size, v in res["forward"].items():
        e_rows.append(
            [
                f"forward alone, in memory, batch {size}" + (" (limit)" if size == best else ""),
                v["videos_per_s"],
                ratio(v["videos_per_s"], limit["videos_per_s"]),
                fmt(v["videos_per_cpu_s"], 2),
                ratio(v["videos_per_cpu_s"], limit["videos_per_cpu_s"]),
                f"{v['gflop_per_s']:.1f} GFLOP/s",
            ]
        )
    q = res["query"]
    e_rows.append(
        [
            "l2l query --all --out (JSON Lines, zarr)",
            q["query_all_videos_per_s"],
            ratio(q["query_all_videos_per_s"], limit["videos_per_s"]),
            "-",
            "-",
            fmt(q["peak_rss_mb"], 0),
        ]
    )
    e_text, e_md = table(
        [
            "evaluation and query",
            "videos/s",
            "vs forward limit",
            "videos/CPU-s",
            "vs limit (CPU)",
            "peak RSS MB / GFLOP/s",
        ],
        e_rows,
    )

    zt = t["zarr, block shuffle + length buckets"]
    train_s = zt["videos"] / zt["videos_per_s"]
    ze = e["zarr"]
    prof_rows = [
        [
            "train epoch from zarr: loader alone (read + collate), no read-ahead",
            fmt(zt["loader_s"], 2),
            f"{100 * zt['loader_s'] / train_s:.0f}% of the epoch",
        ],
        [
            "eval from zarr: loader alone",
            fmt(ze["loader_s"], 2),
            f"{100 * ze['loader_s'] * ze['videos_per_s'] / ze['videos']:.0f}% of the pass",
        ],
        [
            "naive loop (our model): npy reads + padding",
            fmt(t["naive"]["read_s"], 2),
            f"{100 * t['naive']['read_s'] / t['naive']['wall_s']:.0f}% of the epoch",
        ],
        [
            "naive loop (reference's model manner): npy reads + padding",
            fmt(t["naive_reference"]["read_s"], 2),
            f"{100 * t['naive_reference']['read_s'] / t['naive_reference']['wall_s']:.0f}% of the epoch",
        ],
    ]
    p_text, p_md = table(["where time goes", "s", "share"], prof_rows)
    l_rows = [
        [
            f"one {q['one_video_steps']}-step video, model loaded (read + forward)",
            fmt(1000 * q["one_video_warm_s"], 1),
        ],
        [
            "  of which the model's forward alone (features already collated)",
            fmt(1000 * q["one_video_forward_s"], 1),
        ],
        ["  of which the read + collate alone", fmt(1000 * q["one_video_read_s"], 1)],
        [
            "query() end to end (load checkpoint, open store, read, forward)",
            fmt(1000 * q["query_end_to_end_s"], 0),
        ],
    ]
    for setting, v in q.get("one_video_forward_by_setting", {}).items():
        l_rows.append(
            [
                f"  forward alone, {setting}: median (best; CPU ms)"
                + ("" if v["same_picks_as_fp32"] else " - picks differ from fp32"),
                f"{v['wall_ms_median']:.1f} ({v['wall_ms_best']:.1f}; {v['cpu_ms_median']:.1f})",
            ]
        )
    if "per_step_weight_mb_fp32" in q:
        mb, steps_ = q["per_step_weight_mb_fp32"], q["recurrent_steps"]
        l_rows.append(
            [
                f"  floor: {steps_} steps x {mb:.0f} MB of fp32 weights read per step (bf16: half) "
                "at ~19 GB/s (one core, measured)",
                fmt(1000 * steps_ * mb / 19e3, 1),
            ]
        )
    l_text, l_md = table(["latency", "ms"], l_rows)

    shape = (
        f"{spec.videos} videos of {spec.min_steps}-{spec.max_steps} steps, {spec.classes} classes, "
        f"batch {batch}, {args.threads} torch threads"
    )
    load = f"load {info['load_avg_1m']} at start, {load_end:.2f} at end"
    print(f"\nSkimming speed ({shape}; {machine_line(info)}; {load})\n")
    for text in (r_text, t_text, e_text, p_text, l_text):
        print(text)
        print()
    print(f"benchmark wall time {wall:.0f} s{' (quick: tiny sizes, noisy)' if quick else ''}")
    markdown = "\n".join(
        [
            f"**Skimming speed** ({shape}; {machine_line(info)}; {load}{'; QUICK run' if quick else ''})",
            "",
            r_md,
            "",
            t_md,
            "",
            e_md,
            "",
            p_md,
            "",
            l_md,
        ]
    )
    out = {
        "benchmark": NAME,
        "quick": quick,
        "machine": info,
        "load_avg_1m_end": load_end,
        "config": {"planted": asdict(spec), "batch": batch, "threads": args.threads},
        **res,
        "forward_limit": {"batch": best, **limit},
        "wall_s": wall,
    }
    j, m = write_results(NAME, args.out, out, markdown)
    log(f"wrote {j} and {m}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    # As l2l does (cli.py), before any process loads torch: idle OpenMP threads sleep instead of spinning.
    # Without it, one 500-step query with 2 threads took 190-550 ms at others' load ~3.5 (1 thread: 49 ms).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()

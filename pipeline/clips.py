"""Training clips for ImgAud2Vid: (video, step) samples drawn from the step grid of a corpus.

Each item is one step of one video: its frame, its 1 s of audio, its 16-frame teacher clip (optional)
and the video's label index. The index is a list of ``(video, step)`` pairs, re-drawn every epoch with
at most ``clips_per_video`` steps per video, from a seed and the epoch number only, so an epoch's
samples and order are reproducible (and a resumed run sees the same data). Items are decoded one step
at a time through a few open :class:`pipeline.media.StepReader`; a whole video is never held in memory.

With ground-truth ``moments`` (``moments.json``: ``l2l synth``, ``l2l prepare activitynet``) the steps are
drawn only from inside the annotated segments (a step counts when its midpoint lies in one): trimmed
clips, as the paper's students see on Kinetics. In an untrimmed video most steps are background that
says nothing about the label, so fine-tuning on random steps teaches mostly noise.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from indexing.errors import ConfigError

log = logging.getLogger(__name__)

SAMPLINGS = ("random", "uniform")
ORDERS = ("clips", "videos")
# A video whose random clip may decode more than this much video (a one-pass read starts where decoding is
# exact: an IDR picture or a recovery point) is named in a warning: clip order is exact there but slow;
# grouped order (``videos``) reads each video in one pass.
SLOW_READ_S = 30.0
# Niceness added to DataLoader workers (see _lower_priority).
LOADER_NICE = 5


@dataclass(frozen=True)
class ClipConfig:
    """How clips are drawn from a corpus.

    Attributes:
        clips_per_video: At most this many steps per video per epoch.
        sampling: ``random`` (a fresh random subset of steps each epoch, shuffled across videos: for
            training) or ``uniform`` (evenly spaced steps, fixed order: for validation and reports).
        with_clips: Decode the 16-frame teacher clip too (distillation; not needed for fine-tuning).
        size: Frame side in pixels (frames and clips are resized to ``size x size``).
        seed: Seed of the per-epoch draws.
        open_readers: Videos each loader process keeps open (opening indexes the whole file).
        order: With ``random`` sampling: ``clips`` shuffles all clips of the epoch (the paper's batches of
            unrelated clips); ``videos`` shuffles whole videos and keeps each video's clips together in
            step order, so a batch decodes each of its videos in one sequential pass (grouped decoding:
            several times faster when clips are decoded, at the price of batches from few videos).
    """

    clips_per_video: int = 8
    sampling: str = "random"
    with_clips: bool = True
    size: int = 112
    seed: int = 0
    open_readers: int = 32
    order: str = "clips"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ConfigError(f"Unknown clip order {self.order!r}; available: {', '.join(ORDERS)}")
        if self.clips_per_video < 1:
            raise ConfigError(f"clips_per_video={self.clips_per_video} must be >= 1; use e.g. 8")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"Unknown sampling {self.sampling!r}; available: {', '.join(SAMPLINGS)}")
        if self.open_readers < 1:
            raise ConfigError(f"open_readers={self.open_readers} must be >= 1; use e.g. 32")
        if self.size < 16:
            raise ConfigError(f"size={self.size} is too small for the students; use 112")


class ClipDataset(Dataset):
    """Step samples of a list of corpus entries.

    Videos are probed once on construction (metadata only); a video that cannot be probed is skipped
    with a warning and listed in :attr:`skipped`, so one bad file never hides the others.

    Args:
        entries: Corpus entries with ``video_id``, ``path`` and ``label`` attributes
            (e.g. :func:`pipeline.corpus.read_corpus` rows).
        config: Sampling settings.
        classes: Class names; a label's index in this list is its target. ``None``: the sorted labels of
            ``entries``. Labels not in ``classes`` (or empty) get index -1.
        require_labels: Raise if any entry's label has no class index (fine-tuning).
        moments: ``video_id -> [(start_s, end_s), ...]`` ground-truth segments; a video's steps are then
            drawn from inside its segments only. A video without segments (or none covering a step
            midpoint) keeps all its steps and is counted in :attr:`untrimmed`.

    Items are dicts: ``frames`` ``(S, S, 3)`` uint8, ``audio`` ``(16000,)`` float32, ``clip``
    ``(16, S, S, 3)`` uint8 (only with ``with_clips``), ``label`` int, ``video`` int (entry index),
    ``step`` int, ``time_s`` float.

    Raises:
        ValueError: No readable video, or unlabelled entries with ``require_labels``.
    """

    def __init__(
        self,
        entries: Sequence[Any],
        config: ClipConfig | None = None,
        *,
        classes: Sequence[str] | None = None,
        require_labels: bool = False,
        moments: Mapping[str, Sequence[Sequence[float]]] | None = None,
    ):
        from indexing.errors import MediaError
        from pipeline.media import preload_decoders, probe_video

        self.config = config or ClipConfig()
        if classes is None:
            classes = sorted({str(e.label) for e in entries if getattr(e, "label", "")})
        self.classes = list(classes)
        class_index = {c: i for i, c in enumerate(self.classes)}
        self.entries = []
        self.infos = []
        self.skipped: list[tuple[str, str]] = []
        for entry in entries:
            try:
                info = probe_video(entry.path)
            except MediaError as exc:
                log.warning("skipping %s: %s", entry.path, exc.reason)
                self.skipped.append((str(entry.video_id), exc.reason))
                continue
            if info.num_steps < 1:
                self.skipped.append((str(entry.video_id), "no steps"))
                continue
            self.entries.append(entry)
            self.infos.append(info)
        if not self.entries:
            raise ConfigError(
                f"none of {len(entries)} videos could be read ({self.skipped[:3]}); check the manifest"
            )
        self._setup([info.num_steps for info in self.infos], class_index, require_labels, moments)
        preload_decoders()

    def _setup(
        self,
        num_steps: Sequence[int],
        class_index: Mapping[str, int],
        require_labels: bool,
        moments: Mapping[str, Sequence[Sequence[float]]] | None,
    ) -> None:
        """Labels, step counts and the steps each video may draw from; then epoch 0's draw."""
        from indexing.grid import STEP_S, step_starts

        self.labels = np.array(
            [class_index.get(str(getattr(e, "label", "")), -1) for e in self.entries], np.int64
        )
        if require_labels and (self.labels < 0).any():
            bad = [str(self.entries[i].video_id) for i in np.flatnonzero(self.labels < 0)[:5]]
            raise ConfigError(
                f"videos without a known class label: {', '.join(bad)}; label them or drop them"
            )
        self.num_steps = np.array(num_steps, np.int64)
        # Steps each video may draw from: all, or those whose midpoint lies in a ground-truth segment.
        self.candidates: list[np.ndarray] = []
        self.untrimmed: list[str] = []  # videos drawing from all steps although moments were given
        for entry, n in zip(self.entries, self.num_steps, strict=True):
            steps = np.arange(n, dtype=np.int64)  # (n,)
            if moments is not None:
                mid = step_starts(int(n)) + STEP_S / 2  # (n,) step midpoints in seconds
                inside = np.zeros(int(n), dtype=bool)
                for start_s, end_s in moments.get(str(entry.video_id), ()):
                    inside |= (mid >= start_s) & (mid <= end_s)
                if inside.any():
                    steps = steps[inside]
                else:
                    self.untrimmed.append(str(entry.video_id))
            self.candidates.append(steps)
        self.epoch = -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the epoch's ``(video, step)`` index from ``(seed, epoch)`` alone."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        cap = self.config.clips_per_video
        rng = np.random.default_rng([self.config.seed, epoch])
        videos, steps = [], []
        for v, allowed in enumerate(self.candidates):
            n = len(allowed)
            if n <= cap:
                chosen = allowed
            elif self.config.sampling == "uniform":
                chosen = allowed[np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))]
            else:
                chosen = allowed[np.sort(rng.choice(n, size=cap, replace=False))]
            videos.append(np.full(len(chosen), v, np.int64))
            steps.append(chosen.astype(np.int64))
        index = np.stack([np.concatenate(videos), np.concatenate(steps)], axis=1)  # (N, 2): video, step
        if self.config.sampling == "random" and self.config.order == "clips":
            index = index[rng.permutation(len(index))]
        elif self.config.sampling == "random":  # whole videos shuffled, each video's steps in order
            rank = rng.permutation(len(self.candidates))  # (V,) position of each video in the epoch
            index = index[np.lexsort((index[:, 1], rank[index[:, 0]]))]
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The items of a batch; each video of the batch is decoded once, its steps in one sequential read
        (the items are those :meth:`__getitem__` gives one by one)."""
        pairs = self._pairs(indices)
        return self._decode(pairs, with_clips=self.config.with_clips)

    def _pairs(self, indices: Sequence[Any]) -> list[tuple[int, int]]:
        """The ``(video, step)`` of each index: a position in the current epoch, or ``(epoch, position)`` as
        :func:`make_loader`'s sampler gives them (a persistent worker's copy of the dataset follows the epoch
        of the process that iterates)."""
        if len(indices) and isinstance(indices[0], (tuple, list)):
            self.set_epoch(int(indices[0][0]))
            indices = [int(i) for _, i in indices]
        return [(int(self.index[i][0]), int(self.index[i][1])) for i in indices]

    def _decode(self, pairs: Sequence[tuple[int, int]], *, with_clips: bool) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = [{} for _ in pairs]
        by_video: dict[int, list[int]] = {}
        for k, (v, _) in enumerate(pairs):
            by_video.setdefault(v, []).append(k)
        grouped = self.config.order == "videos"
        for v, ks in by_video.items():
            steps = np.unique([pairs[k][1] for k in ks])  # (n,) sorted: one pass through the file
            reader = self._reader(v, keep=not grouped)
            try:
                batch = reader.read(steps, with_clips=with_clips)
            finally:
                if grouped:  # the video's steps come together: close now (see _reader)
                    reader.close()
            at = {int(step): j for j, step in enumerate(steps)}
            for k in ks:
                j = at[pairs[k][1]]
                items[k] = {
                    "frames": batch.frames[j],  # (S, S, 3) uint8
                    "audio": batch.audio[j].astype(np.float32, copy=False),  # (16000,) float32
                    "label": int(self.labels[v]),
                    "video": v,
                    "step": pairs[k][1],
                    "time_s": float(batch.time_s[j]),
                }
                if with_clips:
                    items[k]["clip"] = batch.clips[j]  # (16, S, S, 3) uint8
        return items

    def _reader(self, v: int, *, keep: bool = True) -> Any:
        """An open reader of video ``v``: from a small per-process LRU cache, or (``keep=False``) a fresh one
        the caller closes.

        Every read is one forward pass (:class:`pipeline.media.StepReader` ``one_pass``) from where decoding
        its first frame exactly may start (an IDR picture, or on open GOPs a recovery point): exact on open
        GOPs, where decord's seeks to a keyframe return wrong pixels for the pictures that refer back past it
        (measured: 8 of 19 clips of an open-GOP file), and on closed GOPs 3-5x the clips/s of decord's open
        readers (no decoder runs between reads). The file's packet index is cached per process, so reopening
        costs an ``av.open``, not a demux. With clips in random order each (worker) process keeps its most
        recently used readers open; with grouped decoding a video's steps are read in one pass and the reader
        is closed at once. A video whose random reads may decode far (e.g. open GOPs without recovery points)
        is named once per process in a warning.
        """
        from pipeline.media import StepReader, probe_video

        if self.infos[v] is None:  # a store's video: probed when first decoded
            self.infos[v] = probe_video(self.entries[v].path)
        if not keep:
            return StepReader(self.entries[v].path, info=self.infos[v], size=self.config.size, one_pass=True)

        # Keyed by process: a forked loader worker inherits its parent's open readers, and decoder
        # handles must never be used (or even closed) across a fork, so each process opens its own.
        readers = self.__dict__.setdefault("_readers", {}).setdefault(os.getpid(), OrderedDict())
        if v in readers:
            readers.move_to_end(v)
            return readers[v]
        reader = StepReader(self.entries[v].path, info=self.infos[v], size=self.config.size, one_pass=True)
        warned = self.__dict__.setdefault("_warned", {}).setdefault(os.getpid(), set())
        if v not in warned:
            warned.add(v)
            span_s = reader.longest_read_frames() / max(self.infos[v].fps, 1e-6)
            if span_s > SLOW_READ_S:
                log.warning(
                    "%s: a random clip may decode up to %.0f s of video (few places where decoding may start "
                    "exactly; exact but slow in clip order); --order videos reads each video in one pass",
                    self.entries[v].path,
                    span_s,
                )
        readers[v] = reader
        while len(readers) > self.config.open_readers:
            readers.popitem(last=False)[1].close()
        return reader

    def __getstate__(self) -> dict[str, Any]:  # open readers stay in the process that opened them
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_warned")}

    def video_id(self, v: int) -> str:
        """The ``video_id`` of entry ``v``."""
        return str(self.entries[v].video_id)


class StoreClipDataset(ClipDataset):
    """The clips :class:`ClipDataset` draws (same videos, steps and order from ``(seed, epoch)``), read from a
    feature store that indexes the corpus (``l2l extract``).

    With the store's ``inputs`` set, frames and log-mels are read from the store: no video is decoded.
    Without it, each batch decodes each of its videos once (see :meth:`ClipDataset.__getitems__`). With
    ``teacher_features``, items carry the stored teacher descriptor as ``target`` and no clip is decoded.

    Args:
        store: The store path.
        records: The store's index records of the videos to use (e.g. one split); only ``ok`` ones give
            clips, the others are listed in :attr:`skipped`.
        config: Sampling settings (``size`` must be the store's 112 when reading stored inputs).
        classes: Class names, as :class:`ClipDataset`.
        require_labels: As :class:`ClipDataset`.
        moments: As :class:`ClipDataset`.
        teacher_features: A feature set of the store holding each step's teacher descriptor (``teacher``).
        use_inputs: Read the stored ``inputs`` (``None``: when the store has them).

    Items are dicts as :class:`ClipDataset`'s, with ``mel`` ``(1, 101, 40)`` float32 instead of ``audio``
    (read from the stored inputs, or the log-mel of the decoded audio computed per batch in the loader
    process), and ``target`` ``(512,)`` float32 instead of ``clip`` with ``teacher_features``.

    Raises:
        ConfigError: No ok video, a set the store lacks or has not finished, or unlabelled videos with
            ``require_labels``.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        records: Sequence[Any],
        config: ClipConfig | None = None,
        *,
        classes: Sequence[str] | None = None,
        require_labels: bool = False,
        moments: Mapping[str, Sequence[Sequence[float]]] | None = None,
        teacher_features: str | None = None,
        use_inputs: bool | None = None,
    ):
        self.config = config or ClipConfig()
        self.store_path = str(store)
        sets = store_feature_sets(store, [teacher_features] if teacher_features else [])
        self.use_inputs = "inputs" in sets if use_inputs is None else use_inputs
        if self.use_inputs and "inputs" not in sets:
            raise ConfigError(
                f"{store} has no inputs feature set; add it with `l2l extract --add-features inputs`"
            )
        if self.use_inputs and self.config.size != 112:
            raise ConfigError(f"stored inputs are 112x112 frames; size={self.config.size} needs decoding")
        self.teacher_features = teacher_features
        if classes is None:
            classes = sorted({str(r.label) for r in records if r.label})
        self.classes = list(classes)
        self.entries = [r for r in records if r.status == "ok" and r.steps > 0]
        self.infos: list[Any] = [None] * len(self.entries)  # probed when a video is first decoded
        self.skipped = [
            (str(r.video_id), r.error or r.status) for r in records if not (r.status == "ok" and r.steps > 0)
        ]
        if not self.entries:
            raise ConfigError(f"none of {len(records)} videos of {store} is ok ({self.skipped[:3]})")
        self.first_row = np.array([r.first_row for r in self.entries], np.int64)  # (V,)
        if not self.use_inputs or (self.config.with_clips and not teacher_features):
            from pipeline.media import preload_decoders

            preload_decoders()
        class_index = {c: i for i, c in enumerate(self.classes)}
        self._setup([r.steps for r in self.entries], class_index, require_labels, moments)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        from indexing.grid import STEP_S

        pairs = self._pairs(indices)
        want_clips = self.config.with_clips and not self.teacher_features
        if self.use_inputs:
            items = [
                {"label": int(self.labels[v]), "video": v, "step": step, "time_s": float(step * STEP_S)}
                for v, step in pairs
            ]
        else:
            items = self._decode(pairs, with_clips=want_clips)
            _mel_items(items)
        store = self._store()
        rows = [int(self.first_row[v] + step) for v, step in pairs]
        if self.teacher_features:  # 1 kB rows: whole chunks decoded once per batch and kept (read_many)
            from indexing.stores.reading import read_many

            targets = read_many(store, self.teacher_features, [(r, r + 1) for r in rows])
        if self.use_inputs:  # one read per array: each inner chunk of the batch decoded once (read_rows_at)
            from indexing.stores.points import read_rows_at

            frames = read_rows_at(store, "inputs_frame", rows)  # (B, 112, 112, 3) uint8
            mels = read_rows_at(store, "inputs_logmel", rows)  # (B, 1, 101, 40) float32
            if want_clips:
                clips = self._decode(pairs, with_clips=True)
        for j, item in enumerate(items):
            if self.use_inputs:
                item["frames"], item["mel"] = frames[j], mels[j]
                if want_clips:
                    item["clip"] = clips[j]["clip"]  # (16, S, S, 3) uint8
            if self.teacher_features:
                item["target"] = np.array(targets[j][0], np.float32)  # (512,) a copy, never a cache view
        return items

    def _store(self) -> Any:
        """The open store of this (loader worker) process."""
        from indexing.stores import open_store

        stores = self.__dict__.setdefault("_stores", {})
        if os.getpid() not in stores:
            stores[os.getpid()] = open_store(self.store_path)
        return stores[os.getpid()]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_warned", "_stores")}


def _mel_items(items: list[dict[str, Any]]) -> None:
    """Replace each item's ``audio`` by its ``mel`` ``(1, 101, 40)`` float32, computed for the whole batch in
    the loader (worker) process: the training process, the one that limits, then only trains (the log-mel
    is what it would compute from the same batch)."""
    import torch

    from indexing.frontend import log_mel

    if not items:
        return
    audio = np.stack([item.pop("audio") for item in items])  # (B, 16000) float32
    with torch.no_grad():
        mels = log_mel(torch.from_numpy(audio)).numpy()  # (B, 1, 101, 40)
    for item, mel in zip(items, mels, strict=True):
        item["mel"] = mel


def store_feature_sets(store: str | os.PathLike, required: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The feature sets of ``store`` (``store info``'s view); ``ConfigError`` unless each of ``required`` is
    there and on every finished task.

    Raises:
        ConfigError: A required set is missing or not yet on every task (the message says how to add it).
    """
    from indexing.stores import open_store
    from indexing.stores.tools import feature_sets_done

    with open_store(store) as s:
        tasks = s.tasks()
        sets = feature_sets_done(s, tasks)
        finished = sum(t in set(s.done_ranges()) for t in tasks)
    for name in required:
        if name not in sets:
            raise ConfigError(
                f"{store} has no feature set {name!r} (it has {', '.join(sets)}); add it with "
                f"`l2l extract --add-features {name} {store}`"
            )
        if sets[name]["tasks_done"] is not None and sets[name]["tasks_done"] < finished:
            raise ConfigError(
                f"{store}: feature set {name!r} is on {sets[name]['tasks_done']} of {finished} tasks; "
                f"finish it with `l2l extract --add-features {name} {store}`"
            )
    return sets


class EpochSampler(Sampler):
    """The positions of the dataset's current epoch as ``(epoch, position)``, read when an epoch's iteration
    starts: persistent DataLoader workers hold their own copy of the dataset, and the epoch travels with
    the indices instead of being set in each copy."""

    def __init__(self, dataset: ClipDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.dataset.epoch)
        return iter([(epoch, i) for i in range(len(self.dataset))])

    def __len__(self) -> int:
        return len(self.dataset)


def make_loader(
    dataset: ClipDataset,
    *,
    batch_size: int,
    num_workers: int = 2,
    device: str = "cpu",
) -> DataLoader:
    """A DataLoader over ``dataset`` in its own (seeded, per-epoch) order.

    Call ``dataset.set_epoch(e)`` before iterating epoch ``e``. Workers are persistent (started once, not
    every epoch: forking, importing the decoders and verifying the store's files cost more than a small
    epoch's reads); the epoch reaches them with each index (:class:`EpochSampler`). The order comes from the
    dataset (no sampler shuffling), so results do not depend on ``num_workers``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise ConfigError(f"num_workers={num_workers} must be >= 0")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(dataset),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=str(device).startswith("cuda"),
        worker_init_fn=_lower_priority,
    )


def _lower_priority(worker_id: int) -> None:
    """DataLoader worker start: raise the worker's niceness by :data:`LOADER_NICE`, so that on a busy host
    the training process keeps its cores (a worker only waits for it: its queue holds prefetched batches)."""
    try:
        os.nice(LOADER_NICE)
    except OSError:  # not allowed here (some sandboxes): the worker runs at the parent's priority
        log.debug("loader worker %d: os.nice(%d) not permitted", worker_id, LOADER_NICE)


def split_entries(
    entries: Sequence[Any], *, train_split: str = "train", val_split: str = "auto"
) -> tuple[list[Any], list[Any], str]:
    """Training and validation videos of a corpus by its ``split`` column.

    Args:
        entries: Corpus entries with a ``split`` attribute.
        train_split: Split name of the training videos; when no entry has it (e.g. a manifest without
            splits), every entry trains.
        val_split: Split name of the validation videos, or ``auto``: ``val`` if present, else 15% of the
            training videos held out (:func:`indexing.training.holdout`: the same videos in every run; the
            test split never chooses the kept epoch), else the training videos themselves (a fixed, evenly
            spaced set of their steps; monitoring only).

    Returns:
        ``(train, val, val_name)``; ``val_name`` says which split validates (``"holdout"``, or ``"train"``
        for the fallback).

    Raises:
        ValueError: A named ``val_split`` that no entry has.
    """
    from indexing.training import HOLDOUT, holdout

    names = {str(getattr(e, "split", "")) for e in entries}
    train = [e for e in entries if e.split == train_split] if train_split in names else list(entries)
    if val_split == "auto":
        val_split = "val" if "val" in names and train_split != "val" else ""
        if not val_split:
            held = set(holdout([e.video_id for e in train], [e.label or "" for e in train]))
            if held:
                return (
                    [e for e in train if e.video_id not in held],
                    [e for e in train if e.video_id in held],
                    HOLDOUT,
                )
            log.warning("no val split and too few training videos to hold any out: validating on them")
            return train, train, "train"
    if val_split not in names:
        raise ConfigError(f"no video has split {val_split!r} (splits: {sorted(names)}); use --val-split auto")
    return train, [e for e in entries if e.split == val_split], val_split


@dataclass(frozen=True)
class ClipLoaders:
    """What :func:`clip_loaders` builds for a training command.

    Attributes:
        train: Loader of the training clips (random steps, re-drawn every epoch).
        val: Loader of the validation clips (evenly spaced steps).
        classes: Class names of the training split, in label-index order.
        data: Provenance recorded in the checkpoint (manifest, splits, clips per video, moments).
        notes: Human-readable lines about what was read (``warning: ...`` lines first).
    """

    train: DataLoader
    val: DataLoader
    classes: list[str]
    data: dict[str, Any]
    notes: list[str]


def clip_loaders(
    manifest: str | os.PathLike,
    *,
    with_clips: bool,
    clips_per_video: int,
    train_split: str = "train",
    val_split: str = "auto",
    seed: int = 0,
    batch_size: int,
    workers: int = 2,
    device: str = "cpu",
    require_labels: bool = False,
    moments: str | os.PathLike | None = None,
    order: str = "clips",
) -> ClipLoaders:
    """Training and validation loaders over the videos of ``manifest`` (``l2l distill``/``finetune``).

    Args:
        manifest: Corpus manifest CSV.
        with_clips: Also decode each step's 16-frame teacher clip (distillation).
        clips_per_video: Steps per video per epoch.
        train_split: Split of the training videos (see :func:`split_entries`).
        val_split: Validation split, or ``auto``.
        seed: Seed of the per-epoch step choice.
        batch_size: Clips per batch.
        workers: DataLoader worker processes.
        device: Where batches go (pinned memory for cuda).
        require_labels: Refuse videos without a label (fine-tuning).
        moments: Ground-truth segments (``moments.json``): draw clips only from inside them.
        order: Training clip order, ``clips`` or ``videos`` (see :class:`ClipConfig`).

    Raises:
        ConfigError: A bad manifest, moments file, split or value.
    """
    from pipeline.corpus import read_corpus, read_moments

    segments = None
    if moments is not None:
        segments = {vid: item["segments"] for vid, item in read_moments(moments).items()}
    train_entries, val_entries, val_name = split_entries(
        read_corpus(manifest), train_split=train_split, val_split=val_split
    )
    train_cfg = ClipConfig(clips_per_video=clips_per_video, with_clips=with_clips, seed=seed, order=order)
    val_cfg = ClipConfig(
        clips_per_video=clips_per_video, sampling="uniform", with_clips=with_clips, seed=seed
    )
    train_set = ClipDataset(train_entries, train_cfg, require_labels=require_labels, moments=segments)
    val_set = ClipDataset(val_entries, val_cfg, classes=train_set.classes, moments=segments)
    notes = _warnings(train_set, val_set, train_split=train_split, moments=moments, skipped="unreadable")
    notes.append(
        f"{len(train_set.entries)} train videos ({len(train_set)} clips/epoch), "
        f"{len(val_set.entries)} validation videos from split {val_name!r} ({len(val_set)} clips)"
    )
    data = {
        "manifest": str(manifest),
        "train_split": train_split,
        "val_split": val_name,
        "clips_per_video": clips_per_video,
        "order": order,
        "moments": str(moments) if moments is not None else None,
    }
    return ClipLoaders(
        train=make_loader(train_set, batch_size=batch_size, num_workers=workers, device=device),
        val=make_loader(val_set, batch_size=batch_size, num_workers=workers, device=device),
        classes=train_set.classes,
        data=data,
        notes=notes,
    )


def _warnings(
    train_set: ClipDataset,
    val_set: ClipDataset,
    *,
    train_split: str,
    moments: str | os.PathLike | None,
    skipped: str,
) -> list[str]:
    """The ``warning: ...`` lines both loaders print: validation classes no training video has, skipped
    videos (``skipped`` says why: ``unreadable``, ``not-ok``), videos without a segment in ``moments``."""
    notes = []
    unseen = sorted({str(e.label) for e in val_set.entries if e.label and e.label not in train_set.classes})
    if unseen:
        n = sum(1 for e in val_set.entries if e.label in unseen)
        notes.append(
            f"warning: {n} validation videos are of class(es) {', '.join(unseen[:10])} that no training "
            f"video has (split {train_split!r}); the model cannot learn them and they count as wrong"
        )
    for name, ds in (("train", train_set), ("val", val_set)):
        if ds.skipped:
            notes.append(f"warning: {len(ds.skipped)} {skipped} {name} videos skipped")
        if moments is not None and ds.untrimmed:
            notes.append(
                f"warning: {len(ds.untrimmed)} {name} videos have no segment in {moments} "
                f"(e.g. {ds.untrimmed[0]}); their clips come from the whole video"
            )
    return notes


def store_loaders(
    store: str | os.PathLike,
    *,
    teacher_features: str | None = None,
    with_clips: bool,
    clips_per_video: int,
    train_split: str = "train",
    val_split: str = "auto",
    seed: int = 0,
    batch_size: int,
    workers: int = 2,
    device: str = "cpu",
    require_labels: bool = False,
    moments: str | os.PathLike | None = None,
    order: str = "clips",
) -> ClipLoaders:
    """:func:`clip_loaders` over the videos a feature store indexes (``l2l distill STORE``): the same clips,
    read from the store's ``inputs`` when it has them, with stored teacher targets when asked.

    Args:
        store: A store written by ``l2l extract``.
        teacher_features: The store's teacher descriptor set (``teacher``); the teacher never runs.
        with_clips: Distillation: items need a teacher target (stored, or a decoded clip without
            ``teacher_features``).
        order: ``clips`` (the paper's) or ``videos`` (grouped decoding), see :class:`ClipConfig`.
        (others as :func:`clip_loaders`)

    Raises:
        ConfigError: A bad store, set, split or value.
    """
    from indexing.corpus import read_moments
    from indexing.stores import open_store

    segments = None
    if moments is not None:
        segments = {vid: item["segments"] for vid, item in read_moments(moments).items()}
    with open_store(store) as s:
        records = s.videos()
        attrs = s.attrs
    train_records, val_records, val_name = split_entries(
        records, train_split=train_split, val_split=val_split
    )
    kw = {"teacher_features": teacher_features if with_clips else None}
    train_cfg = ClipConfig(clips_per_video=clips_per_video, with_clips=with_clips, seed=seed, order=order)
    val_cfg = ClipConfig(
        clips_per_video=clips_per_video, sampling="uniform", with_clips=with_clips, seed=seed
    )
    train_set = StoreClipDataset(
        store, train_records, train_cfg, require_labels=require_labels, moments=segments, **kw
    )
    val_set = StoreClipDataset(store, val_records, val_cfg, classes=train_set.classes, moments=segments, **kw)
    sets = store_feature_sets(store, [])
    used = ["inputs"] if train_set.use_inputs else []
    used += [teacher_features] if kw["teacher_features"] else []
    notes = _warnings(
        train_set, val_set, train_split=train_split, moments=moments, skipped=f"not-ok (in {store})"
    )
    notes.append(
        f"{len(train_set.entries)} train videos ({len(train_set)} clips/epoch), {len(val_set.entries)} "
        f"validation videos from split {val_name!r} ({len(val_set)} clips); from store {store}: "
        + (f"{', '.join(used)} read from the store" if used else "clips decoded from the videos")
    )
    data = {
        "store": str(store),
        "store_corpus_digest": attrs.get("corpus", {}).get("digest"),
        "feature_sets": {name: {k: sets[name].get(k) for k in ("model", "spec", "sha256")} for name in used},
        "train_split": train_split,
        "val_split": val_name,
        "clips_per_video": clips_per_video,
        "order": order,
        "moments": str(moments) if moments is not None else None,
    }
    return ClipLoaders(
        train=make_loader(train_set, batch_size=batch_size, num_workers=workers, device=device),
        val=make_loader(val_set, batch_size=batch_size, num_workers=workers, device=device),
        classes=train_set.classes,
        data=data,
        notes=notes,
    )


def report_loader(
    manifest: str | os.PathLike,
    *,
    split: str = "",
    clips_per_video: int,
    batch_size: int,
    workers: int = 2,
    device: str = "cpu",
    teacher_features: str | None = None,
) -> DataLoader:
    """Evenly spaced clips of the videos of ``manifest`` (only ``split`` when given) for ``distill-report``;
    ``manifest`` may be a feature store (a directory): its videos, with stored inputs and teacher targets
    (``teacher_features``) when it has them.

    Raises:
        ConfigError: No video has ``split``.
    """
    from pipeline.corpus import read_corpus

    if Path(manifest).is_dir():
        from indexing.stores import open_store

        with open_store(manifest) as s:
            records = [r for r in s.videos() if not split or r.split == split]
        if not records:
            raise ConfigError(f"no video of {manifest} has split {split!r}; drop --split or pick another")
        config = ClipConfig(clips_per_video=clips_per_video, sampling="uniform")
        dataset = StoreClipDataset(manifest, records, config, teacher_features=teacher_features)
        return make_loader(dataset, batch_size=batch_size, num_workers=workers, device=device)
    entries = [e for e in read_corpus(manifest) if not split or e.split == split]
    if not entries:
        raise ConfigError(f"no video of {manifest} has split {split!r}; drop --split or pick another")
    dataset = ClipDataset(entries, ClipConfig(clips_per_video=clips_per_video, sampling="uniform"))
    return make_loader(dataset, batch_size=batch_size, num_workers=workers, device=device)

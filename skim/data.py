"""Batches of stored per-step features for the skimming model.

A :class:`SkimDataset` serves the ``ok`` videos of a feature store (optionally one split of a labels
manifest). Each item is read with one slice per array (``store.read_rows`` over the video's row range, the
same reads as ``store.read_video`` without the id lookup), so the store is never loaded whole unless
``in_memory=True``. :func:`collate` pads a list of items to ``(B, N, D)`` float32 tensors plus a ``(B, N)``
mask. :class:`CropBatchSampler` draws training batches cropped to one random length per batch (paper:
200-500 steps; shorter videos are kept whole); :class:`LengthBatchSampler` groups evaluation videos of
similar length so little padding is computed.

Labels come from the manifest by video id and fall back to the store index's label; the split comes
from the manifest and falls back to the store index's split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from indexing.corpus import CorpusEntry
from indexing.errors import ConfigError
from indexing.grid import STEP_S
from indexing.stores import FeatureStore

from .model import RECOGNITION_PREFIX


def step_seconds(store: FeatureStore) -> float:
    """The store's step length in seconds (``attrs["step_s"]``; 16/30 when absent)."""
    return float(store.attrs.get("step_s", STEP_S))


def check_label_coverage(
    store: FeatureStore,
    labels: Mapping[str, CorpusEntry],
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """How many of the store's ``ok`` videos a labels manifest covers; refuse one that covers none.

    Videos the manifest does not list keep the store index's own label and split, so a manifest of another
    corpus (or with other ids) would otherwise train on the store's labels without a word.

    Args:
        store: An open feature store.
        labels: Manifest entries by video id.
        log: Receives a ``warning:`` line when the manifest covers only part of the store, or lists videos
            the store does not have.

    Returns:
        ``{"store_videos", "manifest_videos", "matched"}`` counts.

    Raises:
        ConfigError: No manifest id is an ``ok`` video of the store.
    """
    cols = store.index_columns()
    ok = [v for v, s in zip(cols["video_id"].tolist(), cols["status"].tolist(), strict=True) if s == "ok"]
    matched = [v for v in ok if v in labels]
    where = getattr(store, "path", "the store")
    if not matched:
        raise ConfigError(
            f"the labels manifest names none of the {len(ok)} ok videos of {where} (manifest ids like "
            f"{next(iter(labels), '-')!r}, store ids like {ok[0] if ok else '-'!r}); it belongs to another "
            "corpus or its ids differ: compare with `l2l store ls`"
        )
    unlisted = [v for v in ok if v not in labels]
    extra = [v for v in labels if v not in set(ok)]
    if log is not None and unlisted:
        log(
            f"warning: the labels manifest covers {len(matched)} of the {len(ok)} ok videos of {where}; "
            f"the other {len(unlisted)} (e.g. {unlisted[0]!r}) keep the store's own labels"
        )
    if log is not None and extra:
        log(
            f"warning: {len(extra)} video(s) of the labels manifest are not ok in {where} (e.g. {extra[0]!r})"
        )
    return {"store_videos": len(ok), "manifest_videos": len(labels), "matched": len(matched)}


def label_names(
    store: FeatureStore,
    labels: Mapping[str, CorpusEntry] | None,
    *,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """Sorted class names over every ``ok`` video of the store that has a label (all splits).

    With a manifest, first :func:`check_label_coverage` (which refuses a manifest that matches nothing).

    Raises:
        ConfigError: The manifest matches no video, or fewer than two classes are labelled.
    """
    if labels is not None:
        check_label_coverage(store, labels, log=log)
    cols = store.index_columns()
    names = set()
    for vid, status, label in zip(
        cols["video_id"].tolist(), cols["status"].tolist(), cols["label"].tolist(), strict=True
    ):
        if status != "ok":
            continue
        info = labels.get(vid) if labels else None
        label = info.label if info is not None and info.label else label
        if label:
            names.add(label)
    if len(names) < 2:
        raise ConfigError(
            f"store {getattr(store, 'path', '')} has {len(names)} labelled class(es) among its ok videos; "
            "give a labels manifest (--labels) covering at least two classes"
        )
    return sorted(names)


@dataclass(frozen=True)
class VideoEntry:
    """A video the dataset serves: where its rows are and its label index (-1 when unlabelled)."""

    video_id: str
    first_row: int
    steps: int
    label: int
    path: str
    rec_first_row: int = -1  # first row in the recognition store, when one is used


def classes_without_videos(dataset: SkimDataset, names: Sequence[str]) -> list[str]:
    """Class names no video of ``dataset`` carries (e.g. a class present only in the test split)."""
    present = {e.label for e in dataset.entries}
    return [n for i, n in enumerate(names) if i not in present]


class SkimDataset(Dataset):
    """Stored features of the ``ok`` videos of a store, one item per video (or per cropped window).

    Args:
        store: An open feature store.
        keys: Feature keys to serve (``SkimConfig.batch_keys``); ``rec:<name>`` reads ``recognition_store``.
        labels: Manifest labels by video id (None: the store index's labels only).
        names: Class names; a video whose label is not among them is skipped (or gets -1 if
            ``require_label`` is false). None serves no labels (all -1).
        split: Keep only this split (manifest first, store index second); None keeps all.
        video_ids: Serve exactly these videos, in this order (overrides ``split``).
        recognition_store: Second store for ``rec:`` keys; a video must have the same steps in both.
        in_memory: Load every needed array of the store(s) once instead of reading per video.
        require_label: Skip videos without a usable label.
        with_time: Serve each step's start time (``time_s``); training does not need it and skips the read.

    Raises:
        KeyError: A requested video id is not in the store.
        ValueError: A requested video is not ``ok``, or the recognition store lacks a video or disagrees
            on its step count.
    """

    def __init__(
        self,
        store: FeatureStore,
        keys: Sequence[str],
        *,
        labels: Mapping[str, CorpusEntry] | None = None,
        names: Sequence[str] | None = None,
        split: str | None = None,
        video_ids: Sequence[str] | None = None,
        recognition_store: FeatureStore | None = None,
        in_memory: bool = False,
        require_label: bool = True,
        with_time: bool = True,
    ) -> None:
        self.store = store
        self.with_time = with_time
        self.recognition_store = recognition_store
        self.keys = tuple(keys)
        if any(k.startswith(RECOGNITION_PREFIX) for k in self.keys) and recognition_store is None:
            raise ConfigError(
                f"features {list(self.keys)} need a recognition store; pass --recognition-store"
            )
        self.skipped: dict[str, int] = {"not_ok": 0, "other_split": 0, "unlabelled": 0}
        cols = store.index_columns()
        ids = cols["video_id"].tolist()
        position = {vid: i for i, vid in enumerate(ids)}
        name_index = {n: i for i, n in enumerate(names)} if names is not None else None
        if video_ids is not None:
            missing = [v for v in video_ids if v not in position]
            if missing:
                raise ConfigError(f"video(s) {missing[:5]} are not in store {getattr(store, 'path', '')}")
            order = [position[v] for v in video_ids]
        else:
            order = list(range(len(ids)))
        rec_pos: dict[str, tuple[int, int]] = {}
        if recognition_store is not None:
            rcols = recognition_store.index_columns()
            rec_pos = {
                v: (int(f), int(s))
                for v, f, s in zip(
                    rcols["video_id"].tolist(), rcols["first_row"], rcols["steps"], strict=True
                )
            }
        entries = []
        for i in order:
            vid, status, steps = ids[i], str(cols["status"][i]), int(cols["steps"][i])
            if status != "ok" or steps <= 0:
                if video_ids is not None:
                    raise ConfigError(
                        f"video {vid!r} has status {status!r} ({steps} steps); only ok videos skim"
                    )
                self.skipped["not_ok"] += 1
                continue
            info = labels.get(vid) if labels else None
            label = info.label if info is not None and info.label else str(cols["label"][i])
            vsplit = info.split if info is not None and info.split else str(cols["split"][i])
            if video_ids is None and split is not None and vsplit != split:
                self.skipped["other_split"] += 1
                continue
            label_idx = name_index.get(label, -1) if name_index is not None else -1
            if label_idx < 0 and require_label:
                self.skipped["unlabelled"] += 1
                continue
            rec_first = self._recognition_row(vid, steps, rec_pos) if recognition_store is not None else -1
            entries.append(
                VideoEntry(vid, int(cols["first_row"][i]), steps, label_idx, str(cols["path"][i]), rec_first)
            )
        self.entries = entries
        self._memory: dict[tuple[bool, str], np.ndarray] | None = None
        if in_memory:
            self._memory = {}
            for key in (*self.keys, "valid", *(("time_s",) if with_time else ())):
                rec, name = self._source(key)
                src = self.recognition_store if rec else self.store
                self._memory[(rec, name)] = src.read_rows(name, 0, src.rows)

    def _recognition_row(self, vid: str, steps: int, rec_pos: Mapping[str, tuple[int, int]]) -> int:
        where = getattr(self.recognition_store, "path", "")
        if vid not in rec_pos:
            raise ConfigError(
                f"video {vid!r} is not in the recognition store {where}; extract it there or drop that store"
            )
        first, rec_steps = rec_pos[vid]
        if rec_steps != steps:
            raise ConfigError(
                f"video {vid!r} has {steps} steps in the indexing store but {rec_steps} in the recognition "
                f"store {where}; extract both stores on the same step grid"
            )
        return first

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def steps(self) -> list[int]:
        """Step count of each video, in dataset order."""
        return [e.steps for e in self.entries]

    @staticmethod
    def _source(key: str) -> tuple[bool, str]:
        if key.startswith(RECOGNITION_PREFIX):
            return True, key[len(RECOGNITION_PREFIX) :]
        return False, key

    def _read(self, rec: bool, name: str, first: int, start: int, stop: int) -> np.ndarray:
        if self._memory is not None:
            return self._memory[(rec, name)][first + start : first + stop]
        src = self.recognition_store if rec else self.store
        return src.read_rows(name, first + start, first + stop)

    def _span(self, item: int | tuple[int, int, int]) -> tuple[int, int, int]:
        if isinstance(item, tuple):
            return item
        return item, 0, self.entries[item].steps

    def __getitems__(self, items: Sequence[int | tuple[int, int, int]]) -> list[dict[str, Any]]:
        """Several items at once (what a ``DataLoader`` asks for per batch); equal to ``[self[i] for i in
        items]``, but each array is read for the whole batch with :func:`indexing.stores.reading.read_many`,
        so each chunk the batch touches is decoded once (and recent chunks are kept decoded).

        Features are read-only views of decoded chunks where a video lies in one chunk; :func:`collate`
        copies them into the batch.
        """
        from indexing.stores.reading import read_many

        spans = [self._span(it) for it in items]
        entries = [self.entries[i] for i, _, _ in spans]

        def rows(rec: bool, name: str) -> list[np.ndarray]:
            firsts = [e.rec_first_row if rec else e.first_row for e in entries]
            ranges = [(f + a, f + b) for f, (_, a, b) in zip(firsts, spans, strict=True)]
            if self._memory is not None:
                return [self._memory[(rec, name)][a:b] for a, b in ranges]
            return read_many(self.recognition_store if rec else self.store, name, ranges)

        feats = {key: rows(*self._source(key)) for key in self.keys}
        valid = rows(False, "valid")
        time_s = rows(False, "time_s") if self.with_time else None
        out = []
        for j, (e, (_, start, stop)) in enumerate(zip(entries, spans, strict=True)):
            out.append(
                {
                    "video_id": e.video_id,
                    "label": e.label,
                    "offset": start,
                    "features": {key: feats[key][j] for key in self.keys},
                    "valid": np.asarray(valid[j], dtype=bool),
                    "time_s": (
                        np.asarray(time_s[j], dtype=np.float64)
                        if time_s is not None
                        else np.full(stop - start, np.nan)
                    ),
                }
            )
        return out

    def __getitem__(self, item: int | tuple[int, int, int]) -> dict[str, Any]:
        """Video ``item`` whole, or ``(index, start, stop)``: steps ``[start, stop)`` of video ``index``.

        Returns:
            ``video_id``, ``label``, ``offset`` (first step served), ``features`` (key -> ``(n, D)`` array),
            ``valid`` ``(n,)`` bool and ``time_s`` ``(n,)`` step starts (NaN without ``with_time``).
        """
        if isinstance(item, tuple):
            index, start, stop = item
        else:
            index, start, stop = item, 0, self.entries[item].steps
        e = self.entries[index]
        feats = {}
        for key in self.keys:
            rec, name = self._source(key)
            feats[key] = self._read(rec, name, e.rec_first_row if rec else e.first_row, start, stop)
        return {
            "video_id": e.video_id,
            "label": e.label,
            "offset": start,
            "features": feats,
            "valid": np.asarray(self._read(False, "valid", e.first_row, start, stop), dtype=bool),
            "time_s": (
                np.asarray(self._read(False, "time_s", e.first_row, start, stop), dtype=np.float64)
                if self.with_time
                else np.full(stop - start, np.nan)
            ),
        }


_SERIAL_ELEMENTS = 32768 - 1  # below torch's parallel grain size (at::internal::GRAIN_SIZE): one thread


def collate(items: Sequence[Mapping[str, Any]], dtype: torch.dtype | None = torch.float32) -> dict[str, Any]:
    """Pad items to a batch.

    Args:
        items: Dataset items.
        dtype: The features' dtype (``None``: the items' own, e.g. the store's float16; :func:`make_loader`
            batches so, and :func:`to_device` casts them to float32 for the model).

    Returns:
        ``features`` (key -> ``(B, N, D)`` ``dtype``), ``mask`` ``(B, N)`` bool (valid and not padding),
        ``labels`` ``(B,)`` long, ``offsets`` ``(B,)`` long, ``time_s`` ``(B, N)`` float64,
        ``video_ids`` list of str.
    """
    b = len(items)
    n = max(len(it["valid"]) for it in items)
    keys = list(items[0]["features"])
    feats = {}
    for key in keys:
        d = items[0]["features"][key].shape[1]
        want = np.asarray(items[0]["features"][key]).dtype if dtype is None else torch.empty(0, dtype=dtype)
        want = want if isinstance(want, np.dtype) else want.numpy().dtype
        out = torch.from_numpy(np.zeros((b, n, d), dtype=want))  # (B, N, D), padding zero (calloc: lazy)
        # torch casts float16 -> float32 3-5x faster than numpy on one thread, in blocks under its parallel
        # grain size: a copy split over the intra-op threads waited on them for up to 10x longer on a loaded
        # machine (measured). DLPack wraps the read-only decoded chunks without a copy (from_numpy warns).
        step = max(1, _SERIAL_ELEMENTS // max(1, d))
        for i, it in enumerate(items):
            src = torch.from_dlpack(np.ascontiguousarray(it["features"][key]))  # (n_i, D)
            for a in range(0, len(src), step):
                z = min(a + step, len(src))
                out[i, a:z].copy_(src[a:z])
        feats[key] = out
    mask = np.zeros((b, n), dtype=bool)  # (B, N)
    time_s = np.zeros((b, n), dtype=np.float64)  # (B, N)
    for i, it in enumerate(items):
        mask[i, : len(it["valid"])] = it["valid"]
        time_s[i, : len(it["time_s"])] = it["time_s"]
    return {
        "features": feats,
        "mask": torch.from_numpy(mask),
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "offsets": torch.tensor([it["offset"] for it in items], dtype=torch.long),
        "time_s": torch.from_numpy(time_s),
        "video_ids": [it["video_id"] for it in items],
    }


class CropBatchSampler(Sampler):
    """Shuffled training batches of ``(index, start, stop)``: one random crop length per batch.

    Each batch draws ``L`` uniformly in ``[crop_min, crop_max]``; videos longer than ``L`` are cut to a
    random window of ``L`` steps, shorter ones are kept whole. Deterministic given ``seed`` and the epoch
    (:meth:`set_epoch`), so a resumed run sees the same batches. Every video is in exactly one batch per
    epoch, whatever the options.

    Options (both off by default, which gives the plain shuffle):

    - ``blocks`` (block shuffling, for reads): one block id per video, e.g. the store chunk holding its first
      row. The blocks are shuffled, then the videos inside each window of consecutive shuffled blocks
      holding at least ``window * batch_size`` videos; a batch so takes its videos from about
      ``batch_size / videos-per-block`` random blocks, each decoded once. How random: a video's batch mates
      are uniformly random except that videos of one block always share a window (with 3.4 videos per
      1,024-row chunk, blocks of two chunks (:func:`block_options`) and batch 256, a window of two batches
      holds about 75 random blocks).
    - ``buckets`` (length buckets, against padding): inside each window of ``window * batch_size`` videos
      of the shuffled order, videos are sorted by length and cut into batches, and the window's batches come
      in a random order. Each batch still draws its own ``L`` independently of its videos, so every video's
      crop length (``min(steps, L)``) and crop start have the same distribution as without buckets (tested);
      only which videos share a batch changes, so short videos are not padded to long ones.
    """

    def __init__(
        self,
        steps: Sequence[int],
        *,
        batch_size: int,
        crop_min: int,
        crop_max: int,
        seed: int = 0,
        blocks: Sequence[int] | None = None,
        buckets: bool = False,
        window: int = 2,
    ) -> None:
        if not 1 <= crop_min <= crop_max:
            raise ConfigError(f"crop range [{crop_min}, {crop_max}] is empty; need 1 <= crop_min <= crop_max")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if window < 1:
            raise ConfigError(f"window={window} must be >= 1 batch")
        if blocks is not None and len(blocks) != len(steps):
            raise ConfigError(f"blocks has {len(blocks)} entries for {len(steps)} videos; give one per video")
        self.steps = list(steps)
        self.batch_size = batch_size
        self.crop_min, self.crop_max = crop_min, crop_max
        self.seed = seed
        self.epoch = 0
        self.blocks = None if blocks is None else np.asarray(blocks, dtype=np.int64)
        self.buckets = buckets
        self.window = window

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.steps) // self.batch_size)

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        """This epoch's video order: a permutation, or shuffled blocks with videos shuffled per window."""
        if self.blocks is None:
            return rng.permutation(len(self.steps))
        uniq, inverse = np.unique(self.blocks, return_inverse=True)
        members = np.argsort(inverse, kind="stable")  # videos grouped by block, dataset order inside
        bounds = np.searchsorted(inverse[members], np.arange(len(uniq) + 1))
        size = self.window * self.batch_size
        out: list[np.ndarray] = []
        window: list[np.ndarray] = []
        held = 0
        for b in rng.permutation(len(uniq)).tolist():
            window.append(members[bounds[b] : bounds[b + 1]])
            held += len(window[-1])
            if held >= size:
                w = np.concatenate(window)
                out.append(w[rng.permutation(len(w))])
                window, held = [], 0
        if window:
            w = np.concatenate(window)
            out.append(w[rng.permutation(len(w))])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _batch(self, rng: np.random.Generator, videos: Sequence[int]) -> list[tuple[int, int, int]]:
        crop = int(rng.integers(self.crop_min, self.crop_max + 1))
        batch = []
        for i in videos:
            n = self.steps[i]
            start = int(rng.integers(0, n - crop + 1)) if n > crop else 0
            batch.append((i, start, min(n, start + crop)))
        return batch

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = self._order(rng)
        if not self.buckets:
            for b0 in range(0, len(order), self.batch_size):
                yield self._batch(rng, order[b0 : b0 + self.batch_size].tolist())
            return
        steps = np.asarray(self.steps, dtype=np.int64)
        size = self.window * self.batch_size
        for w0 in range(0, len(order), size):
            win = order[w0 : w0 + size]
            win = win[np.argsort(steps[win], kind="stable")]  # ties keep the shuffled order
            cut = [win[k : k + self.batch_size] for k in range(0, len(win), self.batch_size)]
            for j in rng.permutation(len(cut)).tolist():
                yield self._batch(rng, cut[j].tolist())


class LengthBatchSampler(Sampler):
    """Evaluation batches of whole videos grouped by length (at most ``batch_size`` videos and
    ``max_rows`` padded rows per batch), so short videos are not padded to long ones.

    With ``first_rows`` and ``window``, videos are first cut, in store row order, into windows of ``window``
    videos and sorted by length inside each window only: the batches of a window read the same region of
    the store, so a decoded chunk serves all its videos from the chunk cache
    (:mod:`indexing.stores.reading`) instead of being decoded once per batch, at the price of a little more
    padding than one global sort.
    """

    def __init__(
        self,
        steps: Sequence[int],
        *,
        batch_size: int,
        max_rows: int = 256 * 500,
        first_rows: Sequence[int] | None = None,
        window: int | None = None,
    ) -> None:
        if batch_size < 1 or max_rows < 1:
            raise ConfigError(f"batch_size={batch_size} and max_rows={max_rows} must be >= 1")
        if window is not None and window < 1:
            raise ConfigError(f"window={window} must be >= 1 video")
        lengths = np.asarray(steps, dtype=np.int64)
        if first_rows is not None and window is not None:
            by_row = np.argsort(np.asarray(first_rows, dtype=np.int64), kind="stable")
            groups = [by_row[w : w + window] for w in range(0, len(by_row), window)]
        else:
            groups = [np.arange(len(lengths))]
        self.batches: list[list[int]] = []
        for group in groups:
            order = group[np.argsort(lengths[group], kind="stable")].tolist()
            batch: list[int] = []
            for i in order:
                # sorted ascending, so the padded width of a batch is its last video's length
                if batch and (len(batch) >= batch_size or (len(batch) + 1) * steps[i] > max_rows):
                    self.batches.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                self.batches.append(batch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


CHUNKS_PER_BLOCK = 2  # store chunks per shuffled block (block shuffling, see block_options)


def block_options(
    dataset: SkimDataset, config: Any, *, window: int = 2, chunks_per_block: int = CHUNKS_PER_BLOCK
) -> dict[str, Any]:
    """:class:`CropBatchSampler` options for a training config's ``shuffle`` and ``length_buckets``.

    With ``shuffle="block"`` each video's block is the run of ``chunks_per_block`` consecutive store chunks
    holding its first row, and the store's decoded-chunk cache is sized to hold a window's chunks (``window``
    batches of the dataset's mean length, each feature), so a chunk shared by two batches of the window is
    decoded once: memory bounded by the batch, not by the corpus. A video running past its block's last
    chunk makes the next block's first chunk be decoded twice an epoch (once for it, once in its own
    window); two chunks per block halve those: measured on 1,000 videos of 100-500 steps in 1,024-row
    chunks, 1.26 decodes per chunk and epoch with one chunk per block, 1.07 with two, 1.03 with three.
    How random: a window of 512 videos (batch 256) is about 75 random 2-chunk blocks.
    """
    if chunks_per_block < 1:
        raise ConfigError(f"chunks_per_block={chunks_per_block} must be >= 1")
    out: dict[str, Any] = {"buckets": bool(getattr(config, "length_buckets", False)), "window": window}
    if getattr(config, "shuffle", "video") != "block":
        return out
    store = dataset.store
    rows = store.chunk_rows * chunks_per_block
    out["blocks"] = [e.first_row // rows for e in dataset.entries]
    if dataset._memory is None and dataset.entries:
        _size_cache(dataset, window * int(config.batch_size))
    return out


EVAL_WINDOW = 2  # batches of videos (in store order) sorted by length together for evaluation


def eval_sampler(dataset: SkimDataset, *, batch_size: int, window: int = EVAL_WINDOW) -> LengthBatchSampler:
    """Evaluation batches of whole videos for ``dataset``: sorted by length inside windows of ``window``
    batches of videos in store order (one global sort when the dataset is in memory), with the store's
    decoded-chunk cache sized to hold a window's chunks, so each chunk is decoded about once.
    """
    if dataset._memory is not None or not dataset.entries:
        return LengthBatchSampler(dataset.steps, batch_size=batch_size)
    videos = window * batch_size
    # A window is a run of consecutive rows, read by each of its batches: its chunks, plus the two its ends
    # share with the next windows, plus a margin for windows of longer videos than the mean (the rows of 512
    # videos of 100-500 steps vary by about 2.5 chunks of 1,024 rows; a cache short of a window would make
    # the LRU drop chunks the window's next batch needs). Measured on the bench shape: the same 1,152
    # decodes an epoch (each chunk of each array once) as the 1.4x of training's blocks, in 310 MB, not 419.
    _size_cache(dataset, videos, spread=1.0, margin=8)
    firsts = [e.first_row for e in dataset.entries]
    return LengthBatchSampler(dataset.steps, batch_size=batch_size, first_rows=firsts, window=videos)


def _size_cache(dataset: SkimDataset, videos: int, *, spread: float = 1.4, margin: int = 4) -> None:
    """Size the decoded-chunk cache of the dataset's store(s) to the chunks of ``videos`` videos: ``spread``
    times the chunks their rows fill at the mean length, plus ``margin`` chunks."""
    from indexing.stores.reading import chunk_cache

    mean = sum(dataset.steps) / len(dataset.entries)
    videos = min(videos, len(dataset.entries))
    for rec, store in ((False, dataset.store), (True, dataset.recognition_store)):
        keys = [k for k in dataset.keys if dataset._source(k)[0] == rec]
        if store is None or not keys:
            continue
        # training's blocks: a window's chunks, plus the next chunks the last videos run into (measured:
        # ~1.4x; 1.2x decoded 2% more chunks, 1.05x 7% more)
        chunks = spread * videos * mean / store.chunk_rows + margin
        row_bytes = store.dim * np.dtype(store.dtype).itemsize * len(keys)
        if not rec:  # the row arrays read with the features: valid (bool), time_s (float64)
            row_bytes += 1 + (8 if dataset.with_time else 0)
        chunk_cache(store, int(chunks * store.chunk_rows * row_bytes))


READ_AHEAD = 1  # batches read ahead by a background thread while the model computes (0: read in line)


class ReadAhead:
    """Iterate ``loader`` in a background thread, ``depth`` batches ahead, so reading and collating the next
    batch (zstd decoding releases the GIL) overlaps the model's compute on this one.

    At most ``depth`` batches exist besides the one the caller holds, counting the one being read: the
    thread starts reading a batch only once the caller has taken the one before it. (A queue of ``depth``
    alone let the thread read one more and wait with it: three float32 batches alive at depth 1, about
    0.5 GB at batch 256 of 500-step videos with two 512-d features.)

    Batches come in the same order with the same content as iterating ``loader`` directly; an exception
    raised while reading (e.g. :class:`~indexing.errors.StoreError`) is raised here, at the batch it
    belongs to. Leaving the loop early stops the thread after at most one more batch.
    """

    def __init__(self, loader: DataLoader, depth: int = 1) -> None:
        self.loader = loader
        self.depth = depth
        self.batch_sampler = loader.batch_sampler
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import queue
        import threading

        q: queue.Queue = queue.Queue()
        slots = threading.Semaphore(self.depth)  # batches read ahead and not yet taken by the caller
        stop = threading.Event()
        end = object()

        def slot() -> bool:
            while not stop.is_set():
                if slots.acquire(timeout=0.1):
                    return True
            return False

        def work() -> None:
            try:
                batches = iter(self.loader)
                while slot():
                    batch = next(batches, end)
                    q.put((batch, None))
                    if batch is end:
                        return
                    del batch  # the caller holds it now; this thread keeps no batch while reading the next
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                q.put((None, exc))

        thread = threading.Thread(target=work, name="l2l-read-ahead", daemon=True)
        thread.start()
        try:
            while True:
                batch, exc = q.get()
                slots.release()  # taken: the thread may read the next batch while the caller computes
                if exc is not None:
                    raise exc
                if batch is end:
                    return
                yield batch
        finally:
            stop.set()
            thread.join()


def make_loader(
    dataset: SkimDataset, sampler: Sampler, *, num_workers: int = 0, read_ahead: int | None = None
) -> DataLoader | ReadAhead:
    """A ``DataLoader`` yielding :func:`collate` batches from ``sampler``'s index lists.

    Args:
        dataset: The dataset (batches are read with its ``__getitems__``).
        sampler: A batch sampler.
        num_workers: Reader processes (0: read in this process).
        read_ahead: Batches a background thread reads ahead when ``num_workers`` is 0 (default
            :data:`READ_AHEAD`; 0 reads in line).
    """
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=partial(collate, dtype=None),  # the store's dtype: to_device casts once per batch
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    depth = READ_AHEAD if read_ahead is None else read_ahead
    # one batch (a single query) has nothing to overlap: no thread
    ahead = depth > 0 and num_workers == 0 and len(sampler) > 1
    return ReadAhead(loader, depth) if ahead else loader


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move a batch's tensors (features, mask, labels) to ``device``, features as float32.

    A :func:`make_loader` batch holds the store's float16: the cast to the model's float32 happens here,
    once per batch, and ``batch["features"]`` is replaced by the cast tensors (same values), so the
    float16 copy is freed while the model computes, whoever else holds ``batch`` (the training loop,
    the progress bar). Batches wait in the read-ahead at half the size: at batch 256 of 500-step videos
    with two 512-d features, 262 MB instead of 524 MB.
    """
    out = dict(batch)
    out["features"] = {
        k: v.to(device, dtype=torch.float32, non_blocking=True) for k, v in batch["features"].items()
    }
    batch["features"] = out["features"]
    out["mask"] = batch["mask"].to(device)
    out["labels"] = batch["labels"].to(device)
    return out

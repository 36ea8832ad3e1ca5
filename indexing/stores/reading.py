"""Batch reads of a feature store: each chunk decoded once per batch, recent chunks kept decoded.

Reading videos one slice at a time decodes every chunk a video touches, and a chunk (1,024 rows by
default) holds about three videos of 300 steps: a random batch of 256 videos read per video decodes most
chunks two to three times. :func:`read_many` reads the row ranges of a whole batch at once: it decodes each
chunk the batch touches once (through :meth:`FeatureStore.read_rows`, so the done-marker gating, the
write-record checks and the chunk checksums of format 2 apply unchanged and damage raises
:class:`~indexing.errors.StoreError`) and cuts the ranges out of the decoded chunks. A :class:`ChunkCache`
per open store (a byte-bounded LRU) keeps the most recent decoded chunks, so the next batch does not decode
a chunk again when it shares one with this batch.

Only chunks whose rows all belong to finished (done-marked) tasks are cached: those never change under a
reader. The cache is dropped whenever the store's listing of done markers changes (a task finished, was
unmarked or repaired). The arrays it serves are read-only views; copy before writing into them.

Measured (bench/skimming.py, ``reads``): the zstd chunk decode is the whole cost of a read; a random batch
of 256 out of 1,000 videos of 100-500 steps touches 206 of the 287 chunks (0.8 per video and feature, once
each when grouped, against about 1.3 per video read alone), and 0.3 per video with block shuffling
(:class:`skim.data.CropBatchSampler`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from . import FeatureStore, _intersect

DEFAULT_CACHE_BYTES = 256 << 20  # per open store: 128 float16 chunks of 1,024 x 512 per feature, two features
MAX_RUN_CHUNKS = 8  # consecutive chunks decoded in one read_rows call (bounds the temporary buffer)


class ChunkCache:
    """A least-recently-used map ``(array, chunk index) -> decoded rows``, bounded in bytes.

    Args:
        max_bytes: Most bytes of decoded rows held (0 holds none).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._done_of: object = None  # the done listing the entries were read under

    def get(self, name: str, chunk: int) -> np.ndarray | None:
        arr = self._items.get((name, chunk))
        if arr is None:
            self.misses += 1
            return None
        self._items.move_to_end((name, chunk))
        self.hits += 1
        return arr

    def put(self, name: str, chunk: int, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        key = (name, chunk)
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        arr.flags.writeable = False  # callers get views of it: a write would change later reads
        self._items[key] = arr
        self.bytes += arr.nbytes
        while self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


def chunk_cache(store: FeatureStore, max_bytes: int | None = None) -> ChunkCache:
    """The decoded-chunk cache of an open store (created on first use; ``max_bytes`` resizes it)."""
    cache = store.__dict__.get("_chunk_cache")
    if cache is None:
        cache = store.__dict__["_chunk_cache"] = ChunkCache(
            DEFAULT_CACHE_BYTES if max_bytes is None else max_bytes
        )
    elif max_bytes is not None and max_bytes != cache.max_bytes:
        cache.max_bytes = int(max_bytes)
        if cache.bytes > cache.max_bytes:
            cache.clear()
    return cache


def _chunk_ids(ranges: Sequence[tuple[int, int]], chunk_rows: int) -> list[int]:
    ids: set[int] = set()
    for a, b in ranges:
        if b > a:
            ids.update(range(a // chunk_rows, (b - 1) // chunk_rows + 1))
    return sorted(ids)


def chunks_touched(ranges: Sequence[tuple[int, int]], chunk_rows: int) -> int:
    """How many distinct chunks of ``chunk_rows`` rows the row ranges touch (what :func:`read_many` decodes
    at most)."""
    return len(_chunk_ids(ranges, chunk_rows))


def read_many(
    store: FeatureStore, name: str, ranges: Sequence[tuple[int, int]], *, cache: bool = True
) -> list[np.ndarray]:
    """Rows ``[a, b)`` of array ``name`` for every ``(a, b)`` in ``ranges``, each chunk decoded at most once.

    Equal to ``[store.read_rows(name, a, b) for a, b in ranges]`` (tested), with the same integrity checks
    (every chunk is read through :meth:`FeatureStore.read_rows`) and the same errors.

    Args:
        store: An open feature store.
        name: Array name (a feature or a row array).
        ranges: Row ranges, in any order, possibly overlapping.
        cache: Use (and fill) the store's :class:`ChunkCache`.

    Returns:
        One array per range, in the order given; read-only views into decoded chunks when a range lies in
        one chunk, fresh arrays otherwise.

    Raises:
        StoreError: A chunk holding done rows is damaged (as :meth:`FeatureStore.read_rows`).
        ConfigError: A range outside the store, or an unknown array.
    """
    if not ranges:
        return []
    if not getattr(store, "verified", False):
        # Format 1 has no done markers to say when rows stop changing: nothing is cached, nothing grouped.
        return [store.read_rows(name, a, b) for a, b in ranges]
    rows, size = store.rows, store.chunk_rows
    for a, b in ranges:
        if not 0 <= a <= b <= rows:
            return [store.read_rows(name, a, b) for a, b in ranges]  # read_rows raises the usual error
    lru = chunk_cache(store) if cache else None
    if lru is not None:
        done = store._done_cache()
        if lru._done_of is not done:
            if lru._done_of is not None and list(lru._done_of) != list(done):
                lru.clear()  # a task finished, was unmarked or repaired since those chunks were read
            lru._done_of = done
    decoded: dict[int, np.ndarray] = {}
    missing = []
    for c in _chunk_ids(ranges, size):
        hit = lru.get(name, c) if lru is not None else None
        if hit is not None:
            decoded[c] = hit
        else:
            missing.append(c)
    if type(store).read_chunk is not FeatureStore.read_chunk:
        # The backend decodes a chunk straight from its file (zarr): one chunk at a time, no copies.
        done = store._done_cache()
        for c in missing:
            decoded[c] = part = store.read_chunk(name, c)
            a, b = c * size, min((c + 1) * size, rows)
            if lru is not None and sum(y - x for x, y in _intersect(done, a, b)) == b - a:
                lru.put(name, c, part)
        missing = []
    # Consecutive missing chunks in one read (HDF5: fewer calls), MAX_RUN_CHUNKS at most.
    runs: list[list[int]] = []
    for c in missing:
        if runs and runs[-1][-1] == c - 1 and len(runs[-1]) < MAX_RUN_CHUNKS:
            runs[-1].append(c)
        else:
            runs.append([c])
    for run in runs:
        lo, hi = run[0] * size, min((run[-1] + 1) * size, rows)
        block = store.read_rows(name, lo, hi)
        done = store._done_cache()
        for c in run:
            a, b = c * size, min((c + 1) * size, rows)
            part = block[a - lo : b - lo]
            if len(run) > 1:
                part = part.copy()  # a cached chunk must not keep the whole run alive
            decoded[c] = part
            if lru is not None and sum(y - x for x, y in _intersect(done, a, b)) == b - a:
                lru.put(name, c, part)
    out = []
    for a, b in ranges:
        first, last = a // size, (b - 1) // size
        if b <= a:
            out.append(store.read_rows(name, a, b))
        elif first == last:
            out.append(decoded[first][a - first * size : b - first * size])
        else:
            pieces = [
                decoded[c][max(a, c * size) - c * size : min(b, (c + 1) * size) - c * size]
                for c in range(first, last + 1)
            ]
            out.append(np.concatenate(pieces))
    return out

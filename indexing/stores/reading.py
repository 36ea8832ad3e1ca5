"""Batch reads of a feature store: each chunk decoded once per batch, recent chunks kept decoded.

Reading videos one slice at a time decodes every chunk a video touches, and a chunk (1,024 rows by
default) holds about three videos of 300 steps: a random batch of 256 videos read per video decodes most
chunks two to three times. :func:`read_many` reads the row ranges of a whole batch at once: it decodes each
chunk the batch touches once (through :meth:`FeatureStore.read_chunk_into`, so the done-marker gating, the
write-record checks and the chunk checksums of format 2 apply unchanged and damage raises
:class:`~indexing.errors.StoreError`) and cuts the ranges out of the decoded chunks. A :class:`ChunkCache`
per open store (a byte-bounded LRU) keeps the most recent decoded chunks, so the next batch does not decode
a chunk again when it shares one with this batch.

Only chunks whose rows all belong to finished (done-marked) tasks are cached: those never change under a
reader. The cache is dropped whenever the store's listing of done markers changes (a task finished, was
unmarked or repaired). The arrays it serves are read-only views; copy before writing into them.

Memory: a warm read allocates nothing. Each chunk is decoded straight into a buffer the cache recycles (an
evicted chunk no served view refers to any more), the file is read into a reused per-thread buffer, and
ranges over several chunks are copied into one recycled arena. Fresh megabyte buffers cost more in page
faults than the decode itself: on 1,000 planted videos (bench/skimming.py ``--reads-only``, per CPU-second,
others' load 5-8) a block-shuffled epoch went from 0.45x to 0.68x the per-video .npy layout with this
alone (profiled, one block-shuffled epoch: 1.13 s, 0.67 s of it reading and decoding 727 chunks into fresh
buffers, against 0.41 s, 0.24 s of it into reused ones).

Measured (bench/skimming.py, ``reads``): a random batch of 256 out of 1,000 videos of 100-500 steps touches
206 of the 287 chunks (0.8 per video and feature, once each when grouped, against about 1.3 per video read
alone), and 0.3 per video with block shuffling (:class:`skim.data.CropBatchSampler`, blocks of two chunks).
What is left of a warm block-shuffled read is memory traffic: for the default raw chunks, the file read
straight into a buffer no longer in the CPU cache (~0.2-0.3 ms a 1 MB chunk, 60-70% of the epoch's CPU),
the crc32c (~0.05 ms) and ~0.04 ms of Python. Two decoding threads did not help on 2 busy cores
(google-crc32c holds the GIL: two threads took 1.7x one thread's time for the same checksums).
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from . import FeatureStore, _intersect, array_dtype, row_shape

DEFAULT_CACHE_BYTES = 256 << 20  # per open store: 128 float16 chunks of 1,024 x 512 per feature, two features
MAX_RUN_CHUNKS = 8  # consecutive chunks decoded in one read_rows call (bounds the temporary buffer)
FREE_BUFFERS = 4  # evicted chunk buffers kept for reuse beyond the byte budget (see ChunkCache)
ARENAS = 4  # arenas for rows copied out of several chunks, kept for reuse


def _refs(arr: np.ndarray) -> int:
    return sys.getrefcount(arr)


def _unshared_refs() -> int:
    """What :func:`_refs` says of an array held by one local variable only (the pattern of
    :meth:`ChunkCache.put`), measured rather than assumed: interpreters count differently."""
    box = {0: np.empty(1)}
    held = box.pop(0)
    return _refs(held)


_UNSHARED = _unshared_refs()


class ChunkCache:
    """A least-recently-used map ``(array, chunk index) -> decoded rows``, bounded in bytes.

    Evicted chunks nobody else holds (no view of them is alive: the reference count says so) go to a free
    list, and :meth:`buffer` hands them out again to decode the next chunk into: a warm read then
    allocates no fresh megabytes (their page faults cost more than the decode, measured). A chunk that is
    still viewed is never reused, so a served view keeps its rows. The free list holds what the budget
    leaves unused plus :data:`FREE_BUFFERS` spare buffers (cached plus free bytes <= ``max_bytes`` + that
    many buffers: a full cache decodes the next chunk before it evicts one), so a cleared cache (a new
    epoch, a changed done listing) refills into its old buffers instead of faulting in fresh ones:
    measured on a block-shuffled epoch of 1,000 videos, 418 of 619 chunk reads went to fresh buffers after
    a clear when only four were kept.

    Args:
        max_bytes: Most bytes of decoded rows held (0 holds none).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.reused = 0
        self.fresh = 0  # chunk buffers allocated (not recycled)
        self._items: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._free: list[np.ndarray] = []
        self._free_bytes = 0
        self._arenas: list[np.ndarray] = []
        self._done_of: object = None  # the done listing the entries were read under
        self.lock = threading.RLock()  # one reader of the cache at a time (the read-ahead thread and others)
        self.pid = os.getpid()  # a forked child gets a cache of its own (the lock may have been held)

    def __getstate__(self) -> dict[str, int]:
        # A copy sent to another process (a store pickled for a loader worker) starts empty: decoded chunks
        # are not worth shipping, and a lock does not pickle.
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["max_bytes"])

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
            self._recycle(dropped)
            del dropped
        self._trim_free()

    def _recycle(self, arr: np.ndarray) -> None:
        # arr is held here and by the caller's one local: anything more is a live view (or a user's
        # reference) and the buffer must keep its rows.
        if arr.base is None and _refs(arr) == _UNSHARED + 1:
            if self.bytes + self._free_bytes + arr.nbytes <= self.max_bytes + FREE_BUFFERS * arr.nbytes:
                self._free.append(arr)
                self._free_bytes += arr.nbytes

    def _trim_free(self) -> None:
        # Cached plus free bytes within the budget and FREE_BUFFERS spare buffers.
        while (
            self._free
            and self.bytes + self._free_bytes > self.max_bytes + FREE_BUFFERS * self._free[0].nbytes
        ):
            self._free_bytes -= self._free.pop(0).nbytes

    def buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A writable C-contiguous array of ``shape`` and ``dtype`` to decode a chunk into: a recycled one
        (see the class docstring) or a new one. Its contents are undefined."""
        dtype = np.dtype(dtype)
        for i, arr in enumerate(self._free):
            if arr.shape == shape and arr.dtype == dtype:
                del self._free[i]
                self._free_bytes -= arr.nbytes
                arr.flags.writeable = True  # it owns its memory and no view of it is alive
                self.reused += 1
                return arr
        self.fresh += 1
        return np.empty(shape, dtype)

    def arena(self, nbytes: int) -> np.ndarray:
        """A writable ``uint8`` array of at least ``nbytes`` for rows copied out of several chunks: the
        cache's arena again when no view of it is alive any more, else a new one (contents undefined)."""
        for arena in self._arenas:  # a few: one array's rows are still held while the next array is read
            if arena.nbytes >= nbytes and _refs(arena) == _UNSHARED + 1:
                arena.flags.writeable = True  # it owns its memory and no view of it is alive
                self.reused += 1
                return arena[:nbytes]
        if len(self._arenas) >= ARENAS:
            self._arenas.pop(0)  # freed once the views of it die
        self._arenas.append(np.empty(max(nbytes, 1), np.uint8))
        return self._arenas[-1][:nbytes]

    def clear(self) -> None:
        while self._items:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.nbytes
            self._recycle(dropped)
            del dropped
        self.bytes = 0
        self._trim_free()

    def __len__(self) -> int:
        return len(self._items)


def chunk_cache(store: FeatureStore, max_bytes: int | None = None) -> ChunkCache:
    """The decoded-chunk cache of an open store (created on first use; ``max_bytes`` resizes it)."""
    cache = store.__dict__.get("_chunk_cache")
    if cache is not None and cache.pid != os.getpid():
        cache = store.__dict__["_chunk_cache"] = ChunkCache(cache.max_bytes)  # forked: a fresh lock
    if cache is None:
        cache = store.__dict__["_chunk_cache"] = ChunkCache(
            DEFAULT_CACHE_BYTES if max_bytes is None else max_bytes
        )
    elif max_bytes is not None and max_bytes != cache.max_bytes:
        cache.max_bytes = int(max_bytes)
        if cache.bytes > cache.max_bytes:
            cache.clear()
        cache._trim_free()
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
    rows = store.rows
    for a, b in ranges:
        if not 0 <= a <= b <= rows:
            return [store.read_rows(name, a, b) for a, b in ranges]  # read_rows raises the usual error
    lru = chunk_cache(store) if cache else None
    if lru is None:
        return _read_grouped(store, name, ranges, None)
    with lru.lock:
        return _read_grouped(store, name, ranges, lru)


def _read_grouped(
    store: FeatureStore, name: str, ranges: Sequence[tuple[int, int]], lru: ChunkCache | None
) -> list[np.ndarray]:
    rows, size = store.rows, store.chunk_rows
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
    if getattr(store, "_per_chunk_reads", True):
        # Each chunk decoded straight into a buffer of its own (a recycled one when the cache has one).
        shape = (size, *row_shape(name, store.dim))
        dtype = array_dtype(name, store.dtype)
        for c in missing:
            buf = lru.buffer(shape, dtype) if lru is not None else np.empty(shape, dtype)
            part = store.read_chunk_into(name, c, buf)
            a, b = c * size, min((c + 1) * size, rows)
            if b - a == size:
                part = buf  # the owner itself: a cached one can be recycled once nobody views it
            if lru is not None and sum(y - x for x, y in _intersect(store._done_cache(), a, b)) == b - a:
                lru.put(name, c, part)
            part.flags.writeable = False  # callers get views of it
            decoded[c] = part
            del buf, part
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
    # Ranges over several chunks are copied into one arena per call (recycled like the chunk buffers).
    shape = row_shape(name, store.dim)
    dtype = array_dtype(name, store.dtype)
    row_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    spanning = sum(b - a for a, b in ranges if b > a and a // size != (b - 1) // size)
    arena = lru.arena(spanning * row_bytes) if lru is not None else np.empty(spanning * row_bytes, np.uint8)
    at = 0
    for a, b in ranges:
        first, last = a // size, (b - 1) // size
        if b <= a:
            out.append(store.read_rows(name, a, b))
        elif first == last:
            out.append(decoded[first][a - first * size : b - first * size])
        else:
            rows_ab = arena[at : at + (b - a) * row_bytes].view(dtype).reshape(b - a, *shape)
            at += (b - a) * row_bytes
            for c in range(first, last + 1):
                x, y = max(a, c * size), min(b, (c + 1) * size)
                rows_ab[x - a : y - a] = decoded[c][x - c * size : y - c * size]
            rows_ab.flags.writeable = False
            out.append(rows_ab)
    del arena
    return out

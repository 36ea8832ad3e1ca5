"""Scattered-row reads: the rows of a training batch, one array at a time, each inner chunk decoded once.

A distillation batch reads one row (one step) of each of a dozen videos from ``inputs_frame`` and
``inputs_logmel``. Through :meth:`FeatureStore.read_rows` each row is one zarr call, and zarr spends about
1 ms of event-loop and thread-pool hand-offs per call on top of the 0.1-0.5 ms the decode takes: more than
the students' training step on 2 loaded cores. :func:`read_rows_at` reads all rows of a batch at once:

- the store's checks run once per store chunk (file) the batch touches, as :meth:`FeatureStore.read_rows`
  runs them (rows of unfinished tasks read as fill unless an ok video owns them, every file of a done task
  has its recorded size and bytes, a set not yet added to a task is refused);
- the inner chunks of the sharded feature-set arrays (``l2l extract`` writes one shard per ``chunk_rows``
  rows, ~256 kB inner chunks) are read straight from the shard with one ``pread`` each and decoded once,
  verifying the shard index's crc32c and the zstd frame checksum as zarr does. Only arrays whose codecs are
  exactly the ones the stores write take this path (checked against the array's metadata); any other
  array, store backend or format reads row by row through :meth:`FeatureStore.read_rows`.

The result equals ``np.concatenate([store.read_rows(name, r, r + 1) for r in rows])`` (tested, also with
damaged bytes: the same :class:`~indexing.errors.StoreError`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import FeatureStore, _intersect, array_dtype, array_path, row_shape

_EMPTY = 2**64 - 1  # a shard index entry of a chunk that was never written (zarr reads it as fill)


def read_rows_at(store: FeatureStore, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """Rows ``rows`` (any order, repeats allowed) of array ``name``, stacked: ``(len(rows), *row shape)``.

    Equal to ``np.concatenate([store.read_rows(name, r, r + 1) for r in rows])``, with the same checks and
    errors; each store chunk is checked once and each inner chunk decoded once per call.

    Raises:
        StoreError: A file holding done rows is missing, damaged or not the one its task wrote.
        ConfigError: A row outside the store, or an unknown array.
    """
    rows = np.asarray(rows, np.int64).reshape(-1)  # (n,)
    if not len(rows):
        return np.zeros((0, *row_shape(name, store.dim)), array_dtype(name, store.dtype))
    reader = _sharded(store, name) if getattr(store, "verified", False) else None
    if reader is None or rows.min() < 0 or rows.max() >= store.rows:
        return np.concatenate([store.read_rows(name, int(r), int(r) + 1) for r in rows])
    uniq, inverse = np.unique(rows, return_inverse=True)  # (u,), (n,)
    out = np.zeros((len(uniq), *reader.row_shape), reader.dtype)  # (u, *row shape): fill where unfinished
    size = store.chunk_rows
    chunk_of = uniq // size
    for c in np.unique(chunk_of):
        at = np.flatnonzero(chunk_of == c)  # positions in `uniq` of this chunk's rows
        lo, hi = int(uniq[at[0]]), int(uniq[at[-1]]) + 1
        segments = store._done_segments(lo, hi)
        covered = np.zeros(len(at), bool)
        for a, b in segments:
            covered |= (uniq[at] >= a) & (uniq[at] < b)
        for r in uniq[at[~covered]]:  # no finished task wrote it: fill, unless an ok video owns it
            store._check_unfinished_rows(name, int(r), int(r) + 1, _intersect(segments, int(r), int(r) + 1))
        if not covered.any():
            continue
        for a, b in segments:
            for path in store.files_of(name, a, b):
                store._check_file(name, path, a, b)
        want = uniq[at[covered]]
        path = store.files_of(name, int(want[0]), int(want[0]) + 1)[0]
        try:
            out[at[covered]] = reader.read(store.path / path, want - int(c) * size)
        except Exception as exc:  # noqa: BLE001 - as read_rows: any decode failure means damaged bytes
            for r in want:  # read_rows names the damaged rows when zarr fails there too
                store.read_rows(name, int(r), int(r) + 1)
            raise store.damage_error(
                name, int(want[0]), int(want[-1]) + 1, f"{type(exc).__name__}: {exc}"
            ) from exc
    return out[inverse]


class _ShardReader:
    """Inner chunks of one sharded zarr v3 array: ``bytes`` then ``zstd`` (with checksum) per chunk, the
    shard index at the end as little-endian ``uint64`` pairs followed by its crc32c."""

    def __init__(self, *, inner_rows: int, shard_rows: int, row_shape: tuple[int, ...], dtype: np.dtype):
        self.inner_rows = inner_rows
        self.row_shape = row_shape
        self.dtype = dtype
        self.chunks = shard_rows // inner_rows  # inner chunks per shard
        self.chunk_bytes = inner_rows * int(np.prod(row_shape)) * dtype.itemsize
        self._index: dict[str, tuple[tuple[int, int], np.ndarray]] = {}

    def read(self, path: Path, local_rows: np.ndarray) -> np.ndarray:
        """Rows ``local_rows`` (sorted, within the shard) of the shard file ``path``."""
        from numcodecs import Zstd

        out = np.zeros((len(local_rows), *self.row_shape), self.dtype)  # (n, *row shape)
        fd = os.open(path, os.O_RDONLY)
        try:
            index = self._shard_index(path, fd)
            inner = local_rows // self.inner_rows
            for k in np.unique(inner):
                offset, nbytes = (int(x) for x in index[k])
                if offset == _EMPTY and nbytes == _EMPTY:
                    continue  # never written: fill (0), as zarr reads it
                raw = Zstd().decode(os.pread(fd, nbytes, offset))  # the frame checksum is verified here
                if len(raw) != self.chunk_bytes:
                    raise ValueError(f"inner chunk {k} decodes to {len(raw)} bytes, not {self.chunk_bytes}")
                block = np.frombuffer(raw, self.dtype).reshape(self.inner_rows, *self.row_shape)
                sel = np.flatnonzero(inner == k)
                out[sel] = block[local_rows[sel] - k * self.inner_rows]
        finally:
            os.close(fd)
        return out

    def _shard_index(self, path: Path, fd: int) -> np.ndarray:
        """``(chunks, 2)`` offsets and lengths, kept while the file's size and mtime stay the same."""
        import google_crc32c

        st = os.fstat(fd)
        stamp = (st.st_size, st.st_mtime_ns)
        kept = self._index.get(str(path))
        if kept is not None and kept[0] == stamp:
            return kept[1]
        n = 16 * self.chunks
        if st.st_size < n + 4:
            raise ValueError(f"{path} has {st.st_size} bytes, less than its shard index")
        tail = os.pread(fd, n + 4, st.st_size - n - 4)
        if google_crc32c.value(tail[:n]) != int.from_bytes(tail[n:], "little"):
            raise ValueError(f"{path}: the shard index fails its crc32c")
        index = np.frombuffer(tail[:n], "<u8").reshape(self.chunks, 2)
        ends = index[index[:, 0] != _EMPTY].sum(axis=1)
        if len(ends) and int(ends.max()) > st.st_size - n - 4:
            raise ValueError(f"{path}: the shard index points past the chunk data")
        self._index[str(path)] = (stamp, index)
        return index


def _sharded(store: FeatureStore, name: str) -> _ShardReader | None:
    """The direct reader of array ``name`` of a zarr store, or ``None`` unless its metadata is exactly a
    sharded array with the codecs the stores write (one shard per ``chunk_rows`` rows)."""
    readers = store.__dict__.setdefault("_shard_readers", {})
    if name not in readers:
        readers[name] = _make_reader(store, name)
    return readers[name]


def _make_reader(store: FeatureStore, name: str) -> _ShardReader | None:
    try:
        meta = json.loads((Path(store.path) / array_path(name) / "zarr.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    shape = tuple(row_shape(name, store.dim))
    dtype = np.dtype(array_dtype(name, store.dtype))
    try:
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        inner = [int(x) for x in conf["chunk_shape"]]
        grid = [int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        endian = {"endian": "little"} if dtype.itemsize > 1 else None
        expected = {
            "zarr_format": 3,
            "node_type": "array",
            "data_type": dtype.name,
            "fill_value": 0 if dtype.kind != "f" else 0.0,
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "storage_transformers": [],
        }
        same = all(meta.get(k) == v for k, v in expected.items())
        inner_codecs = conf["codecs"]
        bytes_ok = inner_codecs[0] in (
            [{"name": "bytes", "configuration": endian}]
            if endian
            else [{"name": "bytes"}, {"name": "bytes", "configuration": {}}]
        )
        zstd_ok = (
            inner_codecs[1]["name"] == "zstd" and inner_codecs[1]["configuration"].get("checksum") is True
        )
        ok = (
            same
            and codec["name"] == "sharding_indexed"
            and len(inner_codecs) == 2
            and bytes_ok
            and zstd_ok
            and conf["index_codecs"]
            == [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
            and conf.get("index_location", "end") == "end"
            and tuple(meta["shape"][1:]) == shape
            and grid == [store.chunk_rows, *shape]
            and inner[1:] == list(shape)
            and 0 < inner[0] <= store.chunk_rows
            and store.chunk_rows % inner[0] == 0
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None
    if not ok:
        return None
    return _ShardReader(inner_rows=inner[0], shard_rows=store.chunk_rows, row_shape=shape, dtype=dtype)


def reader_kind(store: Any, name: str) -> str:
    """``"shard"`` when :func:`read_rows_at` reads ``name`` straight from its shards, else ``"rows"``."""
    return "shard" if getattr(store, "verified", False) and _sharded(store, name) is not None else "rows"

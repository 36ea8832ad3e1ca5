"""Scattered-row reads (indexing/stores/points.py): a batch's rows equal row-by-row reads, errors too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexing.errors import StoreError
from indexing.stores import FEATURES, VideoRecord, get_store, open_store
from indexing.stores.points import read_rows_at, reader_kind

DIM, CHUNK, ROWS = 16, 8, 28
TASKS = [(0, 8), (8, 16), (16, 24), (24, 28)]
SETS = ("inputs_frame", "inputs_logmel", "teacher")


def _index() -> list[VideoRecord]:
    return [
        VideoRecord("a", "/v/a.mp4", 0, 11, 5.8, 30.0, True, "ok"),
        VideoRecord("b", "/v/b.mp4", 11, 6, 3.1, 25.0, False, "ok"),  # rows 17-23: padding
        VideoRecord("c", "/v/c.mp4", 24, 4, 2.0, 30.0, True, "ok"),
    ]


def _store(path: Path, *, done: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """A zarr store with the inputs and teacher sets over every row; only the tasks in ``done`` finished."""
    rng = np.random.default_rng(0)
    data = {name: rng.standard_normal((ROWS, DIM)).astype("float16") for name in FEATURES}
    data.update(valid=np.ones(ROWS, bool), audio_valid=np.ones(ROWS, bool), time_s=np.arange(ROWS) * 0.5)
    data["inputs_frame"] = rng.integers(0, 256, (ROWS, 112, 112, 3), dtype=np.uint8)
    data["inputs_logmel"] = rng.standard_normal((ROWS, 1, 101, 40)).astype("float32")
    data["teacher"] = rng.standard_normal((ROWS, 512)).astype("float16")
    store = get_store("zarr").create(
        path, index=_index(), rows=ROWS, chunk_rows=CHUNK, dim=DIM, attrs={"step_s": 16 / 30}, tasks=TASKS
    )
    sets = dict(store.feature_sets())
    sets["inputs"] = {"arrays": ["inputs_frame", "inputs_logmel"], "model": "none", "sha256": None}
    sets["teacher"] = {"arrays": ["teacher"], "model": "teacher", "sha256": "ab" * 32}
    store.add_arrays(list(SETS), {"feature_sets": sets})
    for a, b in TASKS:
        store.write_rows(a, b, {name: arr[a:b] for name, arr in data.items()})
        if (a, b) in done:
            store.mark_done(a, b)
    store.close()
    return data


def _row_by_row(store, name: str, rows) -> np.ndarray:
    return np.concatenate([store.read_rows(name, int(r), int(r) + 1) for r in rows])


def test_scattered_rows_equal_row_by_row_reads(tmp_path):
    data = _store(tmp_path / "s", done=TASKS)
    rows = np.array([27, 3, 3, 9, 0, 26, 12, 1, 15, 8, 22, 4])  # any order, repeats, every chunk
    with open_store(tmp_path / "s") as store:
        # The frames' shards hold inner chunks of 4 rows: read straight from the shard files. The log-mels
        # fit one unsharded chunk of 8 rows and the teacher's 8 x 512 too: those go row by row through zarr.
        assert [reader_kind(store, n) for n in SETS] == ["shard", "rows", "rows"]
        for name in (*SETS, "fused", "valid"):
            got = read_rows_at(store, name, rows)
            np.testing.assert_array_equal(got, _row_by_row(store, name, rows), err_msg=name)
            np.testing.assert_array_equal(got, data[name][rows], err_msg=name)
            assert got.dtype == data[name].dtype and got.flags.writeable
        assert read_rows_at(store, "inputs_frame", []).shape == (0, 112, 112, 3)
        with pytest.raises(ValueError, match="outside|rows"):
            read_rows_at(store, "inputs_frame", [3, ROWS])


def test_unfinished_and_damaged_rows_fail_as_row_reads_do(tmp_path):
    _store(tmp_path / "s", done=[(0, 8), (8, 16), (16, 24)])
    with open_store(tmp_path / "s") as store:
        # Rows of a task without a done marker that an ok video owns: refused, never zeros.
        for read in (read_rows_at, _row_by_row):
            with pytest.raises(StoreError, match="no finished task wrote these rows"):
                read(store, "inputs_frame", [2, 25])
    # Damage the second inner chunk of the first shard after its task recorded the file: zstd's frame
    # checksum fails in both readers (the task record is rewritten so the file-digest check passes).
    shard = tmp_path / "s" / "features" / "inputs_frame" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(raw[-(2 * 16 + 4) : -4]), "<u8").reshape(2, 2)
    raw[int(index[1, 0]) + int(index[1, 1]) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with open_store(tmp_path / "s", "r+") as store:
        store.record_arrays(0, 8, ["inputs_frame"])
    with open_store(tmp_path / "s") as store:
        np.testing.assert_array_equal(  # rows of the intact inner chunk still read
            read_rows_at(store, "inputs_frame", [1, 2]), _row_by_row(store, "inputs_frame", [1, 2])
        )
        for read in (read_rows_at, _row_by_row):
            with pytest.raises(StoreError, match="inputs_frame rows .* cannot be read"):
                read(store, "inputs_frame", [1, 5])
    # A shard whose bytes are not the ones its task wrote: the store's position check refuses it first.
    raw[int(index[1, 0]) + int(index[1, 1]) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with open_store(tmp_path / "s") as store:
        for read in (read_rows_at, _row_by_row):
            with pytest.raises(StoreError, match="is not the file its task wrote"):
                read(store, "inputs_frame", [1])

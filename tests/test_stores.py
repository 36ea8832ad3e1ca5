"""Feature store contract, checked on every backend, plus the store tools and CLI."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from cli import main
from indexing.errors import StoreError
from indexing.stores import (
    FEATURES,
    ROW_ARRAYS,
    FeatureStore,
    VideoRecord,
    available_stores,
    get_store,
    index_problems,
    open_store,
    records_to_columns,
)
from indexing.stores.tools import check_store, export_store, store_check, store_info, store_ls

DIM = 16
CHUNK = 8
ROWS = 28
TASKS = [(0, 16), (16, 24), (24, 28)]  # the last task ends at the store's end, not on a chunk boundary


def make_index() -> list[VideoRecord]:
    """Five videos: unicode ids, a failed one without rows, padding rows at [19, 24)."""
    return [
        VideoRecord("a", "/v/a.mp4", 0, 5, 2.6, 30.0, True, "ok", label="run"),
        VideoRecord("vidéo_β/ü 中", "/v/b ü.mp4", 5, 11, 5.8, 25.0, False, "ok", label="jump", split="test"),
        VideoRecord("c", "/v/c.mp4", 16, 3, 1.5, 29.97, True, "ok"),
        VideoRecord("dead", "/v/dead.mp4", 0, 0, status="failed", error="moov atom not found"),
        VideoRecord("e", "/v/e.mp4", 24, 4, 2.0, 30.0, True, "ok"),
    ]


def make_rows(seed: int = 0, dtype: str = "float16") -> dict[str, np.ndarray]:
    """Full-store arrays consistent with :func:`make_index`; padding rows are zero and not valid."""
    rng = np.random.default_rng(seed)
    valid = np.zeros(ROWS, bool)
    time_s = np.zeros(ROWS)
    audio_valid = np.zeros(ROWS, bool)
    for rec in make_index():
        rows = slice(rec.first_row, rec.first_row + rec.steps)
        valid[rows] = True
        audio_valid[rows] = rec.has_audio
        time_s[rows] = np.arange(rec.steps) * 16 / 30
    out = {name: (rng.standard_normal((ROWS, DIM)) * valid[:, None]).astype(dtype) for name in FEATURES}
    out.update(valid=valid, audio_valid=audio_valid, time_s=time_s)
    return out


def task_arrays(data: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {name: arr[start:stop] for name, arr in data.items()}


ATTRS = {
    "step_s": 16 / 30,
    "audio": {"sample_rate": 16000, "n_mels": 40},
    "models": {"image": {"name": "resnet18", "sha256": "ab" * 32}},
    "config": {"chunk_rows": CHUNK, "store": "x"},
}


class StoreHelpers:
    """Create and fill a store of backend ``fmt``; ``plain`` reads and damages it without l2l code."""

    fmt: str
    plain: Any

    def create(self, path: Path, **kw: object) -> FeatureStore:
        args = dict(index=make_index(), rows=ROWS, chunk_rows=CHUNK, dim=DIM, attrs=ATTRS, tasks=TASKS)
        args.update(kw)
        return get_store(self.fmt).create(path, **args)

    def filled(self, path: Path, seed: int = 0, order: list[int] | None = None) -> dict[str, np.ndarray]:
        data = make_rows(seed)
        with self.create(path) as store:
            for i in order or range(len(TASKS)):
                store.write_rows(*TASKS[i], task_arrays(data, *TASKS[i]))
                store.mark_done(*TASKS[i])
        return data


class TestStoreContract(StoreHelpers):
    """Behaviour every registered backend must show (one run per name in :func:`available_stores`)."""

    @pytest.fixture(autouse=True, params=available_stores())
    def _backend(self, request: pytest.FixtureRequest) -> None:
        self.fmt = request.param
        self.plain = PLAIN[self.fmt]()

    # ---- contract ------------------------------------------------------------------------------
    def test_roundtrip(self, tmp_path: Path) -> None:
        data = self.filled(tmp_path / "s")
        with open_store(tmp_path / "s") as store:
            assert store.name == self.fmt
            assert (store.rows, store.dim, store.chunk_rows, store.dtype) == (ROWS, DIM, CHUNK, "float16")
            assert store.videos() == make_index()
            for key, value in ATTRS.items():
                assert store.attrs[key] == value
            assert store.attrs["format"] == "l2l-features"
            for name in FEATURES + ROW_ARRAYS:
                np.testing.assert_array_equal(store.read_rows(name, 0, ROWS), data[name])
            assert store.done_ranges() == TASKS

    def test_float32_roundtrip(self, tmp_path: Path) -> None:
        data = make_rows(3, dtype="float32")
        with self.create(tmp_path / "s", dtype="float32") as store:
            for task in TASKS:
                store.write_rows(*task, task_arrays(data, *task))
                store.mark_done(*task)
        with open_store(tmp_path / "s") as store:
            assert store.dtype == "float32"
            np.testing.assert_array_equal(store.read_rows("fused", 0, ROWS), data["fused"])

    def test_out_of_order_tasks_roundtrip(self, tmp_path: Path) -> None:
        data = self.filled(tmp_path / "ordered")
        self.filled(tmp_path / "shuffled", order=[2, 0, 1])
        with open_store(tmp_path / "ordered") as a, open_store(tmp_path / "shuffled") as b:
            for name in FEATURES + ROW_ARRAYS:
                np.testing.assert_array_equal(a.read_rows(name, 0, ROWS), b.read_rows(name, 0, ROWS))
                np.testing.assert_array_equal(b.read_rows(name, 0, ROWS), data[name])

    def test_misaligned_write_refused(self, tmp_path: Path) -> None:
        data = make_rows()
        with self.create(tmp_path / "s") as store:
            with pytest.raises(ValueError, match=r"\[4, 16\).*chunk_rows=8"):
                store.write_rows(4, 16, task_arrays(data, 4, 16))
            with pytest.raises(ValueError, match=r"\[0, 12\).*chunk_rows=8"):
                store.write_rows(0, 12, task_arrays(data, 0, 12))
            with pytest.raises(ValueError, match="not inside"):
                store.write_rows(24, 32, {})
            with pytest.raises(ValueError, match="shape"):
                store.write_rows(0, 8, {"fused": np.zeros((8, DIM + 1))})
            with pytest.raises(ValueError, match="unknown array"):
                store.write_rows(0, 8, {"feature": np.zeros((8, DIM))})
            store.write_rows(24, 28, task_arrays(data, 24, 28))  # the store's end is a valid stop
        with open_store(tmp_path / "s") as store:
            assert not store.read_rows("valid", 19, 24).any()  # padding of a task not marked done: fill
            with pytest.raises(StoreError, match=r"rows \[0, 5\) \(videos 'a'\).*no finished task wrote"):
                store.read_rows("valid", 0, 24)  # the index says video a is ok: fill would be a wrong answer

    def test_idempotent_rewrite(self, tmp_path: Path) -> None:
        data = self.filled(tmp_path / "s")
        before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*") if p.is_file())
        with open_store(tmp_path / "s", "r+") as store:
            store.write_rows(0, 16, {"fused": np.ones((16, DIM))})  # a bad first attempt ...
            store.write_rows(0, 16, task_arrays(data, 0, 16))  # ... and the retry, twice
            store.write_rows(0, 16, task_arrays(data, 0, 16))
        after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*") if p.is_file())
        assert after == before
        with open_store(tmp_path / "s") as store:
            for name in FEATURES + ROW_ARRAYS:
                np.testing.assert_array_equal(store.read_rows(name, 0, ROWS), data[name])

    def test_reopen_modes(self, tmp_path: Path) -> None:
        self.filled(tmp_path / "s")
        with open_store(tmp_path / "s") as store:
            with pytest.raises(ValueError, match="read-only"):
                store.write_rows(0, 8, {})
            with pytest.raises(ValueError, match="read-only"):
                store.set_index(make_index())
        with pytest.raises(ValueError, match="mode"):
            open_store(tmp_path / "s", "w")
        with pytest.raises(ValueError, match="already exists"):
            self.create(tmp_path / "s")
        self.create(tmp_path / "s", overwrite=True).close()
        with open_store(tmp_path / "s") as store:
            assert store.done_ranges() == [] and not store.read_rows("valid", 19, 24).any()

    def test_index_unicode_failed_and_replace(self, tmp_path: Path) -> None:
        self.filled(tmp_path / "s")
        with open_store(tmp_path / "s", "r+") as store:
            rec = store.video("vidéo_β/ü 中")
            assert (rec.first_row, rec.steps, rec.label, rec.split) == (5, 11, "jump", "test")
            assert store.video("dead").error == "moov atom not found"
            with pytest.raises(KeyError, match="did you mean"):
                store.video("vidéo_β/u 中")
            final = make_index()
            final[2] = VideoRecord("c", "/v/c.mp4", 16, 3, status="failed", error="decoder died at 1.2 s")
            final.append(VideoRecord("late ✓", "/v/l.mp4", status="pending"))
            store.set_index(final)
            assert store.video("late ✓").status == "pending"
        with open_store(tmp_path / "s") as store:
            assert store.videos() == final
            assert store.index_columns()["video_id"].tolist() == [r.video_id for r in final]

    def test_index_validated(self, tmp_path: Path) -> None:
        with self.create(tmp_path / "s") as store:
            overlapping = make_index()
            overlapping[2] = VideoRecord("c", "/v/c.mp4", 14, 3, status="ok")
            with pytest.raises(ValueError, match="overlap"):
                store.set_index(overlapping)
            with pytest.raises(ValueError, match="appears 2 times"):
                store.set_index(make_index() + [VideoRecord("a", "/v/a2.mp4")])
            with pytest.raises(ValueError, match="outside"):
                store.set_index([VideoRecord("z", "/z.mp4", 26, 5, status="ok")])
        with pytest.raises(ValueError, match="JSON"):
            self.create(tmp_path / "t", attrs={"bad": object()})
        with pytest.raises(ValueError, match="float16, float32"):
            self.create(tmp_path / "u", dtype="int8")

    def test_read_video_slices(self, tmp_path: Path) -> None:
        data = self.filled(tmp_path / "s")
        with open_store(tmp_path / "s") as store:
            for rec in make_index():
                got = store.read_video(rec.video_id)
                rows = slice(rec.first_row, rec.first_row + rec.steps)
                for name in FEATURES + ROW_ARRAYS:
                    np.testing.assert_array_equal(got[name], data[name][rows])
                assert got["fused"].shape == (rec.steps, DIM)
                assert rec.steps == 0 or got["valid"].all()
            only = store.read_video("c", ["image"])
            assert list(only) == ["image"]

    def test_plain_library_reader(self, tmp_path: Path) -> None:
        data = self.filled(tmp_path / "s")
        ids = self.plain.read_ids(tmp_path / "s")
        assert ids == [r.video_id for r in make_index()]
        rec = make_index()[1]
        got = self.plain.read(tmp_path / "s", "fused", rec.first_row, rec.first_row + rec.steps)
        np.testing.assert_array_equal(got, data["fused"][5:16])
        np.testing.assert_array_equal(self.plain.read(tmp_path / "s", "valid", 0, ROWS), data["valid"])

    def test_open_store_pickles_for_worker_processes(self, tmp_path: Path) -> None:
        data = self.filled(tmp_path / "s")
        with open_store(tmp_path / "s") as store:
            store.read_rows("fused", 0, 8)  # handles are open now
            copy = pickle.loads(pickle.dumps(store))
            np.testing.assert_array_equal(copy.read_rows("fused", 0, ROWS), data["fused"])
            assert copy.video("e").first_row == 24
            copy.close()

    def test_lock_refuses_second_writer(self, tmp_path: Path) -> None:
        with self.create(tmp_path / "s") as store:
            with store.lock():
                holder = rf"pid {os.getpid()} on host {socket.gethostname()}.*delete"
                with pytest.raises(ValueError, match=holder):
                    open_store(tmp_path / "s", "r+").lock()
            with store.lock():  # released on exit, so it can be taken again
                pass
            lock_file = tmp_path / "s" / "write.lock"
            lock_file.write_text(json.dumps({"pid": 1, "host": "other-node", "token": "t"}))
            with pytest.raises(ValueError, match="other-node"):
                store.lock()
            dead = subprocess.run(
                [sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE
            )
            stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "token": "old"}
            lock_file.write_text(json.dumps(stale))
            lock = store.lock()  # a dead pid on this host: taken over
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
            lock.release()
            assert not lock_file.exists()

    def test_done_markers(self, tmp_path: Path) -> None:
        data = make_rows()
        with self.create(tmp_path / "s") as store:
            assert store.done_ranges() == []
            with pytest.raises(StoreError, match=r"rows \[16, 24\).*write_rows"):
                store.mark_done(16, 24)  # nothing written: a marker would promise rows that do not exist
            for task in TASKS:
                store.write_rows(*task, task_arrays(data, *task))
            store.mark_done(16, 24)
            store.mark_done(0, 16)
            store.mark_done(0, 16)
            assert store.done_ranges() == [(0, 16), (16, 24)]
            with pytest.raises(ValueError, match="not inside"):
                store.mark_done(24, 40)
            store.mark_done(24, 28, result={"videos": ["e"]})
            assert store.done_results() == {(0, 16): None, (16, 24): None, (24, 28): {"videos": ["e"]}}

    def test_check_clean_and_incomplete(self, tmp_path: Path) -> None:
        self.filled(tmp_path / "s")
        assert store_check(tmp_path / "s") == []
        self.filled(tmp_path / "partial", order=[0, 2])  # task [16, 24) never ran: video c is incomplete
        problems = check_store(tmp_path / "partial")
        assert [(p.kind, p.video_ids, p.rows) for p in problems] == [("unwritten", ["c"], [16, 19])]
        assert check_store(tmp_path / "partial", quick=True) == problems

    def test_check_finds_nan(self, tmp_path: Path) -> None:
        data = self.filled(tmp_path / "s")
        with open_store(tmp_path / "s", "r+") as store:
            block = task_arrays(data, 16, 24)
            block["audio"] = block["audio"].copy()
            block["audio"][1, 3] = np.nan
            store.write_rows(16, 24, block)
            store.mark_done(16, 24)  # a task that really wrote NaN: its record agrees
        problems = store_check(tmp_path / "s")
        assert len(problems) == 1 and "'c'" in problems[0] and "1 rows have NaN/inf" in problems[0]

    def test_check_finds_damaged_chunk(self, tmp_path: Path) -> None:
        self.filled(tmp_path / "s")
        self.plain.damage_first_chunk(tmp_path / "s")
        problems = check_store(tmp_path / "s")
        assert [p.kind for p in problems] == ["truncated"], problems
        assert "a" in problems[0].video_ids and "e" not in problems[0].video_ids
        with open_store(tmp_path / "s") as store, pytest.raises(StoreError, match="l2l store repair"):
            store.read_rows("fused", 0, 8)

    def test_check_finds_overlap_and_stray_valid_rows(self, tmp_path: Path) -> None:
        self.filled(tmp_path / "s")
        first_row = np.array([0, 5, 14, 0, 24])  # c now starts inside b's rows
        self.plain.write_first_row(tmp_path / "s", first_row)
        problems = store_check(tmp_path / "s")
        assert any("'vidéo_β/ü 中'" in p and "'c'" in p and "overlap" in p for p in problems), problems
        with open_store(tmp_path / "s", "r+") as store:
            store.set_index([r for r in make_index() if r.video_id != "e"])
        problems = store_check(tmp_path / "s")
        assert problems == ["4 valid rows belong to no video (padding rows must be valid=False)"]

    def test_check_failed_video_with_valid_rows(self, tmp_path: Path) -> None:
        self.filled(tmp_path / "s")
        index = make_index()
        index[0] = VideoRecord("a", "/v/a.mp4", 0, 5, status="failed", error="late failure")
        with open_store(tmp_path / "s", "r+") as store:
            store.set_index(index)
        assert store_check(tmp_path / "s") == ["video 'a' (failed, rows [0, 5)) owns 5 valid rows"]

    def test_info_and_ls(self, tmp_path: Path) -> None:
        self.filled(tmp_path / "s")
        info = store_info(tmp_path / "s")
        assert set(info) == {
            "format", "videos", "ok", "failed", "pending", "steps", "failures", "models", "bytes", "rows",
            "chunk_rows", "dtype", "compression", "format_version", "checksums", "tasks", "tasks_done",
            "complete", "feature_sets",
        }  # fmt: skip
        assert (info["format_version"], info["checksums"], info["compression"]) == (
            2,
            {"zarr": "crc32c", "hdf5": "fletcher32"}[self.fmt],
            "none",  # both defaults: raw float16 bytes plus the checksum
        )
        counts = [
            info[k] for k in ("format", "videos", "ok", "failed", "pending", "steps", "rows", "chunk_rows")
        ]
        assert counts == [self.fmt, 5, 4, 1, 0, 23, ROWS, CHUNK] and info["dtype"] == "float16"
        failure = {"video_id": "dead", "path": "/v/dead.mp4", "reason": "moov atom not found"}
        assert info["failures"] == [failure]
        assert info["models"] == ATTRS["models"]
        assert info["bytes"] > ROWS
        listing = store_ls(tmp_path / "s")
        assert [v["video_id"] for v in listing] == [r.video_id for r in make_index()]
        assert listing[1] == {
            "video_id": "vidéo_β/ü 中", "path": "/v/b ü.mp4", "status": "ok", "steps": 11, "duration_s": 5.8,
            "fps": 25.0, "has_audio": False, "label": "jump",
        }  # fmt: skip
        json.dumps(info), json.dumps(listing)

    def test_export_roundtrip(self, tmp_path: Path) -> None:
        data = self.filled(tmp_path / "src")
        path = tmp_path / "src"
        for i, fmt in enumerate([f for f in available_stores() if f != self.fmt] + [self.fmt]):
            path = export_store(path, tmp_path / f"hop{i}", fmt)
            assert open_store(path).name == fmt
        with open_store(path) as store:
            assert store.name == self.fmt
            assert store.videos() == make_index()
            assert {k: store.attrs[k] for k in ATTRS} == ATTRS
            assert (store.rows, store.chunk_rows, store.dtype) == (ROWS, CHUNK, "float16")
            assert store.done_ranges() == TASKS
            for name in FEATURES + ROW_ARRAYS:
                np.testing.assert_array_equal(store.read_rows(name, 0, ROWS), data[name])
        assert store_check(path) == []

    def test_empty_store(self, tmp_path: Path) -> None:
        with self.create(tmp_path / "s", index=[], rows=0, tasks=[]) as store:
            assert store.read_rows("fused", 0, 0).shape == (0, DIM)
            assert store.videos() == []
        assert store_check(tmp_path / "s") == []
        assert store_info(tmp_path / "s")["videos"] == 0


class ZarrPlain:
    """The zarr store read and damaged with plain zarr, no l2l code."""

    def read(self, path: Path, name: str, start: int, stop: int) -> np.ndarray:
        group = zarr.open_group(path, mode="r")
        return group[f"features/{name}" if name in FEATURES else name][start:stop]

    def read_ids(self, path: Path) -> list[str]:
        return zarr.open_group(path, mode="r")["index/video_id"][:].tolist()

    def write_first_row(self, path: Path, first_row: np.ndarray) -> None:
        zarr.open_array(path / "index" / "first_row", mode="r+")[:] = first_row

    def damage_first_chunk(self, path: Path) -> None:
        (path / "features" / "fused" / "c" / "0" / "0").write_bytes(b"not zstd" * 10)


class Hdf5Plain:
    """The HDF5 store read and damaged with plain h5py, no l2l code."""

    def read(self, path: Path, name: str, start: int, stop: int) -> np.ndarray:
        with h5py.File(path / "store.h5", "r") as f:
            return f[f"features/{name}" if name in FEATURES else name][start:stop]

    def read_ids(self, path: Path) -> list[str]:
        with h5py.File(path / "store.h5", "r") as f:
            return f["index/video_id"].asstr()[:].tolist()

    def write_first_row(self, path: Path, first_row: np.ndarray) -> None:
        with h5py.File(path / "store.h5", "r+") as f:
            f["index/first_row"][:] = first_row

    def damage_first_chunk(self, path: Path) -> None:
        (path / "parts" / "rows-000000000000-000000000016.h5").write_bytes(b"not hdf5" * 10)


PLAIN = {"zarr": ZarrPlain, "hdf5": Hdf5Plain}  # a new backend adds its plain-library reader here


def test_every_registered_store_runs_the_contract() -> None:
    from importlib.metadata import entry_points

    declared = sorted(ep.name for ep in entry_points(group="l2l.stores"))
    assert declared == available_stores() == sorted(PLAIN)


class TestZarrOnly(StoreHelpers):
    fmt = "zarr"
    plain = ZarrPlain()

    def test_sharded_roundtrip(self, tmp_path: Path) -> None:
        data = make_rows(1)
        with self.create(tmp_path / "s", inner_chunk_rows=4) as store:
            for task in TASKS:
                store.write_rows(*task, task_arrays(data, *task))
                store.mark_done(*task)
        with open_store(tmp_path / "s") as store:
            assert store.chunk_rows == CHUNK  # the write unit is the shard
            np.testing.assert_array_equal(store.read_rows("fused", 0, ROWS), data["fused"])
        group = zarr.open_group(tmp_path / "s", mode="r")
        assert group["features/fused"].chunks == (4, DIM) and group["features/fused"].shards == (CHUNK, DIM)
        with pytest.raises(ValueError, match="inner_chunk_rows=3"):
            self.create(tmp_path / "t", inner_chunk_rows=3)

    def test_index_is_columnar(self, tmp_path: Path) -> None:
        self.filled(tmp_path / "s")
        group = zarr.open_group(tmp_path / "s", mode="r")
        assert sorted(group["index"].array_keys()) == sorted(records_to_columns([]))
        assert group["index/first_row"][:].tolist() == [r.first_row for r in make_index()]


class TestHdf5Only(StoreHelpers):
    fmt = "hdf5"
    plain = Hdf5Plain()

    def test_missing_parts_read_as_fill_and_unplanned_parts_mapped_at_finalise(self, tmp_path: Path) -> None:
        data = make_rows(2)
        with self.create(tmp_path / "s", tasks=TASKS[:2]) as store:  # [24, 28) is not planned
            store.write_rows(16, 24, task_arrays(data, 16, 24))
            store.write_rows(24, 28, task_arrays(data, 24, 28))
        path = tmp_path / "s"
        assert not self.plain.read(path, "valid", 0, 16).any()  # planned but not written yet: fill
        np.testing.assert_array_equal(self.plain.read(path, "fused", 16, 24), data["fused"][16:24])
        assert not self.plain.read(path, "valid", 24, 28).any()  # written but not mapped yet
        extra = [p for p in check_store(path) if p.kind == "extra"]
        assert [p.array for p in extra] == ["parts/rows-000000000024-000000000028.h5"]
        with open_store(path, "r+") as store:
            store.set_index(make_index())  # finalising rebuilds the mapping
        np.testing.assert_array_equal(self.plain.read(path, "fused", 24, 28), data["fused"][24:28])
        assert self.plain.read(path, "valid", 24, 28).all()
        with open_store(path, "r+") as store:
            with pytest.raises(ValueError, match="overlap existing part"):
                store.write_rows(16, 28, task_arrays(data, 16, 28))

    def test_open_via_store_file_and_moved_directory(self, tmp_path: Path) -> None:
        data = self.filled(tmp_path / "s")
        (tmp_path / "s").rename(tmp_path / "moved")
        with open_store(tmp_path / "moved" / "store.h5") as store:
            np.testing.assert_array_equal(store.read_rows("image", 0, ROWS), data["image"])


def test_index_problems_found_without_a_store() -> None:
    cols = records_to_columns(
        [VideoRecord("a", "a", 0, 4, status="ok"), VideoRecord("b", "b", 2, 4, status="odd")]
    )
    problems = index_problems(cols, rows=5)
    assert any("unknown status 'odd'" in p for p in problems)
    assert any("outside the store's 5 rows" in p for p in problems)
    assert any("'a' rows [0, 4) and 'b' rows [2, 6) overlap" in p for p in problems)


def test_open_store_rejects_non_stores(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        open_store(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    zarr.open_group(tmp_path / "plain", mode="w")
    with pytest.raises(ValueError, match="not a feature store.*hdf5, zarr"):
        open_store(tmp_path / "plain")
    with pytest.raises(ValueError, match="available: hdf5, zarr"):
        get_store("npy")


def test_cli_store_commands(tmp_path: Path) -> None:
    contract = TestZarrOnly()
    contract.filled(tmp_path / "s")
    runner = CliRunner()
    result = runner.invoke(main, ["store", "info", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] == 4
    result = runner.invoke(main, ["store", "info", str(tmp_path / "s")])
    assert "4 ok, 1 failed" in result.output and "moov atom not found" in result.output
    result = runner.invoke(main, ["store", "ls", str(tmp_path / "s")])
    assert result.exit_code == 0 and "vidéo_β/ü 中" in result.output
    result = runner.invoke(
        main, ["store", "export", str(tmp_path / "s"), str(tmp_path / "h"), "--format", "hdf5"]
    )
    assert result.exit_code == 0, result.output
    assert runner.invoke(main, ["store", "check", str(tmp_path / "h")]).exit_code == 0
    contract.plain.damage_first_chunk(tmp_path / "s")
    result = runner.invoke(main, ["store", "check", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert [(p["kind"], p["array"], p["rows"], p["task"]) for p in problems] == [
        ("truncated", "features/fused/c/0/0", [0, 8], [0, 16])
    ]
    assert problems[0]["video_ids"] == ["a", "vidéo_β/ü 中"]
    result = runner.invoke(main, ["store", "info", str(tmp_path)])
    assert result.exit_code == 2 and "not a feature store" in result.output


def test_format_1_stores_still_open_and_export_adds_checksums(tmp_path: Path) -> None:
    """Stores written before checksums (by the code of commit ac1f1bb) read as before, say so, and export."""
    import tarfile

    with tarfile.open(Path(__file__).parent / "data" / "stores-v1.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    with np.load(tmp_path / "v1-data.npz") as z:
        data = {k: z[k] for k in z.files}
    for fmt in available_stores():
        old = tmp_path / f"v1-{fmt}"
        info = store_info(old)
        assert info["format_version"] == 1 and info["checksums"].startswith("no checksums")
        assert "l2l store export" in info["checksums"]
        assert store_check(old) == []
        with open_store(old) as store:
            assert not store.verified and store.done_ranges() == [(0, 8), (8, 14)]
            for name in FEATURES + ROW_ARRAYS:
                np.testing.assert_array_equal(store.read_rows(name, 0, store.rows), data[name])
        new = export_store(old, tmp_path / f"v2-{fmt}", fmt)
        info = store_info(new)
        assert (info["format_version"], info["checksums"]) == (
            2,
            {"zarr": "crc32c", "hdf5": "fletcher32"}[fmt],
        )
        assert check_store(new) == []
        with open_store(new) as store:
            assert store.verified and store.done_ranges() == [(0, 8), (8, 14)]
            assert set(store.task_record(0, 8)["files"]) == {
                p for n in FEATURES + ROW_ARRAYS for p in store.files_of(n, 0, 8)
            }
            for name in FEATURES + ROW_ARRAYS:
                np.testing.assert_array_equal(store.read_rows(name, 0, store.rows), data[name])

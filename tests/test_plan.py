"""Planning for every worker: small corpora and long videos are cut into chunk-aligned tasks.

The pure planner first (layouts, determinism, the recorded plan rebuilt on resume), then real extractions:
a real Dask LocalCluster of 2 worker processes, real mp4 files from the project's encoder, real stores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexing.stores import FEATURES, ROW_ARRAYS, VideoRecord, available_stores, open_store
from indexing.stores.tools import check_store
from pipeline.corpus import CorpusEntry
from pipeline.encode import write_video
from pipeline.extract import ExtractConfig, add_features, repair_store, run_extraction
from pipeline.plan import check_plan, plan_extraction, replan

STUDENTS = "random:0:tiny"
ARRAYS = FEATURES + ROW_ARRAYS


def _records(steps: list[int]) -> list[VideoRecord]:
    return [VideoRecord(f"v{i}", f"/data/v{i}.mp4", steps=s) for i, s in enumerate(steps)]


def _cover(plan) -> dict[str, list[tuple[int, int, int]]]:
    """Per video: (offset, steps, row) of each piece, in task order."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for t in plan.tasks:
        for v in t.videos:
            out.setdefault(v.video_id, []).append((v.offset, v.steps, v.first_row))
    return out


# ---- the planner ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_enough_tasks_keep_the_version_1_layout(workers):
    recs = _records([5, 0, 7, 3, 12, 1, 0, 4, 9])
    old = plan_extraction(recs, chunk_rows=4, task_steps=4)
    assert len(old.tasks) >= 3 and old.version == 1
    new = plan_extraction(recs, chunk_rows=4, task_steps=4, workers=workers)
    assert new == old and new.digest() == old.digest() and new.summary() == old.summary()
    assert "workers" not in new.summary()  # the recorded summary of such a store is what it always was


@pytest.mark.parametrize("steps", [[5, 0, 7, 3], [40], [1, 1, 1, 30, 2], [9, 9]])
@pytest.mark.parametrize("workers", [2, 3, 5])
def test_fewer_tasks_than_workers_cut_videos_at_chunk_boundaries(steps, workers):
    recs = _records(steps)
    plan = plan_extraction(recs, chunk_rows=4, task_steps=100, workers=workers)
    check_plan(plan)
    chunks = -(-sum(steps) // 4)
    assert plan.version == 2 and len(plan.tasks) == min(workers, chunks) >= 2
    assert plan.rows == plan.steps == sum(steps)  # back to back, no padding
    owned = np.zeros(plan.rows, int)
    for t in plan.tasks:
        assert t.start % 4 == 0 and (t.stop % 4 == 0 or t.stop == plan.rows)
        owned[t.start : t.stop] += 1
    assert (owned == 1).all()  # every row belongs to one task, no chunk is shared
    sizes = [t.stop - t.start for t in plan.tasks]
    assert max(sizes) - min(sizes) <= 4  # chunks are dealt out evenly
    for rec in plan.records:
        if rec.steps == 0:
            continue
        pieces = _cover(plan)[rec.video_id]
        # The pieces cover the video's steps once, in order, each at its own rows.
        assert [p[0] for p in pieces] == list(np.cumsum([0] + [p[1] for p in pieces])[:-1])
        assert sum(p[1] for p in pieces) == rec.steps
        assert all(row == rec.first_row + offset for offset, _, row in pieces)
    assert plan.summary()["workers"] == workers and plan.summary()["version"] == 2


def test_a_corpus_within_one_chunk_stays_one_task():
    recs = _records([3, 0, 1])  # 4 rows: one chunk cannot be split between writers
    plan = plan_extraction(recs, chunk_rows=4, task_steps=100, workers=2)
    assert plan.version == 1 and len(plan.tasks) == 1
    assert plan == plan_extraction(recs, chunk_rows=4, task_steps=100)


def test_a_long_video_spans_tasks_of_at_most_task_steps():
    plan = plan_extraction(_records([3000]), chunk_rows=1024, task_steps=2048, workers=2)
    assert [(t.start, t.stop) for t in plan.tasks] == [(0, 1024), (1024, 3000)]
    assert _cover(plan)["v0"] == [(0, 1024, 0), (1024, 1976, 1024)]
    many = plan_extraction(_records([9000]), chunk_rows=1024, task_steps=2048, workers=2)
    assert len(many.tasks) == 5 and max(t.stop - t.start for t in many.tasks) <= 2048


def test_the_recorded_plan_is_rebuilt_whatever_the_workers_now():
    recs = _records([5, 0, 7, 3])
    two = plan_extraction(recs, chunk_rows=4, task_steps=100, workers=2)
    again = replan(list(two.records), two.summary(), chunk_rows=4, task_steps=100)
    assert again == two and again.digest() == two.digest()
    assert two.digest() != plan_extraction(recs, chunk_rows=4, task_steps=100, workers=3).digest()
    # A store written before version 2 records neither version 2 nor workers: its own layout comes back.
    old = plan_extraction(recs, chunk_rows=4, task_steps=100)
    legacy = {k: v for k, v in old.summary().items() if k != "workers"}
    assert replan(list(old.records), legacy, chunk_rows=4, task_steps=100) == old
    assert replan(list(old.records), {}, chunk_rows=4, task_steps=100) == old
    with pytest.raises(ValueError, match="plan version 3 is unknown"):
        replan(list(old.records), {"version": 3}, chunk_rows=4, task_steps=100)
    with pytest.raises(ValueError, match="workers"):
        plan_extraction(recs, chunk_rows=4, task_steps=4, workers=0)


# ---- real extractions ----------------------------------------------------------------------------------


def _video(path: Path, seconds: float, *, seed: int, container: str = "mp4") -> Path:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * 30))
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    frames = (np.roll(base, 3 * i, axis=1) for i in range(n))  # moving content: steps differ
    wave = (0.2 * rng.standard_normal((1, int(seconds * 16000)))).astype(np.float32)
    return write_video(path, frames, fps=30, audio=wave, container=container)


def _config(**kw) -> ExtractConfig:
    kw = {"chunk_rows": 4, "task_steps": 64, "batch_steps": 3, "dtype": "float32", **kw}
    return ExtractConfig(students=STUDENTS, **kw)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with open_store(path) as s:
        return {name: s.read_rows(name, 0, s.rows) for name in ARRAYS}


def _assert_close(reference: Path, other: Path) -> None:
    """The same rows: masks and times exactly, features to float32 tolerance (a batch cut at a task end
    has other sizes, and matrix products round differently with them)."""
    x, y = _arrays(reference), _arrays(other)
    for name in ROW_ARRAYS:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    for name in FEATURES:
        assert x[name].dtype == np.float32 and np.isfinite(x[name]).all()
        np.testing.assert_allclose(x[name], y[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def client():
    from pipeline.cluster import ClusterConfig, open_client

    with open_client(ClusterConfig(workers=2, torch_threads=1, dashboard_address=None), announce=print) as c:
        yield c


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan-corpus")
    return {
        "a": _video(root / "a.mp4", 3.0, seed=1),  # 6 steps
        "b": _video(root / "b.mp4", 2.0, seed=2),  # 4 steps
        "long": _video(root / "long.mp4", 12.0, seed=3),  # 23 steps
    }


def _entries(videos: dict[str, Path], names: list[str]) -> list[CorpusEntry]:
    return [CorpusEntry(video_id=n, path=videos[n]) for n in names]


def test_small_corpus_uses_both_workers(videos, client, tmp_path):
    entries = _entries(videos, ["a", "b"])  # 10 steps: one task of 64 before version 2
    lines: list[str] = []
    report = run_extraction(entries, tmp_path / "store", _config(), client=client, log=lines.append)
    assert report.complete and report.tasks == report.tasks_run == 2 and report.ok == 2
    assert any("2 tasks for 2 workers (1 video(s) cut" in line for line in lines)
    with open_store(tmp_path / "store") as s:
        results = s.done_results()
        assert s.attrs["plan"]["version"] == 2 and s.attrs["plan"]["workers"] == 2
    assert len(results) == 2
    assert len({(r["host"], r["pid"]) for r in results.values()}) == 2  # each worker process ran a task
    assert check_store(tmp_path / "store") == []
    # The same rows as one serial task (the version-1 layout of these videos has no padding either).
    serial = run_extraction(entries, tmp_path / "serial", _config(), log=lambda _: None)
    assert serial.tasks == 1
    _assert_close(tmp_path / "serial", tmp_path / "store")


def test_a_long_video_spans_several_tasks_with_the_rows_of_one(videos, client, tmp_path):
    entries = _entries(videos, ["long"])
    config = _config(task_steps=8)  # 23 steps: 3 tasks of <= 8 rows, cut off the batch grid (3)
    report = run_extraction(entries, tmp_path / "split", config, client=client, log=lambda _: None)
    assert report.complete and report.tasks == 3 and report.ok == 1 and report.steps == 23
    with open_store(tmp_path / "split") as s:
        assert s.done_ranges() == [(0, 8), (8, 16), (16, 23)]
        assert len({(r["host"], r["pid"]) for r in s.done_results().values()}) == 2
    serial = run_extraction(entries, tmp_path / "one", _config(task_steps=64), log=lambda _: None)
    assert serial.tasks == 1
    _assert_close(tmp_path / "one", tmp_path / "split")
    y = _arrays(tmp_path / "split")
    # A resume on one worker keeps the recorded two-worker plan; repair reruns one piece bitwise.
    again = run_extraction(entries, tmp_path / "split", config, log=lambda _: None)
    assert again.complete and again.tasks_run == 0 and again.tasks == 3
    store = tmp_path / "split"
    with open_store(store) as s:
        files = [p for name in ARRAYS for p in s.files_of(name, 8, 16)]
    for path in files:
        (store / path).unlink(missing_ok=True)
    fixed = repair_store(store, log=lambda _: None)
    assert fixed.remaining == [] and fixed.tasks_rerun == [[8, 16]]
    z = _arrays(store)
    for name in ARRAYS:
        np.testing.assert_array_equal(y[name], z[name], err_msg=name)
    # Feature sets are added by the recorded tasks too: each piece decodes its own steps.
    for path in (store, tmp_path / "one"):
        added = add_features(path, "inputs", log=lambda _: None)
        assert added.complete and added.tasks_run == (3 if path == store else 1)
    assert check_store(store) == []
    with open_store(store) as a, open_store(tmp_path / "one") as b:
        for name in ("inputs_frame", "inputs_logmel"):
            np.testing.assert_array_equal(a.read_rows(name, 0, 23), b.read_rows(name, 0, 23), err_msg=name)


def test_a_cut_video_failing_in_one_piece_fails_as_a_whole(tmp_path, client):
    import av

    good = _video(tmp_path / "good.mp4", 2.0, seed=4)
    src = _video(tmp_path / "src.mp4", 12.0, seed=5)  # 23 steps after good's 4: in 3 tasks of 4 in all
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(1)
    with av.open(str(src)) as container:  # audio packets of 9-11 s overwritten: it probes fine, and only
        stream = container.streams.audio[0]  # the last piece's decode finds the audio cut short
        for p in container.demux(stream):
            if p.size and p.pos is not None and p.pts is not None and 9.0 <= float(p.pts * p.time_base) < 11:
                data[p.pos : p.pos + p.size] = rng.integers(0, 256, p.size, dtype=np.uint8).tobytes()
    (tmp_path / "bad.mp4").write_bytes(bytes(data))
    entries = [CorpusEntry("good", good), CorpusEntry("bad", tmp_path / "bad.mp4")]
    lines: list[str] = []
    config = _config(task_steps=8)
    report = run_extraction(entries, tmp_path / "store", config, client=client, log=lines.append)
    assert report.complete and report.ok == 1 and report.tasks == 4
    assert [f["video_id"] for f in report.failed] == ["bad"]
    assert report.failed[0]["reason"].startswith("audio truncated: decoded ")
    assert any("failed in one piece; rewriting" in line for line in lines)  # an ok piece was rewritten
    with open_store(tmp_path / "store") as s:
        rec = {r.video_id: r for r in s.videos()}
        assert rec["bad"].status == "failed" and rec["bad"].error == report.failed[0]["reason"]
        pieces = [v for r in s.done_results().values() for v in r["videos"] if v["video_id"] == "bad"]
        assert len(pieces) >= 2 and {v["status"] for v in pieces} == {"failed"}  # never half ok
        valid = s.read_rows("valid", rec["bad"].first_row, rec["bad"].first_row + rec["bad"].steps)
        assert not valid.any()  # no rows of the failed video are left behind
    assert check_store(tmp_path / "store") == []


@pytest.mark.parametrize("fmt", available_stores())
def test_a_plan_for_three_workers_run_serially_in_each_format(videos, fmt, tmp_path):
    entries = _entries(videos, ["a", "b"])  # 10 steps in 3 chunks of 4
    split = run_extraction(entries, tmp_path / "split", _config(store=fmt), workers=3, log=lambda _: None)
    assert split.complete and split.tasks == 3 and split.ok == 2
    whole = run_extraction(entries, tmp_path / "whole", _config(store=fmt), log=lambda _: None)
    assert whole.tasks == 1
    _assert_close(tmp_path / "whole", tmp_path / "split")
    assert check_store(tmp_path / "split") == []
    with open_store(tmp_path / "split") as s:
        assert s.done_ranges() == [(0, 4), (4, 8), (8, 10)]
        assert s.attrs["plan"]["workers"] == 3 and s.attrs["plan"]["split_videos"] == 2

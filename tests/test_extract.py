"""The extraction engine: planning, serial vs Dask, both store formats, failures, resume, locking.

Real parts only: media written by the real encoder, ``random:0:tiny`` students, a real Dask
LocalCluster with worker processes, real zarr / HDF5 stores read back with plain zarr and h5py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from indexing.stores import FEATURES, ROW_ARRAYS, VideoRecord, available_stores, open_store
from pipeline.corpus import read_corpus
from pipeline.encode import write_video
from pipeline.extract import ExtractConfig, run_extraction
from pipeline.plan import check_plan, plan_extraction

STUDENTS = "random:0:tiny"
ARRAYS = FEATURES + ROW_ARRAYS
REPO = Path(__file__).resolve().parents[1]


def _config(fmt: str = "zarr", **kw) -> ExtractConfig:
    return ExtractConfig(students=STUDENTS, store=fmt, chunk_rows=4, task_steps=4, batch_steps=4, **kw)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with open_store(path) as s:
        return {name: s.read_rows(name, 0, s.rows) for name in ARRAYS}


def _assert_same(a: Path, b: Path) -> None:
    x, y = _arrays(a), _arrays(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)  # bitwise (NaN-free)


# ---- plan ------------------------------------------------------------------------------------------


def _records(steps: list[int]) -> list[VideoRecord]:
    return [VideoRecord(f"v{i}", f"/data/v{i}.mp4", steps=s) for i, s in enumerate(steps)]


@pytest.mark.parametrize("chunk_rows,task_steps", [(4, 8), (8, 1), (1, 5), (16, 100)])
def test_plan_tasks_are_chunk_aligned_disjoint_and_cover_every_video(chunk_rows, task_steps):
    recs = _records([5, 0, 7, 3, 12, 1, 0, 4, 9])
    plan = plan_extraction(recs, chunk_rows=chunk_rows, task_steps=task_steps)
    check_plan(plan)
    owned = np.zeros(plan.rows, int)
    for t in plan.tasks:
        assert t.start % chunk_rows == 0
        assert t.stop % chunk_rows == 0 or t.stop == plan.rows
        owned[t.start : t.stop] += 1
        # Videos fill the task from its start; only its tail is padding.
        assert [v.first_row for v in t.videos] == list(
            t.start + np.cumsum([0] + [v.steps for v in t.videos])[:-1]
        )
    assert (owned == 1).all()  # every row belongs to exactly one task
    assert plan.steps == sum(r.steps for r in recs)
    assert plan.rows - plan.steps == sum(t.padding for t in plan.tasks)
    assert plan.tasks[-1].padding == 0  # the store never ends in padding
    planned = [v.video_id for t in plan.tasks for v in t.videos]
    assert planned == [r.video_id for r in recs if r.steps]


def test_plan_padding_and_failed_videos_get_no_rows():
    plan = plan_extraction(_records([5, 0, 7, 3]), chunk_rows=4, task_steps=4)
    assert [(t.start, t.stop, t.padding) for t in plan.tasks] == [(0, 8, 3), (8, 16, 1), (16, 19, 0)]
    failed = plan.records[1]
    assert (failed.first_row, failed.steps) == (0, 0)
    assert all(v.video_id != "v1" for t in plan.tasks for v in t.videos)
    assert [r.first_row for r in plan.records] == [0, 0, 8, 16]


def test_plan_is_deterministic_and_validated():
    recs = _records([3, 9, 1, 0, 6])
    a = plan_extraction(recs, chunk_rows=4, task_steps=6)
    b = plan_extraction([VideoRecord(**r.to_dict()) for r in recs], chunk_rows=4, task_steps=6)
    assert a == b and a.digest() == b.digest()
    assert a.digest() != plan_extraction(recs, chunk_rows=8, task_steps=6).digest()
    assert recs[1].first_row == 0  # inputs untouched
    with pytest.raises(ValueError, match="duplicate video id"):
        plan_extraction(recs + recs[:1], chunk_rows=4, task_steps=4)
    with pytest.raises(ValueError, match="chunk_rows"):
        plan_extraction(recs, chunk_rows=0, task_steps=4)
    empty = plan_extraction(_records([0, 0]), chunk_rows=4, task_steps=4)
    assert (empty.rows, empty.tasks) == (0, ())


def test_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="available"):
        ExtractConfig(students=STUDENTS, store="parquet")
    with pytest.raises(ValueError, match="chunk_rows"):
        ExtractConfig(students=STUDENTS, chunk_rows=0)
    with pytest.raises(ValueError, match="--students"):
        ExtractConfig(students=" ")
    assert ExtractConfig(students=STUDENTS, chunk_rows=16).task_steps == 32


# ---- corpus and reference stores ---------------------------------------------------------------


def _video(path: Path, seconds: float, *, fps: float = 30, audio: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fps))
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    frames = (np.roll(base, 3 * i, axis=1) for i in range(n))  # moving content: steps differ
    wave = (0.2 * rng.standard_normal((1, int(seconds * 16000)))).astype(np.float32) if audio else None
    return write_video(path, frames, fps=fps, audio=wave)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """6 steps a/x, 4 steps b/x (same basename), 3 steps silent c, 5 steps d at 25 fps; garbage + missing."""
    root = tmp_path_factory.mktemp("corpus")
    _video(root / "a" / "x.mp4", 3.0, seed=1)
    _video(root / "b" / "x.mp4", 2.0, seed=2)
    _video(root / "c_silent.mp4", 1.6, audio=False, seed=3)
    _video(root / "d.mp4", 2.2, fps=25, seed=4)
    (root / "garbage.mp4").write_bytes(b"\x00not a video\xff" * 64)
    manifest = root / "manifest.csv"
    rows = ["a/x.mp4", "b/x.mp4", "c_silent.mp4", "garbage.mp4", "missing.mp4", "d.mp4"]
    manifest.write_text("path,label\n" + "".join(f"{p},cls{i % 2}\n" for i, p in enumerate(rows)))
    return manifest


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted serial extraction per store format."""
    out = {}
    for fmt in available_stores():
        out[fmt] = tmp_path_factory.mktemp("ref") / f"store-{fmt}"
        report = run_extraction(corpus, out[fmt], _config(fmt))
        assert report.complete and report.tasks_run == 3
    return out


@pytest.fixture(scope="module")
def client():
    from pipeline.cluster import ClusterConfig, open_client

    with open_client(ClusterConfig(workers=2, torch_threads=1, dashboard_address=None), announce=print) as c:
        yield c


def test_store_contents_failures_and_audio_mask(reference):
    with open_store(reference["zarr"]) as s:
        recs = {r.video_id: r for r in s.videos()}
        assert list(recs) == ["a/x", "b/x", "c_silent", "garbage", "missing", "d"]
        assert {v: r.status for v, r in recs.items()} == {
            "a/x": "ok", "b/x": "ok", "c_silent": "ok", "garbage": "failed", "missing": "failed", "d": "ok"
        }  # fmt: skip
        assert recs["missing"].error == "file not found" and recs["garbage"].error
        assert recs["garbage"].steps == recs["missing"].steps == 0
        assert [recs[v].steps for v in ("a/x", "b/x", "c_silent", "d")] == [6, 4, 3, 5]
        assert recs["d"].fps == pytest.approx(25) and recs["a/x"].label == "cls0"
        # Duplicate basenames keep distinct ids and distinct rows.
        ax, bx = s.read_video("a/x"), s.read_video("b/x")
        assert not np.array_equal(ax["image"][:4], bx["image"])
        # No audio track: ok video, has_audio false, audio_valid false on every row, valid true.
        silent = s.read_video("c_silent")
        assert not recs["c_silent"].has_audio and recs["a/x"].has_audio
        assert silent["valid"].all() and not silent["audio_valid"].any() and ax["audio_valid"].all()
        np.testing.assert_allclose(silent["time_s"], np.arange(3) * 16 / 30)
        # Tasks [0, 8) a/x + 2 padding rows, [8, 12) b/x, [12, 20) c_silent + d: padding is not valid.
        valid = s.read_rows("valid", 0, s.rows)
        assert s.rows == 20 and valid.sum() == 18 and not valid[[6, 7]].any()
        assert not np.any(s.read_rows("fused", 6, 8))
        attrs = s.attrs
        assert attrs["models"]["students"]["random"] is True and attrs["models"]["students"]["sha256"]
        assert attrs["audio"]["n_mels"] == 40 and attrs["audio"]["hop_length"] == 160
        assert attrs["extraction"]["chunk_rows"] == 4 and attrs["plan"]["tasks"] == 3
        # The cost of the students that ran (tiny), not the paper's, is what evaluate will report.
        from indexing.flops import measured_gflops

        tiny = measured_gflops("tiny")
        assert attrs["gflops_per_step"]["students"] == pytest.approx(tiny["students"])
        assert attrs["gflops_per_step"]["students"] < measured_gflops("paper")["students"] / 5


def test_plain_zarr_and_h5py_readers_match_the_store_api(reference):
    import h5py
    import zarr

    for fmt, path in reference.items():
        with open_store(path) as s:
            rec = s.video("d")
            api = s.read_video("d")
        a, b = rec.first_row, rec.first_row + rec.steps
        if fmt == "zarr":
            g = zarr.open_group(str(path), mode="r")
            plain = {n: g[f"features/{n}" if n in FEATURES else n][a:b] for n in ARRAYS}
        else:
            with h5py.File(path / "store.h5", "r") as f:
                plain = {n: f[f"features/{n}" if n in FEATURES else n][a:b] for n in ARRAYS}
        for n in ARRAYS:
            np.testing.assert_array_equal(plain[n], api[n], err_msg=f"{fmt} {n}")


def test_formats_hold_the_same_features(reference):
    assert len(reference) >= 2, f"only {list(reference)}: nothing to compare the formats with"
    first, *others = reference.values()
    for other in others:
        _assert_same(first, other)


@pytest.mark.parametrize("fmt", available_stores())
def test_dask_local_cluster_matches_serial(corpus, reference, client, tmp_path, fmt):
    report = run_extraction(corpus, tmp_path / "store", _config(fmt), client=client)
    assert report.complete and report.tasks_run == 3 and len(report.failed) == 2
    _assert_same(reference[fmt], tmp_path / "store")
    with open_store(reference[fmt]) as a, open_store(tmp_path / "store") as b:
        assert a.videos() == b.videos()


@pytest.mark.parametrize("fmt", available_stores())
def test_repair_on_a_dask_cluster_restores_the_serial_store(reference, client, tmp_path, fmt):
    from indexing.stores.tools import check_store
    from pipeline.extract import repair_store

    store = tmp_path / "store"
    shutil.copytree(reference[fmt], store)
    with open_store(store) as s:
        files = [p for name in ARRAYS for p in s.files_of(name, *s.done_ranges()[0])]
    for path in files:
        (store / path).unlink(missing_ok=True)  # every file of the first task
    assert {p.kind for p in check_store(store)} == {"missing"}
    report = repair_store(store, client=client, log=lambda _: None)
    assert report.remaining == [] and len(report.tasks_rerun) == 1
    _assert_same(reference[fmt], store)


def test_resume_after_partial_run_recomputes_only_unfinished_tasks(corpus, reference, tmp_path):
    store = tmp_path / "store"
    first = run_extraction(corpus, store, _config(), max_tasks=1)
    assert not first.complete and first.tasks_run == 1 and first.tasks_left == 2
    with open_store(store) as s:
        assert sum(r.status == "pending" for r in s.videos()) == 3
    lines: list[str] = []
    second = run_extraction(corpus, store, _config(), resume=True, log=lines.append)
    assert second.complete and second.resumed and (second.tasks_run, second.tasks_skipped) == (2, 1)
    assert any("1 of 3 tasks done, 2 to run" in line for line in lines)
    _assert_same(reference["zarr"], store)
    third = run_extraction(corpus, store, _config())  # complete already: nothing to do
    assert third.complete and third.tasks_run == 0 and third.ok == 4


def test_resume_refuses_another_config_or_corpus(corpus, reference, tmp_path):
    with pytest.raises(ValueError, match="chunk_rows.*new store path"):
        run_extraction(corpus, reference["zarr"], ExtractConfig(students=STUDENTS, chunk_rows=8))
    with pytest.raises(ValueError, match="students.*new store path"):
        cfg = ExtractConfig(students="random:1:tiny", chunk_rows=4, task_steps=4, batch_steps=4)
        run_extraction(corpus, reference["zarr"], cfg)
    other = read_corpus(corpus)[:2]
    with pytest.raises(ValueError, match="corpus"):
        run_extraction(other, reference["zarr"], _config())
    with pytest.raises(ValueError, match="hdf5 store"):
        run_extraction(corpus, reference["hdf5"], _config("zarr"))
    with pytest.raises(ValueError, match="no store"):
        run_extraction(corpus, tmp_path / "nothing", _config(), resume=True)


def test_video_failing_during_extraction_is_masked_and_others_complete(corpus, tmp_path):
    """A file replaced between planning and its task fails alone; its rows stay, invalid and zero."""
    import shutil

    root = tmp_path / "c"
    shutil.copytree(corpus.parent, root)
    store = tmp_path / "store"
    run_extraction(root / "manifest.csv", store, _config(), max_tasks=0)  # plan + create only
    _video(root / "b" / "x.mp4", 1.0, seed=9)  # 2 steps now, 4 planned
    report = run_extraction(root / "manifest.csv", store, _config())
    assert report.complete and report.ok == 3
    reasons = {f["video_id"]: f["reason"] for f in report.failed}
    assert "the file changed" in reasons["b/x"]
    with open_store(store) as s:
        bx = s.read_video("b/x")
        assert s.video("b/x").steps == 4 and s.video("b/x").status == "failed"
        assert not bx["valid"].any() and not np.any(bx["fused"])
        assert s.read_video("c_silent")["valid"].all()


def test_cli_lists_failures_and_exits_nonzero(corpus, tmp_path):
    from cli import main

    store = tmp_path / "store"
    args = ["extract", str(corpus), str(store), "--students", STUDENTS, "--workers", "0", "--chunk-rows", "4"]
    args += ["--task-steps", "4", "--batch-steps", "4", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "garbage" in result.stderr and "missing.mp4" in result.stderr and "file not found" in result.stderr
    assert "4 ok, 2 failed, 0 pending" in result.stdout
    result = CliRunner().invoke(main, args + ["--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (
        report["tasks_skipped"] == 3
        and report["complete"]
        and report["failed"] == len(report["failures"]) == 2
    )
    result = CliRunner().invoke(main, args + ["--chunk-rows", "8"])
    assert result.exit_code == 2 and "new store path" in result.stderr


def test_second_writer_is_refused_while_locked(corpus, reference):
    from cli import main

    with open_store(reference["zarr"], "r+") as s, s.lock():
        with pytest.raises(ValueError, match="locked by another writer"):
            run_extraction(corpus, reference["zarr"], _config())
        args = ["extract", str(corpus), str(reference["zarr"]), "--students", STUDENTS, "--workers", "0"]
        result = CliRunner().invoke(
            main, args + ["--chunk-rows", "4", "--task-steps", "4", "--batch-steps", "4"]
        )
        assert result.exit_code == 4 and "locked" in result.stderr


def test_killed_cli_run_resumes_bitwise(corpus, reference, tmp_path):
    """SIGKILL a real `l2l extract` after its first task; rerunning finishes only what is left."""
    config = ["--chunk-rows", "4", "--task-steps", "4", "--batch-steps", "4", "--no-progress"]
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "cli", "extract", str(corpus), str(store), "--students", STUDENTS]
    proc = subprocess.Popen(
        cmd + ["--workers", "0", *config], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    try:
        while not (store / "done").is_dir() or not any((store / "done").iterdir()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"l2l extract ended or stalled early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (store / "write.lock").exists()  # left behind by the killed writer; its pid is dead

    from cli import main

    args = [
        "extract",
        str(corpus),
        str(store),
        "--students",
        STUDENTS,
        "--workers",
        "0",
        "--resume",
        "--json",
    ]
    result = CliRunner().invoke(main, args + config)
    assert result.exit_code == 1, result.output  # the two bad files
    report = json.loads(result.stdout)
    assert report["resumed"] and report["tasks_run"] >= 1 and report["tasks_skipped"] >= 1
    assert report["tasks_run"] + report["tasks_skipped"] == 3
    _assert_same(reference["zarr"], store)


# ---- feature sets: teacher and inputs over the same rows -------------------------------------------

SETS = "image,audio,fused,teacher,inputs"
SET_ARRAYS = ("teacher", "inputs_frame", "inputs_logmel")


def _all_arrays(path: Path) -> dict[str, np.ndarray]:
    with open_store(path) as s:
        return {name: s.read_rows(name, 0, s.rows) for name in s.array_names()}


@pytest.fixture(scope="module")
def with_sets(corpus, tmp_path_factory) -> Path:
    """The corpus extracted with the teacher's descriptors and the students' inputs."""
    path = tmp_path_factory.mktemp("sets") / "store"
    report = run_extraction(corpus, path, _config(features=SETS, teacher="preset:tiny"))
    assert report.complete and report.tasks_run == 3
    return path


def test_feature_sets_are_a_registry_behind_config_and_cli(corpus, tmp_path):
    from cli import main
    from indexing.errors import ConfigError
    from indexing.feature_sets import available_feature_sets

    assert {"image", "audio", "fused", "teacher", "inputs"} <= set(available_feature_sets())
    help_text = CliRunner().invoke(main, ["extract", "--help"]).output
    assert all(name in help_text for name in available_feature_sets()) and "--add-features" in help_text
    with pytest.raises(ConfigError, match="available: image, audio, fused, teacher, inputs"):
        ExtractConfig(students=STUDENTS, features="image,audio,fused,bogus")
    with pytest.raises(ConfigError, match="--features image,audio,fused,teacher"):
        ExtractConfig(students=STUDENTS, features="teacher", teacher="preset:tiny")
    with pytest.raises(ConfigError, match="--teacher-weights"):
        ExtractConfig(students=STUDENTS, features=SETS)  # a teacher set without a teacher
    assert ExtractConfig(students=STUDENTS).features == ("image", "audio", "fused")
    if "hdf5" in available_stores():  # a backend that cannot hold other sets says so before any work
        with pytest.raises(ConfigError, match="--format zarr"):
            run_extraction(corpus, tmp_path / "h5", _config("hdf5", features=SETS, teacher="preset:tiny"))
        assert not (tmp_path / "h5").exists()


def test_extra_sets_keep_the_students_rows_and_hold_what_training_reads(corpus, reference, with_sets):
    import torch

    from indexing.frontend import clips_to_tensor, frames_to_tensor, log_mel
    from indexing.models import load_teacher
    from indexing.stores.tools import check_store, store_info
    from pipeline.extract import cached_students
    from pipeline.media import read_steps

    _assert_same(reference["zarr"], with_sets)  # the students' arrays: bitwise the default extraction's
    with open_store(reference["zarr"]) as ref, open_store(with_sets) as s:
        for name in ARRAYS:  # and the very same chunk bytes
            for path in ref.files_of(name, 0, ref.rows):
                assert (ref.path / path).read_bytes() == (s.path / path).read_bytes(), path
        rec = s.video("a/x")
        got = s.read_video("a/x", names=SET_ARRAYS + ("fused",))
    batch = read_steps(corpus.parent / "a" / "x.mp4", range(rec.steps), with_clips=True)
    np.testing.assert_array_equal(got["inputs_frame"], batch.frames)  # (6, 112, 112, 3) uint8
    np.testing.assert_array_equal(got["inputs_logmel"], log_mel(torch.as_tensor(batch.audio)).numpy())
    teacher, meta = load_teacher(preset="tiny")
    with torch.no_grad():
        want = teacher(clips_to_tensor(batch.clips)).numpy()  # (6, 512)
    np.testing.assert_allclose(got["teacher"].astype(np.float32), want, rtol=2e-3, atol=2e-3)
    # The stored inputs give the students what the video gives them: decode-free epochs see the same data.
    students, _ = cached_students(STUDENTS, "cpu")
    with torch.no_grad():
        frames = frames_to_tensor(torch.as_tensor(got["inputs_frame"]))
        fused = students(frames, torch.as_tensor(got["inputs_logmel"]))["z_ia"].numpy()
    np.testing.assert_allclose(got["fused"].astype(np.float32), fused, rtol=2e-3, atol=2e-3)
    info = store_info(with_sets)
    sets = info["feature_sets"]
    assert list(sets) == ["image", "audio", "fused", "teacher", "inputs"]
    assert sets["teacher"]["sha256"] == meta["sha256"] and sets["teacher"]["spec"] == "preset:tiny"
    assert sets["fused"]["sha256"] == info["models"]["students"]["sha256"]
    assert sets["inputs"]["arrays"] == ["inputs_frame", "inputs_logmel"]
    assert all(fs["tasks_done"] == 3 for fs in sets.values())
    assert check_store(with_sets) == []
    from cli import main

    listing = CliRunner().invoke(main, ["store", "ls", str(with_sets)])
    assert listing.exit_code == 0 and f"teacher (teacher {meta['sha256'][:12]})" in listing.stderr
    assert "inputs (none -)" in listing.stderr and listing.stdout.startswith("video_id")
    from indexing.flops import measured_gflops

    with open_store(with_sets) as s, open_store(reference["zarr"]) as ref:  # recognition cost: this teacher's
        assert s.attrs["gflops_per_step"]["teacher_clip"] == measured_gflops("tiny")["teacher_clip"]
        assert ref.attrs["gflops_per_step"]["teacher_clip"] == measured_gflops("paper")["teacher_clip"]


def test_add_features_by_the_same_tasks_resumes_and_equals_extracting_them(
    reference, with_sets, client, tmp_path
):
    from cli import main
    from indexing.errors import StoreError
    from indexing.stores.tools import check_store, store_info
    from pipeline.extract import add_features

    store = tmp_path / "store"
    shutil.copytree(reference["zarr"], store)
    first = add_features(store, "teacher", teacher="preset:tiny", max_tasks=1, log=lambda _: None)
    assert not first.complete and (first.tasks_run, first.tasks_left) == (1, 2)
    with open_store(store) as s:  # rows no task has written yet are refused, never read as zeros
        with pytest.raises(StoreError, match="--add-features teacher"):
            s.read_rows("teacher", 0, s.rows)
        assert s.read_rows("teacher", 0, 4).any()  # the finished task reads
    assert store_info(store)["feature_sets"]["teacher"]["tasks_done"] == 1
    # On a Dask cluster: the teacher's two tasks left and all three for the inputs.
    second = add_features(store, "teacher,inputs", teacher="preset:tiny", client=client, log=lambda _: None)
    assert second.complete and (second.tasks_run, second.tasks_skipped) == (3, 0)
    got, want = _all_arrays(store), _all_arrays(with_sets)
    assert set(got) == set(want)
    for name in want:  # bitwise what extracting them with the students gave
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert check_store(store) == []
    args = ["extract", "--add-features", "teacher", str(store), "--teacher-preset", "tiny", "--workers", "0"]
    result = CliRunner().invoke(main, args + ["--json", "--no-progress"])
    assert result.exit_code == 1, result.output  # the corpus's two bad files are listed again
    report = json.loads(result.stdout)
    assert report["complete"] and report["tasks_run"] == 0 and report["tasks_skipped"] == 3
    result = CliRunner().invoke(main, ["extract", "--add-features", "image", str(store), "--workers", "0"])
    assert result.exit_code == 2 and "in every store" in result.stderr
    result = CliRunner().invoke(main, ["extract", "--add-features", "teacher", str(store), "--workers", "0"])
    assert result.exit_code == 2 and "--teacher-weights" in result.stderr


def test_check_and_repair_cover_a_feature_set(with_sets, tmp_path):
    from indexing.stores.tools import check_store
    from pipeline.extract import repair_store

    store = tmp_path / "store"
    shutil.copytree(with_sets, store)
    with open_store(store) as s:
        task = s.done_ranges()[1]
        teacher_file = s.files_of("teacher", *task)[0]
        frame_file = s.files_of("inputs_frame", *s.done_ranges()[2])[0]
    (store / teacher_file).unlink()
    (store / frame_file).write_bytes((store / frame_file).read_bytes()[:-7])
    found = check_store(store)
    assert {(p.kind, p.array) for p in found} == {("missing", teacher_file), ("truncated", frame_file)}
    report = repair_store(store, log=lambda _: None)
    assert report.remaining == [] and len(report.tasks_rerun) == 2
    got, want = _all_arrays(store), _all_arrays(with_sets)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_export_carries_feature_sets_or_refuses(with_sets, tmp_path):
    from indexing.errors import ConfigError
    from indexing.stores.tools import check_store, export_store

    export_store(with_sets, tmp_path / "copy", "zarr", compression="blosc-lz4")
    got, want = _all_arrays(tmp_path / "copy"), _all_arrays(with_sets)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert check_store(tmp_path / "copy") == []
    for fmt in set(available_stores()) - {"zarr"}:  # a backend without other sets: refused, nothing written
        with pytest.raises(ConfigError, match="export it to zarr"):
            export_store(with_sets, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()


def test_torchvision_image_model_sets_from_local_weights(corpus, reference, tmp_path):
    import torch
    import torchvision

    from cli import main
    from indexing.checkpoint import weights_sha256
    from indexing.errors import CheckpointError, ConfigError
    from indexing.feature_sets import IMAGE_MODELS, image_model_sets, load_image_model
    from indexing.frontend import frames_to_tensor
    from indexing.stores.tools import check_store, store_info
    from pipeline.media import read_steps

    assert image_model_sets() == list(IMAGE_MODELS)
    # The registered sizes (meta device: no weights, no time).
    for name, (dim, head, _) in IMAGE_MODELS.items():
        with torch.device("meta"):
            net = torchvision.models.get_model(name, weights=None)
        parent, _, leaf = head.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, torch.nn.Identity())
        assert net.eval()(torch.empty(2, 3, 112, 112, device="meta")).shape == (2, dim), name
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()  # a random-init model saved as a user would
    weights = tmp_path / "r18.pth"
    torch.save(model.state_dict(), weights)
    store = tmp_path / "store"
    shutil.copytree(reference["zarr"], store)
    args = ["extract", "--add-features", "resnet18", str(store), "--model-weights", f"resnet18={weights}"]
    result = CliRunner().invoke(main, [*args, "--workers", "0", "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["complete"], result.output  # 1: failed videos
    fs = store_info(store)["feature_sets"]["resnet18"]
    assert fs["model"] == "torchvision:resnet18" and fs["spec"] == str(weights)
    assert fs["sha256"] == weights_sha256(model.state_dict()) and fs["tasks_done"] == 3
    with open_store(store) as s:
        assert s.feature_sets()["resnet18"]["shapes"]["resnet18"] == {"shape": [512], "dtype": "float16"}
        rec = s.video("a/x")
        got = s.read_video("a/x", names=("resnet18",))["resnet18"]  # (6, 512) float16
    frames = read_steps(corpus.parent / "a" / "x.mp4", range(rec.steps)).frames
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        want = model(frames_to_tensor(torch.as_tensor(frames))).numpy()  # (6, 512) pooled descriptor
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    assert check_store(store) == []
    listing = CliRunner().invoke(main, ["store", "ls", str(store)])
    assert f"resnet18 (torchvision:resnet18 {fs['sha256'][:12]})" in listing.stderr
    # Refused: a set without weights, weights of a set not asked for, another model's weights.
    with pytest.raises(ConfigError, match="--model-weights resnet18=PATH"):
        ExtractConfig(students=STUDENTS, features="image,audio,fused,resnet18")
    with pytest.raises(ConfigError, match="not among the feature sets"):
        ExtractConfig(students=STUDENTS, model_weights=(f"resnet50={weights}",))
    with pytest.raises(CheckpointError, match="not a torchvision resnet34 state dict"):
        load_image_model("resnet34", str(weights))

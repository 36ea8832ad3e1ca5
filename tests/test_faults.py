"""Faults, bad input and real clusters (issue 7), on real processes.

A real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, real ``l2l extract``
processes killed with SIGKILL, a real full disk (a small tmpfs, see the disk-full test), real damaged
media and stores, a real malicious pickle. Everything a test starts runs in its own session and is killed
(process group) when the test ends. Every store is compared bitwise with one uninterrupted
``l2l extract --workers 2`` (LocalCluster) run of the same corpus.

Not repeated here (see ``test_extract.py``): serial vs LocalCluster equality, a killed serial CLI run,
the lock held in-process; probe reasons of every damage kind (``test_media.py``).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from indexing.errors import StoreError
from indexing.stores import FEATURES, ROW_ARRAYS, available_stores, open_store
from indexing.stores.tools import check_store, export_store, store_check
from pipeline.encode import write_video

REPO = Path(__file__).resolve().parents[1]
# `dask scheduler` / `dask worker`, run as modules so no console script has to be on PATH.
SCHEDULER = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]
STUDENTS = "random:0:tiny"
LAYOUT = ["--chunk-rows", "4", "--task-steps", "4", "--batch-steps", "4", "--no-progress"]
ARRAYS = FEATURES + ROW_ARRAYS
VIDEOS = 8  # 4-6 steps each, one task per video: the run is still going when the first task is done
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---- helpers ----------------------------------------------------------------------------------------


def _video(path: Path, seconds: float, *, fps: float = 30, audio: bool = True, seed: int = 0, **kw) -> Path:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fps))
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    frames = (np.roll(base, 3 * i, axis=1) for i in range(n))  # moving content: steps differ
    wave = (0.2 * rng.standard_normal((1, int(seconds * 16000)))).astype(np.float32) if audio else None
    return write_video(path, frames, fps=fps, audio=wave, threads=1, **kw)


def _extract_args(corpus: Path, store: Path, *more: str) -> list[str]:
    return ["extract", str(corpus), str(store), "--students", STUDENTS, *LAYOUT, *more]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with open_store(path) as s:
        return {name: s.read_rows(name, 0, s.rows) for name in ARRAYS}


def _assert_same_store(reference: Path, other: Path) -> None:
    """Bitwise equal rows, the same index and the same finished tasks."""
    x, y = _arrays(reference), _arrays(other)
    for name in ARRAYS:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    with open_store(reference) as a, open_store(other) as b:
        assert a.videos() == b.videos()
        assert a.done_ranges() == b.done_ranges()


def _assert_rows_once(store: Path) -> None:
    """No row lost or duplicated: video ranges disjoint, exactly their rows valid, store_check clean."""
    assert store_check(store) == []
    with open_store(store) as s:
        ranges = sorted((r.first_row, r.first_row + r.steps) for r in s.videos() if r.status == "ok")
        assert all(b0 <= a1 for (_, b0), (a1, _) in zip(ranges, ranges[1:], strict=False))
        owned = np.zeros(s.rows, bool)
        for a, b in ranges:
            owned[a:b] = True
        np.testing.assert_array_equal(s.read_rows("valid", 0, s.rows), owned)
        done = s.done_ranges()
        assert done[0][0] == 0 and done[-1][1] == s.rows
        assert all(b0 == a1 for (_, b0), (a1, _) in zip(done, done[1:], strict=False))  # tasks tile the rows


def _done(store: Path) -> list[str]:
    folder = store / "done"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def _wait(what: str, ready: Callable[[], bool], *, proc: subprocess.Popen | None = None, timeout_s=90.0):
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}: {_tail(proc)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _tail(proc: subprocess.Popen) -> str:
    log = getattr(proc, "log_path", None)
    return log.read_text(errors="replace")[-3000:] if log and log.exists() else ""


class Processes:
    """Processes started in their own sessions; :meth:`stop` kills every group that is left."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, cmd: list[str], name: str, **kw) -> subprocess.Popen:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=kw.pop("env", ENV), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, **kw,
            )  # fmt: skip
        proc.log_path = log_path
        self.started.append(proc)
        return proc

    def l2l(self, args: list[str], name: str, **kw) -> subprocess.Popen:
        """A real ``l2l`` process; its stdout goes to ``<name>.out``, stderr to ``<name>.log``."""
        log_path, out_path = self.logs / f"{name}.log", self.logs / f"{name}.out"
        with open(log_path, "wb") as log, open(out_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cli", *args], cwd=REPO, env=kw.pop("env", ENV), stdout=out,
                stderr=log, start_new_session=True, **kw,
            )  # fmt: skip
        proc.log_path, proc.out_path = log_path, out_path
        self.started.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.started):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


def _finish(proc: subprocess.Popen, timeout_s: float = 120) -> tuple[int, str, str]:
    """Wait for an ``l2l`` process; returns (rc, stdout, stderr)."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"l2l did not finish in {timeout_s} s: {_tail(proc)}")
    return proc.returncode, proc.out_path.read_text(), proc.log_path.read_text()


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.stop()


# ---- corpus, cluster, reference ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """8 videos of 2-3 s (4-6 steps each): 8 tasks of one video."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(VIDEOS):
        _video(root / f"v{i:02d}.mp4", 2.0 + 0.5 * (i % 3), seed=i)
    return root


@dataclass
class Cluster:
    address: str
    client: Any  # the test's own distributed.Client, to inspect the workers

    def worker_pids(self) -> dict[str, int]:
        return self.client.run(os.getpid)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real ``dask scheduler`` and two ``dask worker`` processes (one thread each) on loopback.

    The workers run without a nanny, so a killed worker stays dead (a lost node) and a test that kills
    one leaves one worker to the tests after it.
    """
    from distributed import Client

    logs = tmp_path_factory.mktemp("cluster")
    processes = Processes(logs)
    client = None
    try:
        sched_file = logs / "scheduler.json"
        processes.start(
            [*SCHEDULER, "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(sched_file)],
            "scheduler",
        )  # fmt: skip
        for i in range(2):
            processes.start(
                [*WORKER, "--scheduler-file", str(sched_file), "--nthreads", "1", "--no-nanny",
                 "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "0", "--death-timeout", "60",
                 "--name", f"w{i}", "--local-directory", str(logs / f"w{i}")],
                f"worker{i}",
            )  # fmt: skip
        client = Client(scheduler_file=str(sched_file), timeout=60)
        client.wait_for_workers(2, timeout=120)
        address = client.scheduler.address
        assert address.startswith("tcp://127.0.0.1:")
        yield Cluster(address, client)
    finally:
        if client is not None:
            client.close()
        processes.stop()


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run every store here must equal: ``l2l extract --workers 2`` (LocalCluster)."""
    store = tmp_path_factory.mktemp("reference") / "store"
    result = CliRunner().invoke(main, _extract_args(corpus, store, "--workers", "2", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["complete"] and report["tasks_run"] == report["tasks"] == VIDEOS and report["ok"] == VIDEOS
    assert "dask local cluster" in result.stderr
    _assert_rows_once(store)
    return store


# ---- 1. a real external cluster ---------------------------------------------------------------------------


def test_external_scheduler_gives_the_local_cluster_store(corpus, reference, cluster, tmp_path):
    store = tmp_path / "store"
    result = CliRunner().invoke(main, _extract_args(corpus, store, "--scheduler", cluster.address, "--json"))
    assert result.exit_code == 0, result.output
    assert f"dask scheduler cluster at {cluster.address}" in result.stderr
    report = json.loads(result.stdout)
    assert report["complete"] and report["tasks_run"] == VIDEOS and report["ok"] == VIDEOS
    _assert_same_store(reference, store)
    _assert_rows_once(store)
    # The tasks ran in the two external worker processes, not in the client.
    pids = {r["pid"] for r in _results(store).values()}
    assert pids == set(cluster.worker_pids().values())


# ---- 2. a worker killed mid-run -----------------------------------------------------------------------


def test_worker_killed_mid_run_loses_and_duplicates_nothing(corpus, reference, cluster, tmp_path):
    store = tmp_path / "store"
    killed: dict[str, Any] = {}

    def kill_a_busy_worker() -> None:  # runs beside the blocking CLI call
        try:
            deadline = time.monotonic() + 90
            while len(_done(store)) < 1:  # the first task is finished: the run is under way
                if time.monotonic() > deadline:
                    raise TimeoutError("no task finished in 90 s")
                time.sleep(0.02)
            busy = sorted(w for w, keys in cluster.client.processing().items() if keys)
            killed["done"] = len(_done(store))
            killed["pid"] = cluster.worker_pids()[busy[0]]  # IndexError: no worker holds a task
            os.kill(killed["pid"], signal.SIGKILL)
        except Exception as err:  # noqa: BLE001 - reported by the test below
            killed["error"] = err

    pids_before = set(cluster.worker_pids().values())
    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    result = CliRunner().invoke(main, _extract_args(corpus, store, "--scheduler", cluster.address, "--json"))
    killer.join(timeout=120)
    assert "error" not in killed, killed
    assert killed["done"] < VIDEOS  # the kill landed mid-run

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["complete"] and report["tasks_run"] == VIDEOS and not report["task_errors"]
    _assert_same_store(reference, store)
    _assert_rows_once(store)
    results = list(_results(store).values())
    assert len(results) == VIDEOS
    # The killed worker is gone for good; the other one finished its tasks.
    _wait("the killed worker to leave", lambda: len(cluster.client.scheduler_info()["workers"]) == 1)
    assert killed["pid"] in pids_before and killed["pid"] not in cluster.worker_pids().values()
    assert any(r["pid"] != killed["pid"] for r in results)


# ---- 3. the client killed mid-run ---------------------------------------------------------------------


def _quiet(cluster: Cluster) -> bool:
    """The scheduler holds no task (so it starts none) and no worker is still running one."""
    if cluster.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
        return False
    return not any(cluster.client.run(lambda dask_worker: len(dask_worker.state.executing)).values())


def test_killed_client_resumes_with_only_unfinished_tasks(corpus, cluster, reference, tmp_path, procs):
    store = tmp_path / "store"
    args = _extract_args(corpus, store, "--scheduler", cluster.address, "--json")
    proc = procs.l2l(args, "killed")
    _wait("the first finished task", lambda: len(_done(store)) >= 1, proc=proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The scheduler forgets the dead client's tasks, but a task already running finishes and marks itself
    # done: wait for that, so the count below is final.
    _wait("a quiet cluster", lambda: _quiet(cluster))
    done = _done(store)
    assert 1 <= len(done) < VIDEOS, done
    before = _results(store)
    assert (store / "write.lock").exists()  # left by the killed client; its pid is dead

    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"{len(done)} of {VIDEOS} tasks done, {VIDEOS - len(done)} to run" in result.stderr
    report = json.loads(result.stdout)
    assert report["resumed"] and report["complete"]
    assert (report["tasks_skipped"], report["tasks_run"]) == (len(done), VIDEOS - len(done))
    after = _results(store)
    assert len(after) == VIDEOS
    assert all(after[name] == data for name, data in before.items())  # finished tasks were not rerun
    _assert_same_store(reference, store)
    _assert_rows_once(store)


# ---- 4. unwritable store path, full disk ----------------------------------------------------------------


def test_store_path_under_a_file_is_a_clear_error(corpus, tmp_path):
    """A parent that is a regular file fails for root too (chmod would not stop root)."""
    small = tmp_path / "small"
    small.mkdir()
    for name in ("v00.mp4", "v01.mp4"):
        shutil.copy(corpus / name, small / name)
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file, not a directory")
    store = blocker / "store"
    args = _extract_args(small, store, "--workers", "0")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"'{blocker}' is a file, not a folder; fix the path" in result.stderr, result.stderr
    assert not list(tmp_path.glob("blocker*/**/*")), "refused before writing anything"
    blocker.unlink()  # fix the path
    blocker.mkdir()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert store_check(store) == []


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        )
    except OSError:  # no mount(8) here
        return False
    return done.returncode == 0


def _fill(where: Path, leave_bytes: int) -> Path:
    """Take all free space of the file system at ``where`` but ``leave_bytes``."""
    st = os.statvfs(where)
    filler = where / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave_bytes))
    return filler


def test_disk_full_is_a_clear_error_and_resumes(corpus, reference, tmp_path, procs):
    """A real full disk: a 4 MiB tmpfs filled up after the store is created (tasks then fail to write).

    Where mounting is not allowed (a container without CAP_SYS_ADMIN), the same run gets a file-size
    limit instead (RLIMIT_FSIZE, which binds root too): the kernel refuses the writes with EFBIG.
    """
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "4m")
    try:
        store = disk / "store"
        args = _extract_args(corpus, store, "--workers", "0")
        created = CliRunner().invoke(main, [*args, "--max-tasks", "0"])  # plan and create only
        assert created.exit_code == 3, created.output
        if mounted:
            filler = _fill(disk, 48 * 1024)  # room for the lock and about one task
            proc, cause = procs.l2l(args, "full"), "No space left on device"
        else:

            def limit() -> None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

            proc, cause = procs.l2l(args, "full", preexec_fn=limit), "File too large"
        rc, out, err = _finish(proc)
        assert rc == 2, err
        assert f"error: {store}: {cause}; free space or fix the path" in err, err
        assert "Traceback" not in err
        # The store is still readable and sound; only some tasks (or none) got done.
        assert store_check(store) == []
        with open_store(store) as s:
            assert [r.video_id for r in s.videos()] == [f"v{i:02d}" for i in range(VIDEOS)]
            done = len(s.done_ranges())
        assert done < VIDEOS
        assert not (store / "write.lock").exists()

        if mounted:
            filler.unlink()  # free space
        result = CliRunner().invoke(main, [*args, "--json"])
        assert result.exit_code == 0, result.output
        assert f"{done} of {VIDEOS} tasks done" in result.stderr
        report = json.loads(result.stdout)
        assert report["complete"] and report["tasks_run"] == VIDEOS - done
        _assert_same_store(reference, store)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


# ---- 5. a corpus of bad inputs ------------------------------------------------------------------------


def _write_bad_inputs(root: Path) -> dict[str, str]:
    """Every kind of bad input next to good videos; returns manifest path -> expected reason ('' = ok)."""
    import av

    good = _video(root / "good.mp4", 3.0, seed=1)
    _video(root / "good2.mp4", 2.0, seed=2)
    _video(root / "silent.mp4", 2.0, audio=False, seed=3)
    _video(root / "short.mp4", 10 / 30, seed=4)  # 0.33 s: less than one 0.53 s step
    (root / "empty.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(np.random.default_rng(5).integers(0, 256, 20000, np.uint8).tobytes())
    data = good.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) * 6 // 10])  # the mp4 index (moov) is at the end
    mkv = _video(root / "middle.mkv", 6.0, seed=6, container="mkv").read_bytes()
    lo, hi = len(mkv) * 4 // 10, len(mkv) * 5 // 10
    noise = np.random.default_rng(7).integers(0, 256, hi - lo, np.uint8).tobytes()
    (root / "middle.mkv").write_bytes(mkv[:lo] + noise + mkv[hi:])
    # A video stream in a codec FFmpeg does not know: the sample entry's fourcc avc1 renamed.
    (root / "codec.mp4").write_bytes(data.replace(b"avc1", b"l2lx"))
    with av.open(str(root / "audio_only.m4a"), "w") as out:  # a container without a video stream
        stream = out.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    with av.open(str(root / "zero_frames.avi"), "w") as out:  # a video stream header and no frame at all
        stream = out.add_stream("mjpeg", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        out.start_encoding()
    write_video(root / "huge.avi", [np.zeros((48, 8200, 3), np.uint8)] * 2, container="avi")
    (root / "dir.mp4").mkdir()
    return {
        "good.mp4": "",
        "missing.mp4": "file not found",
        "empty.mp4": "empty file",
        "garbage.mp4": "not a media file (",
        "truncated.mp4": "truncated (moov atom not found",
        "middle.mkv": "corrupt data near frame ",
        "silent.mp4": "",
        "short.mp4": "",
        "codec.mp4": "unsupported video codec (",
        "audio_only.m4a": "no video stream",
        "zero_frames.avi": "shorter than one frame (no video frames)",
        "huge.avi": "absurd dimensions 8200x48 (limit 8192)",
        "dir.mp4": "is a directory",
        "good2.mp4": "",
    }


def test_bad_inputs_fail_alone_with_their_reasons(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    expected = _write_bad_inputs(root)
    manifest = root / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in expected))
    store = tmp_path / "store"
    result = CliRunner().invoke(main, _extract_args(manifest, store, "--workers", "0"))
    bad = [p for p, why in expected.items() if why]
    assert result.exit_code == 1, result.output
    assert f"{len(expected) - len(bad)} ok, {len(bad)} failed, 0 pending" in result.stdout
    assert f"{len(bad)} video(s) failed" in result.stderr
    listed = re.findall(r"^failed +(\S+) +(\S+) +(.+)$", result.stderr, re.M)
    assert sorted(Path(p).name for _, p, _ in listed) == sorted(bad)

    with open_store(store) as s:
        recs = {Path(r.path).name: r for r in s.videos()}
        for name, why in expected.items():
            rec = recs[name]
            if why:
                assert rec.status == "failed" and rec.error.startswith(why), (name, rec.error)
                assert not s.read_video(rec.video_id)["valid"].any()
            else:
                assert rec.status == "ok" and rec.error == "", (name, rec.error)
                rows = s.read_video(rec.video_id)
                assert rows["valid"].all() and len(rows["valid"]) == rec.steps > 0
        assert [recs[n].steps for n in ("good.mp4", "good2.mp4", "silent.mp4", "short.mp4")] == [6, 4, 4, 1]
        assert recs["good.mp4"].has_audio and not recs["silent.mp4"].has_audio
        assert not s.read_video(recs["silent.mp4"].video_id)["audio_valid"].any()
    assert store_check(store) == []


# ---- 6. a second writer, damaged stores ----------------------------------------------------------------


def test_second_extract_is_refused_while_a_real_run_holds_the_store(corpus, reference, tmp_path, procs):
    store = tmp_path / "store"
    args = _extract_args(corpus, store, "--workers", "0")
    proc = procs.l2l(args, "first")
    lock = store / "write.lock"

    def held() -> bool:
        try:
            return json.loads(lock.read_text())["pid"] == proc.pid
        except (OSError, ValueError, KeyError):
            return False

    _wait("the first run's lock", held, proc=proc)
    os.kill(proc.pid, signal.SIGSTOP)  # hold it there: the second run meets a live writer for sure
    try:
        result = CliRunner().invoke(main, args)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert result.exit_code == 4, result.output  # a locked store is a StoreError
    assert f"store is locked by another writer (pid {proc.pid} on host" in result.stderr
    assert "Traceback" not in result.output
    rc, _, err = _finish(proc)
    assert rc == 0, err
    _assert_same_store(reference, store)  # the refused run changed nothing


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_store_check_reports_a_damaged_chunk(reference, tmp_path, fmt):
    store = tmp_path / "store"
    if fmt == "zarr":
        shutil.copytree(reference, store)
        (store / "features" / "fused" / "c" / "1" / "0").write_bytes(b"\x13garbage\x37" * 50)  # rows [4, 8)
        want = r"features/fused/c/1/0 has 450 bytes, its task \[4, 12\) wrote \d+"
    else:
        export_store(reference, store, "hdf5")
        part = next((store / "parts").glob("rows-*.h5"))
        with open(part, "r+b") as f:
            f.truncate(part.stat().st_size // 2)
        want = rf"parts/{part.name} has {part.stat().st_size} bytes, its task \[\d+, \d+\) wrote \d+"
    assert CliRunner().invoke(main, ["store", "check", str(reference)]).exit_code == 0
    result = CliRunner().invoke(main, ["store", "check", str(store)])
    assert result.exit_code == 1, result.output
    assert re.search(want, result.stdout), result.stdout
    assert "problem(s)" in result.stderr


# ---- 7. checkpoints are never unpickled freely ---------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _evil_checkpoint(path: Path, marker: Path, **fields) -> Path:
    import torch

    torch.save({"format": "l2l-checkpoint", "version": 1, **fields, "extra": _Payload(marker)}, path)
    return path


def test_checkpoints_with_pickled_code_are_refused(corpus, tmp_path):
    import torch

    marker = tmp_path / "MARKER"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker, kind="students", state_dict={}, sha256="")
    # The file really is malicious: a free unpickle of a copy runs the payload.
    control = _evil_checkpoint(tmp_path / "control.pt", tmp_path / "CONTROL", kind="students")
    torch.load(control, weights_only=False)
    assert (tmp_path / "CONTROL").read_text() == "code ran"

    store = tmp_path / "store"
    result = CliRunner().invoke(main, ["extract", str(corpus), str(store), "--students", str(evil),
                                       "--workers", "0", *LAYOUT])  # fmt: skip
    assert result.exit_code == 2, result.output
    refused = rf"error: {re.escape(str(evil))} holds pickled Python objects \(\S*exec\)"
    assert re.search(refused, result.stderr), result.stderr
    assert "weights_only=True" in result.stderr and "Traceback" not in result.output
    assert not store.exists()

    from skim.checkpoint import load_checkpoint

    skim_evil = tmp_path / "skim.pt"
    torch.save({"format": "l2l-skim", "version": 1, "model": "x", "extra": _Payload(marker)}, skim_evil)
    with pytest.raises(ValueError, match=r"holds pickled Python objects \(\S*exec\)"):
        load_checkpoint(skim_evil)
    assert not marker.exists()


def _results(store: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """The task results kept with the done markers, by row range (read through the store API)."""
    with open_store(store) as s:
        return s.done_results()


# ---- 8. every kind of store damage: check finds exactly it, reads raise, repair restores the bytes ------

DAMAGE_VIDEOS = (2.0, 2.5, 3.0)  # 4, 5 and 6 steps: tasks [0, 4), [4, 12), [12, 18); chunks of 4 rows


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    for i, seconds in enumerate(DAMAGE_VIDEOS):
        _video(root / f"s{i}.mp4", seconds, seed=10 + i)
    return root


@pytest.fixture(scope="module")
def clean(small_corpus, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted serial extraction of the small corpus per store format."""
    from pipeline.extract import ExtractConfig, run_extraction

    out = {}
    for fmt in available_stores():
        out[fmt] = tmp_path_factory.mktemp("clean") / f"store-{fmt}"
        config = ExtractConfig(students=STUDENTS, store=fmt, chunk_rows=4, task_steps=4, batch_steps=4)
        assert run_extraction(small_corpus, out[fmt], config, log=lambda _: None).complete
        assert check_store(out[fmt]) == []
    return out


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _h5_chunk(path: Path, dataset: str) -> tuple[int, int]:
    """Byte offset and size of the first stored chunk of ``dataset`` in an HDF5 file."""
    import h5py

    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    return info.byte_offset, info.size


def _part(store: Path, i: int) -> Path:
    return sorted((store / "parts").glob("rows-*.h5"))[i]


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap.tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _damage(store: Path, fmt: str, kind: str) -> list[str]:
    """Damage ``store`` in one way; returns the problem kinds a full check must report, in order."""
    if kind == "stale_lock":
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE)
        lock = {"pid": int(dead.stdout), "host": socket.gethostname(), "token": "t", "since": 0.0}
        (store / "write.lock").write_text(json.dumps(lock))
        return ["stale_lock"]
    if kind == "unwritten":  # task [4, 12)'s marker goes: the index still says its video s1 is ok
        (store / "done" / "000000000004-000000000012").unlink()
        return ["unwritten"]
    if kind == "marker":  # the index disagrees with what task [4, 12) recorded
        from dataclasses import replace

        with open_store(store, "r+") as s:
            s.set_index(
                [replace(r, status="failed", error="x") if r.video_id == "s1" else r for r in s.videos()]
            )
        return ["marker", "failed_with_rows"]
    if fmt == "zarr":
        chunk = store / "features" / "image" / "c"
        if kind == "delete":
            (store / "features" / "fused" / "c" / "1" / "0").unlink()
            return ["missing"]
        if kind == "truncate":
            path = chunk / "0" / "0"
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            return ["truncated"]
        if kind == "flip":
            _flip(chunk / "0" / "0", 40)
            return ["checksum"]
        if kind == "swap":
            _swap(chunk / "0" / "0", chunk / "3" / "0")
            return ["swapped", "swapped"]
        if kind == "copy":
            shutil.copyfile(chunk / "0" / "0", chunk / "3" / "0")
            return ["copied"]
        if kind == "zero":
            path = store / "valid" / "c" / "2"
            path.write_bytes(bytes(path.stat().st_size))
            return ["checksum"]
        if kind == "remove_part":  # zarr has no part files: a whole block of rows of one array goes
            shutil.rmtree(store / "features" / "audio" / "c" / "3")
            return ["missing"]
        if kind == "extra":
            (chunk / "9").mkdir()
            (chunk / "9" / "0").write_bytes(b"stray")
            return ["extra"]
        if kind == "index":
            _flip(store / "index" / "first_row" / "c" / "0", 3)
            return ["index"]
    else:
        if kind in ("delete", "remove_part"):
            _part(store, 1).unlink()
            return ["missing"]
        if kind == "truncate":
            path = _part(store, 0)
            path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
            return ["truncated"]
        if kind in ("flip", "zero"):
            path = _part(store, 2)
            offset, size = _h5_chunk(path, "features/image")
            if kind == "flip":
                _flip(path, offset + size // 2)
                return ["checksum"]
            data = bytearray(path.read_bytes())
            data[offset : offset + size] = bytes(size)
            path.write_bytes(bytes(data))
            return ["modified"]  # fletcher32 of all zeros is zero: only the task's record catches it
        if kind == "swap":
            _swap(_part(store, 0), _part(store, 2))
            return ["swapped", "swapped"]
        if kind == "copy":
            shutil.copyfile(_part(store, 0), _part(store, 1))
            return ["copied"]
        if kind == "extra":
            (store / "parts" / "rows-000000000004-000000000008.h5").write_bytes(b"stray")
            return ["extra"]
        if kind == "index":
            offset, size = _h5_chunk(store / "store.h5", "index/first_row")
            _flip(store / "store.h5", offset + size // 2)
            return ["index"]
    raise AssertionError(kind)


def _read_everything(store: Path) -> None:
    with open_store(store) as s:
        s.videos()
        for name in ARRAYS:
            s.read_rows(name, 0, s.rows)


DAMAGE_KINDS = [
    "delete", "truncate", "flip", "swap", "copy", "zero", "remove_part", "extra", "index", "stale_lock",
    "unwritten", "marker",
]  # fmt: skip


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_damage_is_found_refused_and_repaired_bitwise(clean, tmp_path, fmt, kind):
    from pipeline.extract import repair_store

    store = tmp_path / "store"
    shutil.copytree(clean[fmt], store)
    want = _damage(store, fmt, kind)
    found = check_store(store)
    assert [p.kind for p in found] == want, [p.message for p in found]
    # Quick sees presence and sizes only: a flipped or zeroed byte no, a moved chunk as a wrong size.
    quick = {
        "flip": [],
        "zero": [],
        "copy": ["truncated"],
        "swap": ["truncated", "truncated"],
        "marker": ["marker"],
    }
    quick = quick.get(kind, want)
    if fmt == "zarr" and kind in ("swap", "copy"):
        c = clean[fmt] / "features" / "image" / "c"
        if (c / "0" / "0").stat().st_size == (c / "3" / "0").stat().st_size:
            quick = []  # chunks stored raw (incompressible rows) have one size: only their digests tell
    assert [p.kind for p in check_store(store, quick=True)] == quick
    if kind in ("extra", "stale_lock", "marker"):
        _read_everything(store)  # not data damage: reads are unaffected
    else:
        with pytest.raises(StoreError, match=rf"{re.escape(str(store))}.*l2l store repair"):
            _read_everything(store)
    report = repair_store(store, log=lambda _: None)
    assert report.remaining == [] and report.task_errors == [] and report.failed == []
    if kind in ("extra", "stale_lock", "index", "marker"):
        assert report.tasks_rerun == []  # nothing else is touched
    else:
        assert sorted(map(tuple, report.tasks_rerun)) == sorted({tuple(p.task) for p in found})
    _assert_same_store(clean[fmt], store)
    assert check_store(store) == []


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_repair_with_a_source_gone_fails_only_its_videos(small_corpus, tmp_path, fmt):
    from pipeline.extract import ExtractConfig, repair_store, run_extraction

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    store = tmp_path / "store"
    config = ExtractConfig(students=STUDENTS, store=fmt, chunk_rows=4, task_steps=4, batch_steps=4)
    run_extraction(corpus, store, config, log=lambda _: None)
    with open_store(store) as s:
        before = {r: s.task_record(*r)["files"] for r in s.done_ranges()}
    (corpus / "s1.mp4").unlink()  # the video of task [4, 12)
    _damage(store, fmt, "delete")
    report = repair_store(store, log=lambda _: None)
    assert report.tasks_rerun == [[4, 12]] and report.remaining == []
    assert [f["video_id"] for f in report.failed] == ["s1"]
    with open_store(store) as s:
        assert s.video("s1").status == "failed" and s.video("s1").error
        assert [s.video(v).status for v in ("s0", "s2")] == ["ok", "ok"]
        assert not s.read_video("s1")["valid"].any()
        after = {r: s.task_record(*r)["files"] for r in s.done_ranges()}
    assert {r: f for r, f in after.items() if r != (4, 12)} == {
        r: f for r, f in before.items() if r != (4, 12)
    }


def test_cli_check_json_quick_and_repair(clean, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(clean["zarr"], store)
    _damage(store, "zarr", "swap")
    runner = CliRunner()
    result = runner.invoke(main, ["store", "check", str(store), "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert not doc["ok"] and [p["kind"] for p in doc["problems"]] == ["swapped", "swapped"]
    first = doc["problems"][0]
    assert set(first) == {"kind", "message", "array", "rows", "video_ids", "task"}
    assert (first["array"], first["rows"], first["video_ids"], first["task"]) == (
        "features/image/c/0/0",
        [0, 4],
        ["s0"],
        [0, 4],
    )
    cut = store / "features" / "image" / "c" / "0" / "0"  # swapped chunks may share a size: cut one too
    cut.write_bytes(cut.read_bytes()[:10])
    quick = runner.invoke(main, ["store", "check", str(store), "--quick", "--json"])
    assert quick.exit_code == 1 and json.loads(quick.stdout)["quick"]
    result = runner.invoke(main, ["store", "repair", str(store), "--workers", "0", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tasks_rerun"] == [[0, 4], [12, 18]]
    assert runner.invoke(main, ["store", "check", str(store)]).stdout.strip() == f"{store}: ok"
    _assert_same_store(clean["zarr"], store)
    info = runner.invoke(main, ["store", "info", str(store)])
    assert "checksums: crc32c" in info.output


# ---- 9. writers killed at random points: no chunk passes its checksum with wrong content ----------------

_WRITER = """
import os
import sys
import time
import numpy as np
from indexing.stores import open_store

store = open_store(sys.argv[1], "r+")
done = set(store.done_ranges())
go = sys.argv[2] if len(sys.argv) > 2 else None  # half-way, wait until the reader has seen a partial store
print("ready", flush=True)
for i, (a, b) in enumerate(store.tasks()):
    if go and i == len(store.tasks()) // 2:
        waited = 0.0
        while not os.path.exists(go) and waited < 120:
            time.sleep(0.01)
            waited += 0.01
    if (a, b) not in done:
        rng = np.random.default_rng(a)  # a rerun writes the same bytes, as extraction does
        n = b - a
        rows = {
            k: rng.standard_normal((n, store.dim)).astype(store.dtype)
                for k in ("image", "audio", "fused")
        }
        rows |= {"valid": np.ones(n, bool), "audio_valid": np.ones(n, bool), "time_s": np.arange(a, b) / 2}
        store.write_rows(a, b, rows)
        store.mark_done(a, b)
"""
KILL_TASKS = [(a, a + 512) for a in range(0, 16 * 512, 512)]


def _mid_task(store: Path) -> bool:
    """Whether a task has bytes on disk (a temporary or a final file) but no done marker."""
    if any(p.name.endswith(".partial") or ".tmp-" in p.name for p in store.rglob("*")):
        return True
    with open_store(store) as s:
        done = set(s.done_ranges())
        return any(
            (store / p).exists()
            for t in KILL_TASKS
            if t not in done
            for n in ARRAYS
            for p in s.files_of(n, *t)
        )


def _expected(dim: int, dtype: str) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
    for a, b in KILL_TASKS:
        rng, n = np.random.default_rng(a), b - a
        for k in ("image", "audio", "fused"):
            out[k].append(rng.standard_normal((n, dim)).astype(dtype))
        out["valid"].append(np.ones(n, bool))
        out["audio_valid"].append(np.ones(n, bool))
        out["time_s"].append(np.arange(a, b) / 2)
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_writers_killed_at_random_points_leave_no_wrong_chunk(tmp_path, fmt, procs):
    from indexing.stores import VideoRecord, get_store

    rows, dim = KILL_TASKS[-1][1], 512
    index = [
        VideoRecord(f"v{i}", f"/v{i}.mp4", a, b - a, status="pending") for i, (a, b) in enumerate(KILL_TASKS)
    ]
    store = tmp_path / "store"
    get_store(fmt).create(
        store, index=index, rows=rows, chunk_rows=256, dim=dim, dtype="float32", tasks=KILL_TASKS
    ).close()
    want = _expected(dim, "float32")
    rng = np.random.default_rng(7)
    kills = caught_mid_task = 0
    for attempt in range(8):
        proc = procs.start([sys.executable, "-c", _WRITER, str(store)], f"writer{attempt}")
        _wait("the writer", lambda p=proc: "ready" in _tail(p), proc=proc)
        if attempt % 2:  # at a random time (a whole run writes for about a second) ...
            time.sleep(float(rng.uniform(0.0, 0.2)))
        else:  # ... or as soon as a task has bytes on disk but no marker yet (whatever the machine's load)
            _wait("a task mid-write", lambda p=proc: _mid_task(store) or p.poll() is not None, timeout_s=60)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert check_store(store) == [], attempt  # killed mid-write: nothing to report, nothing to repair
        caught_mid_task += _mid_task(store)
        with open_store(store) as s:
            done = s.done_ranges()
            for name in ARRAYS:  # readers see finished tasks only, the others as fill
                got = s.read_rows(name, 0, rows)
                seen = np.zeros(rows, bool)
                for a, b in done:
                    seen[a:b] = True
                np.testing.assert_array_equal(got[seen], want[name][seen])
                assert not got[~seen].any()
                for a, b in KILL_TASKS:  # bytes already on disk for unfinished tasks: right or unreadable
                    if (a, b) in done:
                        continue
                    for c in range(a, b, 256):
                        try:
                            chunk = s._read(name, c, c + 256)
                        except Exception:  # noqa: BLE001 - a torn chunk must fail its checksum
                            continue
                        if chunk.any():
                            np.testing.assert_array_equal(chunk, want[name][c : c + 256])
        if len(done) == len(KILL_TASKS):
            break
    assert kills >= 2 and caught_mid_task >= 1, (kills, caught_mid_task)  # some kills hit a task mid-write
    proc = procs.start([sys.executable, "-c", _WRITER, str(store)], "writer-final")
    assert proc.wait(timeout=120) == 0, _tail(proc)
    assert check_store(store) == []
    with open_store(store) as s:
        assert s.done_ranges() == KILL_TASKS
        for name in ARRAYS:
            np.testing.assert_array_equal(s.read_rows(name, 0, rows), want[name])


def test_commands_refuse_damaged_rows_with_exit_4(clean, tmp_path):
    """A command reading damaged rows (here `l2l store export`) stops with the store error, no traceback."""
    store = tmp_path / "store"
    shutil.copytree(clean["zarr"], store)
    _damage(store, "zarr", "delete")  # features/fused/c/1/0: rows [4, 8) of video s1
    result = CliRunner().invoke(
        main, ["store", "export", str(store), str(tmp_path / "out"), "--format", "hdf5"]
    )
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output
    assert re.search(
        rf"store {re.escape(str(store))}: array features/fused rows \[4, 8\) \(videos 's1'\) cannot be read: "
        rf"features/fused/c/1/0 is missing; .*l2l store repair {re.escape(str(store))}",
        result.output,
    ), result.output


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_readers_during_a_write_see_whole_tasks_or_fill(tmp_path, fmt, procs):
    """A reader polling the store while a writer process fills it sees each task complete or not at all."""
    from indexing.stores import VideoRecord, get_store

    rows, dim = KILL_TASKS[-1][1], 512
    index = [
        VideoRecord(f"v{i}", f"/v{i}.mp4", a, b - a, status="pending") for i, (a, b) in enumerate(KILL_TASKS)
    ]
    store = tmp_path / "store"
    get_store(fmt).create(
        store, index=index, rows=rows, chunk_rows=256, dim=dim, dtype="float32", tasks=KILL_TASKS
    ).close()
    want = _expected(dim, "float32")
    # The writer pauses half-way until this reader has seen a partly written store, so a starved host
    # cannot let it finish before the first read; the reads before and after the pause race the writes.
    go = tmp_path / "go"
    proc = procs.start([sys.executable, "-c", _WRITER, str(store), str(go)], "writer")
    reads = partial = 0
    with open_store(store) as reader:
        while True:
            finished = proc.poll() is not None
            got = reader.read_rows("fused", 0, rows)
            reads += 1
            for a, b in KILL_TASKS:
                if got[a:b].any():
                    np.testing.assert_array_equal(got[a:b], want["fused"][a:b])  # whole and right ...
                    partial += 0 < len(reader.done_ranges()) < len(KILL_TASKS)
                else:
                    assert not got[a:b].any()  # ... or not there yet
            if partial:
                go.touch()
            if finished:
                break
    assert proc.returncode == 0, _tail(proc)
    assert reads >= 2 and partial >= 1  # some reads happened while the store was partly written
    np.testing.assert_array_equal(got, want["fused"])


def test_skim_loader_refuses_a_damaged_store(tmp_path):
    """The training / evaluation / query loader reads through the store API: damage raises, never zeros."""
    from skim.data import SkimDataset
    from skim.synthetic import PlantedSpec, write_planted_store

    spec = PlantedSpec(videos=6, classes=2, min_steps=20, max_steps=30, dim=16, chunk_rows=32)
    store = write_planted_store(tmp_path / "store", spec)["store"]
    (store / "features" / "audio" / "c" / "1" / "0").unlink()  # rows [32, 64)
    with open_store(store) as s:
        ds = SkimDataset(s, ("image", "audio"), require_label=False)
        hit = [i for i, e in enumerate(ds.entries) if e.first_row < 64 and e.first_row + e.steps > 32]
        ds[next(i for i in range(len(ds.entries)) if i not in hit)]  # a video elsewhere still reads
        vid = ds.entries[hit[0]].video_id
        with pytest.raises(
            StoreError, match=rf"features/audio rows \[\d+, \d+\) \(videos '{vid}'\).*store repair"
        ):
            ds[hit[0]]
        with pytest.raises(StoreError, match="features/audio/c/1/0 is missing"):
            SkimDataset(s, ("image", "audio"), require_label=False, in_memory=True)

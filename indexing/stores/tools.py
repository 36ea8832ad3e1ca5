"""Store tools behind ``l2l store``: summary, listing, integrity check and format conversion.

All of them stream the store in blocks of whole chunks (about 32k rows), so they run in bounded memory on
stores of any size, and they work on every registered backend through the :class:`FeatureStore` API.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexing.errors import ConfigError, StoreError

from . import (
    FEATURES,
    LOCK_NAME,
    ROW_ARRAYS,
    FeatureStore,
    _intersect,
    _is_stale,
    _read_lock,
    file_digest,
    get_store,
    index_problems,
    open_store,
    store_format,
)

BLOCK_TARGET_ROWS = 32_768  # rows per streamed block (rounded to whole chunks)


def block_ranges(rows: int, chunk_rows: int, target_rows: int = BLOCK_TARGET_ROWS) -> list[tuple[int, int]]:
    """Chunk-aligned ``[start, stop)`` blocks of about ``target_rows`` rows covering ``[0, rows)``."""
    step = chunk_rows * max(1, target_rows // chunk_rows)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def store_info(path: str | Path) -> dict[str, Any]:
    """Summary of a store.

    Returns:
        ``format`` (backend name), ``videos``/``ok``/``failed``/``pending`` (counts), ``steps`` (rows owned
        by ok videos), ``failures`` (``[{video_id, path, reason}]``), ``models`` (from the attrs),
        ``bytes`` (on disk), ``rows``, ``chunk_rows``, ``dtype``, ``compression`` (the feature arrays' codec),
        ``format_version`` and ``checksums`` (how
        reads are verified; a format-1 store says it has none). ``tasks``/``tasks_done`` count the planned
        tasks and those finished; ``complete`` is false until every task is done and no video is pending
        (an interrupted extraction: statuses stay ``pending`` until the run that finishes it).

    Raises:
        ConfigError: ``path`` is not a feature store.
    """
    with open_store(path) as store:
        cols = store.index_columns()
        status = cols["status"]
        ok = status == "ok"
        failed = np.flatnonzero(status == "failed")
        tasks, done = store.tasks(), set(store.done_ranges())
        tasks_done = sum(1 for t in tasks if t in done)
        pending = int((status == "pending").sum())
        return {
            "format": store.name,
            "videos": int(len(status)),
            "ok": int(ok.sum()),
            "failed": int(len(failed)),
            "pending": pending,
            "tasks": len(tasks),
            "tasks_done": tasks_done,
            "complete": tasks_done == len(tasks) and not pending,
            "steps": int(cols["steps"][ok].sum()),
            "failures": [
                {
                    "video_id": str(cols["video_id"][i]),
                    "path": str(cols["path"][i]),
                    "reason": str(cols["error"][i]),
                }
                for i in failed
            ],
            "models": store.attrs.get("models", {}),
            "feature_sets": feature_sets_done(store, tasks),
            "bytes": store.disk_bytes(),
            "rows": store.rows,
            "chunk_rows": store.chunk_rows,
            "dtype": store.dtype,
            "compression": store.compression,
            "format_version": int(store.attrs.get("format_version", 1)),
            "checksums": store.checksums
            if store.verified
            else "no checksums (written before them; `l2l store export` rewrites the store with them)",
        }


def feature_sets_done(store: FeatureStore, tasks: list[tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """Each feature set with its model, weights sha256, arrays and how many planned tasks wrote it."""
    out = {}
    marked = set(store.done_ranges())
    for name, fs in store.feature_sets().items():
        arrays = list(fs.get("arrays", [name]))
        if all(arr in FEATURES for arr in arrays):  # written by every task: its marker says done
            out[name] = {**{k: fs.get(k) for k in ("model", "spec", "sha256")}, "arrays": arrays}
            out[name]["tasks_done"] = sum(t in marked for t in tasks)
            continue
        done = 0  # added later: done where the task's write record lists its files (one marker read each)
        for a, b in tasks:
            record = store.task_record(a, b) if store.verified else None
            files = (record or {}).get("files") or {}
            done += bool(record) and all(p in files for arr in arrays for p in store.files_of(arr, a, b))
        out[name] = {
            "model": fs.get("model"),
            "spec": fs.get("spec"),
            "sha256": fs.get("sha256"),
            "arrays": arrays,
            "tasks_done": int(done) if store.verified else None,
        }
    return out


def store_ls(path: str | Path) -> list[dict[str, Any]]:
    """One dict per video in store order, keys ``video_id, path, status, steps, duration_s, fps, has_audio,
    label``."""
    keys = ("video_id", "path", "status", "steps", "duration_s", "fps", "has_audio", "label")
    with open_store(path) as store:
        cols = store.index_columns()
        lists = [cols[k].tolist() for k in keys]
    return [dict(zip(keys, values, strict=True)) for values in zip(*lists, strict=True)]


@dataclass
class Problem:
    """One finding of :func:`check_store`.

    Attributes:
        kind: ``missing``, ``truncated``, ``extra``, ``checksum``, ``swapped``, ``copied``, ``modified``,
            ``index``, ``unwritten``, ``marker``, ``stale_lock``, ``not_valid``, ``nonfinite``,
            ``failed_with_rows``, ``stray_valid``, ``file`` or ``unreadable_store``.
        message: What is wrong and what to do, for people.
        array: The array (``features/fused``, ``valid``, ...) or file concerned, when one is.
        rows: ``[start, stop)`` of the damaged rows, when known.
        video_ids: Videos owning those rows.
        task: ``[start, stop)`` of the task that wrote them (``l2l store repair`` reruns it), when known.
    """

    kind: str
    message: str
    array: str | None = None
    rows: list[int] | None = None
    video_ids: list[str] = field(default_factory=list)
    task: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


REPAIRED_BY_TASK = {
    "missing",
    "truncated",
    "checksum",
    "swapped",
    "copied",
    "modified",
    "unwritten",
    "not_valid",
}


def store_check(path: str | Path, *, quick: bool = False, progress: bool = False) -> list[str]:
    """Messages of :func:`check_store` (an empty list means the store is sound)."""
    return [p.message for p in check_store(path, quick=quick, progress=progress)]


def check_store(path: str | Path, *, quick: bool = False, progress: bool = False) -> list[Problem]:
    """Every problem found in a store; an empty list means it is sound.

    Quick mode checks what needs no data read: the index (unique ids, statuses, row ranges inside the
    store and disjoint), the done markers against the planned tasks and the index, ok videos whose rows
    no done marker covers, every file a done task recorded (present, recorded size), extra files and a
    stale writer lock. The full check also reads every stored byte: checksums (every chunk decoded),
    each recorded file's sha256 at its position (a swapped or copied chunk is found where it lies), and
    the rows themselves (ok videos valid and finite, failed videos and padding not valid).

    Args:
        path: Store path.
        quick: Presence and sizes only (see above).
        progress: Show a progress bar over the rows (stderr).
    """
    store_format(path)  # not a store at all is the user's mistake (ConfigError), not a problem found
    try:
        store = open_store(path)
    except (ValueError, OSError, KeyError) as exc:
        return [Problem("unreadable_store", f"cannot open store: {exc}")]
    with store:
        return _Checker(store, quick=quick, progress=progress).run()


class _Checker:
    def __init__(self, store: FeatureStore, *, quick: bool, progress: bool) -> None:
        self.store, self.quick, self.progress = store, quick, progress
        self.problems: list[Problem] = []
        self.tasks = store.tasks()
        self.done = store.done_ranges()

    def add(self, kind: str, message: str, *, array: str | None = None, rows: tuple[int, int] | None = None,
            task: tuple[int, int] | None = None, video_ids: list[str] | None = None) -> None:  # fmt: skip
        if rows is not None and video_ids is None:
            video_ids = self.store.video_ids_in(*rows)
        if rows is not None and task is None:
            task = self.task_of(rows[0])
        self.problems.append(
            Problem(
                kind,
                message,
                array,
                list(rows) if rows else None,
                video_ids or [],
                list(task) if task else None,
            )
        )

    def task_of(self, row: int) -> tuple[int, int] | None:
        for a, b in self.tasks or self.done:
            if a <= row < b:
                return (a, b)
        return None

    def run(self) -> list[Problem]:
        store = self.store
        self.check_lock()
        cols = self.check_index()
        if cols is None:
            return self.problems
        self.check_markers(cols)
        bad_files = self.check_files()
        for path, why in store.extra_files():
            self.add("extra", f"{path}: {why}; `l2l store repair` deletes it", array=path)
        if not self.quick:
            overlapping = any(p.kind == "index" and "overlap" in p.message for p in self.problems)
            self.check_rows(cols, bad_files, check_padding=not overlapping)
        bad_names = {Path(p.array).name for p in self.problems if p.array}
        for message in store.file_problems():
            if not any(name in message for name in bad_names):  # already reported with its task
                self.add("file", message)
        return self.problems

    # ---- quick checks ---------------------------------------------------------------------------------
    def check_lock(self) -> None:
        lock = self.store.path / LOCK_NAME
        holder = _read_lock(lock)
        if holder is not None and _is_stale(holder):
            self.add(
                "stale_lock",
                f"{lock} is left by writer pid {holder.get('pid')} on host {holder.get('host')}, which is "
                "gone; `l2l store repair` (or the next extract) removes it",
                array=LOCK_NAME,
            )

    def check_index(self) -> dict[str, np.ndarray] | None:
        store = self.store
        try:
            cols = store.index_columns()
        except Exception as exc:  # noqa: BLE001 - a damaged index is a finding, not a crash
            self.add("index", f"index is unreadable: {exc}")
            try:
                return store.planned_index()  # still name the videos of damaged rows below
            except StoreError:
                return None
        for message in index_problems(cols, store.rows):
            self.add("index", f"index: {message}; `l2l store repair` rebuilds the index")
        return cols

    def check_markers(self, cols: dict[str, np.ndarray]) -> None:
        store, planned = self.store, set(self.tasks)
        for a, b in self.done:
            if planned and (a, b) not in planned:
                self.add(
                    "marker",
                    f"done marker for rows [{a}, {b}) matches no planned task",
                    task=(a, b),
                    rows=(a, min(b, store.rows)),
                )
        pos = {vid: i for i, vid in enumerate(cols["video_id"].tolist())}
        for (a, b), result in store.done_results().items():
            for v in (result or {}).get("videos", []) if isinstance(result, dict) else []:
                if not isinstance(v, dict) or "video_id" not in v:
                    continue
                i = pos.get(v["video_id"])
                status = str(cols["status"][i]) if i is not None else None
                # "pending" is an index not finalised yet (a run stopped after this task): resuming fixes it.
                if status not in (v.get("status"), "pending"):
                    self.add(
                        "marker",
                        f"task [{a}, {b}) recorded video {v['video_id']!r} as {v.get('status')}, the index "
                        f"says {status or 'nothing'}; `l2l store repair` rewrites the index from the markers",
                        task=(a, b),
                        video_ids=[v["video_id"]],
                    )
        if not store.verified:
            return
        first, steps, ids = (
            cols["first_row"].astype(np.int64),
            cols["steps"].astype(np.int64),
            cols["video_id"],
        )
        ok = np.flatnonzero((cols["status"] == "ok") & (steps > 0))
        lo, hi = first[ok], first[ok] + steps[ok]
        covered = _rows_done_below(self.done, hi) - _rows_done_below(self.done, lo)  # vectorised: 10^6 videos
        for k in np.flatnonzero(covered < hi - lo):
            i = ok[k]
            self.add(
                "unwritten",
                f"video {ids[i]!r} is ok but {int(hi[k] - lo[k] - covered[k])} of its rows "
                f"[{lo[k]}, {hi[k]}) belong to no finished task; `l2l store repair` re-extracts it",
                rows=(int(lo[k]), int(hi[k])),
                video_ids=[str(ids[i])],
            )

    def check_files(self) -> set[str]:
        """Recorded files: present, with their recorded size. Returns the paths found bad.

        In full mode a file of the wrong size is judged later by its content (it may be another chunk's
        bytes: swapped or copied); in quick mode it is reported as truncated here.
        """
        store, bad = self.store, set()
        self.recorded: dict[str, tuple[int, str, tuple[int, int]]] = {}
        self.wrong_size: dict[str, int] = {}
        for a, b in self.done:
            record = store.task_record(a, b) or {}
            for path, (size, digest) in (record.get("files") or {}).items():
                self.recorded[path] = (size, digest, (a, b))
                try:
                    have = os.stat(store.path / path).st_size
                except FileNotFoundError:
                    self.add(
                        "missing",
                        f"{path} is missing (written by task [{a}, {b})); `l2l store repair` re-extracts "
                        "the task",
                        array=path,
                        rows=_rows_of(store, path, a, b),
                        task=(a, b),
                    )
                    bad.add(path)
                    continue
                if have != size:
                    self.wrong_size[path] = have
                    if self.quick:
                        self.add_truncated(path)
                        bad.add(path)
        return bad

    def add_truncated(self, path: str) -> None:
        size, _, (a, b) = self.recorded[path]
        self.add(
            "truncated",
            f"{path} has {self.wrong_size[path]} bytes, its task [{a}, {b}) wrote {size}; `l2l store repair` "
            "re-extracts the task",
            array=path,
            rows=_rows_of(self.store, path, a, b),
            task=(a, b),
        )

    # ---- full check -----------------------------------------------------------------------------------
    def check_rows(self, cols: dict[str, np.ndarray], bad_files: set[str], *, check_padding: bool) -> None:
        store = self.store
        unreadable: dict[str, str] = {}
        # Rows of a task with a missing file are not judged again (a virtual dataset reads them as fill).
        self.bad_tasks = {self.recorded[p][2] for p in bad_files if p in self.recorded}
        counts = _count_rows(
            store, cols, lambda a, b: self.block_flags(a, b, unreadable), progress=self.progress
        )
        # Each recorded file's bytes at its position; a file holding another file's recorded bytes was
        # swapped with it or copied over it.
        actual = {}
        for path, (_, digest, _task) in self.recorded.items():
            if path not in bad_files:
                have = file_digest(store.path / path)[1]
                if have != digest:
                    actual[path] = have
        owner = {digest: path for path, (_, digest, _task) in self.recorded.items()}
        for path, have in actual.items():
            size, digest, task = self.recorded[path]
            other = owner.get(have)
            if other is not None and actual.get(other) == digest:
                kind, what = "swapped", f"{path} and {other} are swapped"
            elif other is not None:
                kind, what = "copied", f"{path} holds a copy of {other}"
            elif path in self.wrong_size:
                self.add_truncated(path)
                continue
            elif path in unreadable:
                kind, what = "checksum", f"{path} fails verification ({unreadable[path]})"
            else:
                kind, what = "modified", f"{path} differs from what its task wrote (yet its checksum passes)"
            self.add(
                kind,
                f"{what}; `l2l store repair` re-extracts task [{task[0]}, {task[1]})",
                array=path,
                rows=_rows_of(store, path, *task),
                task=task,
            )
        for path, why in sorted(unreadable.items()):  # damage outside recorded files (format 1 stores)
            if path not in bad_files and path not in actual:
                task = self.task_of(_first_row(store, path))
                rows = _rows_of(store, path, *task) if task else None
                self.add("checksum", f"{path} fails verification ({why})", array=path, rows=rows, task=task)
        self.check_counts(cols, counts, check_padding=check_padding)

    def block_flags(self, a: int, b: int, unreadable_files: dict[str, str]) -> dict[str, np.ndarray]:
        store = self.store
        n = b - a
        flags = {"valid": np.zeros(n, bool), "nonfinite": np.zeros(n, bool), "unreadable": np.zeros(n, bool)}
        segments = _intersect(self.done, a, b) if store.verified else [(a, b)]
        for s0, e0 in segments:
            if self.task_of(s0) in self.bad_tasks:
                flags["unreadable"][s0 - a : e0 - a] = True
                continue
            for name in FEATURES + ROW_ARRAYS:
                for s, e, data, why in _read_raw(store, name, s0, e0):
                    if data is None:
                        flags["unreadable"][s - a : e - a] = True
                        for path in store.files_of(name, s, e):
                            unreadable_files.setdefault(path, why)
                    elif name == "valid":
                        flags["valid"][s - a : e - a] = data
                    elif name in FEATURES:
                        flags["nonfinite"][s - a : e - a] |= ~np.isfinite(data).all(axis=1)
        return flags

    def check_counts(
        self, cols: dict[str, np.ndarray], counts: dict[str, np.ndarray], *, check_padding: bool
    ) -> None:
        store = self.store
        rows = store.rows
        first = np.clip(cols["first_row"].astype(np.int64), 0, rows)
        stop = np.clip(cols["first_row"].astype(np.int64) + cols["steps"].astype(np.int64), 0, rows)
        owns = (cols["steps"] > 0) & (stop > first)
        status, ids, steps = cols["status"], cols["video_id"], stop - first
        reported = {v for p in self.problems if p.kind in ("unwritten",) for v in p.video_ids}
        is_ok = status == "ok"
        for i in np.flatnonzero(is_ok & ~owns):
            self.add(
                "index",
                f"video {ids[i]!r} (ok) owns no rows; mark it failed or re-extract it",
                video_ids=[str(ids[i])],
            )
        unreadable = counts["unreadable"]
        missing = is_ok & owns & (counts["valid"] + unreadable < steps)
        for i in np.flatnonzero(missing | (is_ok & (counts["nonfinite"] > 0))):
            name = f"video {ids[i]!r} (ok, rows [{int(first[i])}, {int(stop[i])}))"
            where = (int(first[i]), int(stop[i]))
            if missing[i] and str(ids[i]) not in reported:
                n_bad = int(steps[i] - counts["valid"][i] - unreadable[i])
                self.add(
                    "not_valid",
                    f"{name}: {n_bad} of {int(steps[i])} rows are not valid (unwritten?); re-extract it",
                    rows=where,
                    video_ids=[str(ids[i])],
                )
            if counts["nonfinite"][i]:
                self.add(
                    "nonfinite",
                    f"{name}: {int(counts['nonfinite'][i])} rows have NaN/inf features",
                    rows=where,
                    video_ids=[str(ids[i])],
                )
        for i in np.flatnonzero((status == "failed") & (counts["valid"] > 0)):
            self.add(
                "failed_with_rows",
                f"video {ids[i]!r} (failed, rows [{int(first[i])}, {int(stop[i])})) owns "
                f"{int(counts['valid'][i])} valid rows",
                rows=(int(first[i]), int(stop[i])),
                video_ids=[str(ids[i])],
            )
        if check_padding:
            stray = int(counts["total_valid"]) - int(counts["valid"][owns].sum())
            if stray > 0:
                self.add(
                    "stray_valid", f"{stray} valid rows belong to no video (padding rows must be valid=False)"
                )


def _rows_done_below(done: list[tuple[int, int]], x: np.ndarray) -> np.ndarray:
    """For each row ``x``, how many rows below it the (sorted, disjoint) ``done`` ranges cover."""
    if not done:
        return np.zeros(len(x), np.int64)
    starts = np.array([a for a, _ in done], np.int64)
    lengths = np.array([b - a for a, b in done], np.int64)
    before = np.concatenate([[0], np.cumsum(lengths)])  # rows in the first j ranges
    k = np.searchsorted(starts, x, side="right")  # ranges starting at or below x
    last = np.maximum(k - 1, 0)
    inside = np.clip(x - starts[last], 0, lengths[last])
    return np.where(k > 0, before[last] + inside, 0)


def _rows_of(store: FeatureStore, path: str, a: int, b: int) -> tuple[int, int]:
    """The rows of task ``[a, b)`` that file ``path`` holds (one chunk, or the whole part)."""
    for s in range(a, b, store.chunk_rows):
        e = min(s + store.chunk_rows, b)
        for name in FEATURES + ROW_ARRAYS:
            if path in store.files_of(name, s, e) and len(store.files_of(name, a, b)) > 1:
                return (s, e)
    return (a, min(b, store.rows))


def _first_row(store: FeatureStore, path: str) -> int:
    for name in FEATURES + ROW_ARRAYS:
        for s in range(0, store.rows, store.chunk_rows):
            if path in store.files_of(name, s, min(s + store.chunk_rows, store.rows)):
                return s
    return 0


def _count_rows(store: FeatureStore, cols: dict[str, np.ndarray], flags_fn: Any, *, progress: bool) -> dict:
    """Per-video counts of the per-row flags ``flags_fn(a, b)`` gives, in one streamed pass over the rows."""
    rows = store.rows
    first = np.clip(cols["first_row"].astype(np.int64), 0, rows)
    stop = np.clip(cols["first_row"].astype(np.int64) + cols["steps"].astype(np.int64), 0, rows)
    owns = (cols["steps"] > 0) & (stop > first)
    # Counts of each per-row flag before every video boundary: per-video counts are differences, computed in
    # one pass over the rows without holding a per-row array.
    points = np.unique(np.concatenate([first[owns], stop[owns], [rows]]))
    counters = {key: np.zeros(len(points), np.int64) for key in ("valid", "nonfinite", "unreadable")}
    totals = dict.fromkeys(counters, 0)
    for a, b in _progress(block_ranges(rows, store.chunk_rows), progress, "checking rows"):
        flags = flags_fn(a, b)
        lo, hi = np.searchsorted(points, [a, b])
        at = points[lo:hi] - a
        for key, flag in flags.items():
            before = np.concatenate([[0], np.cumsum(flag, dtype=np.int64)])
            counters[key][lo:hi] = totals[key] + before[at]
            totals[key] += int(before[-1])
    for key in counters:
        counters[key][points == rows] = totals[key]
    s_idx, e_idx = np.searchsorted(points, first), np.searchsorted(points, stop)
    out = {key: np.where(owns, c[e_idx] - c[s_idx], 0) for key, c in counters.items()}
    out["total_valid"] = totals["valid"]
    return out


def _read_raw(store: FeatureStore, name: str, a: int, b: int) -> list:
    """``[(start, stop, data, why)]`` for rows ``[a, b)``, chunk by chunk with ``data=None`` if unreadable."""
    try:
        return [(a, b, store._read(name, a, b), "")]
    except Exception:  # noqa: BLE001 - find the damaged chunk(s) below
        pass
    out = []
    for s in range(a, b, store.chunk_rows):
        e = min(s + store.chunk_rows, b)
        try:
            out.append((s, e, store._read(name, s, e), ""))
        except Exception as exc:  # noqa: BLE001 - damage is reported, the check goes on
            out.append((s, e, None, f"{type(exc).__name__}: {exc}"))
    return out


def export_store(
    src: str | Path,
    dst: str | Path,
    format: str,
    *,
    compression: str = "default",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Copy a store into a new store of backend ``format`` (of the current format version), task by task.

    The index, attrs, layout (rows, chunk_rows, dim, dtype), planned tasks and task markers are kept;
    every byte is written with checksums and recorded in the new markers, so exporting a store written
    before checksums existed (format 1) upgrades it. Reads go through the verified read path: a damaged
    source raises :class:`StoreError` instead of copying the damage.

    Args:
        src: Source store path.
        dst: New store path.
        format: Target backend name (one of :func:`available_stores`).
        compression: Target codec (backend-specific name, ``default`` for the backend's default).
        overwrite: Replace ``dst`` if it exists.
        progress: Show a progress bar over the rows (stderr).

    Returns:
        The new store's path.

    Raises:
        ConfigError: Unknown format, ``src`` not a store, or ``dst`` exists (without ``overwrite``).
    """
    cls = get_store(format)
    dst = Path(dst)
    if Path(src).resolve() == dst.resolve():
        raise ConfigError(f"export target {dst} is the source store; give a new path")
    with open_store(src) as source:
        tasks = source_tasks(source)
        done = set(source.done_ranges())
        if not source.verified and not done:
            done = set(tasks)  # a format-1 store written without markers: every row was readable
        names = source.array_names()
        extra = [name for name in names if name not in FEATURES + ROW_ARRAYS]
        if extra:  # other feature sets travel whole, or the export is refused before it writes anything
            if cls.add_arrays is FeatureStore.add_arrays:
                raise ConfigError(
                    f"{src} holds feature sets {', '.join(extra)} that {format} stores cannot hold; "
                    "export it to zarr"
                )
            finished = sum(t in done for t in tasks)
            for name, fs in feature_sets_done(source, tasks).items():
                if fs["tasks_done"] is not None and fs["tasks_done"] < finished:
                    raise ConfigError(
                        f"{src}: feature set {name!r} is on {fs['tasks_done']} of {finished} finished tasks; "
                        f"finish it with `l2l extract --add-features {name} {src}` before exporting"
                    )
        target = cls.create(
            dst,
            index=source.videos(),
            rows=source.rows,
            chunk_rows=source.chunk_rows,
            dim=source.dim,
            dtype=source.dtype,
            attrs=source.attrs,
            tasks=tasks,
            compression=compression,
            overwrite=overwrite,
        )
        with target:
            if extra:
                target.add_arrays(extra, {})
            planned = source.planned_index()
            if planned is not None:
                target._save_planned_index(planned)
            results = source.done_results()
            for a, b in _progress([t for t in tasks if t in done], progress, "exporting tasks"):
                # Finished tasks only: their rows and markers (with a fresh record of the new files).
                target.write_rows(a, b, {name: source.read_rows(name, a, b) for name in names})
                target.mark_done(a, b, result=results.get((a, b)))
    return dst


def source_tasks(store: FeatureStore) -> list[tuple[int, int]]:
    """The store's planned tasks; for a format-1 zarr store (no plan kept) its done ranges, with the rows
    between them cut into chunk-aligned blocks."""
    tasks = store.tasks()
    if tasks:
        return tasks
    out, cursor = [], 0
    for a, b in store.done_ranges() + [(store.rows, store.rows)]:
        if a > cursor:
            out += [(s + cursor, e + cursor) for s, e in block_ranges(a - cursor, store.chunk_rows)]
        if b > a:
            out.append((a, b))
        cursor = max(cursor, b)
    return out


def _progress(blocks: list[tuple[int, int]], enabled: bool, desc: str) -> Any:
    if not enabled:
        return blocks
    from tqdm import tqdm

    return tqdm(blocks, desc=desc, unit="block", leave=False)

"""Feature stores: one logical store per corpus, chunked along rows, registered by name.

Layout (see ``shared/design.md`` §4): ``features/{image,audio,fused}`` are ``(rows, dim)`` arrays
chunked along rows; ``valid``, ``audio_valid`` (bool) and ``time_s`` (float64) are per-row; a per-video
index maps each video to its row range. Tasks own chunk-aligned row ranges, so parallel writers never
share a chunk, and a retried task simply rewrites its own rows.

Every store is a directory. Beside the backend's own files it holds:

- ``write.lock``: the writer lock (:meth:`FeatureStore.lock`), JSON with the holder's pid and host.
- ``done/{start:012d}-{stop:012d}``: one JSON marker per finished task (:meth:`FeatureStore.mark_done`),
  written (temp file, then rename) after that task's files are on disk. It keeps the task's ``result``
  (what it learnt, e.g. per-video status) and, from format 2 on, ``files``: every file the task wrote
  with its size and crc32, so a missing, truncated, swapped or copied file is found by position.
- ``index.planned.json.gz``: the index as :meth:`FeatureStore.create` wrote it (gzip's CRC guards it),
  from which ``l2l store repair`` rebuilds a damaged index together with the markers.

Format 2 reads (:meth:`FeatureStore.read_rows`) see a task's rows only once its marker exists (fill
before), check that each file holding them exists with the recorded size (and, once per open store, the
recorded crc32) and decode them through the chunk checksums; damage raises
:class:`~indexing.errors.StoreError` naming the store, array, rows, videos and the repair command, never
zeros. Format-1 stores (written before checksums) read as before; ``l2l store export`` upgrades them.

The per-video index is columnar (one array per :class:`VideoRecord` field, see :data:`INDEX_COLUMNS`), so
a store indexing 10^6 videos opens in about a second and never holds 10^6 groups or attributes.

Readers (``skim``, ``l2l store``) only need :func:`open_store` and the read methods below; the
extraction stage (``pipeline``) also uses ``create`` / ``write_rows`` / ``set_index`` / ``lock`` /
``mark_done`` / ``done_results``. ``tools.py`` holds info, ls, check and export.

This module is the interface and the registry: backends (``zarr_store.py``, ``hdf5_store.py``, or another
package's) register under the ``l2l.stores`` entry point group.
"""

from __future__ import annotations

import bisect
import difflib
import gzip
import json
import os
import shutil
import socket
import time
import uuid
import warnings
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from indexing.errors import ConfigError, StoreError

FORMAT_NAME = "l2l-features"
FORMAT_VERSION = 2  # 2: checksummed chunks, per-task write records in the done markers, planned index kept
VERIFIED_SINCE = 2  # stores of this version or newer verify every read against the done markers
PLANNED_INDEX = "index.planned.json.gz"  # the index as created, kept to rebuild a damaged index
FEATURES = ("image", "audio", "fused")  # 512-d each, stored under features/<name>
ROW_ARRAYS = ("valid", "audio_valid", "time_s")  # one value per row
STATUSES = ("ok", "failed", "pending")
FEATURE_DTYPES = ("float16", "float32")
ROW_DTYPES = {"valid": np.dtype(bool), "audio_valid": np.dtype(bool), "time_s": np.dtype(np.float64)}
LOCK_NAME = "write.lock"
DONE_DIR = "done"

# One array per VideoRecord field, stored under index/<column>. "str" columns are numpy StringDType.
INDEX_COLUMNS: dict[str, str] = {
    "video_id": "str",
    "path": "str",
    "first_row": "int64",
    "steps": "int64",
    "duration_s": "float64",
    "fps": "float64",
    "has_audio": "bool",
    "status": "str",
    "error": "str",
    "label": "str",
    "split": "str",
}


@dataclass
class VideoRecord:
    """One row of the per-video index.

    Attributes:
        video_id: Stable unique id (from the manifest, or derived from the relative path).
        path: Source video path as given to extraction.
        first_row: First feature row of this video in the store.
        steps: Number of steps (rows) the video owns; 0 for a video that failed before planning.
        duration_s: Duration in seconds (0.0 when unknown).
        fps: Average frame rate (0.0 when unknown).
        has_audio: Whether the file had an audio track.
        status: ``ok``, ``failed`` or ``pending``.
        error: Failure reason, empty when ok.
        label: Class label when known, else empty.
        split: Split name when known (``train``/``test``/...), else empty.
    """

    video_id: str
    path: str
    first_row: int = 0
    steps: int = 0
    duration_s: float = 0.0
    fps: float = 0.0
    has_audio: bool = False
    status: str = "pending"
    error: str = ""
    label: str = ""
    split: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VideoRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---- columnar index ------------------------------------------------------------------------------


def records_to_columns(records: Sequence[VideoRecord]) -> dict[str, np.ndarray]:
    """The index as one array per field: strings ``StringDType``, numbers int64/float64, flags bool.

    Args:
        records: Index records in store order.

    Returns:
        ``{column: (n,) array}`` for every column of :data:`INDEX_COLUMNS`.
    """
    columns = {}
    for name, kind in INDEX_COLUMNS.items():
        values = [getattr(rec, name) for rec in records]
        columns[name] = _column_array(values, kind)
    return columns


def columns_to_records(columns: Mapping[str, np.ndarray]) -> list[VideoRecord]:
    """Inverse of :func:`records_to_columns` (plain Python values in each record)."""
    lists = [columns[name].tolist() for name in INDEX_COLUMNS]
    return [VideoRecord(*values) for values in zip(*lists, strict=True)]


def normalize_columns(columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Coerce index columns read from a file (object arrays, bytes, other int widths) to the canonical dtypes.

    Raises:
        ConfigError: A column is missing or the columns differ in length.
    """
    missing = [name for name in INDEX_COLUMNS if name not in columns]
    if missing:
        raise ConfigError(
            f"index is missing column(s) {', '.join(missing)}; rebuild the index with set_index"
        )
    out = {name: _column_array(columns[name], kind) for name, kind in INDEX_COLUMNS.items()}
    lengths = {name: len(col) for name, col in out.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"index columns differ in length: {lengths}; rebuild the index with set_index")
    return out


def _column_array(values: Any, kind: str) -> np.ndarray:
    if kind == "str":
        if isinstance(values, np.ndarray) and values.dtype.kind == "T":
            return values.reshape(-1)  # already StringDType: converting again would copy every string
        return np.asarray(values, dtype=np.dtypes.StringDType()).reshape(-1)
    return np.asarray(values, dtype=np.dtype(kind)).reshape(-1)


def index_problems(columns: Mapping[str, np.ndarray], rows: int) -> list[str]:
    """Consistency problems of an index against a store of ``rows`` rows (empty list when sound).

    Checks: unique video ids, known statuses, non-negative steps, row ranges inside ``[0, rows)`` and
    pairwise disjoint (videos with 0 steps own no rows and are never in conflict).
    """
    problems: list[str] = []
    ids = columns["video_id"]
    first = columns["first_row"].astype(np.int64)
    steps = columns["steps"].astype(np.int64)
    status = columns["status"]
    if len(ids):
        uniq, counts = np.unique(ids.astype(object), return_counts=True)
        for vid in uniq[counts > 1][:20]:
            problems.append(f"video id {vid!r} appears {int(counts[uniq == vid][0])} times in the index")
    bad_status = ~np.isin(status.astype(object), np.array(STATUSES, dtype=object))
    for i in np.flatnonzero(bad_status)[:20]:
        problems.append(f"video {ids[i]!r}: unknown status {status[i]!r}; use one of {', '.join(STATUSES)}")
    for i in np.flatnonzero(steps < 0)[:20]:
        problems.append(f"video {ids[i]!r}: negative steps {int(steps[i])}")
    owns = steps > 0
    outside = owns & ((first < 0) | (first + steps > rows))
    for i in np.flatnonzero(outside)[:20]:
        problems.append(
            f"video {ids[i]!r}: rows [{int(first[i])}, {int(first[i] + steps[i])}) are outside the store's "
            f"{rows} rows"
        )
    idx = np.flatnonzero(owns)
    order = idx[np.argsort(first[idx], kind="stable")]
    if len(order) > 1:
        ends = first[order] + steps[order]
        running_end = np.maximum.accumulate(ends)[:-1]
        clash = np.flatnonzero(first[order][1:] < running_end)
        for k in clash[:20]:
            j = order[k + 1]
            # The earlier video that still covers first[j]: the last one (in start order) ending past it.
            prev = order[: k + 1][ends[: k + 1] > first[j]][-1]
            problems.append(
                f"videos {ids[prev]!r} rows [{int(first[prev])}, {int(first[prev] + steps[prev])}) and "
                f"{ids[j]!r} rows [{int(first[j])}, {int(first[j] + steps[j])}) overlap"
            )
        if len(clash) > 20:
            problems.append(f"... and {len(clash) - 20} more overlapping row ranges")
    return problems


def check_index(records_or_columns: Sequence[VideoRecord] | Mapping[str, np.ndarray], rows: int) -> dict:
    """Columns of a valid index; ``ConfigError`` listing the first problems otherwise (used by writers)."""
    if isinstance(records_or_columns, Mapping):
        columns = normalize_columns(records_or_columns)
    else:
        columns = records_to_columns(records_or_columns)
    problems = index_problems(columns, rows)
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigError(f"invalid index: {shown}{more}; fix the plan before writing it")
    return columns


def check_tasks(tasks: Sequence[tuple[int, int]], *, rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Planned task row ranges, validated: chunk-aligned, inside the store, pairwise disjoint, sorted."""
    out = sorted((int(a), int(b)) for a, b in tasks)
    for start, stop in out:
        check_row_range(start, stop, rows=rows, chunk_rows=chunk_rows)
    for (a0, b0), (a1, b1) in zip(out, out[1:], strict=False):
        if a1 < b0:
            raise ConfigError(f"planned tasks [{a0}, {b0}) and [{a1}, {b1}) overlap; give each row one task")
    return out


def check_row_range(start: int, stop: int, *, rows: int, chunk_rows: int | None = None) -> None:
    """``ConfigError`` unless ``0 <= start <= stop <= rows`` (and, with ``chunk_rows``, chunk-aligned).

    Aligned means ``start % chunk_rows == 0`` and ``stop % chunk_rows == 0 or stop == rows``, so two
    writers never share a chunk.
    """
    if not 0 <= start <= stop <= rows:
        raise ConfigError(f"rows [{start}, {stop}) are not inside the store's {rows} rows")
    if chunk_rows is None:
        return
    if start % chunk_rows or (stop % chunk_rows and stop != rows):
        raise ConfigError(
            f"task rows [{start}, {stop}) are not chunk-aligned (chunk_rows={chunk_rows}, rows={rows}): "
            f"start must be a multiple of {chunk_rows} and stop a multiple of it or {rows}"
        )


def check_attrs(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Store attrs as a JSON-safe dict with ``format``/``format_version`` set; ``ConfigError`` if not JSON."""
    out = dict(attrs or {})
    try:
        out = json.loads(json.dumps(out, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"store attrs must be JSON-serialisable (str/number/bool/list/dict): {exc}"
        ) from exc
    out["format"] = FORMAT_NAME
    out["format_version"] = FORMAT_VERSION
    return out


def check_feature_dtype(dtype: str) -> str:
    if str(dtype) not in FEATURE_DTYPES:
        raise ConfigError(f"feature dtype {dtype!r} is not supported; use one of {', '.join(FEATURE_DTYPES)}")
    return str(dtype)


def array_dtype(name: str, feature_dtype: str) -> np.dtype:
    """The on-disk dtype of array ``name``; ``ConfigError`` naming the known arrays otherwise."""
    if name in FEATURES:
        return np.dtype(feature_dtype)
    if name in ROW_DTYPES:
        return ROW_DTYPES[name]
    extra = _set_arrays()
    if name in extra:  # an array of a registered feature set (indexing/feature_sets.py)
        kind = extra[name][1]
        return np.dtype(feature_dtype if kind == "store" else kind)
    raise ConfigError(f"unknown array {name!r}; known: {', '.join(FEATURES + ROW_ARRAYS + tuple(extra))}")


def row_shape(name: str, dim: int) -> tuple[int, ...]:
    """The shape of one row of array ``name``: ``(dim,)`` for the students' features, ``()`` for row arrays,
    the registered shape for another feature set's array."""
    if name in FEATURES:
        return (dim,)
    if name in ROW_DTYPES:
        return ()
    extra = _set_arrays()
    if name in extra:
        return tuple(extra[name][0])
    raise ConfigError(f"unknown array {name!r}; known: {', '.join(FEATURES + ROW_ARRAYS + tuple(extra))}")


def _set_arrays() -> dict[str, tuple[tuple[int, ...], str]]:
    from indexing.feature_sets import set_arrays

    return set_arrays()


def check_block(name: str, data: Any, *, n: int, dim: int, feature_dtype: str) -> np.ndarray:
    """``data`` for ``n`` rows of array ``name`` as the on-disk dtype; ``ConfigError`` on a shape mismatch."""
    dtype = array_dtype(name, feature_dtype)
    arr = np.asarray(data)
    want = (n, *row_shape(name, dim))
    if arr.shape != want:
        raise ConfigError(f"array {name!r}: got shape {arr.shape} for {n} rows, expected {want}")
    return arr.astype(dtype, copy=False)


def prepare_store_dir(path: Path, *, overwrite: bool) -> None:
    """Make ``path`` an empty directory; ``ConfigError`` if it holds anything and ``overwrite`` is false."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise ConfigError(f"{path} already exists; remove it or pass overwrite=True")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.mkdir(parents=True, exist_ok=True)


# ---- writer lock ---------------------------------------------------------------------------------


class StoreLock:
    """A held writer lock; release it with :meth:`release` or by leaving the ``with`` block."""

    def __init__(self, path: Path, token: str) -> None:
        self.path = path
        self.token = token

    def release(self) -> None:
        """Remove the lock file if it is still ours (a lock taken over by someone else is left alone)."""
        info = _read_lock(self.path)
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_lock(path: str | Path) -> StoreLock:
    """Create the lock file ``path`` atomically (``O_EXCL``) holding this process's pid and host.

    A lock left by a dead process on this host is taken over; any other lock is refused.

    Raises:
        StoreError: Another writer holds the lock (the message names its pid and host and how to clear it).
    """
    path = Path(path)
    token = uuid.uuid4().hex
    info = {"pid": os.getpid(), "host": socket.gethostname(), "token": token, "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path) or {}
            if not _is_stale(holder):
                raise StoreError(_lock_message(path, holder)) from None
            _take_over(path, holder)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
        except BaseException:
            path.unlink(missing_ok=True)  # e.g. a full disk: an empty lock would refuse every later run
            raise
        return StoreLock(path, token)
    raise StoreError(_lock_message(path, _read_lock(path) or {}))


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _is_stale(holder: Mapping[str, Any]) -> bool:
    """A lock is stale when its pid is dead on this very host; other hosts' pids cannot be checked."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _take_over(path: Path, holder: Mapping[str, Any]) -> None:
    # Rename is atomic: of two processes taking over the same stale lock, one renames it and the other
    # gets FileNotFoundError (or renames the winner's fresh lock, which it notices and puts back).
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = _read_lock(aside) or {}
    if moved.get("token") != holder.get("token"):
        os.rename(aside, path)  # not the stale lock we inspected: someone else just took it; give it back
        raise StoreError(_lock_message(path, moved))
    aside.unlink(missing_ok=True)


def _lock_message(path: Path, holder: Mapping[str, Any]) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = holder.get("since")
    when = ""
    if isinstance(since, float):
        when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since))
    return (
        f"store is locked by another writer (pid {pid} on host {host}{when}): {path}. "
        f"Wait for it to finish; if no writer is running any more, delete {path} and retry"
    )


# ---- the store interface ---------------------------------------------------------------------------


class FeatureStore(ABC):
    """A feature store backend. Subclasses set ``name`` and are registered with :func:`register_store`
    and the ``l2l.stores`` entry point group (see :func:`available_stores`).

    Every store is a directory ``path``; the lock file and the ``done/`` markers live inside it and are
    handled here, so a backend only implements its arrays, its index and its attrs.
    """

    name: ClassVar[str]
    path: Path
    mode: str

    # ---- creation and writing (pipeline) -------------------------------------------------------
    @classmethod
    @abstractmethod
    def create(
        cls,
        path: str | Path,
        *,
        index: Sequence[VideoRecord],
        rows: int,
        chunk_rows: int,
        dim: int = 512,
        dtype: str = "float16",
        attrs: Mapping[str, Any] | None = None,
        tasks: Sequence[tuple[int, int]] | None = None,
        compression: str = "default",
        overwrite: bool = False,
    ) -> FeatureStore:
        """Create an empty store with all arrays sized to ``rows``; write attrs and the index once.

        Args:
            path: Store directory (must not exist or be empty unless ``overwrite``).
            index: Per-video records; row ranges inside ``rows`` and disjoint.
            rows: Total rows, padding between tasks included.
            chunk_rows: Rows per chunk, the unit of parallel writing (tasks own whole chunks).
            dim: Feature dimension.
            dtype: Feature dtype, ``float16`` or ``float32``.
            attrs: JSON-serialisable store attributes (step_s, audio settings, models, config).
            tasks: Planned task row ranges (chunk-aligned). The HDF5 backend maps one part file per task
                up front, so a partly written store is readable; zarr only validates them.
            compression: Backend codec name, ``default`` for the measured default.
            overwrite: Replace an existing store at ``path``.

        Raises:
            ConfigError: Bad sizes, dtype, attrs, index or tasks, or ``path`` exists.
        """

    @abstractmethod
    def write_rows(self, start: int, stop: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write rows ``[start, stop)`` of every array in ``arrays`` (feature names and row arrays).

        ``start`` must be a multiple of ``chunk_rows`` and ``stop`` either a multiple of it or the end
        of the store; otherwise ``ConfigError`` (two writers must never share a chunk).
        """

    @abstractmethod
    def set_index(self, records: Sequence[VideoRecord]) -> None:
        """Replace the per-video index (done once before tasks and once when finalising)."""

    # ---- reading (skim, l2l store, tests) ------------------------------------------------------
    @classmethod
    @abstractmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        """Open an existing store (``mode`` ``"r"`` or ``"r+"``)."""

    @classmethod
    @abstractmethod
    def is_store(cls, path: Path) -> bool:
        """Whether ``path`` holds a store of this backend (used by :func:`open_store`)."""

    @property
    @abstractmethod
    def attrs(self) -> dict[str, Any]:
        """Store attributes: format, version, step_s, audio settings, models, extraction config."""

    @property
    @abstractmethod
    def rows(self) -> int:
        """Total number of rows (including padding rows between tasks)."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Feature dimension (512 for the paper's models)."""

    @property
    @abstractmethod
    def chunk_rows(self) -> int:
        """Rows per write unit: tasks start on multiples of it."""

    @property
    @abstractmethod
    def dtype(self) -> str:
        """Feature dtype on disk (``float16`` or ``float32``)."""

    @property
    @abstractmethod
    def compression(self) -> str:
        """The backend codec name the feature arrays were written with (see the backend's docstring)."""

    @abstractmethod
    def videos(self) -> list[VideoRecord]:
        """The per-video index, in store order."""

    def index_columns(self) -> dict[str, np.ndarray]:
        """The per-video index as columns (see :func:`records_to_columns`); fast for 10^6 videos."""
        return records_to_columns(self.videos())

    @abstractmethod
    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of one array as stored (no marker gating); may raise on damaged bytes."""

    def _read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """:meth:`_read` into ``out`` (C-contiguous rows of the right shape); backends may skip the copy."""
        out[...] = self._read(name, start, stop)

    @abstractmethod
    def files_of(self, name: str, start: int, stop: int) -> list[str]:
        """Paths (relative to the store directory) of the files holding rows ``[start, stop)`` of ``name``."""

    @abstractmethod
    def tasks(self) -> list[tuple[int, int]]:
        """The planned task row ranges given to :meth:`create` (sorted)."""

    @abstractmethod
    def extra_files(self) -> list[tuple[str, str]]:
        """``(path, why)`` of data files outside every planned chunk or part (temporary files aside)."""

    @property
    @abstractmethod
    def checksums(self) -> str:
        """How stored bytes are verified on read: ``crc32c``, ``fletcher32`` or ``none`` (old stores)."""

    def file_problems(self) -> list[str]:
        """Backend-specific damage found without reading every row (missing arrays, bad part files)."""
        return []

    @property
    def verified(self) -> bool:
        """Whether reads are checked against the done markers (format 2 on): see :meth:`read_rows`."""
        return int(self.attrs.get("format_version", 1)) >= VERIFIED_SINCE

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of one array: a feature name (``(n, dim)``) or a row array (``(n,)``).

        Rows of tasks without a done marker read as fill (zeros, ``False``) even when some of their bytes are
        already on disk, so a reader never sees a task half-written. Rows of done tasks are read from files
        that must exist with the size recorded in the marker and pass their checksums.

        Raises:
            StoreError: A file holding done rows is missing, has the wrong size or fails its checksum; the
                message names the store, the array, the rows, their videos and the repair command.
            ConfigError: Rows outside the store or an unknown array.
        """
        check_row_range(start, stop, rows=self.rows)
        dtype = array_dtype(name, self.dtype)
        if not self.verified:
            return self._read(name, start, stop)
        out = np.zeros((stop - start, *row_shape(name, self.dim)), dtype)
        self._read_checked_into(name, start, stop, out, zeroed=True)
        return out

    def _read_checked_into(self, name: str, start: int, stop: int, out: np.ndarray, *, zeroed: bool) -> None:
        """The body of :meth:`read_rows` (format 2) into ``out`` (``stop - start`` C-contiguous rows); rows of
        unfinished tasks are set to fill (zeros) unless ``zeroed`` says ``out`` holds zeros already."""
        merged: list[list[int]] = []
        segments = self._done_segments(start, stop)
        if sum(b - a for a, b in segments) < stop - start:
            self._check_unfinished_rows(name, start, stop, segments)
            if not zeroed:
                at = start
                for a, b in [*segments, (stop, stop)]:
                    out[at - start : a - start] = 0
                    at = b
        for a, b in segments:
            for path in self.files_of(name, a, b):
                self._check_file(name, path, a, b)
            if merged and merged[-1][1] == a:
                merged[-1][1] = b  # adjacent finished tasks are read in one call (the codecs run in parallel)
            else:
                merged.append([a, b])
        for a, b in merged:
            try:
                self._read_into(name, a, b, out[a - start : b - start])
            except Exception as exc:  # noqa: BLE001 - codecs raise many types; all mean damaged bytes
                raise self._narrow_damage(name, a, b, exc) from exc

    def read_chunk(self, name: str, chunk: int) -> np.ndarray:
        """Rows of chunk ``chunk`` of array ``name`` (the last one may be short): :meth:`read_rows` of its
        range, with the same checks and errors. Backends may decode it straight from its file (zarr does)."""
        start = chunk * self.chunk_rows
        return self.read_rows(name, start, min(start + self.chunk_rows, self.rows))

    def read_chunk_into(self, name: str, chunk: int, out: np.ndarray) -> np.ndarray:
        """:meth:`read_chunk` into ``out``, a C-contiguous ``(chunk_rows, *row shape)`` array of the array's
        dtype that may hold anything (a recycled buffer: no allocation, no page faults). Format 2 only.

        Returns:
            ``out`` cut to the chunk's rows (the last chunk may be short); rows past them are undefined.

        Raises:
            StoreError / ConfigError: As :meth:`read_rows`.
        """
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.rows)
        check_row_range(start, stop, rows=self.rows)
        if not self.verified:
            raise ConfigError(f"store {getattr(self, 'path', '')}: read_chunk_into needs format 2")
        self._read_checked_into(name, start, stop, out[: stop - start], zeroed=False)
        return out[: stop - start]

    def _chunks(self, start: int, stop: int) -> list[tuple[int, int]]:
        """``[start, stop)`` cut at chunk boundaries."""
        first = start - start % self.chunk_rows
        return [(max(s, start), min(s + self.chunk_rows, stop)) for s in range(first, stop, self.chunk_rows)]

    def _narrow_damage(self, name: str, start: int, stop: int, exc: Exception) -> StoreError:
        """The error for the first chunk of ``[start, stop)`` that fails to read (all of it if none alone)."""
        for a, b in self._chunks(start, stop):
            try:
                self._read(name, a, b)
            except Exception as one:  # noqa: BLE001 - as in read_rows
                return self.damage_error(name, a, b, f"{type(one).__name__}: {one}")
        return self.damage_error(name, start, stop, f"{type(exc).__name__}: {exc}")

    def damage_error(self, name: str, start: int, stop: int, what: str) -> StoreError:
        """The error for damaged rows: store, array, rows, their videos and how to repair."""
        ids = self.video_ids_in(start, stop)
        shown = ", ".join(map(repr, ids[:5])) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        return StoreError(
            f"store {self.path}: array {array_path(name)} rows [{start}, {stop}) "
            f"(videos {shown or 'none'}) cannot be read: {what}; run `l2l store check {self.path}` to see "
            f"all damage and `l2l store repair {self.path}` to re-extract it"
        )

    def video_ids_in(self, start: int, stop: int) -> list[str]:
        """Ids of the videos whose rows overlap ``[start, stop)``, in row order."""
        try:
            cols = self.index_columns()
        except Exception:  # noqa: BLE001 - a damaged index must not hide the damage being reported
            return []
        first, steps = cols["first_row"], cols["steps"]
        hit = np.flatnonzero((steps > 0) & (first < stop) & (first + steps > start))
        hit = hit[np.argsort(first[hit], kind="stable")]
        return cols["video_id"][hit].tolist()

    def _check_unfinished_rows(
        self, name: str, start: int, stop: int, segments: Sequence[tuple[int, int]]
    ) -> None:
        """Rows no finished task covers read as fill, unless the index says a video owning them is ``ok``:
        then its task's marker is gone (or its task is being repaired) and fill would be a wrong answer."""
        try:
            cols = self.index_columns()
        except StoreError:
            return  # reading rows does not need the index; its damage is reported where it is read
        first, steps = cols["first_row"], cols["steps"]
        owns = (cols["status"] == "ok") & (steps > 0) & (first < stop) & (first + steps > start)
        for i in np.flatnonzero(owns):
            lo, hi = max(int(first[i]), start), min(int(first[i] + steps[i]), stop)
            if sum(min(b, hi) - max(a, lo) for a, b in segments if a < hi and lo < b) < hi - lo:
                raise self.damage_error(
                    name,
                    lo,
                    hi,
                    "the index says the video is ok but no finished task wrote these rows "
                    "(a done marker is missing, or a repair is running)",
                )

    def _done_segments(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Parts of ``[start, stop)`` covered by done markers (the listing is refreshed when not covered)."""
        segments = _intersect(self._done_cache(), start, stop)
        if sum(b - a for a, b in segments) < stop - start:
            self._done = None  # maybe a task finished since: look again
            segments = _intersect(self._done_cache(), start, stop)
        return segments

    def _done_cache(self) -> list[tuple[int, int]]:
        if getattr(self, "_done", None) is None:
            self._done = self.done_ranges()
        return self._done

    def _check_file(self, name: str, path: str, start: int, stop: int, data: bytes | None = None) -> None:
        """Check that ``path`` holds what its task wrote: it exists with the recorded size and, once per file
        and open store, the recorded digest. ``data``: the file's bytes when the caller has read them already
        (checked instead of reading the file again)."""
        held = [(a, b) for a, b in self._chunks(start, stop) if path in self.files_of(name, a, b)]
        if held:  # name the rows this file holds, not the whole read
            start, stop = held[0][0], held[-1][1]
        task = _containing(self._done_cache(), start)
        record = self.task_record(*task) if task else None
        want = (record or {}).get("files", {}).get(path)
        if want is None and record and record.get("files") and name not in FEATURES + ROW_ARRAYS:
            from indexing.feature_sets import set_of_array

            fs = set_of_array(name)  # a feature set added after this task: not written here, never zeros
            ids = ", ".join(map(repr, self.video_ids_in(*task)[:5])) or "none"
            raise StoreError(
                f"store {self.path}: feature set {fs!r} ({array_path(name)}) has no rows "
                f"[{task[0]}, {task[1]}) yet (videos {ids}); run "
                f"`l2l extract --add-features {fs} {self.path}` to finish adding it"
            )
        try:
            size = os.stat(self.path / path).st_size if data is None else len(data)
        except FileNotFoundError:
            raise self.damage_error(name, start, stop, f"{path} is missing") from None
        if want is not None and size != want[0]:
            raise self.damage_error(name, start, stop, f"{path} has {size} bytes, its task wrote {want[0]}")
        verified = self.__dict__.setdefault("_verified_files", set())
        if want is not None and path not in verified:
            # Once per file and open store: the bytes are the ones its task wrote *at this position* (a
            # swapped or copied chunk passes its own checksum but not this).
            have = file_digest(self.path / path) if data is None else bytes_digest(data)
            if have != list(want):
                raise self.damage_error(
                    name, start, stop, f"{path} is not the file its task wrote ({have[1]}, not {want[1]})"
                )
            verified.add(path)

    # ---- task records ---------------------------------------------------------------------------------
    def task_record(self, start: int, stop: int) -> dict[str, Any] | None:
        """The done marker of task ``[start, stop)``: ``result`` and ``files`` (path -> [size, sha256])."""
        cache = self.__dict__.setdefault("_records", {})
        if (start, stop) not in cache:
            try:
                doc = json.loads((self.path / DONE_DIR / _marker_name(start, stop)).read_text())
            except (OSError, ValueError):
                doc = None
            cache[(start, stop)] = doc if isinstance(doc, dict) else None
        return cache[(start, stop)]

    def planned_index(self) -> dict[str, np.ndarray] | None:
        """The index as :meth:`create` wrote it (columns), kept to rebuild a damaged index; ``None`` if none.

        Raises:
            StoreError: The kept copy is damaged (gzip's CRC fails).
        """
        path = self.path / PLANNED_INDEX
        if not path.exists():
            return None
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return normalize_columns(json.load(f))
        except (OSError, EOFError, ValueError) as exc:
            raise StoreError(f"store {self.path}: {PLANNED_INDEX} is damaged ({exc})") from exc

    def _save_planned_index(self, columns: Mapping[str, np.ndarray]) -> None:
        doc = {name: columns[name].tolist() for name in INDEX_COLUMNS}
        _write_atomic(self.path / PLANNED_INDEX, gzip.compress(json.dumps(doc).encode(), compresslevel=1))

    def close(self) -> None:  # noqa: B027 - optional for backends without handles
        """Release file handles."""

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def video(self, video_id: str) -> VideoRecord:
        """The index record of one video; ``KeyError`` naming close matches when unknown."""
        columns = self.index_columns()
        positions = getattr(self, "_id_positions", None)
        if positions is None or getattr(self, "_id_positions_of", None) is not columns["video_id"]:
            positions = {vid: i for i, vid in enumerate(columns["video_id"].tolist())}
            self._id_positions, self._id_positions_of = positions, columns["video_id"]
        i = positions.get(video_id)
        if i is None:
            close = difflib.get_close_matches(video_id, list(positions)[:100_000], n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"video {video_id!r} is not in store {getattr(self, 'path', '')}{hint}")
        return VideoRecord(*(columns[name][i : i + 1].tolist()[0] for name in INDEX_COLUMNS))

    def read_video(
        self, video_id: str, names: Sequence[str] = FEATURES + ROW_ARRAYS
    ) -> dict[str, np.ndarray]:
        """All rows of one video per requested array: features ``(steps, dim)``, row arrays ``(steps,)``."""
        rec = self.video(video_id)
        return {n: self.read_rows(n, rec.first_row, rec.first_row + rec.steps) for n in names}

    # ---- shared by every backend -------------------------------------------------------------------
    def disk_bytes(self) -> int:
        """Bytes of every file under the store directory."""
        total = 0
        for root, _, files in os.walk(self.path):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except OSError:
                    continue
        return total

    def _check_writable(self) -> None:
        self._done = None  # a writer's own view of the markers must follow its writes
        if self.mode == "r":
            raise ConfigError(f"store {self.path} is open read-only; open it with mode='r+' to write")

    @staticmethod
    def _check_mode(mode: str) -> None:
        if mode not in ("r", "r+"):
            raise ConfigError(f"mode {mode!r} is not supported; use 'r' or 'r+'")

    @staticmethod
    def _check_version(path: Path, attrs: Mapping[str, Any]) -> None:
        version = attrs.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigError(
                f"{path}: store format version {version!r} is newer than this l2l reads ({FORMAT_VERSION}); "
                "upgrade listen-to-look"
            )

    @staticmethod
    def _check_sizes(rows: int, chunk_rows: int, dim: int) -> None:
        if rows < 0 or chunk_rows <= 0 or dim <= 0:
            raise ConfigError(f"need rows >= 0, chunk_rows > 0 and dim > 0; got {rows}, {chunk_rows}, {dim}")

    # ---- writer lock and task markers ------------------------------------------------------------
    def lock(self) -> StoreLock:
        """Take the store's writer lock (``write.lock``), for use as ``with store.lock(): ...``.

        Raises:
            StoreError: Another live writer holds it; the message names its pid and host and says to
                delete the lock file if that writer is gone. A lock of a dead pid on this host is taken over.
        """
        return acquire_lock(self.path / LOCK_NAME)

    def mark_done(self, start: int, stop: int, result: Mapping[str, Any] | None = None) -> None:
        """Record that task rows ``[start, stop)`` are written (call after :meth:`write_rows` returned).

        Args:
            start: First row of the task.
            stop: End row of the task.
            result: What the task learnt (JSON-serialisable, e.g. per-video status); read back with
                :meth:`done_results`.
        """
        check_row_range(start, stop, rows=self.rows)
        done = self.path / DONE_DIR
        done.mkdir(exist_ok=True)
        final = done / _marker_name(start, stop)
        doc = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "result": result}
        if self.verified:
            # What the task left on disk, hashed now that its writes returned: a missing, truncated, swapped
            # or copied file is later found by position (`l2l store check`).
            files = [path for name in self.array_names() for path in self.files_of(name, start, stop)]
            try:
                doc["files"] = {path: file_digest(self.path / path) for path in files}
            except FileNotFoundError as exc:
                raise StoreError(
                    f"store {self.path}: task rows [{start}, {stop}) cannot be marked done: {exc.filename} "
                    "does not exist; write_rows every array of the task first"
                ) from None
        _write_atomic(final, json.dumps(doc).encode())
        self.__dict__.get("_records", {}).pop((start, stop), None)
        self.__dict__.pop("_verified_files", None)
        self._done = None

    def feature_sets(self) -> dict[str, dict[str, Any]]:
        """The feature sets this store holds, ``{name: {"arrays", "model", "sha256", ...}}`` from its attrs
        (a store written before feature sets holds the students' three)."""
        sets = self.attrs.get("feature_sets")
        if isinstance(sets, dict) and sets:
            return sets
        students = self.attrs.get("models", {}).get("students", {})
        made = {"model": "students", "spec": students.get("spec"), "sha256": students.get("sha256")}
        return {name: {"arrays": [name], **made} for name in FEATURES}

    def array_names(self) -> tuple[str, ...]:
        """Every array of the store: the students' features, the row arrays, then other feature sets'."""
        extra = [a for fs in self.feature_sets().values() for a in fs.get("arrays", []) if a not in FEATURES]
        return FEATURES + ROW_ARRAYS + tuple(extra)

    def add_arrays(self, names: Sequence[str], attrs: Mapping[str, Any]) -> None:
        """Create empty arrays ``names`` over all rows (chunked like the features) and merge ``attrs`` into
        the store attrs (a feature set added to an existing store). Backends that cannot add arrays refuse.

        Raises:
            ConfigError: This backend cannot hold other feature sets.
        """
        raise ConfigError(
            f"{self.name} stores hold the students' image/audio/fused only; extract into a zarr store "
            "(--format zarr) for other feature sets"
        )

    def record_arrays(self, start: int, stop: int, names: Sequence[str]) -> None:
        """Add the files of arrays ``names`` of the done task ``[start, stop)`` to its marker's write record
        (call after :meth:`write_rows` of those arrays returned), so reads, check and repair cover them.

        Raises:
            StoreError: The task has no done marker with a write record (finish the extraction first).
        """
        self._check_writable()
        self.__dict__.get("_records", {}).pop((start, stop), None)
        record = self.task_record(start, stop)
        if not record or not isinstance(record.get("files"), dict):
            raise StoreError(
                f"store {self.path}: task rows [{start}, {stop}) has no done marker with a write record; "
                "finish the extraction (rerun `l2l extract`) before adding feature sets"
            )
        files = dict(record["files"])
        for name in names:
            for path in self.files_of(name, start, stop):
                files[path] = file_digest(self.path / path)
        doc = dict(record, files=files, time=time.time())
        _write_atomic(self.path / DONE_DIR / _marker_name(start, stop), json.dumps(doc).encode())
        self.__dict__.get("_records", {}).pop((start, stop), None)
        self.__dict__.pop("_verified_files", None)
        self._done = None

    def unmark_done(self, start: int, stop: int) -> None:
        """Remove the done marker of task ``[start, stop)`` (its rows read as fill until it is rerun)."""
        (self.path / DONE_DIR / _marker_name(start, stop)).unlink(missing_ok=True)
        self.__dict__.get("_records", {}).pop((start, stop), None)
        self.__dict__.pop("_verified_files", None)
        self._done = None

    def done_ranges(self) -> list[tuple[int, int]]:
        """Row ranges marked done by :meth:`mark_done`, sorted."""
        done = self.path / DONE_DIR
        if not done.is_dir():
            return []
        out = []
        for entry in done.iterdir():
            parts = entry.name.split("-")
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                out.append((int(parts[0]), int(parts[1])))
        return sorted(out)

    def done_results(self) -> dict[tuple[int, int], dict[str, Any] | None]:
        """The ``result`` given to :meth:`mark_done` per done range (``None`` when none or unreadable)."""
        out: dict[tuple[int, int], dict[str, Any] | None] = {}
        for start, stop in self.done_ranges():
            try:
                doc = json.loads((self.path / DONE_DIR / _marker_name(start, stop)).read_text())
                result = doc.get("result") if isinstance(doc, dict) else None
            except (OSError, ValueError):
                result = None
            out[(start, stop)] = result if isinstance(result, dict) else None
        return out


def bytes_digest(data: bytes) -> list:
    """:func:`file_digest` of bytes already read."""
    return [len(data), f"crc32:{zlib.crc32(data):08x}"]


def file_digest(path: Path) -> list:
    """``[size, "crc32:XXXXXXXX"]`` of a file's bytes (zlib's crc32: ~6 GB/s, enough to tell chunks apart)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return [size, f"crc32:{crc:08x}"]


def array_path(name: str) -> str:
    """Where array ``name`` lives inside a store (``features/<name>`` or ``<name>``)."""
    if name in FEATURES:
        return f"features/{name}"
    if name in ROW_ARRAYS:
        return name
    extra = _set_arrays()
    if name in extra:
        return f"features/{name}"
    raise ConfigError(f"unknown array {name!r}; known: {', '.join(FEATURES + ROW_ARRAYS + tuple(extra))}")


def _intersect(ranges: Sequence[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut to the sorted, disjoint ``ranges`` (bisected: a store may have 10^5 tasks)."""
    out = []
    i = bisect.bisect_right(ranges, (start, float("inf"))) - 1  # the last range starting at or before start
    for a, b in ranges[max(i, 0) :]:
        if a >= stop:
            break
        if start < b:
            out.append((max(a, start), min(b, stop)))
    return out


def _containing(ranges: Sequence[tuple[int, int]], row: int) -> tuple[int, int] | None:
    i = bisect.bisect_right(ranges, (row, float("inf"))) - 1  # the last range starting at or before row
    return tuple(ranges[i]) if i >= 0 and ranges[i][0] <= row < ranges[i][1] else None


def _marker_name(start: int, stop: int) -> str:
    return f"{start:012d}-{stop:012d}"


def _write_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``final``, then rename it over ``final``."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


# ---- registry ----------------------------------------------------------------------------------------

ENTRY_POINT_GROUP = "l2l.stores"  # [project.entry-points."l2l.stores"] name = "module:Class"
_STORES: dict[str, type[FeatureStore]] = {}
_ENTRY_POINTS_LOADED = False


def register_store(cls: type[FeatureStore]) -> type[FeatureStore]:
    """Class decorator: make a backend available by its ``name``."""
    _STORES[cls.name] = cls
    return cls


def available_stores() -> list[str]:
    """Names of the registered backends (the CLI's ``--format`` choices)."""
    _load_backends()
    return sorted(_STORES)


def get_store(name: str) -> type[FeatureStore]:
    """The backend class registered as ``name``; ``ConfigError`` listing the choices otherwise."""
    _load_backends()
    if name not in _STORES:
        raise ConfigError(f"Unknown store format {name!r}; available: {', '.join(sorted(_STORES))}")
    return _STORES[name]


def store_format(path: str | Path) -> str:
    """The backend name of the store at ``path``; ``ConfigError`` when ``path`` is not a feature store."""
    _load_backends()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory; give the path of a feature store")
    for name in sorted(_STORES):
        if _STORES[name].is_store(path):
            return name
    raise ConfigError(
        f"{path} is not a feature store (looked for: {', '.join(sorted(_STORES))}); "
        "create one with `l2l extract` or give the store directory"
    )


def open_store(path: str | Path, mode: str = "r") -> FeatureStore:
    """Open the store at ``path`` with whichever backend wrote it.

    Args:
        path: Store directory (for HDF5 also its ``store.h5``).
        mode: ``"r"`` to read, ``"r+"`` to write rows or the index.

    Raises:
        ConfigError: ``path`` is not a feature store, or ``mode`` is unknown.
    """
    if mode not in ("r", "r+"):
        raise ConfigError(f"mode {mode!r} is not supported; use 'r' or 'r+'")
    return get_store(store_format(path)).open(path, mode)


def _load_backends() -> None:
    """Import every backend declared in the ``l2l.stores`` entry point group (once per process).

    The built-in backends are declared there too (``pyproject.toml``), so a third-party package registers
    a backend the same way. A backend that fails to import is skipped with a warning naming it.
    """
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    from importlib.metadata import entry_points

    found = list(entry_points(group=ENTRY_POINT_GROUP))
    for ep in found:
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not hide the others
            warnings.warn(f"store backend {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)
            continue
        if not (isinstance(cls, type) and issubclass(cls, FeatureStore)) or cls.name != ep.name:
            warnings.warn(
                f"entry point {ep.name!r} = {ep.value} in {ENTRY_POINT_GROUP!r} is not a FeatureStore named "
                f"{ep.name!r}; skipped",
                stacklevel=2,
            )
            continue
        _STORES.setdefault(ep.name, cls)
    if not found:
        # A source checkout that was never `pip install -e .`-ed has no entry points metadata.
        from . import hdf5_store, zarr_store  # noqa: F401 - registration side effect
    _ENTRY_POINTS_LOADED = True

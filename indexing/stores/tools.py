"""Store tools behind ``l2l store``: summary, listing, integrity check and format conversion.

All of them stream the store in blocks of whole chunks (about 32k rows), so they run in bounded memory on
stores of any size, and they work on every registered backend through the :class:`FeatureStore` API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import FEATURES, ROW_ARRAYS, FeatureStore, get_store, index_problems, open_store

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
        ``bytes`` (on disk), ``rows``, ``chunk_rows``, ``dtype``.

    Raises:
        ValueError: ``path`` is not a feature store.
    """
    with open_store(path) as store:
        cols = store.index_columns()
        status = cols["status"]
        ok = status == "ok"
        failed = np.flatnonzero(status == "failed")
        return {
            "format": store.name,
            "videos": int(len(status)),
            "ok": int(ok.sum()),
            "failed": int(len(failed)),
            "pending": int((status == "pending").sum()),
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
            "bytes": store.disk_bytes(),
            "rows": store.rows,
            "chunk_rows": store.chunk_rows,
            "dtype": store.dtype,
        }


def store_ls(path: str | Path) -> list[dict[str, Any]]:
    """One dict per video in store order, keys ``video_id, path, status, steps, duration_s, fps, has_audio,
    label``."""
    keys = ("video_id", "path", "status", "steps", "duration_s", "fps", "has_audio", "label")
    with open_store(path) as store:
        cols = store.index_columns()
        lists = [cols[k].tolist() for k in keys]
    return [dict(zip(keys, values, strict=True)) for values in zip(*lists, strict=True)]


def store_check(path: str | Path, *, progress: bool = False) -> list[str]:
    """Problems found in a store; an empty list means it is sound.

    Checks the index (unique ids, known statuses, row ranges inside the store and disjoint), the backend's
    files (missing arrays, unreadable or unmapped HDF5 parts), then reads every row once: every ``ok``
    video's rows must be valid with finite features, ``failed`` videos and padding must own no valid rows,
    and an unreadable chunk is reported with its rows instead of stopping the check.

    Args:
        path: Store path.
        progress: Show a progress bar over the rows (stderr).
    """
    try:
        store = open_store(path)
    except (ValueError, OSError, KeyError) as exc:
        return [f"cannot open store: {exc}"]
    with store:
        try:
            cols = store.index_columns()
        except Exception as exc:  # noqa: BLE001 - a damaged index is a finding, not a crash
            return [f"index is unreadable: {type(exc).__name__}: {exc}"]
        problems = index_problems(cols, store.rows)
        overlapping = any("overlap" in p for p in problems)
        problems += store.file_problems()
        problems += _check_rows(store, cols, check_padding=not overlapping, progress=progress)
    return problems


def _check_rows(
    store: FeatureStore, cols: dict[str, np.ndarray], *, check_padding: bool, progress: bool
) -> list[str]:
    rows = store.rows
    first = np.clip(cols["first_row"].astype(np.int64), 0, rows)
    stop = np.clip(cols["first_row"].astype(np.int64) + cols["steps"].astype(np.int64), 0, rows)
    owns = (cols["steps"] > 0) & (stop > first)
    # Counts of each per-row flag before every video boundary: per-video counts are differences, computed in
    # one pass over the rows without holding a per-row array.
    points = np.unique(np.concatenate([first[owns], stop[owns], [rows]]))
    counters = {key: np.zeros(len(points), np.int64) for key in ("valid", "nonfinite", "unreadable")}
    totals = dict.fromkeys(counters, 0)
    problems: list[str] = []
    for a, b in _progress(block_ranges(rows, store.chunk_rows), progress, "checking rows"):
        flags = _block_flags(store, a, b, problems)
        lo, hi = np.searchsorted(points, [a, b])
        at = points[lo:hi] - a
        for key, flag in flags.items():
            before = np.concatenate([[0], np.cumsum(flag, dtype=np.int64)])
            counters[key][lo:hi] = totals[key] + before[at]
            totals[key] += int(before[-1])
    for key in counters:
        counters[key][points == rows] = totals[key]

    s_idx, e_idx = np.searchsorted(points, first), np.searchsorted(points, stop)
    per_video = {key: np.where(owns, c[e_idx] - c[s_idx], 0) for key, c in counters.items()}
    status, ids, steps = cols["status"], cols["video_id"], stop - first
    is_ok = status == "ok"
    for i in np.flatnonzero(is_ok & ~owns):
        problems.append(f"video {ids[i]!r} (ok) owns no rows; mark it failed or re-extract it")
    missing = is_ok & owns & (per_video["valid"] < steps)
    for i in np.flatnonzero(
        missing | (is_ok & ((per_video["nonfinite"] > 0) | (per_video["unreadable"] > 0)))
    ):
        name = f"video {ids[i]!r} (ok, rows [{int(first[i])}, {int(stop[i])}))"
        if missing[i]:
            n_bad = int(steps[i] - per_video["valid"][i])
            problems.append(
                f"{name}: {n_bad} of {int(steps[i])} rows are not valid (unwritten?); re-extract it"
            )
        if per_video["nonfinite"][i]:
            problems.append(f"{name}: {int(per_video['nonfinite'][i])} rows have NaN/inf features")
        if per_video["unreadable"][i]:
            problems.append(f"{name}: {int(per_video['unreadable'][i])} rows are unreadable")
    for i in np.flatnonzero((status == "failed") & (per_video["valid"] > 0)):
        problems.append(
            f"video {ids[i]!r} (failed, rows [{int(first[i])}, {int(stop[i])})) owns "
            f"{int(per_video['valid'][i])} valid rows"
        )
    if check_padding:
        stray = totals["valid"] - int(per_video["valid"].sum())
        if stray > 0:
            problems.append(f"{stray} valid rows belong to no video (padding rows must be valid=False)")
    return problems


def _block_flags(store: FeatureStore, a: int, b: int, problems: list[str]) -> dict[str, np.ndarray]:
    """Per-row flags of rows ``[a, b)``: valid, any non-finite feature, any unreadable array."""
    n = b - a
    flags = {"valid": np.zeros(n, bool), "nonfinite": np.zeros(n, bool), "unreadable": np.zeros(n, bool)}
    for name in ("valid",) + FEATURES:
        for s, e, data in _read_or_report(store, name, a, b, problems):
            if data is None:
                flags["unreadable"][s - a : e - a] = True
            elif name == "valid":
                flags["valid"][s - a : e - a] = data
            else:
                flags["nonfinite"][s - a : e - a] |= ~np.isfinite(data).all(axis=1)
    return flags


def _read_or_report(store: FeatureStore, name: str, a: int, b: int, problems: list[str]) -> list:
    """``[(start, stop, data)]`` for rows ``[a, b)``; chunk by chunk with ``data=None`` where unreadable."""
    try:
        return [(a, b, store.read_rows(name, a, b))]
    except Exception:  # noqa: BLE001 - find the damaged chunk(s) below
        pass
    out = []
    for s in range(a, b, store.chunk_rows):
        e = min(s + store.chunk_rows, b)
        try:
            out.append((s, e, store.read_rows(name, s, e)))
        except Exception as exc:  # noqa: BLE001 - damage is reported, the check goes on
            where = f"features/{name}" if name in FEATURES else name
            problems.append(f"{where} rows [{s}, {e}) are unreadable: {type(exc).__name__}: {exc}")
            out.append((s, e, None))
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
    """Copy a store into a new store of backend ``format``, streaming whole-chunk blocks.

    The index, attrs, layout (rows, chunk_rows, dim, dtype) and task markers are kept; the HDF5 target
    gets one part file per block.

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
        ValueError: Unknown format, ``src`` not a store, or ``dst`` exists (without ``overwrite``).
    """
    cls = get_store(format)
    dst = Path(dst)
    if Path(src).resolve() == dst.resolve():
        raise ValueError(f"export target {dst} is the source store; give a new path")
    with open_store(src) as source:
        blocks = block_ranges(source.rows, source.chunk_rows)
        target = cls.create(
            dst,
            index=source.videos(),
            rows=source.rows,
            chunk_rows=source.chunk_rows,
            dim=source.dim,
            dtype=source.dtype,
            attrs=source.attrs,
            tasks=blocks,
            compression=compression,
            overwrite=overwrite,
        )
        with target:
            for a, b in _progress(blocks, progress, "exporting rows"):
                target.write_rows(
                    a, b, {name: source.read_rows(name, a, b) for name in FEATURES + ROW_ARRAYS}
                )
            for (a, b), result in source.done_results().items():
                target.mark_done(a, b, result=result)
    return dst


def _progress(blocks: list[tuple[int, int]], enabled: bool, desc: str) -> Any:
    if not enabled:
        return blocks
    from tqdm import tqdm

    return tqdm(blocks, desc=desc, unit="block", leave=False)

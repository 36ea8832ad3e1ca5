"""The corpus files both sides read: the manifest CSV and ``moments.json``. One reader each, one validation.

``pipeline/`` (extraction, recipes, clips) and ``skim/`` (labels, evidence) import these; nobody else parses
the formats.

Manifest: a CSV with a header; columns ``video_id, path, label, split`` (any may be missing, but a row
needs a ``path`` or a ``video_id``) plus any others, kept as ``extra``. Relative paths are relative to the
manifest's folder. Without a ``video_id`` column (or with an empty cell) the id is derived from the path,
relative to the manifest's folder and without its suffix (``a/x.mp4`` -> ``a/x``; the suffix stays when
dropping it would make two ids equal), the same rule extraction uses for directories and globs.

``moments.json``: ``{video_id: {"label": str, "segments": [[start_s, end_s], ...]}, ...}`` with
``0 <= start_s < end_s`` (``l2l synth``, ``l2l prepare activitynet``).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from indexing.errors import ConfigError

BASE_COLUMNS = ("video_id", "path", "label", "split")
MOMENTS_FILE = "moments.json"  # beside the manifest


@dataclass(frozen=True)
class CorpusEntry:
    """One video of a corpus.

    Attributes:
        video_id: Stable unique id.
        path: Absolute path of the media file (it may not exist); None for a labels-only manifest row.
        label: Class name, ``""`` when unknown.
        split: e.g. ``"train"`` / ``"test"``, ``""`` when unknown.
        extra: Other manifest columns, as strings.
    """

    video_id: str
    path: Path | None
    label: str = ""
    split: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def absolute(path: str | os.PathLike) -> Path:
    """An absolute path without resolving symlinks (the user's links stay in recorded paths)."""
    return Path(os.path.abspath(path))


def derive_ids(paths: Sequence[Path], root: Path) -> list[str]:
    """Ids from paths relative to ``root``: suffix dropped unless that would make two ids equal."""
    root = absolute(root)
    rel = []
    for p in paths:
        ap = absolute(p)
        rel.append(ap.relative_to(root).as_posix() if ap.is_relative_to(root) else ap.as_posix().lstrip("/"))
    stems = [r[: -len(Path(r).suffix)] if Path(r).suffix else r for r in rel]
    counts = Counter(stems)
    return [stem if counts[stem] == 1 else r for stem, r in zip(stems, rel, strict=True)]


def read_manifest(
    path: str | os.PathLike,
    *,
    require: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> list[CorpusEntry]:
    """Read a manifest CSV (the format above).

    Args:
        path: The CSV.
        require: Columns the caller needs besides an id (``("path",)`` to extract, ``("label",)`` to train).
        log: Receives one note when ids were derived from paths (how many, and an example).

    Returns:
        The entries in file order.

    Raises:
        ConfigError: The file is missing or not UTF-8 text, lacks a needed column, has no rows, a row has
            neither a path nor an id (or an empty path where paths are needed), or ids repeat (all listed).
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise ConfigError(f"{manifest}: no such manifest file; check the path")
    folder = manifest.parent
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except UnicodeDecodeError as err:
        raise ConfigError(f"{manifest}: not a UTF-8 text CSV ({err.reason}); save it as UTF-8") from None
    missing = [c for c in require if c not in columns]
    if not ("path" in columns or "video_id" in columns):
        missing = ["path or video_id", *missing]
    if missing:
        raise ConfigError(
            f"{manifest}: missing column(s) {', '.join(missing)} (columns: {', '.join(columns) or 'none'}); "
            f"a manifest has columns {','.join(BASE_COLUMNS)}"
        )
    if not rows:
        raise ConfigError(f"{manifest}: no rows; list at least one video under the header")
    has_paths = "path" in columns
    paths: list[Path | None] = []
    for line, row in enumerate(rows, start=2):
        if has_paths and row["path"]:
            paths.append(absolute(folder / Path(row["path"]).expanduser()))
        elif has_paths and ("path" in require or not row.get("video_id")):
            raise ConfigError(f"{manifest}:{line}: empty path; fill it in or delete the row")
        elif not row.get("video_id"):
            raise ConfigError(f"{manifest}:{line}: empty video_id; every row needs one")
        else:
            paths.append(None)
    with_path = [i for i, p in enumerate(paths) if p is not None]
    derived = dict(zip(with_path, derive_ids([paths[i] for i in with_path], folder), strict=True))
    ids = [row.get("video_id") or derived[i] for i, row in enumerate(rows)]
    n_derived = sum(1 for row in rows if not row.get("video_id"))
    if n_derived and log is not None:
        first = next(i for i, row in zip(ids, rows, strict=True) if not row.get("video_id"))
        where = "no video_id column" if "video_id" not in columns else "empty video_id cells"
        log(f"{manifest}: {n_derived} video id(s) derived from paths ({where}), e.g. {first!r}")
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ConfigError(
            f"{manifest}: {len(duplicates)} duplicate video id(s): {', '.join(duplicates[:20])}"
            f"{' ...' if len(duplicates) > 20 else ''}; video ids must be unique"
        )
    return [
        CorpusEntry(
            video_id=vid,
            path=p,
            label=row.get("label", ""),
            split=row.get("split", ""),
            extra={k: v for k, v in row.items() if k not in BASE_COLUMNS},
        )
        for vid, p, row in zip(ids, paths, rows, strict=True)
    ]


def read_labels(path: str | os.PathLike) -> dict[str, CorpusEntry]:
    """A labels manifest (a ``label`` column) as entries by video id; see :func:`read_manifest`."""
    return {e.video_id: e for e in read_manifest(path, require=("label",))}


def write_manifest(path: str | os.PathLike, entries: Iterable[CorpusEntry]) -> Path:
    """Write entries as a manifest CSV that :func:`read_manifest` reads back to the same entries.

    Columns are ``video_id, path, label, split`` then every ``extra`` key in first-seen order. Paths inside
    the manifest's folder are written relative to it (the corpus can be moved), others absolute. The file
    is written under a temporary name and renamed, so a reader never sees half a manifest.

    Args:
        path: The CSV to write; its folder is created.
        entries: The videos (each with a path).

    Returns:
        The written path.

    Raises:
        ConfigError: Duplicate video ids, or an entry without a path.
    """
    path = Path(path)
    entries = list(entries)
    duplicates = sorted(i for i, n in Counter(e.video_id for e in entries).items() if n > 1)
    if duplicates:
        raise ConfigError(f"duplicate video id(s): {', '.join(duplicates[:20])}; video ids must be unique")
    pathless = [e.video_id for e in entries if e.path is None]
    if pathless:
        raise ConfigError(f"video(s) {', '.join(pathless[:20])} have no path; a written manifest needs one")
    extra_cols: dict[str, None] = {}
    for e in entries:
        extra_cols.update(dict.fromkeys(e.extra))
    folder = absolute(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*BASE_COLUMNS, *extra_cols])
        for e in entries:
            p = absolute(e.path)
            shown = p.relative_to(folder).as_posix() if p.is_relative_to(folder) else str(p)
            writer.writerow([e.video_id, shown, e.label, e.split, *(e.extra.get(c, "") for c in extra_cols)])
    os.replace(tmp, path)
    return path


def read_moments(path: str | os.PathLike) -> dict[str, dict]:
    """Read ground-truth evidence moments: ``{video_id: {"label": str, "segments": [[start_s, end_s]]}}``.

    Args:
        path: A ``moments.json`` (the format above).

    Returns:
        The mapping, with segments as lists of two floats; other keys of each video are kept.

    Raises:
        ConfigError: Missing, not JSON, not an object of that shape, or a segment without
            ``0 <= start_s < end_s``; the message names the video and the segment.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such moments file; check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path}: not valid JSON ({err}); write {{video_id: {{label, segments}}}}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a JSON object {{video_id: {{label, segments}}}}, got {type(data).__name__}"
        )
    out: dict[str, dict] = {}
    for vid, item in data.items():
        if not isinstance(item, dict) or not isinstance(item.get("segments"), list):
            raise ConfigError(f"{path}: video {vid!r} needs a 'segments' list; write [[start_s, end_s], ...]")
        segments = []
        for seg in item["segments"]:
            try:
                start_s, end_s = (float(v) for v in seg)
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: video {vid!r}: segment {seg!r} is not [start_s, end_s]") from None
            if not 0 <= start_s < end_s:
                raise ConfigError(
                    f"{path}: video {vid!r}: segment [{start_s}, {end_s}] needs 0 <= start_s < end_s; "
                    "fix or drop it"
                )
            segments.append([start_s, end_s])
        out[str(vid)] = {**item, "label": str(item.get("label", "")), "segments": segments}
    return out


def read_segments(path: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """:func:`read_moments` reduced to ``{video_id: [(start_s, end_s), ...]}``."""
    return {vid: [(s, e) for s, e in item["segments"]] for vid, item in read_moments(path).items()}


def default_moments_path(manifest: str | os.PathLike | None) -> Path | None:
    """``moments.json`` beside the manifest when it exists, else None."""
    if manifest is None:
        return None
    candidate = Path(manifest).with_name(MOMENTS_FILE)
    return candidate if candidate.is_file() else None

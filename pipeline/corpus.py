"""Reading a corpus for extraction: a manifest CSV, a directory of videos, or a glob.

Every video gets a stable, unique id: the manifest's ``video_id`` column where there is one, else its path
relative to the manifest folder / directory / glob root without the suffix (``a/x.mp4`` -> ``a/x``, so
``a/x.mp4`` and ``b/x.mp4`` never collide; two files differing only in suffix keep it: ``a/x.mp4``,
``a/x.webm``). A manifest row whose file is missing is still returned: extraction records it as failed,
nothing is dropped silently.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".ogv", ".3gp"}
)
MANIFEST_SUFFIXES = frozenset({".csv"})
BASE_COLUMNS = ("video_id", "path", "label", "split")


@dataclass(frozen=True)
class CorpusEntry:
    """One video of a corpus.

    Attributes:
        video_id: Stable unique id.
        path: Absolute path of the media file (it may not exist).
        label: Class name, ``""`` when unknown.
        split: e.g. ``"train"`` / ``"test"``, ``""`` when unknown.
        extra: Other manifest columns, as strings.
    """

    video_id: str
    path: Path
    label: str = ""
    split: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def read_corpus(spec: str | Path) -> list[CorpusEntry]:
    """List the videos of a corpus.

    Args:
        spec: A manifest ``.csv`` (a ``path`` column, optional ``video_id``, ``label``, ``split`` and any
            other columns, kept in ``extra``; relative paths are relative to the manifest's folder), a
            directory (every file with a video suffix, recursively, hidden files skipped), a glob such as
            ``"data/**/*.mp4"`` (every matching file), or a single video file.

    Returns:
        Entries in manifest order, or sorted by path for a directory or glob.

    Raises:
        ValueError: Nothing exists at ``spec``, no video matched, the manifest lacks a ``path`` column or a
            row has an empty path, or ids are duplicated (all of them listed).
    """
    text = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in VIDEO_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"{spec}: no video files found (suffixes: {', '.join(sorted(VIDEO_SUFFIXES))})")
        return _from_files(files, path)
    if path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            return _read_manifest(path)
        return _from_files([path], path.parent)
    if glob.has_magic(text):
        files = sorted(
            Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file()
        )
        if not files:
            raise ValueError(f"{spec}: the glob matched no files")
        return _from_files(files, _glob_root(text))
    raise ValueError(f"{spec}: no such manifest (.csv), directory, glob or video file")


def _glob_root(pattern: str) -> Path:
    """The folder above the first path part holding a glob character."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*fixed) if fixed else Path(".")


def _absolute(path: Path) -> Path:
    # abspath, not resolve: keep the user's symlinks in the recorded path.
    return Path(os.path.abspath(path))


def _ids_for(paths: list[Path], root: Path) -> list[str]:
    """Ids from paths relative to ``root``: suffix dropped unless that would make two ids equal."""
    root = _absolute(root)
    rel = []
    for p in paths:
        ap = _absolute(p)
        rel.append(ap.relative_to(root).as_posix() if ap.is_relative_to(root) else ap.as_posix().lstrip("/"))
    stems = [r[: -len(Path(r).suffix)] if Path(r).suffix else r for r in rel]
    counts = Counter(stems)
    return [stem if counts[stem] == 1 else r for stem, r in zip(stems, rel, strict=True)]


def _from_files(files: list[Path], root: Path) -> list[CorpusEntry]:
    ids = _ids_for(files, root)
    return [CorpusEntry(video_id=i, path=_absolute(p)) for i, p in zip(ids, files, strict=True)]


def _read_manifest(manifest: Path) -> list[CorpusEntry]:
    folder = manifest.parent
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns:
            raise ValueError(f"{manifest}: no 'path' column (columns: {', '.join(columns) or 'none'})")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    paths = []
    for line, row in enumerate(rows, start=2):
        if not row["path"]:
            raise ValueError(f"{manifest}:{line}: empty path; fill it in or delete the row")
        paths.append(_absolute(folder / Path(row["path"]).expanduser()))
    has_ids = "video_id" in columns
    derived = _ids_for(paths, folder)
    ids = [row["video_id"] or derived[i] if has_ids else derived[i] for i, row in enumerate(rows)]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ValueError(
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


def write_manifest(path: str | Path, entries: Iterable[CorpusEntry]) -> Path:
    """Write entries as a manifest CSV that :func:`read_corpus` reads back to the same entries.

    Columns are ``video_id, path, label, split`` then every ``extra`` key in first-seen order. Paths inside
    the manifest's folder are written relative to it (the corpus can be moved), others absolute. The file
    is written under a temporary name and renamed, so a reader never sees half a manifest.

    Args:
        path: The CSV to write; its folder is created.
        entries: The videos.

    Returns:
        The written path.

    Raises:
        ValueError: Duplicate video ids.
    """
    path = Path(path)
    entries = list(entries)
    duplicates = sorted(i for i, n in Counter(e.video_id for e in entries).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate video id(s): {', '.join(duplicates[:20])}; video ids must be unique")
    extra_cols: dict[str, None] = {}
    for e in entries:
        extra_cols.update(dict.fromkeys(e.extra))
    folder = _absolute(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*BASE_COLUMNS, *extra_cols])
        for e in entries:
            p = _absolute(e.path)
            shown = p.relative_to(folder).as_posix() if p.is_relative_to(folder) else str(p)
            writer.writerow([e.video_id, shown, e.label, e.split, *(e.extra.get(c, "") for c in extra_cols)])
    os.replace(tmp, path)
    return path


def read_moments(path: str | Path) -> dict[str, dict]:
    """Read ground-truth evidence moments: ``{video_id: {"label": str, "segments": [[start_s, end_s]]}}``.

    Args:
        path: A ``moments.json`` as written by ``l2l synth``.

    Returns:
        The mapping, with segments as lists of two floats; other keys of each video are kept.

    Raises:
        ValueError: Not a JSON object of that shape, or a segment without ``0 <= start_s < end_s``.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of video_id -> {{label, segments}}")
    out: dict[str, dict] = {}
    for vid, item in data.items():
        if not isinstance(item, dict) or not isinstance(item.get("segments"), list):
            raise ValueError(f"{path}: video {vid!r} needs a 'segments' list")
        segments = []
        for seg in item["segments"]:
            if not (isinstance(seg, list | tuple) and len(seg) == 2):
                raise ValueError(f"{path}: video {vid!r}: segment {seg!r} is not [start_s, end_s]")
            start_s, end_s = float(seg[0]), float(seg[1])
            if start_s < 0 or end_s <= start_s:
                raise ValueError(
                    f"{path}: video {vid!r}: segment [{start_s}, {end_s}] needs 0 <= start < end"
                )
            segments.append([start_s, end_s])
        out[str(vid)] = {**item, "label": str(item.get("label", "")), "segments": segments}
    return out

"""Reading a corpus for extraction: a manifest CSV, a directory of videos, or a glob.

Every video gets a stable, unique id: the manifest's ``video_id`` column where there is one, else its path
relative to the manifest folder / directory / glob root without the suffix (``a/x.mp4`` -> ``a/x``, so
``a/x.mp4`` and ``b/x.mp4`` never collide; two files differing only in suffix keep it: ``a/x.mp4``,
``a/x.webm``). A manifest row whose file is missing is still returned: extraction records it as failed,
nothing is dropped silently.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path

from indexing.corpus import (  # the one manifest / moments.json reader, shared with skim
    CorpusEntry,
    absolute,
    derive_ids,
    read_manifest,
    read_moments,
    write_manifest,
)
from indexing.errors import ConfigError

__all__ = ["VIDEO_SUFFIXES", "CorpusEntry", "read_corpus", "read_moments", "write_manifest"]

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".ogv", ".3gp"}
)
MANIFEST_SUFFIXES = frozenset({".csv"})


def read_corpus(spec: str | Path, *, log: Callable[[str], None] | None = None) -> list[CorpusEntry]:
    """List the videos of a corpus.

    Args:
        spec: A manifest ``.csv`` (a ``path`` column, optional ``video_id``, ``label``, ``split`` and any
            other columns, kept in ``extra``; relative paths are relative to the manifest's folder), a
            directory (every file with a video suffix, recursively, hidden files skipped), a glob such as
            ``"data/**/*.mp4"`` (every matching file), or a single video file.
        log: Receives a note when a manifest's ids were derived from paths.

    Returns:
        Entries in manifest order, or sorted by path for a directory or glob.

    Raises:
        ConfigError: Nothing exists at ``spec``, no video matched, the manifest lacks a ``path`` column, has
            no rows or a row with an empty path, or ids are duplicated (all of them listed).
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
            raise ConfigError(f"{spec}: no video files found (suffixes: {', '.join(sorted(VIDEO_SUFFIXES))})")
        return _from_files(files, path)
    if path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            return read_manifest(path, require=("path",), log=log)
        return _from_files([path], path.parent)
    if glob.has_magic(text):
        files = sorted(
            Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file()
        )
        if not files:
            raise ConfigError(f"{spec}: the glob matched no files")
        return _from_files(files, _glob_root(text))
    raise ConfigError(f"{spec}: no such manifest (.csv), directory, glob or video file")


def _glob_root(pattern: str) -> Path:
    """The folder above the first path part holding a glob character."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*fixed) if fixed else Path(".")


def _from_files(files: list[Path], root: Path) -> list[CorpusEntry]:
    ids = derive_ids(files, root)
    return [CorpusEntry(video_id=i, path=absolute(p)) for i, p in zip(ids, files, strict=True)]

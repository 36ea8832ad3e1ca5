"""Feature stores: one logical store per corpus, chunked along rows, registered by name.

Layout (see ``shared/design.md`` §4): ``features/{image,audio,fused}`` are ``(rows, dim)`` arrays
chunked along rows; ``valid``, ``audio_valid`` (bool) and ``time_s`` (float64) are per-row; a per-video
index maps each video to its row range. Tasks own chunk-aligned row ranges, so parallel writers never
share a chunk, and a retried task simply rewrites its own rows.

Readers (``skim``, ``l2l store``) only need :func:`open_store` and the read methods below; the
extraction stage (``pipeline``) also uses ``create`` / ``write_rows`` / ``set_index``.

This module is the interface. Backends live in ``zarr_store.py`` and ``hdf5_store.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

FORMAT_NAME = "l2l-features"
FORMAT_VERSION = 1
FEATURES = ("image", "audio", "fused")  # 512-d each, stored under features/<name>
ROW_ARRAYS = ("valid", "audio_valid", "time_s")  # one value per row
STATUSES = ("ok", "failed", "pending")


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


class FeatureStore(ABC):
    """A feature store backend. Subclasses set ``name`` and are registered with :func:`register_store`."""

    name: ClassVar[str]

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
    ) -> FeatureStore:
        """Create an empty store with all arrays sized to ``rows``; write attrs and the index once."""

    @abstractmethod
    def write_rows(self, start: int, stop: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write rows ``[start, stop)`` of every array in ``arrays`` (feature names and row arrays).

        ``start`` must be a multiple of ``chunk_rows`` and ``stop`` either a multiple of it or the end
        of the store; otherwise ``ValueError`` (two writers must never share a chunk).
        """

    @abstractmethod
    def set_index(self, records: Sequence[VideoRecord]) -> None:
        """Replace the per-video index (done once before tasks and once when finalising)."""

    # ---- reading (skim, l2l store, tests) ------------------------------------------------------
    @classmethod
    @abstractmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        """Open an existing store (``mode`` ``"r"`` or ``"r+"``)."""

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

    @abstractmethod
    def videos(self) -> list[VideoRecord]:
        """The per-video index, in store order."""

    @abstractmethod
    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of one array: a feature name (``(n, dim)``) or a row array (``(n,)``)."""

    def close(self) -> None:  # noqa: B027 - optional for backends without handles
        """Release file handles."""

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def video(self, video_id: str) -> VideoRecord:
        """The index record of one video; ``KeyError`` naming close matches when unknown."""
        for rec in self.videos():
            if rec.video_id == video_id:
                return rec
        raise KeyError(f"video {video_id!r} is not in store {getattr(self, 'path', '')}")

    def read_video(self, video_id: str, names: Sequence[str] = FEATURES + ROW_ARRAYS) -> dict[str, np.ndarray]:
        """All rows of one video for each requested array: features ``(steps, dim)``, row arrays ``(steps,)``."""
        rec = self.video(video_id)
        return {n: self.read_rows(n, rec.first_row, rec.first_row + rec.steps) for n in names}


_STORES: dict[str, type[FeatureStore]] = {}


def register_store(cls: type[FeatureStore]) -> type[FeatureStore]:
    """Class decorator: make a backend available by its ``name``."""
    _STORES[cls.name] = cls
    return cls


def available_stores() -> list[str]:
    """Names of the registered backends (the CLI's ``--format`` choices)."""
    _load_backends()
    return sorted(_STORES)


def get_store(name: str) -> type[FeatureStore]:
    """The backend class registered as ``name``; ``ValueError`` listing the choices otherwise."""
    _load_backends()
    if name not in _STORES:
        raise ValueError(f"Unknown store format {name!r}; available: {', '.join(sorted(_STORES))}")
    return _STORES[name]


def _load_backends() -> None:
    from . import hdf5_store, zarr_store  # noqa: F401 - registration side effect

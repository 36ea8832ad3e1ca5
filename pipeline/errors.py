"""The one exception type for unreadable media."""

from __future__ import annotations

from pathlib import Path


class MediaError(Exception):
    """A video that cannot be read: missing, empty, garbage, truncated, corrupt, too short, hung.

    Attributes:
        path: The file that failed.
        reason: A short human-readable cause, e.g. ``"no video stream"``; stored in the index.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across process boundaries (Dask, multiprocessing)
        return (MediaError, (self.path, self.reason))

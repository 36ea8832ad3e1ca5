"""The project's one error tree. ``cli.main`` catches :class:`L2LError` once; anything else is a bug.

Every message says what went wrong *and* what to do next. Each class carries the exit code the command
line ends with (documented in the README's exit-code table):

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     success
1     the run finished but some videos failed, or a check found problems (listed on stderr)
2     a user mistake: a bad option value, file or model (:class:`ConfigError`, :class:`CheckpointError`)
3     an extraction is incomplete: rerun the same command to resume (:class:`IncompleteError`)
4     a store is damaged or unreadable: missing or corrupt chunks (:class:`StoreError`)
5     the cluster could not be reached or started (:class:`ClusterError`)
6     a video could not be read where one video was asked for (:class:`MediaError`)
130   interrupted (Ctrl-C)
====  ==========================================================================================

The user-mistake classes also derive from :class:`ValueError` so library callers that catch the standard
type keep working.
"""

from __future__ import annotations

from pathlib import Path


class L2LError(Exception):
    """Base of every error the project raises on purpose; the message names the value and the fix."""

    exit_code = 2


class ConfigError(L2LError, ValueError):
    """A bad option, argument, file or combination given by the user."""

    exit_code = 2


class CheckpointError(L2LError, ValueError):
    """A checkpoint that is missing, damaged, of the wrong kind, or does not fit the data it is run on."""

    exit_code = 2


class StoreError(L2LError, ValueError):
    """A feature store that cannot be opened, is locked, or returned data that failed verification."""

    exit_code = 4


class ClusterError(L2LError, ConnectionError):
    """A Dask scheduler that cannot be reached, or a cluster that cannot be started."""

    exit_code = 5


class IncompleteError(L2LError):
    """Work that stopped part-way and resumes when the same command is rerun."""

    exit_code = 3


class MediaError(L2LError):
    """A video that cannot be read: missing, empty, garbage, truncated, corrupt, too short, hung.

    Extraction records it with its reason and goes on; it reaches the user as an error only where one
    video was asked for.

    Attributes:
        path: The file that failed.
        reason: A short human-readable cause, e.g. ``"no video stream"``; stored in the index.
    """

    exit_code = 6

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across process boundaries (Dask, multiprocessing)
        return (MediaError, (self.path, self.reason))

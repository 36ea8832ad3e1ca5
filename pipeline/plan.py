"""Extraction planning: give every probed video a row range and group videos into chunk-aligned tasks.

Pure functions only (no I/O), so the plan is deterministic: the same probed corpus and the same
``chunk_rows`` / ``task_steps`` always give the same rows and tasks. The plan is recorded in the store
as the per-video index (``first_row``, ``steps``) plus the planning parameters and a digest, and a resume
rebuilds exactly the same tasks with :func:`replan` from that index and the recorded summary.

Layout rules of version 1 (``shared/design.md`` §4), used whenever they give at least one task per
worker, so a corpus that needs no splitting is laid out exactly as before version 2 existed:

- Videos keep corpus order; a video's steps are contiguous rows ``[first_row, first_row + steps)``.
- Consecutive videos are grouped into a task until it holds at least ``task_steps`` steps; a video is
  never split, so one long video may make a task larger than ``task_steps``.
- Every task starts on a chunk boundary. Rows between the end of a task's last video and the next
  chunk boundary are padding (``valid`` false) owned by that task, so a task writes whole chunks only
  (the last task ends at the end of the store) and two tasks never share a chunk.
- Videos that failed probing (``steps == 0``) get no rows (``first_row`` 0) and belong to no task.

Version 2 (*split*), chosen only when version 1 gives fewer tasks than workers (a small corpus, or one
long video on a cluster): videos are laid out back to back with no padding, the store's chunks are dealt
out evenly to ``n = min(chunks, max(workers, ceil(steps / task_steps)))`` tasks, and a video crossing a
task boundary is cut there: each task decodes only its step range of the video (a :class:`TaskVideo`
with an ``offset``). Tasks stay chunk-aligned and never share a chunk. A corpus of at most one chunk
stays one task (a chunk cannot be split between writers). The worker count is part of a version-2 plan
(its summary and digest), so a resume rebuilds the recorded plan whatever the cluster size now.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from indexing.errors import ConfigError
from indexing.stores import VideoRecord

PLAN_VERSION = 2  # the newest layout this planner makes; each plan records its own version


@dataclass(frozen=True)
class TaskVideo:
    """One video, or one piece of a video cut at a task boundary, inside a task.

    Attributes:
        pos: Position of the video in the store index.
        video_id: The video's id.
        path: Source video path.
        first_row: Store row of the piece's first step (the video's first row when ``offset`` is 0).
        steps: Steps (rows) of this piece.
        offset: The piece's first step within the video (0 unless a version-2 plan cut the video).
        video_steps: The whole video's steps (0: the same as ``steps``, the video is not cut).
    """

    pos: int
    video_id: str
    path: str
    first_row: int
    steps: int
    offset: int = 0
    video_steps: int = 0

    @property
    def total(self) -> int:
        """Steps of the whole video."""
        return self.video_steps or self.steps

    @property
    def is_piece(self) -> bool:
        """Whether the video is cut: other tasks hold its other steps."""
        return self.steps != self.total


@dataclass(frozen=True)
class Task:
    """A unit of work: the videos of a chunk-aligned row range ``[start, stop)``.

    Attributes:
        index: Task number in the plan (0-based).
        start: First row; a multiple of ``chunk_rows``.
        stop: End row (exclusive); a multiple of ``chunk_rows`` or the end of the store.
        videos: The videos written by this task, in row order, contiguous from ``start``.
    """

    index: int
    start: int
    stop: int
    videos: tuple[TaskVideo, ...]

    @property
    def key(self) -> str:
        """Stable task name, used as the Dask key and the done-marker name."""
        return f"extract-{self.index:06d}"

    @property
    def steps(self) -> int:
        """Video rows in the task (without padding)."""
        return sum(v.steps for v in self.videos)

    @property
    def padding(self) -> int:
        """Padding rows at the end of the task."""
        return self.stop - self.start - self.steps


@dataclass(frozen=True)
class Plan:
    """Rows and tasks for one corpus.

    Attributes:
        records: The per-video index in corpus order, ``first_row`` / ``steps`` filled in.
        tasks: Tasks in row order.
        rows: Total rows of the store (video rows plus padding).
        chunk_rows: Rows per chunk.
        task_steps: Target steps per task.
        version: Layout version (1: whole videos per task; 2: videos cut at task boundaries).
        workers: The worker count a version-2 plan was made for (1 for version 1, where it plays no part).
    """

    records: tuple[VideoRecord, ...]
    tasks: tuple[Task, ...]
    rows: int
    chunk_rows: int
    task_steps: int
    version: int = 1
    workers: int = 1

    @property
    def steps(self) -> int:
        """Video rows in the store."""
        return sum(t.steps for t in self.tasks)

    def digest(self) -> str:
        """SHA-256 of everything that fixes where rows go: parameters, video ranges and task ranges."""
        h = hashlib.sha256()
        head = [self.version, self.chunk_rows, self.task_steps, self.rows]
        h.update(json.dumps(head if self.version == 1 else [*head, self.workers]).encode())
        for r in self.records:
            h.update(json.dumps([r.video_id, r.path, r.first_row, r.steps]).encode())
        for t in self.tasks:
            h.update(json.dumps([t.start, t.stop, [v.pos for v in t.videos]]).encode())
        return h.hexdigest()

    @property
    def split_videos(self) -> int:
        """Videos cut into pieces over several tasks."""
        return len({v.pos for t in self.tasks for v in t.videos if v.is_piece})

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description, stored in the store attrs as ``plan``."""
        failed = sum(1 for r in self.records if r.steps <= 0)
        extra = {"workers": self.workers, "split_videos": self.split_videos} if self.version >= 2 else {}
        return {
            "version": self.version,
            "videos": len(self.records),
            "planned_videos": len(self.records) - failed,
            "probe_failed": failed,
            "steps": self.steps,
            "rows": self.rows,
            "padding_rows": self.rows - self.steps,
            "tasks": len(self.tasks),
            "chunk_rows": self.chunk_rows,
            "task_steps": self.task_steps,
            **extra,
            "digest": self.digest(),
        }


def plan_extraction(
    records: Sequence[VideoRecord],
    *,
    chunk_rows: int,
    task_steps: int,
    workers: int = 1,
    version: int | None = None,
) -> Plan:
    """Give each video with steps a row range and group videos into chunk-aligned tasks.

    Args:
        records: Probed videos in corpus order; ``steps`` is the step count (0 for a video that failed
            probing). ``first_row`` is ignored and recomputed. The inputs are not modified.
        chunk_rows: Rows per store chunk (> 0).
        task_steps: Target steps per task (> 0); a task closes once it holds at least this many.
        workers: Workers that will run the tasks (> 0); with fewer version-1 tasks than this, videos are
            cut so that every worker gets work (version 2, see the module docstring).
        version: Force a layout version (a resume rebuilds the recorded one, see :func:`replan`);
            ``None`` picks version 1 unless it leaves workers idle and version 2 gives more tasks.

    Returns:
        The plan; see the module docstring for the layout rules.

    Raises:
        ConfigError: Non-positive ``chunk_rows`` / ``task_steps`` / ``workers``, an unknown version,
            negative steps or duplicate video ids.
    """
    if chunk_rows <= 0:
        raise ConfigError(f"chunk_rows must be positive, got {chunk_rows}")
    if task_steps <= 0:
        raise ConfigError(f"task_steps must be positive, got {task_steps}")
    if not isinstance(workers, int) or workers <= 0:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    if version not in (None, 1, 2):
        raise ConfigError(
            f"plan version {version!r} is unknown (this l2l makes 1 and {PLAN_VERSION}); "
            "a newer l2l wrote this store, use it"
        )
    seen: set[str] = set()
    for r in records:
        if r.video_id in seen:
            raise ConfigError(f"duplicate video id {r.video_id!r} ({r.path}); video ids must be unique")
        seen.add(r.video_id)
        if r.steps < 0:
            raise ConfigError(f"{r.path}: negative step count {r.steps}")
    if version == 2:
        plan = _plan_split(records, chunk_rows, task_steps, workers)
    else:
        plan = _plan_whole(records, chunk_rows, task_steps)
        if version is None and len(plan.tasks) < workers:
            split = _plan_split(records, chunk_rows, task_steps, workers)
            if len(split.tasks) > len(plan.tasks):
                plan = split
    check_plan(plan)
    return plan


def replan(
    records: Sequence[VideoRecord], recorded: dict[str, Any], *, chunk_rows: int, task_steps: int
) -> Plan:
    """Rebuild the plan a store was created with, from its index and its recorded ``plan`` summary.

    The recorded version and worker count decide the layout, not today's cluster: a store planned for
    two workers resumes with its own tasks on one. Stores from before version 2 record no ``workers``
    (and version 1).

    Raises:
        ConfigError: The recorded summary names a version this planner does not know.
    """
    recorded = recorded if isinstance(recorded, dict) else {}
    version = int(recorded.get("version", 1))
    workers = int(recorded.get("workers", 1))
    return plan_extraction(
        records, chunk_rows=chunk_rows, task_steps=task_steps, workers=workers, version=version
    )


def _plan_whole(records: Sequence[VideoRecord], chunk_rows: int, task_steps: int) -> Plan:
    """Version 1: whole videos, grouped until a task holds ``task_steps``, padding to the next chunk."""
    out: list[VideoRecord] = []
    tasks: list[Task] = []
    cursor = 0  # next free row
    task_start = 0
    members: list[TaskVideo] = []

    def close_task(stop: int) -> None:
        tasks.append(Task(index=len(tasks), start=task_start, stop=stop, videos=tuple(members)))

    for pos, rec in enumerate(records):
        if rec.steps == 0:
            out.append(replace(rec, first_row=0))
            continue
        if members and cursor - task_start >= task_steps:
            # Close the full task only when another video follows, so the store never ends in padding.
            aligned = _ceil_to(cursor, chunk_rows)
            close_task(aligned)
            members = []
            task_start = cursor = aligned
        out.append(replace(rec, first_row=cursor))
        members.append(TaskVideo(pos, rec.video_id, rec.path, cursor, rec.steps))
        cursor += rec.steps
    if members:
        close_task(cursor)  # the last task ends at the end of the store, no padding needed
    rows = tasks[-1].stop if tasks else 0
    return Plan(tuple(out), tuple(tasks), rows, chunk_rows, task_steps, version=1, workers=1)


def _plan_split(records: Sequence[VideoRecord], chunk_rows: int, task_steps: int, workers: int) -> Plan:
    """Version 2: videos back to back, chunks dealt out evenly to the tasks, videos cut at task ends."""
    out: list[VideoRecord] = []
    cursor = 0
    for rec in records:
        out.append(replace(rec, first_row=cursor if rec.steps else 0))
        cursor += rec.steps
    rows = cursor
    chunks = -(-rows // chunk_rows)
    per_task = max(chunk_rows, task_steps // chunk_rows * chunk_rows)  # task_steps in whole chunks
    n = min(chunks, max(workers, -(-rows // per_task)))
    bounds = [min(rows, (i * chunks // n) * chunk_rows) for i in range(n + 1)] if n else [0]
    placed = [pos for pos, rec in enumerate(out) if rec.steps]
    tasks, k = [], 0  # k: the first placed video not wholly before the current task
    for i in range(n):
        start, stop = bounds[i], bounds[i + 1]
        members = []
        while k < len(placed) and out[placed[k]].first_row + out[placed[k]].steps <= start:
            k += 1
        j = k
        while j < len(placed) and out[placed[j]].first_row < stop:
            pos, rec = placed[j], out[placed[j]]
            lo, hi = max(start, rec.first_row), min(stop, rec.first_row + rec.steps)
            piece = TaskVideo(pos, rec.video_id, rec.path, lo, hi - lo, lo - rec.first_row, rec.steps)
            members.append(piece if piece.is_piece else replace(piece, video_steps=0))
            j += 1
        tasks.append(Task(index=i, start=start, stop=stop, videos=tuple(members)))
    return Plan(tuple(out), tuple(tasks), rows, chunk_rows, task_steps, version=2, workers=workers)


def check_plan(plan: Plan) -> None:
    """Check the invariants a writer relies on.

    Raises:
        ValueError: A task not starting on a chunk boundary, a task ending inside a chunk before the end
            of the store, overlapping or out-of-order tasks, or a video outside its task.
    """
    prev_stop = 0
    chunk = plan.chunk_rows
    for t in plan.tasks:
        if t.start % chunk:
            raise ValueError(f"task rows [{t.start}, {t.stop}) are not chunk-aligned (chunk_rows={chunk})")
        if t.stop % chunk and t.stop != plan.rows:
            raise ValueError(f"task rows [{t.start}, {t.stop}) end inside a chunk (chunk_rows={chunk})")
        if t.start < prev_stop or t.stop <= t.start:
            raise ValueError(f"task rows [{t.start}, {t.stop}) overlap the previous task or are empty")
        row = t.start
        for v in t.videos:
            if v.first_row != row or v.steps <= 0:
                raise ValueError(f"video {v.video_id!r} rows start at {v.first_row}, expected {row}")
            rec = plan.records[v.pos]
            placed = (rec.video_id, rec.first_row + v.offset, rec.steps)
            if placed != (v.video_id, v.first_row, v.total) or v.offset < 0 or v.offset + v.steps > v.total:
                raise ValueError(f"task {t.key} disagrees with the index about video {v.video_id!r}")
            if v.is_piece and plan.version < 2:
                raise ValueError(f"task {t.key} cuts video {v.video_id!r}, which plan version 1 never does")
            row += v.steps
        if row > t.stop:
            raise ValueError(f"task {t.key} videos end at row {row}, past the task end {t.stop}")
        prev_stop = t.stop
    if plan.rows != prev_stop:
        raise ValueError(f"plan has {plan.rows} rows but its tasks end at {prev_stop}")


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple

"""Extraction planning: give every probed video a row range and group videos into chunk-aligned tasks.

Pure functions only (no I/O), so the plan is deterministic: the same probed corpus and the same
``chunk_rows`` / ``task_steps`` always give the same rows and tasks. The plan is recorded in the store
as the per-video index (``first_row``, ``steps``) plus the planning parameters and a digest, and a resume
rebuilds exactly the same tasks with :func:`plan_extraction` from that index.

Layout rules (``shared/design.md`` §4):

- Videos keep corpus order; a video's steps are contiguous rows ``[first_row, first_row + steps)``.
- Consecutive videos are grouped into a task until it holds at least ``task_steps`` steps; a video is
  never split, so one long video may make a task larger than ``task_steps``.
- Every task starts on a chunk boundary. Rows between the end of a task's last video and the next
  chunk boundary are padding (``valid`` false) owned by that task, so a task writes whole chunks only
  (the last task ends at the end of the store) and two tasks never share a chunk.
- Videos that failed probing (``steps == 0``) get no rows (``first_row`` 0) and belong to no task.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from indexing.errors import ConfigError
from indexing.stores import VideoRecord

PLAN_VERSION = 1


@dataclass(frozen=True)
class TaskVideo:
    """One video inside a task: enough for a worker to decode it and place its rows.

    Attributes:
        pos: Position of the video in the store index.
        video_id: The video's id.
        path: Source video path.
        first_row: First row of the video in the store.
        steps: Rows the video owns.
    """

    pos: int
    video_id: str
    path: str
    first_row: int
    steps: int


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
    """

    records: tuple[VideoRecord, ...]
    tasks: tuple[Task, ...]
    rows: int
    chunk_rows: int
    task_steps: int

    @property
    def steps(self) -> int:
        """Video rows in the store."""
        return sum(t.steps for t in self.tasks)

    def digest(self) -> str:
        """SHA-256 of everything that fixes where rows go: parameters, video ranges and task ranges."""
        h = hashlib.sha256()
        h.update(json.dumps([PLAN_VERSION, self.chunk_rows, self.task_steps, self.rows]).encode())
        for r in self.records:
            h.update(json.dumps([r.video_id, r.path, r.first_row, r.steps]).encode())
        for t in self.tasks:
            h.update(json.dumps([t.start, t.stop, [v.pos for v in t.videos]]).encode())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description, stored in the store attrs as ``plan``."""
        failed = sum(1 for r in self.records if r.steps <= 0)
        return {
            "version": PLAN_VERSION,
            "videos": len(self.records),
            "planned_videos": len(self.records) - failed,
            "probe_failed": failed,
            "steps": self.steps,
            "rows": self.rows,
            "padding_rows": self.rows - self.steps,
            "tasks": len(self.tasks),
            "chunk_rows": self.chunk_rows,
            "task_steps": self.task_steps,
            "digest": self.digest(),
        }


def plan_extraction(records: Sequence[VideoRecord], *, chunk_rows: int, task_steps: int) -> Plan:
    """Give each video with steps a row range and group videos into chunk-aligned tasks.

    Args:
        records: Probed videos in corpus order; ``steps`` is the step count (0 for a video that failed
            probing). ``first_row`` is ignored and recomputed. The inputs are not modified.
        chunk_rows: Rows per store chunk (> 0).
        task_steps: Target steps per task (> 0); a task closes once it holds at least this many.

    Returns:
        The plan; see the module docstring for the layout rules.

    Raises:
        ConfigError: Non-positive ``chunk_rows`` / ``task_steps``, negative steps or duplicate video ids.
    """
    if chunk_rows <= 0:
        raise ConfigError(f"chunk_rows must be positive, got {chunk_rows}")
    if task_steps <= 0:
        raise ConfigError(f"task_steps must be positive, got {task_steps}")
    seen: set[str] = set()
    for r in records:
        if r.video_id in seen:
            raise ConfigError(f"duplicate video id {r.video_id!r} ({r.path}); video ids must be unique")
        seen.add(r.video_id)
        if r.steps < 0:
            raise ConfigError(f"{r.path}: negative step count {r.steps}")

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
    plan = Plan(tuple(out), tuple(tasks), rows, chunk_rows, task_steps)
    check_plan(plan)
    return plan


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
            if (rec.video_id, rec.first_row, rec.steps) != (v.video_id, v.first_row, v.steps):
                raise ValueError(f"task {t.key} disagrees with the index about video {v.video_id!r}")
            row += v.steps
        if row > t.stop:
            raise ValueError(f"task {t.key} videos end at row {row}, past the task end {t.stop}")
        prev_stop = t.stop
    if plan.rows != prev_stop:
        raise ValueError(f"plan has {plan.rows} rows but its tasks end at {prev_stop}")


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple

"""The step grid: where each 16-frame step lies in time, from decoder timestamps.

A step is 16 frames at a nominal 30 fps (16/30 s). Steps are laid in *time*, not frame counts, so
25 fps, 29.97 fps and variable-frame-rate files share one grid: step ``i`` starts at ``i * step_s``.
"""

from __future__ import annotations

import math

import numpy as np

STEP_S = 16 / 30  # one step = 16 frames at 30 fps
TEACHER_FRAMES = 16  # frames in a teacher clip
TEACHER_STRIDE_S = 2 / 30  # every other frame at 30 fps
AUDIO_S = 1.0  # audio window per step
SAMPLE_RATE = 16_000  # Hz, mono
EMBED_DIM = 512  # z_I, z_A, z_IA and the teacher descriptor (design notes §2)


def num_steps(duration_s: float, step_s: float = STEP_S) -> int:
    """Number of steps covering a video: ``ceil(duration / step)`` (the last one padded).

    Args:
        duration_s: Video duration in seconds.
        step_s: Step length in seconds.

    Returns:
        The step count, 0 for a non-positive duration.
    """
    if duration_s <= 0:
        return 0
    # Tolerate float noise: a 32/30 s video is exactly 2 steps, not 3.
    return max(1, math.ceil(duration_s / step_s - 1e-6))


def step_starts(n_steps: int, step_s: float = STEP_S) -> np.ndarray:
    """Start times of steps ``0..n_steps-1`` in seconds, shape ``(n_steps,)`` float64."""
    return np.arange(n_steps, dtype=np.float64) * step_s


def frames_at(frame_pts_s: np.ndarray, times_s: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each time: the last frame whose pts is <= t.

    Times before the first frame map to frame 0; times past the end map to the last frame.

    Args:
        frame_pts_s: Presentation timestamps of all frames in seconds, shape ``(F,)``, sorted.
        times_s: Query times in seconds, shape ``(N,)``.

    Returns:
        Frame indices, shape ``(N,)`` int64.
    """
    # A small tolerance keeps 29.97 fps timestamps (rounded by the container) on the right frame.
    idx = np.searchsorted(frame_pts_s, np.asarray(times_s) + 1e-4, side="right") - 1
    return np.clip(idx, 0, len(frame_pts_s) - 1).astype(np.int64)


def teacher_times(start_s: np.ndarray | float) -> np.ndarray:
    """Times of the 16 teacher-clip frames for each step start: every other frame at 30 fps.

    Args:
        start_s: Step start time(s) in seconds, scalar or shape ``(N,)``.

    Returns:
        Shape ``(N, 16)`` float64 (``(16,)`` for a scalar start).
    """
    offsets = np.arange(TEACHER_FRAMES, dtype=np.float64) * TEACHER_STRIDE_S  # (16,)
    return np.asarray(start_s, dtype=np.float64)[..., None] + offsets

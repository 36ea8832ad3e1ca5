"""Fixtures shared by the test files: real videos written by the project's own encoder, and one torch thread.

``make_video(path, seconds, ...)`` writes a real mp4 (or another container) whose content moves from frame
to frame (so steps differ) with 16 kHz noise as audio; ``one_torch_thread`` runs a module's tiny models on
one intra-op thread (on a shared 2-core box, spinning thread pools cost more than they give).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch  # first: a test module that imports decord before torch makes torch's convs crash


def write_moving_video(
    path: str | Path,
    seconds: float,
    *,
    fps: float = 30,
    audio: bool = True,
    seed: int = 0,
    size: tuple[int, int] = (48, 64),
    **kw,
) -> Path:
    """A real video of ``seconds`` at ``fps``: a seeded random image shifting 3 px per frame, plus noise.

    Args:
        path: Output file; its suffix is the container unless ``container=`` is given.
        seconds: Duration.
        fps: Frame rate.
        audio: With 1 channel of 16 kHz noise (``(1, seconds * 16000)`` float32).
        seed: Same seed, same pixels and samples.
        size: ``(height, width)``, even.
        **kw: Passed to :func:`pipeline.encode.write_video` (``container``, ``threads``, ...).
    """
    from pipeline.encode import write_video

    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * fps)))
    base = rng.integers(0, 255, (*size, 3), dtype=np.uint8)  # (H, W, 3)
    frames = (np.roll(base, 3 * i, axis=1) for i in range(n))  # moving content: steps differ
    wave = (0.2 * rng.standard_normal((1, int(seconds * 16000)))).astype(np.float32) if audio else None
    return write_video(path, frames, fps=fps, audio=wave, **kw)


@pytest.fixture(scope="session")
def make_video() -> Callable[..., Path]:
    """:func:`write_moving_video`, for fixtures of any scope."""
    return write_moving_video


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for a module (``pytestmark = pytest.mark.usefixtures(...)``)."""

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

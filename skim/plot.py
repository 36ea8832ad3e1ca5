"""Figures: training curves, accuracy trade-offs, and the moments a model chose in one video.

Every function returns a matplotlib ``Figure`` (Agg backend, no display needed); callers save and close it.
Frames arrive already decoded (``(n, H, W, 3)`` uint8): this package never imports a video decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from indexing.errors import L2LError


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves_figure(history: Sequence[Mapping[str, Any]]) -> Any:
    """Loss (left) and train/validation accuracy (right) per epoch, from ``train``'s history records."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    val = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val, strict=True), "s--", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    val = [(h["epoch"], h["val_accuracy"]) for h in history if h.get("val_accuracy") is not None]
    if val:
        ax_acc.plot(*zip(*val, strict=True), "s--", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    ax_acc.legend()
    fig.tight_layout()
    return fig


def tradeoff_figure(curves: Mapping[str, Any]) -> Any:
    """Accuracy vs steps used (skim and uniform) and vs indexing sub-sampling factor, from ``evaluate``."""
    plt = _pyplot()
    fig, (ax_steps, ax_sub) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = curves.get("steps") or {}
    if steps.get("k"):
        ax_steps.plot(steps["k"], steps["skim"], "o-", label="skim (first k steps)")
    if steps.get("uniform_k"):
        ax_steps.plot(steps["uniform_k"], steps["uniform"], "s--", label="uniform k steps")
    ax_steps.set(xlabel="steps used", ylabel="accuracy", title="accuracy vs steps used", ylim=(0, 1.02))
    ax_steps.legend()
    sub = curves.get("subsample") or {}
    if sub.get("factor"):
        ax_sub.plot(sub["factor"], sub["skim"], "o-")
        ax_sub.set_xscale("log", base=2)
        ax_sub.set_xticks(sub["factor"], [str(f) for f in sub["factor"]])
    ax_sub.set(
        xlabel="indexing sub-sampling factor k",
        ylabel="accuracy",
        title="accuracy vs sub-sampling",
        ylim=(0, 1.02),
    )
    fig.tight_layout()
    return fig


def moments_figure(
    *,
    video_id: str,
    chosen_steps: Sequence[int],
    uniform_steps: Sequence[int],
    attention: np.ndarray,
    marked_steps: Sequence[int] | None = None,
    step_s: float,
    chosen_frames: np.ndarray | None = None,
    uniform_frames: np.ndarray | None = None,
    segments: Sequence[tuple[float, float]] = (),
    title: str = "",
    note: str = "",
) -> Any:
    """Frames at the chosen moments next to uniformly spaced frames, over an attention timeline.

    Args:
        video_id: Shown in the title.
        chosen_steps: Chosen steps whose frames are drawn, in selection order.
        uniform_steps: As many uniformly spaced steps, for comparison.
        attention: ``(N,)`` attention weight per step in ``[0, 1]`` (drawn on a fixed 0-1 scale, so
            figures compare), e.g. the largest weight the step got at any pick.
        marked_steps: Every chosen step, marked on the timeline (default: ``chosen_steps``).
        step_s: Step length in seconds.
        chosen_frames: ``(len(chosen_steps), H, W, 3)`` uint8, or None when the video could not be decoded.
        uniform_frames: ``(len(uniform_steps), H, W, 3)`` uint8, or None.
        segments: Ground-truth ``(start_s, end_s)`` segments to shade, if known.
        title: Extra title text (e.g. the top prediction).
        note: Shown instead of frames when they are missing (e.g. "source file not found").

    Returns:
        The figure.
    """
    plt = _pyplot()
    cols = max(len(chosen_steps), len(uniform_steps), 1)
    fig = plt.figure(figsize=(max(8.0, 1.4 * cols), 6.2))
    grid = fig.add_gridspec(3, cols, height_ratios=[1, 1, 1.3])
    rows = (("chosen", chosen_steps, chosen_frames), ("uniform", uniform_steps, uniform_frames))
    for r, (name, steps, frames) in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(steps):
                ax.axis("off")
                continue
            if frames is not None:
                ax.imshow(frames[c])
            else:
                ax.text(0.5, 0.5, "no frame", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            ax.set_title(f"{steps[c] * step_s:.1f}s", fontsize=8)
            if c == 0:
                ax.set_ylabel(name)
    ax = fig.add_subplot(grid[2, :])
    t = np.arange(len(attention)) * step_s  # (N,) step starts
    for i, (start, end) in enumerate(segments):
        ax.axvspan(start, end, color="tab:green", alpha=0.2, label="ground truth" if i == 0 else None)
    ax.bar(t, attention, width=step_s, align="edge", color="tab:blue", alpha=0.6, label="attention")
    for i, s in enumerate(chosen_steps if marked_steps is None else marked_steps):
        ax.axvline(s * step_s + step_s / 2, color="tab:red", lw=0.8, label="chosen" if i == 0 else None)
    for i, s in enumerate(uniform_steps):
        ax.axvline(s * step_s + step_s / 2, color="gray", lw=0.8, ls=":", label="uniform" if i == 0 else None)
    ax.set(xlabel="time (s)", ylabel="attention", xlim=(0, max(len(attention), 1) * step_s), ylim=(0, 1.05))
    ax.legend(loc="upper right", fontsize=8)
    heading = f"{video_id}  {title}".strip()
    if note:
        heading += f"\n{note}"
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, out: str | Path) -> Path:
    """Write ``fig`` as a PNG to ``out`` (its folder must exist) and close it.

    Raises:
        ConfigError: ``out``'s folder does not exist.
    """
    from indexing.errors import ConfigError

    out = Path(out)
    if not out.parent.is_dir():
        raise ConfigError(f"{out}: folder {out.parent} does not exist; create it or pick another path")
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def draw_moments(
    explanation: Mapping[str, Any],
    out: str | Path,
    *,
    read_frames: Callable[[str, Sequence[int]], np.ndarray] | None = None,
    segments: Sequence[tuple[float, float]] = (),
) -> dict[str, Any]:
    """Draw what :func:`skim.query.explain` found for one video into the PNG ``out``.

    Args:
        explanation: :func:`skim.query.explain`'s answer for the video.
        out: PNG to write.
        read_frames: ``(path, steps) -> (len(steps), H, W, 3) uint8`` frames at step starts (a video
            decoder lives on the pipeline side; this package never imports one). None: no frames.
        segments: Ground-truth ``(start_s, end_s)`` segments to shade.

    Returns:
        What was drawn: ``video_id``, ``out``, ``top``, ``moments``, ``shown_steps``, ``uniform_steps``,
        ``frames`` (whether frames were drawn) and ``note`` (why not, or None).
    """
    ex = explanation
    chosen, uniform = list(ex["shown_steps"]), list(ex["uniform_steps"])
    chosen_frames = uniform_frames = None
    note = ""
    source = Path(ex["path"])
    if read_frames is None:
        note = "frames skipped: no video decoder available"
    elif not source.is_file():
        note = f"frames skipped: source video {source} is gone"
    else:
        try:
            frames = read_frames(str(source), chosen + uniform)  # (len(chosen) + len(uniform), H, W, 3)
            chosen_frames, uniform_frames = frames[: len(chosen)], frames[len(chosen) :]
        except (L2LError, IndexError, OSError) as err:
            note = f"frames skipped: cannot decode {source}: {err}"
    top = ex["top"][0]
    title = f"{top['label']} ({top['prob']:.2f})"
    if ex.get("label"):
        title += f", true: {ex['label']}"
    fig = moments_figure(
        video_id=ex["video_id"],
        chosen_steps=chosen,
        marked_steps=ex["chosen_steps"],
        uniform_steps=uniform,
        attention=ex["attention"],
        step_s=ex["step_s"],
        chosen_frames=chosen_frames,
        uniform_frames=uniform_frames,
        segments=segments,
        title=title,
        note=note,
    )
    save_figure(fig, out)
    return {
        "video_id": ex["video_id"],
        "label": ex.get("label"),
        "out": str(out),
        "top": ex["top"],
        "moments": ex["moments"],
        "shown_steps": chosen,
        "uniform_steps": uniform,
        "frames": chosen_frames is not None,
        "note": note or None,
    }

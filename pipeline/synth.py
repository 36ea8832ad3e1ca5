"""Synthetic audio-visual corpus: labelled untrimmed videos whose class shows only in short evidence segments.

Nothing can be downloaded, yet tests, the demo and the benchmarks need long videos with known useful
moments. :func:`synthesize` writes real encoded media (:func:`pipeline.encode.write_video`) plus
``manifest.csv`` (read it with :func:`pipeline.corpus.read_corpus`), ``moments.json`` (the ground-truth
evidence segments, :func:`pipeline.corpus.read_moments`) and ``synth.json`` (the config, the class
signatures and the uniform-baseline ceiling of this corpus).

How a video is made:

- Each class has a **visual signature** (shape, colour, motion; a large sprite) and an **audio signature**
  (pitch, rhythm, timbre; a loud gated tone). Both appear together only inside 2-3 evidence segments of
  1.5-3 s (defaults). Everything else is label-independent clutter: a textured panning gradient, small
  distractor shapes of random colours bouncing around, background noise, a hum and random short beeps.
- ``modality`` says where the class is strong: ``both``; ``audio`` (the sprite is drawn at ``faint_opacity``);
  ``visual`` (the tone plays at ``faint_loudness``, about the level of the background noise; also every
  video without an audio track).
- Container, frame rate, audio format, duration and modality are drawn independently of the label (a
  seeded, proportional schedule), so no metadata and no file name reveals the class.
- Same config -> byte-identical files: all randomness comes from ``seed``, encoders run with one thread
  and bit-exact muxing, and per-video work does not depend on ``jobs``.

How hard it is (see :func:`uniform_baseline_ceiling`): a model that sees only T = 10 uniformly spaced steps
can be right beyond chance only when one of its steps lands in an evidence segment; otherwise nothing it
sees depends on the label and it guesses (1 / classes). With the default config (30-120 s, 2-3 segments of
1.5-3 s, about 5.6 s of evidence per video, 6 classes) a uniformly spaced step start falls inside a segment
in about 56% of videos (Monte Carlo over the generator's own sampler, 10^5 videos), so the uniform
baseline's best possible accuracy is about 0.63 (0.56 + 0.44 / 6). Even counting a hit whenever a step's 1 s
audio window merely overlaps a segment, hits are about 70% and the ceiling about 0.75. A model that finds
the evidence can reach 1.0. Long videos are where uniform sampling fails: its steps are d / 9 apart (13 s
at 120 s) while the evidence covers ~6 s in total.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from indexing.errors import ConfigError
from indexing.grid import AUDIO_S, STEP_S, num_steps

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 35, 35),
    "green": (40, 210, 60),
    "blue": (45, 75, 245),
    "yellow": (245, 225, 30),
    "magenta": (225, 45, 225),
    "cyan": (35, 225, 225),
    "orange": (250, 140, 15),
    "white": (250, 250, 250),
}
MOTIONS = ("orbit", "sweep", "bob", "zigzag", "pulse", "diagonal")
PITCHES_HZ = tuple(round(220.0 * 2.0 ** (3 * i / 7), 1) for i in range(8))  # 220 Hz .. 1760 Hz
RHYTHMS_HZ = (0.0, 2.0, 4.0, 7.0)  # beeps per second; 0 = a steady tone
TIMBRES: dict[str, tuple[float, ...]] = {  # harmonic amplitudes, fundamental first
    "pure": (1.0,),
    "hollow": (1.0, 0.0, 1 / 3, 0.0, 1 / 5),
    "bright": (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6),
}
# (shape, colour, pitch, timbre) index pairs are distinct for class k < lcm(6, 8) = lcm(8, 3) = 24, so each
# modality alone identifies the class.
MAX_CLASSES = 24
MODALITIES = ("both", "audio", "visual")
FPS_CHOICES = (Fraction(30), Fraction(25), Fraction(30000, 1001))
MARGIN_S = 1.0  # evidence stays this far from both ends, so every evidence step has a full audio window
GAP_S = 1.0  # minimum silence between two evidence segments
# Per-container encoder options: fast (the corpus is for tests) and single-threaded (x264 and VP9 output
# depends on the thread count, and files must be byte-identical on any machine).
ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "mp4": {"preset": "ultrafast", "x264-params": "bframes=2"},  # B-frames: pts reorder, as in real files
    "webm": {"deadline": "realtime", "cpu-used": "8"},
    "avi": {"b": "600k"},  # MJPEG at the default 200 kb/s is a blur of blocks
    "mkv": {},
}
AUDIO_ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "mp4": {"aac_coder": "fast"},
    "mkv": {"aac_coder": "fast"},
}  # AAC


@dataclass(frozen=True)
class ClassSignature:
    """What makes a class recognisable inside its evidence segments."""

    name: str
    shape: str
    colour: str
    motion: str
    pitch_hz: float
    rhythm_hz: float
    timbre: str


def class_signatures(classes: int) -> list[ClassSignature]:
    """The fixed signatures of classes ``0..classes-1`` (the same for every seed).

    Args:
        classes: Number of classes, 2 to :data:`MAX_CLASSES`.

    Returns:
        One signature per class; names are ``"<colour>-<shape>"`` and unique.

    Raises:
        ValueError: ``classes`` out of range.
    """
    if not 2 <= classes <= MAX_CLASSES:
        raise ConfigError(f"classes={classes} is out of range; use 2 to {MAX_CLASSES}")
    colours = list(COLOURS)
    sigs = []
    for k in range(classes):
        shape, colour = SHAPES[k % len(SHAPES)], colours[k % len(colours)]
        sigs.append(
            ClassSignature(
                name=f"{colour}-{shape}",
                shape=shape,
                colour=colour,
                motion=MOTIONS[(k + k // len(MOTIONS)) % len(MOTIONS)],
                pitch_hz=PITCHES_HZ[k % len(PITCHES_HZ)],
                rhythm_hz=RHYTHMS_HZ[(k + k // len(RHYTHMS_HZ)) % len(RHYTHMS_HZ)],
                timbre=list(TIMBRES)[k % len(TIMBRES)],
            )
        )
    return sigs


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic corpus; the same config always gives the same bytes.

    Attributes:
        videos: Number of videos.
        classes: Number of classes (2 to 24); labels are balanced (counts differ by at most one).
        seed: Seed of every random choice.
        min_s: Shortest video in seconds.
        max_s: Longest video in seconds.
        width: Frame width in pixels (even).
        height: Frame height in pixels (even).
        test_fraction: Share of each class put in the ``test`` split (stratified), the rest is ``train``.
        min_segments: Fewest evidence segments per video.
        max_segments: Most evidence segments per video (fewer when a short video has no room).
        min_segment_s: Shortest evidence segment in seconds.
        max_segment_s: Longest evidence segment in seconds.
        faint_opacity: Opacity (0-1) of the visual signature in ``audio``-modality videos.
        faint_loudness: Loudness (0-1, relative) of the audio signature in ``visual``-modality videos.
        mp4_only: Write every video as H.264/AAC mp4 at 30 fps with 16 kHz mono audio.
    """

    videos: int = 36
    classes: int = 6
    seed: int = 0
    min_s: float = 30.0
    max_s: float = 120.0
    width: int = 160
    height: int = 120
    test_fraction: float = 0.25
    min_segments: int = 2
    max_segments: int = 3
    min_segment_s: float = 1.5
    max_segment_s: float = 3.0
    faint_opacity: float = 0.2
    faint_loudness: float = 0.05
    mp4_only: bool = False

    def __post_init__(self) -> None:
        if self.videos < self.classes:
            raise ConfigError(
                f"videos={self.videos} < classes={self.classes}; ask for at least one per class"
            )
        class_signatures(self.classes)  # validates the class count
        if not 0 < self.min_s <= self.max_s:
            raise ConfigError(f"durations min_s={self.min_s}, max_s={self.max_s}; need 0 < min_s <= max_s")
        if self.width < 32 or self.height < 32 or self.width % 2 or self.height % 2:
            raise ConfigError(f"frame size {self.width}x{self.height}; use even sizes of at least 32x32")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError(f"test_fraction={self.test_fraction}; use a value in [0, 1)")
        if not 1 <= self.min_segments <= self.max_segments:
            raise ConfigError(
                f"segments {self.min_segments}..{self.max_segments}; need 1 <= min_segments <= max_segments"
            )
        if not 0.5 <= self.min_segment_s <= self.max_segment_s:
            raise ConfigError(
                f"segment lengths {self.min_segment_s}..{self.max_segment_s} s; "
                "need 0.5 <= min_segment_s <= max_segment_s"
            )
        if self.min_s < self.max_segment_s + 2 * MARGIN_S:
            raise ConfigError(
                f"min_s={self.min_s} cannot hold a {self.max_segment_s} s segment with {MARGIN_S} s margins; "
                f"raise min_s to {self.max_segment_s + 2 * MARGIN_S} or lower max_segment_s"
            )
        for name in ("faint_opacity", "faint_loudness"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)}; use a value in [0, 1]")


@dataclass(frozen=True)
class VideoPlan:
    """One video to render; every field is decided before any rendering starts."""

    video_id: str
    label: int
    split: str
    n_frames: int
    fps: Fraction
    container: str
    sample_rate: int  # 0: no audio track
    channels: int
    modality: str
    segments: tuple[tuple[float, float], ...]
    seed: int
    width: int
    height: int
    faint_opacity: float
    faint_loudness: float
    signature: ClassSignature = field(repr=False)

    @property
    def duration_s(self) -> float:
        return self.n_frames / float(self.fps)

    @property
    def path(self) -> str:
        return f"videos/{self.video_id}.{self.container}"


def _schedule(rng: np.random.Generator, n: int, shares: list[float]) -> np.ndarray:
    """Assign choice ``i`` to about ``shares[i] * n`` of ``n`` items, in a seeded order. Shape ``(n,)``."""
    quantile = (rng.permutation(n) + 0.5) / n
    return np.searchsorted(np.cumsum(shares), quantile, side="right").clip(0, len(shares) - 1)


def _place_segments(rng: np.random.Generator, duration_s: float, config: SynthConfig) -> list[list[float]]:
    """Non-overlapping evidence segments ``[[start_s, end_s], ...]`` sorted, inside the margins."""
    n = int(rng.integers(config.min_segments, config.max_segments + 1))
    lengths = rng.uniform(config.min_segment_s, config.max_segment_s, n)
    room = duration_s - 2 * MARGIN_S
    while n > 1 and lengths[:n].sum() + (n - 1) * GAP_S > room:  # a short video holds fewer
        n -= 1
    lengths = lengths[:n]
    free = room - lengths.sum() - (n - 1) * GAP_S
    cuts = np.sort(rng.uniform(0.0, free, n))  # slack before each segment
    starts = MARGIN_S + cuts + np.concatenate([[0.0], np.cumsum(lengths[:-1] + GAP_S)])
    return [
        [round(float(s), 3), round(float(s + length), 3)] for s, length in zip(starts, lengths, strict=True)
    ]


def plan_corpus(config: SynthConfig) -> list[VideoPlan]:
    """Decide every video (label, split, format, segments, content seed) from the config alone.

    Args:
        config: The corpus config.

    Returns:
        One plan per video, in video-id order.
    """
    rng = np.random.default_rng(config.seed)
    n, sigs = config.videos, class_signatures(config.classes)
    labels = rng.permutation(np.arange(n) % config.classes)
    durations = rng.uniform(config.min_s, config.max_s, n)
    containers = _schedule(rng, n, [0.6, 0.15, 0.1, 0.15])  # mp4, mkv, webm, avi
    fps_idx = _schedule(rng, n, [0.7, 0.15, 0.15])  # 30, 25, 29.97
    audio_idx = _schedule(rng, n, [0.1, 0.2, 0.7])  # none, 48 kHz stereo, 16 kHz mono
    modality_idx = _schedule(rng, n, [1 / 3, 1 / 3, 1 / 3])
    segments = [_place_segments(rng, float(d), config) for d in durations]
    seeds = rng.integers(0, 2**63 - 1, n)
    splits = np.full(n, "train", dtype=object)
    for c in range(config.classes):  # stratified: each class sends its share to test
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(members) * config.test_fraction)
        if config.test_fraction > 0 and len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        splits[members[:n_test]] = "test"

    plans = []
    for i in range(n):
        container = "mp4" if config.mp4_only else ("mp4", "mkv", "webm", "avi")[containers[i]]
        fps = Fraction(30) if config.mp4_only else FPS_CHOICES[fps_idx[i]]
        sample_rate, channels = ((0, 0), (48_000, 2), (16_000, 1))[2 if config.mp4_only else audio_idx[i]]
        modality = MODALITIES[modality_idx[i]] if sample_rate else "visual"
        n_frames = max(1, round(durations[i] * fps))
        plans.append(
            VideoPlan(
                video_id=f"v{i:05d}",
                label=int(labels[i]),
                split=str(splits[i]),
                n_frames=int(n_frames),
                fps=fps,
                container=container,
                sample_rate=sample_rate,
                channels=channels,
                modality=modality,
                segments=tuple((s, e) for s, e in segments[i]),
                seed=int(seeds[i]),
                width=config.width,
                height=config.height,
                faint_opacity=config.faint_opacity,
                faint_loudness=config.faint_loudness,
                signature=sigs[labels[i]],
            )
        )
    return plans


def uniform_baseline_ceiling(
    config: SynthConfig | None = None, *, steps: int = 10, samples: int = 10_000, seed: int = 1
) -> dict[str, float]:
    """Best accuracy a model that sees only ``steps`` uniformly spaced steps can reach on this generator.

    The baseline looks at steps ``round(linspace(0, N - 1, steps))`` of a video with ``N`` steps (16/30 s
    each). Outside the evidence segments nothing depends on the label, so when none of its steps lies in a
    segment it can only guess (1 / classes); when one does, assume it is always right. The ceiling is
    ``hit + (1 - hit) / classes``. Two hit rules are reported: ``hit_rate`` (a step *start* - the frame
    the image model sees - lies inside a segment) and ``hit_rate_audio`` (the step's 1 s audio window
    overlaps a segment, a generous upper bound). Computed by Monte Carlo over the generator's own duration
    and segment sampler, so it is the expectation over corpora drawn with this config; ``synthesize``
    also records the exact value for the corpus it wrote.

    Args:
        config: Corpus config; defaults to ``SynthConfig()``.
        steps: Steps the baseline sees (T).
        samples: Monte Carlo videos.
        seed: Monte Carlo seed.

    Returns:
        ``{"steps", "classes", "hit_rate", "hit_rate_audio", "ceiling_accuracy", "ceiling_accuracy_audio",
        "chance"}``.
    """
    config = config or SynthConfig()
    rng = np.random.default_rng(seed)
    durations = rng.uniform(config.min_s, config.max_s, samples)
    segments = [_place_segments(rng, float(d), config) for d in durations]
    return _ceiling(durations, segments, config.classes, steps)


def _ceiling(durations, segments, classes: int, steps: int) -> dict[str, float]:
    durations = np.asarray(durations, dtype=np.float64)  # (V,)
    most = max(len(s) for s in segments)
    seg = np.full((len(segments), most, 2), np.nan)  # (V, S, 2), NaN rows never hit
    for i, s in enumerate(segments):
        seg[i, : len(s)] = s
    n = np.array([num_steps(float(d)) for d in durations])  # (V,)
    starts_s = np.round(np.linspace(0, n - 1, steps, axis=1)) * STEP_S  # (V, T)
    t = starts_s[:, :, None]  # (V, T, 1) against (V, 1, S)
    begin, end = seg[:, None, :, 0], seg[:, None, :, 1]
    hit = float(((t >= begin) & (t < end)).any(axis=(1, 2)).mean())
    hit_audio = float(((t + AUDIO_S > begin) & (t < end)).any(axis=(1, 2)).mean())
    return {
        "steps": steps,
        "classes": classes,
        "hit_rate": round(hit, 4),
        "hit_rate_audio": round(hit_audio, 4),
        "ceiling_accuracy": round(hit + (1 - hit) / classes, 4),
        "ceiling_accuracy_audio": round(hit_audio + (1 - hit_audio) / classes, 4),
        "chance": round(1 / classes, 4),
    }


# ---- rendering -------------------------------------------------------------------------------------------


def _sprite(shape: str, size: int) -> np.ndarray:
    """Boolean mask of a shape, shape ``(size, size)``."""
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    if shape == "circle":
        return x**2 + y**2 <= 1.0
    if shape == "square":
        return np.maximum(abs(x), abs(y)) <= 0.8
    if shape == "triangle":
        return (y <= 0.8) & (abs(x) <= (y + 1.0) * 0.5)
    if shape == "cross":
        return ((abs(x) <= 0.28) | (abs(y) <= 0.28)) & (np.maximum(abs(x), abs(y)) <= 0.95)
    if shape == "ring":
        r2 = x**2 + y**2
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "diamond":
        return abs(x) + abs(y) <= 1.0
    if shape == "bar":  # distractor only
        return (abs(y) <= 0.3) & (abs(x) <= 0.95)
    if shape == "ellipse":  # distractor only
        return x**2 + (y / 0.5) ** 2 <= 1.0
    raise ConfigError(f"Unknown shape {shape!r}; available: {', '.join((*SHAPES, 'bar', 'ellipse'))}")


def _paste(frame: np.ndarray, mask: np.ndarray, cx: float, cy: float, rgb: np.ndarray, alpha: float) -> None:
    """Blend ``rgb`` into ``frame`` (in place) where ``mask`` is set, centred at pixel ``(cx, cy)``."""
    h, w = frame.shape[:2]
    mh, mw = mask.shape
    x0, y0 = int(round(cx)) - mw // 2, int(round(cy)) - mh // 2
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + mw, w), min(y0 + mh, h)
    if fx0 >= fx1 or fy0 >= fy1:
        return
    m = mask[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    region = frame[fy0:fy1, fx0:fx1]
    if alpha >= 1.0:
        region[m] = rgb
    else:
        region[m] = (region[m] * (1 - alpha) + rgb * alpha).astype(np.uint8)


def _motion(motion: str, tau_s: float, phase: float) -> tuple[float, float, float]:
    """Signature position ``(x, y)`` as fractions of the frame and size scale, ``tau_s`` into a segment."""
    s = math.sin(2 * math.pi * 0.5 * tau_s + phase)
    c = math.cos(2 * math.pi * 0.5 * tau_s + phase)
    if motion == "orbit":
        return 0.5 + 0.25 * c, 0.5 + 0.25 * s, 1.0
    if motion == "sweep":
        return 0.5 + 0.3 * s, 0.5, 1.0
    if motion == "bob":
        return 0.5, 0.5 + 0.25 * s, 1.0
    if motion == "zigzag":
        tri = 2 * abs(((0.4 * tau_s + phase / (2 * math.pi)) % 1.0) - 0.5)  # 0..1 triangle wave
        return 0.2 + 0.6 * tri, 0.5 + 0.2 * math.copysign(1.0, math.sin(2 * math.pi * 2 * tau_s)), 1.0
    if motion == "pulse":
        return 0.5, 0.5, 0.65 + 0.35 * math.sin(2 * math.pi * 1.5 * tau_s + phase)
    if motion == "diagonal":
        return 0.5 + 0.3 * s, 0.5 + 0.25 * s, 1.0
    raise ConfigError(f"Unknown motion {motion!r}; available: {', '.join(MOTIONS)}")


def _strengths(plan: VideoPlan) -> tuple[float, float]:
    """(visual, audio) signature strength for the plan's modality."""
    if plan.modality == "audio":
        return plan.faint_opacity, 1.0
    if plan.modality == "visual":
        return 1.0, plan.faint_loudness
    return 1.0, 1.0


def render_frames(plan: VideoPlan) -> Iterator[np.ndarray]:
    """Yield the video's frames one at a time, each ``(H, W, 3)`` uint8 (never the whole video at once).

    Args:
        plan: The video to render.

    Yields:
        RGB frames in presentation order, ``plan.n_frames`` of them.
    """
    rng = np.random.default_rng([plan.seed, 0])
    h, w = plan.height, plan.width
    fps = float(plan.fps)
    # Background: a vertical gradient between two dim random colours plus a texture that pans sideways.
    top, bottom = rng.uniform(15, 110, (2, 3))
    ramp = np.linspace(0.0, 1.0, h)[:, None, None]  # (H, 1, 1)
    texture = rng.normal(0.0, 7.0, (h, w, 1)).repeat(2, axis=0)[:h]  # (H, W, 1): coarse rows
    texture = np.concatenate([texture, texture], axis=1)  # (H, 2W, 1): periodic, so panning never jumps
    background = np.clip(top * (1 - ramp) + bottom * ramp + texture, 0, 255).astype(np.uint8)  # (H, 2W, 3)
    pan_px_s = rng.uniform(-12, 12)
    # Distractors: small shapes of random colours bouncing around, independent of the label.
    n_distractors = int(rng.integers(3, 6))
    distractors = []
    for _ in range(n_distractors):
        kind = ("bar", "ellipse", "circle", "square")[int(rng.integers(4))]
        size = max(4, int(rng.uniform(0.06, 0.16) * h))
        distractors.append(
            {
                "mask": _sprite(kind, size),
                "rgb": rng.integers(0, 256, 3).astype(np.uint8),
                "pos": rng.uniform([0, 0], [w, h]),
                "vel": rng.uniform(-40, 40, 2),  # px/s
            }
        )
    sig = plan.signature
    sig_rgb = np.array(COLOURS[sig.colour], dtype=np.uint8)
    sig_size = int(0.36 * h)
    masks: dict[int, np.ndarray] = {}
    phases = rng.uniform(0, 2 * math.pi, len(plan.segments))
    visual, _ = _strengths(plan)

    for i in range(plan.n_frames):
        t = i / fps
        shift = int(t * pan_px_s) % w
        frame = background[:, shift : shift + w].copy()  # (H, W, 3)
        for d in distractors:
            pos = d["pos"] + d["vel"] * (1.0 / fps)
            for axis, limit in ((0, w), (1, h)):  # bounce off the borders
                if not 0 <= pos[axis] <= limit:
                    d["vel"][axis] *= -1
                    pos[axis] = min(max(pos[axis], 0), limit)
            d["pos"] = pos
            _paste(frame, d["mask"], pos[0], pos[1], d["rgb"], 1.0)
        for (start_s, end_s), phase in zip(plan.segments, phases, strict=True):
            if start_s <= t < end_s and visual > 0:
                fx, fy, scale = _motion(sig.motion, t - start_s, float(phase))
                size = max(4, int(sig_size * scale))
                if size not in masks:
                    masks[size] = _sprite(sig.shape, size)
                _paste(frame, masks[size], fx * w, fy * h, sig_rgb, visual)
        yield frame


def render_audio(plan: VideoPlan) -> np.ndarray | None:
    """The video's soundtrack, ``(channels, samples)`` float32 in [-1, 1], or ``None`` without audio.

    Args:
        plan: The video to render.

    Returns:
        The waveform covering the video's duration at ``plan.sample_rate``.
    """
    if not plan.sample_rate:
        return None
    rng = np.random.default_rng([plan.seed, 1])
    sr = plan.sample_rate
    n = int(round(plan.duration_s * sr))
    # Background: low-passed noise, a hum at a random pitch and random short beeps; none depends on label.
    noise = rng.standard_normal(n + 7).astype(np.float32)
    wave = np.convolve(noise, np.full(8, 1 / 8, dtype=np.float32), mode="valid")[:n] * rng.uniform(0.03, 0.08)
    t_all = np.arange(n, dtype=np.float32) / sr
    wave += np.float32(rng.uniform(0.01, 0.04)) * np.sin(2 * np.pi * rng.uniform(50, 180) * t_all)
    for _ in range(int(rng.poisson(plan.duration_s / 3))):
        f_hz = math.exp(rng.uniform(math.log(150), math.log(3000)))
        beep_n = int(rng.uniform(0.15, 0.8) * sr)
        at = int(rng.integers(0, max(1, n - beep_n)))
        tt = np.arange(min(beep_n, n - at), dtype=np.float32) / sr
        env = np.hanning(len(tt)).astype(np.float32)
        wave[at : at + len(tt)] += np.float32(rng.uniform(0.05, 0.15)) * env * np.sin(2 * np.pi * f_hz * tt)
    # Evidence: the class tone, gated by its rhythm, inside each segment.
    sig = plan.signature
    _, strength = _strengths(plan)
    for start_s, end_s in plan.segments:
        a, b = int(start_s * sr), min(n, int(end_s * sr))
        tau = np.arange(b - a, dtype=np.float32) / sr
        tone = np.zeros(b - a, dtype=np.float32)
        for k, amp in enumerate(TIMBRES[sig.timbre], start=1):
            if amp and k * sig.pitch_hz < 0.45 * sr:  # stay below Nyquist
                tone += np.float32(amp) * np.sin(2 * np.pi * k * sig.pitch_hz * tau)
        tone /= np.abs(tone).max() + 1e-6
        if sig.rhythm_hz:
            tone *= np.clip(4 * np.sin(2 * np.pi * sig.rhythm_hz * tau), 0, 1)  # soft on/off beeps
        fade = np.clip(np.minimum(tau, tau[-1] - tau) / 0.03, 0, 1)  # 30 ms fades, no clicks
        wave[a:b] += np.float32(0.4 * strength) * tone * fade
    wave = np.clip(wave, -1, 1)
    if plan.channels == 2:
        return np.stack([wave, 0.8 * wave])  # (2, samples)
    return wave[None]  # (1, samples)


def write_one(out_dir: str | Path, plan: VideoPlan) -> Path:
    """Render and encode one planned video under ``out_dir`` (temp name, then rename: a rerun is a retry).

    Called in a process that imported decord before PyAV, this encodes with decord's FFmpeg build and the
    bytes differ from :func:`synthesize`'s (the content is the same).

    Args:
        out_dir: The corpus folder.
        plan: The video to write.

    Returns:
        The written file.
    """
    from pipeline.encode import write_video

    final = Path(out_dir) / plan.path
    tmp = final.with_name(f".{final.stem}.part{final.suffix}")  # the suffix picks the container
    write_video(
        tmp,
        render_frames(plan),
        fps=plan.fps,
        audio=render_audio(plan),
        sample_rate=plan.sample_rate or 16_000,
        container=plan.container,
        threads=1,
        options=ENCODER_OPTIONS[plan.container],
        audio_options=AUDIO_ENCODER_OPTIONS.get(plan.container),
    )
    os.replace(tmp, final)
    return final


def _fps_text(fps: Fraction) -> str:
    return f"{float(fps):.5f}".rstrip("0").rstrip(".")


def synthesize(
    out_dir: str | Path,
    config: SynthConfig,
    *,
    jobs: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, object]:
    """Write a synthetic corpus: ``videos/``, ``manifest.csv``, ``moments.json`` and ``synth.json``.

    Args:
        out_dir: Output folder (created).
        config: What to generate.
        jobs: Videos encoded in parallel (spawned processes, so call this under ``if __name__ ==
            "__main__":`` in a script); the bytes do not depend on it.
        overwrite: Replace a corpus already in ``out_dir`` (its old videos are deleted).
        progress: Show a progress bar.

    Returns:
        The summary also written to ``synth.json``: config, class signatures, counts, the uniform-baseline
        ceiling of this corpus and the wall time.

    Raises:
        ValueError: ``out_dir`` already holds a corpus and ``overwrite`` is false, or ``jobs < 1``.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    from pipeline.corpus import CorpusEntry, read_corpus, write_manifest

    if jobs < 1:
        raise ConfigError(f"jobs={jobs}; use 1 or more")
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    plans = plan_corpus(config)
    if manifest.exists():
        if not overwrite:
            raise ConfigError(f"{manifest} exists; pass --overwrite to replace it or pick another folder")
        keep = {(out_dir / p.path).resolve() for p in plans}
        for old in read_corpus(manifest):
            if (
                old.path.resolve() not in keep
                and old.path.is_file()
                and out_dir.resolve() in old.path.parents
            ):
                old.path.unlink()
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    # Always encode in fresh spawned workers, even for jobs=1: a process that imported decord before PyAV
    # binds PyAV to decord's bundled FFmpeg build, whose encoders give other bytes. Spawned workers import
    # only numpy and PyAV, so the bytes depend on the config alone (and the pinned PyAV wheel).
    bar = tqdm(total=len(plans), desc="synth", unit="video", disable=not progress)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(write_one, out_dir, p) for p in plans]):
            future.result()
            bar.update()
    bar.close()
    wall_s = time.perf_counter() - t0

    sigs = class_signatures(config.classes)
    entries = [
        CorpusEntry(
            video_id=p.video_id,
            path=out_dir / p.path,
            label=p.signature.name,
            split=p.split,
            extra={
                "duration_s": f"{p.duration_s:.4f}",
                "fps": _fps_text(p.fps),
                "container": p.container,
                "has_audio": str(int(p.sample_rate > 0)),
                "sample_rate": str(p.sample_rate),
                "channels": str(p.channels),
                "modality": p.modality,
                "width": str(p.width),
                "height": str(p.height),
            },
        )
        for p in plans
    ]
    moments = {
        p.video_id: {"label": p.signature.name, "segments": [list(s) for s in p.segments]} for p in plans
    }
    _write_text(out_dir / "moments.json", json.dumps(moments, indent=1) + "\n")
    summary: dict[str, object] = {
        "format": "l2l-synth",
        "version": 1,
        "config": asdict(config),
        "classes": [asdict(s) for s in sigs],
        "videos": len(plans),
        "splits": {s: sum(p.split == s for p in plans) for s in ("train", "test")},
        "containers": {c: sum(p.container == c for p in plans) for c in ENCODER_OPTIONS},
        "modalities": {m: sum(p.modality == m for p in plans) for m in MODALITIES},
        "hours": round(sum(p.duration_s for p in plans) / 3600, 3),
        "uniform_baseline": _ceiling(
            [p.duration_s for p in plans], [p.segments for p in plans], config.classes, steps=10
        ),
        "uniform_baseline_expected": uniform_baseline_ceiling(config),
    }
    _write_text(out_dir / "synth.json", json.dumps(summary, indent=2) + "\n")
    write_manifest(manifest, entries)  # last: a manifest means a complete corpus
    # The report speaks the CLI's vocabulary (classes: a count, labels: names); synth.json keeps its format.
    report = {
        **summary,
        "classes": len(sigs),
        "labels": [s.name for s in sigs],
        "class_signatures": summary["classes"],
    }
    return report | {"seconds": round(wall_s, 2), "out": str(out_dir)}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    os.replace(tmp, path)

"""A generated feature store with a planted signal, for tests, benchmarks and demos of skimming.

Every step holds Gaussian noise in ``image`` and ``audio`` (``fused`` is their scaled sum). In each video a
short run of "evidence" steps also carries a class-specific direction in both modalities; nothing else
depends on the class. A model that finds the evidence steps classifies almost perfectly, while the mean
of a few uniformly spaced steps mostly averages noise: skimming must beat uniform sampling here.
Alongside the store it writes a labels manifest (``labels.csv``) and ``moments.json`` with the evidence
segments as ground truth.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexing.grid import STEP_S
from indexing.stores import VideoRecord, get_store


@dataclass(frozen=True)
class PlantedSpec:
    """Shape of a planted-signal corpus.

    Attributes:
        videos: Number of videos (classes are assigned round-robin, splits 60/20/20 train/val/test).
        classes: Number of classes.
        min_steps: Shortest video in steps.
        max_steps: Longest video in steps.
        evidence_steps: Consecutive steps carrying the class direction in each video.
        strength: Norm of the planted direction (the noise has norm about ``sqrt(dim)``).
        dim: Feature dimension.
        chunk_rows: Store chunk length in rows.
        seed: Seed of everything random.
    """

    videos: int = 120
    classes: int = 4
    min_steps: int = 40
    max_steps: int = 120
    evidence_steps: int = 4
    strength: float = 24.0
    dim: int = 512
    chunk_rows: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.classes < 2 or self.videos < self.classes:
            raise ValueError(f"need classes >= 2 and videos >= classes, got {self.classes} and {self.videos}")
        if not 1 <= self.evidence_steps <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"need 1 <= evidence_steps ({self.evidence_steps}) <= min_steps ({self.min_steps}) "
                f"<= max_steps ({self.max_steps})"
            )


def write_planted_store(
    path: str | Path,
    spec: PlantedSpec = PlantedSpec(),
    *,
    store_format: str = "zarr",
    video_root: str | Path = "/nonexistent",
    models: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a planted-signal store plus ``labels.csv`` and ``moments.json`` beside it.

    Args:
        path: Store directory to create (must not exist or be empty).
        spec: Corpus shape.
        store_format: Registered store backend.
        video_root: Directory the index's (made-up) source paths point into; no video is written.
        models: Recorded as the store's ``models`` attribute, as extraction records the students
            (``{"students": {"sha256": ...}}``); None records none.

    Returns:
        ``{"store": path, "labels": csv path, "moments": json path}``.
    """
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    directions = rng.standard_normal((2, spec.classes, spec.dim))  # (modality, C, D)
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    steps = rng.integers(spec.min_steps, spec.max_steps + 1, size=spec.videos)  # (V,)
    first = np.concatenate([[0], np.cumsum(steps)[:-1]])  # (V,)
    rows = int(steps.sum())
    splits = np.array(["train", "train", "train", "val", "test"])[np.arange(spec.videos) % 5]
    records, moments, image, audio = [], {}, [], []
    for v in range(spec.videos):
        n, label = int(steps[v]), v % spec.classes
        vid = f"vid{v:05d}"
        z = rng.standard_normal((2, n, spec.dim)).astype(np.float32)  # (modality, n, D)
        start = int(rng.integers(0, n - spec.evidence_steps + 1))
        z[:, start : start + spec.evidence_steps] += spec.strength * directions[:, label, None, :]
        image.append(z[0])
        audio.append(z[1])
        records.append(
            VideoRecord(
                video_id=vid,
                path=str(Path(video_root) / f"{vid}.mp4"),
                first_row=int(first[v]),
                steps=n,
                duration_s=n * STEP_S,
                fps=30.0,
                has_audio=True,
                status="ok",
                label=f"class{label}",
                split=str(splits[v]),
            )
        )
        seg = [start * STEP_S, (start + spec.evidence_steps) * STEP_S]
        moments[vid] = {"label": f"class{label}", "segments": [seg]}
    image_rows, audio_rows = np.concatenate(image), np.concatenate(audio)  # (rows, D) each
    time_s = np.concatenate([np.arange(n) * STEP_S for n in steps])  # (rows,)
    attrs = {
        "step_s": STEP_S,
        "synthetic": {"kind": "planted", **spec.__dict__},
        "gflops_per_step": {"image": 0.97, "audio": 1.22, "fusion": 0.003, "teacher_clip": 81.0},
    }
    if models is not None:  # what extraction records about the models that made the features
        attrs["models"] = models
    store = get_store(store_format).create(
        path,
        index=records,
        rows=rows,
        chunk_rows=spec.chunk_rows,
        dim=spec.dim,
        attrs=attrs,
        tasks=[(0, rows)],
    )
    store.write_rows(
        0,
        rows,
        {
            "image": image_rows,
            "audio": audio_rows,
            "fused": (image_rows + audio_rows) / np.sqrt(2),
            "valid": np.ones(rows, dtype=bool),
            "audio_valid": np.ones(rows, dtype=bool),
            "time_s": time_s,
        },
    )
    store.mark_done(0, rows)  # readers see a task's rows once it is marked done
    store.close()
    labels = path.parent / f"{path.name}.labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "path", "label", "split"])
        for r in records:
            w.writerow([r.video_id, r.path, r.label, r.split])
    moments_path = labels.with_name("moments.json")
    moments_path.write_text(json.dumps(moments, indent=1))
    return {"store": path, "labels": labels, "moments": moments_path}

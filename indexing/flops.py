"""Measured compute per step: GFLOPs of the students, Ψ and the teacher clip, and CPU time per step.

Convention: **FLOPs = 2 x multiply-adds**, as counted by ``torch.utils.flop_counter.FlopCounterMode``
(convolutions and matrix products; BatchNorm, ReLU and pooling are not counted, <1% here). In this
convention torchvision's ``r2plus1d_18`` on one 16x112x112 clip is ~81 GFLOPs (torchvision's model card
says 40.5 "GFLOPS", which are multiply-adds); halve every number here to compare with multiply-add
tables. Paper preset, one step: image student ~0.97, audio student ~1.22 (its stride-1 stem keeps the
spectrogram large), Ψ ~0.003, students total ~2.2 GFLOPs, against ~81 for the teacher clip (~37x).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn


def count_gflops(fn: Callable[[], object]) -> float:
    """GFLOPs (2 x multiply-adds) of one call of ``fn`` under ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _step_inputs(batch: int) -> dict[str, torch.Tensor]:
    return {
        "frames": torch.zeros(batch, 3, 112, 112),  # (B, 3, 112, 112)
        "mel": torch.zeros(batch, 1, 101, 40),  # (B, 1, 101, 40)
        "z": torch.zeros(batch, 512),  # (B, 512)
        "clip": torch.zeros(batch, 3, 16, 112, 112),  # (B, 3, 16, 112, 112)
    }


@functools.lru_cache(maxsize=4)
def measured_gflops(preset: str = "paper") -> dict[str, float]:
    """GFLOPs per step of each model of a preset (batch 1; 2 x multiply-adds), counted on the meta device.

    Returns:
        ``image``, ``audio``, ``fusion``, ``students`` (image + audio + fusion: one indexed step) and
        ``teacher_clip`` (one 16-frame clip), in GFLOPs.

    Raises:
        ValueError: Unknown preset.
    """
    from indexing.models import build_students, build_teacher

    with torch.device("meta"):  # shapes only: FLOPs are counted without computing anything
        students = build_students(preset).eval()
        teacher = build_teacher(preset)
        x = _step_inputs(1)
        out = students_gflops(students)
    out["teacher_clip"] = count_gflops(lambda: teacher(x["clip"]))
    return out


def students_gflops(students: nn.Module) -> dict[str, float]:
    """GFLOPs per step of the given students (one batch-1 forward on their own device).

    Extraction records this for the students it actually ran, so costs reported by ``l2l evaluate``
    match the checkpoint (a tiny preset costs far less than the paper's).

    Returns:
        ``image``, ``audio``, ``fusion`` and ``students`` (their sum: one indexed step), in GFLOPs.
    """
    device = next(students.parameters()).device
    x = {k: v.to(device) for k, v in _step_inputs(1).items()}
    was_training = students.training
    students.eval()  # BatchNorm in eval: counting must not touch running statistics
    try:
        out = {
            "image": count_gflops(lambda: students.image(x["frames"])),
            "audio": count_gflops(lambda: students.audio(x["mel"])),
            "fusion": count_gflops(lambda: students.fusion(x["z"], x["z"])),
        }
    finally:
        students.train(was_training)
    out["students"] = out["image"] + out["audio"] + out["fusion"]
    return out

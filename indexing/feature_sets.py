"""Feature sets: named groups of per-row arrays a store can hold over the same rows, registered by name.

Every store holds the students' ``image``, ``audio`` and ``fused`` (one forward pass of the students
makes all three, and the skim stage reads them). More sets can be extracted with them
(``l2l extract --features image,audio,fused,teacher``) or added later to a finished store by the same
tasks (``l2l extract --add-features teacher STORE``):

- ``teacher``: the frozen teacher's pooled clip descriptor ``(512,)`` of each step's 16-frame clip
  (R(2+1)D-18, ``shared/design.md`` §2), the distillation target, in the store's feature dtype.
- ``inputs``: what the students read, so distillation and fine-tuning epochs decode no video:
  ``inputs_frame`` ``(112, 112, 3)`` uint8 (the frame at the step start, exactly as decoded) and
  ``inputs_logmel`` ``(1, 101, 40)`` float32 (the log-mel of the step's second of audio; float32 so a
  model trained from the store sees bitwise the input it would compute from the video).

Each array lives at ``features/<array>`` and has a fixed per-row shape and dtype (``"store"``: the
store's ``--dtype``). The store's attrs ``feature_sets`` record, per set, its arrays and the model that
made it with the sha256 of its weights. This module is light (no torch at import): stores import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from indexing.errors import ConfigError
from indexing.grid import EMBED_DIM

STUDENT_SETS = ("image", "audio", "fused")  # made together by the students; every store has them


@dataclass(frozen=True)
class FeatureSet:
    """One registered feature set.

    Attributes:
        name: The set's name (``--features`` / ``--add-features`` choice).
        arrays: ``{array: (row shape, dtype)}``; dtype ``"store"`` follows the store's feature dtype.
        model: Which model makes it: ``students``, ``teacher`` or ``none`` (decoded inputs).
        needs_clips: Whether it needs each step's 16-frame teacher clip decoded.
        description: One line for ``--help`` and ``store info``.
        compute: ``(model, frames, audio, clips) -> {array: (B, *shape) numpy}`` for sets not made by the
            students' shared forward pass (``None`` for ``image``/``audio``/``fused``).
    """

    name: str
    arrays: Mapping[str, tuple[tuple[int, ...], str]]
    model: str
    needs_clips: bool = False
    description: str = ""
    compute: Callable[..., dict[str, Any]] | None = field(default=None, compare=False)


_SETS: dict[str, FeatureSet] = {}


def register_feature_set(fs: FeatureSet) -> FeatureSet:
    """Make ``fs`` available by its name; its array names must not clash with another set's."""
    for other in _SETS.values():
        clash = set(other.arrays) & set(fs.arrays)
        if other.name != fs.name and clash:
            raise ConfigError(
                f"feature set {fs.name!r}: array(s) {sorted(clash)} already belong to {other.name!r}"
            )
    _SETS[fs.name] = fs
    return fs


def available_feature_sets() -> list[str]:
    """Names of the registered feature sets (the CLI's choices), in registration order."""
    return list(_SETS)


def get_feature_set(name: str) -> FeatureSet:
    """The set registered as ``name``; ``ConfigError`` listing the choices otherwise."""
    if name not in _SETS:
        raise ConfigError(f"Unknown feature set {name!r}; available: {', '.join(available_feature_sets())}")
    return _SETS[name]


def parse_feature_sets(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"image,audio,fused,teacher"`` (or a sequence) as known set names in registry order, no repeats.

    Raises:
        ConfigError: An unknown or empty name.
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    if not names or any(not n for n in names):
        raise ConfigError(
            f"feature sets {spec!r}: give comma-separated names from {', '.join(available_feature_sets())}"
        )
    for n in names:
        get_feature_set(n)
    return tuple(n for n in available_feature_sets() if n in names)


def set_arrays() -> dict[str, tuple[tuple[int, ...], str]]:
    """Every array of every registered set that is not a students' set: ``{array: (row shape, dtype)}``."""
    return {a: spec for fs in _SETS.values() if fs.model != "students" for a, spec in fs.arrays.items()}


def set_of_array(array: str) -> str | None:
    """The feature set an array belongs to, or ``None``."""
    return next((fs.name for fs in _SETS.values() if array in fs.arrays), None)


# ---- the registered sets ------------------------------------------------------------------------------


def _teacher_compute(teacher: Any, frames: Any, audio: Any, clips: Any) -> dict[str, Any]:
    import torch

    from indexing.frontend import clips_to_tensor

    dev = next(teacher.parameters()).device
    with torch.inference_mode():
        desc = teacher(clips_to_tensor(torch.as_tensor(clips).to(dev)))  # (B, 512)
    return {"teacher": desc.float().cpu().numpy()}


def _inputs_compute(_model: Any, frames: Any, audio: Any, clips: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    from indexing.frontend import log_mel

    with torch.inference_mode():
        mel = log_mel(torch.as_tensor(np.asarray(audio, np.float32)))  # (B, 1, 101, 40)
    return {"inputs_frame": np.asarray(frames, np.uint8), "inputs_logmel": mel.numpy()}


for _name, _what in zip(STUDENT_SETS, ("z_I", "z_A", "z_IA = Psi(z_I, z_A)"), strict=True):
    register_feature_set(
        FeatureSet(_name, {_name: ((EMBED_DIM,), "store")}, "students", description=f"students' {_what}")
    )
register_feature_set(
    FeatureSet(
        "teacher",
        {"teacher": ((EMBED_DIM,), "store")},
        "teacher",
        needs_clips=True,
        description="the teacher's pooled 512-d clip descriptor (distillation target)",
        compute=_teacher_compute,
    )
)
register_feature_set(
    FeatureSet(
        "inputs",
        {"inputs_frame": ((112, 112, 3), "uint8"), "inputs_logmel": ((1, 101, 40), "float32")},
        "none",
        description="the students' inputs: 112x112 uint8 frame and 1x101x40 float32 log-mel per step",
        compute=_inputs_compute,
    )
)

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
- torchvision image models by name (``resnet18``, ``resnet50``, ... :data:`IMAGE_MODELS`): the model's
  pooled descriptor (its classifier removed) of each step's 112x112 frame, ImageNet-normalised as the
  image student's input, from a local state dict given as ``--model-weights NAME=PATH`` (never
  downloaded; the weights' sha256 is recorded with the set). Stored in the store's feature dtype under
  ``features/<name>``.

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
        model: Which model makes it: ``students``, ``teacher``, ``torchvision`` (an image model named like
            the set, weights from ``--model-weights``) or ``none`` (decoded inputs).
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


# ---- torchvision image models ------------------------------------------------------------------------

# name -> (pooled descriptor size, module replaced by Identity to get it, key giving the class count)
IMAGE_MODELS: dict[str, tuple[int, str, str]] = {
    "resnet18": (512, "fc", "fc.weight"),
    "resnet34": (512, "fc", "fc.weight"),
    "resnet50": (2048, "fc", "fc.weight"),
    "resnet101": (2048, "fc", "fc.weight"),
    "efficientnet_b0": (1280, "classifier", "classifier.1.weight"),
    "mobilenet_v3_large": (960, "classifier", "classifier.3.weight"),
    "convnext_tiny": (768, "classifier.2", "classifier.2.weight"),
}


def _image_model_compute(model: Any, frames: Any, audio: Any, clips: Any) -> dict[str, Any]:
    import torch

    from indexing.frontend import frames_to_tensor

    dev = next(model.parameters()).device
    with torch.inference_mode():
        desc = model(frames_to_tensor(torch.as_tensor(frames)).to(dev))  # (B, D) pooled descriptor
    return {model.l2l_feature_set: desc.float().cpu().numpy()}


def load_image_model(name: str, weights: str, *, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """The torchvision image model of feature set ``name`` with its classifier removed (it returns the pooled
    descriptor), weights from a local state dict file; nothing is downloaded.

    Args:
        name: A key of :data:`IMAGE_MODELS` (``resnet50``).
        weights: A file holding the model's torchvision state dict (``torch.save(model.state_dict(), path)``;
            a ``{"state_dict": ...}`` wrapper is accepted); the class count is taken from the file.
        device: Where to put the model.

    Returns:
        ``(model, meta)``: the frozen model in eval mode and ``{"name", "path", "sha256", "dim"}``, ``sha256``
        of the weights' content (:func:`indexing.checkpoint.weights_sha256`).

    Raises:
        ConfigError: ``name`` is not a registered torchvision model.
        CheckpointError: A missing or unreadable file, or one that is not ``name``'s state dict.
    """
    import torch
    import torchvision

    from indexing import checkpoint as ckpt_io
    from indexing.errors import CheckpointError

    if name not in IMAGE_MODELS:
        raise ConfigError(f"Unknown torchvision image model {name!r}; available: {', '.join(IMAGE_MODELS)}")
    dim, head, classes_key = IMAGE_MODELS[name]
    state = ckpt_io.read_file(weights)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and "format" not in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not isinstance(state.get(classes_key), torch.Tensor):
        raise CheckpointError(
            f"{weights}: expected a torchvision {name} state dict (with {classes_key}), found "
            f"{ckpt_io.describe(state)}; save one with torch.save(model.state_dict(), path)"
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=int(state[classes_key].shape[0]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{weights} is not a torchvision {name} state dict ({first})") from None
    parent, _, leaf = head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, torch.nn.Identity())
    model.l2l_feature_set = name  # the array the compute function fills
    model.eval().requires_grad_(False).to(device)
    meta = {"name": name, "path": str(weights), "sha256": ckpt_io.weights_sha256(state), "dim": dim}
    return model, meta


for _name, (_dim, _, _) in IMAGE_MODELS.items():
    register_feature_set(
        FeatureSet(
            _name,
            {_name: ((_dim,), "store")},
            "torchvision",
            description=f"torchvision {_name}'s pooled {_dim}-d descriptor of the step's frame "
            f"(--model-weights {_name}=PATH)",
            compute=_image_model_compute,
        )
    )


def image_model_sets() -> list[str]:
    """The registered sets made by a torchvision image model (each needs ``--model-weights NAME=PATH``)."""
    return [fs.name for fs in _SETS.values() if fs.model == "torchvision"]

"""Self-describing checkpoints: plain containers of tensors, saved atomically, read with ``weights_only``.

An l2l checkpoint is a dict::

    {
        "format": "l2l-checkpoint", "version": 1,
        "kind": "students" | "teacher" | "skim" | ...,
        "models": {role: {"name": registered model name, "args": constructor kwargs}},
        "state_dict": {key: tensor},        # weights of every role, prefixed "<role>."
        "sha256": weights_sha256(state_dict),
        "epoch": completed epochs (0 when not trained here),
        "config": the training config as a dict (or {}),
        "training": optimiser / scheduler / RNG state and history, for resuming (or {}),
        "extra": anything else plain (class names, teacher sha256, parent checkpoint, ...),
    }

Only plain types (dict, list, tuple, str, int, float, bool, None, tensors) are stored, so files load
with ``torch.load(weights_only=True)``; a file that needs arbitrary unpickling is refused. Every kind
(students, teacher, skim) uses this one envelope, and :func:`load_checkpoint` verifies the weights'
sha256 on every load. Every problem is a :class:`~indexing.errors.CheckpointError` naming the file and
the fix.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from indexing.errors import CheckpointError

FORMAT_NAME = "l2l-checkpoint"
FORMAT_VERSION = 1
KINDS = ("students", "teacher", "skim")
MAKERS = {  # where a checkpoint of each kind comes from, for error messages
    "students": "`l2l distill` or `l2l finetune`",
    "teacher": "a torchvision r2plus1d_18 state dict given as --teacher-weights",
    "skim": "`l2l train`",
}


def sha256_file(path: str | Path, *, block_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of a state dict's content (keys, dtypes, shapes, bytes), independent of file layout.

    Two files holding the same weights hash the same, so a store can name the weights it was made with.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state dict entry {key!r} is {type(value).__name__}, not a tensor")
        t = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{t.dtype}|{tuple(value.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def read_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with clear errors.

    Raises:
        CheckpointError: No such file, not a torch file, or a file holding pickled Python objects
            (code that would run on loading: refused, never loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickle of plain containers at all
            reason = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise CheckpointError(f"{path} is not a readable torch checkpoint ({reason})") from None
        # weights_only met a global it will not construct. Deliberately no hint to turn the check off.
        raise CheckpointError(
            f"{path} holds pickled Python objects ({found.group(1)}): code that would run when the file is "
            "loaded. It was not loaded (l2l reads checkpoints with weights_only=True, which never runs "
            "code). Use a checkpoint written by `l2l distill`, `l2l finetune` or `l2l train`, or weights "
            "from a source you trust saved as a plain state dict (torch.save(model.state_dict(), path))"
        ) from None
    except Exception as exc:  # truncated or foreign file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {reason}") from None


def describe(obj: Any) -> str:
    """A short description of a loaded object for error messages ("an l2l 'skim' checkpoint", ...)."""
    if isinstance(obj, Mapping):
        if obj.get("format") == "l2l-skim":  # before the one envelope: no weights checksum to verify
            return "a skimming checkpoint of an older l2l (format 'l2l-skim', no weights checksum)"
        if obj.get("format") == FORMAT_NAME:
            return f"an l2l {obj.get('kind')!r} checkpoint"
        keys = list(obj)
        if keys and all(isinstance(obj[k], torch.Tensor) for k in keys):
            return f"a plain state dict with keys like {', '.join(map(str, keys[:3]))}"
        return f"a dict with keys {', '.join(map(str, keys[:6]))}"
    return f"a {type(obj).__name__}"


def save_checkpoint(
    path: str | Path,
    *,
    kind: str,
    models: Mapping[str, Mapping[str, Any]],
    state_dict: Mapping[str, torch.Tensor],
    epoch: int = 0,
    config: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file, then rename), so a killed run never leaves half a file.

    Args:
        path: Output file; its parent folder is created.
        kind: One of :data:`KINDS`.
        models: ``{role: {"name": ..., "args": {...}}}`` to rebuild each model.
        state_dict: All weights, keys prefixed by role (``image.conv1.weight``).
        epoch: Completed training epochs.
        config: Training config as a plain dict.
        training: Resume state (optimiser, scheduler, RNG, history) as plain containers.
        extra: Other plain metadata.

    Returns:
        The written path.

    Raises:
        CheckpointError: Unknown kind.
    """
    if kind not in KINDS:
        raise CheckpointError(f"Unknown checkpoint kind {kind!r}; available: {', '.join(KINDS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu() for k, v in state_dict.items()}
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "models": {role: {"name": m["name"], "args": dict(m["args"])} for role, m in models.items()},
        "state_dict": weights,
        "sha256": weights_sha256(weights),
        "epoch": int(epoch),
        "config": dict(config or {}),
        "training": dict(training or {}),
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, *, kind: str) -> dict[str, Any]:
    """Read an l2l checkpoint of the expected kind and verify its weights hash.

    Args:
        path: Checkpoint file.
        kind: The kind the caller needs (``students``, ``teacher``, ``skim``).

    Returns:
        The checkpoint dict (see the module docstring).

    Raises:
        CheckpointError: No such file, unreadable or unsafe file, not an l2l checkpoint, wrong kind, newer
            format version, or weights that do not match their recorded sha256 (corrupt file).
    """
    obj = read_file(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT_NAME:
        hint = ""
        if isinstance(obj, Mapping) and any(str(k).startswith("stem.") for k in obj):
            hint = " (it looks like r2plus1d teacher weights: pass it as --teacher-weights)"
        raise CheckpointError(
            f"{path}: expected an l2l {kind!r} checkpoint, found {describe(obj)}{hint}; "
            f"make one with {MAKERS.get(kind, 'l2l')}"
        )
    if obj.get("kind") != kind:
        raise CheckpointError(
            f"{path}: expected an l2l {kind!r} checkpoint, found kind {obj.get('kind')!r}; "
            f"make one with {MAKERS.get(kind, 'l2l')}"
        )
    if int(obj.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {obj['version']} is newer than this l2l "
            f"(reads up to {FORMAT_VERSION}); upgrade listen-to-look"
        )
    for key in ("models", "state_dict", "sha256"):
        if key not in obj:
            raise CheckpointError(f"{path}: l2l checkpoint lacks {key!r}; the file is damaged, re-create it")
    found = weights_sha256(obj["state_dict"])
    if found != obj["sha256"]:
        raise CheckpointError(
            f"{path}: weights sha256 {found[:12]} != recorded {obj['sha256'][:12]}; file is corrupt"
        )
    return dict(obj)


def split_state_dict(state_dict: Mapping[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
    """The sub-dict of one role, with the ``"<role>."`` prefix removed."""
    prefix = f"{role}."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_state_checked(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, where: str
) -> None:
    """``module.load_state_dict(strict=True)`` with a CheckpointError that lists what was expected and found.

    Args:
        module: Target module.
        state_dict: Weights for exactly this module.
        where: Names the source in messages, e.g. ``"students.pt (image: image_resnet18)"``.

    Raises:
        CheckpointError: Missing or unexpected keys, or shape mismatches.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k}: expected {tuple(own[k].shape)}, found {tuple(state_dict[k].shape)}"
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
        raise CheckpointError(f"{where}: weights do not fit the model: {'; '.join(parts)}")
    module.load_state_dict(state_dict, strict=True)

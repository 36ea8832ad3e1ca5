"""Skimming checkpoints: the project's one checkpoint envelope (:mod:`indexing.checkpoint`), kind ``skim``.

Written with :func:`indexing.checkpoint.save_checkpoint`, so the weights' sha256 is verified on every load
and nothing but plain containers of tensors is ever unpickled. The envelope's fields hold::

    models       {"skim": {"name": registered model (skim.model.available_models()),
                           "args": SkimConfig as a dict (rebuilds the model)}}
    state_dict   the model's weights, keys prefixed "skim."
    epoch        completed epochs
    config       TrainConfig as a dict
    training     {"history": one dict per epoch}; in the resumable file also "optimizer" (SGD state,
                 as large as the weights with momentum) and "rng" (RNG state)
    extra        labels (class names, index = class id), features ({"index", "recognition",
                 "recognition_store"}), store (summary of the training store), validated_on, init
                 (where Psi and the classifier started: "scratch" or the students checkpoint)

Training writes two files: ``OUT`` (e.g. ``skim.pt``), the compact model of the best epoch by validation
that ``query``, ``evaluate`` and ``show`` load (weights, model and training config, provenance and history;
no optimiser state; rewritten when an epoch beats the best, and at the end with how the run ended), and
``OUT.resume`` (:func:`resume_path`), the last epoch's envelope plus the optimiser and RNG state that
``l2l train --resume`` continues from, rewritten every epoch. Delete ``OUT.resume`` once training is over;
``OUT`` alone answers queries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexing import checkpoint as ckpt_io
from indexing.errors import CheckpointError
from indexing.stores import FeatureStore

from .model import SkimConfig, SkimModel

KIND = "skim"
ROLE = "skim"  # the envelope's role name of the skimming model
RESUME_SUFFIX = ".resume"  # OUT + this: the resumable checkpoint beside the compact model


@dataclass
class SkimCheckpoint:
    """A loaded checkpoint: the rebuilt model (eval mode) and its description."""

    model: SkimModel
    name: str
    labels: list[str]
    meta: dict[str, Any]

    @property
    def config(self) -> SkimConfig:
        return self.model.config


def json_safe(obj: Any) -> Any:
    """``obj`` round-tripped through JSON (numpy scalars and paths become plain values)."""
    return json.loads(json.dumps(obj, default=str))


def store_summary(store: FeatureStore) -> dict[str, Any]:
    """What a checkpoint records about the store it was trained on."""
    attrs = store.attrs
    return json_safe(
        {
            "path": str(getattr(store, "path", "")),
            "format": store.name,
            "rows": store.rows,
            "videos": len(store.index_columns()["video_id"]),
            "dim": store.dim,
            "step_s": attrs.get("step_s"),
            "models": attrs.get("models"),
            "gflops_per_step": attrs.get("gflops_per_step"),
        }
    )


def resume_path(path: str | Path) -> Path:
    """The resumable checkpoint (optimiser and RNG state included) kept beside the compact model ``path``."""
    path = Path(path)
    return path.with_name(path.name + RESUME_SUFFIX)


def save_checkpoint(
    path: str | Path,
    *,
    model_name: str,
    model: SkimModel,
    epoch: int,
    train_config: Mapping[str, Any],
    training: Mapping[str, Any],
    extra: Mapping[str, Any],
    compact: bool = True,
) -> Path:
    """Write a skimming checkpoint atomically in the project's envelope (see the module docstring).

    ``training`` beyond its ``history`` (the optimiser and RNG state) goes to :func:`resume_path` only,
    written first, so a run killed between the two writes resumes from the newer epoch; ``path`` gets
    the compact model unless ``compact`` is false (training writes the compact model only for the best
    epoch, :mod:`skim.train`). Returns ``path``.
    """
    common = {
        "kind": KIND,
        "models": {ROLE: {"name": model_name, "args": model.config.to_dict()}},
        "state_dict": {f"{ROLE}.{k}": v for k, v in model.state_dict().items()},
        "epoch": epoch,
        "config": json_safe(dict(train_config)),
        "extra": json_safe(dict(extra)),
    }
    kept = {"history": training["history"]} if "history" in training else {}
    if set(training) - {"history"}:
        ckpt_io.save_checkpoint(resume_path(path), training=training, **common)
    if compact:
        ckpt_io.save_checkpoint(path, training=kept, **common)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The verified envelope of a skimming checkpoint (``weights_only=True``, sha256 checked).

    Raises:
        CheckpointError: Missing, unsafe, damaged or not a skimming checkpoint.
    """
    ckpt = ckpt_io.load_checkpoint(path, kind=KIND)
    if ROLE not in ckpt["models"]:
        raise CheckpointError(
            f"{path}: skimming checkpoint lacks the {ROLE!r} model (found {', '.join(ckpt['models'])}); "
            "the file is damaged, retrain it with `l2l train`"
        )
    return ckpt


def read_resumable(path: str | Path) -> dict[str, Any]:
    """The verified envelope ``l2l train --resume`` continues from: :func:`resume_path` of ``path``, or
    ``path`` itself when it still holds the optimiser state (a checkpoint written before the split).

    Raises:
        CheckpointError: Neither file holds resumable state (only the compact model is left).
    """
    full = resume_path(path)
    if full.exists():
        return read_checkpoint(full)
    ckpt = read_checkpoint(path)
    if "optimizer" not in ckpt["training"]:
        raise CheckpointError(
            f"{path} is the compact final model (no optimiser state) and its resumable checkpoint {full} "
            "is missing; train again with --overwrite, or keep OUT.resume next time to --resume"
        )
    return ckpt


def flat_meta(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """What callers read about a checkpoint, as one flat dict: ``model``, ``config`` (SkimConfig dict),
    ``train_config``, ``labels``, ``features``, ``store``, ``validated_on``, ``init``, ``epoch``,
    ``history``."""
    spec = ckpt["models"][ROLE]
    return {
        **ckpt["extra"],
        "model": spec["name"],
        "config": dict(spec["args"]),
        "train_config": dict(ckpt["config"]),
        "epoch": int(ckpt["epoch"]),
        "history": list(ckpt["training"].get("history", [])),
    }


def load_checkpoint(path: str | Path, *, device: str = "cpu", **inference: Any) -> SkimCheckpoint:
    """Rebuild the model of a checkpoint in eval mode.

    Args:
        path: Checkpoint file.
        device: Where to put the model.
        **inference: Inference-only overrides (``next_input``, ``stop_after``, ``exit_threshold``,
            ``exit_on``, ``subsample``); ``None`` keeps the trained setting.

    Raises:
        CheckpointError: Not a verified skimming checkpoint, or weights that do not fit its model.
        ValueError: An override that would change the parameters.
    """
    ckpt = read_checkpoint(path)
    meta = flat_meta(ckpt)
    config = SkimConfig.from_dict(meta["config"]).with_inference(**inference)
    model = SkimModel(config)
    weights = ckpt_io.split_state_dict(ckpt["state_dict"], ROLE)
    ckpt_io.load_state_checked(model, weights, where=f"{path} ({meta['model']})")
    model.to(device).eval()
    return SkimCheckpoint(model=model, name=str(meta["model"]), labels=list(meta["labels"]), meta=meta)

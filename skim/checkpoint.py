"""Self-describing skimming checkpoints, readable with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict::

    format, version          "l2l-skim", 1
    model                    registered model name (skim.model.available_models())
    config                   SkimConfig as a dict (rebuilds the model)
    train_config             TrainConfig as a dict
    labels                   class names, index = class id
    features                 {"index": [...], "recognition": [...], "recognition_store": path or None}
    store                    summary of the training store (path, format, rows, videos, step_s, dim, models)
    epoch                    completed epochs
    history                  one dict per epoch (loss, accuracies, lr, videos/s)
    state_dict, optimizer    weights and SGD state (resuming continues exactly)

Only tensors, str, int, float, bool, None, lists and dicts, so no pickled code is ever executed on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from indexing.checkpoint import read_file
from indexing.stores import FeatureStore

from .model import SkimConfig, SkimModel

CHECKPOINT_FORMAT = "l2l-skim"
CHECKPOINT_VERSION = 1


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


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` atomically (temp file, then rename), so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (``weights_only=True``); ``ValueError`` if it is not a skimming checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint; train one with `l2l train`")
    ckpt = read_file(path)  # weights_only=True; pickled code is refused with a ValueError naming it
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a skimming checkpoint ({CHECKPOINT_FORMAT!r}); train one with `l2l train`"
        )
    if int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt['version']} is newer than this l2l; upgrade it")
    return ckpt


def load_checkpoint(path: str | Path, *, device: str = "cpu", **inference: Any) -> SkimCheckpoint:
    """Rebuild the model of a checkpoint in eval mode.

    Args:
        path: Checkpoint file.
        device: Where to put the model.
        **inference: Inference-only overrides (``next_input``, ``stop_after``, ``exit_threshold``,
            ``exit_on``, ``subsample``); ``None`` keeps the trained setting.

    Raises:
        ValueError: Not a skimming checkpoint, or an override that would change the parameters.
    """
    ckpt = read_checkpoint(path)
    config = SkimConfig.from_dict(ckpt["config"]).with_inference(**inference)
    model = SkimModel(config)
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer")}
    return SkimCheckpoint(model=model, name=str(ckpt["model"]), labels=list(ckpt["labels"]), meta=meta)

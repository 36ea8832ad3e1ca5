"""Asking a trained model about videos: top labels and the moments it looked at.

:func:`query` answers for several videos (or all ``ok`` ones) in length-sorted batches;
:func:`explain` adds what a figure needs for one video (the attention timeline and as many uniformly
spaced steps as the model chose). Neither needs labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from indexing.errors import CheckpointError, ConfigError

from .checkpoint import load_checkpoint
from .data import SkimDataset, step_seconds
from .infer import distinct_steps, iter_outputs, moments_of, open_stores, top_labels, uniform_positions
from .train import resolve_device


def query(
    store_path: str | Path,
    model_path: str | Path,
    video_ids: Sequence[str] | None = None,
    *,
    top_k: int = 5,
    batch_size: int = 64,
    device: str = "cpu",
    recognition_store: str | Path | None = None,
    inference: Mapping[str, Any] | None = None,
    progress: bool = False,
    details: bool = False,
    allow_other_students: bool = False,
) -> list[dict[str, Any]]:
    """Top-k labels and chosen moments of videos.

    Args:
        store_path: Feature store.
        model_path: Skimming checkpoint.
        video_ids: Videos to answer for, in this order; None answers for every ``ok`` video of the store.
        top_k: Labels per video.
        batch_size: Videos per model batch.
        device: ``cpu``, ``cuda`` or ``auto``.
        recognition_store: Second store for models that need one (default: the checkpoint's).
        inference: Inference-only overrides (``next_input``, ``stop_after``, ``exit_threshold``, ...).
        progress: Show a progress bar.
        details: Also return ``attention`` (``(N,)`` list: the largest attention weight each step got at
            any pick), ``label`` (the store's label of the video, None when unknown), ``steps``,
            ``steps_used``, ``path`` and ``step_s`` per video (used by :func:`explain`).
        allow_other_students: Answer on a store made by other students than the model's training store.

    Returns:
        ``[{"video_id", "top": [{"label", "prob"}], "moments": [...]}]`` in the order of ``video_ids``
        (store order for all). The first of the model's T recurrent steps takes the mean of all steps, each
        later one picks one step per indexing modality; ``moments`` lists every picked step once, in time
        order, as
        ``{"step", "start_s", "end_s", "weight", "modalities", "selection"}`` (see
        :func:`skim.infer.moments_of`).

    Raises:
        ConfigError: An unknown or not-``ok`` video id, ``top_k < 1``, or a missing recognition store.
        CheckpointError: The model does not fit the store's features, or they come from other students.
    """
    if top_k < 1:
        raise ConfigError(f"top_k={top_k} must be >= 1")
    dev = resolve_device(device)
    ckpt = load_checkpoint(model_path, device=str(dev), **dict(inference or {}))
    store, rec_store = open_stores(
        store_path, ckpt, recognition_store, allow_other_students=allow_other_students
    )
    if store.dim != ckpt.config.dim:
        raise CheckpointError(f"store features are {store.dim}-d but the model expects {ckpt.config.dim}-d")
    step_s = step_seconds(store)
    dataset = SkimDataset(
        store,
        ckpt.config.batch_keys,
        video_ids=list(video_ids) if video_ids is not None else None,
        recognition_store=rec_store,
        require_label=False,
    )
    paths = {e.video_id: e.path for e in dataset.entries}
    cols = store.index_columns()
    known = dict(zip(cols["video_id"].tolist(), cols["label"].tolist(), strict=True))  # the store's labels
    answers: dict[str, dict[str, Any]] = {}
    for batch, out in iter_outputs(
        ckpt.model, dataset, batch_size=batch_size, device=dev, progress=progress, desc="query"
    ):
        probs = out.logits.softmax(1).cpu().numpy()  # (B, C)
        chosen = out.chosen.cpu().numpy()  # (B, S, K)
        weights = out.chosen_weight.cpu().numpy()  # (B, S, K)
        picks = out.attention  # (B, S, N) soft attention of each pick
        # (B, N) the largest weight each step got at any pick: a chosen step is the top of its pick
        attention = (picks.amax(1) if picks.shape[1] else picks.sum(1)).cpu().numpy()
        time_s = batch["time_s"].numpy()  # (B, N)
        mask = batch["mask"].cpu().numpy()
        for i, vid in enumerate(batch["video_ids"]):
            answer: dict[str, Any] = {
                "video_id": vid,
                "top": top_labels(probs[i], ckpt.labels, top_k),
                "moments": moments_of(chosen[i], weights[i], time_s[i], step_s, ckpt.config.index_features),
            }
            if details:
                n = int(mask[i].sum())
                answer.update(
                    {
                        "attention": attention[i, :n].tolist(),
                        "label": str(known.get(vid) or "") or None,
                        "steps": n,
                        "steps_used": int(out.steps_used[i]),
                        "chosen_steps": distinct_steps(chosen[i]),
                        "path": paths[vid],
                        "step_s": step_s,
                    }
                )
            answers[vid] = answer
    return [answers[e.video_id] for e in dataset.entries]


def explain(
    store_path: str | Path, model_path: str | Path, video_id: str, *, max_frames: int = 12, **kwargs: Any
) -> dict[str, Any]:
    """:func:`query` for one video with ``details``, plus what a side-by-side figure shows: ``shown_steps``,
    the first ``max_frames`` distinct chosen steps, and ``uniform_steps``, as many evenly spaced steps."""
    if max_frames < 1:
        raise ConfigError(f"max_frames={max_frames} must be >= 1")
    answer = query(store_path, model_path, [video_id], details=True, **kwargs)[0]
    answer["shown_steps"] = sorted(answer["chosen_steps"][:max_frames])  # the first picks, in time order
    k = max(len(answer["shown_steps"]), 1)
    answer["uniform_steps"] = uniform_positions(answer["steps"], k).tolist()
    answer["attention"] = np.asarray(answer["attention"], dtype=np.float64)
    return answer

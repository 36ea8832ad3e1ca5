"""Running a trained model over a dataset in length-sorted batches (shared by evaluate, query and show)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexing.errors import CheckpointError, ConfigError
from indexing.stores import FeatureStore, open_store

from .checkpoint import SkimCheckpoint
from .data import SkimDataset, eval_sampler, make_loader, to_device
from .model import SkimModel, SkimOutput


@torch.no_grad()
def iter_outputs(
    model: SkimModel | None,
    dataset: SkimDataset,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "skim",
    precision: str = "fp32",
) -> Iterator[tuple[dict[str, Any], SkimOutput | None]]:
    """Yield ``(batch, output)`` over every video of ``dataset`` in eval mode (output None without a model).

    Batches group videos of similar length (:func:`skim.data.eval_sampler`); ``batch`` is
    :func:`skim.data.collate`'s dict on ``device``. ``precision`` is the recurrent loop's
    (:meth:`skim.model.SkimModel.set_precision`: ``fp32``, ``bf16`` or ``auto``).
    """
    from tqdm.auto import tqdm

    from .train import limit_heap_growth

    limit_heap_growth()  # batch-sized tensors freed back to the system: RSS bounded by the batch
    if model is not None:
        model.eval()
        model.set_precision(precision)
    loader = make_loader(dataset, eval_sampler(dataset, batch_size=batch_size))
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        batch = to_device(batch, device)
        yield batch, (model(batch["features"], batch["mask"]) if model is not None else None)


def open_stores(
    store_path: str | Path,
    ckpt: SkimCheckpoint,
    recognition_store: str | Path | None,
    *,
    allow_other_students: bool = False,
) -> tuple[FeatureStore, FeatureStore | None]:
    """The indexing store and, for models that need one, the recognition store (default: the checkpoint's).

    Features from other students live in another space: a model trained on one store's features answers
    confidently, and wrongly, on another's. The checkpoint records the sha256 of the students that made its
    training store; a store (indexing or recognition) made by other students is refused.

    Args:
        store_path: The indexing store.
        ckpt: The loaded skimming checkpoint.
        recognition_store: Second store for models that need one (default: the one the checkpoint records).
        allow_other_students: Use stores made by other students anyway.

    Raises:
        ConfigError: The model needs a recognition store and none is given or recorded.
        CheckpointError: A store's students differ from the checkpoint's (unless allowed).
    """
    store = open_store(store_path)
    if not allow_other_students:
        _check_students(store, ckpt, "store")
    if not ckpt.config.recognition_store:
        return store, None
    path = recognition_store or ckpt.meta.get("features", {}).get("recognition_store")
    if not path:
        raise ConfigError(
            "this model reads recognition features from a second store; pass --recognition-store"
        )
    return store, open_store(path)


def _students_sha(models: Any) -> str | None:
    students = models.get("students") if isinstance(models, Mapping) else None
    return students.get("sha256") if isinstance(students, Mapping) else None


def _check_students(store: FeatureStore, ckpt: SkimCheckpoint, role: str) -> None:
    trained_on = ckpt.meta.get("store") or {}
    want = _students_sha(trained_on.get("models"))
    have = _students_sha(store.attrs.get("models"))
    if want and have and want != have:
        where = getattr(store, "path", "")
        raise CheckpointError(
            f"{role} {where} holds features of students {have[:12]}, but the model was trained on features "
            f"of students {want[:12]} (store {trained_on.get('path', '?')}): its answers there would be "
            "meaningless. Extract this corpus with the same students, or pass --allow-other-students"
        )


def moments_of(
    chosen: np.ndarray,
    weights: np.ndarray,
    time_s: np.ndarray,
    step_s: float,
    modalities: Sequence[str],
) -> list[dict[str, Any]]:
    """The moments one video's queries chose, one per distinct step, in time order.

    Each of the ``S`` recurrent steps picks one step per query (``K`` indexing modalities); a step picked
    by several queries or at several recurrent steps is one moment that lists them.

    Args:
        chosen: ``(S, K)`` chosen step per selection and query, -1 for none.
        weights: ``(S, K)`` attention weight ``beta * alpha`` of each choice.
        time_s: ``(N,)`` step start times.
        step_s: Step length in seconds.
        modalities: ``K`` names of the queries' indexing features (``SkimConfig.index_features``).

    Returns:
        ``[{"step", "start_s", "end_s", "weight", "modalities", "selection"}]`` sorted by ``step``:
        ``weight`` sums the choices' weights, ``modalities`` names the queries that chose the step (in
        query order), ``selection`` is the first recurrent step (0-based) that chose it.
    """
    found: dict[int, dict[str, Any]] = {}
    for s in range(chosen.shape[0]):
        for k, (j, w) in enumerate(zip(chosen[s].tolist(), weights[s].tolist(), strict=True)):
            if j < 0:
                continue
            start = float(time_s[j])
            m = found.setdefault(
                j,
                {"step": int(j), "start_s": start, "end_s": start + step_s, "weight": 0.0, "modalities": [],
                 "selection": s},
            )  # fmt: skip
            m["weight"] += float(w)
            if modalities[k] not in m["modalities"]:
                m["modalities"].append(modalities[k])
    for m in found.values():
        m["modalities"].sort(key=list(modalities).index)
    return [found[j] for j in sorted(found)]


def uniform_positions(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` evenly spaced positions in ``[0, n)``, the centres of ``k`` equal bins (int64)."""
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return np.floor((np.arange(k) + 0.5) * n / k).astype(np.int64)


def distinct_steps(chosen: np.ndarray) -> list[int]:
    """Distinct chosen steps of one video (``(S, K)``, -1 for none) in the order they were first chosen."""
    return list(dict.fromkeys(int(j) for j in chosen.reshape(-1).tolist() if j >= 0))


def top_labels(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict[str, float | str]]:
    """The ``k`` most probable labels of one video, ``[{"label", "prob"}]`` in decreasing probability."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i], "prob": float(probs[i])} for i in order]

"""Asking a trained model about videos: top labels and the moments it looked at.

:func:`query` answers for several videos (or all ``ok`` ones) in length-sorted batches;
:func:`explain` adds what a figure needs for one video (the attention timeline and as many uniformly
spaced steps as the model chose). Neither needs labels.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from indexing.errors import CheckpointError, ConfigError

from .checkpoint import load_checkpoint
from .data import SkimDataset, step_seconds
from .infer import distinct_steps, iter_outputs, moments_of, open_stores, top_labels, uniform_positions
from .model import resolve_precision
from .train import resolve_device


def iter_query(
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
    skip: Collection[str] = (),
    precision: str = "fp32",
) -> Iterator[dict[str, Any]]:
    """Top-k labels and chosen moments of videos, yielded as each batch is answered (see :func:`query`).

    Memory is bounded by the batch, not by the number of videos: nothing is kept once yielded, so a
    10^6-video store can be answered into a JSON Lines file (``l2l query --all --out``). Answers come in
    batch order (videos of similar length, in windows of the store's order), not in store order.

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
        skip: Video ids not to answer (already answered: ``l2l query --all --out FILE --resume``).
        precision: ``fp32`` (default), or ``bf16`` / ``auto`` for the key projection and the recurrent loop's
            products on a CPU with native bf16 (:meth:`skim.model.SkimModel.set_precision`): about 2x faster
            for one 500-step video, same top label and accuracy as fp32 on the demo and bench models, but
            near-tied picks differ (same picks on 73 of the demo model's 96 videos, 92 of 150 of the
            untrained bench model's), hence opt-in.

    Yields:
        ``{"video_id", "top": [{"label", "prob"}], "moments": [...]}`` per video. The first of the model's
        T recurrent steps takes the mean of all steps, each later one picks one step per indexing modality;
        ``moments`` lists every picked step once, in time order, as
        ``{"step", "start_s", "end_s", "weight", "modalities", "selection"}`` (see
        :func:`skim.infer.moments_of`).

    Raises:
        ConfigError: An unknown or not-``ok`` video id, ``top_k < 1``, or a missing recognition store.
        CheckpointError: The model does not fit the store's features, or they come from other students.
    """
    if top_k < 1:
        raise ConfigError(f"top_k={top_k} must be >= 1")
    dev = resolve_device(device)
    resolve_precision(precision, dev)  # refuse a bad or unsupported precision before any work
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
    if skip:
        skip = set(skip)
        dataset.entries = [e for e in dataset.entries if e.video_id not in skip]
        if not dataset.entries:
            return
    paths: dict[str, str] = {}
    known: dict[str, Any] = {}
    if details:  # per-video lookups only where answers carry them (explain: a few videos)
        paths = {e.video_id: e.path for e in dataset.entries}
        cols = store.index_columns()  # the store's labels
        known = dict(zip(cols["video_id"].tolist(), cols["label"].tolist(), strict=True))
    for batch, out in iter_outputs(
        ckpt.model, dataset, batch_size=batch_size, device=dev, progress=progress, desc="query",
        precision=precision,
    ):  # fmt: skip
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
            yield answer


def query(
    store_path: str | Path,
    model_path: str | Path,
    video_ids: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Top-k labels and chosen moments of videos (all answers in memory; :func:`iter_query` streams them).

    Args:
        store_path: Feature store.
        model_path: Skimming checkpoint.
        video_ids: Videos to answer for, in this order; None answers for every ``ok`` video of the store.
        **kwargs: As :func:`iter_query` (``top_k``, ``batch_size``, ``device``, ``recognition_store``,
            ``inference``, ``progress``, ``details``, ``allow_other_students``).

    Returns:
        :func:`iter_query`'s answers in the order of ``video_ids`` (store order for all).
    """
    answers = {a["video_id"]: a for a in iter_query(store_path, model_path, video_ids, **kwargs)}
    if video_ids is not None:
        return [answers[v] for v in video_ids]
    return sorted(answers.values(), key=_store_order(store_path, answers))


def answered_ids(path: str | Path) -> set[str]:
    """Video ids already answered in a JSON Lines file of :func:`write_jsonl` (empty when it does not exist).

    A last line cut short by a killed run is dropped from the file, so a resumed run appends whole lines.
    The file is read a line at a time: memory holds the ids, not the answers.

    Raises:
        ConfigError: A complete line is not an answer (another file given by mistake).
    """
    import json

    path = Path(path)
    if not path.exists():
        return set()
    _drop_cut_line(path)  # the partial answer of a killed run; it is asked again
    ids = set()
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            try:
                ids.add(json.loads(line)["video_id"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{path} line {n} is not a query answer ({exc}); give a file written by "
                    "`l2l query --out` or another path"
                ) from None
    return ids


def _drop_cut_line(path: Path, *, block: int = 1 << 16) -> None:
    """Truncate ``path`` after its last newline, reading its tail ``block`` bytes at a time."""
    with path.open("r+b") as f:
        end = pos = f.seek(0, 2)
        keep = 0
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            pos = start
        if keep < end:
            f.truncate(keep)


def write_jsonl(
    store_path: str | Path,
    model_path: str | Path,
    out: str | Path,
    video_ids: Sequence[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Answer videos (all ``ok`` ones by default) into ``out``, one JSON answer per line, as they come.

    Memory stays bounded by the batch (answers are written and flushed per batch, never collected); with
    ``resume`` the videos already in ``out`` are skipped and new answers appended, so a killed run goes on
    where it stopped.

    Args:
        store_path: Feature store.
        model_path: Skimming checkpoint.
        out: The JSON Lines file.
        video_ids: Videos to answer (None: every ``ok`` video).
        resume: Keep ``out`` and skip the videos it already answers.
        overwrite: Replace an existing ``out``.
        **kwargs: As :func:`iter_query`.

    Returns:
        ``{"out", "written", "skipped"}``.

    Raises:
        ConfigError: ``out`` exists without ``resume`` or ``overwrite`` (or with both), or a line of it is
            not an answer.
    """
    import json

    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume keeps the --out file and --overwrite replaces it; give one of them")
    if out.exists() and not (resume or overwrite):
        raise ConfigError(f"{out} already exists; pass --resume to go on with it or --overwrite to replace")
    if overwrite:
        out.unlink(missing_ok=True)
    done = answered_ids(out) if resume else set()
    written = 0
    with out.open("a", encoding="utf-8") as f:
        for answer in iter_query(store_path, model_path, video_ids, skip=done, **kwargs):
            f.write(json.dumps(answer) + "\n")
            written += 1
            if written % 64 == 0:
                f.flush()
    return {"out": str(out), "written": written, "skipped": len(done)}


def _store_order(store_path: str | Path, answers: Mapping[str, Any]) -> Any:
    from indexing.stores import open_store

    with open_store(store_path) as store:
        ids = store.index_columns()["video_id"].tolist()
    position = {v: i for i, v in enumerate(ids) if v in answers}
    return lambda a: position[a["video_id"]]


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

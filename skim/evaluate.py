"""Evaluating a skimming checkpoint against uniform, random and dense baselines on the same stored features.

All methods classify the model's *recognition features* (by default the image and audio features,
concatenated per step). On the evaluation split each method reports accuracy, mAP (macro average
precision over the classes present, computed in numpy), GFLOPs per video, steps used and evidence
precision.

Baselines, trained here on the train split of the same store(s):

- ``uniform``: the mean of the recognition features of ``T`` evenly spaced valid steps (the centres of
  ``T`` equal bins; all steps for videos shorter than ``T``); ``T`` is the model's step budget.
- ``random``: the mean over ``T`` distinct valid steps drawn at random; training uses ``random_draws``
  independent draws per video, evaluation one seeded draw.
- ``dense``: the mean over all valid steps.

Each baseline trains a head shaped like skim's recognition path, on its own pooled features: ``Psi``
(Linear ``R*D -> hidden``, ReLU, Linear ``hidden -> embed``, the model's sizes: 1024 and 512 by default) then
Linear ``embed -> C``; AdamW, lr ``baseline_lr``, weight decay 1e-4, ``baseline_steps`` optimiser steps on
shuffled batches of ``baseline_batch_size``, seeded. Steps, not epochs: on a corpus of a few hundred videos an
epoch is one batch, and a head trained for 30 epochs would be a strawman (measured: uniform 0.27 after 30
steps vs 0.42 after 300 on the same features).

GFLOPs per video (FLOPs = 2 x multiply-adds; per-step costs of the image/audio students, Ψ and the teacher
clip from the store attrs ``gflops_per_step``, else :func:`indexing.flops.measured_gflops` of the store's
preset, else the paper preset's measured constants; the result says which):

- skim: ``ceil(N / k)`` x (indexing features' cost) + ``n_rec`` x (cost of recognition features that
  indexing did not already compute) + the skimming network itself (:meth:`SkimModel.gflops`), where
  ``n_rec = N`` with soft next input (the mixture reads every step) and the distinct consumed steps with
  hard input;
- uniform / random: ``T`` x (recognition features' cost) + head; dense: ``N`` x (recognition features'
  cost) + head. ``costs.dense_teacher_gflops_per_video`` adds the paper's dense reference: ``N`` x teacher
  clip.

``steps_used`` counts recurrent steps for skim (each looks at the video once through its attention;
fewer than ``T`` after an early exit), ``T`` for uniform and random and ``N`` for dense. Evidence
precision is the fraction of looked-at steps whose midpoint lies inside a ground-truth segment of
``moments.json``, over the videos it covers (skim: the distinct chosen steps; dense: every step, i.e. the
chance level); ``null`` without moments.

Memory is bounded by the batch, not the corpus: besides a batch of videos, evaluation keeps per video its id,
a few integers and ``(C,)`` float32 probabilities of the model and of the one baseline being scored (mAP ranks
every video per class). The baselines' pooled features (``4 * R * D`` bytes per video and pooled set:
``len(curve_steps) + 2`` sets on the evaluated split, ``len(curve_steps) + 1 + random_draws`` on the training
split; ~40 KB per video at the paper's sizes) go to temporary files under ``$TMPDIR`` (or
``EvalConfig.scratch_dir``; free space is checked first, the files are removed at the end) and the heads read
them a batch at a time, with the same numbers as from memory. Where ``/tmp`` is a RAM disk (tmpfs), point
``TMPDIR`` at a real disk; the heads read rows at random, so a local SSD serves them best.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from indexing.corpus import default_moments_path, read_labels, read_segments
from indexing.errors import CheckpointError, ConfigError

from .checkpoint import SkimCheckpoint, load_checkpoint
from .data import SkimDataset, check_label_coverage, step_seconds
from .infer import distinct_steps, iter_outputs, open_stores, uniform_positions
from .model import RECOGNITION_PREFIX, SkimModel, fusion_mlp
from .train import resolve_device

METHODS = ("skim", "uniform", "random", "dense")
MIN_EVAL_VIDEOS = 30  # fewer test videos than this and evaluate warns that its numbers mean little
FEATURE_COMPONENTS = {
    "image": ("image",),
    "audio": ("audio",),
    "fused": ("image", "audio", "fusion"),
    "teacher": ("teacher_clip",),  # the store's teacher set: one R(2+1)D-18 clip per step read
}
# indexing.flops.measured_gflops("paper") on torch 2.11 (2 x multiply-adds per step), so evaluating never
# has to build the networks just to count them.
PAPER_GFLOPS = {"image": 0.969695232, "audio": 1.22375168, "fusion": 0.003145728, "teacher_clip": 81.03775232}
PREDICT_ROWS = 4096  # rows per baseline head call when predicting: bounded memory, one call on small splits


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``evaluate``.

    Attributes:
        split: Split evaluated.
        train_split: Split the baselines train on.
        batch_size: Videos per evaluation batch.
        baseline_steps: Optimiser steps of each baseline head (whatever the corpus size).
        baseline_lr: AdamW learning rate of the baseline heads.
        baseline_batch_size: Batch size of the baseline heads.
        random_draws: Random step draws per training video for the ``random`` baseline.
        curve_steps: Step budgets of the accuracy-vs-steps curve (capped at the model's ``T``); empty skips.
        subsample_factors: Indexing sub-sampling factors of the second curve; empty skips it.
        seed: Seed of the baselines' draws and heads.
        device: ``cpu``, ``cuda`` or ``auto``.
        scratch_dir: Directory for the temporary files of the baselines' pooled features (removed at the
            end; about ``4 * R * D * (len(curve_steps) + 2 + random_draws)`` bytes per video); None: the
            system's temporary directory (``$TMPDIR``).
    """

    split: str = "test"
    train_split: str = "train"
    batch_size: int = 64
    baseline_steps: int = 400
    baseline_lr: float = 1e-3
    baseline_batch_size: int = 256
    random_draws: int = 3
    curve_steps: tuple[int, ...] = (1, 2, 4, 6, 8, 10)
    subsample_factors: tuple[int, ...] = (1, 2, 4, 8)
    seed: int = 0
    device: str = "cpu"
    scratch_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "curve_steps", tuple(int(k) for k in self.curve_steps))
        object.__setattr__(self, "subsample_factors", tuple(int(k) for k in self.subsample_factors))
        if min(self.batch_size, self.baseline_steps, self.baseline_batch_size, self.random_draws) < 1:
            raise ConfigError("batch_size, baseline_steps, baseline_batch_size and random_draws must be >= 1")
        if not self.baseline_lr > 0:
            raise ConfigError(f"baseline_lr={self.baseline_lr} must be positive")
        if any(k < 1 for k in self.curve_steps + self.subsample_factors):
            raise ConfigError(
                f"curve_steps {list(self.curve_steps)} and subsample_factors {list(self.subsample_factors)} "
                "must be >= 1"
            )


# ---- metrics ---------------------------------------------------------------------------------------------


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``(V, C)`` scores against ``(V,)`` labels."""
    return float((probs.argmax(1) == labels).mean()) if len(labels) else float("nan")


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Macro average precision over the classes with at least one positive among ``labels``.

    AP of a class = mean over its positives of the precision at their rank when videos are sorted by
    that class's score (ties in input order).
    """
    aps = []
    ranks = np.arange(1, len(labels) + 1)
    for c in range(scores.shape[1]):
        positive = labels == c
        if not positive.any():
            continue
        hits = positive[np.argsort(-scores[:, c], kind="stable")]
        aps.append(float((np.cumsum(hits) / ranks)[hits].mean()))
    return float(np.mean(aps)) if aps else float("nan")


# ---- costs -----------------------------------------------------------------------------------------------


def step_costs(attrs: Mapping[str, Any]) -> tuple[dict[str, float], str]:
    """GFLOPs per step of ``image``, ``audio``, ``fusion`` and ``teacher_clip`` for a store, and the source.

    Order: ``attrs["gflops_per_step"]``; else ``measured_gflops(preset)`` for a non-paper preset found under
    ``attrs["models"]``; else :data:`PAPER_GFLOPS`.
    """
    given = attrs.get("gflops_per_step")
    if isinstance(given, Mapping) and all(k in given for k in ("image", "audio")):
        return {**PAPER_GFLOPS, **{k: float(v) for k, v in given.items()}}, "store attrs gflops_per_step"
    preset = _find_preset(attrs.get("models"))
    if preset and preset != "paper":
        from indexing.flops import measured_gflops

        return dict(measured_gflops(preset)), f"indexing.flops.measured_gflops({preset!r})"
    return dict(PAPER_GFLOPS), "paper preset (indexing.flops constants)"


def _find_preset(obj: Any) -> str | None:
    if isinstance(obj, Mapping):
        if isinstance(obj.get("preset"), str):
            return obj["preset"]
        for v in obj.values():
            found = _find_preset(v)
            if found:
                return found
    return None


def components(keys: Sequence[str]) -> set[str]:
    """Networks that must run per step to produce feature ``keys`` (``rec:`` ones on the second store)."""
    out = set()
    for key in keys:
        prefix = RECOGNITION_PREFIX if key.startswith(RECOGNITION_PREFIX) else ""
        out |= {prefix + c for c in FEATURE_COMPONENTS[key[len(prefix) :]]}
    return out


def _cost(parts: set[str], costs: Mapping[str, float]) -> float:
    return float(sum(costs[p] for p in parts))


def head_gflops(in_dim: int, hidden: int, embed: int, num_classes: int) -> float:
    """GFLOPs of one baseline head call (Psi + classifier)."""
    return 2 * (in_dim * hidden + hidden * embed + embed * num_classes) / 1e9


# ---- pooled features on disk -----------------------------------------------------------------------------


class Rows(Protocol):
    """``(len, width)`` float32 rows read by index (:class:`RowFile`, :class:`ArrayRows`, ...)."""

    width: int

    def __len__(self) -> int: ...

    def take(self, idx: np.ndarray) -> np.ndarray: ...


class RowFile:
    """Float32 rows of one width, appended to a file and read back by index: never all in memory.

    A read maps the file for that call only (``np.memmap``, unmapped on return), so the pages it touches
    leave the process's resident set with it: the page cache keeps them while there is room, else the disk.

    Raises:
        ConfigError: The disk is full (from :meth:`append` or :meth:`finish`).
    """

    def __init__(self, path: str | Path, width: int) -> None:
        self.path, self.width, self.rows = Path(path), int(width), 0
        self._file: Any = self.path.open("wb")

    def __len__(self) -> int:
        return self.rows

    def append(self, rows: np.ndarray) -> None:
        """Append ``(n, width)`` rows (written as float32)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)  # (n, F)
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows of shape {rows.shape} do not fit {self.path} (width {self.width})")
        try:
            self._file.write(memoryview(rows).cast("B"))
        except OSError as exc:
            raise _no_space(self.path, exc) from exc
        self.rows += len(rows)

    def finish(self) -> None:
        """Flush and close the writer (reads do it first; appending after it is an error)."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:
                raise _no_space(self.path, exc) from exc

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` in that order, ``(len(idx), width)`` float32."""
        self.finish()
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.width), dtype=np.float32)  # (n, F)
        if len(idx):
            mapped = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, self.width))
            np.take(mapped, idx, axis=0, out=out)
            del mapped  # unmapped: the pages read are not kept resident
        return out


class ArrayRows:
    """In-memory ``(V, F)`` rows behind :class:`Rows`'s interface (small inputs, tests)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float32)  # (V, F)
        if self.x.ndim != 2:
            raise ValueError(f"expected (V, F) rows, got shape {self.x.shape}")
        self.width = self.x.shape[1]

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(idx, dtype=np.int64)]


class ConcatRows:
    """Several :class:`Rows` of one width read as one, in order (the ``random`` baseline's draws)."""

    def __init__(self, parts: Sequence[Rows]) -> None:
        if not parts or len({p.width for p in parts}) != 1:
            raise ValueError("ConcatRows needs at least one part, all of one width")
        self.parts, self.width = list(parts), parts[0].width
        self._starts = np.cumsum([0, *(len(p) for p in parts)])  # (P + 1,)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        part = np.searchsorted(self._starts, idx, side="right") - 1  # (n,)
        out = np.empty((len(idx), self.width), dtype=np.float32)  # (n, F)
        for p in np.unique(part).tolist():
            sel = part == p
            out[sel] = self.parts[p].take(idx[sel] - self._starts[p])
        return out


def as_rows(x: Rows | np.ndarray) -> Rows:
    """``x`` itself if it is :class:`Rows`, else in-memory rows of the array."""
    return ArrayRows(np.asarray(x)) if isinstance(x, np.ndarray) or not hasattr(x, "width") else x


def _no_space(path: Path, exc: OSError) -> Exception:
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    return ConfigError(
        f"no space left in {path.parent} for evaluate's pooled baseline features ({exc.strerror}); "
        "set TMPDIR (or --scratch-dir, EvalConfig.scratch_dir) to a disk with room"
    )


def check_scratch_space(scratch: str | Path, rows: int, width: int) -> None:
    """Refuse before any work when ``scratch`` cannot hold ``rows`` pooled float32 rows of ``width``.

    Raises:
        ConfigError: Not enough free space, naming what is needed and how to give it.
    """
    need = rows * width * 4
    free = shutil.disk_usage(scratch).free
    if need > free:
        raise ConfigError(
            f"evaluate writes the baselines' pooled features ({need / 1e9:.2f} GB: {rows} rows of {width} "
            f"floats) to {scratch}, which has {free / 1e9:.2f} GB free; set TMPDIR "
            "(or --scratch-dir, EvalConfig.scratch_dir) to a disk with room"
        )


def pooled_keys(pool_steps: Sequence[int], random_draws: int, *, evidence_draw: bool) -> list[str]:
    """Names of the pooled feature sets one :func:`scan` writes (see its docstring)."""
    keys = ["dense", *(["random"] if evidence_draw else []), *(f"uniform:{k}" for k in pool_steps)]
    return keys + [f"random:{d}" for d in range(random_draws)]


# ---- scanning --------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """Per-video results of one pass over a dataset (``V`` videos).

    In memory per video: the id, a few integers and, with a model, its ``(C,)`` float32 probabilities; the
    pooled features are on disk (:class:`RowFile`) and the accuracy after each recurrent step is counted
    as the batches pass, so memory does not grow with anything else per video.
    """

    video_ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # valid steps N per video
    prob_batches: list[np.ndarray] = field(default_factory=list)  # (B, C) per batch, in scan order
    running_correct: np.ndarray | None = None  # (T,) videos whose prediction after k+1 steps is right
    steps_used: list[int] = field(default_factory=list)
    consumed: list[int] = field(default_factory=list)  # distinct chosen steps per video
    pooled: dict[str, RowFile] = field(default_factory=dict)  # method -> (V, F) rows on disk
    evidence: dict[str, list[int]] = field(default_factory=dict)  # method -> [hits, looked at]

    @property
    def probs(self) -> np.ndarray:
        """The model's ``(V, C)`` probabilities in scan order."""
        if len(self.prob_batches) > 1:
            self.prob_batches = [np.concatenate(self.prob_batches)]
        return self.prob_batches[0] if self.prob_batches else np.zeros((0, 0), dtype=np.float32)

    def running_accuracy(self) -> list[float]:
        """Accuracy of the prediction after ``k`` recurrent steps, ``k = 1..T`` (empty without a model)."""
        if self.running_correct is None:
            return []
        return [float(c) / len(self.labels) for c in self.running_correct.tolist()]

    def close(self) -> None:
        """Close the pooled feature files' writers (the files stay until their directory is removed)."""
        for rows in self.pooled.values():
            rows.finish()


def scan(
    dataset: SkimDataset,
    model: SkimModel | None,
    *,
    rec_keys: Sequence[str],
    pool_steps: Sequence[int] = (),
    random_draws: int = 0,
    budget: int = 10,
    moments: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    step_s: float = 16 / 30,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "scan",
    scratch: str | Path | None = None,
    evidence_draw: bool = True,
) -> Scan:
    """One pass: model outputs (if any), pooled recognition features for the baselines, evidence counts.

    Pooled features (only with ``scratch``, a directory their files are written to, one per set; none
    without): ``dense``, ``random`` (the draw scored for evidence; unless ``evidence_draw`` is false),
    ``uniform:k`` for ``k`` in ``pool_steps`` and ``random:d`` for each of ``random_draws`` extra draws
    (training sets). Evidence (videos in ``moments`` only): ``skim`` (distinct chosen steps),
    ``uniform``/``random`` (``budget`` steps) and ``dense`` (all steps). Memory is bounded by the batch
    apart from :class:`Scan`'s few numbers per video.
    """
    res = Scan()
    res.evidence = {m: [0, 0] for m in METHODS}
    keys = pooled_keys(pool_steps, random_draws, evidence_draw=evidence_draw) if scratch is not None else []
    folder = Path(tempfile.mkdtemp(prefix="scan-", dir=scratch)) if keys else None  # one folder per scan
    try:
        with torch.no_grad():
            _scan_into(res, dataset, model, rec_keys=rec_keys, pool_steps=pool_steps,
                       random_draws=random_draws, budget=budget, moments=moments, step_s=step_s, seed=seed,
                       batch_size=batch_size, device=device, progress=progress, desc=desc,
                       pool=(folder, keys))  # fmt: skip
    finally:
        res.close()
    return res


def _scan_into(
    res: Scan,
    dataset: SkimDataset,
    model: SkimModel | None,
    *,
    rec_keys: Sequence[str],
    pool_steps: Sequence[int],
    random_draws: int,
    budget: int,
    moments: Mapping[str, Sequence[tuple[float, float]]] | None,
    step_s: float,
    seed: int,
    batch_size: int,
    device: torch.device | str,
    progress: bool,
    desc: str,
    pool: tuple[Path | None, Sequence[str]],
) -> None:
    folder, keys = pool
    for batch, out in iter_outputs(
        model, dataset, batch_size=batch_size, device=device, progress=progress, desc=desc
    ):
        x = torch.cat([batch["features"][k] for k in rec_keys], -1).cpu()  # (B, N, R*D)
        mask = batch["mask"].cpu().numpy()  # (B, N)
        mid_s = batch["time_s"].numpy() + step_s / 2  # (B, N) step midpoints
        labels = batch["labels"].cpu().numpy()  # (B,)
        if folder is not None and not res.pooled:  # the width is the recognition features' (R*D)
            res.pooled = {k: RowFile(folder / f"{n}.f32", x.shape[-1]) for n, k in enumerate(keys)}
        pooled: dict[str, list[np.ndarray]] = {k: [] for k in res.pooled}  # this batch's (F,) rows per set
        if out is not None:
            probs = out.logits.softmax(1).cpu().numpy()  # (B, C)
            taken = out.active.float().cumsum(1).clamp_min(1)[..., None]  # (B, T, 1)
            running = model.forward_head(out.inputs.cumsum(1) / taken).softmax(-1).cpu().numpy()  # (B, T, C)
            right = (running.argmax(-1) == labels[:, None]).sum(0)  # (T,) videos right after k+1 steps
            res.running_correct = right if res.running_correct is None else res.running_correct + right
            res.prob_batches.append(probs)
            chosen = out.chosen.cpu().numpy()  # (B, S, K)
            used = out.steps_used.cpu().numpy()  # (B,)
        for i, vid in enumerate(batch["video_ids"]):
            index = len(res.video_ids)
            valid = np.flatnonzero(mask[i])  # (n,)
            res.video_ids.append(vid)
            res.labels.append(int(labels[i]))
            res.steps.append(len(valid))
            picks = {"dense": valid, "uniform": valid[uniform_positions(len(valid), budget)]}
            rng = np.random.default_rng([seed, index])
            picks["random"] = np.sort(rng.choice(valid, size=min(budget, len(valid)), replace=False))
            if pooled:
                xi = x[i]  # (N, R*D)
                pooled["dense"].append(xi[valid].mean(0).numpy())
                if "random" in pooled:
                    pooled["random"].append(xi[picks["random"]].mean(0).numpy())
                for k in pool_steps:
                    pos = valid[uniform_positions(len(valid), k)]
                    pooled[f"uniform:{k}"].append(xi[pos].mean(0).numpy())
                for d in range(random_draws):
                    draw_rng = np.random.default_rng([seed, index, d + 1])
                    pos = draw_rng.choice(valid, size=min(budget, len(valid)), replace=False)
                    pooled[f"random:{d}"].append(xi[pos].mean(0).numpy())
            if out is not None:
                res.steps_used.append(int(used[i]))
                picks["skim"] = np.asarray(distinct_steps(chosen[i]), dtype=np.int64)
                res.consumed.append(len(picks["skim"]))
            segments = moments.get(vid) if moments else None
            if segments is None:
                continue
            for method, steps in picks.items():
                t = mid_s[i][steps]  # (n_method,)
                inside = np.zeros(len(t), dtype=bool)
                for start, end in segments:
                    inside |= (t >= start) & (t <= end)
                res.evidence[method][0] += int(inside.sum())
                res.evidence[method][1] += len(t)
        for key, rows in pooled.items():
            if rows:
                res.pooled[key].append(np.stack(rows))  # (B, F)


# ---- baselines -------------------------------------------------------------------------------------------


def train_head(
    x: Rows | np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    hidden: int = 1024,
    embed: int = 512,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = False,
    desc: str = "baseline head",
) -> nn.Module:
    """Train ``Psi`` + Linear on pooled features ``x`` ``(V, F)`` with labels ``y`` ``(V,)`` for ``steps``
    optimiser steps over shuffled batches (reshuffled each pass); returned in eval mode. ``x`` may be an
    array or :class:`Rows` on disk (each batch reads only its rows: memory is bounded by the batch); both
    give the same head. ``progress`` shows a bar of the steps named ``desc``."""
    from tqdm.auto import tqdm

    rows = as_rows(x)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(fusion_mlp(rows.width, hidden, embed), nn.Linear(embed, num_classes))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    ys = torch.from_numpy(np.asarray(y, dtype=np.int64))  # (V,)
    if len(ys) != len(rows):
        raise ValueError(f"{len(rows)} feature rows but {len(ys)} labels")
    done = 0
    with tqdm(total=steps, desc=desc, unit="step", leave=False, disable=not progress) as bar:
        while done < steps:
            for idx in torch.randperm(len(rows), generator=gen).split(batch_size)[: steps - done]:
                xb = torch.from_numpy(rows.take(idx.numpy()))  # (b, F)
                loss = nn.functional.cross_entropy(head(xb), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                bar.update()
    return head.eval()


def _predict(head: nn.Module, x: Rows | np.ndarray, *, block_rows: int | None = None) -> np.ndarray:
    """Class probabilities ``(V, C)`` of ``head`` on rows ``x``, ``block_rows`` at a time (default
    :data:`PREDICT_ROWS`)."""
    rows, block_rows = as_rows(x), block_rows or PREDICT_ROWS
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), block_rows):
            block = rows.take(np.arange(start, min(start + block_rows, len(rows))))  # (b, F)
            out.append(head(torch.from_numpy(block)).softmax(1).numpy())
    return np.concatenate(out)


# ---- evaluate --------------------------------------------------------------------------------------------


def evaluate(
    store_path: str | Path,
    model_path: str | Path,
    *,
    labels: str | Path | None = None,
    moments: str | Path | None = None,
    config: EvalConfig = EvalConfig(),
    recognition_store: str | Path | None = None,
    inference: Mapping[str, Any] | None = None,
    plot: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    allow_other_students: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint and the baselines on one split of a store.

    Args:
        store_path: Feature store (the one the model was trained on, or one extracted the same way).
        model_path: Skimming checkpoint.
        labels: Labels manifest; None uses the store index's labels and splits.
        moments: Ground-truth segments (default: ``moments.json`` beside the manifest if present).
        config: Evaluation settings.
        recognition_store: Second store for models with separate recognition features (default: the one
            recorded in the checkpoint).
        inference: Inference-only overrides of the model (``next_input``, ``stop_after``, ...).
        plot: Write the trade-off curves PNG here.
        progress: Show progress bars.
        log: Where notes go (default: ``tqdm.write``).
        allow_other_students: Evaluate on a store made by other students than the model's training store.

    Returns:
        ``{"methods": {method: {"accuracy", "map", "gflops_per_video", "steps_used", "evidence_precision"}},
        "videos": V, ...}`` plus ``split``, ``classes``, ``costs``, ``curves``, ``baselines`` and ``notes``.

    Raises:
        ValueError: No labelled videos in the split, or a bad checkpoint/store pairing.
    """
    from tqdm.auto import tqdm

    note = log or tqdm.write
    device = resolve_device(config.device)
    ckpt = load_checkpoint(model_path, device=str(device), **dict(inference or {}))
    cfg, names = ckpt.config, ckpt.labels
    store, rec_store = open_stores(
        store_path, ckpt, recognition_store, allow_other_students=allow_other_students
    )
    _check_dim(store, ckpt)
    manifest = read_labels(labels) if labels is not None else None
    if manifest is not None:
        check_label_coverage(store, manifest, log=note)
    moments_path = Path(moments) if moments is not None else default_moments_path(labels)
    gt = read_segments(moments_path) if moments_path is not None else None
    step_s = step_seconds(store)
    data_kw: dict[str, Any] = {"labels": manifest, "names": names, "recognition_store": rec_store}
    eval_ds = SkimDataset(store, cfg.batch_keys, split=config.split, **data_kw)
    if len(eval_ds) == 0:
        raise ConfigError(
            f"no labelled ok videos in split {config.split!r} of {store_path} (skipped: {eval_ds.skipped}); "
            "pass --split or --labels"
        )
    budget = cfg.stop_after or cfg.num_steps
    curve_ks = sorted({k for k in config.curve_steps if k <= budget} | {budget})
    train_ds = SkimDataset(store, cfg.batch_keys, split=config.train_split, **data_kw)
    feat_dim = len(cfg.recognition_keys) * cfg.dim
    scratch_dir = config.scratch_dir or tempfile.gettempdir()
    if not Path(scratch_dir).is_dir():
        raise ConfigError(f"scratch directory {scratch_dir} does not exist; create it or give another")
    pooled_rows = len(eval_ds) * len(pooled_keys(curve_ks, 0, evidence_draw=True))
    if len(train_ds):
        pooled_rows += len(train_ds) * len(pooled_keys(curve_ks, config.random_draws, evidence_draw=False))
    check_scratch_space(scratch_dir, pooled_rows, feat_dim)
    with tempfile.TemporaryDirectory(prefix="l2l-evaluate-", dir=scratch_dir) as scratch:
        return _evaluate(
            ckpt, store, rec_store, eval_ds, train_ds, config, budget=budget, curve_ks=curve_ks, gt=gt,
            moments_path=moments_path, step_s=step_s, device=device, progress=progress, plot=plot, note=note,
            scratch=scratch,
        )  # fmt: skip


def _evaluate(
    ckpt: SkimCheckpoint,
    store: Any,
    rec_store: Any,
    eval_ds: SkimDataset,
    train_ds: SkimDataset,
    config: EvalConfig,
    *,
    budget: int,
    curve_ks: list[int],
    gt: Mapping[str, Sequence[tuple[float, float]]] | None,
    moments_path: Path | None,
    step_s: float,
    device: torch.device,
    progress: bool,
    plot: str | Path | None,
    note: Callable[[str], None],
    scratch: str,
) -> dict[str, Any]:
    """:func:`evaluate` once the datasets are open; pooled features go to files under ``scratch``."""
    model, cfg, names = ckpt.model, ckpt.config, ckpt.labels
    notes: list[str] = []
    common = {"rec_keys": cfg.recognition_keys, "budget": budget, "seed": config.seed, "step_s": step_s}
    run_kw = {"batch_size": config.batch_size, "device": device, "progress": progress, "scratch": scratch}
    test = scan(
        eval_ds, model, pool_steps=curve_ks, moments=gt, desc=f"evaluate {config.split}", **common, **run_kw
    )
    y = np.asarray(test.labels)
    probs = test.probs  # (V, C)
    present = sorted({int(c) for c in y})
    map_defined = len(present) >= 2  # with one class every ranking is perfect: mAP would say 1.0 for nothing
    if not map_defined:
        notes.append(
            f"warning: split {config.split!r} holds only class {names[present[0]]!r}: mAP is undefined "
            "(null); evaluate on a split with several classes"
        )
    if len(y) < MIN_EVAL_VIDEOS:
        notes.append(
            f"warning: only {len(y)} videos in split {config.split!r} ({len(present)} of {len(names)} "
            f"classes): accuracy moves in steps of {1 / len(y):.2f}; differences this small mean little"
        )
    n = np.asarray(test.steps, dtype=np.float64)  # (V,)

    costs, cost_source = step_costs(store.attrs)
    all_costs = dict(costs)
    if rec_store is not None:
        all_costs.update({RECOGNITION_PREFIX + k: v for k, v in step_costs(rec_store.attrs)[0].items()})
    index_parts = components(cfg.index_keys)
    rec_parts = components(cfg.recognition_keys)
    rec_only = rec_parts - index_parts
    consumed = np.asarray(test.consumed, dtype=np.float64)
    n_rec = n if cfg.next_input == "soft" else consumed
    skim_gflops = (
        np.ceil(n / cfg.subsample) * _cost(index_parts, all_costs)
        + n_rec * _cost(rec_only, all_costs)
        + np.asarray([model.gflops(int(a), int(b)) for a, b in zip(test.steps, test.steps_used, strict=True)])
    )
    feat_dim = len(cfg.recognition_keys) * cfg.dim
    per_step_rec = _cost(rec_parts, all_costs)
    head = head_gflops(feat_dim, cfg.hidden, cfg.embed, len(names))
    gflops = {
        "skim": float(skim_gflops.mean()),
        "uniform": float(np.minimum(n, budget).mean() * per_step_rec + head),
        "random": float(np.minimum(n, budget).mean() * per_step_rec + head),
        "dense": float(n.mean() * per_step_rec + head),
    }

    def evidence(method: str) -> float | None:
        hits, total = test.evidence[method]
        return hits / total if total else None

    skim_accuracy = accuracy(probs, y)
    methods: dict[str, dict[str, Any]] = {
        "skim": {
            "accuracy": skim_accuracy,
            "map": mean_average_precision(probs, y) if map_defined else None,
            "gflops_per_video": gflops["skim"],
            "steps_used": float(np.mean(test.steps_used)),
            "evidence_precision": evidence("skim"),
        }
    }
    del probs
    test.prob_batches.clear()  # from here on one (V, C) array at a time: the baseline being scored
    baselines: dict[str, Any] = {"train_split": config.train_split, "train_videos": len(train_ds)}
    uniform_curve: list[float] = []
    if len(train_ds) == 0:
        notes.append(f"no labelled videos in split {config.train_split!r}: baselines not trained")
        for m in ("uniform", "random", "dense"):
            methods[m] = {"accuracy": None, "map": None, "gflops_per_video": gflops[m], "steps_used": None}
            methods[m]["evidence_precision"] = evidence(m)
    else:
        train = scan(
            train_ds,
            None,
            pool_steps=curve_ks,
            random_draws=config.random_draws,
            desc=f"pool {config.train_split}",
            evidence_draw=False,
            **common,
            **run_kw,
        )
        y_train = np.asarray(train.labels)
        head_kw = {
            "hidden": cfg.hidden,
            "embed": cfg.embed,
            "steps": config.baseline_steps,
            "lr": config.baseline_lr,
            "batch_size": config.baseline_batch_size,
            "seed": config.seed,
        }

        def fit_predict(x_train: Rows, y_fit: np.ndarray, x_test: Rows, desc: str) -> np.ndarray:
            head = train_head(
                x_train, y_fit, len(names), **head_kw, progress=progress, desc=f"baseline {desc}"
            )
            return _predict(head, x_test)

        random_x = ConcatRows([train.pooled[f"random:{d}"] for d in range(config.random_draws)])
        random_y = np.tile(y_train, config.random_draws)
        inputs = {
            "uniform": (train.pooled[f"uniform:{budget}"], y_train, test.pooled[f"uniform:{budget}"]),
            "random": (random_x, random_y, test.pooled["random"]),
            "dense": (train.pooled["dense"], y_train, test.pooled["dense"]),
        }
        used = {"uniform": float(np.minimum(n, budget).mean()), "random": float(np.minimum(n, budget).mean())}
        used["dense"] = float(n.mean())
        for m, (x_fit, y_fit, x_test) in inputs.items():
            p = fit_predict(x_fit, y_fit, x_test, m)  # (V, C)
            methods[m] = {
                "accuracy": accuracy(p, y),
                "map": mean_average_precision(p, y) if map_defined else None,
                "gflops_per_video": gflops[m],
                "steps_used": used[m],
                "evidence_precision": evidence(m),
            }
        for k in curve_ks:
            if k == budget:
                uniform_curve.append(methods["uniform"]["accuracy"])
            else:
                p = fit_predict(
                    train.pooled[f"uniform:{k}"], y_train, test.pooled[f"uniform:{k}"], f"uniform T={k}"
                )
                uniform_curve.append(accuracy(p, y))
        baselines["head"] = "Psi (Linear R*D->hidden, ReLU, Linear hidden->embed) + Linear embed->C, AdamW"
        baselines.update(head_kw)
        baselines["random_draws"] = config.random_draws

    running = test.running_accuracy()  # (T,) accuracy after k = 1..T steps
    curves: dict[str, Any] = {
        "steps": {
            "k": list(range(1, len(running) + 1)),
            "skim": running,
            "uniform_k": curve_ks if uniform_curve else [],
            "uniform": uniform_curve,
        },
        "subsample": _subsample_curve(ckpt, eval_ds, config, skim_accuracy, device, progress),
    }
    if gt is None:
        notes.append("no moments.json: evidence_precision is null")
    if plot is not None:
        _save_tradeoff(curves, Path(plot))
    for line in notes:
        note(line)
    return {
        "methods": {m: methods[m] for m in METHODS},
        "videos": len(test.video_ids),
        "split": config.split,
        "classes": len(names),
        "labels": list(names),
        "classes_present": len(present),
        "model": ckpt.name,
        "inference": {
            k: getattr(cfg, k) for k in ("next_input", "stop_after", "exit_threshold", "subsample")
        },
        "costs": {
            "gflops_per_step": all_costs,
            "source": cost_source,
            "index_networks": sorted(index_parts),
            "recognition_networks": sorted(rec_parts),
            "dense_teacher_gflops_per_video": float(n.mean() * costs["teacher_clip"]),
            "mean_steps_per_video": float(n.mean()),
        },
        "curves": curves,
        "baselines": baselines,
        "moments": str(moments_path) if moments_path is not None else None,
        "notes": notes,
    }


def _subsample_curve(
    ckpt: SkimCheckpoint,
    dataset: SkimDataset,
    config: EvalConfig,
    skim_accuracy: float,
    device: torch.device,
    progress: bool,
) -> dict[str, list]:
    """Accuracy of the same weights with indexing features sub-sampled by each factor (counted per batch)."""
    factors, accs = [], []
    for f in config.subsample_factors:
        if f == ckpt.config.subsample:
            acc = skim_accuracy
        else:
            model = SkimModel(ckpt.config.with_inference(subsample=f)).to(device)
            model.load_state_dict(ckpt.model.state_dict())
            right = videos = 0
            for batch, out in iter_outputs(
                model, dataset, batch_size=config.batch_size, device=device, progress=progress, desc=f"k={f}"
            ):
                pred = out.logits.softmax(1).cpu().numpy().argmax(1)  # (B,)
                right += int((pred == batch["labels"].cpu().numpy()).sum())
                videos += len(pred)
            acc = right / videos if videos else float("nan")
        factors.append(f)
        accs.append(acc)
    return {"factor": factors, "skim": accs}


def _check_dim(store: Any, ckpt: SkimCheckpoint) -> None:
    if store.dim != ckpt.config.dim:
        raise CheckpointError(
            f"store features are {store.dim}-d but the model expects {ckpt.config.dim}-d; "
            "evaluate on a store extracted with the same models"
        )


def _save_tradeoff(curves: Mapping[str, Any], path: Path) -> None:
    from .plot import _pyplot, tradeoff_figure

    fig = tradeoff_figure(curves)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)

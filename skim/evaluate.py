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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# ---- scanning --------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """Per-video results of one pass over a dataset (``V`` videos)."""

    video_ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # valid steps N per video
    probs: list[np.ndarray] = field(default_factory=list)  # (C,) each
    running: list[np.ndarray] = field(default_factory=list)  # (T, C) probabilities after k+1 steps
    steps_used: list[int] = field(default_factory=list)
    consumed: list[int] = field(default_factory=list)  # distinct chosen steps per video
    pooled: dict[str, list[np.ndarray]] = field(default_factory=dict)  # method -> (F,) per video
    evidence: dict[str, list[int]] = field(default_factory=dict)  # method -> [hits, looked at]


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
) -> Scan:
    """One pass: model outputs (if any), pooled recognition features for the baselines, evidence counts.

    Pooled features: ``dense``, ``random`` (the draw scored for evidence), ``uniform:k`` for ``k`` in
    ``pool_steps`` and ``random:d`` for each of ``random_draws`` extra draws (training sets).
    Evidence (videos in ``moments`` only): ``skim`` (distinct chosen steps), ``uniform``/``random``
    (``budget`` steps) and ``dense`` (all steps).
    """
    res = Scan()
    res.evidence = {m: [0, 0] for m in METHODS}
    with torch.no_grad():
        _scan_into(res, dataset, model, rec_keys, pool_steps, random_draws, budget, moments, step_s, seed,
                   batch_size, device, progress, desc)  # fmt: skip
    return res


def _scan_into(
    res: Scan,
    dataset: SkimDataset,
    model: SkimModel | None,
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
) -> None:
    for batch, out in iter_outputs(
        model, dataset, batch_size=batch_size, device=device, progress=progress, desc=desc
    ):
        x = torch.cat([batch["features"][k] for k in rec_keys], -1).cpu()  # (B, N, R*D)
        mask = batch["mask"].cpu().numpy()  # (B, N)
        mid_s = batch["time_s"].numpy() + step_s / 2  # (B, N) step midpoints
        if out is not None:
            probs = out.logits.softmax(1).cpu().numpy()  # (B, C)
            taken = out.active.float().cumsum(1).clamp_min(1)[..., None]  # (B, T, 1)
            running = model.forward_head(out.inputs.cumsum(1) / taken).softmax(-1).cpu().numpy()  # (B, T, C)
            chosen = out.chosen.cpu().numpy()  # (B, S, K)
            used = out.steps_used.cpu().numpy()  # (B,)
        for i, vid in enumerate(batch["video_ids"]):
            index = len(res.video_ids)
            valid = np.flatnonzero(mask[i])  # (n,)
            res.video_ids.append(vid)
            res.labels.append(int(batch["labels"][i]))
            res.steps.append(len(valid))
            picks = {"dense": valid, "uniform": valid[uniform_positions(len(valid), budget)]}
            rng = np.random.default_rng([seed, index])
            picks["random"] = np.sort(rng.choice(valid, size=min(budget, len(valid)), replace=False))
            xi = x[i]  # (N, R*D)
            res.pooled.setdefault("dense", []).append(xi[valid].mean(0).numpy())
            res.pooled.setdefault("random", []).append(xi[picks["random"]].mean(0).numpy())
            for k in pool_steps:
                pos = valid[uniform_positions(len(valid), k)]
                res.pooled.setdefault(f"uniform:{k}", []).append(xi[pos].mean(0).numpy())
            for d in range(random_draws):
                draw_rng = np.random.default_rng([seed, index, d + 1])
                pos = draw_rng.choice(valid, size=min(budget, len(valid)), replace=False)
                res.pooled.setdefault(f"random:{d}", []).append(xi[pos].mean(0).numpy())
            if out is not None:
                res.probs.append(probs[i])
                res.running.append(running[i])
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


# ---- baselines -------------------------------------------------------------------------------------------


def train_head(
    x: np.ndarray,
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
    optimiser steps over shuffled batches (reshuffled each pass); returned in eval mode. ``progress``
    shows a bar of the steps named ``desc``."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(fusion_mlp(x.shape[1], hidden, embed), nn.Linear(embed, num_classes))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # (V, F)
    ys = torch.from_numpy(np.asarray(y, dtype=np.int64))  # (V,)
    done = 0
    with tqdm(total=steps, desc=desc, unit="step", leave=False, disable=not progress) as bar:
        while done < steps:
            for idx in torch.randperm(len(xs), generator=gen).split(batch_size)[: steps - done]:
                loss = nn.functional.cross_entropy(head(xs[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                bar.update()
    return head.eval()


def _predict(head: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.from_numpy(np.asarray(x, dtype=np.float32))).softmax(1).numpy()


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
    model, cfg, names = ckpt.model, ckpt.config, ckpt.labels
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
    notes: list[str] = []
    data_kw: dict[str, Any] = {"labels": manifest, "names": names, "recognition_store": rec_store}
    eval_ds = SkimDataset(store, cfg.batch_keys, split=config.split, **data_kw)
    if len(eval_ds) == 0:
        raise ConfigError(
            f"no labelled ok videos in split {config.split!r} of {store_path} (skipped: {eval_ds.skipped}); "
            "pass --split or --labels"
        )
    budget = cfg.stop_after or cfg.num_steps
    curve_ks = sorted({k for k in config.curve_steps if k <= budget} | {budget})
    common = {"rec_keys": cfg.recognition_keys, "budget": budget, "seed": config.seed, "step_s": step_s}
    run_kw = {"batch_size": config.batch_size, "device": device, "progress": progress}
    test = scan(
        eval_ds, model, pool_steps=curve_ks, moments=gt, desc=f"evaluate {config.split}", **common, **run_kw
    )
    y = np.asarray(test.labels)
    probs = np.stack(test.probs)  # (V, C)
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

    methods: dict[str, dict[str, Any]] = {
        "skim": {
            "accuracy": accuracy(probs, y),
            "map": mean_average_precision(probs, y) if map_defined else None,
            "gflops_per_video": gflops["skim"],
            "steps_used": float(np.mean(test.steps_used)),
            "evidence_precision": evidence("skim"),
        }
    }
    train_ds = SkimDataset(store, cfg.batch_keys, split=config.train_split, **data_kw)
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

        def fit_predict(x_train: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, desc: str) -> np.ndarray:
            head = train_head(
                x_train, y_fit, len(names), **head_kw, progress=progress, desc=f"baseline {desc}"
            )
            return _predict(head, x_test)

        random_x = np.concatenate([np.stack(train.pooled[f"random:{d}"]) for d in range(config.random_draws)])
        random_y = np.tile(y_train, config.random_draws)
        base_probs = {
            "uniform": fit_predict(
                np.stack(train.pooled[f"uniform:{budget}"]),
                y_train,
                np.stack(test.pooled[f"uniform:{budget}"]),
                "uniform",
            ),
            "random": fit_predict(random_x, random_y, np.stack(test.pooled["random"]), "random"),
            "dense": fit_predict(
                np.stack(train.pooled["dense"]), y_train, np.stack(test.pooled["dense"]), "dense"
            ),
        }
        used = {"uniform": float(np.minimum(n, budget).mean()), "random": float(np.minimum(n, budget).mean())}
        used["dense"] = float(n.mean())
        for m, p in base_probs.items():
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
                    np.stack(train.pooled[f"uniform:{k}"]),
                    y_train,
                    np.stack(test.pooled[f"uniform:{k}"]),
                    f"uniform T={k}",
                )
                uniform_curve.append(accuracy(p, y))
        baselines["head"] = "Psi (Linear R*D->hidden, ReLU, Linear hidden->embed) + Linear embed->C, AdamW"
        baselines.update(head_kw)
        baselines["random_draws"] = config.random_draws

    running = np.stack(test.running)  # (V, T, C)
    curves: dict[str, Any] = {
        "steps": {
            "k": list(range(1, running.shape[1] + 1)),
            "skim": [accuracy(running[:, t], y) for t in range(running.shape[1])],
            "uniform_k": curve_ks if uniform_curve else [],
            "uniform": uniform_curve,
        },
        "subsample": _subsample_curve(ckpt, eval_ds, config, y, test, device, progress),
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
    y: np.ndarray,
    test: Scan,
    device: torch.device,
    progress: bool,
) -> dict[str, list]:
    """Accuracy of the same weights with indexing features sub-sampled by each factor."""
    factors, accs = [], []
    for f in config.subsample_factors:
        if f == ckpt.config.subsample:
            acc = accuracy(np.stack(test.probs), y)
        else:
            model = SkimModel(ckpt.config.with_inference(subsample=f)).to(device)
            model.load_state_dict(ckpt.model.state_dict())
            probs = [
                out.logits.softmax(1).cpu().numpy()
                for _, out in iter_outputs(
                    model,
                    dataset,
                    batch_size=config.batch_size,
                    device=device,
                    progress=progress,
                    desc=f"k={f}",
                )
            ]
            acc = accuracy(np.concatenate(probs), y)
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

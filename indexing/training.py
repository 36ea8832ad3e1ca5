"""One training loop for distillation, fine-tuning (:mod:`indexing.distill`) and skimming (:mod:`skim.train`).

:func:`fit` runs epochs of SGD with a learning-rate schedule, a progress bar, a non-finite-loss check,
validation, atomic checkpoints after every epoch (written by the caller's ``save``) and a training-curve
PNG. Resuming is :func:`restore`: the optimiser, the RNG state and the history of the last checkpoint, so
a resumed run continues exactly where an uninterrupted run would be (each epoch's data order is drawn from
``(seed, epoch)`` by the callers' samplers; the RNG state covers the DataLoader's own draws).

Training adapts instead of running fixed epochs (:class:`Stopping`): after every epoch the validation
metric decides which epoch is kept (the best; the caller writes its weights to ``--out``) and whether to
go on: ``patience`` epochs without an improvement of at least ``min_delta`` stop the run, ``epochs`` is a
maximum, and ``max_updates`` an optional budget of optimiser updates. Everything that decides (best epoch,
epochs since the last improvement, learning-rate drops) is replayed from the history (:func:`track`), so a
resumed run takes the same decisions as an uninterrupted one, and the stopping settings may change between
runs (raise ``--epochs`` or ``--patience`` and resume).

Learning rate of 0-based epoch ``e`` for a parameter group: ``lr * lr_scale * gamma ** (milestones <= e
+ plateau drops so far)``. The paper's step schedule is the milestones (distillation ÷10 at epochs 30 and
50, skimming ÷10 at 15 and 20); the default drops on plateaus instead (``Schedule.plateau`` epochs without
improvement), which needs no total epoch count and so still makes sense when training stops early. A
group's ``lr_scale`` (default 1) lets a part train slower, e.g. the skimming classifier at 0.1x.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from indexing.errors import ConfigError

RESUME_SUFFIX = ".resume"  # OUT + this: the last epoch's resumable state beside the best weights in OUT
STOP_REASONS = ("patience", "max_epochs", "budget")
HOLDOUT = "holdout"  # the validation set carved from the training videos of a corpus without a val split
HOLDOUT_FRACTION = 0.15


class DivergedError(ConfigError):
    """The training loss became NaN or infinite: the learning rate is too high for this data."""


def resume_path(path: str | Path) -> Path:
    """The last epoch's resumable checkpoint (optimiser, RNG state) beside the best weights ``path``."""
    path = Path(path)
    return path.with_name(path.name + RESUME_SUFFIX)


def holdout(
    video_ids: Sequence[str], labels: Sequence[str], *, fraction: float = HOLDOUT_FRACTION
) -> list[str]:
    """The training videos held out for validation when a corpus has no ``val`` split.

    Per label, ``round(fraction * n)`` of its ``n`` videos (none for a class of 3 or fewer, which needs
    them all to train): those whose sha1 of the video id sorts first. So the same videos are held out in
    every command and run, whatever the seed, and the test split never chooses an epoch.

    Args:
        video_ids: Training video ids.
        labels: Their labels (all equal, e.g. empty, for an unlabelled corpus: one stratum).
        fraction: Share of each class held out.

    Returns:
        The held-out ids, in the order of ``video_ids`` (empty when no class is large enough).
    """
    by_label: dict[str, list[str]] = {}
    for vid, label in zip(video_ids, labels, strict=True):
        by_label.setdefault(str(label), []).append(str(vid))
    held: set[str] = set()
    for vids in by_label.values():
        k = math.floor(fraction * len(vids) + 0.5)
        held.update(sorted(vids, key=lambda v: hashlib.sha1(v.encode()).hexdigest())[:k])
    return [str(v) for v in video_ids if str(v) in held]


@dataclass(frozen=True)
class Schedule:
    """Learning-rate schedule (plain data; the callers' configs build it).

    Attributes:
        lr: Initial learning rate of a group with ``lr_scale`` 1.
        milestones: 0-based epochs from which the rate is multiplied by ``gamma`` once more.
        gamma: Decay factor.
        plateau: Multiply the rate by ``gamma`` after this many epochs without improvement of the
            validation metric (counted since the last improvement or the last drop; 0: never).
    """

    lr: float
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    plateau: int = 0

    def lr_at(self, epoch: int, scale: float = 1.0, drops: int = 0) -> float:
        """Learning rate of 0-based ``epoch`` for a group with ``lr_scale`` ``scale`` after ``drops``
        plateau drops."""
        return self.lr * self.gamma ** (sum(epoch >= m for m in self.milestones) + drops) * scale


@dataclass(frozen=True)
class Stopping:
    """Which epoch is kept and when training stops (plain data; the callers' configs build it).

    Attributes:
        monitor: History key of the validation metric (``val_accuracy``, ``val_l1``); epochs whose record
            holds None there were not validated, and then the last epoch is kept.
        mode: ``max`` (accuracy) or ``min`` (a loss).
        tie: History key, lower is better, that breaks ties of ``monitor`` (``val_loss``); a complete tie
            keeps the earlier epoch. An epoch that lowers it below every epoch before by ``min_delta`` also
            counts as an improvement for patience and plateau drops: a falling validation loss means the
            model is still learning where a small validation set's accuracy does not move yet.
        patience: Stop after this many epochs without improvement (0: never stop early).
        min_delta: Smallest change that counts as an improvement for ``patience`` and plateau drops:
            absolute for ``mode="max"`` (0.001 of accuracy) and for ``tie`` (a validation loss that keeps
            shrinking towards 0 at 100% accuracy stops counting), relative for ``mode="min"`` (0.001 =
            0.1% of the distillation L1, whose scale is the teacher's). The best epoch itself is chosen
            without it.
        max_updates: Budget of optimiser updates (None: none); reaching it ends training, mid-epoch if
            need be (that epoch is validated and counts).
        keep_best: False when the validation is monitoring only (e.g. on the training videos): the last
            epoch is kept and patience never stops, while plateau drops still follow the metric.
        min_updates: Neither patience nor plateau drops count before this many optimiser updates (a model
            whose validation stays flat for a while before it learns, as the skimming attention does,
            is not stopped or slowed in that time); they count from the epoch that reaches it.
    """

    monitor: str
    mode: str = "max"
    tie: str | None = None
    patience: int = 0
    min_delta: float = 1e-3
    max_updates: int | None = None
    keep_best: bool = True
    min_updates: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode={self.mode!r}; choose max or min")
        if self.patience < 0:
            raise ConfigError(f"patience={self.patience} must be >= 0 (0: never stop early)")
        if not (self.min_delta >= 0 and math.isfinite(self.min_delta)):
            raise ConfigError(f"min_delta={self.min_delta} must be >= 0, e.g. 0.001")
        if self.max_updates is not None and self.max_updates < 1:
            raise ConfigError(f"max_updates={self.max_updates} must be >= 1 (or none for no budget)")
        if self.min_updates < 0:
            raise ConfigError(f"min_updates={self.min_updates} must be >= 0")

    def _value(self, record: Mapping[str, Any]) -> float | None:
        value = record.get(self.monitor)
        return None if value is None else float(value)

    def _tie(self, record: Mapping[str, Any]) -> float:
        value = record.get(self.tie) if self.tie else None
        return math.inf if value is None else float(value)

    def better(self, record: Mapping[str, Any], than: Mapping[str, Any]) -> bool:
        """``record`` beats ``than`` (no min-delta): a better metric, or the same metric and a lower tie."""
        a, b = self._value(record), self._value(than)
        if a != b:
            return a > b if self.mode == "max" else a < b
        return self._tie(record) < self._tie(than)

    def improved(self, record: Mapping[str, Any], best_value: float | None, best_tie: float) -> bool:
        """``record`` beats the best metric so far, or the lowest ``tie`` so far, by at least ``min_delta``
        (what resets patience and the plateau count; ``best_value`` None: the first validated epoch)."""
        a = self._value(record)
        if best_value is None:
            return True
        if self.mode == "max" and a > best_value + self.min_delta:
            return True
        if self.mode == "min" and a < best_value - self.min_delta * abs(best_value):
            return True
        tie = self._tie(record)
        return math.isfinite(tie) and tie < best_tie - self.min_delta


@dataclass(frozen=True)
class Progress:
    """Where a run stands after the epochs of a history (:func:`track`).

    Attributes:
        epochs: Epochs trained.
        updates: Optimiser updates done.
        validated: Whether epochs were validated on a split that chooses the kept epoch (else it is the last
            one, and patience never stops).
        best_epoch: The kept epoch (1-based; 0 before any epoch).
        best: Its record.
        since_improvement: Epochs since the last improvement by ``min_delta`` (0: the last epoch was one):
            of the metric over its best so far, or of ``tie`` under its lowest so far.
        patience_count: The epochs without improvement that patience counts (those after ``min_updates``).
        lr_drops: Plateau drops of the learning rate so far.
        last_improved: The last epoch improved (as in ``since_improvement``) on every epoch before it.
    """

    epochs: int = 0
    updates: int = 0
    validated: bool = False
    best_epoch: int = 0
    best: Mapping[str, Any] | None = None
    since_improvement: int = 0
    patience_count: int = 0
    lr_drops: int = 0
    last_improved: bool = False


def track(history: Sequence[Mapping[str, Any]], stopping: Stopping, *, plateau: int = 0) -> Progress:
    """Replay a history: the kept epoch, epochs since the last improvement and the plateau drops.

    A pure function of the history, so a resumed run (history restored from the checkpoint) decides
    exactly as the uninterrupted one did.
    """
    best = None
    best_value: float | None = None  # the best metric so far, and the lowest tie, each on its own
    best_tie = math.inf
    improved_at = dropped_at = 0
    warm_at = 0 if stopping.min_updates == 0 else None  # the epoch that reached min_updates
    drops = 0
    last_improved = False
    measured = False
    for record in history:
        epoch = int(record["epoch"])
        if warm_at is None and int(record.get("updates", 0)) >= stopping.min_updates:
            warm_at = epoch
        value = stopping._value(record)
        if value is None or math.isnan(value):  # not validated (or NaN): never kept over a validated one
            if not measured:
                best, improved_at, last_improved = record, epoch, False
            continue
        if not stopping.keep_best or not measured or stopping.better(record, best):
            best = record
        measured = True
        last_improved = stopping.improved(record, best_value, best_tie)
        if last_improved:
            improved_at = epoch
        if best_value is None or (value > best_value if stopping.mode == "max" else value < best_value):
            best_value = value
        best_tie = min(best_tie, stopping._tie(record))
        if plateau and warm_at is not None and epoch - max(improved_at, dropped_at, warm_at) >= plateau:
            drops, dropped_at = drops + 1, epoch
    last = int(history[-1]["epoch"]) if history else 0
    validated = measured and stopping.keep_best
    return Progress(
        epochs=last,
        updates=int(history[-1].get("updates", 0)) if history else 0,
        validated=validated,
        best_epoch=int(best["epoch"]) if best is not None else 0,
        best=best,
        since_improvement=last - improved_at if measured else 0,
        patience_count=last - max(improved_at, warm_at) if measured and warm_at is not None else 0,
        lr_drops=drops,
        last_improved=last_improved,
    )


def stop_reason(progress: Progress, stopping: Stopping, epochs: int) -> str | None:
    """Why training ends after ``progress`` (one of :data:`STOP_REASONS`), or None to go on."""
    if stopping.max_updates is not None and progress.updates >= stopping.max_updates:
        return "budget"
    if stopping.patience and progress.validated and progress.patience_count >= stopping.patience:
        return "patience"
    if progress.epochs >= epochs:
        return "max_epochs"
    return None


def _metric(key: str, value: Any) -> str:
    name = key.replace("_", " ")
    return f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"


def outcome(
    history: Sequence[Mapping[str, Any]], stopping: Stopping, *, epochs: int, plateau: int = 0
) -> dict[str, Any]:
    """What a run says about its end, for the command output, ``--json`` and the checkpoint.

    Returns:
        ``best_epoch`` (the epoch whose weights ``--out`` holds), ``monitor`` and ``best_metric`` (its
        value; None without validation), ``validated``, ``stopped`` (``patience``, ``max_epochs``,
        ``budget``, or None for a run that has not ended), ``still_improving`` (the last epoch improved on
        all before it and training did not stop on patience: more epochs would likely help),
        ``epochs_since_improvement``, ``updates``, ``lr_drops``, and ``message``: one line saying all that.
    """
    p = track(history, stopping, plateau=plateau)
    stopped = stop_reason(p, stopping, epochs) if history else None
    still = bool(p.validated and p.last_improved and p.epochs > 1 and stopped in ("max_epochs", "budget"))
    why = {
        "patience": f"patience ({p.patience_count} epochs without improvement, --patience "
        f"{stopping.patience})",
        "max_epochs": f"max epochs ({epochs})",
        "budget": f"budget of {stopping.max_updates} optimiser updates ({p.updates} done)",
        None: f"not finished ({p.epochs} of at most {epochs} epochs)",
    }[stopped]
    if not history:
        message = "no epoch trained"
    elif p.validated:
        shown = _metric(stopping.monitor, stopping._value(p.best))
        if stopping.tie and p.best.get(stopping.tie) is not None:
            shown += f", {_metric(stopping.tie, float(p.best[stopping.tie]))}"
        message = f"stopped: {why}; best epoch {p.best_epoch} of {p.epochs} ({shown}), kept in --out"
        if still:
            message += "; validation still improving at the last epoch; raise --epochs"
            if stopped == "budget":
                message += " or --max-updates"
    elif any(stopping._value(r) is not None for r in history):
        message = (
            f"stopped: {why}; no validation split: kept the last epoch ({p.epochs}); the validation "
            "shown is monitoring only"
        )
    else:
        message = f"stopped: {why}; no validation split: kept the last epoch ({p.epochs})"
    value = stopping._value(p.best) if p.best is not None and p.validated else None
    return {
        "best_epoch": p.best_epoch,
        "monitor": stopping.monitor if p.validated else None,
        "best_metric": value,
        "validated": p.validated,
        "stopped": stopped,
        "still_improving": still,
        "epochs_since_improvement": p.since_improvement,
        "updates": p.updates,
        "lr_drops": p.lr_drops,
        "message": message,
    }


@dataclass
class StepResult:
    """What one batch contributes: the loss to minimise, the number of items, and summed metrics.

    ``sums`` maps a history key (e.g. ``train_accuracy``) to the batch's sum (e.g. correct predictions);
    the epoch record holds the sum over batches divided by the items seen.
    """

    loss: Tensor
    items: int
    sums: Mapping[str, float] | None = None


def sgd(
    groups: Sequence[Mapping[str, Any]], *, momentum: float, nesterov: bool, weight_decay: float
) -> torch.optim.SGD:
    """SGD over parameter groups ``{"params": [...], "lr_scale": s}`` (``lr`` is set by :func:`fit`)."""
    groups = [{"lr_scale": 1.0, **g, "params": list(g["params"])} for g in groups]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=1.0, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def rng_state() -> dict[str, Any]:
    """torch, Python and numpy RNG states as plain containers (a checkpoint loads them weights-only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed torch, Python and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def training_state(optimizer: torch.optim.Optimizer, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``training`` field of a resumable checkpoint: optimiser and RNG state and the history."""
    return {"optimizer": optimizer.state_dict(), "rng": rng_state(), "history": list(history)}


def restore(optimizer: torch.optim.Optimizer, training: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Load a checkpoint's ``training`` field into ``optimizer`` and the RNGs; returns the history."""
    optimizer.load_state_dict(training["optimizer"])
    if "rng" in training:
        set_rng_state(training["rng"])
    return list(training.get("history", []))


def default_note(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def fit(
    *,
    stage: str,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    batches: Callable[[int], Iterable[Any]],
    step: Callable[[Any], StepResult],
    save: Callable[[int, dict[str, Any]], None],
    keep: Callable[[int, list[dict[str, Any]]], None] | None = None,
    stopping: Stopping | None = None,
    history: list[dict[str, Any]] | None = None,
    start_epoch: int = 0,
    train_mode: Callable[[], None] | None = None,
    validate: Callable[[], Mapping[str, Any]] | None = None,
    plot: Callable[[list[dict[str, Any]]], None] | None = None,
    plot_every_s: float = 60.0,
    rate_key: str = "items_per_s",
    progress: bool = True,
    note: Callable[[str], None] | None = None,
    postfix: Callable[[dict[str, float]], dict[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Train from ``start_epoch`` until :func:`stop_reason` says stop; checkpoint and redraw after epochs.

    Per epoch: every group's ``lr`` is set from ``schedule`` (times its ``lr_scale``, after the plateau
    drops :func:`track` replays from the history), ``train_mode()`` runs, then for each batch of
    ``batches(epoch)``: ``step(batch)`` → loss (refused if not finite), backward, optimiser step (the
    epoch ends early when the update budget is reached). The epoch's record holds ``epoch`` (1-based),
    ``lr`` (of the first group), ``train_loss`` and the ``sums`` of the steps (means over items),
    ``updates`` (optimiser updates so far), ``rate_key`` (items per second), ``seconds`` and what
    ``validate()`` returns. Then ``keep(epoch + 1, history)`` when this epoch is now the kept one (the
    caller writes its weights to the output), ``save(epoch + 1, training)`` with ``training`` from
    :func:`training_state` (the caller writes the resumable state), and ``plot(history)`` after the last
    epoch or when the last drawing is ``plot_every_s`` old. Nothing is trained when the history already
    says stop (a finished run rerun).

    Args:
        stage: Name in progress bars and log lines (``distill``, ``finetune``, ``train``).
        epochs: Maximum number of epochs (the last one, 1-based).
        optimizer: Built by :func:`sgd` (or any optimiser whose groups may carry ``lr_scale``).
        schedule: The learning-rate schedule.
        batches: ``epoch -> iterable of batches`` (the caller sets its sampler's epoch there).
        step: One batch's :class:`StepResult` (forward and loss; the loop does backward and the step).
        save: Writes the resumable checkpoint of a completed epoch.
        keep: Writes the weights of a completed epoch that is now the kept one (before ``save``, so a run
            killed between the two redoes the epoch and rewrites both).
        stopping: Which epoch is kept and when to stop (default: no validation metric, all epochs, the
            last kept).
        history: Records of epochs already trained (from :func:`restore`).
        start_epoch: First epoch to train (the resumed checkpoint's epoch).
        train_mode: Puts the model(s) in training mode (and frozen parts in eval mode).
        validate: Metrics added to each epoch's record.
        plot: Draws the training curves from the history.
        plot_every_s: Minimum seconds between two drawings before the last epoch.
        rate_key: History key of the items-per-second rate (``clips_per_s``, ``train_videos_per_s``).
        progress: Show a progress bar per epoch.
        note: Where the per-epoch line goes (default: ``tqdm.write`` to stderr).
        postfix: Progress-bar fields from the running means (default: the loss).

    Returns:
        The full history (resumed records first).

    Raises:
        DivergedError: The loss became NaN or infinite (lower the learning rate).
        ConfigError: An epoch yielded no batches.
    """
    from tqdm.auto import tqdm

    note = note or default_note
    stopping = stopping or Stopping(monitor="")
    history = list(history or [])
    drawn = time.monotonic()
    state = track(history, stopping, plateau=schedule.plateau)
    updates = state.updates
    epoch = start_epoch
    while epoch < epochs and stop_reason(state, stopping, epochs) is None:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(epoch, group.get("lr_scale", 1.0), state.lr_drops)
        lr = optimizer.param_groups[0]["lr"]
        if train_mode is not None:
            train_mode()
        t0 = time.perf_counter()
        items, loss_sum = 0, 0.0
        sums: dict[str, float] = {}
        desc = f"{stage} {epoch + 1}/{epochs}"
        bar = tqdm(batches(epoch), desc=desc, unit="batch", leave=False, disable=not progress)
        for batch in bar:
            result = step(batch)
            if not torch.isfinite(result.loss):
                raise DivergedError(
                    f"{stage}: the loss became {float(result.loss.detach())} in epoch {epoch + 1}; the "
                    f"learning rate is too high for this data: lower --lr (now {lr:g}) and train again"
                )
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            updates += 1
            items += result.items
            loss_sum += float(result.loss.detach()) * result.items
            for key, value in (result.sums or {}).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            means = {"loss": loss_sum / items, **{k: v / items for k, v in sums.items()}}
            bar.set_postfix(postfix(means) if postfix else {"loss": f"{means['loss']:.4f}"})
            if stopping.max_updates is not None and updates >= stopping.max_updates:
                break  # the budget ends this epoch here; it is validated and counts
        bar.close()
        if items == 0:
            raise ConfigError(
                f"{stage}: epoch {epoch + 1} had no training data; check the manifest and its split"
            )
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / items,
            **{k: v / items for k, v in sums.items()},
            "updates": updates,
            rate_key: items / seconds,
            "seconds": seconds,
        }
        if validate is not None:
            record.update(validate())
        history.append(record)
        state = track(history, stopping, plateau=schedule.plateau)
        if keep is not None and state.best_epoch == epoch + 1:
            keep(epoch + 1, history)
        save(epoch + 1, training_state(optimizer, history))
        epoch += 1
        done = stop_reason(state, stopping, epochs) is not None
        if plot is not None and (done or time.monotonic() - drawn >= plot_every_s):
            plot(history)
            drawn = time.monotonic()
        shown = ", ".join(
            _metric(k, v)
            for k, v in record.items()
            if k not in ("epoch", "seconds", "updates", rate_key) and v is not None
        )
        rate = f"{record[rate_key]:.1f} {rate_key.replace('_', ' ')}"
        kept = ""
        if state.validated:
            kept = (
                "; best so far"
                if state.best_epoch == epoch
                else f"; best epoch {state.best_epoch}, {state.since_improvement} without improvement"
            )
        note(f"{stage} epoch {epoch}/{epochs}: {shown}, {rate}{kept}")
    return history

"""One training loop for distillation, fine-tuning (:mod:`indexing.distill`) and skimming (:mod:`skim.train`).

:func:`fit` runs epochs of SGD with a step learning-rate schedule, a progress bar, a non-finite-loss check,
validation, an atomic checkpoint after every epoch (written by the caller's ``save``) and a training-curve
PNG. Resuming is :func:`restore`: the optimiser, the RNG state and the history of the last checkpoint, so
a resumed run continues exactly where an uninterrupted run would be (each epoch's data order is drawn from
``(seed, epoch)`` by the callers' samplers; the RNG state covers the DataLoader's own draws).

Learning rate of 0-based epoch ``e`` for a parameter group: ``lr * lr_scale * gamma ** (milestones <= e)``
(the paper's step schedule: distillation ÷10 at epochs 30 and 50, skimming ÷10 at 15 and 20). A group's
``lr_scale`` (default 1) lets a part train slower, e.g. the skimming classifier at 0.1x.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from indexing.errors import ConfigError


class DivergedError(ConfigError):
    """The training loss became NaN or infinite: the learning rate is too high for this data."""


@dataclass(frozen=True)
class Schedule:
    """Step learning-rate schedule (plain data; the callers' configs build it).

    Attributes:
        lr: Initial learning rate of a group with ``lr_scale`` 1.
        milestones: 0-based epochs from which the rate is multiplied by ``gamma`` once more.
        gamma: Decay factor.
    """

    lr: float
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def lr_at(self, epoch: int, scale: float = 1.0) -> float:
        """Learning rate of 0-based ``epoch`` for a group with ``lr_scale`` ``scale``."""
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones) * scale


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
    """The ``training`` field of a checkpoint: optimiser and RNG state and the history."""
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
    """Train from ``start_epoch`` to ``epochs``; checkpoint, and redraw the curve, after epochs.

    Per epoch: every group's ``lr`` is set from ``schedule`` (times its ``lr_scale``), ``train_mode()``
    runs, then for each batch of ``batches(epoch)``: ``step(batch)`` → loss (refused if not finite),
    backward, optimiser step. The epoch's record holds ``epoch`` (1-based), ``lr`` (of the first group),
    ``train_loss`` and the ``sums`` of the steps (means over items), ``rate_key`` (items per second),
    ``seconds`` and what ``validate()`` returns. Then ``save(epoch + 1, training)`` with ``training`` from
    :func:`training_state`, and ``plot(history)`` after the last epoch or when the last drawing is
    ``plot_every_s`` old.

    Args:
        stage: Name in progress bars and log lines (``distill``, ``finetune``, ``train``).
        epochs: Last epoch (exclusive, 0-based) to train.
        optimizer: Built by :func:`sgd` (or any optimiser whose groups may carry ``lr_scale``).
        schedule: The learning-rate schedule.
        batches: ``epoch -> iterable of batches`` (the caller sets its sampler's epoch there).
        step: One batch's :class:`StepResult` (forward and loss; the loop does backward and the step).
        save: Writes the checkpoint of a completed epoch.
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
    history = list(history or [])
    drawn = time.monotonic()
    for epoch in range(start_epoch, epochs):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(epoch, group.get("lr_scale", 1.0))
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
            items += result.items
            loss_sum += float(result.loss.detach()) * result.items
            for key, value in (result.sums or {}).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            means = {"loss": loss_sum / items, **{k: v / items for k, v in sums.items()}}
            bar.set_postfix(postfix(means) if postfix else {"loss": f"{means['loss']:.4f}"})
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
            rate_key: items / seconds,
            "seconds": seconds,
        }
        if validate is not None:
            record.update(validate())
        history.append(record)
        save(epoch + 1, training_state(optimizer, history))
        if plot is not None and (epoch + 1 == epochs or time.monotonic() - drawn >= plot_every_s):
            plot(history)
            drawn = time.monotonic()
        shown = ", ".join(
            f"{k.replace('_', ' ')} {v:.4g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
            for k, v in record.items()
            if k not in ("epoch", "seconds", rate_key) and v is not None
        )
        rate = f"{record[rate_key]:.1f} {rate_key.replace('_', ' ')}"
        note(f"{stage} epoch {epoch + 1}/{epochs}: {shown}, {rate}")
    return history

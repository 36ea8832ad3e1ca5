"""The shared training loop's adaptive length (indexing.training): best epoch, patience, plateau drops,
update budget, the end-of-run message, resume with other stopping settings, and the validation holdout.

The loop runs for real (SGD on one parameter); only the validation numbers are scripted per epoch, so each
rule is checked against a sequence whose right answer is known by hand. Real distillation, fine-tuning and
skimming runs are in test_distill.py and test_skim_commands.py.
"""

from __future__ import annotations

import pytest
import torch

from indexing.training import (
    STOP_REASONS,
    Schedule,
    StepResult,
    Stopping,
    fit,
    holdout,
    outcome,
    restore,
    sgd,
    track,
)


class Toy:
    """One parameter pulled towards 3 by SGD; validation returns the scripted ``acc``/``loss`` of each epoch.

    Records which epochs ``keep`` wrote (the kept weights) and the parameter value at each epoch's end.
    """

    def __init__(self, acc, loss=None, *, batches: int = 2, lr: float = 0.1):
        self.acc, self.loss, self.n = list(acc), loss, batches
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.opt = sgd([{"params": [self.w]}], momentum=0.9, nesterov=True, weight_decay=0.0)
        self.lr = lr
        self.epoch = -1
        self.kept: dict[int, float] = {}  # epoch -> w written by keep
        self.at_end: dict[int, float] = {}  # epoch -> w after the epoch
        self.state = None

    def batches(self, epoch):
        self.epoch = epoch
        return range(self.n)

    def step(self, _batch):
        return StepResult(((self.w - 3.0) ** 2).sum(), 1)

    def validate(self):
        e = self.epoch
        return {"val_accuracy": self.acc[e], "val_loss": None if self.loss is None else self.loss[e]}

    def save(self, epoch, state):
        self.at_end[epoch] = float(self.w.detach())
        self.state = state

    def keep(self, epoch, _history):
        self.kept[epoch] = float(self.w.detach())

    def run(self, stopping, *, epochs, plateau=0, history=None, start=0, validate=True):
        return fit(
            stage="toy", epochs=epochs, optimizer=self.opt, schedule=Schedule(lr=self.lr, plateau=plateau),
            stopping=stopping, batches=self.batches, step=self.step, save=self.save, keep=self.keep,
            history=history, start_epoch=start, validate=self.validate if validate else None,
            progress=False, note=lambda _l: None,
        )  # fmt: skip


ACC = Stopping(monitor="val_accuracy", mode="max", tie="val_loss", patience=3)


def test_patience_stops_at_the_right_epoch_and_keeps_the_first_best():
    # improvements at epochs 1 and 2; 3 ties (no loss), 4-5 are worse: 3 epochs without improvement after 5
    toy = Toy([0.5, 0.6, 0.6, 0.55, 0.59, 0.6, 0.9])
    history = toy.run(ACC, epochs=7)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    result = outcome(history, ACC, epochs=7)
    assert result["stopped"] == "patience" and result["best_epoch"] == 2 and result["best_metric"] == 0.6
    assert result["epochs_since_improvement"] == 3 and not result["still_improving"]
    assert "stopped: patience (3 epochs without improvement" in result["message"]
    assert "best epoch 2 of 5 (val accuracy 0.6)" in result["message"]
    # the kept weights are those at the end of the best epoch, written when it was trained, never later
    assert sorted(toy.kept) == [1, 2] and toy.kept[2] == toy.at_end[2] != toy.at_end[5]
    assert set(STOP_REASONS) >= {result["stopped"]}


def test_ties_are_broken_by_the_validation_loss_then_the_earlier_epoch():
    history = Toy([0.5, 0.5, 0.5, 0.5], [1.0, 0.9, 0.95, 0.9]).run(ACC, epochs=4)
    p = track(history, ACC)
    assert p.best_epoch == 2 and p.since_improvement == 2  # 0.9 again at epoch 4: the earlier one stays
    # a loss lower by less than min_delta (absolute) picks the epoch but does not reset patience
    small = Toy([0.5, 0.5], [1.0, 0.9995]).run(ACC, epochs=2)
    assert track(small, ACC).best_epoch == 2 and track(small, ACC).since_improvement == 1


def test_a_falling_validation_loss_keeps_training_and_nan_is_never_kept():
    # accuracy flat, then worse, while the loss falls: still learning; patience counts from the last fall
    history = Toy([0.5, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.9], [1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7, 0.1]).run(
        ACC, epochs=9
    )
    assert len(history) == 7 and outcome(history, ACC, epochs=9)["stopped"] == "patience"
    assert track(history, ACC).best_epoch == 2  # kept by accuracy first, the loss only breaks its ties
    nan = Toy([float("nan"), 0.5, float("nan"), 0.4]).run(ACC, epochs=4)
    p = track(nan, ACC)
    assert p.best_epoch == 2 and p.since_improvement == 2


def test_min_delta_is_relative_for_a_loss_monitor():
    l1 = Stopping(monitor="val_accuracy", mode="min", patience=2, min_delta=0.01)
    history = Toy([1.0, 0.995, 0.98, 0.979, 0.975]).run(l1, epochs=5)  # -0.5%: no; -2%: yes; then < 1%
    assert len(history) == 5 and track(history, l1).best_epoch == 5
    assert outcome(history, l1, epochs=5)["stopped"] == "patience"  # epochs 4-5 are within 1% of epoch 3


def test_plateau_drops_the_learning_rate_and_patience_counts_on():
    stopping = Stopping(monitor="val_accuracy", patience=0)
    history = Toy([0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.6]).run(stopping, epochs=7, plateau=2)
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    # drops after epochs 3 and 5 (2 epochs since the improvement at 1, then since the drop); 7 improved
    assert track(history, stopping, plateau=2).lr_drops == 2
    assert outcome(history, stopping, epochs=7, plateau=2)["lr_drops"] == 2


def test_patience_and_plateau_drops_wait_for_min_updates():
    # flat validation: without a warm-up, a drop after epoch 2 and a stop after 3; with 8 updates of
    # warm-up (2 per epoch: reached at epoch 4) both count from there, so the stop comes 4 epochs later
    flat = [0.5] * 12
    plain = Stopping(monitor="val_accuracy", patience=3)
    history = Toy(flat).run(plain, epochs=12, plateau=2)
    assert len(history) == 4 and track(history, plain, plateau=2).lr_drops == 1
    warm = Stopping(monitor="val_accuracy", patience=3, min_updates=8)
    history = Toy(flat).run(warm, epochs=12, plateau=2)
    p = track(history, warm, plateau=2)
    assert len(history) == 7 and p.lr_drops == 1 and p.since_improvement == 6 and p.patience_count == 3
    assert [h["lr"] for h in history] == pytest.approx([0.1] * 6 + [0.01])  # the drop after epoch 6
    assert "patience (3 epochs without improvement" in outcome(history, warm, epochs=12, plateau=2)["message"]


def test_budget_of_updates_ends_mid_epoch_and_is_said():
    stopping = Stopping(monitor="val_accuracy", patience=5, max_updates=7)
    history = Toy([0.1, 0.2, 0.3, 0.4], batches=3).run(stopping, epochs=4)
    assert [h["updates"] for h in history] == [3, 6, 7]  # epoch 3 stops after its first batch
    result = outcome(history, stopping, epochs=4)
    assert result["stopped"] == "budget" and result["updates"] == 7 and result["still_improving"]
    assert "budget of 7 optimiser updates (7 done)" in result["message"]
    assert "raise --epochs or --max-updates" in result["message"]


def test_still_improving_at_the_end_says_raise_epochs():
    history = Toy([0.1, 0.2, 0.3]).run(ACC, epochs=3)
    result = outcome(history, ACC, epochs=3)
    assert result["stopped"] == "max_epochs" and result["still_improving"] and result["best_epoch"] == 3
    assert result["message"].endswith("validation still improving at the last epoch; raise --epochs")
    flat = Toy([0.3, 0.2, 0.1]).run(ACC, epochs=3)
    assert not outcome(flat, ACC, epochs=3)["still_improving"]
    assert "still improving" not in outcome(flat, ACC, epochs=3)["message"]


def test_without_validation_the_last_epoch_is_kept_and_said():
    toy = Toy([0.9, 0.1, 0.1])
    history = toy.run(ACC, epochs=3, validate=False)
    result = outcome(history, ACC, epochs=3)
    assert result["best_epoch"] == 3 and result["stopped"] == "max_epochs" and not result["validated"]
    assert "no validation split: kept the last epoch (3)" in result["message"]
    assert sorted(toy.kept) == [1, 2, 3]
    # validation that is monitoring only (the training videos): recorded, but neither kept nor stopping
    monitor = Stopping(monitor="val_accuracy", patience=1, keep_best=False)
    watched = Toy([0.9, 0.1, 0.1])
    history = watched.run(monitor, epochs=3)
    assert len(history) == 3 and outcome(history, monitor, epochs=3)["best_epoch"] == 3
    assert "monitoring only" in outcome(history, monitor, epochs=3)["message"]


def test_resume_decides_as_the_uninterrupted_run_and_may_raise_the_limits():
    acc = [0.5, 0.6, 0.55, 0.55, 0.7, 0.6, 0.6, 0.6, 0.6]
    straight = Toy(acc)
    full = straight.run(ACC, epochs=9, plateau=2)
    assert len(full) == 8 and outcome(full, ACC, epochs=9)["stopped"] == "patience"

    # stop after 6 epochs (max), then resume from the saved state with the real maximum
    first = Toy(acc)
    part = first.run(ACC, epochs=6, plateau=2)
    assert outcome(part, ACC, epochs=6)["stopped"] == "max_epochs"
    second = Toy(acc)
    second.w.data.fill_(first.at_end[6])
    history = restore(second.opt, first.state)
    resumed = second.run(ACC, epochs=9, plateau=2, history=history, start=6)
    strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds" and "per_s" not in k} for h in hs]  # noqa: E731
    assert strip(resumed) == strip(full)  # lr drops and the patience count carried over
    assert second.at_end[8] == straight.at_end[8]
    # a finished run reruns nothing; a higher patience continues it
    again = Toy(acc)
    assert again.run(ACC, epochs=9, history=list(full), start=8) == full and again.at_end == {}
    more = Toy(acc).run(Stopping(monitor="val_accuracy", patience=4), epochs=9, history=list(full), start=8)
    assert len(more) == 9


def test_holdout_is_stratified_stable_and_skips_small_classes():
    ids = [f"v{i:03d}" for i in range(40)]
    labels = ["a"] * 20 + ["b"] * 17 + ["c"] * 3
    held = holdout(ids, labels)
    by = {lab: sum(1 for v in held if labels[ids.index(v)] == lab) for lab in "abc"}
    assert by == {"a": 3, "b": 3, "c": 0}  # 15% per class, rounded; a class of 3 keeps all to train
    assert held == [v for v in ids if v in set(held)]  # in the given order
    assert holdout(list(reversed(ids)), list(reversed(labels))) == list(reversed(held))  # order-free choice
    assert holdout(ids[:20] + ["new"], labels[:20] + ["a"]) != [] and holdout(["x", "y"], ["a", "b"]) == []


def test_stopping_refuses_bad_values():
    from indexing.errors import ConfigError

    for kwargs, match in (
        ({"patience": -1}, "patience=-1"),
        ({"min_delta": -1.0}, "min_delta"),
        ({"max_updates": 0}, "max_updates=0"),
        ({"mode": "up"}, "mode='up'"),
    ):
        with pytest.raises(ConfigError, match=match):
            Stopping(monitor="val_accuracy", **kwargs)

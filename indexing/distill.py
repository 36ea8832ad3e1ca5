"""ImgAud2Vid training: distil the clip teacher into image + audio students, then fine-tune a classifier.

Both stages run the shared loop (:func:`indexing.training.fit`): the output file (see
:mod:`indexing.checkpoint`) always holds the weights of the best epoch by validation (distillation: the
lowest validation L1; fine-tuning: the highest validation accuracy, ties broken by the lower validation
loss, then the earlier epoch), and ``OUT.resume`` (:func:`indexing.training.resume_path`) the last epoch's
weights with the optimiser and RNG state. Training stops after ``patience`` epochs without improvement, at
``epochs`` (a maximum) or at the ``max_updates`` budget; the learning rate drops ÷10 after
``lr_patience`` epochs without improvement (or at fixed ``milestones``, the paper's schedule). Rerunning
with the same output path and config continues after the last completed epoch, and gives the same weights
as an uninterrupted run (each epoch's data is drawn from ``(seed, epoch)`` by
:class:`pipeline.clips.ClipDataset`); ``epochs``, ``patience`` and ``max_updates`` may change between the
runs (raise ``epochs`` when validation was still improving). Without a validation split (validation on
the training videos), the last epoch is kept. A training-curve PNG is drawn beside the checkpoint
(``students.pt`` → ``students-curve.png``) after the last epoch and at most once a minute before.

Distillation loss: ``l1_weight * |z_IA - teacher(clip)|_1`` (mean over dims and batch) plus, when
``kl_weight > 0``, ``kl_weight * T^2 * KL(softmax(fc(teacher)/T) || softmax(fc(z_IA)/T))`` where ``fc``
is the teacher's own frozen classifier: z_IA is trained to stand in for the teacher descriptor, so the
teacher's head scores it directly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from indexing import checkpoint as ckpt_io
from indexing import parallel, training
from indexing.errors import CheckpointError, ConfigError
from indexing.frontend import clips_to_tensor, frames_to_tensor, log_mel
from indexing.models import Students, Teacher

log = logging.getLogger(__name__)

AUDIO_BASELINES = ("mean", "zero")


# Settings that only decide when to stop: they may change when a run is resumed (raise --epochs).
STOP_FIELDS = ("epochs", "patience", "max_updates")


@dataclass(frozen=True)
class _TrainConfig:
    epochs: int
    patience: int
    lr_patience: int
    batch_size: int = 16
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = ()  # 0-based epochs from which the lr is multiplied by lr_decay once more
    lr_decay: float = 0.1
    min_delta: float = 1e-3
    max_updates: int | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1; the paper uses 16")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0; the paper uses 1e-3")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1); the paper uses 0.9")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0; set momentum=0.9 or nesterov=False")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ConfigError(
                f"milestones={list(self.milestones)} must be increasing epochs >= 1, e.g. 30,50 (the paper's)"
            )
        if self.lr_patience < 0:
            raise ConfigError(f"lr_patience={self.lr_patience} must be >= 0 (0: no drops on plateaus)")
        self.stopping()  # patience, min_delta, max_updates
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr_decay={self.lr_decay} must be in (0, 1]; the paper uses 0.1")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device={self.device!r} must be cpu or cuda[:N]")

    def stopping(self) -> training.Stopping:
        """Which epoch is kept and when training stops (:class:`indexing.training.Stopping`)."""
        raise NotImplementedError

    def schedule(self) -> training.Schedule:
        """The learning-rate schedule: drops on plateaus, at the milestones, or both."""
        return training.Schedule(
            lr=self.lr, milestones=self.milestones, gamma=self.lr_decay, plateau=self.lr_patience
        )


@dataclass(frozen=True)
class DistillConfig(_TrainConfig):
    """Distillation settings: the paper's SGD (Nesterov, lr 1e-3, batch 16, at most its 60 epochs), stopping
    after 10 epochs without a lower validation L1, lr ÷10 after 4 (two drops before a stop, as the paper's
    two). The paper's fixed recipe: ``patience=0, lr_patience=0, milestones=(30, 50)``.

    Attributes:
        epochs: Maximum training epochs.
        patience: Stop after this many epochs without improvement of the validation L1 (0: never).
        lr_patience: Multiply the lr by ``lr_decay`` after this many epochs without improvement (0: never).
        batch_size: Clips per batch (must equal the train loader's).
        lr, momentum, nesterov, weight_decay: SGD settings.
        milestones: 0-based epochs from which the lr is multiplied by ``lr_decay`` once more.
        lr_decay: Factor of each drop.
        min_delta: Smallest relative decrease of the validation L1 that counts as an improvement.
        max_updates: Budget of optimiser updates (None: none).
        l1_weight: Weight of the L1 loss to the teacher descriptor.
        kl_weight: Weight of the KL term between teacher and student class distributions (0: off).
        kl_temperature: Softmax temperature of the KL term.
        device: ``cpu`` or ``cuda[:N]``.
        seed: Seed of the RNGs at the first epoch.
    """

    epochs: int = 60
    patience: int = 10
    lr_patience: int = 4
    l1_weight: float = 1.0
    kl_weight: float = 0.0
    kl_temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_weight < 0 or self.kl_weight < 0 or self.l1_weight + self.kl_weight == 0:
            raise ConfigError(
                f"l1_weight={self.l1_weight}, kl_weight={self.kl_weight}: both must be >= 0 and one > 0"
            )
        if not self.kl_temperature > 0:
            raise ConfigError(f"kl_temperature={self.kl_temperature} must be > 0; use 1")

    def stopping(self) -> training.Stopping:
        return training.Stopping(
            monitor="val_l1",
            mode="min",
            patience=self.patience,
            min_delta=self.min_delta,
            max_updates=self.max_updates,
        )


@dataclass(frozen=True)
class FinetuneConfig(_TrainConfig):
    """Fine-tuning settings: cross-entropy of the classifier on z_IA over labelled clips; at most 40 epochs,
    stopping after 8 without a better validation accuracy or loss, lr ÷10 after 3; the kept epoch has the
    best validation accuracy (ties: the lower validation loss).

    Attributes:
        epochs: Maximum training epochs.
        freeze_students: Train only the classifier (students stay in eval mode: BatchNorm frozen).
        min_delta: Smallest accuracy gain over its best, or validation-loss decrease under its lowest,
            that counts as an improvement.
        (others as in :class:`DistillConfig`)
    """

    epochs: int = 40
    patience: int = 8
    lr_patience: int = 3
    freeze_students: bool = False

    def stopping(self) -> training.Stopping:
        return training.Stopping(
            monitor="val_accuracy",
            mode="max",
            tie="val_loss",
            patience=self.patience,
            min_delta=self.min_delta,
            max_updates=self.max_updates,
        )


# ---- shared loop pieces --------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use --device cpu")
    return torch.device(name)


def _config_dict(config: _TrainConfig) -> dict[str, Any]:
    d = asdict(config)
    d["milestones"] = list(d["milestones"])
    return d


def outcome(history: list[dict[str, Any]], config: _TrainConfig, *, keep_best: bool = True) -> dict[str, Any]:
    """How a distillation or fine-tuning run ended (:func:`indexing.training.outcome`): the kept epoch,
    why it stopped, whether validation was still improving, and one line saying so."""
    stopping = config.stopping() if keep_best else replace(config.stopping(), keep_best=False)
    return training.outcome(history, stopping, epochs=config.epochs, plateau=config.lr_patience)


def curve_path(out_path: str | Path) -> Path:
    """Where the training-curve PNG of a checkpoint goes: ``students.pt`` → ``students-curve.png``."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}-curve.png")


def _plot(history: list[dict[str, float]], png: Path, *, val_key: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title=title)
    ax_val.plot(epochs, [h[val_key] for h in history], marker="o", color="tab:orange")
    ax_val.set(xlabel="epoch", ylabel=val_key.replace("_", " "))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _resume(
    out_path: Path, *, stage: str, config: _TrainConfig, students: Students, extra: dict[str, Any]
) -> dict[str, Any] | None:
    """The checkpoint to continue from (``OUT.resume``: the last epoch), or None for a fresh run; refuse
    one from another run (the stopping settings ``epochs``, ``patience``, ``max_updates`` may differ)."""
    state_path = training.resume_path(out_path)
    if not out_path.exists() and not state_path.exists():
        return None
    if not out_path.exists():  # OUT is written before OUT.resume in every epoch: it was removed
        raise CheckpointError(
            f"{state_path} exists but {out_path}, which holds the kept (best) epoch, is missing, so the run "
            f"cannot be continued without losing it; delete {state_path} to start over, or pass a new "
            "output path"
        )
    if out_path.exists():
        found_stage = ckpt_io.load_checkpoint(out_path, kind="students")["extra"].get("stage")
        if found_stage != stage:
            raise CheckpointError(
                f"{out_path} holds a {found_stage!r} checkpoint, not {stage!r}; pass a new output path"
            )
    if state_path.exists():
        ckpt = ckpt_io.load_checkpoint(state_path, kind="students")
    else:  # written before OUT.resume existed: OUT itself held the optimiser state
        ckpt = ckpt_io.load_checkpoint(out_path, kind="students")
        if "optimizer" not in ckpt["training"]:
            raise CheckpointError(
                f"{out_path} holds finished {stage} weights but its resumable state {state_path} is missing, "
                "so it cannot be continued; pass a new output path (or restore the .resume file)"
            )
    found_stage = ckpt["extra"].get("stage")
    if found_stage != stage:
        raise CheckpointError(
            f"{state_path} holds a {found_stage!r} checkpoint, not {stage!r}; pass a new output path"
        )
    want, have = _config_dict(config), dict(ckpt["config"])
    for key in ("device", *STOP_FIELDS):  # a run may move between devices, and stop later or sooner
        want.pop(key), have.pop(key, None)
    diff = [f"{k}: {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]
    for key in ("teacher_sha256", "parent_sha256", "classes"):
        if key in extra and ckpt["extra"].get(key) != extra[key]:
            diff.append(f"{key} differs")
    if ckpt["models"] != students.specs():
        diff.append(f"models: {ckpt['models']} -> {students.specs()}")
    if diff:
        raise CheckpointError(
            f"{out_path} is from a run with other settings ({'; '.join(diff)}); rerun with the same "
            "options to resume (--epochs, --patience and --max-updates may change), or pass a new output path"
        )
    return ckpt


def _keep_best(
    out_path: Path, students: Students, history: list[dict[str, Any]], result: dict[str, Any], *, where: str
) -> None:
    """Load the kept epoch's weights from ``out_path`` into ``students`` and rewrite the file with the
    whole history and how the run ended (the file was written when that epoch was trained)."""
    ckpt = ckpt_io.load_checkpoint(out_path, kind="students")
    if "optimizer" in ckpt["training"] and not training.resume_path(out_path).exists():
        log.warning("%s was written before l2l kept the best epoch: it holds the last epoch", out_path)
        return
    if int(ckpt["epoch"]) != result["best_epoch"]:
        raise CheckpointError(
            f"{out_path} holds epoch {ckpt['epoch']}, but the history of {where} keeps epoch "
            f"{result['best_epoch']}; was the file replaced during training? Pass a new output path"
        )
    ckpt_io.load_state_checked(students, ckpt["state_dict"], where=str(out_path))
    fields = {k: ckpt[k] for k in ("models", "state_dict", "epoch", "config", "extra")}
    ckpt_io.save_checkpoint(
        out_path,
        kind="students",
        training={"history": list(history), "outcome": dict(result)},
        **fields,
    )


def _set_epoch(loader, epoch: int) -> None:
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


class _Forward:
    """What the loss calls to run the students: the students, or their DistributedDataParallel wrapper."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args: Any) -> Any:
        return self.module(*args)


def _run(
    *,
    stage: str,
    ctx: parallel.Context,
    forward: _Forward,
    students: Students,
    params: list[torch.nn.Parameter],
    train_loader,
    config: _TrainConfig,
    out_path: str | Path,
    extra: dict[str, Any],
    batch_loss,
    validate,
    val_key: str,
    set_train_mode,
    progress: bool = True,
    keep_best: bool = True,
) -> list[dict[str, float]]:
    """Distillation and fine-tuning through the shared loop (:func:`indexing.training.fit`); under
    ``torchrun``, one part of every global batch per process (:mod:`indexing.parallel`). Afterwards the
    students hold the kept epoch's weights (rank 0; the others keep the last epoch's)."""
    out_path = Path(out_path)
    if getattr(train_loader, "batch_size", config.batch_size) != config.batch_size:
        raise ConfigError(
            f"train loader batch size {train_loader.batch_size} != config.batch_size={config.batch_size}"
        )
    train_loader = parallel.rank_loader(train_loader, ctx)
    opt = training.sgd(
        [{"params": params}],
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    stopping = config.stopping() if keep_best else replace(config.stopping(), keep_best=False)
    ckpt = _resume(out_path, stage=stage, config=config, students=students, extra=extra)
    if ckpt is None:
        training.seed_all(config.seed)
        history: list[dict[str, Any]] = []
        start = 0
    else:
        ckpt_io.load_state_checked(students, ckpt["state_dict"], where=str(out_path))
        history = training.restore(opt, ckpt["training"])
        start = int(ckpt["epoch"])
        if (
            training.stop_reason(
                training.track(history, stopping, plateau=config.lr_patience), stopping, config.epochs
            )
            is None
        ):
            log.info("resuming %s from %s after epoch %d", stage, training.resume_path(out_path), start)
    forward.module = parallel.wrap(students, ctx)  # the same parameters: `opt` keeps working

    def batches(epoch: int):
        _set_epoch(train_loader, epoch)
        return train_loader

    def step(batch) -> training.StepResult:
        loss, n = batch_loss(batch)
        return training.StepResult(*parallel.global_loss(loss, n, ctx))

    def write(path: Path, epoch: int, state: dict[str, Any]) -> None:
        if ctx.main:
            ckpt_io.save_checkpoint(
                path,
                kind="students",
                models=students.specs(),
                state_dict=students.state_dict(),
                epoch=epoch,
                config=_config_dict(config),
                training=state,
                extra=dict(extra, stage=stage),
            )

    history = training.fit(
        stage=stage,
        epochs=config.epochs,
        optimizer=opt,
        schedule=config.schedule(),
        stopping=stopping,
        batches=batches,
        step=step,
        save=lambda epoch, state: write(training.resume_path(out_path), epoch, state),
        keep=lambda epoch, h: write(out_path, epoch, {"history": list(h)}),
        history=history,
        start_epoch=start,
        train_mode=set_train_mode,
        validate=lambda: validate(),
        plot=(lambda h: _plot(h, curve_path(out_path), val_key=val_key, title=f"{stage}: {out_path.name}"))
        if ctx.main
        else None,
        rate_key="clips_per_s",
        progress=ctx.main and progress,
        note=None if ctx.main else (lambda _line: None),
    )
    if ctx.main and history:
        result = training.outcome(history, stopping, epochs=config.epochs, plateau=config.lr_patience)
        _keep_best(out_path, students, history, result, where=str(training.resume_path(out_path)))
    return history


def _inputs(batch: dict[str, Tensor], dev: torch.device) -> tuple[Tensor, Tensor]:
    frames = frames_to_tensor(batch["frames"].to(dev, non_blocking=True))  # (B, 3, 112, 112)
    if "mel" in batch:  # from a store: its inputs set, or log_mel of the decoded audio in the loader
        return frames, batch["mel"].to(dev, non_blocking=True)  # (B, 1, 101, 40)
    mel = log_mel(batch["audio"].to(dev, non_blocking=True))  # (B, 1, 101, 40)
    return frames, mel


def _target(batch: dict[str, Tensor], teacher: Teacher | None, dev: torch.device) -> Tensor:
    """The teacher descriptor of each clip: stored (``target``, the teacher never runs) or computed."""
    if "target" in batch:
        return batch["target"].to(dev, non_blocking=True)  # (B, 512)
    if teacher is None:
        raise ConfigError("batches carry no stored teacher target and no teacher was given; pass a teacher")
    with torch.no_grad():
        return teacher(clips_to_tensor(batch["clip"].to(dev, non_blocking=True)))  # (B, 512)


# ---- distillation --------------------------------------------------------------------------------


def distill(
    students: Students,
    teacher: Teacher | None,
    train_loader,
    val_loader,
    config: DistillConfig,
    out_path: str | Path,
    *,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
    keep_best: bool = True,
) -> list[dict[str, float]]:
    """Train the students' z_IA to match the frozen teacher's clip descriptor (L1, optional KL).

    Args:
        students: Students to train in place (image, audio and Ψ; a classifier, if any, is untouched).
        teacher: Frozen teacher; ``None`` when the batches carry stored teacher targets
            (:class:`pipeline.clips.StoreClipDataset`) and ``kl_weight`` is 0 (the KL term needs its fc).
        train_loader: Batches of :class:`pipeline.clips.ClipDataset` items with clips (or targets).
        val_loader: Same, for the per-epoch validation L1 (``uniform`` sampling recommended); None: no
            validation (the last epoch is kept).
        config: Distillation settings.
        out_path: Checkpoint file of the best epoch (lowest validation L1); ``OUT.resume`` holds the last
            epoch's resumable state. An existing pair from the same run is resumed, one from another run is
            refused.
        extra: Plain metadata stored in the checkpoint (e.g. ``teacher`` name/path,
            ``teacher_sha256``: a resume with another teacher is refused).
        progress: Show a progress bar per epoch on stderr (rank 0 only).
        keep_best: False when ``val_loader`` holds the training videos (no validation split): the
            validation is then monitoring only and the last epoch is kept.

    Returns:
        History: one dict per epoch with ``epoch``, ``train_loss``, ``val_l1``, ``lr``, ``updates``,
        ``clips_per_s``, ``seconds`` (:func:`outcome` says which epoch was kept and why training stopped).
        The students end with the kept epoch's weights.

    Raises:
        ValueError: Bad device, mismatched batch size, an incompatible existing checkpoint, no clips.
    """
    _device(config.device)  # refused before joining a process group
    ctx = parallel.context(config.device)  # under torchrun: this process's rank and device
    dev = _device(ctx.device)
    students.to(dev)
    if teacher is not None:
        teacher.to(dev)
    elif config.kl_weight > 0:
        raise ConfigError("the KL term scores with the teacher's fc: give the teacher, or kl_weight=0")
    extra = dict(extra or {})
    temp = config.kl_temperature
    forward = _Forward(students)

    def batch_loss(batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        frames, mel = _inputs(batch, dev)
        target = _target(batch, teacher, dev)  # (B, 512)
        z_ia = forward(frames, mel)["z_ia"]  # (B, 512)
        loss = config.l1_weight * F.l1_loss(z_ia, target)
        if config.kl_weight > 0:
            log_p_student = F.log_softmax(teacher.logits(z_ia) / temp, dim=1)  # (B, C)
            log_p_teacher = F.log_softmax(teacher.logits(target) / temp, dim=1)  # (B, C)
            kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
            loss = loss + config.kl_weight * temp**2 * kl
        return loss, len(z_ia)

    def train_mode() -> None:
        students.train()

    def validate() -> dict[str, float | None]:
        if val_loader is None:
            return {"val_l1": None}
        return {"val_l1": float(np.mean(_clip_l1(students, teacher, val_loader, dev)["l1_image_audio"]))}

    params = [p for m in (students.image, students.audio, students.fusion) for p in m.parameters()]
    return _run(
        stage="distill",
        ctx=ctx,
        forward=forward,
        students=students,
        params=params,
        train_loader=train_loader,
        config=config,
        out_path=out_path,
        extra=extra,
        batch_loss=batch_loss,
        validate=validate,
        val_key="val_l1",
        set_train_mode=train_mode,
        progress=progress,
        keep_best=keep_best,
    )


@torch.no_grad()
def _clip_l1(
    students: Students,
    teacher: Teacher | None,
    loader,
    dev: torch.device,
    *,
    audio_baseline: str | None = None,
) -> dict[str, np.ndarray]:
    """Per-clip L1 (mean over dims) of z_IA to the teacher descriptor, with clip ids.

    With ``audio_baseline``, also the image-only L1: Ψ(z_I, ā) where ā is the mean audio embedding of the
    evaluated clips (``mean``) or zeros (``zero``).
    """
    _set_epoch(loader, 0)
    was_training = students.training
    students.eval()
    z_i, z_a, z_ia, target, video, step, time_s = [], [], [], [], [], [], []
    for batch in loader:
        frames, mel = _inputs(batch, dev)
        out = students(frames, mel)
        z_i.append(out["z_i"])
        z_a.append(out["z_a"])
        z_ia.append(out["z_ia"])
        target.append(_target(batch, teacher, dev))  # (B, 512)
        video.append(batch["video"])
        step.append(batch["step"])
        time_s.append(batch["time_s"])
    students.train(was_training)
    if not z_ia:
        raise ConfigError("the evaluation loader yielded no clips; check the manifest and its split")
    target_t = torch.cat(target)  # (N, 512)
    result = {
        "l1_image_audio": (torch.cat(z_ia) - target_t).abs().mean(1).cpu().numpy(),  # (N,)
        "video": torch.cat(video).numpy(),
        "step": torch.cat(step).numpy(),
        "time_s": torch.cat(time_s).numpy(),
    }
    if audio_baseline is not None:
        z_a_t = torch.cat(z_a)  # (N, 512)
        fill = z_a_t.mean(0, keepdim=True) if audio_baseline == "mean" else torch.zeros_like(z_a_t[:1])
        image_only = students.fusion(torch.cat(z_i), fill.expand_as(z_a_t))  # (N, 512)
        result["l1_image_only"] = (image_only - target_t).abs().mean(1).cpu().numpy()
    return result


def distill_report(
    students: Students,
    teacher: Teacher | None,
    loader,
    *,
    device: str = "cpu",
    audio_baseline: str = "mean",
    top_k: int = 5,
) -> dict[str, Any]:
    """How much the audio student helps: per-clip L1 to the teacher, image-only vs image+audio.

    Image-only is the same Ψ with the audio embedding replaced by a constant, so nothing clip-specific
    about the sound reaches it: by default the mean audio embedding over the evaluated clips (``mean``,
    keeps Ψ's input in distribution), or zeros (``zero``). ``audio_gain = l1_image_only - l1_image_audio``
    is positive where the clip's audio brought z_IA closer to the teacher.

    Args:
        students: Distilled students.
        teacher: The teacher they were distilled from (``None`` when the loader carries stored targets).
        loader: Batches of :class:`pipeline.clips.ClipDataset` items with clips.
        device: ``cpu`` or ``cuda[:N]``.
        audio_baseline: ``mean`` or ``zero``.
        top_k: Clips listed in ``most_helped`` and ``least_helped``.

    Returns:
        ``summary`` (clip count, mean L1 of both, mean gain, fraction of clips where audio helps),
        ``clips`` (one dict per clip: ``video_id``, ``step``, ``time_s``, ``l1_image_audio``,
        ``l1_image_only``, ``audio_gain``), ``most_helped`` and ``least_helped`` (top_k clips each).

    Raises:
        ValueError: Unknown audio baseline or an empty loader.
    """
    if audio_baseline not in AUDIO_BASELINES:
        raise ConfigError(
            f"Unknown audio baseline {audio_baseline!r}; available: {', '.join(AUDIO_BASELINES)}"
        )
    dev = _device(device)
    students.to(dev)
    if teacher is not None:
        teacher.to(dev)
    r = _clip_l1(students, teacher, loader, dev, audio_baseline=audio_baseline)
    gain = r["l1_image_only"] - r["l1_image_audio"]
    dataset = loader.dataset
    clips = [
        {
            "video_id": dataset.video_id(int(v)) if hasattr(dataset, "video_id") else str(int(v)),
            "step": int(s),
            "time_s": round(float(t), 4),
            "l1_image_audio": float(a),
            "l1_image_only": float(i),
            "audio_gain": float(g),
        }
        for v, s, t, a, i, g in zip(
            r["video"], r["step"], r["time_s"], r["l1_image_audio"], r["l1_image_only"], gain, strict=True
        )
    ]
    order = np.argsort(-gain, kind="stable")
    return {
        "summary": {
            "clips": len(clips),
            "audio_baseline": audio_baseline,
            "mean_l1_image_audio": float(r["l1_image_audio"].mean()),
            "mean_l1_image_only": float(r["l1_image_only"].mean()),
            "mean_audio_gain": float(gain.mean()),
            "fraction_audio_helps": float((gain > 0).mean()),
        },
        "clips": clips,
        "most_helped": [clips[i] for i in order[:top_k]],
        "least_helped": [clips[i] for i in order[::-1][:top_k]],
    }


# ---- fine-tuning ---------------------------------------------------------------------------------


def finetune(
    students: Students,
    train_loader,
    val_loader,
    config: FinetuneConfig,
    out_path: str | Path,
    *,
    classes: list[str],
    extra: dict[str, Any] | None = None,
    progress: bool = True,
    keep_best: bool = True,
) -> list[dict[str, float]]:
    """Fine-tune a classifier on z_IA (and the students unless frozen) with cross-entropy.

    A ``classifier_linear`` with ``len(classes)`` outputs is attached (seeded) when the students have
    none or one of another size.

    Args:
        students: Distilled students, trained in place.
        train_loader: Labelled :class:`pipeline.clips.ClipDataset` batches (clips not needed).
        val_loader: Same, for the per-epoch validation accuracy (clips whose label is not a known
            class count as wrong) and loss (over the clips with a known class); None: no validation.
        config: Fine-tuning settings.
        out_path: Checkpoint file of the best epoch (highest validation accuracy, ties: lower validation
            loss, then the earlier epoch), resumable as in :func:`distill`; ``classes`` are stored in it.
        classes: Class names, index = target.
        extra: Plain metadata stored in the checkpoint (e.g. ``parent_sha256`` of the distilled
            students).
        progress: Show a progress bar per epoch on stderr (rank 0 only).
        keep_best: As in :func:`distill`.

    Returns:
        History: one dict per epoch with ``epoch``, ``train_loss``, ``val_accuracy``, ``val_loss``, ``lr``,
        ``updates``, ``clips_per_s``, ``seconds``. The students end with the kept epoch's weights.

    Raises:
        ValueError: Fewer than 2 classes, bad device, mismatched batch size, incompatible checkpoint.
    """
    if len(classes) < 2:
        raise ConfigError(f"fine-tuning needs at least 2 classes, got {classes}; check the manifest labels")
    _device(config.device)  # refused before joining a process group
    ctx = parallel.context(config.device)  # under torchrun: this process's rank and device
    dev = _device(ctx.device)
    if students.classifier is None or students.classifier.num_classes != len(classes):
        students.attach_classifier(len(classes), seed=config.seed)
    students.to(dev)
    forward = _Forward(students)
    extra = dict(extra or {}, classes=list(classes))
    trunk = (students.image, students.audio, students.fusion)
    for module in trunk:
        module.requires_grad_(not config.freeze_students)

    def batch_loss(batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        frames, mel = _inputs(batch, dev)
        logits = forward(frames, mel)["logits"]  # (B, C)
        labels = batch["label"].to(dev)
        if (labels < 0).any():
            raise ConfigError("a training clip has no class label; every training video needs a known label")
        return F.cross_entropy(logits, labels), len(labels)

    def train_mode() -> None:
        students.train()
        if config.freeze_students:
            for module in trunk:
                module.eval()

    @torch.no_grad()
    def validate() -> dict[str, float | None]:
        if val_loader is None:
            return {"val_accuracy": None, "val_loss": None}
        _set_epoch(val_loader, 0)
        students.eval()
        correct = total = known = 0
        loss_sum = 0.0
        for batch in val_loader:
            frames, mel = _inputs(batch, dev)
            logits = students(frames, mel)["logits"].cpu()  # (B, C)
            labels = batch["label"]
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
            ok = labels >= 0  # a class no training video has is -1: wrong, and no loss
            known += int(ok.sum())
            if ok.any():
                loss_sum += float(F.cross_entropy(logits[ok], labels[ok], reduction="sum"))
        if total == 0:
            raise ConfigError("the validation loader yielded no clips; check the manifest and its split")
        return {"val_accuracy": correct / total, "val_loss": loss_sum / known if known else None}

    params = [p for p in students.parameters() if p.requires_grad]
    return _run(
        stage="finetune",
        ctx=ctx,
        forward=forward,
        students=students,
        params=params,
        train_loader=train_loader,
        config=config,
        out_path=out_path,
        extra=extra,
        batch_loss=batch_loss,
        validate=validate,
        val_key="val_accuracy",
        set_train_mode=train_mode,
        progress=progress,
        keep_best=keep_best,
    )

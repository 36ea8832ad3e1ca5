"""Training the skimming model on a feature store (the paper's optimiser, design.md §3, adaptive length).

SGD with Nesterov momentum 0.9, weight decay 1e-4, lr 1e-2, batches of videos each cropped to one random
length in [200, 500] steps. The paper trains 25 epochs of batches of 256 with the lr ÷10 at epochs 15 and
20 (``epochs=25, batch_size=256, milestones=(15, 20), patience=0``); the defaults adapt instead: batches of
a size that gives a small corpus enough updates (:func:`auto_batch_size`), at most 200 epochs, the lr ÷10
after 5 epochs without a better validation accuracy or loss, and a stop after 15, both counted only after
the first 400 updates (:class:`indexing.training.Stopping`). After every epoch: validation on the ``val``
split (without one, on a held-out 15% of the training videos, :func:`indexing.training.holdout`; the test
split never chooses), ``OUT`` rewritten when the epoch is the best so far, ``OUT.resume`` (the last
epoch, with the optimiser: ``resume=True`` continues from it with the same batches) and the training-curve
PNG, through the loop shared with distillation (:func:`indexing.training.fit`).

``Psi`` and the classifier start from the fine-tuned students checkpoint the store records (``Psi`` frozen,
the classifier at 0.1x the learning rate), as the paper does; ``init="scratch"`` trains both from PyTorch's
default initialisation at one rate (:func:`students_start` says why a checkpoint cannot be used).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from indexing import checkpoint as ckpt_io
from indexing import training
from indexing.corpus import read_labels
from indexing.errors import CheckpointError, ConfigError
from indexing.stores import FeatureStore, open_store

from .checkpoint import (
    ROLE,
    flat_meta,
    json_safe,
    read_checkpoint,
    read_resumable,
    resume_path,
    save_checkpoint,
    store_summary,
)
from .data import (
    CropBatchSampler,
    LengthBatchSampler,
    SkimDataset,
    block_options,
    classes_without_videos,
    label_names,
    make_loader,
    to_device,
)
from .model import SkimConfig, SkimModel, model_config

# Fewer optimiser updates than this leave the attention near its uniform start (measured on synthetic
# corpora: 120 updates learned nothing, 360-480 found the evidence); train() warns below it.
MIN_UPDATES = 200
# Patience and plateau drops wait this many updates by default (TrainConfig.min_updates): until then the
# validation accuracy of a small corpus sits at chance and would stop a run that is about to learn.
WARMUP_UPDATES = 400
INITS = ("students", "scratch")  # where Psi and the classifier start (TrainConfig.init)
STUDENT_FEATURES = ("image", "audio")  # the students' Psi takes concat(z_I, z_A)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the paper's optimiser; adaptive length and schedule by default).

    Attributes:
        epochs: Maximum training epochs.
        patience: Stop after this many epochs in which neither the validation accuracy nor the validation
            loss improved on its best (0: never stop early).
        lr_patience: Multiply the lr by ``gamma`` after this many epochs without improvement (0: never).
        min_delta: Smallest accuracy gain over its best, or validation-loss decrease under its lowest,
            that counts as an improvement.
        max_updates: Budget of optimiser updates (None: none).
        min_updates: Patience and plateau drops count only after this many updates (:data:`WARMUP_UPDATES`).
        batch_size: Videos per batch; None: :func:`auto_batch_size` of the training videos.
        lr: Initial learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 weight decay.
        milestones: Epochs (0-based) at which the lr is multiplied by ``gamma``.
        gamma: Learning-rate decay factor.
        crop_min: Shortest random crop of a training batch, in steps.
        crop_max: Longest random crop, in steps (videos shorter than the crop are kept whole).
        train_split: Manifest split to train on.
        val_split: Split validated after each epoch to choose the kept epoch; ``val`` without videos: a
            held-out 15% of the training videos (:func:`indexing.training.holdout`); ``none``: no validation
            (the last epoch is kept).
        eval_batch_size: Videos per validation batch.
        seed: Seed of the initial weights and of the batch order and crops.
        num_workers: DataLoader worker processes (0 reads in the training process).
        in_memory: Load the needed arrays of the store once instead of reading per video.
        shuffle: ``video`` (every batch a uniform sample) or ``block``: shuffle the store's chunks, then the
            videos inside windows of two batches, so each chunk is decoded about once per epoch (see
            :class:`skim.data.CropBatchSampler`, which says how random that is).
        length_buckets: Sort each window of two batches by length before cutting it into batches (less
            padding; every video's crop keeps the same distribution).
        device: ``cpu``, ``cuda`` or ``auto``.
        threads: torch CPU threads (None leaves torch's default).
        init: ``students`` (paper): ``Psi`` and the classifier start from the fine-tuned students
            checkpoint that made the store's features; ``Psi`` stays frozen and the classifier trains at
            ``classifier_lr_scale`` times the learning rate. ``scratch``: both start from the model's own
            initialisation and everything trains at one rate.
        classifier_lr_scale: Learning-rate factor of the classifier when ``init="students"``.
    """

    epochs: int = 200
    patience: int = 15
    lr_patience: int = 5
    min_delta: float = 1e-3
    max_updates: int | None = None
    min_updates: int = WARMUP_UPDATES
    batch_size: int | None = None
    lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    crop_min: int = 200
    crop_max: int = 500
    train_split: str = "train"
    val_split: str = "val"
    eval_batch_size: int = 64
    seed: int = 0
    num_workers: int = 0
    in_memory: bool = False
    shuffle: str = "video"
    length_buckets: bool = False
    device: str = "cpu"
    threads: int | None = None
    init: str = "students"
    classifier_lr_scale: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs} must be >= 1")
        if (self.batch_size is not None and self.batch_size < 1) or self.eval_batch_size < 1:
            raise ConfigError(f"batch sizes must be >= 1, got {self.batch_size} and {self.eval_batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr} must be a positive number")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum={self.momentum} must be in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov=True needs momentum > 0; set momentum or disable nesterov")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma={self.gamma} must be in (0, 1]")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ConfigError(
                f"milestones={list(self.milestones)} must be increasing epochs >= 1, e.g. 15,20"
            )
        if not 1 <= self.crop_min <= self.crop_max:
            raise ConfigError(
                f"crop range [{self.crop_min}, {self.crop_max}] needs 1 <= crop_min <= crop_max"
            )
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers} must be >= 0")
        if self.shuffle not in ("video", "block"):
            raise ConfigError(f"shuffle={self.shuffle!r}; choose video or block")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device={self.device!r}; use cpu, cuda, cuda:N or auto")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r}; choose from {', '.join(INITS)}")
        if not 0 < self.classifier_lr_scale <= 1:
            raise ConfigError(
                f"classifier_lr_scale={self.classifier_lr_scale} must be in (0, 1]; the paper uses 0.1"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads={self.threads} must be >= 1")
        if self.lr_patience < 0:
            raise ConfigError(f"lr_patience={self.lr_patience} must be >= 0 (0: no drops on plateaus)")
        self.stopping()  # patience, min_delta, max_updates

    def stopping(self, *, keep_best: bool = True) -> training.Stopping:
        """Which epoch is kept and when training stops (:class:`indexing.training.Stopping`)."""
        return training.Stopping(
            monitor="val_accuracy",
            mode="max",
            tie="val_loss",
            patience=self.patience,
            min_delta=self.min_delta,
            max_updates=self.max_updates,
            keep_best=keep_best,
            min_updates=self.min_updates,
        )

    def schedule(self) -> training.Schedule:
        """Learning-rate drops on plateaus, at the milestones, or both."""
        return training.Schedule(
            lr=self.lr, milestones=self.milestones, gamma=self.gamma, plateau=self.lr_patience
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def auto_batch_size(train_videos: int) -> int:
    """Videos per batch when none is given: an eighth of the training videos, between 8 and the paper's 256.

    The attention needs a few hundred updates to leave its uniform start (:data:`MIN_UPDATES`); at least 8
    batches per epoch give that within the default 200 epochs on a corpus of 64 training videos or more
    (fewer: batches of 8, fewer updates, warned about), and from 2,048 training videos on this is the
    paper's batch.
    """
    return max(8, min(256, train_videos // 8))


MMAP_THRESHOLD_BYTES = 32 << 20  # glibc: allocations from 32 MiB up get their own pages, returned on free
TRIM_THRESHOLD_BYTES = 128 << 20  # glibc: free heap at the top is returned above this much (0: glibc's)


def limit_heap_growth() -> bool:
    """Fix glibc's mmap threshold at 32 MiB and its trim threshold at 128 MiB.

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so later batch-sized
    tensors come from the heap, whose free holes are rarely returned: a training process's peak RSS grew
    by ~300 MB over its first three batch-256 steps and kept growing (measured). With the threshold fixed,
    batch-sized tensors (features, key banks: hundreds of MB) always get their own mapping, returned when
    freed, so the peak stays at what one step needs. Blocks below it (the key path's 16 MB row blocks, the
    per-step tensors) come from the heap and are reused without new page faults: at 1 MiB each of them was a
    fresh mapping, and its page faults made a batch-256 forward 12-15% slower (measured); the trim threshold
    keeps glibc from returning and re-faulting the heap's top between blocks. Idempotent; returns whether
    it applied (glibc only).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = bool(libc.mallopt(-3, MMAP_THRESHOLD_BYTES))  # M_MMAP_THRESHOLD
        if TRIM_THRESHOLD_BYTES:
            applied = bool(libc.mallopt(-1, TRIM_THRESHOLD_BYTES)) and applied  # M_TRIM_THRESHOLD
        return applied
    except (OSError, AttributeError):  # another C library (musl): nothing to tune
        return False


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``ConfigError`` for cuda without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def train(
    store_path: str | Path,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    model_name: str = "imgaud_skim",
    model_options: Mapping[str, Any] | None = None,
    config: TrainConfig = TrainConfig(),
    recognition_store: str | Path | None = None,
    students: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    plot: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a skimming model and write a checkpoint after every epoch.

    Args:
        store_path: Feature store to train on.
        out: Compact model path (what query/evaluate/show load), holding the best epoch by validation;
            the last epoch's resumable state with the optimiser goes beside it as ``OUT.resume``
            (:func:`skim.checkpoint.resume_path`).
        labels: Labels manifest (CSV ``video_id,path,label,split``); None uses the store index's labels.
        model_name: Registered model (:func:`skim.model.available_models`).
        model_options: :class:`SkimConfig` overrides (``num_classes`` and ``dim`` come from the data).
        config: Optimisation settings.
        recognition_store: Second store holding the recognition features (needs ``recognition_features``).
        students: With ``config.init="students"``: the students checkpoint to start ``Psi`` and the
            classifier from, instead of the one the store records (e.g. after moving it); its weights must
            be the ones that made the features (the store's recorded sha256).
        resume: Continue from ``OUT.resume`` if it exists (same model, options and labels required).
        overwrite: Replace an existing ``out`` instead of refusing.
        plot: Training-curve PNG (default: ``out`` with suffix ``.png``), redrawn after the last epoch and
            after any epoch ending a minute or more after the previous drawing.
        progress: Show progress bars.
        log: Where to print notes (default: ``tqdm.write`` to stderr).

    Returns:
        A summary: ``out``, ``plot``, ``model``, ``labels``, ``train_videos``, ``val_videos``,
        ``validated_on``, ``epochs`` (trained), ``batch_size``, how the run ended
        (:func:`indexing.training.outcome`: ``best_epoch``, the epoch ``out`` holds, ``stopped``,
        ``still_improving``, ``message``, ...) and ``history`` (one dict per epoch).

    Raises:
        ConfigError: Bad options, no training videos, or ``out`` exists without ``resume``/``overwrite``.
    """
    note = log or training.default_note  # stderr: stdout stays for results
    out = Path(out)
    plot_path = Path(plot) if plot is not None else out.with_suffix(".png")
    if out.exists() and not (resume or overwrite):
        raise ConfigError(f"{out} exists; pass --resume to continue training it or --overwrite to start over")
    device = resolve_device(config.device)
    limit_heap_growth()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(store_path, out, labels, model_name, model_options, config, recognition_store, students,
                      resume, plot_path, progress, note, device)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _train(
    store_path: str | Path,
    out: Path,
    labels: str | Path | None,
    model_name: str,
    model_options: Mapping[str, Any] | None,
    config: TrainConfig,
    recognition_store: str | Path | None,
    students: str | Path | None,
    resume: bool,
    plot_path: Path,
    progress: bool,
    note: Callable[[str], None],
    device: torch.device,
) -> dict[str, Any]:

    store = open_store(store_path)
    rec_store = open_store(recognition_store) if recognition_store is not None else None
    manifest = read_labels(labels) if labels is not None else None
    names = label_names(store, manifest, log=note)
    options = dict(model_options or {})
    options.setdefault("dim", store.dim)
    if rec_store is not None:
        options["recognition_store"] = True
    start = None
    if config.init == "students":
        probe = model_config(model_name, num_classes=len(names), **options)
        start = students_start(rec_store if probe.recognition_store else store, probe, names, students)
        note(
            f"Psi and the classifier start from the students {start.record['path']} (Psi frozen, classifier "
            f"at {config.classifier_lr_scale:g}x the lr); --init scratch trains both from scratch"
        )
        for key, value in start.options.items():
            if options.setdefault(key, value) != value:
                raise ConfigError(
                    f"{key}={options[key]} but the students' Psi has {key}={value}; drop the option or "
                    "pass --init scratch"
                )
    skim_config = model_config(model_name, num_classes=len(names), **options)
    if skim_config.recognition_store and rec_store is None:
        raise ConfigError(
            "this model reads recognition features from a second store; pass --recognition-store"
        )

    data_kw: dict[str, Any] = {"labels": manifest, "names": names, "recognition_store": rec_store}
    data_kw["in_memory"] = config.in_memory
    train_ds, val_ds, validated_on = _datasets(store, store_path, skim_config, config, data_kw, note)
    untrained = classes_without_videos(train_ds, names)
    if untrained:
        note(
            f"warning: {len(untrained)} class(es) have no video in split {config.train_split!r}: "
            f"{', '.join(untrained[:10])}; the model can never learn them (move videos to that split)"
        )
    if config.batch_size is None:
        config = replace(config, batch_size=auto_batch_size(len(train_ds)))
        note(f"batches of {config.batch_size} videos ({len(train_ds)} training videos / 8, in [8, 256])")

    torch.manual_seed(config.seed)
    model = SkimModel(skim_config)
    if start is not None:
        start.apply(model)
    model.to(device)
    optimizer = training.sgd(
        param_groups(model, config),
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and (out.exists() or resume_path(out).exists()):
        if not out.exists():  # OUT is written before OUT.resume: it was removed
            raise CheckpointError(
                f"{resume_path(out)} exists but {out}, which holds the kept (best) epoch, is missing, so the "
                "run cannot be continued without losing it; train again with --overwrite, or pass a new --out"
            )
        ckpt = read_resumable(out)  # OUT.resume holds the optimiser state; OUT is the compact model
        _check_resumable(flat_meta(ckpt), out, model_name, skim_config, names)
        weights = ckpt_io.split_state_dict(ckpt["state_dict"], ROLE)
        ckpt_io.load_state_checked(model, weights, where=f"{out} ({model_name})")
        history = training.restore(optimizer, ckpt["training"])
        start_epoch = int(ckpt["epoch"])
        note(f"resuming {out} after epoch {start_epoch}")

    sampler = CropBatchSampler(
        train_ds.steps,
        batch_size=config.batch_size,
        crop_min=config.crop_min,
        crop_max=config.crop_max,
        seed=config.seed,
        **block_options(train_ds, config),
    )
    loader = make_loader(train_ds, sampler, num_workers=config.num_workers)
    updates = len(sampler) * config.epochs
    if config.max_updates is not None:
        updates = min(updates, config.max_updates)
    if updates < MIN_UPDATES and not resume:
        note(
            f"warning: {len(train_ds)} training videos in batches of {config.batch_size} for {config.epochs} "
            f"epochs make only {updates} optimiser updates; the attention needs a few hundred to leave the "
            f"uniform start. Lower --batch-size or raise --epochs (e.g. --batch-size "
            f"{max(1, min(config.batch_size, len(train_ds) // 6))})"
        )
    extra = {
        "labels": names,
        "features": {
            "index": list(skim_config.index_features),
            "recognition": list(skim_config.recognition_features or skim_config.index_features),
            "recognition_store": str(recognition_store) if recognition_store is not None else None,
        },
        "store": store_summary(store),
        "validated_on": validated_on,
        "init": start.record if start is not None else {"from": "scratch"},
    }

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        return loader

    def step(batch: Mapping[str, Any]) -> training.StepResult:
        batch = to_device(batch, device)
        out_b = model(batch["features"], batch["mask"])
        correct = int((out_b.logits.argmax(1) == batch["labels"]).sum())
        loss = model.loss(out_b, batch["labels"])
        return training.StepResult(loss, len(batch["video_ids"]), {"train_accuracy": correct})

    def validate_epoch() -> dict[str, Any]:
        if val_ds is None:
            return {"val_loss": None, "val_accuracy": None}
        return validate(model, val_ds, batch_size=config.eval_batch_size, device=device)

    def write(epoch: int, state: dict[str, Any], *, compact: bool) -> None:
        save_checkpoint(
            out,
            model_name=model_name,
            model=model,
            epoch=epoch,
            train_config=config.to_dict(),
            training={**state, "history": json_safe(state["history"])},
            extra=extra,
            compact=compact,
        )

    stopping = config.stopping(keep_best=validated_on is not None)
    history = training.fit(
        stage="train",
        epochs=config.epochs,
        optimizer=optimizer,
        schedule=config.schedule(),
        stopping=stopping,
        batches=batches,
        step=step,
        save=lambda epoch, state: write(epoch, state, compact=False),  # OUT.resume: the last epoch
        keep=lambda epoch, h: write(epoch, {"history": h}, compact=True),  # OUT: the best epoch
        history=history,
        start_epoch=start_epoch,
        train_mode=model.train,
        validate=validate_epoch,
        plot=lambda h: _save_curves(h, plot_path),
        rate_key="train_videos_per_s",
        progress=progress,
        note=note,
        postfix=lambda m: {"loss": f"{m['loss']:.3f}", "acc": f"{m['train_accuracy']:.3f}"},
    )
    result = training.outcome(history, stopping, epochs=config.epochs, plateau=config.lr_patience)
    if history:
        _keep_best(out, model, history, result)
    return {
        "out": str(out),
        "curve": str(plot_path) if history else None,
        "model": model_name,
        "classes": len(names),
        "labels": names,
        "classes_without_training_videos": untrained,
        "train_videos": len(train_ds),
        "val_videos": len(val_ds) if val_ds is not None else 0,
        "validated_on": validated_on,
        "epochs": len(history),
        "batch_size": config.batch_size,
        **result,
        "history": json_safe(history),
    }


@dataclass
class StudentsStart:
    """Where ``Psi`` and the classifier start with ``init="students"``.

    Attributes:
        options: SkimConfig values the students fix (``embed``, ``psi_hidden``).
        psi: ``Psi``'s state dict (``0.*`` = the students' ``fc1``, ``2.*`` = ``fc2``).
        classifier: The classifier's state dict, rows ordered as the skimming labels.
        record: What the checkpoint records about it (``from``, ``path``, ``sha256``).
    """

    options: dict[str, Any]
    psi: dict[str, torch.Tensor]
    classifier: dict[str, torch.Tensor]
    record: dict[str, Any]

    def apply(self, model: SkimModel) -> None:
        """Load ``Psi`` and the classifier into ``model`` and freeze ``Psi``."""
        ckpt_io.load_state_checked(model.psi, self.psi, where=f"{self.record['path']} (fusion -> Psi)")
        where = f"{self.record['path']} (classifier)"
        ckpt_io.load_state_checked(model.classifier, self.classifier, where=where)
        model.psi.requires_grad_(False)


def students_start(
    store: FeatureStore, skim_config: SkimConfig, names: list[str], students: str | Path | None = None
) -> StudentsStart:
    """Load ``Psi`` and the classifier of the fine-tuned students that made ``store``'s features.

    Args:
        store: The store whose recognition features the model reads.
        skim_config: The model to be trained (its recognition features must be the students' image and
            audio features, which their ``Psi`` takes).
        names: Skimming class names, index = class id; the students' classifier rows are reordered to them.
        students: A checkpoint to use instead of the store's record (verified against its sha256).

    Raises:
        ConfigError: The model recognises other features than the students' (image, audio).
        CheckpointError: The store records no students checkpoint and none was given, the checkpoint is
            missing, is not the one that made the features, or has no classifier for these classes.
    """
    from indexing.models import load_students

    where = getattr(store, "path", "the store")
    recognised = tuple(skim_config.recognition_features or skim_config.index_features)
    if recognised != STUDENT_FEATURES:
        raise ConfigError(
            f"this model recognises with {list(recognised)}, but the students' Psi takes "
            f"{list(STUDENT_FEATURES)}; pass --init scratch"
        )
    record = (store.attrs.get("models") or {}).get("students") or {}
    spec = str(students) if students is not None else record.get("spec")
    fix = "pass --students CHECKPOINT (the fine-tuned students that made the store) or --init scratch"
    if not spec:
        raise CheckpointError(
            f"Psi and the classifier start from the students checkpoint that made the features, but {where} "
            f"records none (was it made by `l2l extract`?); {fix}"
        )
    try:
        model, meta = load_students(spec)
    except CheckpointError as err:
        raise CheckpointError(
            f"Psi and the classifier start from the students checkpoint recorded in {where}, which is not "
            f"available: {err}; {fix}"
        ) from None
    if record.get("sha256") and meta["sha256"] != record["sha256"]:
        raise CheckpointError(
            f"students {spec} have weights sha256 {meta['sha256'][:12]}, but {where} was made with "
            f"{record['sha256'][:12]}; {fix}"
        )
    classes = list(meta.get("classes") or [])
    missing = [n for n in names if n not in classes]
    if model.classifier is None or missing:
        has = f"classes {classes}" if model.classifier is not None else "no classifier"
        raise CheckpointError(
            f"students {spec} have {has}, but skimming needs {names}"
            f"{f' (missing {missing})' if missing and classes else ''}; fine-tune them on these labels "
            "(`l2l finetune`) and extract with the result, or pass --init scratch"
        )
    if model.image.num_features != skim_config.dim:
        raise CheckpointError(
            f"students {spec} make {model.image.num_features}-d features but the store holds "
            f"{skim_config.dim}-d ones; {fix}"
        )
    fusion, head = model.fusion, model.classifier.fc
    rows = torch.tensor([classes.index(n) for n in names])  # skimming class id -> students' class id
    return StudentsStart(
        options={"embed": int(fusion.num_features), "psi_hidden": int(fusion.fc1.out_features)},
        psi={
            "0.weight": fusion.fc1.weight.detach(),
            "0.bias": fusion.fc1.bias.detach(),
            "2.weight": fusion.fc2.weight.detach(),
            "2.bias": fusion.fc2.bias.detach(),
        },
        classifier={"weight": head.weight.detach()[rows], "bias": head.bias.detach()[rows]},
        record={"from": "students", "path": spec, "sha256": meta["sha256"]},
    )


def param_groups(model: SkimModel, config: TrainConfig) -> list[dict[str, Any]]:
    """Optimiser groups: everything trainable at the learning rate, and with ``init="students"`` the
    classifier at ``classifier_lr_scale`` times it (``Psi``, frozen, is in no group)."""
    if config.init != "students":
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    head = {id(p) for p in model.classifier.parameters()}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in head]
    return [
        {"params": rest},
        {"params": list(model.classifier.parameters()), "lr_scale": config.classifier_lr_scale},
    ]


@torch.no_grad()
def validate(
    model: SkimModel, dataset: SkimDataset, *, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on every video of ``dataset`` (eval mode, whole videos)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    loader = make_loader(dataset, LengthBatchSampler(dataset.steps, batch_size=batch_size))
    for batch in loader:
        batch = to_device(batch, device)
        out = model(batch["features"], batch["mask"])
        b = len(batch["video_ids"])
        loss_sum += float(model.loss(out, batch["labels"])) * b
        correct += int((out.logits.argmax(1) == batch["labels"]).sum())
        seen += b
    model.train(was_training)
    return {"val_loss": loss_sum / max(seen, 1), "val_accuracy": correct / max(seen, 1)}


def _datasets(
    store: FeatureStore,
    store_path: str | Path,
    skim_config: SkimConfig,
    config: TrainConfig,
    data_kw: Mapping[str, Any],
    note: Callable[[str], None],
) -> tuple[SkimDataset, SkimDataset | None, str | None]:
    """Training and validation videos: ``(train, val, validated_on)``.

    Validation is ``config.val_split``; the default ``val`` without videos holds out 15% of the training
    videos (:func:`indexing.training.holdout`, ``validated_on="holdout"``); ``none``, or a corpus too small
    to hold any out, validates nothing (the last epoch is kept). Validation reads per video even with
    ``in_memory``: a second copy of the store is not worth it.
    """
    keys = skim_config.batch_keys
    lazy = {**data_kw, "in_memory": False}

    def empty(ds: SkimDataset) -> ConfigError:
        return ConfigError(
            f"no labelled ok videos in split {config.train_split!r} of {store_path} "
            f"(skipped: {ds.skipped}); check the manifest's split column or pass --train-split"
        )

    if config.val_split not in ("val", "none"):
        val_ds = SkimDataset(store, keys, split=config.val_split, with_time=False, **lazy)
        if not len(val_ds):
            raise ConfigError(
                f"no labelled ok videos in split {config.val_split!r} of {store_path} to validate on "
                f"(skipped: {val_ds.skipped}); pass --val-split val (default) or none"
            )
        if config.val_split == "test":
            note(
                "warning: the kept epoch and early stopping are chosen on the 'test' videos, so accuracy "
                "measured on them afterwards is optimistic; leave --val-split at val to hold out training "
                "videos instead"
            )
        train_ds = SkimDataset(store, keys, split=config.train_split, with_time=False, **data_kw)
        if not len(train_ds):
            raise empty(train_ds)
        return train_ds, val_ds, config.val_split
    if config.val_split == "val":
        val_ds = SkimDataset(store, keys, split="val", with_time=False, **lazy)
        if len(val_ds):
            train_ds = SkimDataset(store, keys, split=config.train_split, with_time=False, **data_kw)
            if not len(train_ds):
                raise empty(train_ds)
            return train_ds, val_ds, "val"
    probe = SkimDataset(store, keys, split=config.train_split, with_time=False, **lazy)
    if not len(probe):
        raise empty(probe)
    ids = [e.video_id for e in probe.entries]
    held = training.holdout(ids, [e.label for e in probe.entries]) if config.val_split == "val" else []
    if not held:
        why = "--val-split none" if config.val_split == "none" else "too few training videos to hold any out"
        note(f"no validation ({why}): every epoch trains to --epochs and the last epoch is kept")
        train_ds = SkimDataset(store, keys, split=config.train_split, with_time=False, **data_kw)
        return train_ds, None, None
    rest = [v for v in ids if v not in set(held)]
    note(
        f"no videos in split 'val': validating on {len(held)} of the {len(ids)} training videos held out "
        f"(15% per class, the same in every run), training on the other {len(rest)}"
    )
    train_ds = SkimDataset(store, keys, video_ids=rest, with_time=False, **data_kw)
    val_ds = SkimDataset(store, keys, video_ids=held, with_time=False, **lazy)
    return train_ds, val_ds, training.HOLDOUT


def _keep_best(out: Path, model: SkimModel, history: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """Load the kept epoch's weights from ``out`` into ``model`` and rewrite ``out`` with the whole history
    and how the run ended (it was written when that epoch was trained)."""
    ckpt = read_checkpoint(out)
    if int(ckpt["epoch"]) != result["best_epoch"]:
        raise CheckpointError(
            f"{out} holds epoch {ckpt['epoch']}, but the training history keeps epoch "
            f"{result['best_epoch']}; was the file replaced during training? Train again with --overwrite"
        )
    weights = ckpt_io.split_state_dict(ckpt["state_dict"], ROLE)
    ckpt_io.load_state_checked(model, weights, where=str(out))
    ckpt_io.save_checkpoint(
        out,
        training={"history": json_safe(history), "outcome": json_safe(result)},
        **{k: ckpt[k] for k in ("kind", "models", "state_dict", "epoch", "config", "extra")},
    )


def _check_resumable(
    meta: Mapping[str, Any], out: Path, model_name: str, skim_config: SkimConfig, names: list[str]
) -> None:
    if meta["model"] != model_name or SkimConfig.from_dict(meta["config"]) != skim_config:
        raise CheckpointError(
            f"{out} was trained as {meta['model']} with {meta['config']}; resume with the same model options "
            "or pass --overwrite to start over"
        )
    if list(meta["labels"]) != names:
        raise CheckpointError(
            f"{out} was trained on labels {meta['labels']}, the manifest now gives {names}; "
            "resume with the same labels or pass --overwrite to start over"
        )


def _save_curves(history: list[Mapping[str, Any]], path: Path) -> None:
    from .plot import training_curves_figure

    fig = training_curves_figure(history)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)

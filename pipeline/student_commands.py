"""ImgAud2Vid commands: ``distill``, ``finetune``, ``distill-report``.

Thin: options -> config -> one library call -> report. Only click and the standard library are imported at
module level (``l2l --help`` stays instant); ``cli.py`` registers :data:`COMMANDS`. The students and their
training live in ``indexing/``; these commands sit on the pipeline side because the clips they train on are
decoded video (``pipeline.clips``), and imports point one way: pipeline -> indexing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from indexing.errors import ConfigError
from indexing.options import (
    OutputPath,
    RegistryChoice,
    echo_json,
    json_option,
    no_progress_option,
    note,
    set_threads,
    show_progress,
    stopping_options,
    threads_option,
    warn,
)


def _model_presets() -> list[str]:
    from indexing.models import available_presets

    return available_presets()


def _clip_options(fn):
    """Options of the commands that train on clips of a manifest's videos."""
    options = [
        click.option("--clips-per-video", default=8, show_default=True, help="Steps per video per epoch."),
        click.option(
            "--train-split", default="train", show_default=True, help="Split of the training videos."
        ),
        click.option(
            "--val-split",
            default="auto",
            show_default=True,
            help="Validation split, choosing the kept epoch; auto: val, else 15% of the training videos held "
            "out (never test unless named).",
        ),
        click.option("--workers", default=2, show_default=True, help="DataLoader worker processes."),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]."),
        click.option("--seed", default=0, show_default=True, help="Seed of initialisation and sampling."),
        click.option(
            "--order",
            type=click.Choice(["clips", "videos"]),
            default="clips",
            show_default=True,
            help="Training clip order: clips (all shuffled, the paper's) or videos (whole videos shuffled, "
            "each decoded in one pass: faster when clips are decoded).",
        ),
        threads_option,
        no_progress_option,
        json_option("the history"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _teacher(teacher_weights: str | None, teacher_preset: str | None) -> tuple[Any, dict]:
    from indexing.models import load_teacher

    if (teacher_weights is None) == (teacher_preset is None):
        raise ConfigError("give exactly one of --teacher-weights PATH or --teacher-preset (e.g. tiny)")
    return load_teacher(teacher_weights, preset=teacher_preset)


def _stored_teacher(
    store: str, name: str, teacher_weights: str | None, teacher_preset: str | None
) -> tuple[Any, dict]:
    """The teacher record of a store's feature set ``name``; the teacher itself only when one is given (the KL
    term needs its fc), and then it must be the one that made the stored descriptors."""
    from pipeline.clips import store_feature_sets

    if not Path(store).is_dir():
        raise ConfigError(f"--teacher-features reads a feature store; {store} is a manifest: give the STORE")
    made = store_feature_sets(store, [name])[name]
    if made.get("model") != "teacher":
        raise ConfigError(f"feature set {name!r} of {store} was made by {made.get('model')}, not a teacher")
    meta = {"feature_set": name, "store": store, "spec": made.get("spec"), "sha256": made.get("sha256")}
    if teacher_weights is None and teacher_preset is None:
        return None, meta
    teacher, given = _teacher(teacher_weights, teacher_preset)
    if given["sha256"] != made.get("sha256"):
        raise ConfigError(
            f"the teacher given (sha256 {given['sha256'][:12]}) did not make {store}'s {name!r} descriptors "
            f"({str(made.get('sha256'))[:12]}, {made.get('spec')}); give that teacher or none"
        )
    return teacher, {**given, "feature_set": name, "store": store}


def _loaders(manifest: str, *, teacher_features: str | None = None, **kwargs: Any):
    """Loaders over a manifest's videos, or over the videos a feature store (a directory) indexes."""
    from pipeline.clips import clip_loaders, store_loaders

    if Path(manifest).is_dir():
        loaders = store_loaders(manifest, teacher_features=teacher_features, **kwargs)
    elif teacher_features:
        raise ConfigError(
            f"--teacher-features reads a feature store; {manifest} is a manifest: give the STORE"
        )
    else:
        loaders = clip_loaders(manifest, **kwargs)
    for line in loaders.notes:
        (warn if line.startswith("warning") else note)(line)
    return loaders


def _validation(loaders) -> bool:
    """Whether the loaders' validation split may choose the kept epoch (not the training videos), said."""
    split = loaders.data.get("val_split")
    if split == "train":
        note("no validation split: the last epoch is kept; validation on training videos is monitoring only")
        return False
    if split == "test":
        warn(
            "the kept epoch and early stopping are chosen on the 'test' videos (the corpus has no 'val' "
            "split), so accuracy measured on them afterwards is optimistic; add a val split to the manifest"
        )
    return True


def _report_history(
    history: list[dict], out: str, val_key: str, as_json: bool, started: float, result: dict[str, Any]
) -> None:
    import os

    from indexing.distill import curve_path

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports (and wrote the checkpoint)
        return
    if as_json:
        seconds = round(time.perf_counter() - started, 2)
        echo_json(
            {"out": out, "curve": str(curve_path(out)), "seconds": seconds, **result, "history": history}
        )
        return
    last = history[-1]
    shown = f", {val_key} {last[val_key]:.4f}" if last.get(val_key) is not None else ""
    click.echo(f"{last['epoch']} epochs: train loss {last['train_loss']:.4f}{shown}")
    click.echo(result["message"])
    kept = f"wrote {out} (epoch {result['best_epoch']}), {out}.resume (epoch {last['epoch']})"
    click.echo(f"{kept} and {curve_path(out)}")


@click.command()
@click.argument("manifest", metavar="MANIFEST|STORE", type=click.Path(exists=True))
@click.option(
    "--teacher-weights",
    type=click.Path(exists=True, dir_okay=False),
    help="torchvision r2plus1d_18 state dict file (e.g. Kinetics-400 weights).",
)
@click.option(
    "--teacher-features",
    help="Feature set of STORE holding the teacher's descriptors (teacher): read as targets, the teacher "
    "never runs (a teacher is then needed only for --kl-weight).",
)
@click.option(
    "--teacher-preset",
    type=RegistryChoice(_model_presets),
    help="Seeded random teacher instead of weights (tiny: tests and demos).",
)
@click.option(
    "--out", required=True, type=OutputPath(dir_okay=False), help="Students checkpoint (resumable)."
)
@click.option(
    "--preset",
    type=RegistryChoice(_model_presets),
    default="paper",
    show_default=True,
    help="Student architecture preset.",
)
@click.option(
    "--init-resnet18",
    type=click.Path(exists=True, dir_okay=False),
    help="torchvision resnet18 state dict (e.g. ImageNet) to initialise both trunks, as the paper.",
)
@stopping_options(epochs=60, patience=10, lr_patience=4, paper="30,50 of 60 epochs")
@click.option("--batch-size", default=16, show_default=True, help="Clips per batch.")
@click.option("--lr", default=1e-3, show_default=True, help="Initial SGD learning rate.")
@click.option("--weight-decay", default=1e-4, show_default=True, help="SGD weight decay.")
@click.option("--kl-weight", default=0.0, show_default=True, help="Weight of the teacher-student KL term.")
@_clip_options
def distill(
    manifest,
    teacher_weights,
    teacher_features,
    teacher_preset,
    out,
    preset,
    init_resnet18,
    batch_size,
    lr,
    weight_decay,
    kl_weight,
    clips_per_video,
    train_split,
    val_split,
    workers,
    device,
    seed,
    order,
    threads,
    no_progress,
    as_json,
    stopping,
) -> None:
    """Distil the clip teacher into image + audio students on MANIFEST's videos, or on those a feature
    STORE indexes: with its inputs set no video is decoded, with --teacher-features the teacher never runs.

    --out holds the epoch with the lowest validation L1 (OUT.resume the last one). Rerunning with the same
    --out and options resumes after the last completed epoch (--epochs, --patience, --max-updates may
    change).
    """
    started = time.perf_counter()
    set_threads(threads)
    from indexing.distill import DistillConfig, outcome
    from indexing.distill import distill as run_distill
    from indexing.models import build_students

    config = DistillConfig(
        **stopping,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        kl_weight=kl_weight,
        device=device,
        seed=seed,
    )
    if teacher_features:
        teacher, teacher_meta = _stored_teacher(manifest, teacher_features, teacher_weights, teacher_preset)
    else:
        teacher, teacher_meta = _teacher(teacher_weights, teacher_preset)
    students = build_students(preset, seed=seed, init_resnet18=init_resnet18)
    loaders = _loaders(
        manifest,
        teacher_features=teacher_features,
        order=order,
        with_clips=True,
        clips_per_video=clips_per_video,
        train_split=train_split,
        val_split=val_split,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        device=device,
    )
    extra = {
        "teacher": teacher_meta,
        "teacher_sha256": teacher_meta["sha256"],
        "preset": preset,
        "init_resnet18": init_resnet18,
        "data": loaders.data,
    }
    progress = show_progress(no_progress, as_json)
    keep_best = _validation(loaders)
    history = run_distill(
        students,
        teacher,
        loaders.train,
        loaders.val,
        config,
        out,
        extra=extra,
        progress=progress,
        keep_best=keep_best,
    )
    _report_history(history, out, "val_l1", as_json, started, outcome(history, config, keep_best=keep_best))


def _students_spec(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A students checkpoint that exists, or ``random:SEED[:PRESET]`` (from scratch, no distillation)."""
    if value.startswith("random:") or Path(value).is_file():
        return value
    what = "is a directory" if Path(value).exists() else "does not exist"
    raise click.BadParameter(
        f"{value!r} {what}; give a distilled students checkpoint (l2l distill) or random:SEED:PRESET "
        "(e.g. random:0:tiny) to train from scratch"
    )


@click.command()
@click.argument("manifest", metavar="MANIFEST|STORE", type=click.Path(exists=True))
@click.option(
    "--students",
    "students_path",
    required=True,
    callback=_students_spec,
    help="Distilled students checkpoint, or random:SEED:PRESET to train from scratch (no distillation; the "
    "demo's recipe: on a small corpus, distilling from a random teacher transfers nothing).",
)
@click.option(
    "--out", required=True, type=OutputPath(dir_okay=False), help="Fine-tuned checkpoint (resumable)."
)
@stopping_options(epochs=40, patience=8, lr_patience=3, paper="e.g. 20,30 of 40 epochs")
@click.option("--batch-size", default=16, show_default=True, help="Clips per batch.")
@click.option("--lr", default=1e-3, show_default=True, help="Initial SGD learning rate.")
@click.option("--weight-decay", default=1e-4, show_default=True, help="SGD weight decay.")
@click.option("--freeze-students", is_flag=True, help="Train only the classifier.")
@click.option(
    "--moments",
    type=click.Path(exists=True, dir_okay=False),
    help="Ground-truth segments (moments.json): draw training and validation clips only from inside "
    "them (trimmed clips) instead of anywhere in the untrimmed videos.",
)
@_clip_options
def finetune(
    manifest,
    students_path,
    out,
    batch_size,
    lr,
    weight_decay,
    freeze_students,
    moments,
    clips_per_video,
    train_split,
    val_split,
    workers,
    device,
    seed,
    order,
    threads,
    no_progress,
    as_json,
    stopping,
) -> None:
    """Fine-tune a classifier on z_IA (and the students) with MANIFEST's labels, or those of the videos a
    feature STORE indexes (read from its inputs set when it has one).

    --out holds the epoch with the best validation accuracy (ties: lower validation loss), OUT.resume the
    last one; rerunning resumes as distill does.
    """
    started = time.perf_counter()
    set_threads(threads)
    from indexing.distill import FinetuneConfig, outcome
    from indexing.distill import finetune as run_finetune
    from indexing.models import load_students

    if Path(out).resolve() == Path(students_path).resolve():
        raise ConfigError("--out must differ from --students (the distilled checkpoint is kept)")
    config = FinetuneConfig(
        **stopping,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        freeze_students=freeze_students,
        device=device,
        seed=seed,
    )
    students, meta = load_students(students_path, device=device)
    loaders = _loaders(
        manifest,
        order=order,
        with_clips=False,
        clips_per_video=clips_per_video,
        train_split=train_split,
        val_split=val_split,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        device=device,
        require_labels=True,
        moments=moments,
    )
    extra = {
        "parent": students_path,
        "parent_sha256": meta["sha256"],
        "teacher_sha256": meta["teacher_sha256"],
        "data": loaders.data,
    }
    keep_best = _validation(loaders)
    history = run_finetune(
        students,
        loaders.train,
        loaders.val,
        config,
        out,
        classes=loaders.classes,
        extra=extra,
        progress=show_progress(no_progress, as_json),
        keep_best=keep_best,
    )
    result = outcome(history, config, keep_best=keep_best)
    _report_history(history, out, "val_accuracy", as_json, started, result)


@click.command("distill-report")
@click.argument("manifest", metavar="MANIFEST|STORE", type=click.Path(exists=True))
@click.option(
    "--students",
    "students_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Distilled students checkpoint.",
)
@click.option(
    "--teacher-weights",
    type=click.Path(exists=True, dir_okay=False),
    help="torchvision r2plus1d_18 state dict file the students were distilled from.",
)
@click.option("--teacher-preset", type=RegistryChoice(_model_presets), help="Seeded random teacher preset.")
@click.option(
    "--teacher-features",
    help="Feature set of STORE holding the teacher's descriptors: the teacher never runs.",
)
@click.option("--split", default="", help="Only videos of this split.  [default: all]")
@click.option("--clips-per-video", default=8, show_default=True, help="Evenly spaced steps per video.")
@click.option(
    "--audio-baseline",
    type=click.Choice(["mean", "zero"]),
    default="mean",
    show_default=True,
    help="What replaces z_A for the image-only score.",
)
@click.option("--top-k", default=5, show_default=True, help="Clips listed where audio helps most / least.")
@click.option("--batch-size", default=16, show_default=True, help="Clips per batch.")
@click.option("--workers", default=2, show_default=True, help="DataLoader worker processes.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@threads_option
@json_option("the full per-clip report")
def distill_report_cmd(
    manifest,
    students_path,
    teacher_weights,
    teacher_preset,
    teacher_features,
    split,
    clips_per_video,
    audio_baseline,
    top_k,
    batch_size,
    workers,
    device,
    threads,
    as_json,
) -> None:
    """Per-clip L1 to the teacher of image-only vs image+audio students: where does audio help?"""
    started = time.perf_counter()
    set_threads(threads)
    from indexing.distill import distill_report
    from indexing.models import load_students
    from pipeline.clips import report_loader

    if teacher_features:
        teacher, teacher_meta = _stored_teacher(manifest, teacher_features, teacher_weights, teacher_preset)
    else:
        teacher, teacher_meta = _teacher(teacher_weights, teacher_preset)
    students, meta = load_students(students_path, device=device)
    if meta["teacher_sha256"] not in (None, teacher_meta["sha256"]):
        warn("these students were distilled from another teacher")
    loader = report_loader(
        manifest,
        teacher_features=teacher_features,
        split=split,
        clips_per_video=clips_per_video,
        batch_size=batch_size,
        workers=workers,
        device=device,
    )
    report = distill_report(
        students, teacher, loader, device=device, audio_baseline=audio_baseline, top_k=top_k
    )
    if as_json:
        echo_json({**report, "seconds": round(time.perf_counter() - started, 2)})
        return
    s = report["summary"]
    click.echo(f"clips                  {s['clips']}")
    click.echo(f"L1 image+audio         {s['mean_l1_image_audio']:.4f}")
    click.echo(f"L1 image only ({s['audio_baseline']})   {s['mean_l1_image_only']:.4f}")
    click.echo(f"audio helps on         {100 * s['fraction_audio_helps']:.1f}% of clips")
    for title, rows in (
        ("audio helps most", report["most_helped"]),
        ("audio helps least", report["least_helped"]),
    ):
        click.echo(f"{title}:")
        for r in rows:
            where = f"{r['video_id']:<28} step {r['step']:5d} ({r['time_s']:8.2f} s)"
            click.echo(f"  {where}  gain {r['audio_gain']:+.4f}")


COMMANDS = [distill, finetune, distill_report_cmd]

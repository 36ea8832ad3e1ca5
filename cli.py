"""``l2l``: the listen-to-look command line.

Commands are thin: options -> config -> one library call. Heavy imports (torch, decord, zarr, dask)
happen inside commands so ``l2l --help`` is instant.
"""

from __future__ import annotations

import json
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="listen-to-look")
def main() -> None:
    """Listen to Look: efficient action recognition in long video by previewing audio."""


def _fail(message: str, code: int = 2) -> None:
    """Print a user error without a traceback and exit non-zero."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def _echo_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


# ==== corpus: synth, prepare (pipeline) =============================================================


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--videos", default=36, show_default=True, help="Number of videos.")
@click.option("--classes", default=6, show_default=True, help="Number of classes (2-24), balanced.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--min-s", default=30.0, show_default=True, help="Shortest video (s).")
@click.option("--max-s", default=120.0, show_default=True, help="Longest video (s).")
@click.option("--width", default=160, show_default=True, help="Frame width (even).")
@click.option("--height", default=120, show_default=True, help="Frame height (even).")
@click.option("--test-fraction", default=0.25, show_default=True, help="Share of each class in 'test'.")
@click.option(
    "--segments",
    default=(2, 3),
    nargs=2,
    type=int,
    show_default=True,
    help="Evidence segments per video: MIN MAX.",
)
@click.option(
    "--segment-s",
    default=(1.5, 3.0),
    nargs=2,
    type=float,
    show_default=True,
    help="Evidence segment length (s): MIN MAX.",
)
@click.option("--faint-opacity", default=0.2, show_default=True, help="Sprite opacity in audio-led videos.")
@click.option("--faint-loudness", default=0.05, show_default=True, help="Tone loudness in visual-led videos.")
@click.option("--mp4-only", is_flag=True, help="Only H.264/AAC mp4 at 30 fps with 16 kHz mono audio.")
@click.option("--jobs", default=1, show_default=True, help="Videos encoded in parallel (same bytes).")
@click.option("--overwrite", is_flag=True, help="Replace a corpus already in OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def synth(out, videos, classes, seed, min_s, max_s, width, height, test_fraction, segments, segment_s,
          faint_opacity, faint_loudness, mp4_only, jobs, overwrite, as_json) -> None:  # fmt: skip
    """Write a labelled synthetic audio-visual corpus to OUT (videos/, manifest.csv, moments.json)."""
    from pipeline.synth import SynthConfig, synthesize

    try:
        config = SynthConfig(
            videos=videos, classes=classes, seed=seed, min_s=min_s, max_s=max_s, width=width, height=height,
            test_fraction=test_fraction, min_segments=segments[0], max_segments=segments[1],
            min_segment_s=segment_s[0], max_segment_s=segment_s[1], faint_opacity=faint_opacity,
            faint_loudness=faint_loudness, mp4_only=mp4_only,
        )  # fmt: skip
        summary = synthesize(out, config, jobs=jobs, overwrite=overwrite, progress=not as_json)
    except ValueError as e:
        _fail(str(e))
    if as_json:
        _echo_json(summary)
        return
    base = summary["uniform_baseline"]
    click.echo(
        f"wrote {summary['videos']} videos ({summary['hours']} h; {summary['containers']}) to {out} "
        f"in {summary['wall_s']} s\n"
        f"splits {summary['splits']}, modalities {summary['modalities']}\n"
        f"uniform T={base['steps']} baseline can reach at most {base['ceiling_accuracy']:.1%} "
        f"({base['ceiling_accuracy_audio']:.1%} counting audio-window overlap); chance {base['chance']:.1%}"
    )


# ---- prepare (pipeline.recipes) ----
from pipeline.recipes import available_recipes  # noqa: E402  (stdlib-only module: --help stays instant)


@main.command()
@click.argument("dataset", type=click.Choice(available_recipes()))
@click.argument("root", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Manifest CSV to write.")
@click.option("--annotations", type=click.Path(), help="Annotation file or folder (default: ROOT).")
@click.option("--split-id", default=1, show_default=True, help="ucf101: official split 1, 2 or 3.")
@click.option("--test-fraction", default=0.2, show_default=True, help="folder: held-out fraction per class.")
@click.option("--seed", default=0, show_default=True, help="folder, sports1m: seed of the per-class choice.")
@click.option("--per-class-train", default=30, show_default=True, help="sports1m: train videos per class.")
@click.option("--per-class-test", default=10, show_default=True, help="sports1m: test videos per class.")
@click.option("--min-s", default=120.0, show_default=True, help="sports1m: shortest video, seconds.")
@click.option("--max-s", default=300.0, show_default=True, help="sports1m: longest video, seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def prepare(
    dataset: str,
    root: str,
    out: str,
    annotations: str | None,
    split_id: int,
    test_fraction: float,
    seed: int,
    per_class_train: int,
    per_class_test: int,
    min_s: float,
    max_s: float,
    as_json: bool,
) -> None:
    """Build a manifest for DATASET from its annotation files and the videos under ROOT.

    Only rows with a video file are written; listed-but-missing videos go to missing.csv beside the
    manifest, and the report lists them with unlisted files, unknown labels and excluded rows.
    """
    from pipeline.recipes import PrepareConfig
    from pipeline.recipes import prepare as run_recipe

    try:
        config = PrepareConfig(
            dataset=dataset,
            root=root,
            out=out,
            annotations=annotations,
            split_id=split_id,
            test_fraction=test_fraction,
            seed=seed,
            per_class_train=per_class_train,
            per_class_test=per_class_test,
            min_s=min_s,
            max_s=max_s,
        )
        report = run_recipe(config)
    except ValueError as err:
        _fail(str(err))
    if as_json:
        _echo_json(report.to_json())
    else:
        click.echo(report.summary())


# ==== ImgAud2Vid: distill, finetune, distill-report (indexing) =====================================


class _RegistryChoice(click.Choice):
    """A Choice whose names come from a registry imported on first use (keeps ``l2l --help`` instant)."""

    def __init__(self, load) -> None:
        self._load = load
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._load())


def _model_presets() -> list[str]:
    from indexing.models import available_presets

    return available_presets()


def _clip_options(default_clips: int) -> list:
    return [
        click.option(
            "--clips-per-video", default=default_clips, show_default=True, help="Steps per video per epoch."
        ),
        click.option(
            "--train-split", default="train", show_default=True, help="Split of the training videos."
        ),
        click.option(
            "--val-split", default="auto", show_default=True, help="Validation split; auto: val, else test."
        ),
        click.option("--workers", default=2, show_default=True, help="DataLoader worker processes."),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]."),
        click.option("--seed", default=0, show_default=True, help="Seed of initialisation and sampling."),
        _threads_option,
        click.option("--json", "as_json", is_flag=True, help="Print the history as JSON."),
    ]


_threads_option = click.option(
    "--threads", default=0, show_default=True, help="torch CPU threads (0: torch's default)."
)


def _set_threads(threads: int) -> None:
    import torch

    if threads < 0:
        _fail(f"--threads {threads} must be >= 0")
    if threads:
        torch.set_num_threads(threads)


def _with(options: list):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _teacher_source(teacher_weights: str | None, teacher_preset: str | None):
    from indexing.models import load_teacher

    if (teacher_weights is None) == (teacher_preset is None):
        _fail("give exactly one of --teacher-weights PATH or --teacher-preset (e.g. tiny)")
    return load_teacher(teacher_weights, preset=teacher_preset)


def _clip_loaders(
    manifest,
    *,
    with_clips,
    clips_per_video,
    train_split,
    val_split,
    seed,
    batch_size,
    workers,
    device,
    require_labels=False,
    moments=None,
):
    from pipeline.clips import ClipConfig, ClipDataset, make_loader, split_entries
    from pipeline.corpus import read_corpus, read_moments

    segments = None
    if moments is not None:
        segments = {vid: item["segments"] for vid, item in read_moments(moments).items()}

    train_entries, val_entries, val_name = split_entries(
        read_corpus(manifest), train_split=train_split, val_split=val_split
    )
    train_cfg = ClipConfig(clips_per_video=clips_per_video, with_clips=with_clips, seed=seed)
    val_cfg = ClipConfig(
        clips_per_video=clips_per_video, sampling="uniform", with_clips=with_clips, seed=seed
    )
    train_set = ClipDataset(train_entries, train_cfg, require_labels=require_labels, moments=segments)
    val_set = ClipDataset(val_entries, val_cfg, classes=train_set.classes, moments=segments)
    for name, ds in (("train", train_set), ("val", val_set)):
        if ds.skipped:
            click.secho(f"warning: {len(ds.skipped)} unreadable {name} videos skipped", fg="yellow", err=True)
        if segments is not None and ds.untrimmed:
            click.secho(
                f"warning: {len(ds.untrimmed)} {name} videos have no segment in {moments} "
                f"(e.g. {ds.untrimmed[0]}); their clips come from the whole video",
                fg="yellow",
                err=True,
            )
    click.echo(
        f"{len(train_set.entries)} train videos ({len(train_set)} clips/epoch), "
        f"{len(val_set.entries)} validation videos from split {val_name!r} ({len(val_set)} clips)",
        err=True,
    )
    data = {
        "manifest": str(manifest),
        "train_split": train_split,
        "val_split": val_name,
        "clips_per_video": clips_per_video,
        "moments": str(moments) if moments is not None else None,
    }
    return (
        make_loader(train_set, batch_size=batch_size, num_workers=workers, device=device),
        make_loader(val_set, batch_size=batch_size, num_workers=workers, device=device),
        train_set.classes,
        data,
    )


def _report_history(history: list[dict], out: str, val_key: str, as_json: bool) -> None:
    from indexing.distill import curve_path

    if as_json:
        _echo_json({"out": out, "curve": str(curve_path(out)), "history": history})
        return
    last = history[-1]
    click.echo(
        f"{last['epoch']} epochs: train loss {last['train_loss']:.4f}, {val_key} {last[val_key]:.4f}; "
        f"wrote {out} and {curve_path(out)}"
    )


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--teacher-weights",
    type=click.Path(exists=True, dir_okay=False),
    help="torchvision r2plus1d_18 state dict file (e.g. Kinetics-400 weights).",
)
@click.option(
    "--teacher-preset",
    type=_RegistryChoice(_model_presets),
    help="Seeded random teacher instead of weights (tiny: tests and demos).",
)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Students checkpoint (resumable)."
)
@click.option(
    "--preset",
    type=_RegistryChoice(_model_presets),
    default="paper",
    show_default=True,
    help="Student architecture preset.",
)
@click.option(
    "--init-resnet18",
    type=click.Path(exists=True, dir_okay=False),
    help="torchvision resnet18 state dict (e.g. ImageNet) to initialise both trunks, as the paper.",
)
@click.option("--epochs", default=60, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--weight-decay", default=1e-4, show_default=True)
@click.option("--kl-weight", default=0.0, show_default=True, help="Weight of the teacher-student KL term.")
@_with(_clip_options(8))
def distill(
    manifest,
    teacher_weights,
    teacher_preset,
    out,
    preset,
    init_resnet18,
    epochs,
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
    threads,
    as_json,
) -> None:
    """Distil the clip teacher into image + audio students on MANIFEST's videos.

    Rerunning with the same --out and options resumes after the last completed epoch.
    """
    _set_threads(threads)
    from indexing.distill import DistillConfig
    from indexing.distill import distill as run_distill
    from indexing.errors import MediaError
    from indexing.models import build_students

    try:
        config = DistillConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            kl_weight=kl_weight,
            device=device,
            seed=seed,
        )
        teacher, teacher_meta = _teacher_source(teacher_weights, teacher_preset)
        students = build_students(preset, seed=seed, init_resnet18=init_resnet18)
        train_loader, val_loader, _, data = _clip_loaders(
            manifest,
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
            "data": data,
        }
        history = run_distill(students, teacher, train_loader, val_loader, config, out, extra=extra)
    except (ValueError, FileNotFoundError, MediaError) as err:
        _fail(str(err))
    _report_history(history, out, "val_l1", as_json)


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--students",
    "students_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Distilled students checkpoint.",
)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Fine-tuned checkpoint (resumable)."
)
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--weight-decay", default=1e-4, show_default=True)
@click.option("--freeze-students", is_flag=True, help="Train only the classifier.")
@click.option(
    "--moments",
    type=click.Path(exists=True, dir_okay=False),
    help="Ground-truth segments (moments.json): draw training and validation clips only from inside "
    "them (trimmed clips) instead of anywhere in the untrimmed videos.",
)
@_with(_clip_options(8))
def finetune(
    manifest,
    students_path,
    out,
    epochs,
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
    threads,
    as_json,
) -> None:
    """Fine-tune a classifier on z_IA (and the students) with MANIFEST's labels."""
    _set_threads(threads)
    from pathlib import Path

    from indexing.distill import FinetuneConfig
    from indexing.distill import finetune as run_finetune
    from indexing.errors import MediaError
    from indexing.models import load_students

    if Path(out).resolve() == Path(students_path).resolve():
        _fail("--out must differ from --students (the distilled checkpoint is kept)")
    try:
        config = FinetuneConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            freeze_students=freeze_students,
            device=device,
            seed=seed,
        )
        students, meta = load_students(students_path, device=device)
        train_loader, val_loader, classes, data = _clip_loaders(
            manifest,
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
            "data": data,
        }
        history = run_finetune(students, train_loader, val_loader, config, out, classes=classes, extra=extra)
    except (ValueError, FileNotFoundError, MediaError) as err:
        _fail(str(err))
    _report_history(history, out, "val_accuracy", as_json)


@main.command("distill-report")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--students", "students_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--teacher-weights",
    type=click.Path(exists=True, dir_okay=False),
    help="torchvision r2plus1d_18 state dict file the students were distilled from.",
)
@click.option("--teacher-preset", type=_RegistryChoice(_model_presets), help="Seeded random teacher preset.")
@click.option("--split", default="", help="Only videos of this split (default: all).")
@click.option("--clips-per-video", default=8, show_default=True, help="Evenly spaced steps per video.")
@click.option(
    "--audio-baseline",
    type=click.Choice(["mean", "zero"]),
    default="mean",
    show_default=True,
    help="What replaces z_A for the image-only score.",
)
@click.option("--top-k", default=5, show_default=True, help="Clips listed where audio helps most / least.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@_threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the full per-clip report as JSON.")
def distill_report_cmd(
    manifest,
    students_path,
    teacher_weights,
    teacher_preset,
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
    _set_threads(threads)
    from indexing.distill import distill_report
    from indexing.errors import MediaError
    from indexing.models import load_students
    from pipeline.clips import ClipConfig, ClipDataset, make_loader
    from pipeline.corpus import read_corpus

    try:
        teacher, teacher_meta = _teacher_source(teacher_weights, teacher_preset)
        students, meta = load_students(students_path, device=device)
        if meta["teacher_sha256"] not in (None, teacher_meta["sha256"]):
            click.secho("warning: these students were distilled from another teacher", fg="yellow", err=True)
        entries = [e for e in read_corpus(manifest) if not split or e.split == split]
        if not entries:
            raise ValueError(f"no video has split {split!r}; drop --split or pick another")
        dataset = ClipDataset(entries, ClipConfig(clips_per_video=clips_per_video, sampling="uniform"))
        loader = make_loader(dataset, batch_size=batch_size, num_workers=workers, device=device)
        report = distill_report(
            students, teacher, loader, device=device, audio_baseline=audio_baseline, top_k=top_k
        )
    except (ValueError, FileNotFoundError, MediaError) as err:
        _fail(str(err))
    if as_json:
        _echo_json(report)
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


# ==== extraction and stores: extract, store info/check/ls/export (pipeline, indexing.stores) =======


# ---- extract (pipeline.extract) ----
from indexing.stores import available_stores  # noqa: E402  (backends import zarr/h5py lazily)
from pipeline.cluster import available_clusters  # noqa: E402  (stdlib-only at import)


@main.command()
@click.argument("corpus", type=str)
@click.argument("store", type=click.Path(path_type=str))
@click.option("--students", required=True, help="Students checkpoint, or random:SEED[:PRESET].")
@click.option("--format", "fmt", type=click.Choice(available_stores()), default="zarr", show_default=True)
@click.option("--workers", type=int, help="Local worker processes (default: all cores); 0: serial.")
@click.option("--scheduler", help="Use a running Dask scheduler at this address.")
@click.option("--scheduler-file", type=click.Path(dir_okay=False), help="Use the scheduler in this file.")
@click.option("--cluster", type=click.Choice(available_clusters()), help="Cluster kind (default: inferred).")
@click.option("--cluster-config", type=click.Path(dir_okay=False), help="dask-jobqueue YAML (slurm/pbs).")
@click.option("--torch-threads", default=1, show_default=True, help="torch threads per task.")
@click.option("--resume", is_flag=True, help="Require an existing store and complete it.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--chunk-rows", default=1024, show_default=True, help="Rows per store chunk.")
@click.option("--task-steps", type=int, help="Target steps per task (default 2 x chunk rows).")
@click.option("--batch-steps", default=64, show_default=True, help="Steps per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--max-tasks", type=int, help="Run at most this many tasks, then stop (rerun to continue).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def extract(
    corpus: str,
    store: str,
    students: str,
    fmt: str,
    workers: int | None,
    scheduler: str | None,
    scheduler_file: str | None,
    cluster: str | None,
    cluster_config: str | None,
    torch_threads: int,
    resume: bool,
    dtype: str,
    chunk_rows: int,
    task_steps: int | None,
    batch_steps: int,
    device: str,
    max_tasks: int | None,
    no_progress: bool,
    as_json: bool,
) -> None:
    """Extract step features of every video of CORPUS into the feature store STORE.

    CORPUS is a manifest CSV, a directory or a glob. Rerunning on an existing STORE (same corpus and
    config) resumes it, computing only unfinished tasks. Exits 1 listing failed videos, 3 when tasks
    remain unfinished (rerun to resume).
    """
    from contextlib import nullcontext

    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.extract import ExtractConfig, run_extraction

    def log(line: str) -> None:
        click.echo(line, err=True)

    serial = workers == 0
    if serial and (scheduler or scheduler_file or cluster not in (None, "local")):
        _fail("--workers 0 runs serially here; drop it to use --scheduler/--scheduler-file/--cluster")
    if max_tasks is not None and max_tasks < 0:
        _fail(f"--max-tasks must be >= 0, got {max_tasks}")
    try:
        config = ExtractConfig(
            students=students,
            store=fmt,
            dtype=dtype,
            chunk_rows=chunk_rows,
            task_steps=task_steps,
            batch_steps=batch_steps,
            device=device,
            torch_threads=torch_threads,
        )
        client_config = None
        if not serial:
            client_config = ClusterConfig(
                kind=cluster,
                workers=workers,
                torch_threads=torch_threads,
                scheduler_address=scheduler,
                scheduler_file=scheduler_file,
                jobqueue_config=cluster_config,
            )
        with open_client(client_config, announce=log) if not serial else nullcontext() as client:
            report = run_extraction(
                corpus,
                store,
                config,
                client=client,
                resume=True if resume else None,
                max_tasks=max_tasks,
                progress=not no_progress,
                log=log,
            )
    except (ValueError, ConnectionError, TimeoutError, FileNotFoundError) as err:
        _fail(str(err))
    except OSError as err:  # a full disk, a path that cannot be a directory: the cause, not a traceback
        _fail(
            f"{err.filename or store}: {err.strerror or err}; free space or fix the path, then rerun the "
            f"same command to resume {store}"
        )
    except KeyboardInterrupt:
        _fail(f"interrupted; rerun the same command to resume {store}", code=130)
    if as_json:
        _echo_json(report.to_json())
    else:
        click.echo(report.summary())
    for f in report.failed:
        click.echo(f"failed    {f['video_id']}  {f['path']}  {f['reason']}", err=True)
    for e in report.task_errors:
        click.echo(f"task      {e['task']} rows {e['rows']}: {e['error']}", err=True)
    if not report.complete:
        click.secho(
            f"incomplete: {report.tasks_left} task(s) left; rerun the same command to resume {store}",
            fg="red",
            err=True,
        )
        sys.exit(3)
    if report.failed:
        click.secho(f"{len(report.failed)} video(s) failed (listed above)", fg="red", err=True)
        sys.exit(1)


# ---- store info/ls/check/export (indexing.stores) ----
from indexing.stores import available_stores  # noqa: E402  (backends import zarr/h5py lazily)


@main.group("store")
def store_group() -> None:
    """Inspect, check and convert feature stores."""


@store_group.command("info")
@click.argument("store", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def store_info_cmd(store: str, as_json: bool) -> None:
    """Summarise STORE: videos by status, steps, size, models and failures."""
    from indexing.stores.tools import store_info

    try:
        info = store_info(store)
    except ValueError as err:
        _fail(str(err))
    if as_json:
        _echo_json(info)
        return
    rows = max(info["rows"], 1)
    click.echo(f"store     {store} ({info['format']}, {info['dtype']}, chunk_rows {info['chunk_rows']})")
    click.echo(
        f"videos    {info['videos']}: {info['ok']} ok, {info['failed']} failed, {info['pending']} pending"
    )
    click.echo(f"steps     {info['steps']} in {info['rows']} rows")
    click.echo(f"size      {info['bytes'] / 1e6:.1f} MB ({info['bytes'] / rows:.0f} bytes/row)")
    models = info["models"]
    for name, model in models.items() if isinstance(models, dict) else enumerate(models):
        click.echo(f"model     {name}: {json.dumps(model)}")
    if info["failures"]:
        click.echo(f"failures  ({len(info['failures'])})")
        for failure in info["failures"]:
            click.echo(f"  {failure['video_id']}  {failure['path']}  {failure['reason']}")


@store_group.command("ls")
@click.argument("store", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
def store_ls_cmd(store: str, as_json: bool) -> None:
    """List the videos of STORE with status, steps, duration, fps, audio and label."""
    from indexing.stores.tools import store_ls

    try:
        videos = store_ls(store)
    except ValueError as err:
        _fail(str(err))
    if as_json:
        _echo_json(videos)
        return
    width = max([len("video_id")] + [len(v["video_id"]) for v in videos])
    click.echo(f"{'video_id':<{width}}  status   steps  duration_s    fps  audio  label  path")
    for v in videos:
        click.echo(
            f"{v['video_id']:<{width}}  {v['status']:<7}  {v['steps']:>5}  {v['duration_s']:>10.2f}  "
            f"{v['fps']:>5.2f}  {'yes' if v['has_audio'] else 'no':<5}  {v['label'] or '-'}  {v['path']}"
        )


@store_group.command("check")
@click.argument("store", type=click.Path(exists=True))
def store_check_cmd(store: str) -> None:
    """Check STORE's index and every row; exit 1 listing the problems if any."""
    from indexing.stores.tools import store_check

    problems = store_check(store, progress=True)
    if not problems:
        click.echo(f"{store}: ok")
        return
    for problem in problems:
        click.echo(problem)
    click.secho(f"{store}: {len(problems)} problem(s)", fg="red", err=True)
    sys.exit(1)


@store_group.command("export")
@click.argument("store", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(available_stores()), required=True, help="Target backend.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def store_export_cmd(store: str, out: str, fmt: str, overwrite: bool) -> None:
    """Copy STORE into a new store OUT of another format (same index, attrs and rows)."""
    from indexing.stores.tools import export_store

    try:
        export_store(store, out, fmt, overwrite=overwrite, progress=True)
    except ValueError as err:
        _fail(str(err))
    click.echo(f"wrote {out} ({fmt})")


# ==== skimming: train, evaluate, query, show (skim) ================================================


def _skim_models() -> list[str]:
    from skim.model import available_models

    return available_models()


def _skim_const(name: str):
    def load() -> list[str]:
        import skim.model

        return list(getattr(skim.model, name))

    return load


def _csv_ints(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 15,20") from None


def _csv_names(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _inference_options(fn):
    """Options that change how a trained model runs, never its weights (train, evaluate, query, show)."""
    options = [
        click.option(
            "--next-input",
            type=_RegistryChoice(_skim_const("NEXT_INPUTS")),
            help="Next LSTM input at inference: soft mixture or the argmax steps (default soft).",
        ),
        click.option("--stop-after", type=int, help="Stop after this many steps (<= --steps)."),
        click.option(
            "--exit-threshold",
            type=float,
            help="Early exit once the max class probability reaches this value.",
        ),
        click.option(
            "--exit-on",
            type=_RegistryChoice(_skim_const("EXIT_ON")),
            help="Probability the early exit thresholds: running classifier or per-step head.",
        ),
        click.option("--subsample", type=int, help="Indexing features every k steps, interpolated back."),
        click.option(
            "--recognition-store",
            type=click.Path(exists=True),
            help="Second store holding the recognition features (default: the checkpoint's).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


@main.command("train")
@click.argument("store", type=click.Path(exists=True))
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False),
    help="Labels manifest CSV (video_id,path,label,split); default: the store index's labels.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write (skim.pt).")
@click.option(
    "--model-name",
    default="imgaud_skim",
    show_default=True,
    type=_RegistryChoice(_skim_models),
    help="Registered skimming model.",
)
@click.option("--index-features", help="Comma-separated features the queries attend over, e.g. fused.")
@click.option("--recognition-features", help="Comma-separated features the chosen steps are classified with.")
@click.option("--steps", "num_steps", type=int, help="T, recurrent steps (default 10).")
@click.option("--shared-query", is_flag=True, default=None, help="One query for all indexing features.")
@click.option("--step-head-weight", type=float, help="Train a per-step head on h with this loss weight.")
@click.option("--hidden", type=int, help="LSTM hidden size (default 1024).")
@click.option("--embed", type=int, help="Psi output size (default 512).")
@_inference_options
@click.option("--epochs", type=int, help="Epochs (default 25).")
@click.option("--batch-size", type=int, help="Videos per batch (default 256).")
@click.option("--lr", type=float, help="Initial SGD learning rate (default 0.01).")
@click.option("--momentum", type=float, help="SGD momentum (default 0.9).")
@click.option("--no-nesterov", is_flag=True, help="Plain instead of Nesterov momentum.")
@click.option("--weight-decay", type=float, help="Weight decay (default 1e-4).")
@click.option("--milestones", help="Epochs where the lr drops 10x, comma-separated (default 15,20).")
@click.option("--crop-min", type=int, help="Shortest random training crop in steps (default 200).")
@click.option("--crop-max", type=int, help="Longest random training crop in steps (default 500).")
@click.option("--train-split", help="Split to train on (default train).")
@click.option("--val-split", help="Split validated each epoch (default val, else test).")
@click.option("--seed", type=int, help="Seed of weights, batch order and crops (default 0).")
@click.option("--workers", "num_workers", type=int, help="DataLoader worker processes (default 0).")
@click.option("--in-memory", is_flag=True, default=None, help="Load the store's arrays once.")
@click.option("--device", help="cpu, cuda or auto (default cpu).")
@click.option("--threads", type=int, help="torch CPU threads.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Training-curve PNG (default: OUT with .png).")
@click.option("--resume", is_flag=True, help="Continue training OUT from its last epoch.")
@click.option("--overwrite", is_flag=True, help="Replace OUT instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON.")
def train_cmd(store, labels, out, model_name, index_features, recognition_features, num_steps, shared_query,
              step_head_weight, hidden, embed, next_input, stop_after, exit_threshold, exit_on, subsample,
              recognition_store, epochs, batch_size, lr, momentum, no_nesterov, weight_decay, milestones,
              crop_min, crop_max, train_split, val_split, seed, num_workers, in_memory, device, threads, plot,
              resume, overwrite, as_json) -> None:  # fmt: skip
    """Train a skimming model on the features in STORE (paper recipe by default)."""
    from skim.train import TrainConfig, train

    model_options = _given(
        index_features=_csv_names(index_features),
        recognition_features=_csv_names(recognition_features),
        num_steps=num_steps,
        shared_query=shared_query,
        step_head_weight=step_head_weight,
        hidden=hidden,
        embed=embed,
        next_input=next_input,
        stop_after=stop_after,
        exit_threshold=exit_threshold,
        exit_on=exit_on,
        subsample=subsample,
    )
    try:
        config = TrainConfig(
            **_given(
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                momentum=momentum,
                nesterov=False if no_nesterov else None,
                weight_decay=weight_decay,
                milestones=_csv_ints(milestones),
                crop_min=crop_min,
                crop_max=crop_max,
                train_split=train_split,
                val_split=val_split,
                seed=seed,
                num_workers=num_workers,
                in_memory=in_memory,
                device=device,
                threads=threads,
            )
        )
        summary = train(
            store,
            out,
            labels=labels,
            model_name=model_name,
            model_options=model_options,
            config=config,
            recognition_store=recognition_store,
            resume=resume,
            overwrite=overwrite,
            plot=plot,
            progress=not as_json,
            log=_warnings_only if as_json else None,
        )
    except ValueError as err:
        _fail(str(err))
    if as_json:
        _echo_json(summary)
        return
    last = summary["history"][-1] if summary["history"] else {}
    click.echo(
        f"trained {summary['model']} on {summary['train_videos']} videos, {len(summary['labels'])} classes, "
        f"{summary['epochs']} epochs -> {summary['out']} (curves: {summary['plot']})"
    )
    if last.get("val_accuracy") is not None:
        click.echo(f"{summary['validated_on']} accuracy {last['val_accuracy']:.3f}")


@main.command("evaluate")
@click.argument("store", type=click.Path(exists=True))
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Skimming checkpoint.",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False),
    help="Labels manifest CSV; default: the store index's labels and splits.",
)
@click.option("--split", help="Split to evaluate (default test).")
@click.option("--train-split", help="Split the baselines train on (default train).")
@click.option(
    "--moments",
    type=click.Path(exists=True, dir_okay=False),
    help="Ground-truth segments (default: moments.json beside the manifest if present).",
)
@_inference_options
@click.option("--batch-size", type=int, help="Videos per evaluation batch (default 64).")
@click.option("--baseline-steps", type=int, help="Optimiser steps of each baseline head (default 400).")
@click.option("--curve-steps", help="Step budgets of the accuracy-vs-steps curve (default 1,2,4,6,8,10).")
@click.option("--subsample-factors", help="Factors of the accuracy-vs-sub-sampling curve (default 1,2,4,8).")
@click.option("--seed", type=int, help="Seed of the baselines (default 0).")
@click.option("--device", help="cpu, cuda or auto (default cpu).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the trade-off curves PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def evaluate_cmd(store, model_path, labels, split, train_split, moments, next_input, stop_after,
                 exit_threshold, exit_on, subsample, recognition_store, batch_size, baseline_steps,
                 curve_steps, subsample_factors, seed, device, plot, as_json) -> None:  # fmt: skip
    """Compare skimming with uniform, random and dense baselines on STORE's features."""
    from skim.evaluate import EvalConfig, evaluate

    try:
        config = EvalConfig(
            **_given(
                split=split,
                train_split=train_split,
                batch_size=batch_size,
                baseline_steps=baseline_steps,
                curve_steps=_csv_ints(curve_steps),
                subsample_factors=_csv_ints(subsample_factors),
                seed=seed,
                device=device,
            )
        )
        inference = _given(
            next_input=next_input,
            stop_after=stop_after,
            exit_threshold=exit_threshold,
            exit_on=exit_on,
            subsample=subsample,
        )
        result = evaluate(
            store,
            model_path,
            labels=labels,
            moments=moments,
            config=config,
            recognition_store=recognition_store,
            inference=inference,
            plot=plot,
            progress=not as_json,
            log=_warnings_only if as_json else None,
        )
    except ValueError as err:
        _fail(str(err))
    if as_json:
        _echo_json(result)
        return
    _echo_evaluation(result)


def _warnings_only(message: str) -> None:
    """A ``log`` for ``--json`` runs: progress notes are dropped, warnings still reach stderr."""
    if message.startswith("warning"):
        click.secho(message, fg="yellow", err=True)


def _echo_evaluation(result: dict) -> None:
    """The accuracy / cost table of ``skim.evaluate.evaluate`` for people."""

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    click.echo(f"{result['videos']} videos of split {result['split']!r}, {result['classes']} classes")
    click.echo(f"{'method':8} {'accuracy':>9} {'mAP':>7} {'GFLOPs/video':>13} {'steps':>7} {'evidence':>9}")
    for name, m in result["methods"].items():
        click.echo(
            f"{name:8} {fmt(m['accuracy'], '9.3f')} {fmt(m['map'], '7.3f')} "
            f"{fmt(m['gflops_per_video'], '13.1f')} {fmt(m['steps_used'], '7.1f')} "
            f"{fmt(m['evidence_precision'], '9.3f')}"
        )
    teacher = result["costs"]["dense_teacher_gflops_per_video"]
    click.echo(f"dense teacher reference: {teacher:.1f} GFLOPs/video")


@main.command("query")
@click.argument("store", type=click.Path(exists=True))
@click.argument("video_ids", nargs=-1)
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Skimming checkpoint.",
)
@click.option("--top-k", default=5, show_default=True, help="Labels per video.")
@click.option("--all", "all_videos", is_flag=True, help="Every ok video of the store.")
@_inference_options
@click.option("--batch-size", default=64, show_default=True, help="Videos per model batch.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--json", "as_json", is_flag=True, help="Print the answers as JSON.")
def query_cmd(store, video_ids, model_path, top_k, all_videos, next_input, stop_after, exit_threshold,
              exit_on, subsample, recognition_store, batch_size, device, as_json) -> None:  # fmt: skip
    """Top labels and the chosen moments of VIDEO_IDS (or --all) in STORE."""
    from skim.query import query

    if bool(video_ids) == all_videos:
        _fail("give VIDEO_ID(s) or --all (not both)")
    try:
        inference = _given(
            next_input=next_input,
            stop_after=stop_after,
            exit_threshold=exit_threshold,
            exit_on=exit_on,
            subsample=subsample,
        )
        answers = query(
            store,
            model_path,
            list(video_ids) if video_ids else None,
            top_k=top_k,
            batch_size=batch_size,
            device=device,
            recognition_store=recognition_store,
            inference=inference,
            progress=not as_json,
        )
    except KeyError as err:
        _fail(str(err.args[0]) if err.args else str(err))
    except ValueError as err:
        _fail(str(err))
    if as_json:
        _echo_json(answers)
        return
    for a in answers:
        top = ", ".join(f"{t['label']} {t['prob']:.2f}" for t in a["top"])
        times = " ".join(f"{m['start_s']:.1f}s" for m in a["moments"])
        click.echo(f"{a['video_id']}: {top}\n  moments: {times or '-'}")


@main.command("show")
@click.argument("store", type=click.Path(exists=True))
@click.argument("video_id")
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Skimming checkpoint.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option(
    "--moments",
    type=click.Path(exists=True, dir_okay=False),
    help="Ground-truth segments to shade on the timeline.",
)
@click.option(
    "--max-frames", default=12, show_default=True, help="Chosen frames drawn (all are on the timeline)."
)
@_inference_options
@click.option("--json", "as_json", is_flag=True, help="Print what was drawn as JSON.")
def show_cmd(store, video_id, model_path, out, moments, max_frames, next_input, stop_after, exit_threshold,
             exit_on, subsample, recognition_store, as_json) -> None:  # fmt: skip
    """Draw the moments the model chose in VIDEO_ID next to uniformly spaced frames, over its attention."""
    from pathlib import Path

    from skim.data import read_moments
    from skim.plot import _pyplot, moments_figure
    from skim.query import explain

    try:
        inference = _given(
            next_input=next_input,
            stop_after=stop_after,
            exit_threshold=exit_threshold,
            exit_on=exit_on,
            subsample=subsample,
        )
        ex = explain(
            store,
            model_path,
            video_id,
            max_frames=max_frames,
            recognition_store=recognition_store,
            inference=inference,
        )
        segments = read_moments(moments).get(video_id, []) if moments else []
    except KeyError as err:
        _fail(str(err.args[0]) if err.args else str(err))
    except ValueError as err:
        _fail(str(err))
    chosen, uniform = ex["shown_steps"], ex["uniform_steps"]
    chosen_frames = uniform_frames = None
    note = ""
    source = Path(ex["path"])
    if not source.is_file():
        note = f"frames skipped: source video {source} is gone"
    else:
        try:
            from indexing.errors import MediaError
            from pipeline.media import read_steps

            frames = read_steps(source, chosen + uniform).frames  # (len(chosen) + len(uniform), 112, 112, 3)
            chosen_frames, uniform_frames = frames[: len(chosen)], frames[len(chosen) :]
        except (MediaError, IndexError, OSError) as err:
            note = f"frames skipped: cannot decode {source}: {err}"
    top = ex["top"][0]
    fig = moments_figure(
        video_id=video_id,
        chosen_steps=chosen,
        marked_steps=ex["chosen_steps"],
        uniform_steps=uniform,
        attention=ex["attention"],
        step_s=ex["step_s"],
        chosen_frames=chosen_frames,
        uniform_frames=uniform_frames,
        segments=segments,
        title=f"{top['label']} ({top['prob']:.2f})",
        note=note,
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    summary = {
        "video_id": video_id,
        "out": str(out),
        "top": ex["top"],
        "moments": ex["moments"],
        "shown_steps": chosen,
        "uniform_steps": uniform,
        "frames": chosen_frames is not None,
        "note": note or None,
    }
    if as_json:
        _echo_json(summary)
        return
    if note:
        click.echo(note, err=True)
    click.echo(f"wrote {out}: {top['label']} ({top['prob']:.2f}), {len(ex['chosen_steps'])} chosen steps")


# ==== demo ==========================================================================================


@main.command()
@click.argument("out", default="l2l-demo", type=click.Path(file_okay=False))
@click.option("--videos", default=96, show_default=True, help="Synthetic videos to generate.")
@click.option("--classes", default=4, show_default=True, help="Synthetic classes.")
@click.option("--workers", default=2, show_default=True, help="Local Dask worker processes for extraction.")
@click.option("--seed", default=0, show_default=True, help="Seed of the corpus and every training run.")
@click.pass_context
def demo(ctx: click.Context, out: str, videos: int, classes: int, workers: int, seed: int) -> None:
    """Run the whole system on a generated corpus: synth, distill, finetune, extract, train, evaluate, show.

    Every stage is resumable, so rerunning the command after an interruption continues where it stopped.
    """
    import time
    from pathlib import Path

    root = Path(out)
    corpus, manifest = root / "corpus", root / "corpus" / "manifest.csv"
    students, students_ft = root / "students.pt", root / "students-ft.pt"
    store, skim_model = root / "features.zarr", root / "skim.pt"
    timings: dict[str, float] = {}

    def stage(name: str, fn, **kwargs) -> None:
        click.secho(f"\n== {name} ==", bold=True, err=True)
        start = time.perf_counter()
        try:
            ctx.invoke(fn, **kwargs)
        except SystemExit as err:  # a stage that ends non-zero stops the demo with its code
            if err.code:
                _fail(f"demo stage {name!r} failed; fix the error above and rerun to continue", err.code)
        timings[name] = time.perf_counter() - start

    started = time.perf_counter()
    if not manifest.exists():
        stage("synth: generate a labelled corpus", synth, out=str(corpus), videos=videos, classes=classes,
              seed=seed, min_s=30.0, max_s=90.0, jobs=2)  # fmt: skip
    moments = corpus / "moments.json"
    common = dict(preset="tiny", batch_size=32, lr=0.05, workers=2, seed=seed)
    stage("distill: students from the tiny teacher", distill, manifest=str(manifest), teacher_preset="tiny",
          out=str(students), epochs=2, clips_per_video=3, **common)  # fmt: skip
    common.pop("preset")
    # Trimmed clips from the ground-truth moments, as the paper's students see on Kinetics.
    stage("finetune: classifier on trimmed clips (moments.json)", finetune, manifest=str(manifest),
          students_path=str(students), out=str(students_ft), epochs=4, clips_per_video=4,
          moments=str(moments), **common)  # fmt: skip
    stage("extract: features into a Zarr store on a local Dask cluster", extract, corpus=str(manifest),
          store=str(store), students=str(students_ft), workers=workers)  # fmt: skip
    # The paper recipe (SGD, lr 0.01) with small batches and more epochs: a few dozen training videos
    # make one batch of 256, and the attention needs a few hundred updates to sharpen.
    stage("train: the skimming model on stored features", train_cmd, store=str(store), labels=str(manifest),
          out=str(skim_model), epochs=60, batch_size=12, lr=0.01, milestones="45", crop_min=100,
          crop_max=200, in_memory=True, seed=seed, resume=skim_model.exists())  # fmt: skip

    from skim.evaluate import EvalConfig, evaluate

    click.secho("\n== evaluate: skimming vs uniform, random and dense ==", bold=True, err=True)
    start = time.perf_counter()
    result = evaluate(str(store), str(skim_model), labels=str(manifest), moments=str(moments),
                      config=EvalConfig(seed=seed), plot=str(root / "tradeoff.png"))  # fmt: skip
    (root / "evaluation.json").write_text(json.dumps(result, indent=2, default=str))
    timings["evaluate"] = time.perf_counter() - start

    from pipeline.corpus import read_corpus

    test_ids = [e.video_id for e in read_corpus(manifest) if e.split == "test"]
    video_id = test_ids[0]
    stage("query: one test video", query_cmd, store=str(store), video_ids=(video_id,),
          model_path=str(skim_model))  # fmt: skip
    stage("show: its moments", show_cmd, store=str(store), video_id=video_id, model_path=str(skim_model),
          out=str(root / "moments.png"), moments=str(corpus / "moments.json"))  # fmt: skip

    total = time.perf_counter() - started
    click.secho("\n== summary ==", bold=True)
    _echo_evaluation(result)
    click.echo("\nstage times: " + ", ".join(f"{k.split(':')[0]} {v:.0f}s" for k, v in timings.items()))
    click.echo(f"total {total / 60:.1f} min. Files in {root}/:")
    for name, what in [
        ("corpus/manifest.csv", "the generated corpus (videos/, moments.json)"),
        ("students-ft.pt", "fine-tuned ImgAud2Vid students"),
        ("features.zarr", "the feature store (l2l store info)"),
        ("skim.pt", "the skimming model (+ training curve .png)"),
        ("evaluation.json", "accuracy, mAP, GFLOPs, evidence precision per method"),
        ("tradeoff.png", "accuracy vs steps used and vs sub-sampling"),
        ("moments.png", f"chosen moments of {video_id}"),
    ]:
        click.echo(f"  {name:20} {what}")


if __name__ == "__main__":
    main()

"""Commands over videos and stores: ``synth``, ``prepare``, ``extract`` and the ``store`` group.

Thin: options -> config -> one library call -> report. Only click, the standard library and stdlib-only
registries are imported at module level, so ``l2l --help`` stays instant; ``cli.py`` registers
:data:`COMMANDS`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from indexing.errors import ConfigError, IncompleteError, L2LError
from indexing.feature_sets import STUDENT_SETS, available_feature_sets  # stdlib and numpy only
from indexing.options import (
    OutputPath,
    RegistryChoice,
    config_options,
    echo_json,
    json_option,
    no_progress_option,
    note,
    show_progress,
)
from indexing.stores import available_stores  # backends import zarr/h5py lazily
from pipeline.cluster import ClusterConfig  # stdlib-only at import
from pipeline.recipes import PrepareConfig, available_recipes  # click and stdlib only at import

# ==== corpus: synth, prepare =======================================================================


@click.command()
@click.argument("out", type=OutputPath(file_okay=False))
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
@no_progress_option
@json_option("the summary")
def synth(
    out,
    videos,
    classes,
    seed,
    min_s,
    max_s,
    width,
    height,
    test_fraction,
    segments,
    segment_s,
    faint_opacity,
    faint_loudness,
    mp4_only,
    jobs,
    overwrite,
    no_progress,
    as_json,
) -> None:
    """Write a labelled synthetic audio-visual corpus to OUT (videos/, manifest.csv, moments.json)."""
    from pipeline.synth import SynthConfig, synthesize

    config = SynthConfig(
        videos=videos,
        classes=classes,
        seed=seed,
        min_s=min_s,
        max_s=max_s,
        width=width,
        height=height,
        test_fraction=test_fraction,
        min_segments=segments[0],
        max_segments=segments[1],
        min_segment_s=segment_s[0],
        max_segment_s=segment_s[1],
        faint_opacity=faint_opacity,
        faint_loudness=faint_loudness,
        mp4_only=mp4_only,
    )
    progress = show_progress(no_progress, as_json)
    summary = synthesize(out, config, jobs=jobs, overwrite=overwrite, progress=progress)
    if as_json:
        echo_json(summary)
        return
    base = summary["uniform_baseline"]
    click.echo(
        f"wrote {summary['videos']} videos ({summary['hours']} h; {summary['containers']}) to {out} "
        f"in {summary['seconds']} s\n"
        f"splits {summary['splits']}, modalities {summary['modalities']}\n"
        f"uniform T={base['steps']} baseline can reach at most {base['ceiling_accuracy']:.1%} "
        f"({base['ceiling_accuracy_audio']:.1%} counting audio-window overlap); chance {base['chance']:.1%}"
    )


@click.command()
@click.argument("dataset", type=click.Choice(available_recipes()))
@click.argument("root", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", required=True, type=OutputPath(dir_okay=False), help="Manifest CSV to write.")
@config_options(PrepareConfig, param="recipe_options", build=dict)
@json_option("the report")
def prepare(dataset: str, root: str, out: str, recipe_options: dict[str, Any], as_json: bool) -> None:
    """Build a manifest for DATASET from its annotation files and the videos under ROOT.

    Only rows with a video file are written; listed-but-missing videos go to missing.csv beside the
    manifest, and the report lists them with unlisted files, unknown labels and excluded rows. Options
    name the recipes they apply to; the others ignore them.
    """
    from pipeline.recipes import prepare as run_recipe

    report = run_recipe(PrepareConfig(dataset=dataset, root=root, out=out, **recipe_options))
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(report.summary())


# ==== extract ======================================================================================


def _preflight(store: str, *, corpus: str | None = None) -> None:
    """Refuse what would fail anyway before any cluster starts: a bad corpus, a path holding something that
    is not a store, a store another live writer holds (``StoreError``, at once)."""
    from pathlib import Path

    from indexing.stores import LOCK_NAME, acquire_lock, open_store

    if corpus is not None:
        from pipeline.corpus import read_corpus

        read_corpus(corpus)  # read again by the run, which reports what it derived
    path = Path(store)
    if not (path.is_dir() and any(path.iterdir())):
        return
    if corpus is not None:
        open_store(path).close()  # something else at STORE is refused here, not after the cluster starts
    with acquire_lock(path / LOCK_NAME):  # a live writer holds it: refused at once (a damaged store too)
        pass


def _cluster_options(values: dict[str, Any]) -> dict[str, Any]:
    """The cluster options given, with ``--dashboard-address none`` meaning no dashboard."""
    if str(values.get("dashboard_address", "")).lower() in ("none", "off"):
        values["dashboard_address"] = None
    return values


@click.command()
@click.argument("corpus", type=str)
@click.argument("store", type=OutputPath(path_type=str), required=False)
@click.option("--students", help="Students checkpoint, or random:SEED[:PRESET] (not with --add-features).")
@click.option(
    "--features",
    default=",".join(STUDENT_SETS),
    show_default=True,
    help=f"Feature sets to extract, comma-separated ({', '.join(available_feature_sets())}); the students' "
    "image,audio,fused are always among them.",
)
@click.option(
    "--add-features",
    help="Add these feature sets (e.g. teacher,inputs) to the finished store given as the only argument, "
    "by the same tasks: l2l extract --add-features teacher STORE.",
)
@click.option(
    "--teacher-weights", type=click.Path(exists=True), help="Teacher state dict (teacher feature set)."
)
@click.option(
    "--teacher-preset", help="Seeded random teacher preset instead of weights (tiny: tests, demos)."
)
@click.option(
    "--model-weights",
    multiple=True,
    metavar="NAME=PATH",
    help="Local state dict of a torchvision image-model feature set named in --features / --add-features "
    "(e.g. resnet50=resnet50.pth; never downloaded); repeat for several.",
)
@click.option(
    "--format",
    "fmt",
    type=RegistryChoice(available_stores),
    default="zarr",
    show_default=True,
    help="Store backend to create.",
)
@config_options(ClusterConfig, param="cluster_options", build=_cluster_options)
@click.option(
    "--threads",
    "--torch-threads",
    "torch_threads",
    default=1,
    show_default=True,
    help="torch CPU threads per task (--torch-threads: the older name).",
)
@click.option("--resume", is_flag=True, help="Require an existing store and complete it.")
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Stored feature precision.",
)
@click.option("--chunk-rows", default=1024, show_default=True, help="Rows per store chunk.")
@click.option("--task-steps", type=int, help="Target steps per task.  [default: 2 x chunk rows]")
@click.option("--batch-steps", default=64, show_default=True, help="Steps per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--max-tasks", type=int, help="Run at most this many tasks, then stop (rerun to continue).")
@no_progress_option
@json_option("the report")
def extract(
    corpus,
    store,
    students,
    features,
    add_features,
    teacher_weights,
    teacher_preset,
    model_weights,
    fmt,
    cluster_options,
    torch_threads,
    resume,
    dtype,
    chunk_rows,
    task_steps,
    batch_steps,
    device,
    max_tasks,
    no_progress,
    as_json,
) -> None:
    """Extract step features of every video of CORPUS into the feature store STORE.

    CORPUS is a manifest CSV, a directory or a glob. Rerunning on an existing STORE (same corpus and
    config) resumes it, computing only unfinished tasks. --workers 0 runs serially in this process, without
    Dask. Exits 1 listing failed videos, 3 when tasks remain unfinished (rerun to resume).
    """
    from contextlib import nullcontext

    from pipeline.cluster import open_client
    from pipeline.extract import ExtractConfig, run_extraction

    serial = cluster_options.get("workers") == 0
    if serial and set(cluster_options) - {"workers"}:
        flags = ", ".join(sorted(set(cluster_options) - {"workers"}))
        raise ConfigError(f"--workers 0 runs serially here, without a cluster; drop it to use {flags}")
    if max_tasks is not None and max_tasks < 0:
        raise ConfigError(f"--max-tasks must be >= 0, got {max_tasks}")
    if teacher_weights and teacher_preset:
        raise ConfigError("give one of --teacher-weights PATH or --teacher-preset NAME, not both")
    teacher = teacher_weights or (f"preset:{teacher_preset}" if teacher_preset else "")
    if add_features is not None:
        if store is not None or students:
            raise ConfigError(
                "--add-features takes the store only (its corpus and students are recorded in it): "
                "l2l extract --add-features SETS STORE"
            )
        store, corpus = corpus, None
    elif store is None:
        raise ConfigError(
            "missing STORE: l2l extract CORPUS STORE --students ... (or --add-features SETS STORE)"
        )
    elif not students:
        raise ConfigError("missing --students: a checkpoint, or random:SEED[:PRESET] for pipeline tests")
    try:
        if add_features is not None:
            return _add_features(
                store,
                add_features,
                teacher,
                cluster_options,
                serial,
                torch_threads,
                max_tasks,
                no_progress,
                as_json,
                model_weights=model_weights,
            )
        config = ExtractConfig(
            students=students,
            features=features,
            teacher=teacher,
            model_weights=model_weights,
            store=fmt,
            dtype=dtype,
            chunk_rows=chunk_rows,
            task_steps=task_steps,
            batch_steps=batch_steps,
            device=device,
            torch_threads=torch_threads,
        )
        client_config = None if serial else ClusterConfig(**cluster_options, torch_threads=torch_threads)
        _preflight(store, corpus=corpus)
        with open_client(client_config, announce=note) if not serial else nullcontext() as client:
            report = run_extraction(
                corpus,
                store,
                config,
                client=client,
                resume=True if resume else None,
                max_tasks=max_tasks,
                progress=show_progress(no_progress),
                log=note,
            )
    except L2LError:  # ClusterError is an OSError too: keep its own message and code
        raise
    except OSError as err:  # a full disk, a path that cannot be a directory: the cause, not a traceback
        raise ConfigError(
            f"{err.filename or store}: {err.strerror or err}; free space or fix the path, then rerun the "
            f"same command to resume {store}"
        ) from err
    except KeyboardInterrupt:
        click.secho(f"interrupted; rerun the same command to resume {store}", fg="red", err=True)
        sys.exit(130)
    _extract_report(report, store, as_json)


def _add_features(
    store,
    sets,
    teacher,
    cluster_options,
    serial,
    torch_threads,
    max_tasks,
    no_progress,
    as_json,
    *,
    model_weights=(),
) -> None:
    """``l2l extract --add-features SETS STORE``: the same tasks, cluster options and reports."""
    from contextlib import nullcontext

    from pipeline.cluster import open_client
    from pipeline.extract import add_features

    client_config = None if serial else ClusterConfig(**cluster_options, torch_threads=torch_threads)
    with open_client(client_config, announce=note) if not serial else nullcontext() as client:
        report = add_features(
            store,
            sets,
            teacher=teacher,
            model_weights=model_weights,
            client=client,
            max_tasks=max_tasks,
            progress=show_progress(no_progress),
            log=note,
        )
    _extract_report(report, store, as_json)


def _extract_report(report, store, as_json) -> None:
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(report.summary())
    for f in report.failed:
        click.echo(f"failed    {f['video_id']}  {f['path']}  {f['reason']}", err=True)
    for e in report.task_errors:
        click.echo(f"task      {e['task']} rows {e['rows']}: {e['reason']}", err=True)
    if not report.complete:
        raise IncompleteError(
            f"incomplete: {report.tasks_left} task(s) left; rerun the same command to resume {store}"
        )
    if report.failed:
        click.secho(f"{len(report.failed)} video(s) failed (listed above)", fg="red", err=True)
        sys.exit(1)


# ==== store info/ls/check/export ===================================================================


@click.group("store")
def store_group() -> None:
    """Inspect, check and convert feature stores."""


@store_group.command("info")
@click.argument("store", type=click.Path(exists=True))
@json_option("the summary")
def store_info_cmd(store: str, as_json: bool) -> None:
    """Summarise STORE: videos by status, steps, size, models and failures."""
    from indexing.stores.tools import store_info

    info = store_info(store)
    if as_json:
        echo_json(info)
        return
    rows = max(info["rows"], 1)
    click.echo(
        f"store     {store} ({info['format']}, {info['dtype']}, codec {info['compression']}, "
        f"chunk_rows {info['chunk_rows']})"
    )
    click.echo(
        f"videos    {info['videos']}: {info['ok']} ok, {info['failed']} failed, {info['pending']} pending"
    )
    tasks = f"tasks     {info['tasks_done']} of {info['tasks']} done"
    if not info["complete"]:
        tasks += f"; incomplete: rerun `l2l extract` with the same arguments to finish {store}"
    click.echo(tasks)
    click.echo(f"steps     {info['steps']} in {info['rows']} rows")
    click.echo(f"size      {info['bytes'] / 1e6:.1f} MB ({info['bytes'] / rows:.0f} bytes/row)")
    click.echo(f"integrity format {info['format_version']}, checksums: {info['checksums']}")
    models = info["models"]
    for name, model in models.items() if isinstance(models, dict) else enumerate(models):
        click.echo(f"model     {name}: {_describe_model(model)}")
    for name, fs in info.get("feature_sets", {}).items():
        sha = (fs.get("sha256") or "-")[:12]
        click.echo(
            f"features  {name}: {', '.join(fs['arrays'])} by {fs.get('model')} {fs.get('spec') or ''} "
            f"(weights sha256 {sha}); {fs.get('tasks_done')} of {info['tasks']} tasks"
        )
    if info["failures"]:
        click.echo(f"failures  ({len(info['failures'])})")
        for failure in info["failures"]:
            click.echo(f"  {failure['video_id']}  {failure['path']}  {failure['reason']}")


def _describe_model(model: Any) -> str:
    """One line for a model recorded in a store's attrs: its plain fields, sha256s shortened."""
    if not isinstance(model, dict):
        return str(model)
    parts = []
    for key, value in model.items():
        if isinstance(value, dict | list):
            continue  # nested details: `l2l store info --json` has them
        if isinstance(value, str) and "sha256" in key:
            value = value[:12]
        parts.append(f"{key} {value}")
    return ", ".join(parts) or "-"


@store_group.command("ls")
@click.argument("store", type=click.Path(exists=True))
@json_option("the listing")
def store_ls_cmd(store: str, as_json: bool) -> None:
    """List the videos of STORE with status, steps, duration, fps, audio and label (the feature sets every
    row holds, with the model and weights sha256 that made each, go to stderr first)."""
    from indexing.stores import open_store
    from indexing.stores.tools import store_ls

    videos = store_ls(store)
    if as_json:
        echo_json(videos)
        return
    with open_store(store) as s:
        sets = s.feature_sets()
    made = [f"{name} ({fs.get('model')} {str(fs.get('sha256') or '-')[:12]})" for name, fs in sets.items()]
    note(f"feature sets: {', '.join(made)}")
    width = max([len("video_id")] + [len(v["video_id"]) for v in videos])
    label_width = max([len("label")] + [len(v["label"] or "-") for v in videos])
    click.echo(
        f"{'video_id':<{width}}  status   steps  duration_s     fps  audio  {'label':<{label_width}}  path"
    )
    for v in videos:
        click.echo(
            f"{v['video_id']:<{width}}  {v['status']:<7}  {v['steps']:>5}  {v['duration_s']:>10.2f}  "
            f"{v['fps']:>6.2f}  {'yes' if v['has_audio'] else 'no':<5}  {v['label'] or '-':<{label_width}}  "
            f"{v['path']}"
        )


@store_group.command("check")
@click.argument("store", type=click.Path(exists=True))
@click.option("--quick", is_flag=True, help="Presence and sizes only: no data read (fast on huge stores).")
@no_progress_option
@json_option("the problems (kind, array, rows, video_ids, task, message)")
def store_check_cmd(store: str, quick: bool, no_progress: bool, as_json: bool) -> None:
    """Check STORE: index, task markers, every recorded file and (without --quick) every byte and row.

    Exits 1 listing the problems if any (`l2l store repair STORE` fixes them); exits 3 when nothing is
    damaged but the extraction is unfinished (rerun `l2l extract` with the same arguments).
    """
    from indexing.stores.tools import check_store, store_info

    problems = check_store(store, quick=quick, progress=show_progress(no_progress, as_json))
    info = store_info(store) if not problems else {"complete": False, "tasks": None, "tasks_done": None}
    complete = info["complete"]
    if as_json:
        echo_json(
            {
                "store": store,
                "quick": quick,
                "ok": not problems and complete,
                "complete": complete,
                "tasks": info["tasks"],
                "tasks_done": info["tasks_done"],
                "problems": [p.to_dict() for p in problems],
            }
        )
    elif not problems and complete:
        click.echo(f"{store}: ok")
    for problem in [] if as_json else problems:
        click.echo(f"{problem.kind:<10} {problem.message}")
    if problems:
        click.secho(
            f"{store}: {len(problems)} problem(s); repair with `l2l store repair {store}`", fg="red", err=True
        )
        sys.exit(1)
    if not complete:
        raise IncompleteError(
            f"{store}: no damage found, but incomplete: {info['tasks_done']} of {info['tasks']} tasks done; "
            "rerun `l2l extract` with the same arguments to finish"
        )


@store_group.command("repair")
@click.argument("store", type=click.Path(exists=True))
@config_options(ClusterConfig, param="cluster_options", build=_cluster_options)
@no_progress_option
@json_option("the repair report")
def store_repair_cmd(store: str, cluster_options: dict[str, Any], no_progress: bool, as_json: bool) -> None:
    """Repair STORE in place: re-extract exactly its damaged tasks, rewrite its index, drop stray files.

    Uses the students and extraction config recorded in STORE, on the same cluster options as `l2l
    extract` (--workers 0: serially here). Exits 1 when problems remain (listed).
    """
    from contextlib import nullcontext

    from pipeline.cluster import open_client
    from pipeline.extract import repair_store

    serial = cluster_options.get("workers") == 0
    threads = 1
    client_config = None if serial else ClusterConfig(**cluster_options, torch_threads=threads)
    _preflight(store)
    with open_client(client_config, announce=note) if not serial else nullcontext() as client:
        report = repair_store(store, client=client, progress=show_progress(no_progress, as_json), log=note)
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(report.summary())
    if report.remaining:
        for problem in report.remaining:
            click.echo(f"remains   {problem['kind']}: {problem['message']}", err=True)
        sys.exit(1)


@store_group.command("export")
@click.argument("store", type=click.Path(exists=True))
@click.argument("out", type=OutputPath())
@click.option(
    "--format", "fmt", type=RegistryChoice(available_stores), required=True, help="Target store backend."
)
@click.option("--compression", default="default", show_default=True, help="Target codec (backend's names).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@no_progress_option
@json_option("what was written")
def store_export_cmd(
    store: str, out: str, fmt: str, compression: str, overwrite: bool, no_progress: bool, as_json: bool
) -> None:
    """Copy STORE into a new store OUT (same index, attrs and rows), with checksums on every byte.

    Also the way to upgrade a store written before checksums (format 1) to the current format.
    """
    import time

    from indexing.stores.tools import export_store

    started = time.perf_counter()
    progress = show_progress(no_progress, as_json)
    written = export_store(store, out, fmt, compression=compression, overwrite=overwrite, progress=progress)
    seconds = round(time.perf_counter() - started, 2)
    if as_json:
        echo_json(
            {
                "store": store,
                "out": str(written),
                "format": fmt,
                "compression": compression,
                "seconds": seconds,
            }
        )
    else:
        click.echo(f"wrote {written} ({fmt}) in {seconds} s")


COMMANDS = [synth, prepare, extract, store_group]

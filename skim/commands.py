"""Skimming commands: ``train``, ``evaluate``, ``query``, ``show``.

Thin: options -> config -> one library call -> report. Only click and the standard library are imported at
module level (``l2l --help`` stays instant); ``cli.py`` registers :data:`COMMANDS`. This package never
decodes video: ``show`` draws frames only when the caller put a frame reader in the click context's
``meta`` under :data:`FRAME_READER` (``cli.py`` does, from ``pipeline.media``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import click

from indexing.errors import ConfigError
from indexing.options import (
    InferenceConfig,
    OutputPath,
    RegistryChoice,
    csv_ints,
    csv_names,
    echo_json,
    given,
    inference_options,
    json_option,
    no_progress_option,
    set_threads,
    show_progress,
    stopping_options,
    threads_option,
    warnings_only,
)

FRAME_READER = "l2l.read_frames"  # ctx.meta key: (path, steps) -> (len(steps), H, W, 3) uint8 frames


def _skim_models() -> list[str]:
    from skim.model import available_models

    return available_models()


def _skim_const(name: str):
    def load() -> list[str]:
        import skim.model

        return list(getattr(skim.model, name))

    return load


def _skim_train_const(name: str):
    def load() -> list[str]:
        import skim.train

        return list(getattr(skim.train, name))

    return load


_inference_options = inference_options(next_inputs=_skim_const("NEXT_INPUTS"), exit_on=_skim_const("EXIT_ON"))


def _allow_other_students_option(fn):
    return click.option(
        "--allow-other-students",
        is_flag=True,
        help="Use a store made by other students than the model's training store (features differ).",
    )(fn)


def _model_option(fn):
    return click.option(
        "--model",
        "model_path",
        required=True,
        type=click.Path(exists=True, dir_okay=False),
        help="Skimming checkpoint.",
    )(fn)


@click.command("train")
@click.argument("store", type=click.Path(exists=True))
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False),
    help="Labels manifest CSV (video_id,path,label,split).  [default: the store index's labels]",
)
@click.option(
    "--out",
    required=True,
    type=OutputPath(dir_okay=False),
    help="Compact model to write (skim.pt: what query/evaluate/show load); the resumable state with the "
    "optimiser goes beside it as OUT.resume.",
)
@click.option(
    "--model-name",
    default="imgaud_skim",
    show_default=True,
    type=RegistryChoice(_skim_models),
    help="Registered skimming model.",
)
@click.option("--index-features", help="Comma-separated features the queries attend over, e.g. fused.")
@click.option("--recognition-features", help="Comma-separated features the chosen steps are classified with.")
@click.option("--steps", "num_steps", type=int, help="T, recurrent steps.  [default: 10]")
@click.option("--shared-query", is_flag=True, default=None, help="One query for all indexing features.")
@click.option("--step-head-weight", type=float, help="Train a per-step head on h with this loss weight.")
@click.option("--hidden", type=int, help="LSTM hidden size.  [default: 1024]")
@click.option(
    "--embed", type=int, help="Psi output size.  [default: 512; with --init students, the students']"
)
@_inference_options
@click.option(
    "--init",
    type=RegistryChoice(_skim_train_const("INITS")),
    help="Where Psi and the classifier start: students (paper: the fine-tuned students checkpoint that made "
    "STORE; Psi frozen, classifier at 0.1x the lr) or scratch.  [default: students]",
)
@click.option(
    "--students",
    type=click.Path(exists=True, dir_okay=False),
    help="With --init students: this students checkpoint instead of the one STORE records (same weights).",
)
@stopping_options(epochs=200, patience=15, lr_patience=5, paper="15,20 of 25 epochs in batches of 256")
@click.option(
    "--min-updates",
    type=int,
    help="Patience and lr drops count only after this many optimiser updates (the attention needs a few "
    "hundred to leave its uniform start).  [default: 400]",
)
@click.option(
    "--batch-size",
    type=int,
    help="Videos per batch.  [default: training videos / 8, between 8 and 256 (the paper's)]",
)
@click.option("--lr", type=float, help="Initial SGD learning rate.  [default: 0.01]")
@click.option("--momentum", type=float, help="SGD momentum.  [default: 0.9]")
@click.option("--no-nesterov", is_flag=True, help="Plain instead of Nesterov momentum.")
@click.option("--weight-decay", type=float, help="Weight decay.  [default: 1e-4]")
@click.option("--crop-min", type=int, help="Shortest random training crop in steps.  [default: 200]")
@click.option("--crop-max", type=int, help="Longest random training crop in steps.  [default: 500]")
@click.option("--train-split", help="Split to train on.  [default: train]")
@click.option(
    "--val-split",
    help="Split validated each epoch, choosing the kept epoch; none: no validation.  "
    "[default: val, else 15% of the training videos held out]",
)
@click.option("--seed", type=int, help="Seed of weights, batch order and crops.  [default: 0]")
@click.option("--workers", "num_workers", type=int, help="DataLoader worker processes.  [default: 0]")
@click.option("--in-memory", is_flag=True, default=None, help="Load the store's arrays once.")
@click.option(
    "--shuffle",
    type=click.Choice(["video", "block"]),
    help="video: uniform batches; block: shuffle store chunks, then videos in a window (reads).  "
    "[default: video]",
)
@click.option(
    "--length-buckets", is_flag=True, default=None, help="Batch videos of similar length (less padding)."
)
@click.option("--device", help="cpu, cuda or auto.  [default: cpu]")
@click.option("--threads", type=int, help="torch CPU threads.  [default: torch's]")
@click.option("--plot", type=OutputPath(dir_okay=False), help="Training-curve PNG.  [default: OUT with .png]")
@click.option("--resume", is_flag=True, help="Continue training from OUT.resume after its last epoch.")
@click.option("--overwrite", is_flag=True, help="Replace OUT instead of refusing.")
@no_progress_option
@json_option("the training summary")
def train_cmd(
    store,
    labels,
    out,
    model_name,
    index_features,
    recognition_features,
    num_steps,
    shared_query,
    step_head_weight,
    hidden,
    embed,
    inference: InferenceConfig,
    init,
    students,
    min_updates,
    batch_size,
    lr,
    momentum,
    no_nesterov,
    weight_decay,
    crop_min,
    crop_max,
    train_split,
    val_split,
    seed,
    num_workers,
    in_memory,
    shuffle,
    length_buckets,
    device,
    threads,
    plot,
    resume,
    overwrite,
    no_progress,
    as_json,
    stopping,
) -> None:
    """Train a skimming model on the features in STORE (the paper's model and optimiser).

    OUT holds the epoch with the best validation accuracy (ties: lower validation loss), OUT.resume the
    last one. Training stops after --patience epochs without improvement, at --epochs or --max-updates.
    The paper's fixed recipe: --epochs 25 --batch-size 256 --milestones 15,20 --patience 0.
    """
    from skim.train import TrainConfig, train

    started = time.perf_counter()

    model_options = given(
        index_features=csv_names(index_features),
        recognition_features=csv_names(recognition_features),
        num_steps=num_steps,
        shared_query=shared_query,
        step_head_weight=step_head_weight,
        hidden=hidden,
        embed=embed,
        **inference.overrides(),
    )
    config = TrainConfig(
        **stopping,
        **given(
            min_updates=min_updates,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            nesterov=False if no_nesterov else None,
            weight_decay=weight_decay,
            crop_min=crop_min,
            crop_max=crop_max,
            train_split=train_split,
            val_split=val_split,
            seed=seed,
            num_workers=num_workers,
            in_memory=in_memory,
            shuffle=shuffle,
            length_buckets=length_buckets,
            device=device,
            threads=threads,
            init=init,
        ),
    )
    summary = train(
        store,
        out,
        labels=labels,
        model_name=model_name,
        model_options=model_options,
        config=config,
        recognition_store=inference.recognition_store,
        students=students,
        resume=resume,
        overwrite=overwrite,
        plot=plot,
        progress=show_progress(no_progress, as_json),
        log=warnings_only if as_json else None,
    )
    if as_json:
        echo_json({**summary, "seconds": round(time.perf_counter() - started, 2)})
        return
    last = summary["history"][-1] if summary["history"] else {}
    click.echo(
        f"trained {summary['model']} on {summary['train_videos']} videos, {len(summary['labels'])} classes, "
        f"{summary['epochs']} epochs in batches of {summary['batch_size']} -> {summary['out']} (epoch "
        f"{summary['best_epoch']}; curves: {summary['curve']})"
    )
    if last.get("val_accuracy") is not None:
        click.echo(f"{summary['validated_on']} accuracy {last['val_accuracy']:.3f} at the last epoch")
    click.echo(summary["message"])


@click.command("evaluate")
@click.argument("store", type=click.Path(exists=True))
@_model_option
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False),
    help="Labels manifest CSV.  [default: the store index's labels and splits]",
)
@click.option("--split", help="Split to evaluate.  [default: test]")
@click.option("--train-split", help="Split the baselines train on.  [default: train]")
@click.option(
    "--moments",
    type=click.Path(exists=True, dir_okay=False),
    help="Ground-truth segments.  [default: moments.json beside the manifest if present]",
)
@_allow_other_students_option
@_inference_options
@click.option("--batch-size", type=int, help="Videos per evaluation batch.  [default: 64]")
@click.option("--baseline-steps", type=int, help="Optimiser steps of each baseline head.  [default: 400]")
@click.option("--curve-steps", help="Step budgets of the accuracy-vs-steps curve.  [default: 1,2,4,6,8,10]")
@click.option(
    "--subsample-factors", help="Factors of the accuracy-vs-sub-sampling curve.  [default: 1,2,4,8]"
)
@click.option("--seed", type=int, help="Seed of the baselines.  [default: 0]")
@click.option("--device", help="cpu, cuda or auto.  [default: cpu]")
@click.option(
    "--scratch-dir",
    type=click.Path(file_okay=False),
    help="Directory for the baselines' temporary pooled features (~40 KB per training video at the paper's "
    "sizes; removed at the end).  [default: $TMPDIR]",
)
@threads_option
@click.option("--plot", type=OutputPath(dir_okay=False), help="Write the trade-off curves PNG here.")
@no_progress_option
@json_option("the results")
def evaluate_cmd(
    store,
    model_path,
    labels,
    split,
    train_split,
    moments,
    allow_other_students,
    inference: InferenceConfig,
    batch_size,
    baseline_steps,
    curve_steps,
    subsample_factors,
    seed,
    device,
    scratch_dir,
    threads,
    plot,
    no_progress,
    as_json,
) -> None:
    """Compare skimming with uniform, random and dense baselines on STORE's features."""
    from skim.evaluate import EvalConfig, evaluate

    set_threads(threads)
    started = time.perf_counter()

    config = EvalConfig(
        **given(
            split=split,
            train_split=train_split,
            batch_size=batch_size,
            baseline_steps=baseline_steps,
            curve_steps=csv_ints(curve_steps),
            subsample_factors=csv_ints(subsample_factors),
            seed=seed,
            device=device,
            scratch_dir=scratch_dir,
        )
    )
    result = evaluate(
        store,
        model_path,
        labels=labels,
        moments=moments,
        config=config,
        recognition_store=inference.recognition_store,
        inference=inference.overrides(),
        plot=plot,
        progress=show_progress(no_progress, as_json),
        log=warnings_only if as_json else None,
        allow_other_students=allow_other_students,
    )
    if as_json:
        echo_json({**result, "seconds": round(time.perf_counter() - started, 2)})
        return
    echo_evaluation(result)


def echo_evaluation(result: dict) -> None:
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


@click.command("query")
@click.argument("store", type=click.Path(exists=True))
@click.argument("video_ids", nargs=-1)
@_model_option
@click.option("--top-k", default=5, show_default=True, help="Labels per video.")
@click.option("--all", "all_videos", is_flag=True, help="Every ok video of the store.")
@_allow_other_students_option
@_inference_options
@click.option("--batch-size", default=64, show_default=True, help="Videos per model batch.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option(
    "--precision",
    type=RegistryChoice(_skim_const("PRECISIONS")),
    default="fp32",
    show_default=True,
    help="Products of the key projection and the recurrent loop: bf16 (or auto) only on a CPU with native "
    "bf16, about 2x faster per video; labels and accuracy matched fp32 on the measured models, but steps "
    "scored nearly alike may be picked differently (73 of 96 demo videos kept every pick).",
)
@threads_option
@click.option(
    "--out",
    type=OutputPath(dir_okay=False),
    help="Stream the answers to this JSON Lines file (one per line, memory bounded by the batch).",
)
@click.option("--resume", is_flag=True, help="With --out: skip the videos the file already answers, append.")
@click.option("--overwrite", is_flag=True, help="With --out: replace the file instead of refusing.")
@no_progress_option
@json_option("the answers (with --out: what was written)")
def query_cmd(
    store,
    video_ids,
    model_path,
    top_k,
    all_videos,
    allow_other_students,
    inference: InferenceConfig,
    batch_size,
    device,
    precision,
    threads,
    out,
    resume,
    overwrite,
    no_progress,
    as_json,
) -> None:
    """Top labels and the chosen moments of VIDEO_IDS (or --all) in STORE.

    The model's first recurrent step looks at the mean of all steps; each of the other T - 1 (T: --stop-after
    or the checkpoint's --steps) picks one step per indexing modality, so a video gets at most (T - 1) x
    modalities moments, fewer where picks coincide. Moments are listed once, in time order, with the
    modalities that picked them.
    """
    from skim.query import query

    set_threads(threads)
    if bool(video_ids) == all_videos:
        raise ConfigError("give VIDEO_ID(s) or --all (not both)")
    if (resume or overwrite) and not out:
        raise ConfigError("--resume and --overwrite apply to an --out file; give --out FILE.jsonl")
    kwargs = {
        "top_k": top_k,
        "batch_size": batch_size,
        "device": device,
        "precision": precision,
        "recognition_store": inference.recognition_store,
        "inference": inference.overrides(),
        "progress": show_progress(no_progress, as_json),
        "allow_other_students": allow_other_students,
    }
    ids = list(video_ids) if video_ids else None
    if out:
        from skim.query import write_jsonl

        done = write_jsonl(store, model_path, out, ids, resume=resume, overwrite=overwrite, **kwargs)
        if as_json:
            echo_json(done)
        else:
            click.echo(f"wrote {done['written']} answers to {out} ({done['skipped']} already there)")
        return
    if ids is None:  # --all: printed as answered (batch order), so memory stays bounded by the batch
        from skim.query import iter_query

        answers = iter_query(store, model_path, None, **kwargs)
    else:  # the ids asked for, in their order
        answers = query(store, model_path, ids, **kwargs)
    if as_json:
        _echo_json_array(answers)
        return
    for a in answers:
        top = ", ".join(f"{t['label']} {t['prob']:.2f}" for t in a["top"])
        times = " ".join(f"{m['start_s']:.1f}s ({'+'.join(m['modalities'])})" for m in a["moments"])
        click.echo(f"{a['video_id']}: {top}\n  moments: {times or '-'}")


def _echo_json_array(items: Iterable[Any]) -> None:
    """Print ``items`` as one indented JSON array (what :func:`echo_json` prints for a list), an element at a
    time as they come, so a streamed ``--all`` never holds every answer."""
    first = True
    for item in items:
        body = json.dumps(item, indent=2, default=str).replace("\n", "\n  ")
        click.echo(("[\n  " if first else ",\n  ") + body, nl=False)
        first = False
    click.echo("[]" if first else "\n]")


@click.command("show")
@click.argument("store", type=click.Path(exists=True))
@click.argument("video_id")
@_model_option
@click.option("--out", required=True, type=OutputPath(dir_okay=False), help="PNG to write.")
@click.option(
    "--moments",
    type=click.Path(exists=True, dir_okay=False),
    help="Ground-truth segments to shade on the timeline.",
)
@click.option(
    "--max-frames", default=12, show_default=True, help="Chosen frames drawn (all are on the timeline)."
)
@_allow_other_students_option
@_inference_options
@json_option("what was drawn")
@click.pass_context
def show_cmd(
    ctx: click.Context,
    store,
    video_id,
    model_path,
    out,
    moments,
    max_frames,
    allow_other_students,
    inference: InferenceConfig,
    as_json,
) -> None:
    """Draw the moments the model chose in VIDEO_ID next to uniformly spaced frames, over its attention."""
    from indexing.corpus import read_segments
    from skim.plot import draw_moments
    from skim.query import explain

    ex = explain(
        store,
        model_path,
        video_id,
        max_frames=max_frames,
        recognition_store=inference.recognition_store,
        inference=inference.overrides(),
        allow_other_students=allow_other_students,
    )
    segments = read_segments(moments).get(video_id, []) if moments else []
    drawn = draw_moments(ex, out, read_frames=ctx.meta.get(FRAME_READER), segments=segments)
    if as_json:
        echo_json(drawn)
        return
    if drawn["note"]:
        click.echo(drawn["note"], err=True)
    top = drawn["top"][0]
    click.echo(f"wrote {out}: {top['label']} ({top['prob']:.2f}), {len(ex['chosen_steps'])} chosen steps")


COMMANDS = [train_cmd, evaluate_cmd, query_cmd, show_cmd]

"""Accuracy against cost on a synthetic corpus: skimming vs uniform, random and dense sampling.

The whole pipeline on a labelled synthetic corpus whose class shows only in short evidence segments
(``l2l synth``): distil tiny students from the tiny teacher (``l2l distill``), fine-tune them on trimmed
clips from the ground-truth segments (``l2l finetune --moments``), extract features (``l2l extract``),
train the skimming model on the ``train`` split (:func:`skim.train.train`, the demo's small-batch recipe)
and evaluate it with the baselines on the held-out ``test`` split (:func:`skim.evaluate.evaluate`, the
library call behind ``l2l evaluate --json``). The CLI stages run as
subprocesses; their outputs are cached in the work folder and reused when their options are unchanged,
so a rerun only retrains and re-evaluates the skimming model.

Table: accuracy, mAP, evidence precision (share of looked-at steps inside a ground-truth evidence
segment), steps looked at and GFLOPs per video (FLOPs = 2 x multiply-adds; the tiny preset's measured
costs), with the dense teacher's cost for reference. The uniform baseline's best possible accuracy on
this corpus (``synth.json``) is printed with it.

Run from the repository root: ``.venv/bin/python bench/accuracy.py [--quick]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import REPO, fmt, log, machine, machine_line, parser, ratio, table, write_results

NAME = "accuracy"
CLI = [sys.executable, "-c", "import sys; from cli import main; sys.argv[0] = 'l2l'; main()"]


def l2l(*args: str, stage: str) -> tuple[Any, float]:
    """Run ``l2l ARGS`` (``--json`` output parsed when present); returns ``(json or None, seconds)``."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TQDM_DISABLE", "1")
    log(f"  l2l {' '.join(args)}")
    t0 = time.perf_counter()
    proc = subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{stage} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = proc.stdout.strip()
    if "--json" in args and out:
        start = min(i for i in (out.find("{"), out.find("[")) if i >= 0)
        return json.loads(out[start:]), seconds
    return None, seconds


def cached(stamp: Path, spec: dict[str, Any], outputs: list[Path]) -> bool:
    """Whether ``outputs`` exist and were made with ``spec`` (recorded in ``stamp``)."""
    return stamp.is_file() and json.loads(stamp.read_text()) == spec and all(p.exists() for p in outputs)


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, help="synthetic videos (default 240, quick 9)")
    p.add_argument("--classes", type=int, help="classes (default 4, quick 3)")
    p.add_argument("--min-s", type=float, help="shortest video in seconds (default 30, quick 8)")
    p.add_argument("--max-s", type=float, help="longest video in seconds (default 90, quick 14)")
    p.add_argument("--distill-epochs", type=int, help="tiny distillation epochs (default 2, quick 1)")
    p.add_argument("--finetune-epochs", type=int, help="trimmed-clip fine-tuning epochs (4; quick 1)")
    p.add_argument(
        "--clips-per-video", type=int, help="distil/fine-tune steps per video per epoch (3; quick 2)"
    )
    p.add_argument("--train-epochs", type=int, help="skimming epochs (default 60, quick 3)")
    p.add_argument("--train-batch", type=int, default=16, help="skimming batch size (small corpus)")
    p.add_argument("--lr", type=float, default=1e-2, help="skimming learning rate")
    p.add_argument("--workers", type=int, help="extraction worker processes (default 2; quick 0 = serial)")
    args = p.parse_args()

    quick = args.quick
    corpus_spec = {
        "videos": args.videos or (9 if quick else 240),
        "classes": args.classes or (3 if quick else 4),
        "seed": 0,
        "min_s": args.min_s or (8.0 if quick else 30.0),
        "max_s": args.max_s or (14.0 if quick else 90.0),
    }
    distill_epochs = args.distill_epochs or (1 if quick else 2)
    finetune_epochs = args.finetune_epochs or (1 if quick else 4)
    clips = args.clips_per_video or (2 if quick else 3)
    loader_workers = "0" if quick else "2"  # DataLoader processes of distill/finetune
    train_epochs = args.train_epochs or (3 if quick else 60)
    extract_workers = args.workers if args.workers is not None else (0 if quick else 2)
    work = args.work / NAME / ("quick" if quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    manifest = corpus / "manifest.csv"
    students, finetuned, store = work / "students.pt", work / "finetuned.pt", work / "store"
    info = machine()
    t_start = time.perf_counter()
    stages: dict[str, float] = {}

    log("pipeline (cached stages are skipped)")
    synth_json = corpus / "synth.json"
    have = json.loads(synth_json.read_text())["config"] if synth_json.is_file() else {}
    if not (manifest.is_file() and all(have.get(k) == v for k, v in corpus_spec.items())):
        _, stages["synth"] = l2l(
            "synth",
            str(corpus),
            *("--videos", str(corpus_spec["videos"]), "--classes", str(corpus_spec["classes"])),
            *("--seed", str(corpus_spec["seed"]), "--min-s", str(corpus_spec["min_s"])),
            *("--max-s", str(corpus_spec["max_s"]), "--jobs", "2", "--overwrite", "--json"),
            stage="synth",
        )
    spec = {"corpus": corpus_spec, "distill_epochs": distill_epochs, "clips": clips, "lr": 0.05}
    if not cached(work / "students.json", spec, [students]):
        students.unlink(missing_ok=True)
        _, stages["distill"] = l2l(
            "distill",
            str(manifest),
            *("--teacher-preset", "tiny", "--preset", "tiny", "--out", str(students)),
            *("--epochs", str(distill_epochs), "--clips-per-video", str(clips), "--workers", loader_workers),
            *("--lr", "0.05", "--batch-size", "32", "--json"),
            stage="distill",
        )
        (work / "students.json").write_text(json.dumps(spec))
    spec = {**spec, "finetune_epochs": finetune_epochs, "finetune_on": "moments"}
    if not cached(work / "finetuned.json", spec, [finetuned]):
        finetuned.unlink(missing_ok=True)
        _, stages["finetune"] = l2l(
            "finetune",
            str(manifest),
            *("--students", str(students), "--out", str(finetuned), "--epochs", str(finetune_epochs)),
            *("--clips-per-video", str(clips), "--workers", loader_workers, "--json"),
            *("--lr", "0.05", "--batch-size", "32", "--moments", str(corpus / "moments.json")),  # as the demo
            stage="finetune",
        )
        (work / "finetuned.json").write_text(json.dumps(spec))
    if not cached(work / "store.json", spec, [store]):
        import shutil

        shutil.rmtree(store, ignore_errors=True)
        report, stages["extract"] = l2l(
            "extract",
            str(manifest),
            str(store),
            *("--students", str(finetuned), "--workers", str(extract_workers), "--no-progress", "--json"),
            stage="extract",
        )
        log(f"  extracted {report['steps']} steps at {report['steps_per_s']:.1f} steps/s")
        (work / "store.json").write_text(json.dumps(spec))

    import torch

    from skim.evaluate import EvalConfig, evaluate
    from skim.train import TrainConfig, train

    milestones = tuple(
        m for m in (round(train_epochs * 0.6), round(train_epochs * 0.8)) if 0 < m < train_epochs
    )
    train_cfg = TrainConfig(
        epochs=train_epochs,
        batch_size=args.train_batch,
        lr=args.lr,
        milestones=tuple(sorted(set(milestones))),
        crop_min=100,
        crop_max=200,
        in_memory=True,
        threads=torch.get_num_threads(),
    )
    # Quick runs skip evaluate's accuracy-vs-steps and sub-sampling curves (each trains extra heads).
    eval_cfg = (
        EvalConfig(
            split="test", train_split="train", baseline_steps=100, curve_steps=(), subsample_factors=()
        )
        if quick
        else EvalConfig(split="test", train_split="train")
    )
    ckpt = work / "skim.pt"
    log(f"train skimming ({train_epochs} epochs, batch {args.train_batch}) ...")
    t0 = time.perf_counter()
    summary = train(store, ckpt, labels=manifest, config=train_cfg, overwrite=True, progress=False, log=log)
    stages["train"] = time.perf_counter() - t0
    log("evaluate on the test split ...")
    t0 = time.perf_counter()
    result = evaluate(
        store,
        ckpt,
        labels=manifest,
        moments=corpus / "moments.json",
        config=eval_cfg,
        plot=work / "tradeoff.png",
        progress=False,
        log=log,
    )
    stages["evaluate"] = time.perf_counter() - t0
    (work / "evaluate.json").write_text(json.dumps(result, indent=2, default=str))

    synth = json.loads(synth_json.read_text())
    ceiling = synth.get("uniform_baseline", {})
    methods = result["methods"]
    dense_gflops = methods["dense"]["gflops_per_video"]
    costs = result["costs"]
    teacher_gflops = costs["dense_teacher_gflops_per_video"]
    rows = [
        [
            m,
            fmt(methods[m]["accuracy"], 3),
            fmt(methods[m]["map"], 3),
            fmt(methods[m]["evidence_precision"], 3),
            fmt(methods[m]["steps_used"], 1),
            fmt(methods[m]["gflops_per_video"], 2),
            ratio(methods[m]["gflops_per_video"], dense_gflops),
            ratio(methods[m]["gflops_per_video"], teacher_gflops, 3),
        ]
        for m in ("skim", "uniform", "random", "dense")
    ]
    rows.append(
        ["dense teacher clips (cost only)", "-", "-", "-", fmt(costs["mean_steps_per_video"], 1)]
        + [fmt(teacher_gflops, 1), ratio(teacher_gflops, dense_gflops), "1.000x"]
    )
    headers = [
        "method",
        "accuracy",
        "mAP",
        "evidence precision",
        "steps used",
        "GFLOPs/video",
        "vs dense students",
        "vs dense teacher",
    ]
    text, md = table(headers, rows)
    wall = time.perf_counter() - t_start
    last = summary["history"][-1] if summary["history"] else {}
    corpus_line = (
        f"{corpus_spec['videos']} synthetic videos of {corpus_spec['min_s']:g}-{corpus_spec['max_s']:g} s, "
        f"{corpus_spec['classes']} classes, {result['videos']} test videos; tiny students "
        f"({distill_epochs} distillation + {finetune_epochs} fine-tuning epochs), "
        f"skimming {train_epochs} epochs"
    )
    ceiling_line = (
        "Best possible accuracy of uniform sampling on this corpus (synth.json: a uniform step must land "
        f"in an evidence segment): {ceiling['ceiling_accuracy']:.3f} (frame), "
        f"{ceiling['ceiling_accuracy_audio']:.3f} (1 s audio window); chance {ceiling['chance']:.3f}."
        if "ceiling_accuracy" in ceiling
        else ""
    )
    print(f"\nAccuracy and cost on the held-out split ({corpus_line}; {machine_line(info)})\n")
    print(text)
    if ceiling_line:
        print(f"\n{ceiling_line}")
    print(f"final train accuracy {last.get('train_accuracy')}; GFLOPs source: {costs.get('source')}")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    print(f"\nbenchmark wall time {wall:.0f} s{' (quick: tiny sizes, noisy)' if quick else ''}")
    markdown = "\n".join(
        [
            f"**Accuracy vs cost** ({corpus_line}; {machine_line(info)}{'; QUICK run' if quick else ''})",
            "",
            md,
            "",
            ceiling_line,
            "",
            f"GFLOPs per step from {costs.get('source')} (FLOPs = 2 x multiply-adds).",
        ]
    )
    data = {
        "benchmark": NAME,
        "quick": quick,
        "machine": info,
        "config": {
            "corpus": corpus_spec,
            "distill_epochs": distill_epochs,
            "finetune_epochs": finetune_epochs,
            "train": train_cfg.to_dict(),
        },
        "methods": methods,
        "costs": costs,
        "uniform_ceiling": ceiling,
        "train_history": summary["history"],
        "evaluate": {k: v for k, v in result.items() if k != "methods"},
        "stage_seconds": stages,
        "wall_s": wall,
    }
    j, m = write_results(NAME, args.out, data, markdown)
    log(f"wrote {j} and {m}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()

"""Skimming accuracy on one set of stored features: the paper recipe, each of its parts switched back, seeds.

The whole pipeline on a labelled synthetic corpus whose class shows only in short evidence segments
(``l2l synth``): distil tiny students from the tiny teacher (``l2l distill``), fine-tune them on trimmed
clips from the ground-truth segments (``l2l finetune --moments``), extract features (``l2l extract``).
These CLI stages run as subprocesses; their outputs are cached in the work folder and reused when their
options are unchanged, so a rerun only retrains the skimming models.

Then, on that ONE store, the skimming model (:func:`skim.train.train`, the demo's small-batch recipe) is
trained for every variant and seed and scored on the held-out ``test`` split:

- ``paper``: per-modality chosen-step masks, query BN fed all T queries, reference init, Psi and the
  classifier from the fine-tuned students checkpoint the store records (Psi frozen, classifier at 0.1x);
- each of those four switched back to the project's earlier choice (``mask=shared``,
  ``init=scratch``, ``weight_init=torch``, ``query_bn=skip_last``), and all four at once (``before``).

Table: accuracy, mAP and evidence precision (share of the looked-at steps inside a ground-truth evidence
segment) as mean and spread (min-max) over the seeds, the best variant marked. For reference, the paper
recipe's first seed is also evaluated against uniform, random and dense sampling (:func:`skim.evaluate.
evaluate`, the library call behind ``l2l evaluate --json``) with GFLOPs per video.

Cross-corpus mode (``--corpora``, issue 18): the demo's recipe, unchanged (``l2l demo FOLDER --videos V
--classes C --seed S`` per cell, exactly the demo's stages), on 3 seeds x {4, 6, 8} classes x {60, 150}
videos, run in priority order (seed 0 of every (classes, videos) first, then the other seeds); each cell is
cached in its own folder with the recipe's digest, so a rerun continues where it stopped. One table, mean
and spread (min-max) per (classes, videos): the students' trimmed-clip validation accuracy, skim, uniform,
random and dense accuracy at 10 steps, evidence precision, the uniform ceiling (``synth.json``), seconds per
stage, which of issue 18's targets each cell meets and, where one is missed, which stage limited it.
Results in ``bench/results/accuracy_corpora.{md,json}``, rewritten after every cell.

Run from the repository root: ``.venv/bin/python bench/accuracy.py [--quick]`` or ``... --corpora``.
"""

from __future__ import annotations

import json
import os
import statistics
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


# name -> (skimming model options, TrainConfig overrides): the paper recipe and each part switched back.
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "paper": ({}, {}),
    "shared mask (1 back)": ({"mask": "shared"}, {}),
    "Psi + classifier from scratch (2 back)": ({}, {"init": "scratch"}),
    "PyTorch init (3 back)": ({"weight_init": "torch"}, {}),
    "query BN skips last step (4 back)": ({"query_bn": "skip_last"}, {}),
    "before (1-4 back)": (
        {"mask": "shared", "weight_init": "torch", "query_bn": "skip_last"},
        {"init": "scratch"},
    ),
}


def spread(values: list[float | None]) -> dict[str, float | None]:
    """Mean, min and max over seeds (None when a value is missing)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "min": None, "max": None}
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}


def cell(s: dict[str, float | None]) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def score(store: Path, ckpt: Path, manifest: Path, moments: Path) -> dict[str, float | None]:
    """Accuracy, mAP and evidence precision of a checkpoint on the test split (no baselines)."""
    import numpy as np

    from indexing.corpus import read_labels, read_segments
    from indexing.stores import open_store
    from skim.checkpoint import load_checkpoint
    from skim.data import SkimDataset, step_seconds
    from skim.evaluate import accuracy, mean_average_precision, scan

    loaded = load_checkpoint(ckpt)
    cfg = loaded.config
    st = open_store(store)
    ds = SkimDataset(st, cfg.batch_keys, split="test", labels=read_labels(manifest), names=loaded.labels)
    gt = read_segments(moments)
    res = scan(ds, loaded.model, rec_keys=cfg.recognition_keys, budget=cfg.num_steps, moments=gt,
               step_s=step_seconds(st), batch_size=64)  # fmt: skip
    probs, y = np.stack(res.probs), np.asarray(res.labels)
    hits, total = res.evidence["skim"]
    return {
        "accuracy": accuracy(probs, y),
        "map": mean_average_precision(probs, y),
        "evidence_precision": hits / total if total else None,
        "videos": len(y),
    }


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, help="synthetic videos (default 160, quick 12)")
    p.add_argument("--classes", type=int, help="classes (default 4, quick 3)")
    p.add_argument("--min-s", type=float, help="shortest video in seconds (default 16, quick 8)")
    p.add_argument("--max-s", type=float, help="longest video in seconds (default 32, quick 14)")
    p.add_argument("--distill-epochs", type=int, help="tiny distillation epochs (default 1)")
    p.add_argument("--finetune-epochs", type=int, help="trimmed-clip fine-tuning epochs (2; quick 1)")
    p.add_argument("--clips-per-video", type=int, help="distil/fine-tune steps per video per epoch (2)")
    p.add_argument("--train-epochs", type=int, help="skimming epochs per run (default 15, quick 2)")
    p.add_argument("--train-batch", type=int, default=8, help="skimming batch size (small corpus)")
    p.add_argument("--lr", type=float, default=1e-2, help="skimming learning rate")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3, quick 1)")
    p.add_argument("--variants", help="comma-separated subset of the variants (default all)")
    p.add_argument("--workers", type=int, help="extraction worker processes (default 2; quick 0 = serial)")
    p.add_argument(
        "--tag", default="", help="name of this process's runs file (runs-TAG.json), to split seeds"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse runs of the same settings from the work folder's runs*.json",
    )
    p.add_argument("--threads", type=int, help="torch threads per skimming run (default torch's)")
    p.add_argument(
        "--corpora",
        action="store_true",
        help="cross-corpus mode: the demo's recipe, unchanged, per (classes, videos, seed) cell, each cell "
        "cached in its own folder (a rerun continues); writes accuracy_corpora.{md,json}",
    )
    p.add_argument("--corpora-seeds", default="0,1,2", help="--corpora: seeds")
    p.add_argument("--corpora-classes", default="4,6,8", help="--corpora: class counts")
    p.add_argument("--corpora-videos", default="60,150", help="--corpora: video counts")
    p.add_argument("--max-cells", type=int, help="--corpora: stop after this many cells (priority order)")
    args = p.parse_args()
    if args.corpora:
        corpora(args)
        return

    quick = args.quick
    corpus_spec = {
        "videos": args.videos or (12 if quick else 160),
        "classes": args.classes or (3 if quick else 4),
        "seed": 0,
        "min_s": args.min_s or (8.0 if quick else 16.0),
        "max_s": args.max_s or (14.0 if quick else 32.0),
    }
    distill_epochs = args.distill_epochs or 1
    finetune_epochs = args.finetune_epochs or (1 if quick else 2)
    clips = args.clips_per_video or 2
    loader_workers = "0" if quick else "2"  # DataLoader processes of distill/finetune
    train_epochs = args.train_epochs or (2 if quick else 15)
    seeds = list(range(args.seeds or (1 if quick else 3)))
    names = list(VARIANTS) if not args.variants else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; available: {', '.join(VARIANTS)}")
    extract_workers = args.workers if args.workers is not None else (0 if quick else 2)
    work = args.work / NAME / ("quick" if quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    manifest = corpus / "manifest.csv"
    moments = corpus / "moments.json"
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
            *("--lr", "0.05", "--batch-size", "32", "--moments", str(moments)),  # as the demo
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
        sorted({m for m in (round(train_epochs * 0.6), round(train_epochs * 0.8)) if 0 < m < train_epochs})
    )
    base = {
        "epochs": train_epochs,
        "batch_size": args.train_batch,
        "lr": args.lr,
        "milestones": milestones,
        "crop_min": 100,
        "crop_max": 200,
        "val_split": "none",  # no validation pass per epoch: the test split is scored once at the end
        "in_memory": True,
        "threads": args.threads or torch.get_num_threads(),
    }
    runs: dict[str, list[dict[str, Any]]] = {}
    settings = {"spec": spec, "base": {k: v for k, v in base.items() if k != "threads"}}
    previous: dict[tuple[str, int], dict[str, Any]] = {}
    if args.reuse:  # runs written by earlier or parallel invocations with the same settings
        for f in sorted(work.glob("runs*.json")):
            found = json.loads(f.read_text())
            if found.get("settings") != json.loads(json.dumps(settings)):
                continue
            for name, rs in found["runs"].items():
                for r in rs:
                    if VARIANTS.get(name) is not None and r.get("variant") == json.loads(
                        json.dumps(VARIANTS[name])
                    ):
                        previous[(name, r["seed"])] = r
    runs_file = work / f"runs{'-' + args.tag if args.tag else ''}.json"
    t_train = time.perf_counter()
    for name in names:
        options, overrides = VARIANTS[name]
        for seed in seeds:
            if (name, seed) in previous:
                runs.setdefault(name, []).append(previous[(name, seed)])
                log(f"reuse {name!r} seed {seed}: accuracy {previous[(name, seed)]['accuracy']:.3f}")
                continue
            ckpt = work / "runs" / f"{name.split(' (')[0].replace(' ', '_').replace('+', '')}-seed{seed}.pt"
            log(f"train {name!r} seed {seed} ({train_epochs} epochs, batch {args.train_batch}) ...")
            t0 = time.perf_counter()
            summary = train(
                store, ckpt, labels=manifest, model_options=options,
                config=TrainConfig(**base, **overrides, seed=seed), overwrite=True, progress=False,
                log=lambda line: log(f"  {line}") if line.startswith("warning") else None,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            result = score(store, ckpt, manifest, moments)
            last = summary["history"][-1]
            runs.setdefault(name, []).append(
                {"seed": seed, "train_s": seconds, "train_accuracy": last["train_accuracy"], **result,
                 "variant": VARIANTS[name], "load_avg_1m": os.getloadavg()[0]}
            )  # fmt: skip
            # Partial results survive a kill and can be reused (--reuse).
            runs_file.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1, default=str))
            log(f"  accuracy {result['accuracy']:.3f}, mAP {result['map']:.3f}, evidence "
                f"{fmt(result['evidence_precision'], 3)}, {seconds:.0f} s")  # fmt: skip
    stages["train+score"] = time.perf_counter() - t_train

    summary_rows = {
        name: {k: spread([r[k] for r in rs]) for k in ("accuracy", "map", "evidence_precision", "train_s")}
        for name, rs in runs.items()
    }
    best = max(
        summary_rows, key=lambda n: (summary_rows[n]["accuracy"]["mean"], summary_rows[n]["map"]["mean"])
    )
    rows = [
        [
            f"{name}{' **best**' if name == best else ''}",
            cell(s["accuracy"]),
            cell(s["map"]),
            cell(s["evidence_precision"]),
            fmt(s["train_s"]["mean"], 0),
        ]
        for name, s in summary_rows.items()
    ]
    headers = ["variant", "accuracy", "mAP", "evidence precision", "train s/run"]
    text, md = table(headers, rows)

    reference: dict[str, Any] | None = None
    ref_md = ""
    if "paper" in runs:
        log("evaluate the paper recipe (seed 0) against uniform, random and dense sampling ...")
        t0 = time.perf_counter()
        first = work / "runs" / "paper-seed0.pt"
        eval_cfg = EvalConfig(split="test", train_split="train", curve_steps=(), subsample_factors=(),
                              baseline_steps=100 if quick else 400)  # fmt: skip
        reference = evaluate(store, first, labels=manifest, moments=moments, config=eval_cfg, progress=False,
                             log=lambda _line: None)  # fmt: skip
        stages["evaluate"] = time.perf_counter() - t0
        methods = reference["methods"]
        dense = methods["dense"]["gflops_per_video"]
        ref_rows = [
            [
                m,
                fmt(methods[m]["accuracy"], 3),
                fmt(methods[m]["map"], 3),
                fmt(methods[m]["evidence_precision"], 3),
                fmt(methods[m]["steps_used"], 1),
                fmt(methods[m]["gflops_per_video"], 2),
                ratio(methods[m]["gflops_per_video"], dense),
            ]  # fmt: skip
            for m in ("skim", "uniform", "random", "dense")
        ]
        ref_text, ref_md = table(
            ["method (paper, seed 0)", "accuracy", "mAP", "evidence precision", "steps used", "GFLOPs/video",
             "vs dense"], ref_rows)  # fmt: skip
        text += "\n\n" + ref_text

    wall = time.perf_counter() - t_start
    corpus_line = (
        f"{corpus_spec['videos']} synthetic videos of {corpus_spec['min_s']:g}-{corpus_spec['max_s']:g} s, "
        f"{corpus_spec['classes']} classes, {next(iter(runs.values()))[0]['videos']} test videos; tiny "
        "students "
        f"({distill_epochs} distillation + {finetune_epochs} fine-tuning epochs); skimming {train_epochs} "
        f"epochs, batch {args.train_batch}, {len(seeds)} seed(s) per variant: mean (min-max)"
    )
    print(f"\nSkimming variants on one store ({corpus_line}; {machine_line(info)})\n")
    print(text)
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    print(f"\nbenchmark wall time {wall:.0f} s{' (quick: tiny sizes, noisy)' if quick else ''}")
    markdown = "\n".join(
        [
            f"**Skimming variants on one store** ({corpus_line}; {machine_line(info)}"
            f"{'; QUICK run' if quick else ''}; wall {wall / 60:.0f} min"
            f"{f', {len(previous)} runs reused from earlier invocations' if previous else ''})",
            "",
            md,
            "",
            ref_md,
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
            "train": {**base, "milestones": list(milestones)},
            "seeds": seeds,
            "variants": {n: {"model_options": VARIANTS[n][0], "train": VARIANTS[n][1]} for n in names},
        },
        "runs": runs,
        "reused": sorted(f"{n} seed {sd}" for n, sd in previous),
        "summary": summary_rows,
        "best": best,
        "reference": reference,
        "stage_seconds": stages,
        "wall_s": wall,
    }
    j, m = write_results(NAME, args.out, data, markdown)
    log(f"wrote {j} and {m}")


# ==== cross-corpus mode (--corpora) ====================================================================

CORPORA_NAME = "accuracy_corpora"
CORPORA_SEEDS = (0, 1, 2)
CORPORA_CLASSES = (4, 6, 8)
CORPORA_VIDEOS = (60, 150)
STUDENTS_TARGET = 0.8  # issue 18: students' trimmed-clip validation accuracy
SKIM_MARGIN = 0.10  # skim >= uniform + this, and >= dense
EVIDENCE_FACTOR = 2.0  # skim's evidence precision >= this x uniform's
METHODS = ("skim", "uniform", "random", "dense")


def corpora_cells(seeds, classes, videos) -> list[tuple[int, int, int]]:
    """``(classes, videos, seed)`` in priority order: every (classes, videos) of one seed before the next."""
    return [(c, v, s) for s in seeds for v in videos for c in classes]


def recipe_digest() -> str:
    """sha256 (12 hex) of the demo's recipe (:data:`cli.DEMO_RECIPE`): a cell measured with another
    recipe is not reused."""
    import hashlib

    sys.path.insert(0, str(REPO))
    from cli import DEMO_RECIPE

    return hashlib.sha256(json.dumps(DEMO_RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def run_cell(folder: Path, classes: int, videos: int, seed: int, digest: str) -> dict[str, Any]:
    """One cell: ``l2l demo FOLDER --videos V --classes C --seed S --json``, exactly the demo's stages (it
    resumes an interrupted cell); the result is cached in ``FOLDER/cell.json`` with the recipe digest."""
    import shutil

    done = folder / "cell.json"
    if done.is_file():
        found = json.loads(done.read_text())
        if found.get("recipe") == digest:
            if found.get("diagnosis") is None and (diagnosis := diagnose(folder / "run")) is not None:
                found["diagnosis"] = diagnosis  # cells measured before the diagnosis existed
                found.update(targets(found))
                done.write_text(json.dumps(found, indent=1))
            return found
        log(f"  {folder.name}: measured with recipe {found.get('recipe')}, now {digest}: rerun")
        shutil.rmtree(folder)
    started = folder / "recipe.txt"
    if folder.exists() and (not started.is_file() or started.read_text() != digest):
        shutil.rmtree(folder)  # a partial run of another recipe cannot resume
    folder.mkdir(parents=True, exist_ok=True)
    started.write_text(digest)
    load_start = os.getloadavg()[0]
    summary, seconds = l2l(
        "demo", str(folder / "run"), *("--videos", str(videos), "--classes", str(classes)),
        *("--seed", str(seed), "--json"), stage=f"demo {folder.name}",
    )  # fmt: skip
    synth = json.loads((folder / "run" / "corpus" / "synth.json").read_text())
    cell = {
        "classes": classes,
        "videos": videos,
        "seed": seed,
        "recipe": digest,
        "seconds": seconds,
        "load_avg_1m": [load_start, os.getloadavg()[0]],
        "students": summary.get("students"),
        "stage_seconds": summary["stage_seconds"],
        "methods": {
            m: {k: r.get(k) for k in ("accuracy", "map", "evidence_precision", "steps_used")}
            for m, r in summary["evaluation"]["methods"].items()
        },
        "test_videos": summary["evaluation"]["videos"],
        "uniform_ceiling": synth["uniform_baseline"],
    }
    cell["diagnosis"] = diagnose(folder / "run")
    cell.update(targets(cell))
    done.write_text(json.dumps(cell, indent=1))
    shutil.rmtree(folder / "run" / "inputs.zarr", ignore_errors=True)  # the students' decoded inputs: disk
    return cell


def diagnose(run: Path) -> dict[str, Any] | None:
    """The numbers behind a cell's weak stage, from its own run folder: videos per split (the holdout as
    every command draws it), and the kept epoch of the students and of skimming (train against val)."""
    import csv

    import torch

    sys.path.insert(0, str(REPO))
    from indexing.training import holdout

    manifest = run / "corpus" / "manifest.csv"
    ckpts = {"students": run / "students-ft.pt", "skim": run / "skim.pt"}
    if not manifest.is_file() or not all(p.is_file() for p in ckpts.values()):
        return None
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"]
    held = holdout([r["video_id"] for r in train], [r["label"] for r in train])
    out: dict[str, Any] = {
        "videos": {"train": len(train) - len(held), "val": len(held),
                   "test": sum(r["split"] == "test" for r in rows)},
    }  # fmt: skip
    for stage, path in ckpts.items():
        training = torch.load(path, map_location="cpu", weights_only=False)["training"]
        best = training["outcome"]["best_epoch"]
        kept = next(e for e in training["history"] if e["epoch"] == best)
        out[stage] = {
            "epoch": best,
            "epochs": len(training["history"]),
            **{k: kept.get(k) for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")},
        }
    return out  # fmt: skip


def targets(cell: dict[str, Any]) -> dict[str, Any]:
    """Which of issue 18's targets a cell meets, and which stage limited it, from its numbers (with
    ``cell["diagnosis"]``, from :func:`diagnose`, the train/val gap and split sizes behind it)."""
    m = cell["methods"]
    students = (cell.get("students") or {}).get("val_accuracy")
    skim, uni, dense = (m[k]["accuracy"] for k in ("skim", "uniform", "dense"))
    ev_skim, ev_uni = m["skim"]["evidence_precision"], m["uniform"]["evidence_precision"]
    met = {
        "students": students is not None and students >= STUDENTS_TARGET,
        "skim_vs_uniform": skim >= uni + SKIM_MARGIN - 1e-9,
        "skim_vs_dense": skim >= dense - 1e-9,
        "evidence": ev_skim is not None and ev_uni is not None and ev_skim >= EVIDENCE_FACTOR * ev_uni,
    }
    why = []
    ceiling = cell["uniform_ceiling"]["ceiling_accuracy"]
    d = cell.get("diagnosis")
    if not met["students"]:
        why.append(f"students: val accuracy {fmt(students, 2)} < {STUDENTS_TARGET}")
        if d:
            s = d["students"]
            why.append(f"they overfit {d['videos']['train']} training videos (train loss "
                       f"{fmt(s['train_loss'], 2)} vs val loss {fmt(s['val_loss'], 2)} at the kept epoch "
                       f"{s['epoch']}/{s['epochs']}; val = {d['videos']['val']} videos)")  # fmt: skip
    if not met["evidence"]:
        why.append(
            f"indexing: skim evidence {fmt(ev_skim, 2)} < {EVIDENCE_FACTOR:g}x uniform {fmt(ev_uni, 2)}"
        )
    if not (met["skim_vs_uniform"] and met["skim_vs_dense"]):
        if met["evidence"] and not met["students"]:
            why.append(f"recognition: skim finds evidence ({fmt(ev_skim, 2)}) but the students' features "
                       f"separate the classes only to {fmt(students, 2)}")  # fmt: skip
        elif met["evidence"]:
            why.append(f"skimming head: evidence found ({fmt(ev_skim, 2)}), students {fmt(students, 2)}, "
                       f"skim {skim:.2f}")  # fmt: skip
            if d:
                k, v = d["skim"], d["videos"]
                why.append(f"it memorises {v['train']} training videos (train accuracy "
                           f"{fmt(k['train_accuracy'], 2)} vs val {fmt(k['val_accuracy'], 2)} at the kept "
                           f"epoch {k['epoch']}/{k['epochs']}); {v['val']} val videos choose the epoch "
                           f"(1 video = {1 / max(v['val'], 1):.2f})")  # fmt: skip
        if d:
            n = d["videos"]["test"]
            why.append(f"{n} test videos: 1 video = {1 / max(n, 1):.3f}, the +{SKIM_MARGIN:g} margin = "
                       f"{SKIM_MARGIN * n:.1f} videos")  # fmt: skip
        if uni >= ceiling - 0.05:
            why.append(f"uniform {uni:.2f} is at its ceiling {ceiling:.2f}: little room above it")
        if dense > skim:
            why.append(f"dense {dense:.2f} > skim {skim:.2f}")
    return {"met": met, "all_met": all(met.values()), "limited_by": why}


def corpora_table(cells: list[dict[str, Any]], planned) -> tuple[str, str, list[dict[str, Any]]]:
    """One row per (classes, videos): mean (min-max) over the measured seeds, targets met per cell."""
    rows, groups = [], []
    for c, v in sorted({(c, v) for c, v, _ in planned}, key=lambda cv: (cv[1], cv[0])):
        group = [x for x in cells if x["classes"] == c and x["videos"] == v]
        seeds_planned = sorted(s for cc, vv, s in planned if (cc, vv) == (c, v))
        if not group:
            rows.append([str(c), str(v), f"0/{len(seeds_planned)}", *["-"] * 9])
            groups.append({"classes": c, "videos": v, "seeds": [], "measured": 0})
            continue

        def stat(fn, group=group):
            return spread([fn(x) for x in group])

        g = {
            "classes": c,
            "videos": v,
            "seeds": sorted(x["seed"] for x in group),
            "measured": len(group),
            "students": stat(lambda x: (x.get("students") or {}).get("val_accuracy")),
            **{m: stat(lambda x, m=m: x["methods"][m]["accuracy"]) for m in METHODS},
            "evidence_skim": stat(lambda x: x["methods"]["skim"]["evidence_precision"]),
            "evidence_uniform": stat(lambda x: x["methods"]["uniform"]["evidence_precision"]),
            "uniform_ceiling": stat(lambda x: x["uniform_ceiling"]["ceiling_accuracy"]),
            "minutes": stat(lambda x: x["seconds"] / 60),
            "stage_seconds": {k: statistics.fmean(x["stage_seconds"].get(k, 0) for x in group)
                              for k in group[0]["stage_seconds"]},
            "met": {k: sum(x["met"][k] for x in group) for k in group[0]["met"]},
        }  # fmt: skip
        groups.append(g)
        n = len(group)
        rows.append(
            [str(c), str(v), f"{n}/{len(seeds_planned)} (seeds {','.join(map(str, g['seeds']))})",
             cell(g["students"]), cell(g["skim"]), cell(g["uniform"]), cell(g["random"]), cell(g["dense"]),
             f"{cell(g['evidence_skim'])} vs {cell(g['evidence_uniform'])}", cell(g["uniform_ceiling"]),
             " ".join(f"{k} {s:.0f}" for k, s in g["stage_seconds"].items())
             + f" = {g['minutes']['mean']:.1f} min",
             " ".join(f"{k.replace('_vs_', '>')} {g['met'][k]}/{n}" for k in g["met"])]
        )  # fmt: skip
    headers = ["classes", "videos", "cells measured", "students val acc", *METHODS,
               "evidence skim vs uniform", "uniform ceiling", "seconds per stage (mean)",
               "targets met"]  # fmt: skip
    text, md = table(headers, rows)
    return text, md, groups


def corpora(args) -> None:
    """``--corpora``: the demo's recipe, unchanged, on each (classes, videos, seed) cell in priority order."""
    seeds = [int(s) for s in args.corpora_seeds.split(",")]
    classes = [int(s) for s in args.corpora_classes.split(",")]
    videos = [int(s) for s in args.corpora_videos.split(",")]
    planned = corpora_cells(seeds, classes, videos)
    digest = recipe_digest()
    work = args.work / CORPORA_NAME
    info = machine()
    cells: list[dict[str, Any]] = []
    for i, (c, v, s) in enumerate(planned):
        if args.max_cells is not None and i >= args.max_cells:
            break
        folder = work / f"c{c}-v{v}-s{s}"
        log(f"cell {i + 1}/{len(planned)}: {c} classes, {v} videos, seed {s} (load {os.getloadavg()[0]:.1f})")
        cells.append(run_cell(folder, c, v, s, digest))
        write_corpora(args, cells, planned, digest, info)
        x = cells[-1]
        log(f"  students {fmt((x.get('students') or {}).get('val_accuracy'), 3)}, skim "
            f"{x['methods']['skim']['accuracy']:.3f}, uniform {x['methods']['uniform']['accuracy']:.3f}, "
            f"dense {x['methods']['dense']['accuracy']:.3f}, {x['seconds'] / 60:.1f} min; "
            f"{'all targets met' if x['all_met'] else '; '.join(x['limited_by'])}")  # fmt: skip
    write_corpora(args, cells, planned, digest, info)


def write_corpora(args, cells, planned, digest, info) -> None:
    text, md, groups = corpora_table(cells, planned)
    per_cell = [
        [f"{x['classes']}/{x['videos']}/{x['seed']}", fmt((x.get("students") or {}).get("val_accuracy"), 3),
         *(fmt(x["methods"][m]["accuracy"], 3) for m in METHODS),
         f"{fmt(x['methods']['skim']['evidence_precision'], 3)} vs "
         f"{fmt(x['methods']['uniform']['evidence_precision'], 3)}",
         fmt(x["uniform_ceiling"]["ceiling_accuracy"], 3), f"{x['seconds'] / 60:.1f}",
         f"{x['load_avg_1m'][0]:.1f}-{x['load_avg_1m'][1]:.1f}",
         "all met" if x["all_met"] else "; ".join(x["limited_by"])]
        for x in cells
    ]  # fmt: skip
    cell_text, cell_md = table(
        ["classes/videos/seed", "students", "skim", "uniform", "random", "dense", "evidence skim vs uniform",
         "uniform ceiling", "min", "load", "limited by"], per_cell)  # fmt: skip
    header = (
        f"**The demo's recipe across corpora** (`l2l demo --videos V --classes C --seed S` per cell, recipe "
        f"{digest}; {len(cells)} of {len(planned)} cells measured; test split, 10 steps; mean (min-max) over "
        f"the measured seeds; targets of issue 18: students >= {STUDENTS_TARGET}, skim >= uniform + "
        f"{SKIM_MARGIN:g} and >= dense, evidence precision >= {EVIDENCE_FACTOR:g}x uniform; "
        f"{machine_line(info)})"
    )
    print(f"\n{header}\n\n{text}\n\n{cell_text}\n")
    data = {"benchmark": CORPORA_NAME, "recipe": digest, "machine": info,
            "planned": [list(p) for p in planned], "groups": groups, "cells": cells}  # fmt: skip
    write_results(CORPORA_NAME, args.out, data, "\n".join([header, "", md, "", "Per cell:", "", cell_md]))


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()

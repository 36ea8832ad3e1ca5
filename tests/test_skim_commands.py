"""Skimming end to end on a generated store: data layer, train/evaluate/query/show commands and JSON schemas.

The planted store (skim.synthetic) hides a class direction in 4 consecutive steps of each 30-80 step video;
a small model (32-d features, hidden 64) trained for 10 epochs finds them, uniform sampling mostly misses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from indexing.corpus import read_labels, read_segments
from indexing.stores import open_store
from skim.data import (
    CropBatchSampler,
    LengthBatchSampler,
    SkimDataset,
    collate,
    label_names,
)
from skim.evaluate import accuracy, mean_average_precision
from skim.model import available_models
from skim.synthetic import PlantedSpec, write_planted_store

SPEC = PlantedSpec(videos=80, classes=4, dim=32, min_steps=30, max_steps=80, strength=8.0, chunk_rows=256)
SMALL_MODEL = ["--hidden", "64", "--embed", "32"]
# A planted store records no students checkpoint, so Psi and the classifier start from scratch.
FAST_TRAIN = ["--lr", "0.1", "--batch-size", "16", "--milestones", "", "--seed", "0", "--init", "scratch"]
METRICS = {"accuracy", "map", "gflops_per_video", "steps_used", "evidence_precision"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: thread handoffs dominate


def run(*args: str) -> dict | list:
    """Invoke ``l2l`` in-process with ``--json`` and return the parsed output (fails on a non-zero exit)."""
    result = CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # warnings go to stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_planted_store(tmp_path_factory.mktemp("skim") / "store", SPEC)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("model") / "skim.pt"
    summary = run(
        "train", str(corpus["store"]), "--labels", str(corpus["labels"]), "--out", str(out), "--epochs", "10",
        *SMALL_MODEL, *FAST_TRAIN,
    )  # fmt: skip
    return {"summary": summary, "model": out}


# ---- data layer --------------------------------------------------------------------------------------------


def test_dataset_labels_splits_and_status(corpus, tmp_path):
    store = open_store(corpus["store"])
    manifest = read_labels(corpus["labels"])
    # The manifest wins over the store index: relabel one video and move another to another split.
    rows = corpus["labels"].read_text().splitlines()
    rows[1] = rows[1].replace("class0", "class3")
    rows[2] = rows[2].replace(",train", ",val")
    edited = tmp_path / "labels.csv"
    edited.write_text("\n".join(rows) + "\n")
    manifest = read_labels(edited)
    names = label_names(store, manifest)
    train = SkimDataset(store, ("image", "audio"), labels=manifest, names=names, split="train")
    by_id = {e.video_id: e for e in train.entries}
    assert by_id["vid00000"].label == names.index("class3")
    assert "vid00001" not in by_id
    assert len(train) == 47 and train.skipped["other_split"] == 33
    everything = SkimDataset(store, ("image",), names=names)  # store index labels only
    assert len(everything) == SPEC.videos and everything.entries[0].label == names.index("class0")
    with pytest.raises(ValueError, match="missing column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("id,label\na,b\n")
        read_labels(bad)


def test_items_read_one_slice_per_array_and_match_memory(corpus):
    store = open_store(corpus["store"])
    reads: list[tuple[str, int, int]] = []
    original = store.read_rows

    def counting(name: str, start: int, stop: int) -> np.ndarray:
        reads.append((name, start, stop))
        return original(name, start, stop)

    store.read_rows = counting
    ds = SkimDataset(store, ("image", "audio"), split="test", require_label=False)
    item = ds[(3, 5, 25)]
    e = ds.entries[3]
    assert sorted(reads) == sorted(
        (n, e.first_row + 5, e.first_row + 25) for n in ("image", "audio", "valid", "time_s")
    )
    assert item["features"]["image"].shape == (20, SPEC.dim) and item["offset"] == 5
    np.testing.assert_allclose(item["time_s"], np.arange(5, 25) * 16 / 30)
    store.read_rows = original
    memory = SkimDataset(store, ("image", "audio"), split="test", require_label=False, in_memory=True)
    np.testing.assert_array_equal(memory[3]["features"]["audio"], ds[3]["features"]["audio"])


def test_collate_pads_and_masks(corpus):
    store = open_store(corpus["store"])
    ds = SkimDataset(store, ("fused",), require_label=False)
    batch = collate([ds[0], ds[(1, 0, 7)]])
    n0 = ds.entries[0].steps
    assert (
        batch["features"]["fused"].shape == (2, n0, SPEC.dim)
        and batch["features"]["fused"].dtype == torch.float32
    )
    assert batch["mask"].sum(1).tolist() == [n0, 7]
    assert float(batch["features"]["fused"][1, 7:].abs().sum()) == 0.0


def test_crop_sampler_lengths_and_determinism():
    steps = [50, 300, 800, 120, 1000, 450]
    sampler = CropBatchSampler(steps, batch_size=4, crop_min=200, crop_max=500, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i, _, _ in b) == list(range(len(steps)))
    for batch in batches:
        lengths = {stop - start for i, start, stop in batch if steps[i] > 500}
        assert len(lengths) <= 1 and all(200 <= n <= 500 for n in lengths)  # one crop length per batch
        for i, start, stop in batch:
            assert 0 <= start < stop <= steps[i]
            if steps[i] <= 200:
                assert (start, stop) == (0, steps[i])  # short videos kept whole
    assert list(sampler) == batches  # same epoch, same batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    grouped = list(LengthBatchSampler(steps, batch_size=2))
    assert [[steps[i] for i in b] for b in grouped] == [[50, 120], [300, 450], [800, 1000]]


def test_baseline_head_trains_for_steps_not_epochs():
    """A small corpus is one batch per epoch; the head must still get its optimiser steps (no strawman)."""
    from skim.evaluate import train_head

    rng = np.random.default_rng(0)
    y = np.arange(12) % 3
    x = rng.normal(size=(12, 16)).astype(np.float32) + 1.5 * np.eye(3, 16, dtype=np.float32)[y]
    kw = {"hidden": 32, "embed": 16, "lr": 1e-2, "batch_size": 256, "seed": 0}

    def train_accuracy(steps: int) -> float:
        head = train_head(x, y, 3, steps=steps, **kw)
        with torch.no_grad():
            pred = head(torch.from_numpy(x)).argmax(1).numpy()
        return float((pred == y).mean())

    assert train_accuracy(60) == 1.0  # 60 steps on 12 samples: 60 passes, not 1
    assert train_accuracy(1) < 1.0


def test_metrics_by_hand():
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    labels = np.array([0, 1, 1, 0])
    assert accuracy(scores, labels) == 0.75
    # class 0 ranking: v0(+), v3(+), v1, v2 -> AP 1; class 1 ranking: v2(+), v1(+), v3, v0 -> AP 1
    assert mean_average_precision(scores, labels) == 1.0
    labels = np.array([0, 0, 1, 1])
    flipped = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.7, 0.3]])
    # class 0 ranking v0(+), v3, v1(+), v2 and class 1 ranking v2(+), v1, v3(+), v0: positives at ranks 1, 3
    assert mean_average_precision(flipped, labels) == pytest.approx((1 + 2 / 3) / 2)
    assert mean_average_precision(flipped, np.array([1, 1, 1, 1])) == 1.0  # classes without positives skipped


# ---- commands ----------------------------------------------------------------------------------------------


def test_train_without_a_students_checkpoint_says_how_to_go_on(corpus, tmp_path):
    args = ["train", str(corpus["store"]), "--labels", str(corpus["labels"]), "--out", str(tmp_path / "s.pt")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "records none" in result.stderr and "--init scratch" in result.stderr, result.stderr
    assert not (tmp_path / "s.pt").exists()


def test_train_writes_self_describing_checkpoint_and_curves(trained):
    summary = trained["summary"]
    assert summary["epochs"] == 10 and summary["labels"] == [f"class{c}" for c in range(4)]
    assert summary["validated_on"] == "val" and summary["train_videos"] == 48
    assert summary["history"][-1]["train_loss"] < summary["history"][0]["train_loss"]
    ckpt = torch.load(trained["model"], weights_only=True)  # the one envelope (indexing.checkpoint)
    assert ckpt["kind"] == "skim" and ckpt["models"]["skim"]["name"] == "imgaud_skim" and ckpt["epoch"] == 10
    assert ckpt["models"]["skim"]["args"]["hidden"] == 64
    extra = ckpt["extra"]
    assert extra["features"]["index"] == ["image", "audio"] and extra["store"]["dim"] == SPEC.dim
    assert ckpt["config"]["nesterov"] is True and ckpt["config"]["momentum"] == 0.9
    assert Path(summary["curve"]).stat().st_size > 1000


def test_skim_beats_uniform_on_planted_evidence(trained, corpus, tmp_path):
    png = tmp_path / "curves.png"
    result = run(
        "evaluate", str(corpus["store"]), "--model", str(trained["model"]), "--labels", str(corpus["labels"]),
        "--curve-steps", "2", "--subsample-factors", "1,4", "--plot", str(png),
    )  # fmt: skip
    assert set(result["methods"]) == {"skim", "uniform", "random", "dense"}
    assert all(set(m) == METRICS for m in result["methods"].values())
    assert result["videos"] == 16
    skim, uniform = result["methods"]["skim"], result["methods"]["uniform"]
    assert skim["accuracy"] >= uniform["accuracy"] + 0.2, result["methods"]
    assert skim["map"] > uniform["map"]
    # moments.json beside the manifest is found: skim looks at evidence far above chance
    assert skim["evidence_precision"] > 2 * uniform["evidence_precision"]
    assert skim["steps_used"] == 10 and uniform["steps_used"] == 10
    dense = result["methods"]["dense"]
    assert dense["steps_used"] > 30 and dense["gflops_per_video"] > uniform["gflops_per_video"]
    assert result["costs"]["dense_teacher_gflops_per_video"] > dense["gflops_per_video"]
    assert (
        result["curves"]["steps"]["k"] == list(range(1, 11))
        and len(result["curves"]["subsample"]["skim"]) == 2
    )
    assert png.stat().st_size > 1000


def test_evaluate_inference_variants(trained, corpus):
    common = ["--curve-steps", "1", "--subsample-factors", "1", "--baseline-steps", "1"]
    store, model, labels = str(corpus["store"]), str(trained["model"]), str(corpus["labels"])
    short = run("evaluate", store, "--model", model, "--labels", labels, "--stop-after", "3", *common)
    assert short["methods"]["skim"]["steps_used"] == 3 and short["methods"]["uniform"]["steps_used"] == 3
    eager = run("evaluate", store, "--model", model, "--labels", labels, "--exit-threshold", "0.01", *common)
    assert eager["methods"]["skim"]["steps_used"] == 1  # any probability clears 0.01: exit after one step
    hard = run("evaluate", store, "--model", model, "--labels", labels, "--next-input", "hard", *common)
    assert hard["inference"]["next_input"] == "hard" and 0 <= hard["methods"]["skim"]["accuracy"] <= 1
    no_moments = run("evaluate", store, "--model", model, *common)  # store labels and splits, no moments
    assert no_moments["methods"]["skim"]["evidence_precision"] is None and no_moments["videos"] == 16


def test_query_json_schema_and_errors(trained, corpus):
    store, model = str(corpus["store"]), str(trained["model"])
    answers = run("query", store, "vid00004", "vid00009", "--model", model, "--top-k", "3")
    assert [a["video_id"] for a in answers] == ["vid00004", "vid00009"]
    moments = read_segments(corpus["moments"])
    for a in answers:
        assert set(a) == {"video_id", "top", "moments"}
        probs = [t["prob"] for t in a["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        steps = [m["step"] for m in a["moments"]]
        assert steps == sorted(set(steps)) and len(steps) >= 9  # each step once, in time order
        for m in a["moments"]:
            assert set(m) == {"step", "start_s", "end_s", "weight", "modalities", "selection"}
            assert m["end_s"] - m["start_s"] == pytest.approx(16 / 30) and 0 < m["weight"] <= 2
            assert m["modalities"] and set(m["modalities"]) <= {"image", "audio"} and 0 <= m["selection"] < 10
        # the first input is the mean, then every recurrent step picks once per query: T - 1 = 9 per modality
        assert all(sum(mod in m["modalities"] for m in a["moments"]) == 9 for mod in ("image", "audio"))
        # the first moment the image query picks is planted evidence
        start, end = moments[a["video_id"]][0]
        first = next(m for m in a["moments"] if m["selection"] == 0 and "image" in m["modalities"])
        assert start <= first["start_s"] + 8 / 30 <= end
    everything = run("query", store, "--all", "--model", model, "--top-k", "1")
    assert len(everything) == SPEC.videos
    # --precision auto: bf16 products on a CPU with native bf16, fp32 elsewhere; the same labels here
    fast = run("query", store, "vid00004", "vid00009", "--model", model, "--precision", "auto")
    assert [a["top"][0]["label"] for a in fast] == [a["top"][0]["label"] for a in answers]
    result = CliRunner().invoke(main, ["query", store, "vid00004", "--model", model, "--precision", "fp16"])
    assert result.exit_code == 2 and "fp16" in result.output
    result = CliRunner().invoke(main, ["query", store, "nope", "--model", model])
    assert result.exit_code == 2 and "nope" in result.output
    result = CliRunner().invoke(main, ["query", store, "--model", model])
    assert result.exit_code == 2 and "--all" in result.output


def test_show_draws_png_and_notes_missing_video(trained, corpus, tmp_path):
    png = tmp_path / "moments.png"
    shown = run(
        "show", str(corpus["store"]), "vid00004", "--model", str(trained["model"]), "--out", str(png),
        "--moments", str(corpus["moments"]),
    )  # fmt: skip
    assert png.stat().st_size > 1000
    assert shown["frames"] is False and "gone" in shown["note"]  # synthetic paths do not exist
    by_pick = sorted(shown["moments"], key=lambda m: m["selection"])  # stable: time order within a pick
    assert set(shown["shown_steps"]) <= {m["step"] for m in by_pick} and len(shown["shown_steps"]) <= 12
    assert len(shown["uniform_steps"]) == len(shown["shown_steps"])
    steps = shown["uniform_steps"]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert shown["shown_steps"] == sorted(shown["shown_steps"])  # frames in time order
    assert shown["label"] == "class0"  # the true label, from the store (vid00004 is planted class 0)
    from skim.query import explain

    ex = explain(str(corpus["store"]), str(trained["model"]), "vid00004")
    att, picked = ex["attention"], set(ex["chosen_steps"])
    assert att.max() <= 1 and min(att[j] for j in picked) > np.mean(
        [a for j, a in enumerate(att) if j not in picked]
    )


def test_resume_continues_exactly(corpus, tmp_path):
    from skim.checkpoint import resume_path

    args = ["train", str(corpus["store"]), "--labels", str(corpus["labels"]), *SMALL_MODEL, *FAST_TRAIN]
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    run(*args, "--out", str(straight), "--epochs", "2")
    few = CliRunner().invoke(main, [*args, "--out", str(split), "--epochs", "1", "--json"])
    assert few.exit_code == 0 and json.loads(few.stdout)["epochs"] == 1
    assert "make only 3 optimiser updates" in few.stderr  # 48 train videos / batch 16 x 1 epoch
    refused = CliRunner().invoke(main, [*args, "--out", str(split), "--epochs", "2"])
    assert refused.exit_code == 2 and "--resume" in refused.output
    lost = tmp_path / "lost.pt"
    resume_path(lost).write_bytes(resume_path(split).read_bytes())
    gone = CliRunner().invoke(main, [*args, "--out", str(lost), "--epochs", "2", "--resume"])
    assert gone.exit_code == 2 and "holds the kept (best) epoch, is missing" in gone.output, gone.output
    resumed = run(*args, "--out", str(split), "--epochs", "2", "--resume")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    a = torch.load(straight, weights_only=True)["state_dict"]
    b = torch.load(split, weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_train_keeps_the_best_epoch_stops_on_patience_and_resumes_exactly(corpus, tmp_path):
    """skim.pt holds the best epoch by validation accuracy (ties: val loss), checked by re-validating the
    file against the per-epoch history; skim.pt.resume the last epoch. A run cut inside the patience count
    and resumed with --resume ends on the same epoch with the same files; the JSON and text say why."""
    from indexing.training import Stopping, track
    from skim.checkpoint import load_checkpoint, resume_path
    from skim.train import validate

    args = ["train", str(corpus["store"]), "--labels", str(corpus["labels"]), *SMALL_MODEL, *FAST_TRAIN]
    adapt = ["--patience", "3", "--lr-patience", "2", "--min-updates", "0"]
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    full = run(*args, *adapt, "--epochs", "40", "--out", str(straight))
    history = full["history"]
    assert full["stopped"] == "patience" and len(history) == full["epochs"] < 40, full["message"]
    best = max(history, key=lambda h: (h["val_accuracy"], -h["val_loss"], -h["epoch"]))
    assert full["best_epoch"] == best["epoch"] and full["best_metric"] == best["val_accuracy"]
    assert f"best epoch {best['epoch']} of {len(history)}" in full["message"] and not full["still_improving"]
    assert full["batch_size"] == 16 and {h["lr"] for h in history} != {0.1}  # a plateau drop happened

    ckpt = load_checkpoint(straight)
    assert ckpt.meta["epoch"] == best["epoch"] and len(ckpt.meta["history"]) == len(history)
    names = ckpt.labels
    val_ds = SkimDataset(
        open_store(corpus["store"]), ckpt.config.batch_keys, labels=read_labels(corpus["labels"]),
        names=names, split="val", with_time=False,
    )  # fmt: skip
    again = validate(ckpt.model, val_ds, batch_size=64, device=torch.device("cpu"))
    assert again["val_accuracy"] == best["val_accuracy"]
    assert again["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5, abs=1e-7)
    assert torch.load(resume_path(straight), weights_only=True)["epoch"] == len(history)

    # Cut where the patience count is running (the epoch after the last improvement), then resume.
    stopping = Stopping(monitor="val_accuracy", tie="val_loss", patience=3)
    cut = next(e for e in range(2, len(history)) if track(history[:e], stopping, plateau=2).since_improvement)
    first = CliRunner().invoke(main, [*args, *adapt, "--epochs", str(cut), "--out", str(split), "--json"])
    assert first.exit_code == 0 and json.loads(first.stdout)["stopped"] == "max_epochs", first.output
    resumed = run(*args, *adapt, "--epochs", "40", "--out", str(split), "--resume")
    strip = [{k: v for k, v in h.items() if k not in ("seconds", "train_videos_per_s")} for h in history]
    assert [{k: v for k, v in h.items() if k not in ("seconds", "train_videos_per_s")}
            for h in resumed["history"]] == strip  # fmt: skip
    for a, b in ((straight, split), (resume_path(straight), resume_path(split))):
        assert torch.load(a, weights_only=True)["sha256"] == torch.load(b, weights_only=True)["sha256"], a
    assert resumed["best_epoch"] == full["best_epoch"] and resumed["stopped"] == "patience"

    # Three epochs while validation still rises: the text output says to raise --epochs.
    short = CliRunner().invoke(main, [*args, *adapt, "--epochs", "3", "--out", str(tmp_path / "short.pt")])
    assert short.exit_code == 0, short.output
    assert "stopped: max epochs (3)" in short.stdout
    assert "validation still improving at the last epoch; raise --epochs" in short.stdout


def test_train_defaults_hold_out_validation_videos_and_size_batches(corpus, tmp_path):
    """Without a val split the default holds out 15% of the training videos (never the test split) and
    the batch is an eighth of the training videos; --val-split none keeps the last epoch, said."""
    from indexing.training import holdout

    labels = read_labels(corpus["labels"])
    no_val = tmp_path / "no-val.csv"
    rows = ["video_id,path,label,split"] + [
        f"{vid},{e.path},{e.label},{'train' if e.split == 'val' else e.split}" for vid, e in labels.items()
    ]
    no_val.write_text("\n".join(rows) + "\n")
    args = ["train", str(corpus["store"]), "--labels", str(no_val), *SMALL_MODEL, "--init", "scratch"]
    summary = run(*args, "--epochs", "1", "--out", str(tmp_path / "h.pt"))
    train_ids = [vid for vid, e in labels.items() if e.split in ("train", "val")]
    held = holdout(train_ids, [labels[v].label for v in train_ids])
    assert summary["validated_on"] == "holdout" and summary["val_videos"] == len(held) > 0
    assert summary["train_videos"] == len(train_ids) - len(held)
    assert summary["batch_size"] == max(8, summary["train_videos"] // 8)

    result = CliRunner().invoke(
        main, [*args, "--epochs", "2", "--val-split", "none", "--out", str(tmp_path / "n.pt")]
    )
    assert result.exit_code == 0, result.output
    assert "no validation (--val-split none)" in result.stderr
    assert "no validation split: kept the last epoch (2)" in result.stdout


@pytest.mark.parametrize("name", available_models())
def test_every_registered_model_trains_and_answers(name, corpus, tmp_path):
    out = tmp_path / f"{name}.pt"
    args = [
        "train",
        str(corpus["store"]),
        "--labels",
        str(corpus["labels"]),
        "--out",
        str(out),
        "--epochs",
        "1",
    ]
    summary = run(*args, "--model-name", name, *SMALL_MODEL, *FAST_TRAIN, "--step-head-weight", "0.5")
    assert summary["model"] == name and summary["epochs"] == 1
    answers = run("query", str(corpus["store"]), "vid00001", "--model", str(out), "--exit-on", "step_head",
                  "--exit-threshold", "0.99")  # fmt: skip
    assert answers[0]["top"] and 1 <= len(answers[0]["moments"]) <= 18


def test_recognition_features_from_a_second_store(corpus, tmp_path):
    # Same step grid (same seed and lengths), stronger evidence: stands for an expensive recognition model.
    other = write_planted_store(tmp_path / "rec", PlantedSpec(**{**SPEC.__dict__, "strength": 16.0}))["store"]
    out = tmp_path / "rec.pt"
    summary = run(
        "train", str(corpus["store"]), "--labels", str(corpus["labels"]), "--out", str(out), "--epochs", "1",
        "--recognition-features", "fused", "--recognition-store", str(other), *SMALL_MODEL, *FAST_TRAIN,
    )  # fmt: skip
    assert summary["epochs"] == 1
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["models"]["skim"]["args"]["recognition_store"] is True
    assert ckpt["extra"]["features"]["recognition_store"] == str(other)
    common = ["--labels", str(corpus["labels"]), "--curve-steps", "1", "--subsample-factors", "1"]
    result = run("evaluate", str(corpus["store"]), "--model", str(out), *common, "--baseline-steps", "1")
    assert result["costs"]["recognition_networks"] == ["rec:audio", "rec:fusion", "rec:image"]
    hard = run("evaluate", str(corpus["store"]), "--model", str(out), *common, "--baseline-steps", "1",
               "--next-input", "hard")  # fmt: skip
    # soft mixing reads recognition features at every step; hard input only at the chosen ones
    assert hard["methods"]["skim"]["gflops_per_video"] < result["methods"]["skim"]["gflops_per_video"]
    shifted = write_planted_store(tmp_path / "shifted", PlantedSpec(**{**SPEC.__dict__, "min_steps": 31}))
    bad = CliRunner().invoke(main, ["query", str(corpus["store"]), "--all", "--model", str(out),
                                    "--recognition-store", str(shifted["store"])])  # fmt: skip
    assert bad.exit_code == 2 and "same step grid" in bad.output


def test_show_decodes_frames_at_chosen_and_uniform_steps(trained, tmp_path):
    from pipeline.encode import write_video

    videos = tmp_path / "videos"
    corpus = write_planted_store(tmp_path / "store", SPEC, video_root=videos)
    steps = open_store(corpus["store"]).video("vid00004").steps
    n_frames = int(np.ceil(steps * 16 / 30 * 10)) + 1  # a real 10 fps mp4 covering every step

    def frames():
        for i in range(n_frames):
            yield np.full((48, 64, 3), i % 256, dtype=np.uint8)  # (48, 64, 3)

    write_video(videos / "vid00004.mp4", frames(), fps=10)
    png = tmp_path / "frames.png"
    shown = run(
        "show", str(corpus["store"]), "vid00004", "--model", str(trained["model"]), "--out", str(png),
        "--max-frames", "5",
    )  # fmt: skip
    assert len(shown["shown_steps"]) == 5 and shown["frames"] is True and shown["note"] is None
    assert png.stat().st_size > 1000


# ---- answers that would be silently wrong ------------------------------------------------------------------


def _relabelled(corpus, tmp_path, edit) -> Path:
    """The planted labels manifest with ``edit(video_id, label, split) -> row or None`` applied per row."""
    header, *rows = corpus["labels"].read_text().splitlines()
    out = [header]
    for row in rows:
        vid, path, label, split = row.split(",")
        new = edit(vid, label, split)
        if new is not None:
            out.append(",".join((new[0], path, new[1], new[2])))
    target = tmp_path / "labels.csv"
    target.write_text("\n".join(out) + "\n")
    return target


def test_train_refuses_labels_of_another_corpus_and_says_how_many_matched(corpus, tmp_path):
    args = ["train", str(corpus["store"]), "--out", str(tmp_path / "m.pt"), "--epochs", "1", *SMALL_MODEL]
    other = _relabelled(corpus, tmp_path, lambda v, lab, s: ("other-" + v, lab, s))
    refused = CliRunner().invoke(main, [*args, "--labels", str(other), *FAST_TRAIN])
    assert refused.exit_code == 2 and "names none of the 80 ok videos" in refused.stderr, refused.output
    assert not (tmp_path / "m.pt").exists()
    half = _relabelled(corpus, tmp_path, lambda v, lab, s: (v, lab, s) if int(v[3:]) % 2 else None)
    result = CliRunner().invoke(main, [*args, "--labels", str(half), *FAST_TRAIN, "--json"])
    assert result.exit_code == 0, result.output
    assert "covers 40 of the 80 ok videos" in result.stderr and "keep the store's own labels" in result.stderr


def test_a_class_without_training_videos_is_warned_about_and_reported(corpus, tmp_path):
    moved = _relabelled(corpus, tmp_path, lambda v, lab, s: (v, lab, "test" if lab == "class3" else s))
    args = ["train", str(corpus["store"]), "--labels", str(moved), "--out", str(tmp_path / "m.pt")]
    result = CliRunner().invoke(main, [*args, "--epochs", "1", *SMALL_MODEL, *FAST_TRAIN, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["classes_without_training_videos"] == ["class3"]
    assert "1 class(es) have no video in split 'train': class3" in result.stderr


def test_evaluate_reports_map_only_where_it_means_something(trained, corpus, tmp_path):
    one_class = _relabelled(corpus, tmp_path, lambda v, lab, s: (v, lab, s if lab == "class0" else "train"))
    fast = ["--curve-steps", "1", "--subsample-factors", "1", "--baseline-steps", "1"]
    args = ["evaluate", str(corpus["store"]), "--model", str(trained["model"]), "--labels", str(one_class)]
    result = CliRunner().invoke(main, [*args, *fast, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["videos"] == 4 and report["classes_present"] == 1 and report["classes"] == 4
    assert all(m["map"] is None for m in report["methods"].values())
    assert "holds only class 'class0': mAP is undefined" in result.stderr
    assert "only 4 videos in split 'test'" in result.stderr
    table = CliRunner().invoke(main, [*args, *fast])
    assert table.exit_code == 0 and "skim" in table.stdout and " - " in table.stdout  # mAP shown as "-"


def test_a_store_of_other_students_is_refused_unless_allowed(tmp_path):
    """The checkpoint records the students behind its training store; features of others are another space."""
    spec = PlantedSpec(videos=24, classes=2, dim=16, min_steps=12, max_steps=20, chunk_rows=64)
    ours = write_planted_store(tmp_path / "ours", spec, models={"students": {"sha256": "a" * 64}})
    theirs = write_planted_store(tmp_path / "theirs", spec, models={"students": {"sha256": "b" * 64}})
    model = tmp_path / "m.pt"
    run("train", str(ours["store"]), "--out", str(model), "--epochs", "1", "--hidden", "16", "--embed", "16",
        *FAST_TRAIN)  # fmt: skip
    assert run("query", str(ours["store"]), "--all", "--model", str(model))  # its own store answers
    fast = ["--curve-steps", "1", "--subsample-factors", "1", "--baseline-steps", "1"]
    for args in (
        ["query", "--all"],
        ["evaluate", *fast],
        ["show", "vid00000", "--out", str(tmp_path / "x.png")],
    ):
        cmd = [args[0], str(theirs["store"]), *args[1:], "--model", str(model)]
        refused = CliRunner().invoke(main, cmd)
        assert refused.exit_code == 2, refused.output
        assert "students bbbbbbbbbbbb" in refused.stderr and "students aaaaaaaaaaaa" in refused.stderr
        assert "--allow-other-students" in refused.stderr
        allowed = CliRunner().invoke(main, [*cmd, "--allow-other-students", "--json"])
        assert allowed.exit_code == 0, allowed.output

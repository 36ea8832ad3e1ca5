"""ImgAud2Vid training: configs, distillation and fine-tuning loops, resume, report, clip loading, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, Dataset

from indexing.distill import DistillConfig, FinetuneConfig, curve_path, distill, distill_report, finetune
from indexing.models import build_students, load_students, load_teacher


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box spinning threads cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SIDE = 64  # in-memory clips are 64x64 to keep the loop tests fast; the CLI test reads real 112x112 steps


class MemoryClips(Dataset):
    """Generated labelled clips in memory: class 0 is reddish with a 440 Hz tone, class 1 bluish at 1760 Hz.

    Each item's clip is its frame drifting over 16 frames; the order is re-drawn per epoch from (seed, epoch).
    """

    def __init__(self, n: int = 8, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.labels = np.arange(n) % 2
        base = np.where(self.labels[:, None] == 0, [200, 40, 40], [40, 40, 200])  # (n, 3)
        noise = rng.integers(-40, 40, (n, SIDE, SIDE, 3))
        self.frames = np.clip(base[:, None, None, :] + noise, 0, 255).astype(np.uint8)  # (n, S, S, 3)
        self.clips = np.stack(
            [np.roll(self.frames, k, axis=2) for k in range(16)], axis=1
        )  # (n, 16, S, S, 3)
        t = np.arange(16000) / 16000
        freq = np.where(self.labels == 0, 440.0, 1760.0)
        self.audio = (
            0.5 * np.sin(2 * np.pi * freq[:, None] * t) + 0.05 * rng.standard_normal((n, 16000))
        ).astype(np.float32)
        self.seed, self.epoch = seed, -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        j = int(self.order[i])
        return {
            "frames": self.frames[j],
            "audio": self.audio[j],
            "clip": self.clips[j],
            "label": int(self.labels[j]),
            "video": j,
            "step": 0,
            "time_s": 0.0,
        }

    def video_id(self, v: int) -> str:
        return f"clip{v}"


class Interrupted(RuntimeError):
    pass


class DyingLoader:
    """A loader stand-in that raises in the middle of one epoch, like a killed job."""

    def __init__(self, loader: DataLoader, epoch: int):
        self.loader, self.epoch = loader, epoch
        self.dataset, self.batch_size = loader.dataset, loader.batch_size

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.dataset.epoch == self.epoch and i == 1:
                raise Interrupted("killed")
            yield batch


def _loaders(batch_size: int = 2):
    return DataLoader(MemoryClips(8), batch_size=batch_size), DataLoader(MemoryClips(4, seed=1), batch_size=4)


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(preset="tiny")[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"milestones": (50, 30)}, "milestones"),
        ({"patience": -1}, "patience=-1"),
        ({"lr_patience": -1}, "lr_patience=-1"),
        ({"max_updates": 0}, "max_updates=0"),
        ({"min_delta": -0.1}, "min_delta"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"kl_weight": -1.0}, "kl_weight=-1.0"),
        ({"l1_weight": 0.0}, "one > 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


def test_paper_defaults():
    cfg = DistillConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (60, 16, 1e-3, 0.9, 1e-4)
    assert cfg.nesterov and cfg.kl_weight == 0 and cfg.milestones == ()
    # Adaptive by default: at most the paper's 60 epochs, two plateau drops before a patience stop.
    assert (cfg.patience, cfg.lr_patience, cfg.max_updates) == (10, 4, None)
    assert (FinetuneConfig().epochs, FinetuneConfig().patience, FinetuneConfig().lr_patience) == (40, 8, 3)
    paper = DistillConfig(patience=0, lr_patience=0, milestones=(30, 50)).schedule()
    assert [paper.lr_at(e) for e in (0, 29, 30, 50)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            distill(build_students("tiny"), None, None, None, DistillConfig(device="cuda"), "never.pt")


FULL = DistillConfig(epochs=3, batch_size=2, lr=0.05, seed=1, milestones=(2,), lr_patience=0)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, teacher):
    """One uninterrupted 3-epoch tiny distillation, shared by the tests below."""
    out = tmp_path_factory.mktemp("full") / "students.pt"
    students = build_students("tiny", seed=1)
    history = distill(students, teacher, *_loaders(), FULL, out)
    return out, history, students.state_dict()


def test_distillation_loss_falls(full_run):
    out, history, _ = full_run
    losses = [h["train_loss"] for h in history]
    val = [h["val_l1"] for h in history]
    assert len(history) == 3 and losses[-1] < 0.95 * losses[0], losses
    assert val[-1] < val[0], val
    assert [h["lr"] for h in history] == pytest.approx([0.05, 0.05, 0.005])  # decays at milestone 2
    assert history[0]["clips_per_s"] > 0 and curve_path(out).stat().st_size > 1000
    _, meta = load_students(out)
    best = min(history, key=lambda h: h["val_l1"])["epoch"]
    assert meta["epoch"] == best and meta["config"]["lr"] == 0.05


def test_kl_term_changes_training(tmp_path, teacher):
    """Same seed and data with and without the KL term: if the term were ignored, both would match."""
    loader = DataLoader(MemoryClips(4), batch_size=4)
    results = {}
    for kl_weight in (0.0, 1.0):
        cfg = DistillConfig(epochs=1, batch_size=4, lr=0.01, kl_weight=kl_weight, kl_temperature=2.0)
        students = build_students("tiny", seed=0)
        history = distill(students, teacher, loader, loader, cfg, tmp_path / f"kl{kl_weight}.pt")
        results[kl_weight] = (history[0]["train_loss"], students.fusion.fc2.weight.detach().clone())
    (loss_l1, w_l1), (loss_kl, w_kl) = results[0.0], results[1.0]
    assert np.isfinite(loss_kl) and loss_kl > loss_l1  # the KL term adds a positive amount
    assert not torch.equal(w_l1, w_kl)


def test_diverging_loss_is_a_user_error_without_traceback():
    from indexing.errors import L2LError
    from indexing.training import DivergedError, Schedule, StepResult, fit, sgd

    w = torch.nn.Parameter(torch.ones(1))
    opt = sgd([{"params": [w]}], momentum=0.9, nesterov=True, weight_decay=0.0)
    with pytest.raises(DivergedError, match=r"lower --lr \(now 1e\+30\)") as err:
        fit(
            stage="toy", epochs=3, optimizer=opt, schedule=Schedule(lr=1e30),
            batches=lambda _e: range(4), step=lambda _b: StepResult((w**4).sum(), 1),
            save=lambda _e, _s: None, progress=False, note=lambda _l: None,
        )  # fmt: skip
    assert isinstance(err.value, L2LError) and err.value.exit_code == 2


def test_schedule_scales_groups_and_steps_at_milestones():
    from indexing.training import Schedule

    s = Schedule(lr=0.01, milestones=(15, 20), gamma=0.1)
    assert [s.lr_at(e) for e in (0, 14, 15, 19, 20)] == [0.01, 0.01, 0.01 * 0.1, 0.01 * 0.1, 0.01 * 0.1**2]
    assert s.lr_at(0, 0.1) == pytest.approx(0.001)


def _strip(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "clips_per_s")} for h in history]


def test_resume_after_interrupted_epoch_matches_uninterrupted_run(tmp_path, teacher, full_run):
    full_out, full_history, full_state = full_run
    train, val = _loaders()
    with pytest.raises(Interrupted):
        distill(
            build_students("tiny", seed=1),
            teacher,
            DyingLoader(train, epoch=1),
            val,
            FULL,
            tmp_path / "cut.pt",
        )
    assert load_students(tmp_path / "cut.pt.resume")[1]["epoch"] == 1
    resumed = build_students("tiny", seed=1)
    resumed_history = distill(resumed, teacher, train, val, FULL, tmp_path / "cut.pt")

    assert _strip(resumed_history) == _strip(full_history)
    for key, value in full_state.items():
        assert torch.equal(resumed.state_dict()[key], value), key

    # A finished run is not retrained; a run with other settings is refused.
    again = distill(build_students("tiny", seed=1), teacher, train, val, FULL, full_out)
    assert _strip(again) == _strip(full_history)
    other = DistillConfig(epochs=3, batch_size=2, lr=0.1, seed=1, milestones=(2,), lr_patience=0)
    with pytest.raises(ValueError, match="lr: 0.05 -> 0.1"):
        distill(build_students("tiny", seed=1), teacher, train, val, other, full_out)
    with pytest.raises(ValueError, match="batch size"):
        distill(build_students("tiny"), teacher, _loaders(4)[0], val, FULL, tmp_path / "other.pt")


ADAPT = DistillConfig(epochs=8, batch_size=2, lr=0.1, seed=1, patience=2, lr_patience=0)


def test_out_holds_the_best_epoch_patience_stops_and_resume_matches(tmp_path, teacher):
    """lr 0.1 overshoots after epoch 3: val L1 0.71, 0.70, 0.49, 0.73, 4.8 -> patience 2 stops after epoch 5,
    students.pt holds epoch 3 (its val L1 recomputed from the file equals the history's), .resume epoch 5.
    A run killed in epoch 5 (one epoch into the patience count) and resumed ends identically."""
    from indexing.distill import _clip_l1, outcome
    from indexing.training import resume_path

    train, val = _loaders()
    out = tmp_path / "best.pt"
    students = build_students("tiny", seed=1)
    history = distill(students, teacher, train, val, ADAPT, out)
    vals = [h["val_l1"] for h in history]
    best = 1 + int(np.argmin(vals))
    result = outcome(history, ADAPT)
    assert 1 < best < len(history) < ADAPT.epochs, vals  # stopped early, and the best is not the last
    assert result["stopped"] == "patience" and result["best_epoch"] == best and not result["still_improving"]
    assert (
        result["best_metric"] == vals[best - 1]
        and f"best epoch {best} of {len(history)}" in result["message"]
    )

    kept, meta = load_students(out)
    assert meta["epoch"] == best and load_students(resume_path(out))[1]["epoch"] == len(history)
    recomputed = float(np.mean(_clip_l1(kept, teacher, val, torch.device("cpu"))["l1_image_audio"]))
    assert recomputed == pytest.approx(vals[best - 1], rel=1e-6)
    assert all(abs(recomputed - v) > 1e-3 for i, v in enumerate(vals) if i != best - 1)
    for key, value in kept.state_dict().items():  # the in-memory students end as the kept epoch
        assert torch.equal(students.state_dict()[key], value), key
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["training"]["outcome"]["stopped"] == "patience" and "optimizer" not in ckpt["training"]

    cut = tmp_path / "cut.pt"
    with pytest.raises(Interrupted):
        distill(
            build_students("tiny", seed=1),
            teacher,
            DyingLoader(train, epoch=len(history) - 1),
            val,
            ADAPT,
            cut,
        )
    assert load_students(resume_path(cut))[1]["epoch"] == len(history) - 1
    resumed = distill(build_students("tiny", seed=1), teacher, train, val, ADAPT, cut)
    assert _strip(resumed) == _strip(history)
    for a, b in ((out, cut), (resume_path(out), resume_path(cut))):
        wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert wa["epoch"] == wb["epoch"] and wa["sha256"] == wb["sha256"], (a, b)

    # Raising the patience continues the finished run where it stopped (the lr schedule does not depend
    # on it); other settings are still refused.
    longer = distill(build_students("tiny", seed=1), teacher, train, val, replace(ADAPT, patience=3), cut)
    assert _strip(longer[: len(history)]) == _strip(history) and len(longer) == len(history) + 1
    # The kept epoch's file removed with its .resume left: refused before training, not after it.
    lost = tmp_path / "lost.pt"
    resume_path(lost).write_bytes(resume_path(cut).read_bytes())
    with pytest.raises(ValueError, match="holds the kept .best. epoch, is missing"):
        distill(build_students("tiny", seed=1), teacher, train, val, ADAPT, lost)
    with pytest.raises(ValueError, match="lr_patience: 0 -> 1"):
        distill(build_students("tiny", seed=1), teacher, train, val, replace(ADAPT, lr_patience=1), cut)


def test_budget_of_updates_stops_distillation(tmp_path, teacher):
    from indexing.distill import outcome

    cfg = replace(ADAPT, max_updates=5, patience=0)  # 4 batches per epoch: the second epoch stops after 1
    history = distill(build_students("tiny", seed=1), teacher, *_loaders(), cfg, tmp_path / "b.pt")
    assert [h["updates"] for h in history] == [4, 5]
    assert outcome(history, cfg)["stopped"] == "budget"


def test_finetune_learns_labels_and_freezing_keeps_students(tmp_path):
    train, val = _loaders(4)
    students = build_students("tiny", seed=0)
    cfg = FinetuneConfig(epochs=3, batch_size=4, lr=0.05, seed=0)
    history = finetune(
        students,
        train,
        DataLoader(MemoryClips(8), batch_size=4),
        cfg,
        tmp_path / "ft.pt",
        classes=["red", "blue"],
    )
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_accuracy"] >= 0.75
    loaded, meta = load_students(tmp_path / "ft.pt")
    assert meta["classes"] == ["red", "blue"] and loaded.classifier.num_classes == 2

    frozen = build_students("tiny", seed=0)
    trunk_before = {k: v.clone() for k, v in frozen.image.state_dict().items()}
    finetune(
        frozen,
        train,
        val,
        FinetuneConfig(epochs=1, batch_size=4, freeze_students=True),
        tmp_path / "frozen.pt",
        classes=["red", "blue"],
    )
    for key, value in frozen.image.state_dict().items():
        assert torch.equal(value, trunk_before[key]), key  # weights and BatchNorm statistics
    with pytest.raises(ValueError, match="at least 2 classes"):
        finetune(frozen, train, val, cfg, tmp_path / "one.pt", classes=["red"])


def test_finetune_refuses_a_distill_checkpoint_as_output(full_run):
    train, val = _loaders()
    with pytest.raises(ValueError, match="'distill' checkpoint, not 'finetune'"):
        finetune(
            build_students("tiny"),
            train,
            val,
            FinetuneConfig(epochs=1, batch_size=2),
            full_run[0],
            classes=["red", "blue"],
        )


def test_distill_report_ranks_clips(teacher):
    students = build_students("tiny", seed=0)
    loader = DataLoader(MemoryClips(6), batch_size=4)
    report = distill_report(students, teacher, loader, top_k=3)
    s = report["summary"]
    assert s["clips"] == 6 and len(report["clips"]) == 6 and s["audio_baseline"] == "mean"
    gains = [c["audio_gain"] for c in report["most_helped"]]
    assert gains == sorted(gains, reverse=True) and len(gains) == 3
    assert report["least_helped"][0]["audio_gain"] == min(c["audio_gain"] for c in report["clips"])
    assert 0 <= s["fraction_audio_helps"] <= 1
    assert s["mean_audio_gain"] == pytest.approx(s["mean_l1_image_only"] - s["mean_l1_image_audio"], abs=1e-6)
    assert {c["video_id"] for c in report["clips"]} == {f"clip{i}" for i in range(6)}
    zero = distill_report(students, teacher, loader, audio_baseline="zero")["summary"]
    assert zero["mean_l1_image_only"] != s["mean_l1_image_only"]
    assert zero["mean_l1_image_audio"] == pytest.approx(s["mean_l1_image_audio"])
    with pytest.raises(ValueError, match="available: mean, zero"):
        distill_report(students, teacher, loader, audio_baseline="silence")


# ---- real media: clip dataset and CLI ------------------------------------------------------------


def _write_corpus(root, *, durations=(1.6, 1.6, 1.6, 1.6)):
    from pipeline.encode import write_video

    rows = ["video_id,path,label,split"]
    for i, duration in enumerate(durations):
        label = "red" if i % 2 == 0 else "blue"
        rgb = (200, 30, 30) if label == "red" else (30, 30, 200)
        n = int(round(duration * 30))
        rng = np.random.default_rng(i)
        frames = [
            np.clip(np.array(rgb) + rng.integers(-20, 20, (64, 80, 3)), 0, 255).astype(np.uint8)
            for _ in range(n)
        ]
        t = np.arange(int(duration * 16000)) / 16000
        audio = 0.4 * np.sin(2 * np.pi * (440 if label == "red" else 1760) * t)[None]
        write_video(root / f"v{i}.mp4", frames, fps=30, audio=audio)
        rows.append(f"v{i},v{i}.mp4,{label},{'train' if i < 2 else 'test'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def test_clip_dataset_draws_capped_reproducible_steps(tmp_path):
    from pipeline.clips import ClipConfig, ClipDataset, make_loader, split_entries
    from pipeline.corpus import read_corpus

    manifest = _write_corpus(tmp_path, durations=(3.0, 1.2))
    entries = read_corpus(manifest)
    (tmp_path / "bad.mp4").write_bytes(b"garbage")
    entries.append(type(entries[0])(video_id="bad", path=tmp_path / "bad.mp4", label="red", split="train"))
    ds = ClipDataset(entries, ClipConfig(clips_per_video=4, seed=3))
    assert [v for v, _ in ds.skipped] == ["bad"] and ds.classes == ["blue", "red"]
    assert list(ds.num_steps) == [6, 3] and len(ds) == 4 + 3
    first = ds.index.copy()
    ds.set_epoch(1)
    assert not np.array_equal(ds.index, first)
    ds.set_epoch(0)
    np.testing.assert_array_equal(ds.index, first)
    assert all(0 <= s < ds.num_steps[v] for v, s in ds.index)

    item = ds[0]
    assert item["frames"].shape == (112, 112, 3) and item["frames"].dtype == np.uint8
    assert item["audio"].shape == (16000,) and item["audio"].dtype == np.float32
    assert item["clip"].shape == (16, 112, 112, 3) and item["label"] == ds.labels[item["video"]]
    red = item["frames"][..., 0].mean() > item["frames"][..., 2].mean()
    assert red == (ds.entries[item["video"]].label == "red")

    serial = next(iter(make_loader(ds, batch_size=3, num_workers=0)))
    parallel = next(iter(make_loader(ds, batch_size=3, num_workers=2)))
    assert torch.equal(serial["clip"], parallel["clip"]) and torch.equal(serial["step"], parallel["step"])

    # No val split and one training video per class: nothing to hold out, validation on the training videos
    # (monitoring only); the test split never validates unless named.
    train, val, name = split_entries(read_corpus(_write_corpus(tmp_path / "four")))
    assert name == "train" and [e.video_id for e in train] == ["v0", "v1"] == [e.video_id for e in val]
    train, val, name = split_entries(read_corpus(_write_corpus(tmp_path / "four")), val_split="test")
    assert name == "test" and [e.video_id for e in val] == ["v2", "v3"]
    with pytest.raises(ValueError, match="clips_per_video=0"):
        ClipConfig(clips_per_video=0)


def test_loader_workers_yield_the_cores_to_training():
    """Loader workers run at a lower CPU priority than the training process (on a busy host training keeps
    its cores: measured on bench/distill.py's path (c), 30.6 -> 52.3 clips/s, mean of 3 alternating runs)."""
    import os

    from pipeline.clips import LOADER_NICE, make_loader

    class Niceness(Dataset):
        epoch = 0

        def __len__(self) -> int:
            return 2

        def __getitem__(self, i) -> int:
            return os.nice(0)  # this process's niceness

    got = [int(b) for b in make_loader(Niceness(), batch_size=1, num_workers=1)]
    assert LOADER_NICE > 0 and got == [min(19, os.nice(0) + LOADER_NICE)] * 2


def test_clip_dataset_draws_only_inside_moments(tmp_path):
    from indexing.grid import STEP_S
    from pipeline.clips import ClipConfig, ClipDataset
    from pipeline.corpus import read_corpus

    # v0: 3.0 s = 6 steps (midpoints 0.27, 0.8, 1.33, 1.87, 2.4, 2.93 s); v1: 1.2 s = 3 steps, no segment.
    entries = read_corpus(_write_corpus(tmp_path, durations=(3.0, 1.2)))
    moments = {"v0": [[0.6, 1.4], [2.8, 3.0]]}  # midpoints of steps 1, 2 and 5 lie inside
    for sampling in ("random", "uniform"):
        ds = ClipDataset(entries, ClipConfig(clips_per_video=8, sampling=sampling), moments=moments)
        assert ds.untrimmed == ["v1"]
        for epoch in range(3):
            ds.set_epoch(epoch)
            steps = {v: sorted(int(s) for w, s in ds.index if w == v) for v in (0, 1)}
            assert steps == {0: [1, 2, 5], 1: [0, 1, 2]}
    capped = ClipDataset(entries[:1], ClipConfig(clips_per_video=2, seed=1), moments=moments)
    for epoch in range(4):
        capped.set_epoch(epoch)
        assert len(capped) == 2 and set(capped.index[:, 1]) <= {1, 2, 5}
    item = capped[0]
    mid = item["time_s"] + STEP_S / 2
    assert any(a <= mid <= b for a, b in moments["v0"])
    # Without moments nothing changes: the same draws as before the option existed.
    plain = ClipDataset(entries, ClipConfig(clips_per_video=4, seed=3))
    assert plain.untrimmed == [] and [len(c) for c in plain.candidates] == [6, 3]


def test_cli_distill_finetune_report(tmp_path):
    from cli import main

    manifest = _write_corpus(tmp_path)
    runner = CliRunner()
    common = ["--epochs", "2", "--batch-size", "2", "--workers", "0", "--clips-per-video", "2", "--json"]
    out = tmp_path / "students.pt"
    result = runner.invoke(
        main,
        [
            "distill",
            str(manifest),
            "--teacher-preset",
            "tiny",
            "--preset",
            "tiny",
            "--out",
            str(out),
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    history = report["history"]
    assert [h["epoch"] for h in history] == [1, 2] and all(h["val_l1"] > 0 for h in history)
    assert curve_path(out).exists()
    # no val split and one training video per class: validation on the training videos is monitoring
    # only, the last epoch is kept and the output says so
    assert report["best_epoch"] == 2 and report["stopped"] == "max_epochs" and not report["validated"]
    assert report["still_improving"] is False and "no validation split" in report["message"]
    assert "validation on training videos is monitoring only" in result.stderr

    ft = tmp_path / "ft.pt"
    result = runner.invoke(
        main, ["finetune", str(manifest), "--students", str(out), "--out", str(ft), *common]
    )
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.stdout)["history"][-1]["val_accuracy"] <= 1
    students, meta = load_students(ft)
    assert meta["classes"] == ["blue", "red"] and students.classifier.num_classes == 2

    moments = tmp_path / "moments.json"
    moments.write_text(json.dumps({"v0": {"label": "red", "segments": [[0.5, 1.2]]}}))
    trimmed = tmp_path / "ft-moments.pt"
    result = runner.invoke(
        main,
        ["finetune", str(manifest), "--students", str(out), "--out", str(trimmed), "--moments", str(moments),
         *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 train videos have no segment" in result.stderr and "v1" in result.stderr
    assert json.loads(result.stdout)["history"][-1]["epoch"] == 2

    result = runner.invoke(
        main,
        [
            "distill-report",
            str(manifest),
            "--students",
            str(out),
            "--teacher-preset",
            "tiny",
            "--workers",
            "0",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["clips"] == 4 * 3  # 4 videos of 3 steps

    result = runner.invoke(main, ["distill", str(manifest), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "exactly one of --teacher-weights" in result.output
    torch.save(load_teacher(preset="tiny")[0].net.state_dict(), tmp_path / "teacher.pt")
    result = runner.invoke(
        main,
        ["finetune", str(manifest), "--students", str(tmp_path / "teacher.pt"), "--out", str(ft), *common],
    )
    assert result.exit_code == 2 and "expected an l2l 'students' checkpoint" in result.output


# ---- from a feature store: stored teacher targets and inputs ------------------------------------


@pytest.fixture(scope="module")
def store_corpus(tmp_path_factory):
    """Four labelled videos (3-5 steps) and their store with the teacher's descriptors and the inputs."""
    from pipeline.extract import ExtractConfig, run_extraction

    root = tmp_path_factory.mktemp("store-corpus")
    manifest = _write_corpus(root, durations=(2.2, 1.6, 2.6, 1.6))
    config = ExtractConfig(
        students="random:0:tiny",
        dtype="float32",
        chunk_rows=16,  # inputs_frame shards of 16 rows in chunks of 4 (the sharded layout is what is read)
        features="image,audio,fused,teacher,inputs",
        teacher="preset:tiny",
    )
    report = run_extraction(manifest, root / "store", config, log=lambda _: None)
    assert report.complete and report.ok == 4
    return manifest, root / "store"


def _distil(loaders, teacher, out):
    students = build_students("tiny", seed=2)
    config = DistillConfig(epochs=2, batch_size=3, lr=0.05, seed=2)
    history = distill(students, teacher, loaders.train, loaders.val, config, out)
    return history, students.state_dict()


def test_distilling_from_a_store_matches_decoding_the_videos(store_corpus, teacher, tmp_path):
    from pipeline.clips import clip_loaders, store_loaders

    manifest, store = store_corpus
    kw = {"with_clips": True, "clips_per_video": 3, "seed": 5, "batch_size": 3, "workers": 0}
    today = clip_loaders(manifest, **kw)
    want_history, want = _distil(today, teacher, tmp_path / "today.pt")
    runs = {
        "targets+inputs": store_loaders(store, teacher_features="teacher", **kw),
        "targets, decoded frames": store_loaders(store, teacher_features="teacher", **kw),
        "live teacher, stored inputs": store_loaders(store, **kw),
    }
    runs["targets, decoded frames"].train.dataset.use_inputs = False
    runs["targets, decoded frames"].val.dataset.use_inputs = False
    assert runs["targets+inputs"].data["feature_sets"].keys() == {"inputs", "teacher"}
    assert (
        runs["targets+inputs"].data["feature_sets"]["teacher"]["sha256"]
        == load_teacher(preset="tiny")[1]["sha256"]
    )
    for name, loaders in runs.items():
        for epoch in (0, 1):  # the same clips in the same order
            loaders.train.dataset.set_epoch(epoch), today.train.dataset.set_epoch(epoch)
            np.testing.assert_array_equal(loaders.train.dataset.index, today.train.dataset.index)
        teacher_or_none = None if loaders.train.dataset.teacher_features else teacher
        history, got = _distil(loaders, teacher_or_none, tmp_path / f"{len(name)}.pt")
        for h, w in zip(history, want_history, strict=True):
            assert h["train_loss"] == pytest.approx(w["train_loss"], rel=1e-4, abs=1e-6), name
            assert h["val_l1"] == pytest.approx(w["val_l1"], rel=1e-4, abs=1e-6), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    # The stored-target loaders never decode a teacher clip; the inputs loader decodes nothing at all.
    item = runs["targets+inputs"].train.dataset[0]
    assert "clip" not in item and "audio" not in item and item["target"].shape == (512,)
    assert item["mel"].shape == (1, 101, 40) and item["frames"].shape == (112, 112, 3)


def test_grouped_decoding_reads_each_video_once_per_batch(store_corpus):
    from indexing.stores import open_store
    from pipeline.clips import ClipConfig, StoreClipDataset, make_loader

    _, store = store_corpus
    with open_store(store) as s:
        records = s.videos()
    clips = StoreClipDataset(store, records, ClipConfig(clips_per_video=3, seed=4), use_inputs=False)
    grouped = StoreClipDataset(
        store, records, ClipConfig(clips_per_video=3, seed=4, order="videos"), use_inputs=False
    )
    for epoch in range(3):  # the same clips, only their order differs: whole videos, steps in order
        clips.set_epoch(epoch), grouped.set_epoch(epoch)
        assert sorted(map(tuple, clips.index)) == sorted(map(tuple, grouped.index))
        videos = [int(v) for v, _ in grouped.index]
        assert [v for i, v in enumerate(videos) if i == 0 or v != videos[i - 1]] == list(
            dict.fromkeys(videos)
        )
        for v in set(videos):
            steps = grouped.index[grouped.index[:, 0] == v, 1]
            assert list(steps) == sorted(steps)
    reads = []
    original = grouped._reader

    def counting(v, **kw):
        reads.append(v)
        return original(v, **kw)

    grouped._reader = counting
    batch = next(iter(make_loader(grouped, batch_size=6, num_workers=0)))
    assert len(reads) == len(set(batch["video"].tolist())) <= 3  # one sequential read per video in the batch
    assert not any(grouped.__dict__.get("_readers", {}).values())  # each closed after its pass, none kept
    with open_store(store) as s:  # decoded frames are the stored inputs
        rows = [int(grouped.first_row[v] + st) for v, st in zip(batch["video"], batch["step"], strict=True)]
        stored = np.stack([s.read_rows("inputs_frame", r, r + 1)[0] for r in rows])
    np.testing.assert_array_equal(batch["frames"].numpy(), stored)
    with pytest.raises(ValueError, match="available: clips, videos"):
        ClipConfig(order="random")


def test_persistent_loader_workers_follow_the_epoch(store_corpus):
    from indexing.stores import open_store
    from pipeline.clips import ClipConfig, StoreClipDataset, make_loader

    _, store = store_corpus
    with open_store(store) as s:
        records = s.videos()

    def epochs(workers: int) -> list[list[tuple]]:
        data = StoreClipDataset(
            store, records, ClipConfig(clips_per_video=3, seed=4), teacher_features="teacher"
        )
        loader = make_loader(data, batch_size=4, num_workers=workers)
        out = []
        for epoch in range(3):  # workers start once (persistent) and still serve each epoch's own draw
            data.set_epoch(epoch)
            out.append([(b["video"].tolist(), b["step"].tolist(), b["frames"], b["target"]) for b in loader])
        assert loader.persistent_workers == (workers > 0)
        return out

    serial, parallel = epochs(0), epochs(2)
    order = [[(v, s) for b in e for v, s in zip(b[0], b[1], strict=True)] for e in serial]
    assert order[0] != order[1] != order[2]  # the epochs draw different clips or orders
    for e_serial, e_parallel in zip(serial, parallel, strict=True):
        assert len(e_serial) == len(e_parallel)
        for a, b in zip(e_serial, e_parallel, strict=True):
            assert a[:2] == b[:2]
            torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)
            torch.testing.assert_close(a[3], b[3], rtol=0, atol=0)


def test_cli_distill_finetune_report_from_a_store(store_corpus, tmp_path):
    from cli import main
    from indexing import checkpoint as ckpt_io

    manifest, store = store_corpus
    runner = CliRunner()
    common = ["--epochs", "1", "--batch-size", "2", "--workers", "0", "--clips-per-video", "2", "--json"]
    out = tmp_path / "students.pt"
    args = ["distill", str(store), "--teacher-features", "teacher", "--preset", "tiny", "--out", str(out)]
    result = runner.invoke(main, args + common)
    assert result.exit_code == 0, result.output
    assert "inputs, teacher read from the store" in result.stderr
    extra = ckpt_io.load_checkpoint(out, kind="students")["extra"]
    assert extra["data"]["store"] == str(store) and set(extra["data"]["feature_sets"]) == {
        "inputs",
        "teacher",
    }
    teacher_sha = load_teacher(preset="tiny")[1]["sha256"]
    assert extra["teacher_sha256"] == extra["data"]["feature_sets"]["teacher"]["sha256"] == teacher_sha
    # A teacher given too must be the one that made the descriptors (it is needed only for the KL term).
    result = runner.invoke(main, args + ["--teacher-preset", "paper", *common])
    assert result.exit_code == 2 and "did not make" in result.stderr
    result = runner.invoke(main, ["distill", str(manifest), "--teacher-features", "teacher", "--out", "x.pt"])
    assert result.exit_code == 2 and "give the STORE" in result.stderr

    ft = tmp_path / "ft.pt"
    result = runner.invoke(main, ["finetune", str(store), "--students", str(out), "--out", str(ft), *common])
    assert result.exit_code == 0, result.output
    assert load_students(ft)[1]["classes"] == ["blue", "red"]

    report = ["distill-report", str(store), "--students", str(out), "--workers", "0", "--json"]
    result = runner.invoke(main, report + ["--teacher-features", "teacher"])
    assert result.exit_code == 0, result.output
    from_store = json.loads(result.stdout)["summary"]
    result = runner.invoke(main, ["distill-report", str(manifest), *report[2:], "--teacher-preset", "tiny"])
    from_videos = json.loads(result.stdout)["summary"]
    assert from_store["clips"] == from_videos["clips"] == 5 + 3 + 5 + 3
    assert from_store["mean_l1_image_audio"] == pytest.approx(from_videos["mean_l1_image_audio"], rel=1e-5)


def test_torchrun_two_processes_train_like_one(store_corpus, tmp_path):
    """The same command under torchrun with 2 CPU processes (gloo, DDP): same global batches, same loss
    curve and weights as one process, to float tolerance (BatchNorm statistics over the global batch)."""
    import os
    import subprocess
    import sys

    from indexing import checkpoint as ckpt_io

    _, store = store_corpus
    # 6 clips per epoch in batches of 4: the last batch of 2 is shared 1 + 1.
    args = ["distill", str(store), "--teacher-features", "teacher", "--preset", "tiny", "--epochs", "2"]
    args += ["--batch-size", "4", "--clips-per-video", "3", "--workers", "0", "--lr", "0.001", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "cli", *args, "--out", str(tmp_path / "one.pt")], env=env, capture_output=True
    )
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    two = subprocess.run(
        [*launch, "cli", *args, "--out", str(tmp_path / "two.pt")], env=env, capture_output=True
    )
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    assert two.stdout.decode().count('"history"') == 1  # rank 0 reports
    h1, h2 = json.loads(one.stdout)["history"], json.loads(two.stdout)["history"]
    for a, b in zip(h1, h2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_l1"] == pytest.approx(a["val_l1"], rel=1e-5)
    a = ckpt_io.load_checkpoint(tmp_path / "one.pt", kind="students")["state_dict"]
    b = ckpt_io.load_checkpoint(tmp_path / "two.pt", kind="students")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:  # 4 SGD steps apart from summation order (measured: at most 1e-5 on values near 1)
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)


def test_slurm_distill_script_runs_torchrun_over_the_store(store_corpus, tmp_path):
    """cluster/slurm/distill.sbatch end to end on one node: stand-in srun, scontrol; real torchrun, 2 ranks"""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from indexing import checkpoint as ckpt_io

    _, store = store_corpus
    script = Path(__file__).resolve().parents[1] / "cluster" / "slurm" / "distill.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_CPUS_PER_TASK": "2",
        "SLURM_JOB_ID": "7",
        "L2L_PROCS_PER_NODE": "2",
        "L2L_RDZV_PORT": str(port),
    }
    out = tmp_path / "students.pt"
    args = [
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--clips-per-video",
        "3",
        "--workers",
        "0",
    ]
    result = subprocess.run(
        ["bash", str(script), str(store), *args, "--out", str(out), "--json"], env=env, capture_output=True
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert "1 node(s) x 2 process(es)" in result.stdout.decode()
    extra = ckpt_io.load_checkpoint(out, kind="students")["extra"]
    assert extra["data"]["store"] == str(store) and "teacher" in extra["data"]["feature_sets"]


def test_skimming_recognises_with_the_stores_teacher_features(store_corpus, tmp_path):
    """--recognition-features teacher reads the teacher set of the store that indexes the videos (no second
    store); evaluation counts the teacher clip as the recognition network."""
    from cli import main

    _, store = store_corpus
    model = tmp_path / "skim.pt"
    args = ["train", str(store), "--out", str(model), "--recognition-features", "teacher", "--epochs", "1"]
    result = CliRunner().invoke(main, args + ["--init", "scratch", "--no-progress"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        main, ["evaluate", str(store), "--model", str(model), "--json", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    costs = json.loads(result.stdout)["costs"]
    assert costs["recognition_networks"] == ["teacher_clip"] and costs["index_networks"] == ["audio", "image"]
    teacher = costs["gflops_per_step"]["teacher_clip"]
    dense = json.loads(result.stdout)["methods"]["dense"]["gflops_per_video"]
    assert dense == pytest.approx(costs["mean_steps_per_video"] * teacher, rel=0.01)  # a clip per step read
    other = ["train", str(store), "--out", str(tmp_path / "x.pt"), "--recognition-features", "inputs_frame"]
    result = CliRunner().invoke(main, other)
    assert result.exit_code == 2 and "choose from image, audio, fused, teacher" in result.output


def test_store_loaders_warn_as_the_manifest_loaders_do(store_corpus, tmp_path):
    """Reading clips from a store says the same warnings as reading them from the manifest: videos
    without a segment in moments.json (their clips come from the whole video)."""
    from pipeline.clips import clip_loaders, store_loaders

    manifest, store = store_corpus
    moments = tmp_path / "moments.json"
    moments.write_text(json.dumps({"v0": {"label": "red", "segments": [[0.5, 1.2]]}}))
    kw = {"with_clips": False, "clips_per_video": 2, "batch_size": 2, "workers": 0, "val_split": "test"}
    from_store = store_loaders(store, moments=moments, **kw).notes
    from_manifest = clip_loaders(manifest, moments=moments, **kw).notes
    tail = "their clips come from the whole video"
    want = [
        f"warning: 1 train videos have no segment in {moments} (e.g. v1); {tail}",
        f"warning: 2 val videos have no segment in {moments} (e.g. v2); {tail}",
    ]
    assert from_store[:-1] == from_manifest[:-1] == want

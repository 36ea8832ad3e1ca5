"""The synthetic corpus: deterministic real media whose class lives only in its evidence segments."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import decord
import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.corpus import read_corpus, read_moments
from pipeline.synth import (
    COLOURS,
    MARGIN_S,
    SynthConfig,
    class_signatures,
    plan_corpus,
    synthesize,
    uniform_baseline_ceiling,
)

# 8 videos hit every format of the proportional schedules: 4 containers, 3 frame rates, no/48k/16k audio.
SMALL = SynthConfig(videos=8, classes=3, seed=0, min_s=5.0, max_s=7.0, width=64, height=48)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    synthesize(out, SMALL)
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_bytes_whatever_the_jobs(corpus, tmp_path):
    again = tmp_path / "again"
    synthesize(again, SMALL, jobs=2)
    assert _hashes(again) == _hashes(corpus)
    assert len(_hashes(corpus)) == SMALL.videos + 3  # videos + manifest.csv, moments.json, synth.json


def test_different_seed_differs(corpus, tmp_path):
    other = tmp_path / "other"
    synthesize(other, replace(SMALL, seed=1))
    a, b = _hashes(corpus), _hashes(other)
    assert a["manifest.csv"] != b["manifest.csv"]
    assert a["moments.json"] != b["moments.json"]
    shared = [k for k in a if k.startswith("videos/") and k in b]
    assert all(a[k] != b[k] for k in shared)


def test_ground_truth_is_consistent(corpus):
    rows = _rows(corpus)
    moments = read_moments(corpus / "moments.json")
    assert [r["video_id"] for r in rows] == sorted(moments)
    names = {s.name for s in class_signatures(SMALL.classes)}
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == names and max(counts.values()) - min(counts.values()) <= 1
    for label in names:  # stratified: every class is in both splits
        splits = Counter(r["split"] for r in rows if r["label"] == label)
        assert splits["train"] >= 1 and splits["test"] >= 1
    for r in rows:
        m = moments[r["video_id"]]
        assert m["label"] == r["label"]
        assert r["label"] not in r["path"]  # file names must not leak the class
        segs = np.array(m["segments"])
        duration_s = float(r["duration_s"])
        assert SMALL.min_s - 0.1 <= duration_s <= SMALL.max_s + 0.1
        assert 1 <= len(segs) <= SMALL.max_segments
        lengths = segs[:, 1] - segs[:, 0]
        assert np.all(lengths >= SMALL.min_segment_s - 1e-3) and np.all(lengths <= SMALL.max_segment_s + 1e-3)
        assert segs[0, 0] >= MARGIN_S - 1e-3 and segs[-1, 1] <= duration_s - MARGIN_S + 1e-3
        assert np.all(segs[1:, 0] > segs[:-1, 1])  # sorted, not overlapping
    summary = json.loads((corpus / "synth.json").read_text())
    assert summary["config"]["seed"] == SMALL.seed and summary["videos"] == SMALL.videos


def test_files_decode_with_the_manifest_format(corpus):
    rows = _rows(corpus)
    assert {r["container"] for r in rows} == {"mp4", "mkv", "webm", "avi"}
    assert {r["fps"] for r in rows} == {"30", "25", "29.97003"}
    assert {(r["has_audio"], r["sample_rate"], r["channels"]) for r in rows} == {
        ("0", "0", "0"),
        ("1", "48000", "2"),
        ("1", "16000", "1"),
    }
    for r in rows:
        path = corpus / r["path"]
        vr = decord.VideoReader(str(path))
        assert vr.get_avg_fps() == pytest.approx(float(r["fps"]), abs=0.01), r
        assert abs(len(vr) - float(r["duration_s"]) * float(r["fps"])) <= 1, r
        assert vr[0].shape == (SMALL.height, SMALL.width, 3)
        if r["has_audio"] == "1":
            ar = decord.AudioReader(str(path), sample_rate=16_000, mono=False)
            assert ar.shape[0] == int(r["channels"]), r
            assert ar.shape[1] / 16_000 == pytest.approx(float(r["duration_s"]), abs=0.1), r  # AAC pads
        else:
            with pytest.raises(decord.DECORDError):
                decord.AudioReader(str(path))


def _inside(times_s: np.ndarray, segments: list[list[float]], pad_s: float = 0.0) -> np.ndarray:
    segs = np.asarray(segments)
    return ((times_s[:, None] >= segs[:, 0] - pad_s) & (times_s[:, None] < segs[:, 1] + pad_s)).any(axis=1)


def test_evidence_differs_from_background(corpus):
    sigs = {s.name: s for s in class_signatures(SMALL.classes)}
    moments = read_moments(corpus / "moments.json")
    for entry in read_corpus(corpus / "manifest.csv"):
        sig, modality = sigs[entry.label], entry.extra["modality"]
        segments = moments[entry.video_id]["segments"]
        vr = decord.VideoReader(str(entry.path))
        frames = vr.get_batch(list(range(len(vr)))).asnumpy().astype(np.int32)  # (F, H, W, 3), tiny
        inside = _inside(np.arange(len(vr)) / vr.get_avg_fps(), segments)
        # share of pixels of the signature colour, per frame
        near = (np.abs(frames - np.array(COLOURS[sig.colour])).sum(axis=-1) < 90).mean(axis=(1, 2))
        if modality == "audio":  # faint sprite
            assert near[inside].mean() < 0.005, entry.video_id
        else:
            assert near[inside].mean() > 0.01 and near[~inside].mean() < 0.002, entry.video_id
        if entry.extra["has_audio"] == "0":
            continue
        wave = decord.AudioReader(str(entry.path), sample_rate=16_000, mono=True)[:].asnumpy()[0]
        win = 8000  # 0.5 s windows
        n = len(wave) // win
        power = np.abs(np.fft.rfft(wave[: n * win].reshape(n, win), axis=1)) ** 2  # (n, 4001)
        freqs_hz = np.fft.rfftfreq(win, 1 / 16_000)
        band = power[:, abs(freqs_hz / sig.pitch_hz - 1) < 0.03].sum(axis=1) / power.sum(axis=1)  # (n,)
        t = (np.arange(n) + 0.5) * win / 16_000
        inside = _inside(t, [[s + 0.25, e - 0.25] for s, e in segments])
        outside = ~_inside(t, segments, pad_s=0.5)
        strong = 0.5 if modality != "visual" else 0.02  # the faint tone is still there, 26 dB down
        assert band[inside].mean() > strong and np.median(band[outside]) < 0.02, entry.video_id


def test_uniform_baseline_ceiling_is_hard_but_above_chance():
    default = uniform_baseline_ceiling(samples=3000)
    assert default["chance"] < default["ceiling_accuracy"] < 0.75
    assert default["ceiling_accuracy"] <= default["ceiling_accuracy_audio"]
    dense = uniform_baseline_ceiling(steps=200, samples=500)  # 200 steps cover every segment
    assert dense["hit_rate"] == 1.0
    short = uniform_baseline_ceiling(SynthConfig(min_s=6, max_s=6, min_segments=2), samples=500)
    assert short["hit_rate"] > default["hit_rate"]


def test_mp4_only_changes_formats_only():
    mixed, mp4 = plan_corpus(SMALL), plan_corpus(replace(SMALL, mp4_only=True))
    assert {(p.container, float(p.fps), p.sample_rate, p.channels) for p in mp4} == {("mp4", 30.0, 16_000, 1)}
    assert [(p.label, p.split, p.segments, p.seed) for p in mixed] == [
        (p.label, p.split, p.segments, p.seed) for p in mp4
    ]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"videos": 2, "classes": 3}, "videos=2"),
        ({"classes": 25, "videos": 30}, "classes=25"),
        ({"min_s": 10, "max_s": 5}, "min_s=10"),
        ({"width": 63}, "63x120"),
        ({"test_fraction": 1.0}, "test_fraction=1.0"),
        ({"min_segments": 3, "max_segments": 2}, "segments 3..2"),
        ({"min_s": 3, "max_s": 5}, "raise min_s"),
        ({"faint_loudness": 2.0}, "faint_loudness=2.0"),
    ],
)
def test_bad_config_names_the_value(kwargs, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        SynthConfig(**kwargs)


def test_cli_writes_a_corpus_and_refuses_to_clobber_it(tmp_path):
    out = tmp_path / "cli"
    args = ["synth", str(out), "--videos", "3", "--classes", "3", "--min-s", "5", "--max-s", "5"]
    args += ["--width", "32", "--height", "32", "--mp4-only", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["videos"] == 3 and summary["containers"]["mp4"] == 3
    assert len(read_corpus(out / "manifest.csv")) == 3
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0

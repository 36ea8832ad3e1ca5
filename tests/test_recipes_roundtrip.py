"""A class-folder tree through ``l2l prepare folder`` -> ``l2l extract`` -> ``l2l train``: labels and splits
survive every stage."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

from cli import main
from indexing.stores import open_store
from pipeline.encode import write_video


def _video(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    frames = (rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(40))  # 4 s at 10 fps
    audio = 0.1 * rng.standard_normal((1, 4 * 16_000)).astype(np.float32)  # (1, 64000) mono 16 kHz
    write_video(path, frames, fps=10, audio=audio)


def test_folder_recipe_round_trip_through_extract_and_train(tmp_path):
    root = tmp_path / "videos"
    for c, name in enumerate(["cheering", "drumming"]):
        for i in range(3):
            _video(root / name / f"{name}{i}.mp4", seed=10 * c + i)
    runner = CliRunner()

    def run(*args: str) -> dict:
        result = runner.invoke(main, [*args, "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    manifest = tmp_path / "m.csv"
    report = run("prepare", "folder", str(root), "--out", str(manifest), "--test-fraction", "0.34")
    assert report["rows"] == 6 and report["classes"] == 2 and not report["missing"]

    store = tmp_path / "store.zarr"
    run("extract", str(manifest), str(store), "--students", "random:0:tiny", "--workers", "0",
        "--chunk-rows", "8", "--no-progress")  # fmt: skip
    with open_store(store) as s:
        records = {r.video_id: r for r in s.videos()}
    rows = [line.split(",") for line in manifest.read_text().splitlines()[1:]]
    assert set(records) == {r[0] for r in rows}
    assert all(rec.status == "ok" and rec.steps == 8 for rec in records.values())
    assert {rec.label for rec in records.values()} == {"cheering", "drumming"}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Random students have no classifier for Psi and the classifier to start from.
        summary = run("train", str(store), "--labels", str(manifest), "--out", str(tmp_path / "skim.pt"),
                      "--epochs", "1", "--batch-size", "4", "--hidden", "32", "--embed", "16",
                      "--init", "scratch")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    splits = [r[3] for r in rows]
    assert summary["train_videos"] == splits.count("train") and splits.count("test") >= 2
    assert sorted(summary["labels"]) == ["cheering", "drumming"]

"""A class-folder tree through ``l2l prepare folder`` -> ``l2l extract`` -> ``l2l train``: labels and splits
survive every stage."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli import main
from indexing.stores import open_store


def test_folder_recipe_round_trip_through_extract_and_train(tmp_path, make_video, one_torch_thread):
    root = tmp_path / "videos"
    for c, name in enumerate(["cheering", "drumming"]):
        for i in range(3):
            make_video(root / name / f"{name}{i}.mp4", 4.0, fps=10, seed=10 * c + i)  # 4 s at 10 fps
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

    # Random students have no classifier for Psi and the classifier to start from.
    summary = run("train", str(store), "--labels", str(manifest), "--out", str(tmp_path / "skim.pt"),
                  "--epochs", "1", "--batch-size", "4", "--hidden", "32", "--embed", "16",
                  "--init", "scratch")  # fmt: skip
    splits = [r[3] for r in rows]
    assert summary["train_videos"] == splits.count("train") and splits.count("test") >= 2
    assert sorted(summary["labels"]) == ["cheering", "drumming"]

"""Dataset recipes: real annotation formats, real tiny videos, exact manifests and reports."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli import main
from pipeline.corpus import read_corpus, read_moments
from pipeline.encode import write_video
from pipeline.recipes import (
    KINETICS_SOUNDS_CLASSES,
    PrepareConfig,
    available_recipes,
    prepare,
    probe_duration_s,
)


def make_video(path: Path, seconds: float = 1.0, fps: float = 2.0) -> Path:
    """A real, tiny (32x32, ``seconds * fps`` black frames) video; the container follows the suffix."""
    frames = [np.zeros((32, 32, 3), np.uint8)] * int(seconds * fps)
    return write_video(path, frames, fps=fps, container=path.suffix.lstrip("."))


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run(dataset: str, root: Path, out: Path, **options) -> tuple[dict, list[dict[str, str]]]:
    report = prepare(PrepareConfig(dataset=dataset, root=root, out=out, **options))
    return report.to_json(), read_rows(out)


# ---- registry and config ------------------------------------------------------------------------------


def test_registry_lists_the_papers_datasets_and_the_cli_offers_every_recipe():
    assert {"activitynet", "folder", "kinetics-sounds", "sports1m", "ucf101"} <= set(available_recipes())
    dataset = next(p for p in main.commands["prepare"].params if p.name == "dataset")
    assert list(dataset.type.choices) == available_recipes()


def test_every_recipe_option_is_a_prepare_option():
    """A recipe's own option is one PrepareConfig field; `l2l prepare` offers it with its default."""
    import dataclasses

    fields = {f.metadata["flag"]: f for f in dataclasses.fields(PrepareConfig) if "flag" in f.metadata}
    options = {p.opts[0]: p for p in main.commands["prepare"].params if p.opts and p.opts[0] in fields}
    assert set(options) == set(fields) and len(fields) >= 8
    for flag, option in options.items():
        assert option.help and option.default == fields[flag].default, flag


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_refuses_a_folder_without_videos(name, tmp_path):
    """No annotations or videos under ROOT: a clear error and no manifest (it would make an empty store)."""
    (tmp_path / "root").mkdir()
    out = tmp_path / "m.csv"
    result = CliRunner().invoke(main, ["prepare", name, str(tmp_path / "root"), "--out", str(out)])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {name}: ")
    assert not out.exists()


def test_kinetics_sounds_has_the_papers_31_classes():
    assert len(KINETICS_SOUNDS_CLASSES) == len(set(KINETICS_SOUNDS_CLASSES)) == 31


@pytest.mark.parametrize(
    "options, message",
    [
        ({"dataset": "kinetics"}, "available: activitynet, folder"),
        ({"out": "manifest.txt"}, "must be a .csv"),
        ({"split_id": 4}, "use 1, 2 or 3"),
        ({"test_fraction": 1.0}, r"in \[0, 1\)"),
        ({"per_class_train": -1}, "must be >= 0"),
        ({"min_s": 10.0, "max_s": 5.0}, "min_s <= max_s"),
        ({"annotations": "nowhere.csv"}, "does not exist"),
    ],
)
def test_config_rejects_bad_values(tmp_path, options, message):
    base = {"dataset": "folder", "root": tmp_path, "out": tmp_path / "m.csv"}
    if "out" in options:
        options = options | {"out": tmp_path / options["out"]}
    if "annotations" in options:
        options = options | {"annotations": tmp_path / options["annotations"]}
    with pytest.raises(ValueError, match=message):
        PrepareConfig(**(base | options))


def test_config_rejects_missing_root(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        PrepareConfig(dataset="folder", root=tmp_path / "videos", out=tmp_path / "m.csv")


# ---- kinetics-sounds ----------------------------------------------------------------------------------


@pytest.fixture
def kinetics(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "playing bagpipes,aaa,10,20,train\n"
        "bowling,bbb,0,10,train\n"
        "tickling,ccc,5,15,train\n"
        "abseiling,ddd,0,10,train\n"
        "bowling,bbb,0,10,train\n"
    )
    (ann / "validate.csv").write_text(  # the 700 format: an extra is_cc column
        "label,youtube_id,time_start,time_end,split,is_cc\nsinging,eee,1,11,validate,0\n"
    )
    (ann / "test.csv").write_text("youtube_id,time_start,time_end,split\nfff,0,10,test\n")  # unlabeled
    root = tmp_path / "videos"
    make_video(root / "train" / "playing bagpipes" / "aaa_000010_000020.mp4")
    make_video(root / "train" / "bbb.mkv")  # named by id alone
    make_video(root / "train" / "abseiling" / "ddd_000000_000010.mp4")  # listed, other class
    make_video(root / "val" / "eee_000001_000011.avi")
    make_video(root / "extra" / "zzz_000000_000010.mp4")  # on disk, listed nowhere
    return root, ann


def test_kinetics_sounds_manifest_and_report(kinetics, tmp_path):
    root, ann = kinetics
    out = tmp_path / "manifest.csv"
    report, rows = run("kinetics-sounds", root, out, annotations=ann)
    extra = ["youtube_id", "time_start", "time_end"]
    assert list(rows[0]) == ["video_id", "path", "label", "split", *extra]
    assert [tuple(r.values()) for r in rows] == [
        ("aaa_000010_000020", "videos/train/playing bagpipes/aaa_000010_000020.mp4", "playing bagpipes",
         "train", "aaa", "10", "20"),
        ("bbb_000000_000010", "videos/train/bbb.mkv", "bowling", "train", "bbb", "0", "10"),
        ("eee_000001_000011", "videos/val/eee_000001_000011.avi", "singing", "val", "eee", "1", "11"),
    ]  # fmt: skip
    assert report["rows"] == 3 and report["classes"] == 3
    assert report["missing"] == [
        {
            "video_id": "ccc_000005_000015",
            "label": "tickling",
            "split": "train",
            "expected": "ccc_000005_000015.* | ccc.*",
        }
    ]
    assert report["unlisted"] == ["extra/zzz_000000_000010.mp4"]
    assert report["unknown_labels"] == []
    assert report["not_in_subset"] == 2  # abseiling and the unlabeled test row
    assert [e["video_id"] for e in report["excluded"]] == ["bbb_000000_000010"]
    assert "duplicate" in report["excluded"][0]["reason"]
    missing = read_rows(out.parent / "missing.csv")
    assert [(m["video_id"], m["youtube_id"]) for m in missing] == [("ccc_000005_000015", "ccc")]
    entries = read_corpus(out)  # the corpus reader takes it back, every path a real file
    assert [e.video_id for e in entries] == [r["video_id"] for r in rows]
    assert all(e.path.is_file() for e in entries) and entries[1].extra["youtube_id"] == "bbb"


def test_kinetics_sounds_single_annotation_file_and_underscored_labels(tmp_path):
    ann = tmp_path / "kinetics400_train.csv"
    ann.write_text('label,youtube_id,time_start,time_end\n"playing_bagpipes",aaa,10,20\n')
    root = tmp_path / "videos"
    make_video(root / "aaa_000010_000020.mp4")
    report, rows = run("kinetics-sounds", root, tmp_path / "m.csv", annotations=ann)
    assert [(r["label"], r["split"]) for r in rows] == [("playing bagpipes", "train")]  # split from file name
    assert report["missing"] == [] and report["unlisted"] == []


def test_kinetics_sounds_bad_header_names_the_file(tmp_path):
    (tmp_path / "train.csv").write_text("label,id,start,end\nbowling,x,0,10\n")
    with pytest.raises(ValueError, match=r"train.csv: header .* lacks"):
        run("kinetics-sounds", tmp_path, tmp_path / "m.csv")


def test_kinetics_sounds_unknown_split_names_the_row(tmp_path):
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\nbowling,x,0,10,holdout\n")
    with pytest.raises(ValueError, match=r"k.csv:2: split 'holdout' is not one of"):
        run("kinetics-sounds", tmp_path, tmp_path / "m.csv")


# ---- ucf101 -------------------------------------------------------------------------------------------


@pytest.fixture
def ucf(tmp_path):
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Basketball\n")
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
        "Basketball/v_Basketball_g01_c01.avi 2\n"
        "Basketball/v_Basketball_g02_c01.avi 1\n"  # index disagrees with classInd
        "Fencing/v_Fencing_g01_c01.avi 3\n"  # class not in classInd
    )
    (lists / "testlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nBasketball/v_Basketball_g03_c01.avi\n"
    )
    (lists / "trainlist02.txt").write_text("Basketball/v_Basketball_g03_c01.avi 2\n")
    (lists / "testlist02.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi\n")
    root = tmp_path / "UCF-101"
    for rel in ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "Basketball/v_Basketball_g01_c01.avi",
                "Basketball/v_Basketball_g02_c01.avi", "moved/v_Basketball_g03_c01.avi",
                "ApplyEyeMakeup/v_ApplyEyeMakeup_g99_c01.avi"]:  # fmt: skip
        make_video(root / rel)
    return root, lists


def test_ucf101_split1(ucf, tmp_path):
    root, lists = ucf
    report, rows = run("ucf101", root, tmp_path / "m.csv", annotations=lists)
    assert [tuple(r.values()) for r in rows] == [
        ("v_ApplyEyeMakeup_g08_c01", "UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "ApplyEyeMakeup",
         "train"),
        ("v_Basketball_g01_c01", "UCF-101/Basketball/v_Basketball_g01_c01.avi", "Basketball", "train"),
        ("v_Basketball_g03_c01", "UCF-101/moved/v_Basketball_g03_c01.avi", "Basketball", "test"),
    ]  # fmt: skip
    assert list(rows[0]) == ["video_id", "path", "label", "split"]
    assert report["missing"] == [
        {"video_id": "v_ApplyEyeMakeup_g01_c01", "label": "ApplyEyeMakeup", "split": "test",
         "expected": "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"}
    ]  # fmt: skip
    assert report["unknown_labels"] == ["Fencing"]
    assert sorted(e["video_id"] for e in report["excluded"]) == ["v_Basketball_g02_c01", "v_Fencing_g01_c01"]
    # g02 is listed (with a bad index), so its file is not "unlisted"; g99 is listed nowhere.
    assert report["unlisted"] == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g99_c01.avi"]


def test_ucf101_split2_uses_its_own_lists(ucf, tmp_path):
    root, lists = ucf
    report, rows = run("ucf101", root, tmp_path / "m.csv", annotations=lists, split_id=2)
    assert [(r["video_id"], r["split"]) for r in rows] == [
        ("v_Basketball_g03_c01", "train"),
        ("v_ApplyEyeMakeup_g08_c01", "test"),
    ]
    assert report["excluded"] == [] and report["unknown_labels"] == []


def test_ucf101_missing_split_file_says_what_to_pass(ucf, tmp_path):
    root, lists = ucf
    with pytest.raises(ValueError, match="trainlist03.txt not found"):
        run("ucf101", root, tmp_path / "m.csv", annotations=lists, split_id=3)


# ---- activitynet --------------------------------------------------------------------------------------


def anet_video(subset: str, annotations: list[tuple[str, float, float]]) -> dict:
    return {
        "subset": subset,
        "duration": 40.0,
        "url": "https://www.youtube.com/watch?v=x",
        "annotations": [{"label": lab, "segment": [s, e]} for lab, s, e in annotations],
    }


def test_activitynet_labels_splits_and_moments(tmp_path):
    database = {
        "vid1": anet_video("training", [("Archery", 0, 10), ("Bowling", 20, 25), ("Bowling", 30, 31)]),
        "vid2": anet_video("validation", [("Archery", 0, 10), ("Bowling", 0, 5)]),  # count tie: duration
        "vid3": anet_video("training", [("Bowling", 0, 5), ("Archery", 10, 15)]),  # full tie: name
        "vid4": anet_video("testing", []),
        "vid5": anet_video("training", [("Archery", 1, 2)]),  # no file
        "vid6": anet_video("training", [("Bowling", 5, 5), ("Bowling", 1, 3)]),  # a zero-length segment
    }
    ann = tmp_path / "activity_net.v1-3.min.json"
    ann.write_text(json.dumps({"version": "VERSION 1.3", "database": database}))
    root = tmp_path / "videos"
    for name in ["v_vid1.mp4", "sub/v_vid2.mkv", "vid3.mp4", "vid4.avi", "v_vid6.mp4", "other.mp4"]:
        make_video(root / name)
    out = tmp_path / "m.csv"
    report, rows = run("activitynet", root, out, annotations=ann)
    assert [
        (r["video_id"], r["path"], r["label"], r["split"], r["duration_s"], r["subset"]) for r in rows
    ] == [
        ("vid1", "videos/v_vid1.mp4", "Bowling", "train", "40.0", "training"),
        ("vid2", "videos/sub/v_vid2.mkv", "Archery", "val", "40.0", "validation"),
        ("vid3", "videos/vid3.mp4", "Archery", "train", "40.0", "training"),
        ("vid4", "videos/vid4.avi", "", "test", "40.0", "testing"),
        ("vid6", "videos/v_vid6.mp4", "Bowling", "train", "40.0", "training"),
    ]
    assert read_moments(tmp_path / "moments.json") == {  # the corpus reader accepts it
        "vid1": {"label": "Bowling", "segments": [[20.0, 25.0], [30.0, 31.0]]},
        "vid2": {"label": "Archery", "segments": [[0.0, 10.0]]},
        "vid3": {"label": "Archery", "segments": [[10.0, 15.0]]},
        "vid6": {"label": "Bowling", "segments": [[1.0, 3.0]]},
    }
    assert report["excluded"] == [
        {"video_id": "vid6", "reason": "segment [5, 5] is not 0 <= start < end; not in moments.json"}
    ]
    assert [m["video_id"] for m in report["missing"]] == ["vid5"]
    assert report["unlisted"] == ["other.mp4"]
    assert report["classes"] == 2 and report["moments"] == str(tmp_path / "moments.json")


def test_activitynet_taxonomy_flags_unknown_labels(tmp_path):
    taxonomy = [{"nodeName": "Root", "parentName": None}, {"nodeName": "Archery", "parentName": "Root"}]
    database = {
        "a": anet_video("training", [("Archery", 0, 1)]),
        "b": anet_video("training", [("Zorbing", 0, 1)]),
    }
    ann = tmp_path / "activity_net.v1-3.min.json"
    ann.write_text(json.dumps({"taxonomy": taxonomy, "database": database}))
    make_video(tmp_path / "v" / "v_a.mp4")
    make_video(tmp_path / "v" / "v_b.mp4")
    report, rows = run("activitynet", tmp_path / "v", tmp_path / "m.csv", annotations=ann)
    assert [r["video_id"] for r in rows] == ["a"]
    assert report["unknown_labels"] == ["Zorbing"]
    assert report["excluded"] == [{"video_id": "b", "reason": "label 'Zorbing' not in the taxonomy"}]


# ---- folder -------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "videos"
    for i in range(5):
        make_video(root / "cats" / f"c{i}.mp4")
    make_video(root / "dogs" / "d0.mp4")
    make_video(root / "dogs" / "deep" / "d1.avi")
    make_video(root / "solo" / "s0.mp4")
    make_video(root / "loose.mp4")  # no class folder
    return root


def test_folder_stratified_seeded_split(tree, tmp_path):
    report, rows = run("folder", tree, tmp_path / "m.csv", test_fraction=0.2, seed=0)
    by_class = {
        c: sorted((r["video_id"], r["split"]) for r in rows if r["label"] == c) for c in ("cats", "dogs")
    }
    assert [v for v, _ in by_class["cats"]] == ["c0", "c1", "c2", "c3", "c4"]
    assert [s for _, s in by_class["cats"]].count("test") == 1  # round(5 * 0.2)
    assert sorted(s for _, s in by_class["dogs"]) == ["test", "train"]  # at least one on each side
    assert [(r["video_id"], r["split"]) for r in rows if r["label"] == "solo"] == [("s0", "train")]
    assert report["unlisted"] == ["loose.mp4"] and report["classes"] == 3 and report["rows"] == 8
    again, rows_again = run("folder", tree, tmp_path / "m2.csv", test_fraction=0.2, seed=0)
    assert rows_again == rows  # seeded: a rerun is identical


def test_folder_split_of_a_class_ignores_other_classes(tree, tmp_path):
    _, before = run("folder", tree, tmp_path / "a.csv")
    make_video(tree / "birds" / "b0.mp4")
    make_video(tree / "birds" / "b1.mp4")
    _, after = run("folder", tree, tmp_path / "b.csv")
    assert [r for r in after if r["label"] != "birds"] == before
    splits = {seed: run("folder", tree, tmp_path / f"s{seed}.csv", seed=seed)[1] for seed in range(8)}
    test_cats = {seed: [r["video_id"] for r in rows if r["label"] == "cats" and r["split"] == "test"]
                 for seed, rows in splits.items()}  # fmt: skip
    assert len({tuple(v) for v in test_cats.values()}) > 1  # the seed matters


def test_folder_duplicate_stem_is_excluded_not_dropped(tmp_path):
    make_video(tmp_path / "v" / "a" / "x.mp4")
    make_video(tmp_path / "v" / "b" / "x.mp4")
    report, rows = run("folder", tmp_path / "v", tmp_path / "m.csv", test_fraction=0.0)
    assert [(r["video_id"], r["label"]) for r in rows] == [("x", "a")]
    assert report["excluded"] == [{"video_id": "x", "reason": "duplicate of the 'train' row labelled 'a'"}]


def test_rerun_removes_stale_missing_csv(tree, tmp_path):
    (tmp_path / "missing.csv").write_text("video_id\nold\n")
    report, _ = run("folder", tree, tmp_path / "m.csv")
    assert report["missing_csv"] is None and not (tmp_path / "missing.csv").exists()


# ---- sports1m -----------------------------------------------------------------------------------------


def test_probe_duration_reads_real_files_and_names_bad_ones(tmp_path):
    assert probe_duration_s(make_video(tmp_path / "a.mp4", seconds=3.0)) == pytest.approx(3.0, abs=0.1)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="unreadable"):
        probe_duration_s(tmp_path / "bad.mp4")


@pytest.fixture
def sports(tmp_path):
    lists = tmp_path / "sports-1m-dataset"
    (lists / "original").mkdir(parents=True)
    (lists / "labels.txt").write_text("boomerang\nbowling\ncurling\n", encoding="utf-8")
    train = [
        {"id": "aaaaaaaaaaa", "label487": [0, 9]},  # a second, unknown index
        {"source": "https://www.youtube.com/watch?v=ccccccccccc", "label487": [0, 2]},  # id from the URL
        {"id": "hhhhhhhhhhh", "label487": [1]},  # unreadable file
        {"id": "iiiiiiiiiii", "label487": [1]},  # no file
        {"id": "kkkkkkkkkkk", "label487": [7]},  # index out of range
    ]
    (lists / "sports1m_train.json").write_text(json.dumps(train))
    (lists / "original" / "test_partition.txt").write_text(
        "https://www.youtube.com/watch?v=fffffffffff 1\n"
        "https://www.youtube.com/watch?v=ggggggggggg 1\n"
        "https://www.youtube.com/watch?v=aaaaaaaaaaa 0\n"  # already in train
    )
    root = tmp_path / "videos"
    make_video(root / "kkkkkkkkkkk.mp4")  # listed (unknown label): not "unlisted"
    make_video(root / "aaaaaaaaaaa.mp4", seconds=3.0)
    make_video(root / "sub" / "ccccccccccc.mkv", seconds=1.0)  # too short
    make_video(root / "fffffffffff.mp4", seconds=3.0)
    make_video(root / "ggggggggggg.mp4", seconds=3.0)
    (root / "hhhhhhhhhhh.mp4").write_bytes(b"\x00" * 64)
    make_video(root / "zzzzzzzzzzz.mp4")  # not listed
    return root, lists


def test_sports1m_mini_subset(sports, tmp_path):
    root, lists = sports
    options = {"annotations": lists, "per_class_train": 2, "per_class_test": 1, "min_s": 2.0, "max_s": 5.0}
    report, rows = run("sports1m", root, tmp_path / "m.csv", **options)
    assert len(rows) == 2
    assert rows[0] == {"video_id": "aaaaaaaaaaa", "path": "videos/aaaaaaaaaaa.mp4", "label": "boomerang",
                       "split": "train", "duration_s": "3.000", "labels": "boomerang"}  # fmt: skip
    kept_test = rows[1]["video_id"]
    assert kept_test in {"fffffffffff", "ggggggggggg"} and rows[1]["split"] == "test"
    other = ({"fffffffffff", "ggggggggggg"} - {kept_test}).pop()
    reasons = {e["video_id"]: e["reason"] for e in report["excluded"]}
    assert reasons == {
        "kkkkkkkkkkk": "label index ['7'] not in labels.txt",
        "aaaaaaaaaaa": "test listing repeats a train listing",
        "ccccccccccc": "duration 1.0 s outside [2, 5]",
        other: "test quota of 1 for 'bowling' filled",
        "hhhhhhhhhhh": reasons["hhhhhhhhhhh"],
    }
    assert reasons["hhhhhhhhhhh"].startswith("unreadable")
    assert report["missing"] == [
        {"video_id": "iiiiiiiiiii", "label": "bowling", "split": "train", "expected": "iiiiiiiiiii.*"}
    ]
    assert report["unknown_labels"] == ["7", "9"]
    assert report["unlisted"] == ["zzzzzzzzzzz.mp4"]
    again, rows_again = run("sports1m", root, tmp_path / "m2.csv", **options)
    assert rows_again == rows  # the seeded choice is stable


def test_sports1m_without_labels_says_what_to_pass(tmp_path):
    (tmp_path / "sports1m_train.json").write_text("[]")
    with pytest.raises(ValueError, match="labels.txt"):
        run("sports1m", tmp_path, tmp_path / "m.csv")


# ---- CLI ----------------------------------------------------------------------------------------------


def test_cli_prepare_json_matches_the_report(tree, tmp_path):
    out = tmp_path / "cli" / "manifest.csv"
    args = ["prepare", "folder", str(tree), "--out", str(out), "--json"]
    refused = CliRunner().invoke(main, args)  # no folder is created behind a typo
    assert refused.exit_code == 2 and "does not exist; create it first" in refused.output
    out.parent.mkdir()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert {k: payload[k] for k in ("dataset", "rows", "classes", "unlisted", "out")} == {
        "dataset": "folder", "rows": 8, "classes": 3, "unlisted": ["loose.mp4"], "out": str(out)
    }  # fmt: skip
    assert payload["missing"] == [] and payload["unknown_labels"] == []
    assert len(read_rows(out)) == 8


def test_cli_prepare_readable_summary(kinetics, tmp_path):
    root, ann = kinetics
    out = tmp_path / "m.csv"
    result = CliRunner().invoke(main, ["prepare", "kinetics-sounds", str(root), "--out", str(out),
                                       "--annotations", str(ann)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "kinetics-sounds: 3 rows, 3 classes" in result.output
    assert "1 missing (listed, no file)" in result.output and "ccc_000005_000015" in result.output
    assert "extra/zzz_000000_000010.mp4" in result.output


def test_cli_prepare_bad_input_fails_cleanly(tmp_path):
    result = CliRunner().invoke(main, ["prepare", "ucf101", str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert result.exit_code == 2
    assert "error: ucf101: no annotation file" in result.output
    bad = CliRunner().invoke(main, ["prepare", "kinetics", str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert bad.exit_code == 2 and "kinetics-sounds" in bad.output  # click lists the registered choices

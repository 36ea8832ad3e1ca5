"""Reading a corpus: manifest, directory and glob give stable unique ids; nothing is dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexing.corpus import read_labels, read_segments
from indexing.errors import ConfigError
from pipeline.corpus import CorpusEntry, read_corpus, read_moments, write_manifest


@pytest.fixture(scope="module")
def tree(tmp_path_factory, make_video) -> Path:
    """root/{a/x.mp4, b/x.mp4, b/deep/y.webm, c/z.mp4, c/z.avi, .hidden/h.mp4, notes.txt}."""
    root = tmp_path_factory.mktemp("tree")
    make_video(root / "a" / "x.mp4", 2 / 30, audio=False, size=(16, 16), container="mp4", seed=1)
    make_video(root / "b" / "x.mp4", 2 / 30, audio=False, size=(16, 16), container="mp4", seed=2)
    make_video(root / "b" / "deep" / "y.webm", 2 / 30, audio=False, size=(16, 16), container="webm", seed=3)
    make_video(root / "c" / "z.mp4", 2 / 30, audio=False, size=(16, 16), container="mp4", seed=4)
    make_video(root / "c" / "z.avi", 2 / 30, audio=False, size=(16, 16), container="avi", seed=5)
    make_video(root / ".hidden" / "h.mp4", 2 / 30, audio=False, size=(16, 16), container="mp4", seed=6)
    (root / "notes.txt").write_text("not a video")
    return root


def test_directory_ids_are_relative_paths_without_suffix(tree):
    entries = read_corpus(tree)
    assert [e.video_id for e in entries] == ["a/x", "b/deep/y", "b/x", "c/z.avi", "c/z.mp4"]
    assert all(e.path.is_absolute() and e.path.is_file() for e in entries)
    assert entries[0].path == tree / "a" / "x.mp4"
    assert all(e.label == "" and e.split == "" and e.extra == {} for e in entries)


def test_glob_ids_are_relative_to_the_glob_root(tree):
    assert [e.video_id for e in read_corpus(f"{tree}/**/*.mp4")] == ["a/x", "b/x", "c/z"]
    assert [e.video_id for e in read_corpus(str(tree / "b" / "*" / "*.webm"))] == ["deep/y"]
    assert [e.video_id for e in read_corpus(tree / "a" / "x.mp4")] == ["x"]  # a single file


def test_manifest_roundtrip_relative_paths_and_extra_columns(tree, tmp_path, monkeypatch):
    entries = [
        CorpusEntry("one", tree / "a" / "x.mp4", "cat", "train", {"fps": "30", "note": "a,b"}),
        CorpusEntry("two", tree / "b" / "x.mp4", "dog", "test", {"fps": "25"}),
    ]
    manifest = write_manifest(tree / "m.csv", entries)
    text = manifest.read_text().splitlines()
    assert text[0] == "video_id,path,label,split,fps,note"
    assert text[1].startswith("one,a/x.mp4,cat,train,30,")  # relative: the corpus can move
    monkeypatch.chdir(tmp_path)  # paths resolve against the manifest's folder, not the working directory
    back = read_corpus(manifest)
    assert [(e.video_id, e.path, e.label, e.split) for e in back] == [
        (e.video_id, e.path, e.label, e.split) for e in entries
    ]
    assert back[0].extra == {"fps": "30", "note": "a,b"} and back[1].extra == {"fps": "25", "note": ""}


def test_manifest_keeps_missing_files_and_derives_ids(tree, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{tree}/a/x.mp4,cat\nsub/gone.mp4,dog\n{tree}/b/x.mp4,cat\n")
    entries = read_corpus(manifest)
    assert [e.label for e in entries] == ["cat", "dog", "cat"]
    assert entries[1].path == tmp_path / "sub" / "gone.mp4" and not entries[1].path.exists()
    assert entries[1].video_id == "sub/gone"
    assert len({e.video_id for e in entries}) == 3  # x.mp4 twice, in different folders: no collision


def test_manifest_duplicate_ids_are_listed(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("video_id,path\nv1,a.mp4\nv2,b.mp4\nv1,c.mp4\nv3,d.mp4\nv3,e.mp4\n")
    with pytest.raises(ValueError, match="2 duplicate video id.*v1, v3"):
        read_corpus(manifest)
    with pytest.raises(ValueError, match="duplicate video id"):
        write_manifest(tmp_path / "w.csv", [CorpusEntry("v", Path("a.mp4")), CorpusEntry("v", Path("b.mp4"))])


@pytest.mark.parametrize(
    "content, words",
    [
        ("video_id,file\nv,a.mp4\n", r"missing column\(s\) path .*columns: video_id, file"),
        ("video_id,path,label\n", "no rows"),
        ("video_id,path\nv1,a.mp4\nv2,\n", r"m\.csv:3: empty path"),
    ],
)
def test_bad_manifest_says_what_to_fix(tmp_path, content, words):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(ValueError, match=words):
        read_corpus(tmp_path / "m.csv")


def test_nothing_to_read_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        read_corpus(tmp_path / "empty")
    with pytest.raises(ValueError, match="matched no files"):
        read_corpus(f"{tmp_path}/*.mp4")
    with pytest.raises(ValueError, match="no such manifest"):
        read_corpus(tmp_path / "nope")


def test_read_moments_validates_segments(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"v1": {"label": "cat", "segments": [[1, 2.5], [4, 5]]}}))
    assert read_moments(good) == {"v1": {"label": "cat", "segments": [[1.0, 2.5], [4.0, 5.0]]}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"v1": {"label": "cat", "segments": [[3, 2]]}}))
    with pytest.raises(ConfigError, match=r"'v1'.*segment \[3.0, 2.0\] needs 0 <= start_s < end_s"):
        read_moments(bad)


@pytest.mark.parametrize(
    "segments, words",
    [
        ([[-1.0, 2.0]], r"\[-1.0, 2.0\] needs 0 <= start_s"),  # skim's old copy accepted this
        ([[2.0, 2.0]], r"\[2.0, 2.0\] needs 0 <= start_s < end_s"),  # and this
        ([[1.0, 2.0, 3.0]], "is not \\[start_s, end_s\\]"),
        (["1-2"], "is not \\[start_s, end_s\\]"),
    ],
)
def test_one_moments_reader_for_both_sides(tmp_path, segments, words):
    """skim reads moments.json through the same reader as pipeline: the same segments are refused."""
    path = tmp_path / "moments.json"
    path.write_text(json.dumps({"v1": {"label": "cat", "segments": segments}}))
    for reader in (read_moments, read_segments):
        with pytest.raises(ConfigError, match=words):
            reader(path)


def test_labels_manifest_without_paths_and_derived_ids_are_said(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("video_id,label,split\nv1,cat,train\nv2,dog,test\n")
    by_id = read_labels(labels)
    assert {v: (e.label, e.split, e.path) for v, e in by_id.items()} == {
        "v1": ("cat", "train", None),
        "v2": ("dog", "test", None),
    }
    with pytest.raises(ConfigError, match="missing column"):
        read_corpus(labels)  # extraction needs paths
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("video_id,path\nv1,a.mp4\n")
    with pytest.raises(ConfigError, match=r"missing column\(s\) label"):
        read_labels(no_label)
    derived = tmp_path / "derived.csv"
    derived.write_text("path,label\nclips/a.mp4,cat\nclips/b.mp4,dog\n")
    notes: list[str] = []
    assert [e.video_id for e in read_corpus(derived, log=notes.append)] == ["clips/a", "clips/b"]
    assert notes == [f"{derived}: 2 video id(s) derived from paths (no video_id column), e.g. 'clips/a'"]
    assert list(read_labels(derived)) == ["clips/a", "clips/b"]  # the same ids extraction gives


def test_extract_says_which_ids_it_derived_and_refuses_an_empty_manifest(tmp_path, make_video):
    from click.testing import CliRunner

    from cli import main

    make_video(tmp_path / "clips" / "a.mp4", 0.6)
    (tmp_path / "m.csv").write_text("path,label\nclips/a.mp4,cat\n")
    args = [
        "extract",
        str(tmp_path / "m.csv"),
        str(tmp_path / "s"),
        "--students",
        "random:0:tiny",
        "--workers",
        "0",
    ]
    planned = CliRunner().invoke(
        main, [*args, "--max-tasks", "0", "--no-progress"]
    )  # plan, write nothing else
    assert planned.exit_code == 3, planned.output
    assert "1 video id(s) derived from paths (no video_id column), e.g. 'clips/a'" in planned.stderr
    # The interrupted store says so: statuses stay pending until the run that finishes it.
    info = json.loads(CliRunner().invoke(main, ["store", "info", str(tmp_path / "s"), "--json"]).stdout)
    assert (info["tasks"], info["tasks_done"], info["complete"], info["pending"]) == (1, 0, False, 1)
    human = CliRunner().invoke(main, ["store", "info", str(tmp_path / "s")]).stdout
    assert "tasks     0 of 1 done; incomplete: rerun `l2l extract`" in human and "{" not in human
    check = CliRunner().invoke(main, ["store", "check", str(tmp_path / "s"), "--no-progress"])
    assert check.exit_code == 3 and "no damage found, but incomplete: 0 of 1 tasks done" in check.stderr
    (tmp_path / "empty.csv").write_text("video_id,path,label,split\n")
    args[1:3] = [str(tmp_path / "empty.csv"), str(tmp_path / "e")]
    empty = CliRunner().invoke(main, args)
    assert empty.exit_code == 2 and "no rows" in empty.stderr and not (tmp_path / "e").exists()


def test_clip_loaders_warn_about_a_class_only_in_validation(tmp_path, make_video):
    from pipeline.clips import clip_loaders

    rows = ["video_id,path,label,split"]
    videos = [("cat", "train"), ("dog", "train"), ("cat", "test"), ("cow", "test")]
    for i, (label, split) in enumerate(videos):
        make_video(tmp_path / f"v{i}.mp4", 0.6, seed=i)
        rows.append(f"v{i},v{i}.mp4,{label},{split}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    loaders = clip_loaders(
        tmp_path / "m.csv", with_clips=False, clips_per_video=1, batch_size=2, workers=0, val_split="test"
    )
    assert loaders.classes == ["cat", "dog"]
    warned = "1 validation videos are of class(es) cow that no training video has"
    assert any(warned in note for note in loaders.notes)

"""Every command's ``--json`` speaks one vocabulary: the same name for the same thing in every command.

One tiny real run of the whole chain (synth -> extract -> store commands -> distill -> finetune ->
distill-report -> train -> evaluate -> query -> show -> prepare), each with ``--json``; the commands come from
the click group, so a new command with ``--json`` and no run here fails. ``demo`` runs every other command
(minutes): its ``--json`` is the same summary plus the evaluation, checked by its own keys below.
"""

from __future__ import annotations

import json
import shutil

import click
import pytest
from click.testing import CliRunner

from cli import main

# The vocabulary (README, "JSON output"): a name on the left never appears as a key; use the right one.
SYNONYMS = {
    "out_dir": "out",
    "output": "out",
    "output_path": "out",
    "path_out": "out",
    "wall_s": "seconds",
    "elapsed": "seconds",
    "elapsed_s": "seconds",
    "duration": "seconds",
    "plot": "curve",
    "curve_png": "curve",
    "num_classes": "classes",
    "n_classes": "classes",
    "class_names": "labels",
    "error": "reason",
    "failures_count": "failed",
    "n_failed": "failed",
    "failed_videos": "failures",
}
TYPES = {  # the same key always holds the same kind of value
    "out": str,
    "curve": (str, type(None)),
    "store": str,
    "seconds": (int, float),
    "classes": int,
    "labels": list,
    "failed": int,
    "failures": list,
    "reason": str,
    "video_id": str,
}
SKIP = {"demo"}  # runs all the others for minutes; its keys are checked in test_demo_json_keys


def _json_commands(group: click.Group = main, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out |= _json_commands(command, (*prefix, name))
        elif any(p.name == "as_json" for p in command.params):
            out.add((*prefix, name))
    return out


# Provenance recorded verbatim in a store or checkpoint (the models that made it): not the CLI's words, and
# rewriting it would change what extraction writes.
RECORDED = {"models"}


def _walk(doc, path="$"):
    """Every ``(path, key, value)`` of the dicts inside ``doc``, recorded provenance aside."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield path, key, value
            if key not in RECORDED:
                yield from _walk(value, f"{path}.{key}")
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            yield from _walk(item, f"{path}[{i}]")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, one_torch_thread) -> dict[tuple[str, ...], object]:
    """The ``--json`` document of every command, from one tiny real run."""
    w = tmp_path_factory.mktemp("json")
    runner = CliRunner()
    docs: dict[tuple[str, ...], object] = {}

    def run(name: tuple[str, ...], *args: str, code: int = 0) -> None:
        result = runner.invoke(main, [*name, *args, "--json"])
        assert result.exit_code == code, result.output
        docs[name] = json.loads(result.stdout)

    c, s = w / "corpus", w / "s.zarr"
    run(("synth",), str(c), "--videos", "6", "--classes", "2", "--min-s", "6", "--max-s", "8")
    manifest = str(c / "manifest.csv")
    run(("extract",), manifest, str(s), "--students", "random:0:tiny", "--workers", "0", "--no-progress")
    run(("store", "info"), str(s))
    run(("store", "ls"), str(s))
    run(("store", "check"), str(s), "--no-progress")
    run(("store", "repair"), str(s), "--workers", "0", "--no-progress")
    run(("store", "export"), str(s), str(w / "s.h5"), "--format", "hdf5", "--no-progress")
    fast = ["--epochs", "1", "--clips-per-video", "1", "--workers", "0", "--batch-size", "4"]
    tiny = ["--teacher-preset", "tiny", "--preset", "tiny"]
    run(("distill",), manifest, *tiny, "--out", str(w / "d.pt"), *fast)
    run(("finetune",), manifest, "--students", str(w / "d.pt"), "--out", str(w / "f.pt"), *fast)
    run(("distill-report",), manifest, "--students", str(w / "d.pt"), "--teacher-preset", "tiny",
        "--clips-per-video", "1", "--workers", "0")  # fmt: skip
    run(("train",), str(s), "--labels", manifest, "--out", str(w / "k.pt"), "--init", "scratch",
        "--epochs", "1", "--batch-size", "2", "--hidden", "16", "--embed", "16")  # fmt: skip
    model = ["--model", str(w / "k.pt")]
    run(("evaluate",), str(s), *model, "--labels", manifest, "--baseline-steps", "1", "--curve-steps", "1",
        "--subsample-factors", "1")  # fmt: skip
    run(("query",), str(s), "--all", *model)
    first = docs[("store", "ls")][0]["video_id"]
    run(("show",), str(s), first, *model, "--out", str(w / "x.png"))
    for i, video in enumerate(sorted((c / "videos").iterdir())[:4]):  # a class-folder tree of real videos
        (w / "tree" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(video, w / "tree" / f"class{i % 2}" / video.name)
    run(("prepare",), "folder", str(w / "tree"), "--out", str(w / "p.csv"))
    return docs


def test_every_json_command_is_covered(outputs):
    assert set(outputs) | {(n,) for n in SKIP} == _json_commands()


def test_one_name_for_one_thing(outputs):
    for name, doc in outputs.items():
        for path, key, value in _walk(doc):
            where = f"l2l {' '.join(name)} --json: {path}.{key}"
            assert key not in SYNONYMS, f"{where}: say {SYNONYMS[key]!r}"
            if key in TYPES:
                assert isinstance(value, TYPES[key]), f"{where} is {type(value).__name__}"
            if key == "failures":
                assert all({"video_id", "reason"} <= set(f) for f in value), where


def test_the_shared_words_are_where_a_user_looks(outputs):
    assert {"out", "seconds", "classes", "labels"} <= set(outputs[("synth",)])
    assert {"store", "failed", "failures", "seconds", "complete"} <= set(outputs[("extract",)])
    assert {"failed", "failures", "complete", "tasks", "tasks_done"} <= set(outputs[("store", "info")])
    for name in ("distill", "finetune"):
        assert {"out", "curve", "seconds"} <= set(outputs[(name,)])
    assert {"out", "curve", "classes", "labels", "seconds"} <= set(outputs[("train",)])
    assert {"classes", "labels", "classes_present", "seconds"} <= set(outputs[("evaluate",)])
    assert "seconds" in outputs[("distill-report",)]
    assert {"out"} <= set(outputs[("store", "export")]) and {"out"} <= set(outputs[("show",)])
    moments = outputs[("query",)][0]["moments"]
    assert [m["start_s"] for m in moments] == sorted(m["start_s"] for m in moments)
    assert all(m["modalities"] for m in moments)


def test_demo_json_keys():
    """The demo's summary is built by one function whose keys follow the same vocabulary."""
    import inspect

    import cli

    source = inspect.getsource(cli._demo)
    for key in ('"out"', '"seconds"', '"stage_seconds"', '"evaluation"', '"files"'):
        assert key in source
    assert not any(f'"{bad}"' in source for bad in SYNONYMS)

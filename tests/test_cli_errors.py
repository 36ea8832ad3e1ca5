"""Every command, given a bad value of each kind it takes, ends with one ``error:`` line and its documented
exit code: never a traceback.

The commands come from the click group itself, and the kinds of bad value each command must be tried with
come from its parameters (a path, a number, a checkpoint, a store, a scheduler), so a new command or a new
kind of option without a case here fails :func:`test_every_command_has_a_case_of_each_kind_it_takes`.
Exit codes are the table of ``indexing.errors`` (README, "Exit codes").
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from cli import main
from skim.synthetic import PlantedSpec, write_planted_store

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_PARAMS = {"students", "students_path", "model_path", "init_resnet18", "teacher_weights"}
UNREACHABLE = "tcp://127.0.0.1:9"  # the discard port: nothing listens


@dataclass(frozen=True)
class Case:
    """One bad invocation: ``args`` with ``{name}`` placeholders filled from the fixture files."""

    kind: str  # path | value | checkpoint | store | scheduler | data
    args: tuple[str, ...]
    code: int
    says: str  # a fragment the error line must contain
    error_line: bool = True  # False: a report (store check) that lists the problem instead


def _commands(
    group: click.Group = main, prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], click.Command]:
    """Every leaf command of the ``l2l`` group, by its name path."""
    out: dict[tuple[str, ...], click.Command] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out.update(_commands(command, (*prefix, name)))
        else:
            out[(*prefix, name)] = command
    return out


def _kinds(command: click.Command) -> set[str]:
    """The kinds of bad value a command must be tried with, from its parameters."""
    kinds = set()
    for p in command.params:
        if isinstance(p.type, click.Path):
            kinds.add("path")
        if isinstance(p.type, click.types.IntParamType | click.types.FloatParamType):
            kinds.add("value")
        if p.name in CHECKPOINT_PARAMS:
            kinds.add("checkpoint")
        if p.name == "store":
            kinds.add("store")
        if p.name == "scheduler_address":
            kinds.add("scheduler")
    return kinds


TRAIN = ("--out", "{tmp}/skim.pt", "--init", "scratch", "--epochs", "1", "--hidden", "16", "--embed", "16")
CASES: dict[tuple[str, ...], list[Case]] = {
    ("synth",): [
        Case("path", ("synth", "{file}"), 2, "is a file"),
        Case("value", ("synth", "{tmp}/c", "--videos", "2", "--classes", "3"), 2, "videos=2 < classes=3"),
    ],
    ("prepare",): [
        Case("path", ("prepare", "folder", "{tmp}/nope", "--out", "{tmp}/m.csv"), 2, "is not a folder"),
        Case(
            "value",
            ("prepare", "ucf101", "{tmp}", "--out", "{tmp}/m.csv", "--split-id", "7"),
            2,
            "split_id=7",
        ),
    ],
    ("extract",): [
        Case(
            "path",
            ("extract", "{tmp}/nope.csv", "{tmp}/s", "--students", "random:0:tiny"),
            2,
            "no such manifest",
        ),
        Case(
            "data",
            ("extract", "{bad_manifest}", "{tmp}/s", "--students", "random:0:tiny"),
            2,
            "missing column",
        ),
        Case(
            "value",
            ("extract", "{manifest}", "{tmp}/s", "--students", "random:0:tiny", "--chunk-rows", "0"),
            2,
            "chunk_rows",
        ),
        Case(
            "checkpoint",
            ("extract", "{manifest}", "{tmp}/s", "--students", "{garbage}", "--workers", "0"),
            2,
            "{garbage}",
        ),
        Case(
            "store",
            ("extract", "{manifest}", "{not_a_store}", "--students", "random:0:tiny", "--workers", "0"),
            2,
            "{not_a_store}",
        ),
        Case(
            "scheduler",
            (
                "extract",
                "{manifest}",
                "{tmp}/s",
                "--students",
                "random:0:tiny",
                "--scheduler",
                UNREACHABLE,
                "--connect-timeout-s",
                "1",
            ),
            5,
            "cannot reach the Dask scheduler",
        ),
    ],
    ("store", "info"): [
        Case("path", ("store", "info", "{tmp}/nope"), 2, "does not exist"),
        Case("store", ("store", "info", "{not_a_store}"), 2, "not a feature store"),
    ],
    ("store", "ls"): [
        Case("path", ("store", "ls", "{tmp}/nope"), 2, "does not exist"),
        Case("store", ("store", "ls", "{not_a_store}"), 2, "not a feature store"),
    ],
    ("store", "check"): [
        Case("path", ("store", "check", "{tmp}/nope"), 2, "does not exist"),
        Case("store", ("store", "check", "{not_a_store}"), 2, "not a feature store"),
    ],
    ("store", "repair"): [
        Case("path", ("store", "repair", "{tmp}/nope"), 2, "does not exist"),
        Case("store", ("store", "repair", "{not_a_store}", "--workers", "0"), 2, "not a feature store"),
        Case("value", ("store", "repair", "{store}", "--workers", "-1"), 2, "--workers"),
        Case(
            "scheduler",
            ("store", "repair", "{store}", "--scheduler", UNREACHABLE, "--connect-timeout-s", "1"),
            5,
            "cannot reach the Dask scheduler",
        ),
    ],
    ("store", "export"): [
        Case("path", ("store", "export", "{tmp}/nope", "{tmp}/out", "--format", "zarr"), 2, "does not exist"),
        Case(
            "store",
            ("store", "export", "{not_a_store}", "{tmp}/out", "--format", "hdf5"),
            2,
            "not a feature store",
        ),
    ],
    ("distill",): [
        Case(
            "path",
            ("distill", "{tmp}/nope.csv", "--teacher-preset", "tiny", "--out", "{tmp}/d.pt"),
            2,
            "does not exist",
        ),
        Case(
            "data",
            ("distill", "{bad_manifest}", "--teacher-preset", "tiny", "--out", "{tmp}/d.pt"),
            2,
            "missing column",
        ),
        Case(
            "value",
            ("distill", "{manifest}", "--teacher-preset", "tiny", "--out", "{tmp}/d.pt", "--epochs", "0"),
            2,
            "epochs",
        ),
        Case(
            "checkpoint",
            (
                "distill",
                "{manifest}",
                "--teacher-weights",
                "{garbage}",
                "--out",
                "{tmp}/d.pt",
                "--epochs",
                "1",
            ),
            2,
            "{garbage}",
        ),
    ],
    ("finetune",): [
        Case(
            "path",
            ("finetune", "{manifest}", "--students", "{tmp}/nope.pt", "--out", "{tmp}/f.pt"),
            2,
            "does not exist",
        ),
        Case(
            "value",
            ("finetune", "{manifest}", "--students", "{garbage}", "--out", "{tmp}/f.pt", "--lr", "-1"),
            2,
            "lr",
        ),
        Case(
            "checkpoint",
            ("finetune", "{manifest}", "--students", "{garbage}", "--out", "{tmp}/f.pt"),
            2,
            "{garbage}",
        ),
    ],
    ("distill-report",): [
        Case("path", ("distill-report", "{tmp}/nope.csv", "--students", "{garbage}"), 2, "does not exist"),
        Case(
            "value",
            (
                "distill-report",
                "{manifest}",
                "--students",
                "{garbage}",
                "--teacher-preset",
                "tiny",
                "--threads",
                "-1",
            ),
            2,
            "--threads",
        ),
        Case(
            "checkpoint",
            ("distill-report", "{manifest}", "--students", "{garbage}", "--teacher-preset", "tiny"),
            2,
            "{garbage}",
        ),
    ],
    ("train",): [
        Case("path", ("train", "{tmp}/nope", *TRAIN), 2, "does not exist"),
        Case("store", ("train", "{not_a_store}", *TRAIN), 2, "not a feature store"),
        Case("data", ("train", "{store}", "--labels", "{bad_manifest}", *TRAIN), 2, "missing column"),
        Case(
            "value",
            ("train", "{store}", "--labels", "{labels}", *TRAIN, "--batch-size", "0"),
            2,
            "batch sizes must be >= 1",
        ),
        Case(
            "checkpoint",
            ("train", "{store}", "--labels", "{labels}", "--out", "{tmp}/skim.pt", "--students", "{garbage}"),
            2,
            "{garbage}",
        ),
    ],
    ("evaluate",): [
        Case("path", ("evaluate", "{store}", "--model", "{tmp}/nope.pt"), 2, "does not exist"),
        Case("store", ("evaluate", "{not_a_store}", "--model", "{model}"), 2, "not a feature store"),
        Case("checkpoint", ("evaluate", "{store}", "--model", "{garbage}"), 2, "{garbage}"),
        Case(
            "data",
            ("evaluate", "{store}", "--model", "{model}", "--moments", "{bad_moments}"),
            2,
            "needs 0 <= start_s",
        ),
        Case("value", ("evaluate", "{store}", "--model", "{model}", "--batch-size", "0"), 2, "batch_size"),
        Case(
            "path",
            ("evaluate", "{store}", "--model", "{model}", "--scratch-dir", "{tmp}/no-scratch"),
            2,
            "no-scratch",
        ),
    ],
    ("query",): [
        Case("path", ("query", "{store}", "--all", "--model", "{tmp}/nope.pt"), 2, "does not exist"),
        Case("store", ("query", "{not_a_store}", "--all", "--model", "{model}"), 2, "not a feature store"),
        Case("checkpoint", ("query", "{store}", "--all", "--model", "{garbage}"), 2, "{garbage}"),
        Case("data", ("query", "{store}", "nope", "--model", "{model}"), 2, "nope"),
        Case("value", ("query", "{store}", "--all", "--model", "{model}", "--top-k", "0"), 2, "top_k=0"),
    ],
    ("show",): [
        Case(
            "path",
            ("show", "{store}", "vid00000", "--model", "{model}", "--out", "{tmp}/no/dir/x.png"),
            2,
            "does not exist",
        ),
        Case(
            "store",
            ("show", "{not_a_store}", "vid00000", "--model", "{model}", "--out", "{tmp}/x.png"),
            2,
            "not a feature store",
        ),
        Case(
            "checkpoint",
            ("show", "{store}", "vid00000", "--model", "{garbage}", "--out", "{tmp}/x.png"),
            2,
            "{garbage}",
        ),
        Case(
            "data",
            (
                "show",
                "{store}",
                "vid00000",
                "--model",
                "{model}",
                "--out",
                "{tmp}/x.png",
                "--moments",
                "{bad_moments}",
            ),
            2,
            "needs 0 <= start_s",
        ),
        Case(
            "value",
            (
                "show",
                "{store}",
                "vid00000",
                "--model",
                "{model}",
                "--out",
                "{tmp}/x.png",
                "--max-frames",
                "0",
            ),
            2,
            "max_frames=0",
        ),
    ],
    ("demo",): [
        Case("path", ("demo", "{file}"), 2, "is a file"),
        Case("value", ("demo", "{tmp}/demo", "--classes", "1"), 2, "classes=1"),
    ],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_video, one_torch_thread) -> dict[str, str]:
    """Real inputs (a store, a trained model, a one-video corpus) and bad ones of each kind."""
    root = tmp_path_factory.mktemp("cli-errors")
    spec = PlantedSpec(videos=12, classes=3, dim=16, min_steps=12, max_steps=20, chunk_rows=64)
    planted = write_planted_store(root / "store", spec)
    make_video(root / "v.mp4", 2.0, fps=10)
    (root / "manifest.csv").write_text("video_id,path,label,split\nv,v.mp4,a,train\n")
    (root / "bad.csv").write_text("video_id,file\nv,v.mp4\n")
    (root / "bad_moments.json").write_text(
        json.dumps({"vid00000": {"label": "x", "segments": [[-1.0, 2.0]]}})
    )
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint\n")
    (root / "not_a_store").mkdir()
    (root / "not_a_store" / "notes.txt").write_text("hello\n")
    (root / "a_file").write_text("")
    model = root / "skim.pt"
    result = CliRunner().invoke(
        main,
        ["train", str(planted["store"]), "--labels", str(planted["labels"]), "--out", str(model),
         "--init", "scratch", "--epochs", "1", "--hidden", "16", "--embed", "16", "--batch-size", "4",
         "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return {
        "store": str(planted["store"]),
        "labels": str(planted["labels"]),
        "model": str(model),
        "manifest": str(root / "manifest.csv"),
        "bad_manifest": str(root / "bad.csv"),
        "bad_moments": str(root / "bad_moments.json"),
        "garbage": str(root / "garbage.pt"),
        "not_a_store": str(root / "not_a_store"),
        "file": str(root / "a_file"),
    }


def test_every_command_has_a_case_of_each_kind_it_takes():
    commands = _commands()
    assert set(CASES) == set(commands), "add cases for new commands (or drop removed ones)"
    for name, command in commands.items():
        missing = _kinds(command) - {case.kind for case in CASES[name]}
        assert not missing, f"l2l {' '.join(name)}: no bad-value case of kind(s) {sorted(missing)}"


@pytest.mark.parametrize(
    "case", [c for cases in CASES.values() for c in cases], ids=lambda c: f"{'-'.join(c.args[:2])}-{c.kind}"
)
def test_bad_value_is_one_error_line_and_its_exit_code(case, files, tmp_path):
    fill = {**files, "tmp": str(tmp_path)}
    args = [a.format(**fill) for a in case.args]
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(main, args)
    finally:
        torch.set_num_threads(threads)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"l2l {' '.join(args)} raised {result.exception!r} (a traceback for the user)"
    )
    assert "Traceback" not in result.output
    assert result.exit_code == case.code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:") or "Error:" in line]
    assert len(errors) == case.error_line, result.stderr
    assert case.says.format(**fill) in result.output, result.output


def test_the_installed_entry_point_maps_errors_to_exit_codes(files, tmp_path):
    """The real process (``python -m cli`` runs ``main()``), not only click's test runner."""
    cmd = [sys.executable, "-m", "cli", "query", files["store"], "--all", "--model", files["garbage"]]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and files["garbage"] in done.stderr


def test_outputs_need_an_existing_folder(tmp_path):
    """No command creates missing folders behind a typo: every output path is an OutputPath, which refuses."""
    from indexing.options import OutputPath

    outputs = {
        (name, p.name): p
        for name, command in _commands().items()
        for p in command.params
        if p.name in {"out", "plot"}
    }
    outputs[("extract",), "store"] = next(p for p in main.commands["extract"].params if p.name == "store")
    assert len(outputs) >= 10
    for (name, param), p in outputs.items():
        assert isinstance(p.type, OutputPath), f"l2l {' '.join(name)} {param}"
    with pytest.raises(click.BadParameter, match="does not exist; create it first"):
        OutputPath().convert(str(tmp_path / "typo" / "out.csv"), None, None)
    assert OutputPath().convert(str(tmp_path / "out.csv"), None, None) == str(tmp_path / "out.csv")


def test_a_locked_store_is_refused_before_any_cluster_starts(files):
    """Another live writer holds the store: extract and repair say so at once, with no cluster started."""
    from indexing.stores import open_store

    with open_store(files["store"]) as store, store.lock():  # this process is the live writer
        for args in (
            ["extract", files["manifest"], files["store"], "--students", "random:0:tiny", "--workers", "2"],
            ["store", "repair", files["store"], "--workers", "2"],
        ):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 4, result.output
            assert "lock" in result.stderr and "dask" not in result.stderr  # no cluster was announced

"""The demo's summary shows the fine-tuned students' validation accuracy beside the evaluation table."""

from __future__ import annotations

import cli
from indexing import checkpoint as ckpt_io
from indexing.models import build_students


def _students_checkpoint(path, *, epoch: int, history: list[dict], outcome: dict | None = None):
    students = build_students("tiny", seed=0)
    students.attach_classifier(3, seed=0)
    training = {"history": history, **({"outcome": outcome} if outcome else {})}
    ckpt_io.save_checkpoint(
        path,
        kind="students",
        models=students.specs(),
        state_dict=students.state_dict(),
        epoch=epoch,
        training=training,
        extra={"stage": "finetune", "data": {"val_split": "test"}, "classes": ["a", "b", "c"]},
    )
    return path


def test_students_validation_is_the_kept_epochs(tmp_path):
    """The accuracy shown is that of the epoch whose weights the checkpoint holds, not the last epoch's."""
    history = [{"epoch": e, "val_accuracy": a} for e, a in ((1, 0.4), (2, 0.9), (3, 0.7), (4, 0.6))]
    path = _students_checkpoint(
        tmp_path / "ft.pt",
        epoch=2,
        history=history,
        outcome={"stopped": "patience", "still_improving": False},
    )
    got = cli.students_validation(path)
    assert got == {
        "val_accuracy": 0.9,
        "val_split": "test",
        "epoch": 2,
        "epochs": 4,
        "stopped": "patience",
        "still_improving": False,
    }
    line = cli._students_line(got)
    assert "0.900" in line and "'test'" in line and "epoch 2 of 4" in line and "still" not in line


def test_students_validation_without_a_record_of_the_held_epoch_shows_none(tmp_path):
    history = [{"epoch": 1, "val_accuracy": 0.3}, {"epoch": 2, "val_accuracy": 0.5}]
    path = _students_checkpoint(tmp_path / "ft.pt", epoch=3, history=history, outcome={})
    got = cli.students_validation(path)
    assert got["val_accuracy"] is None and "accuracy - on" in cli._students_line(got)


def test_students_line_says_still_improving(tmp_path):
    history = [{"epoch": 1, "val_accuracy": 0.3}, {"epoch": 2, "val_accuracy": 0.5}]
    path = _students_checkpoint(
        tmp_path / "ft.pt",
        epoch=2,
        history=history,
        outcome={"stopped": "max_epochs", "still_improving": True},
    )
    line = cli._students_line(cli.students_validation(path))
    assert "0.500" in line and "still improving" in line


def test_demo_summary_has_students():
    """The summary (and so ``--json``) carries the students' validation next to the evaluation."""
    import inspect

    source = inspect.getsource(cli._demo)
    assert '"students": students_validation(' in source
    assert "_students_line(" in inspect.getsource(cli.demo.callback)


def test_finetune_from_scratch_random_students(tmp_path):
    """The demo's recipe fine-tunes from ``random:SEED:PRESET`` (no distillation); a folder is refused."""
    import json

    from click.testing import CliRunner
    from test_distill import _write_corpus

    from indexing.models import load_students

    manifest = _write_corpus(tmp_path)
    common = ["--epochs", "1", "--batch-size", "2", "--workers", "0", "--clips-per-video", "2", "--json"]
    ft = tmp_path / "ft.pt"
    result = CliRunner().invoke(
        cli.main, ["finetune", str(manifest), "--students", "random:3:tiny", "--out", str(ft), *common]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["history"][-1]["epoch"] == 1
    students, meta = load_students(ft)
    assert students.classifier.num_classes == 2 and meta["models"]["image"]["name"] == "image_resnet18_tiny"
    result = CliRunner().invoke(
        cli.main, ["finetune", str(manifest), "--students", str(tmp_path), "--out", str(ft), *common]
    )
    assert result.exit_code == 2 and "is a directory" in result.output

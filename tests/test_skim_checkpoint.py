"""Skim checkpoints: a compact final model for queries, the optimiser state only in the resumable file.

Real `l2l train` / `evaluate` / `query` runs on a small planted store (skim.synthetic), in process.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli import main
from skim.checkpoint import load_checkpoint, read_checkpoint, resume_path
from skim.synthetic import PlantedSpec, write_planted_store

SPEC = PlantedSpec(videos=40, classes=4, dim=32, min_steps=30, max_steps=60, strength=8.0, chunk_rows=256)
TRAIN = ["--hidden", "64", "--embed", "32", "--lr", "0.1", "--batch-size", "8", "--milestones", ""]
TRAIN += ["--seed", "0", "--init", "scratch", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(*args: str) -> dict:
    result = CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_train_writes_a_compact_model_and_a_resumable_state_beside_it(tmp_path):
    paths = write_planted_store(tmp_path / "store", SPEC)
    store, labels = str(paths["store"]), str(paths["labels"])
    args = ["train", store, "--labels", labels, *TRAIN]
    out = tmp_path / "skim.pt"
    _run(*args, "--out", str(out), "--epochs", "1")
    full = resume_path(out)
    assert full == tmp_path / "skim.pt.resume" and full.exists()
    compact, resumable = read_checkpoint(out), read_checkpoint(full)  # both sha256-verified envelopes
    assert "optimizer" not in compact["training"] and "rng" not in compact["training"]
    assert {"optimizer", "rng"} <= set(resumable["training"])
    assert compact["training"]["history"] == resumable["training"]["history"]
    assert compact["extra"]["store"] == resumable["extra"]["store"]  # provenance kept in the compact file
    assert compact["config"] == resumable["config"] and compact["models"] == resumable["models"]
    assert out.stat().st_size < 0.75 * full.stat().st_size  # SGD momentum is as large as the weights
    a, b = load_checkpoint(out), load_checkpoint(full)
    for name, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[name])

    # --resume continues from OUT.resume and gives the weights of one uninterrupted run.
    _run(*args, "--out", str(out), "--epochs", "2", "--resume")
    straight = tmp_path / "straight.pt"
    _run(*args, "--out", str(straight), "--epochs", "2")
    x, y = read_checkpoint(straight)["state_dict"], read_checkpoint(out)["state_dict"]
    for name in x:
        torch.testing.assert_close(x[name], y[name])
    assert read_checkpoint(out)["epoch"] == 2

    # Queries and evaluation need only the compact file.
    full.unlink()
    ev = _run("evaluate", store, "--model", str(out), "--labels", labels, "--no-progress")
    assert "accuracy" in json.dumps(ev)
    answers = _run("query", store, "--model", str(out), "--all", "--no-progress")
    assert len(answers) == 40
    # Without the resumable state, --resume says what is missing instead of restarting silently.
    refused = CliRunner().invoke(main, [*args, "--out", str(out), "--epochs", "3", "--resume"])
    assert refused.exit_code != 0 and "skim.pt.resume is missing" in refused.output

"""The command line speaks one language: defaults shown one way in every help text, and every long command
has --no-progress (and honours a non-terminal stderr)."""

from __future__ import annotations

import re

import click

from cli import main

LONG_COMMANDS = {
    "l2l synth",
    "l2l extract",
    "l2l distill",
    "l2l finetune",
    "l2l train",
    "l2l evaluate",
    "l2l query",
    "l2l store check",
    "l2l store repair",
}


def _commands():
    def walk(group: click.Group, prefix: tuple[str, ...]):
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            if isinstance(command, click.Group):
                yield from walk(command, (*prefix, name))
            else:
                yield " ".join(("l2l", *prefix, name)), command

    return list(walk(main, ()))


def test_every_long_command_has_no_progress():
    names = {name: command for name, command in _commands()}
    assert LONG_COMMANDS <= set(names)
    missing = [
        n
        for n in sorted(LONG_COMMANDS)
        if "--no-progress" not in {o for p in names[n].params for o in p.opts}
    ]
    assert not missing, missing


def test_help_gives_defaults_one_way():
    """Click's ``[default: X]`` everywhere: shown by click where the option has the default, written the
    same way where the library decides it (None here); never ``(default X)`` or ``default: X`` in prose."""
    bad = []
    for name, command in _commands():
        ctx = click.Context(command, info_name=name)
        for p in command.params:
            if not isinstance(p, click.Option) or p.hidden:
                continue
            record = p.get_help_record(ctx)
            text = " ".join(record[1].split()) if record else ""
            prose = re.sub(r"\[default: [^\]]*\]", "", text)
            if re.search(r"\(default\b|\bdefault:", prose):
                bad.append(f"{name} {p.opts[0]}: {text}")
            default = p.get_default(ctx, call=False)
            unset = default is None or default is getattr(click.core, "UNSET", None) or default == ""
            has_value = not unset and not p.is_flag and not p.multiple
            if has_value and not p.show_default and "[default: " not in text:
                bad.append(f"{name} {p.opts[0]}: default {default!r} not shown")
    assert not bad, "\n".join(bad)


def _corpus(root):
    import numpy as np

    from pipeline.encode import write_video

    rows = ["video_id,path,label,split"]
    for i in range(4):
        rng = np.random.default_rng(i)
        frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(30)]
        audio = (0.2 * rng.standard_normal((1, 16000))).astype(np.float32)
        write_video(root / f"v{i}.mp4", frames, fps=30, audio=audio)
        rows.append(f"v{i},v{i}.mp4,{'ab'[i % 2]},{'train' if i < 2 else 'test'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def test_distill_and_finetune_draw_no_bars_without_a_terminal(tmp_path):
    """Without --json and without --no-progress: CliRunner's stderr is no terminal, so no tqdm bar."""
    from click.testing import CliRunner

    manifest = _corpus(tmp_path)
    common = ["--epochs", "1", "--batch-size", "2", "--workers", "0", "--clips-per-video", "1"]
    students = tmp_path / "s.pt"
    runs = [
        ["distill", str(manifest), "--teacher-preset", "tiny", "--preset", "tiny", "--out", str(students)],
        ["finetune", str(manifest), "--students", str(students), "--out", str(tmp_path / "f.pt")],
    ]
    for args in runs:
        result = CliRunner().invoke(main, [*args, *common])
        assert result.exit_code == 0, result.output
        assert "batch/s" not in result.stderr and "s/batch" not in result.stderr and "%|" not in result.stderr
        assert "epoch 1" in result.stderr  # the per-epoch lines still come

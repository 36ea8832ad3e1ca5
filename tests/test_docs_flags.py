"""Every ``l2l COMMAND ... --flag`` written in the README, in ``cluster/`` and in the code's docstrings names
a command and options the real CLI has: documentation cannot promise a flag that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from cli import main

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("pipeline", "indexing", "skim", "bench")
FENCE = re.compile(r"^\s*```")
INLINE = re.compile(r"``(.+?)``|`([^`]+)`")
CALL = re.compile(r"(?<![\w./-])l2l\s+([a-z][a-z0-9-]*)((?:\s+[^\s|;&#]+)*)")
FLAG = re.compile(r"(?<![\w-])(--[a-zA-Z0-9][a-zA-Z0-9-]*)")


def _joined(lines: list[str]) -> list[str]:
    """Lines with shell continuations (a trailing backslash) joined."""
    out: list[str] = []
    for line in lines:
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1] + " " + line.strip()
        else:
            out.append(line.rstrip())
    return out


def _snippets(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` pieces where a command may be written: code blocks, inline code, script lines."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if path.suffix in (".md", ".py"):
        found, block, start = [], None, 0
        for no, line in enumerate(lines, 1):
            if FENCE.match(line):
                if block is None:
                    block, start = [], no + 1
                else:
                    found += [(start, s) for s in _joined(block)]
                    block = None
                continue
            if block is not None:
                block.append(line)
                continue
            found += [(no, a or b) for a, b in INLINE.findall(line)]
        return found
    return list(enumerate(_joined(lines), 1))  # scripts and configs: every line is code


def _documents() -> list[Path]:
    docs = [ROOT / "README.md", *sorted(p for p in (ROOT / "cluster").rglob("*") if p.is_file())]
    docs += [p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))] + [ROOT / "cli.py"]
    return docs


def _calls() -> list[tuple[str, list[str], list[str]]]:
    """``(where, command words, flags)`` of every ``l2l`` invocation in the documents."""
    calls = []
    for path in _documents():
        for no, snippet in _snippets(path):
            for match in CALL.finditer(snippet):
                words = [match.group(1), *match.group(2).split()]
                flags = FLAG.findall(" ".join(words))
                calls.append((f"{path.relative_to(ROOT)}:{no}", words, flags))
    return calls


def _resolve(words: list[str]) -> tuple[click.Command | None, str]:
    command: click.Command = main
    path = ["l2l"]
    for word in words:
        if not isinstance(command, click.Group) or word.startswith("-"):
            break
        sub = command.commands.get(word)
        if sub is None:
            if word in command.commands or command is not main:
                return None, " ".join([*path, word])
            break  # `l2l` followed by prose, not a command
        command, path = sub, [*path, word]
    return command, " ".join(path)


CALLS = _calls()


def _unknown(words: list[str], flags: list[str]) -> list[str]:
    command, _ = _resolve(words)
    known = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    return [f for f in flags if f not in known and not (command is main and f == "--version")]


def test_the_scan_finds_commands_and_flags():
    """A broken scan would pass everything below: it must see what the documents are known to show."""
    seen = {_resolve(words)[1] for _, words, _ in CALLS}
    assert {"l2l extract", "l2l train", "l2l store check", "l2l synth"} <= seen, seen
    flags = {f for _, _, fs in CALLS for f in fs}
    assert {"--tls-ca-file", "--worker-lifetime", "--scheduler-file", "--moments"} <= flags, flags
    (match,) = CALL.finditer("run `l2l store check s.zarr --quick --nope | tee log`"[5:-1])
    words = [match.group(1), *match.group(2).split()]
    assert _resolve(words)[1] == "l2l store check"
    assert _unknown(words, FLAG.findall(" ".join(words))) == ["--nope"]


@pytest.mark.parametrize("where, words, flags", CALLS, ids=[c[0] for c in CALLS])
def test_documented_flag_exists(where, words, flags):
    command, name = _resolve(words)
    assert command is not None, f"{where}: `{name}` is not an l2l command"
    missing = _unknown(words, flags)
    assert not missing, f"{where}: `{name}` has no option {', '.join(missing)}"


def _options():
    def walk(group, prefix=()):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from walk(command, (*prefix, name))
            else:
                yield " ".join(("l2l", *prefix, name)), command

    return [(name, p) for name, command in walk(main) for p in command.params if isinstance(p, click.Option)]


def test_every_option_says_what_it_does():
    missing = [f"{name} {p.opts[0]}" for name, p in _options() if not p.help]
    assert not missing, missing

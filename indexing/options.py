"""Click option groups shared by the command modules of ``pipeline/``, ``indexing/`` and ``skim/``.

Declared once here so the same option has the same name, type and help in every command. Only click and
the standard library are imported at module level: ``l2l --help`` stays instant.

Config-driven groups are generated from a frozen dataclass's fields: a field takes part when its
``metadata`` has a ``"flag"`` (and ``"help"``); the command receives one value built from those options
(the dataclass itself, or a dict of the options given, see :func:`config_options`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import click

from indexing.errors import ConfigError


class RegistryChoice(click.Choice):
    """A Choice whose names come from a registry imported on first use (keeps ``l2l --help`` instant)."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._load())


class OutputPath(click.Path):
    """A path a command writes: its folder must exist (``l2l`` creates no missing folders behind a typo)."""

    def convert(self, value, param, ctx):
        from pathlib import Path

        value = super().convert(value, param, ctx)
        parent = Path(value).expanduser().absolute().parent
        if parent.exists() and not parent.is_dir():
            self.fail(f"{str(parent)!r} is a file, not a folder; fix the path", param, ctx)
        if not parent.is_dir():
            self.fail(f"folder {str(parent)!r} does not exist; create it first or fix the path", param, ctx)
        return value


def echo_json(obj: object) -> None:
    """Print ``obj`` as indented JSON on stdout (paths and other objects as strings)."""
    click.echo(json.dumps(obj, indent=2, default=str))


def warn(message: str) -> None:
    """One warning line on stderr."""
    click.secho(message if message.startswith("warning") else f"warning: {message}", fg="yellow", err=True)


def note(message: str) -> None:
    """A progress note on stderr (stdout stays for results)."""
    click.echo(message, err=True)


def warnings_only(message: str) -> None:
    """A ``log`` for ``--json`` runs: progress notes are dropped, warnings still reach stderr."""
    if message.startswith("warning"):
        warn(message)


def json_option(what: str = "the result") -> Callable:
    """``--json``: print ``what`` as JSON on stdout (bound to the ``as_json`` parameter)."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON.")


def no_progress_option(fn: Callable) -> Callable:
    """``--no-progress``: no progress bars (they go to stderr; none either when stderr is no terminal)."""
    return click.option(
        "--no-progress", is_flag=True, help="No progress bars (none either when stderr is not a terminal)."
    )(fn)


def show_progress(no_progress: bool, as_json: bool = False) -> bool:
    """Progress bars are for a person at a terminal: not with ``--no-progress`` or ``--json``, and not when
    stderr is a file or a pipe (a batch job's log)."""
    import sys

    return not no_progress and not as_json and sys.stderr.isatty()


def threads_option(fn: Callable) -> Callable:
    """``--threads``: torch CPU threads of this process."""
    return click.option(
        "--threads", type=int, default=0, show_default=True, help="torch CPU threads (0: torch's default)."
    )(fn)


def device_option(default: str | None = "cpu") -> Callable:
    """``--device``: where the model runs."""
    if default is None:
        return click.option("--device", help="cpu, cuda[:N] or auto.  [default: cpu]")
    return click.option("--device", default=default, show_default=True, help="cpu, cuda[:N] or auto.")


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (0 or None: torch's default).

    Raises:
        ConfigError: A negative count.
    """
    if threads is None or threads == 0:
        return
    if threads < 0:
        raise ConfigError(f"--threads {threads} must be >= 0 (0: torch's default)")
    import torch

    torch.set_num_threads(threads)


def given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that were given (not None)."""
    return {k: v for k, v in values.items() if v is not None}


def csv_ints(value: str | None) -> tuple[int, ...] | None:
    """``"15,20"`` -> ``(15, 20)``; ``""`` -> ``()``; None stays None."""
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 15,20") from None


def csv_names(value: str | None) -> tuple[str, ...] | None:
    """``"image, audio"`` -> ``("image", "audio")``; None stays None."""
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def cli_field(default: Any = None, *, flag: str, help: str, **click_kwargs: Any) -> Any:
    """A dataclass field that :func:`config_options` turns into the option ``flag``.

    ``click_kwargs`` go to ``click.option`` (``type``, ``is_flag``, ...); ``choices`` may be a callable
    returning the registered names (resolved on first use).
    """
    return field(default=default, metadata={"flag": flag, "help": help, **click_kwargs})


def config_options(
    cls: type,
    *,
    param: str,
    build: Callable[[dict[str, Any]], Any] | None = None,
    choices: dict[str, Callable[[], Iterable[str]]] | None = None,
) -> Callable:
    """Decorator: one click option per ``cli_field`` of dataclass ``cls``, delivered as ONE parameter.

    Args:
        cls: A dataclass whose fields carry ``flag``/``help`` metadata (see :func:`cli_field`).
        param: Name of the command parameter that receives the built value.
        build: Turns the dict of options the user changed (None and default values dropped) into that
            value; default ``cls(**d)``.
            Errors a config raises for a bad value reach the user as :class:`ConfigError`.
        choices: Per field name, a loader of the allowed names (overrides the metadata's ``choices``).

    Returns:
        A decorator for a click command callback.
    """
    specs = [f for f in dataclasses.fields(cls) if "flag" in f.metadata]
    defaults = {f.name: None if f.default is dataclasses.MISSING else f.default for f in specs}
    choices = dict(choices or {})

    def make_option(f: dataclasses.Field) -> Callable:
        kwargs = {k: v for k, v in f.metadata.items() if k not in ("flag", "choices")}
        load = choices.get(f.name, f.metadata.get("choices"))
        if load is not None:
            kwargs["type"] = RegistryChoice(load)
        default = None if f.default is dataclasses.MISSING else f.default
        kwargs["default"] = default
        kwargs.setdefault("show_default", default is not None)
        return click.option(f.metadata["flag"], f.name, **kwargs)

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # The options the user changed: a value equal to the field's default is the default.
            values = {f.name: kwargs.pop(f.name, None) for f in specs}
            values = {k: v for k, v in given(**values).items() if v != defaults[k]}
            if build is not None:
                kwargs[param] = build(values)
            else:
                try:
                    kwargs[param] = cls(**values)
                except ConfigError:
                    raise
                except ValueError as err:
                    raise ConfigError(str(err)) from err
            return fn(*args, **kwargs)

        for f in reversed(specs):
            wrapper = make_option(f)(wrapper)
        return wrapper

    return decorate


# ---- inference options (skim: train, evaluate, query, show) ------------------------------------------------


@dataclass(frozen=True)
class InferenceConfig:
    """How a trained skimming model runs, never its weights (None keeps the checkpoint's setting).

    Attributes:
        next_input: Next LSTM input at inference: ``soft`` mixture or ``hard`` argmax steps.
        stop_after: Stop after this many recurrent steps (``<= --steps``).
        exit_threshold: Early exit once the max class probability reaches this value.
        exit_on: Which probability the early exit thresholds: ``running`` classifier or ``step_head``.
        subsample: Indexing features every k steps, linearly interpolated back.
        recognition_store: A second store holding the recognition features.
    """

    next_input: str | None = cli_field(
        flag="--next-input",
        help="Next LSTM input at inference: soft mixture or the argmax steps.  [default: soft]",
    )
    stop_after: int | None = cli_field(
        flag="--stop-after", type=int, help="Stop after this many steps (<= --steps)."
    )
    exit_threshold: float | None = cli_field(
        flag="--exit-threshold",
        type=float,
        help="Early exit once the max class probability reaches this value.",
    )
    exit_on: str | None = cli_field(
        flag="--exit-on", help="Probability the early exit thresholds: running classifier or per-step head."
    )
    subsample: int | None = cli_field(
        flag="--subsample", type=int, help="Indexing features every k steps, interpolated back."
    )
    recognition_store: str | None = cli_field(
        flag="--recognition-store",
        type=click.Path(exists=True),
        help="Second store holding the recognition features.  [default: the checkpoint's]",
    )

    def overrides(self) -> dict[str, Any]:
        """The model-config overrides given (``next_input``, ``stop_after``, ...; not the store)."""
        values = dataclasses.asdict(self)
        values.pop("recognition_store")
        return given(**values)


def inference_options(
    *, next_inputs: Callable[[], Iterable[str]], exit_on: Callable[[], Iterable[str]]
) -> Callable:
    """The inference option group, delivered as ``inference: InferenceConfig``.

    Args:
        next_inputs: Loader of the allowed ``--next-input`` names.
        exit_on: Loader of the allowed ``--exit-on`` names.
    """
    return config_options(
        InferenceConfig, param="inference", choices={"next_input": next_inputs, "exit_on": exit_on}
    )


# ---- adaptive training (distill, finetune, train) ----------------------------------------------------------


STOPPING_PARAMS = ("epochs", "patience", "lr_patience", "milestones", "min_delta", "max_updates")


def stopping_options(*, epochs: int, patience: int, lr_patience: int, paper: str) -> Callable:
    """``--epochs`` (a maximum), ``--patience``, ``--lr-patience``, ``--milestones``, ``--min-delta`` and
    ``--max-updates``, delivered as ONE parameter ``stopping``: the config fields that were given
    (:func:`stopping_values`; the config decides the rest, and the defaults written in the help are the
    command's config's).

    Args:
        epochs: The command's default maximum epochs.
        patience: Its default patience.
        lr_patience: Its default plateau length before a learning-rate drop.
        paper: The paper's milestones for this stage (``30,50``), named in the help.
    """
    options = [
        click.option(
            "--epochs",
            type=int,
            help="Maximum epochs: training stops sooner on --patience or --max-updates.  "
            f"[default: {epochs}]",
        ),
        click.option(
            "--patience",
            type=int,
            help="Stop after this many epochs without validation improvement (0: never stop early).  "
            f"[default: {patience}]",
        ),
        click.option(
            "--lr-patience",
            type=int,
            help="Drop the lr 10x after this many epochs without improvement (0: never; 0 too when only "
            f"--milestones is given).  [default: {lr_patience}]",
        ),
        click.option(
            "--milestones",
            help=f"Epochs where the lr drops 10x, comma-separated (the paper's fixed schedule: {paper}, with "
            "--patience 0).  [default: none]",
        ),
        click.option(
            "--min-delta",
            type=float,
            help="Smallest improvement that counts: accuracy gain, validation-loss decrease, or relative "
            "decrease of the distillation L1.  [default: 0.001]",
        ),
        click.option(
            "--max-updates",
            type=int,
            help="Budget of optimiser updates: training stops when it is reached.  [default: none]",
        ),
    ]

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs["stopping"] = stopping_values(**{k: kwargs.pop(k) for k in STOPPING_PARAMS})
            return fn(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def stopping_values(
    *,
    epochs: int | None,
    patience: int | None,
    lr_patience: int | None,
    milestones: str | None,
    min_delta: float | None,
    max_updates: int | None,
) -> dict[str, Any]:
    """The config fields of :func:`stopping_options` that were given. ``--milestones`` without
    ``--lr-patience`` means the fixed step schedule alone (no drops on plateaus).

    Raises:
        click.BadParameter: ``--milestones`` is not a list of integers.
    """
    steps = csv_ints(milestones)
    if steps is not None and lr_patience is None:
        lr_patience = 0
    return given(
        epochs=epochs,
        patience=patience,
        lr_patience=lr_patience,
        milestones=steps,
        min_delta=min_delta,
        max_updates=max_updates,
    )

"""``l2l``: the listen-to-look command line.

Commands are thin: options -> config -> one library call. Heavy imports (torch, decord, zarr, dask)
happen inside commands so ``l2l --help`` is instant.
"""

from __future__ import annotations

import json
import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="listen-to-look")
def main() -> None:
    """Listen to Look: efficient action recognition in long video by previewing audio."""


def _fail(message: str, code: int = 2) -> None:
    """Print a user error without a traceback and exit non-zero."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def _echo_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


# ==== corpus: synth, prepare (pipeline) =============================================================


# ==== ImgAud2Vid: distill, finetune, distill-report (indexing) =====================================


# ==== extraction and stores: extract, store info/check/ls/export (pipeline, indexing.stores) =======


# ==== skimming: train, evaluate, query, show (skim) ================================================


# ==== demo ==========================================================================================


if __name__ == "__main__":
    main()

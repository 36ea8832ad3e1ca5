"""The import direction the project promises: pipeline -> indexing, skim -> indexing, cli -> all; skim never
pulls in decord or pipeline, and ``l2l --help`` imports no heavy library."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> list[str]:
    return [f"{package}.{m.name}" for m in pkgutil.walk_packages([str(ROOT / package)]) if not m.ispkg]


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in out.stdout.split()}


def test_skim_never_imports_decord_or_pipeline():
    loaded = _loaded_after_import(_modules("skim"))
    assert "skim" in loaded and not loaded & {"decord", "pipeline", "av"}


def test_indexing_never_imports_pipeline_or_skim():
    loaded = _loaded_after_import(_modules("indexing") + ["indexing.stores.zarr_store"])
    assert "indexing" in loaded and not loaded & {"pipeline", "skim", "decord"}


def test_cli_help_imports_no_heavy_library():
    loaded = _loaded_after_import(["cli"])
    assert not loaded & {"torch", "decord", "zarr", "h5py", "distributed", "av"}

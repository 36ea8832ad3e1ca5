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


def _imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of ``package`` imports anywhere in its source, lazy imports included."""
    import ast

    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_imports_point_one_way_even_inside_functions():
    forbidden = {
        "indexing": {"pipeline", "skim", "cli", "decord"},
        "skim": {"pipeline", "cli", "decord", "av"},
    }
    wrong = {
        module: sorted(names & forbidden[package])
        for package in forbidden
        for module, names in _imported_packages(package).items()
        if names & forbidden[package]
    }
    assert _imported_packages("indexing") and not wrong, f"imports against the one-way direction: {wrong}"

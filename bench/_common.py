"""Shared helpers of the benchmarks: arguments, timing, machine description, cached corpora, output.

Every benchmark measures its baseline in the same run, prints a table, and writes
``bench/results/<name>.json`` (numbers, configuration, machine) and ``bench/results/<name>.md`` (a
Markdown snippet for the README). Generated media and stores live in a work folder (``--work``, default
``bench/.work``) and are reused across runs when their configuration is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = BENCH_DIR / ".work"


# ---- arguments ---------------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has (``--quick``, ``--work``, ``--out``)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run on tiny sizes (< 1 min); numbers are noisy"
    )
    p.add_argument(
        "--work", type=Path, default=WORK_DIR, help="folder for generated media and stores (cached)"
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="where <name>.json and <name>.md are written"
    )
    return p


# ---- timing ------------------------------------------------------------------------------------------


class Clock:
    """Accumulated wall time per named piece (``with clock("decode"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed under ``name`` on every call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(name):
                return fn(*args, **kwargs)

        return timed


def best_of(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> float:
    """Fastest wall time in seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def median_of(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def combined_rate(*rates: float) -> float:
    """Rate of stages run one after the other by one worker: ``1 / sum(1 / rate)``."""
    if any(r <= 0 for r in rates):
        return 0.0
    return 1.0 / sum(1.0 / r for r in rates)


# ---- machine -----------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (module, {"decord": "decord2", "av": "av"}.get(module, module)):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, memory, torch threads, package versions."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        mem_gib = None
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            m: _version(m) for m in ("torch", "torchaudio", "numpy", "decord", "av", "zarr", "h5py", "dask")
        },
        "commit": _git_commit(),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line describing the machine, for tables and the Markdown snippet."""
    return (
        f"{info['cpu']}, {info['usable_cores']} cores (load {info['load_avg_1m']} at start), "
        f"torch {info['versions']['torch']}, commit {info['commit']}"
    )


# ---- cached inputs -----------------------------------------------------------------------------------


def synth_corpus(folder: Path, config: Any, *, jobs: int = 2) -> Path:
    """A synthetic corpus in ``folder`` made by :func:`pipeline.synth.synthesize`; reused when its
    ``synth.json`` records the same config. Returns the manifest path."""
    from pipeline.synth import synthesize

    manifest = folder / "manifest.csv"
    summary = folder / "synth.json"
    if manifest.is_file() and summary.is_file():
        try:
            if json.loads(summary.read_text()).get("config") == json.loads(json.dumps(asdict(config))):
                return manifest
        except ValueError:
            pass
    log(f"generating {config.videos} synthetic videos ({config.width}x{config.height}) in {folder} ...")
    t0 = time.perf_counter()
    synthesize(folder, config, jobs=jobs, overwrite=True)
    log(f"  generated in {time.perf_counter() - t0:.1f} s")
    return manifest


def warm_manifest(manifest: Path, out: Path) -> Path:
    """A manifest holding only the shortest video of ``manifest``: a warm-up run over it loads the models,
    imports the decoders and starts the probe helper, so the timed run measures throughput alone."""
    from pipeline.corpus import read_corpus, write_manifest

    entries = read_corpus(manifest)
    shortest = min(entries, key=lambda e: float(e.extra.get("duration_s", 0) or 0) or e.path.stat().st_size)
    return write_manifest(out, [shortest])


def warm_worker(path: str, students: str) -> int:
    """Run one batch of ``path`` through the extraction's pieces in this process (a Dask worker, via
    ``client.run``): model load, decoder imports, the probe helper, mel and resampler kernels, the store
    backend import. Returns the process id."""
    import indexing.stores.zarr_store  # noqa: F401 - the import a first task would pay
    from pipeline.extract import cached_students
    from pipeline.media import iter_step_batches

    model, _ = cached_students(students, "cpu")
    for batch in iter_step_batches(path, batch_steps=8):
        model.embed(batch.frames, batch.audio)
        break
    return os.getpid()


def warm_cluster(client: Any, path: str, students: str) -> list[int]:
    """:func:`warm_worker` as one task pinned to each worker, so it runs in the worker's task thread (the
    probe helper process is per thread) like the extraction tasks after it. Returns the worker pids."""
    workers = list(client.scheduler_info()["workers"])
    futures = [
        client.submit(warm_worker, path, students, workers=[w], allow_other_workers=False, pure=False)
        for w in workers
    ]
    return client.gather(futures)


def fresh(path: Path) -> Path:
    """``path`` removed if it exists (a store or folder a benchmark recreates); its parent created."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def folder_bytes(path: Path, *, skip: Sequence[str] = ("write.lock", "done", "results")) -> int:
    """Bytes of every file under ``path`` except the writer's bookkeeping (lock, done markers, results)."""
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in skip]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f not in skip)
    return total


# ---- output ------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    """A number for a table: thousands separators, ``digits`` decimals; ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != value:  # NaN
        return "nan"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    """``a / b`` as ``1.23x``; ``-`` when either is missing or ``b`` is 0."""
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.{digits}f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[str, str]:
    """The same table as aligned text (for the terminal) and as Markdown (for the README)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_looks_numeric(row[i]) for row in cells[1:]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric, strict=True)
        )

    text = "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
    md_rows = ["| " + " | ".join(r) + " |" for r in cells]
    md_rows.insert(1, "|" + "|".join("---:" if n else "---" for n in numeric) + "|")
    return text, "\n".join(md_rows)


def _looks_numeric(cell: str) -> bool:
    stripped = cell.replace(",", "").replace("x", "").replace("%", "").replace("-", "").replace(".", "")
    return stripped.strip().isdigit() or cell == "-"


def write_results(name: str, out_dir: Path, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def log(line: str = "") -> None:
    """Progress lines go to stderr, so stdout holds only the result tables."""
    print(line, file=sys.stderr, flush=True)

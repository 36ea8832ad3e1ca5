"""Dataset recipes: turn a public dataset's own annotation files plus local videos into a manifest.

Each recipe is a plain function registered by name with :func:`register_recipe`; the CLI's ``DATASET``
choices and the tests are derived from :func:`available_recipes`. :func:`prepare` runs one recipe and
writes its outputs beside the manifest:

- ``manifest.csv`` (:func:`pipeline.corpus.write_manifest`): ``video_id,path,label,split`` plus the
  recipe's extra columns; ``path`` is relative to the manifest's folder when the video is inside it, else
  absolute. Only rows whose video file exists are written, so every row can be read.
- ``missing.csv``: every listed row whose file was not found, same columns with ``path`` replaced by
  ``expected`` (the file names that were tried). Written whenever there is something to list.
- ``moments.json`` (ActivityNet only): ``{video_id: {"label": str, "segments": [[start_s, end_s]]}}``.

Nothing is dropped silently: a listed video without a file goes to ``missing``, a file under ROOT that no
listed row claims goes to ``unlisted``, a label outside the class list goes to ``unknown_labels`` (its rows
to ``excluded``), and a row left out by the recipe's own rule (duplicate, duration, per-class quota) goes
to ``excluded`` with its reason. :class:`PrepareReport` carries all of it.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import click

from indexing.errors import ConfigError
from indexing.options import cli_field
from pipeline.corpus import VIDEO_SUFFIXES, CorpusEntry, write_manifest

# The 31 Kinetics-Sounds classes used by Listen to Look (Gao et al., CVPR 2020), Kinetics spelling.
KINETICS_SOUNDS_CLASSES = (
    "blowing nose", "blowing out candles", "bowling", "chopping wood", "dribbling basketball",
    "laughing", "mowing lawn", "playing accordion", "playing bagpipes", "playing bass guitar",
    "playing clarinet", "playing drums", "playing guitar", "playing harmonica", "playing keyboard",
    "playing organ", "playing piano", "playing saxophone", "playing trombone", "playing trumpet",
    "playing violin", "playing xylophone", "ripping paper", "shoveling snow", "shuffling cards",
    "singing", "stomping grapes", "tap dancing", "tapping guitar", "tapping pen", "tickling",
)  # fmt: skip

KINETICS_SPLITS = {"train": "train", "training": "train", "validate": "val", "validation": "val",
                   "val": "val", "test": "test", "testing": "test"}  # fmt: skip
ACTIVITYNET_SPLITS = {"training": "train", "validation": "val", "testing": "test"}


@dataclass(frozen=True)
class PrepareConfig:
    """What to prepare and how; options that a recipe does not use are ignored by it.

    Attributes:
        dataset: A name from :func:`available_recipes`.
        root: Folder holding the videos (searched recursively).
        out: Manifest CSV to write; ``missing.csv`` and ``moments.json`` go beside it.
        annotations: The dataset's annotation file or folder; ``None`` looks in ``root``.
        split_id: UCF101 official split (1, 2 or 3).
        test_fraction: ``folder``: fraction of each class held out as ``test``.
        seed: ``folder`` and ``sports1m``: seed of the per-class random choice.
        per_class_train: ``sports1m``: videos kept per class from the train list.
        per_class_test: ``sports1m``: videos kept per class from the test list.
        min_s: ``sports1m``: shortest kept video, seconds (probed from the local file).
        max_s: ``sports1m``: longest kept video, seconds.
    """

    dataset: str
    root: Path
    out: Path
    # Each option below is also the `l2l prepare` option named by its flag (indexing.options.config_options):
    # a recipe's own option is one field here.
    annotations: Path | None = cli_field(
        flag="--annotations", type=click.Path(), help="Annotation file or folder.  [default: ROOT]"
    )
    split_id: int = cli_field(1, flag="--split-id", type=int, help="ucf101: official split 1, 2 or 3.")
    test_fraction: float = cli_field(
        0.2, flag="--test-fraction", type=float, help="folder: held-out fraction per class."
    )
    seed: int = cli_field(0, flag="--seed", type=int, help="folder, sports1m: seed of the per-class choice.")
    # Mini-Sports1M: 30 train / 10 test videos per class, 2 to 5 minutes long
    per_class_train: int = cli_field(
        30, flag="--per-class-train", type=int, help="sports1m: train videos per class."
    )
    per_class_test: int = cli_field(
        10, flag="--per-class-test", type=int, help="sports1m: test videos per class."
    )
    min_s: float = cli_field(120.0, flag="--min-s", type=float, help="sports1m: shortest video, seconds.")
    max_s: float = cli_field(300.0, flag="--max-s", type=float, help="sports1m: longest video, seconds.")

    def __post_init__(self) -> None:
        if self.dataset not in _RECIPES:
            raise ConfigError(
                f"Unknown dataset {self.dataset!r}; available: {', '.join(available_recipes())}"
            )
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "out", Path(self.out))
        if self.annotations is not None:
            object.__setattr__(self, "annotations", Path(self.annotations))
        if not self.root.is_dir():
            raise ConfigError(f"root {str(self.root)!r} is not a folder; pass the folder holding the videos")
        if self.out.suffix.lower() != ".csv":
            raise ConfigError(f"out {str(self.out)!r} must be a .csv file, e.g. --out manifest.csv")
        if self.annotations is not None and not self.annotations.exists():
            raise ConfigError(f"annotations {str(self.annotations)!r} does not exist; fix --annotations")
        if self.split_id not in (1, 2, 3):
            raise ConfigError(f"split_id={self.split_id} is not an official UCF101 split; use 1, 2 or 3")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction={self.test_fraction} must be in [0, 1), e.g. 0.2")
        if self.per_class_train < 0 or self.per_class_test < 0:
            raise ConfigError(
                f"per_class_train={self.per_class_train}, per_class_test={self.per_class_test} must be >= 0"
            )
        if not 0.0 <= self.min_s <= self.max_s:
            raise ConfigError(f"min_s={self.min_s}, max_s={self.max_s}: need 0 <= min_s <= max_s")


@dataclass
class Row:
    """One listed video before it is written: ``path`` is ``None`` when no file was found."""

    video_id: str
    label: str
    split: str
    path: Path | None = None
    expected: str = ""  # the file names tried, for the missing report
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class RecipeResult:
    """What a recipe returns to :func:`prepare`.

    Attributes:
        rows: Listed videos, found (``path`` set) or missing (``path`` is ``None``).
        classes: The class list the labels belong to (written labels must be in it).
        extra_columns: Names of the extra manifest columns, in order.
        used_files: Every file under ROOT that a listed row claims (including excluded rows).
        unknown_labels: Labels found in the lists but not in the class list.
        excluded: ``{"video_id", "reason"}`` for rows left out on purpose.
        moments: Optional ``moments.json`` content.
        not_in_subset: Listed rows outside the recipe's class subset (counted, not listed one by one).
    """

    rows: list[Row]
    classes: list[str]
    extra_columns: tuple[str, ...] = ()
    used_files: set[Path] = field(default_factory=set)
    unknown_labels: list[str] = field(default_factory=list)
    excluded: list[dict[str, str]] = field(default_factory=list)
    moments: dict[str, dict] | None = None
    not_in_subset: int = 0


@dataclass
class PrepareReport:
    """What :func:`prepare` wrote and everything it could not match.

    Attributes:
        dataset: The recipe name.
        rows: Manifest rows written (all have a file).
        classes: Distinct non-empty labels among the written rows.
        missing: ``{"video_id", "label", "split", "expected"}`` per listed video without a file.
        unlisted: Video files under ROOT (relative to ROOT) that no listed row claims.
        unknown_labels: Labels in the annotation lists that are not in the dataset's class list.
        excluded: ``{"video_id", "reason"}`` per listed video left out by the recipe's rules.
        out: The manifest path.
        not_in_subset: Listed rows outside the recipe's class subset (Kinetics classes that are not in
            Kinetics-Sounds, unlabeled Kinetics test rows); counted only.
        missing_csv: ``missing.csv`` path, or ``None`` when nothing is missing.
        moments: ``moments.json`` path, or ``None``.
    """

    dataset: str
    rows: int
    classes: int
    missing: list[dict[str, str]]
    unlisted: list[str]
    unknown_labels: list[str]
    excluded: list[dict[str, str]]
    out: str
    not_in_subset: int = 0
    missing_csv: str | None = None
    moments: str | None = None

    def to_json(self) -> dict:
        """The ``--json`` form."""
        return {
            "dataset": self.dataset,
            "rows": self.rows,
            "classes": self.classes,
            "missing": self.missing,
            "unlisted": self.unlisted,
            "unknown_labels": self.unknown_labels,
            "excluded": self.excluded,
            "out": self.out,
            "not_in_subset": self.not_in_subset,
            "missing_csv": self.missing_csv,
            "moments": self.moments,
        }

    def summary(self, *, limit: int = 5) -> str:
        """A readable multi-line summary, listing at most ``limit`` items of each kind."""
        lines = [f"{self.dataset}: {self.rows} rows, {self.classes} classes -> {self.out}"]
        if self.not_in_subset:
            lines.append(
                f"  {self.not_in_subset} listed rows outside the {self.dataset} class subset (skipped)"
            )
        groups = [
            ("missing (listed, no file)", [m["video_id"] for m in self.missing], self.missing_csv),
            ("unlisted (file, not listed)", self.unlisted, None),
            ("unknown labels", self.unknown_labels, None),
            ("excluded", [f"{e['video_id']}: {e['reason']}" for e in self.excluded], None),
        ]
        for title, items, where in groups:
            if not items:
                continue
            lines.append(f"  {len(items)} {title}" + (f", all in {where}" if where else "") + ":")
            lines.extend(f"    {item}" for item in items[:limit])
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
        return "\n".join(lines)


Recipe = Callable[[PrepareConfig], RecipeResult]
_RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str) -> Callable[[Recipe], Recipe]:
    """Register a recipe function under ``name`` (the CLI's DATASET choice)."""

    def wrap(fn: Recipe) -> Recipe:
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} is already registered")
        _RECIPES[name] = fn
        return fn

    return wrap


def available_recipes() -> list[str]:
    """Names of the registered recipes, sorted."""
    return sorted(_RECIPES)


def prepare(config: PrepareConfig) -> PrepareReport:
    """Run one recipe and write the manifest, ``missing.csv`` and (if any) ``moments.json``.

    Idempotent: a rerun overwrites the same files; a stale ``missing.csv`` is removed when nothing is
    missing any more.

    Args:
        config: A validated :class:`PrepareConfig`.

    Returns:
        The report of what was written and what could not be matched.

    Raises:
        ConfigError: Annotation files absent or malformed (the message names the file and the fix), or no
            video found under the root.
    """
    result = _RECIPES[config.dataset](config)
    out = config.out
    class_set = set(result.classes)
    found = [r for r in result.rows if r.path is not None]
    missing = [r for r in result.rows if r.path is None]
    if not found:  # an empty manifest would only make an empty store later
        what = f"none of the {len(missing)} listed videos" if missing else "no video"
        files = [p.relative_to(config.root).as_posix() for p in _video_files(config.root)]
        there = (
            f" ({len(files)} video files are there but none fits the recipe, e.g. {files[0]})"
            if files
            else ""
        )
        raise ConfigError(
            f"{config.dataset}: {what} found under {config.root}{there}; check ROOT (and --annotations); "
            "nothing was written"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    for row in found:
        if row.label and row.label not in class_set:  # a recipe bug, not user data: fail loudly
            raise RuntimeError(
                f"{config.dataset}: label {row.label!r} of {row.video_id} not in its class list"
            )

    write_manifest(out, [_entry(r, result.extra_columns) for r in found])
    missing_path = out.parent / "missing.csv"
    missing_dicts = [
        {"video_id": r.video_id, "label": r.label, "split": r.split, "expected": r.expected} for r in missing
    ]
    if missing:
        miss_columns = ["video_id", "expected", "label", "split", *result.extra_columns]
        miss_rows = [
            d | {c: r.extra.get(c, "") for c in result.extra_columns}
            for d, r in zip(missing_dicts, missing, strict=True)
        ]
        _write_csv(missing_path, miss_columns, miss_rows)
    elif missing_path.exists():
        missing_path.unlink()
    moments_path = None
    if result.moments is not None:
        moments_path = out.parent / "moments.json"
        moments_path.write_text(json.dumps(result.moments, indent=1, sort_keys=True))

    used = {p.resolve() for p in result.used_files}
    unlisted = sorted(
        p.relative_to(config.root).as_posix() for p in _video_files(config.root) if p.resolve() not in used
    )
    return PrepareReport(
        dataset=config.dataset,
        rows=len(found),
        classes=len({r.label for r in found if r.label}),
        missing=missing_dicts,
        unlisted=unlisted,
        unknown_labels=sorted(set(result.unknown_labels)),
        excluded=result.excluded,
        out=str(out),
        not_in_subset=result.not_in_subset,
        missing_csv=str(missing_path) if missing else None,
        moments=str(moments_path) if moments_path else None,
    )


# ---- shared helpers -----------------------------------------------------------------------------------


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # a reader never sees half a manifest


def _entry(row: Row, extra_columns: tuple[str, ...]) -> CorpusEntry:
    # Every entry carries every extra column, so the manifest's columns never depend on row order.
    extra = {c: row.extra.get(c, "") for c in extra_columns}
    return CorpusEntry(video_id=row.video_id, path=row.path, label=row.label, split=row.split, extra=extra)


def _video_files(root: Path) -> list[Path]:
    """Every video file under ``root`` (recursive, by suffix, hidden files skipped as in read_corpus)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in VIDEO_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _index_by_stem(root: Path) -> dict[str, list[Path]]:
    """Video files under ``root`` keyed by file name without suffix; each list sorted."""
    index: dict[str, list[Path]] = defaultdict(list)
    for path in _video_files(root):
        index[path.stem].append(path)
    return index


def _find(index: dict[str, list[Path]], names: list[str]) -> Path | None:
    """The first file whose stem is one of ``names`` (tried in order); sorted-first on ties."""
    for name in names:
        if index.get(name):
            return index[name][0]
    return None


def _annotation_files(config: PrepareConfig, patterns: tuple[str, ...]) -> list[Path]:
    """Files matching ``patterns`` in ``--annotations`` (a file is taken as is; a folder is searched)."""
    where = config.annotations if config.annotations is not None else config.root
    if where.is_file():
        return [where]
    files = sorted({p for pattern in patterns for p in where.rglob(pattern) if p.is_file()})
    if not files:
        raise ConfigError(
            f"{config.dataset}: no annotation file matching {', '.join(patterns)} under {where}; "
            "pass the dataset's annotation file or folder with --annotations"
        )
    return files


def _dedupe(rows: list[Row], excluded: list[dict[str, str]]) -> list[Row]:
    """Keep the first row per video_id; later ones are excluded with the reason."""
    first: dict[str, Row] = {}
    kept = []
    for row in rows:
        if row.video_id in first:
            prev = first[row.video_id]
            excluded.append(
                {
                    "video_id": row.video_id,
                    "reason": f"duplicate of the {prev.split!r} row labelled {prev.label!r}",
                }
            )
            continue
        first[row.video_id] = row
        kept.append(row)
    return kept


# ---- kinetics-sounds ----------------------------------------------------------------------------------


def _norm_label(label: str) -> str:
    # Some mirrors of the Kinetics CSVs write "playing_bagpipes" or add stray quotes/case.
    return " ".join(label.strip().strip('"').replace("_", " ").lower().split())


@register_recipe("kinetics-sounds")
def kinetics_sounds(config: PrepareConfig) -> RecipeResult:
    """Kinetics-400/600/700 CSVs filtered to the 31 Kinetics-Sounds classes.

    Reads every ``*.csv`` under ``--annotations`` (or the one file given). Columns are found by header name:
    ``youtube_id,time_start,time_end`` are required; ``label`` and ``split`` are optional (the 600/700
    test CSVs have no label; a missing ``split`` is taken from the file name); extra columns such as
    ``is_cc`` are ignored. Rows of other classes, and unlabeled test rows, are not part of Kinetics-Sounds:
    their files count as listed (not ``unlisted``) and the rows are counted in ``not_in_subset``. There is
    no ``unknown_labels`` here: any Kinetics label outside the 31 classes is simply out of the subset.
    ``validate`` maps to split ``val``. Files are matched by ``<youtube_id>_<start:06d>_<end:06d>`` (any
    video suffix, any subfolder), then by ``<youtube_id>`` alone when that id names one clip in the lists.
    """
    wanted = {_norm_label(c): c for c in KINETICS_SOUNDS_CLASSES}
    index = _index_by_stem(config.root)
    rows: list[Row] = []
    used: set[Path] = set()
    excluded: list[dict[str, str]] = []
    not_in_subset = 0
    clips_of: dict[str, set[tuple[int, int]]] = defaultdict(set)  # youtube_id -> its listed clips
    parsed: list[tuple[str, str, str, int, int]] = []  # (label, split, youtube_id, start, end)
    for path in _annotation_files(config, ("*.csv",)):
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            need = {"youtube_id", "time_start", "time_end"}
            if not need <= set(header):
                raise ConfigError(
                    f"{path}: header {header} lacks {sorted(need - set(header))}; expected the Kinetics CSV "
                    "format label,youtube_id,time_start,time_end,split"
                )
            file_split = next((s for k, s in KINETICS_SPLITS.items() if k in path.stem.lower()), "")
            for line, rec in enumerate(reader, start=2):
                split_name = (rec.get("split") or "").strip().lower()
                split = KINETICS_SPLITS.get(split_name) if split_name else file_split
                if not split:
                    raise ConfigError(
                        f"{path}:{line}: split {split_name!r} is not one of {', '.join(KINETICS_SPLITS)}; "
                        "fix the split column or name the file train/validate/test.csv"
                    )
                try:
                    start, end = int(float(rec["time_start"])), int(float(rec["time_end"]))
                except (TypeError, ValueError) as err:
                    raise ConfigError(
                        f"{path}:{line}: bad time_start/time_end ({err}); fix or remove the row"
                    ) from err
                yid = rec["youtube_id"].strip()
                clips_of[yid].add((start, end))
                parsed.append((rec.get("label") or "", split, yid, start, end))

    for raw_label, split, yid, start, end in parsed:
        clip = f"{yid}_{start:06d}_{end:06d}"
        names = [clip] + ([yid] if len(clips_of[yid]) == 1 else [])
        path = _find(index, names)
        label = wanted.get(_norm_label(raw_label)) if raw_label else None
        if label is None:
            not_in_subset += 1
            if path is not None:
                used.add(path)  # listed under another class: not "unlisted"
            continue
        rows.append(
            Row(
                clip,
                label,
                split,
                path,
                expected=" | ".join(f"{n}.*" for n in names),
                extra={"youtube_id": yid, "time_start": str(start), "time_end": str(end)},
            )
        )
    rows = _dedupe(rows, excluded)
    used |= {r.path for r in rows if r.path is not None}
    columns = ("youtube_id", "time_start", "time_end")
    return RecipeResult(
        rows, list(KINETICS_SOUNDS_CLASSES), columns, used, [], excluded, not_in_subset=not_in_subset
    )


# ---- ucf101 -------------------------------------------------------------------------------------------


@register_recipe("ucf101")
def ucf101(config: PrepareConfig) -> RecipeResult:
    """UCF101 official split lists (``ucfTrainTestlist``) over the class folders of ``.avi`` files.

    Reads ``classInd.txt`` (``"1 ApplyEyeMakeup"``, 1-based), ``trainlist0N.txt``
    (``"ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"``) and ``testlist0N.txt`` for ``N = split_id``.
    ``video_id`` is the file stem; ``label`` is the class name. A train row whose index disagrees with
    classInd, or whose class folder is not in classInd, is excluded and its label reported as unknown.
    Files are matched by the listed relative path, then by stem anywhere under ROOT.
    """
    n = config.split_id
    files = {
        p.name.lower(): p
        for p in _annotation_files(config, ("classInd.txt", f"trainlist0{n}.txt", f"testlist0{n}.txt"))
    }
    for name in ("classind.txt", f"trainlist0{n}.txt", f"testlist0{n}.txt"):
        if name not in files:
            raise ConfigError(
                f"ucf101: {name} not found; pass the ucfTrainTestlist folder with --annotations"
            )
    classes: dict[int, str] = {}
    for line_no, line in enumerate(files["classind.txt"].read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ConfigError(f"{files['classind.txt']}:{line_no}: expected 'index ClassName', got {line!r}")
        classes[int(parts[0])] = parts[1]
    by_name = {name: idx for idx, name in classes.items()}

    index = _index_by_stem(config.root)
    rows: list[Row] = []
    used: set[Path] = set()
    unknown: list[str] = []
    excluded: list[dict[str, str]] = []
    for split, name in (("train", f"trainlist0{n}.txt"), ("test", f"testlist0{n}.txt")):
        for line_no, line in enumerate(files[name].read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            rel = parts[0]
            if "/" not in rel:
                raise ConfigError(f"{files[name]}:{line_no}: expected 'Class/v_X.avi[ index]', got {line!r}")
            class_name = rel.split("/")[0]
            stem = Path(rel).stem
            direct = config.root / rel
            path = direct if direct.is_file() else _find(index, [stem])
            if path is not None:
                used.add(path)  # listed, even when the row is excluded below
            if class_name not in by_name:
                unknown.append(class_name)
                excluded.append({"video_id": stem, "reason": f"class {class_name!r} not in classInd.txt"})
                continue
            if len(parts) > 1 and parts[1].isdigit() and int(parts[1]) != by_name[class_name]:
                excluded.append(
                    {
                        "video_id": stem,
                        "reason": f"index {parts[1]} disagrees with classInd.txt "
                        f"({class_name} = {by_name[class_name]})",
                    }
                )
                continue
            rows.append(Row(stem, class_name, split, path, expected=rel))
    rows = _dedupe(rows, excluded)
    return RecipeResult(rows, [classes[i] for i in sorted(classes)], (), used, unknown, excluded)


# ---- activitynet --------------------------------------------------------------------------------------


def _choose_label(annotations: list[dict]) -> str:
    """Most frequent annotated label; ties broken by longer total annotated duration, then by name."""
    count: Counter[str] = Counter()
    total_s: Counter[str] = Counter()
    for ann in annotations:
        start_s, end_s = ann["segment"]
        count[ann["label"]] += 1
        total_s[ann["label"]] += max(0.0, float(end_s) - float(start_s))
    return min(count, key=lambda lab: (-count[lab], -total_s[lab], lab))


@register_recipe("activitynet")
def activitynet(config: PrepareConfig) -> RecipeResult:
    """ActivityNet v1.3 JSON (``database`` -> ``{id: {subset, duration, url, annotations}}``).

    One label per video: the most frequent annotated label, ties broken by the longer total annotated
    duration, then alphabetically. Subsets training/validation/testing become train/val/test; testing
    videos have no annotations and are kept with an empty label. The class list is the set of annotated
    labels (plus the taxonomy's leaf nodes when the JSON has one; a label outside the taxonomy is unknown).
    Files: ``v_<id>.*`` or ``<id>.*`` anywhere under ROOT. ``moments.json`` holds, per written labelled
    video, the segments of its chosen label in seconds; a segment without ``0 <= start < end`` is left out
    of it and reported in ``excluded`` (the video stays in the manifest).
    """
    found = _annotation_files(config, ("activity_net*.json", "activitynet*.json"))
    if len(found) > 1:
        raise ConfigError(
            f"activitynet: several JSON files {[str(p) for p in found]}; pick one with --annotations"
        )
    path = found[0]
    try:
        data = json.loads(path.read_text())
        database = data["database"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path}: not an ActivityNet JSON with a 'database' key ({err}); fix --annotations"
        ) from err
    taxonomy = data.get("taxonomy") or []
    parents = {node.get("parentName") for node in taxonomy}
    leaves = {node["nodeName"] for node in taxonomy if node.get("nodeName") not in parents}

    index = _index_by_stem(config.root)
    rows: list[Row] = []
    unknown: list[str] = []
    excluded: list[dict[str, str]] = []
    moments: dict[str, dict] = {}
    labels: set[str] = set()
    for vid in sorted(database):
        info = database[vid]
        subset = info.get("subset", "")
        if subset not in ACTIVITYNET_SPLITS:
            excluded.append(
                {"video_id": vid, "reason": f"subset {subset!r} is not training/validation/testing"}
            )
            continue
        anns = info.get("annotations") or []
        try:
            label = _choose_label(anns) if anns else ""
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"{path}: video {vid}: annotations need 'label' and 'segment' [s, e] ({err})"
            ) from err
        if leaves and label and label not in leaves:
            unknown.append(label)
            excluded.append({"video_id": vid, "reason": f"label {label!r} not in the taxonomy"})
            continue
        file = _find(index, [f"v_{vid}", vid])
        extra = {"duration_s": str(info.get("duration", "")), "subset": subset}
        rows.append(
            Row(vid, label, ACTIVITYNET_SPLITS[subset], file, expected=f"v_{vid}.* | {vid}.*", extra=extra)
        )
        if label:
            labels.add(label)
            if file is not None:
                segments = []
                for start_s, end_s in sorted(a["segment"] for a in anns if a["label"] == label):
                    if 0 <= float(start_s) < float(end_s):
                        segments.append([float(start_s), float(end_s)])
                    else:  # read_moments rejects it; the video itself is kept
                        reason = f"segment [{start_s}, {end_s}] is not 0 <= start < end; not in moments.json"
                        excluded.append({"video_id": vid, "reason": reason})
                moments[vid] = {"label": label, "segments": segments}
    used = {r.path for r in rows if r.path is not None}
    classes = sorted(labels | leaves)
    return RecipeResult(rows, classes, ("duration_s", "subset"), used, unknown, excluded, moments)


# ---- folder -------------------------------------------------------------------------------------------


@register_recipe("folder")
def folder(config: PrepareConfig) -> RecipeResult:
    """Any ``ROOT/<class>/<video>`` tree (deeper subfolders belong to the top class folder).

    Each class is split on its own: its files, sorted, are shuffled with ``Random(f"{seed}:{class}")``
    (adding a class never changes another's split) and ``round(n * test_fraction)`` go to ``test``, but at
    least one to each side when the class has two or more videos and ``test_fraction > 0``. Videos directly
    in ROOT have no class and are reported as ``unlisted``; a repeated file stem is excluded.
    """
    by_class: dict[str, list[Path]] = defaultdict(list)
    for path in _video_files(config.root):
        rel = path.relative_to(config.root)
        if len(rel.parts) >= 2:
            by_class[rel.parts[0]].append(path)
    rows: list[Row] = []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        random.Random(f"{config.seed}:{label}").shuffle(paths)
        n_test = round(len(paths) * config.test_fraction)
        if config.test_fraction > 0 and len(paths) >= 2:
            n_test = min(max(n_test, 1), len(paths) - 1)
        test = set(paths[:n_test])
        for path in sorted(paths):
            rows.append(Row(path.stem, label, "test" if path in test else "train", path))
    excluded: list[dict[str, str]] = []
    kept = _dedupe(rows, excluded)
    return RecipeResult(kept, sorted(by_class), (), {r.path for r in rows}, [], excluded)


# ---- sports1m -----------------------------------------------------------------------------------------


def _youtube_id(url: str) -> str:
    """The video id in a YouTube URL (``watch?v=ID``, ``youtu.be/ID``, ``/embed/ID``), or ``""``."""
    parsed = urlparse(url.strip())
    if "v" in parse_qs(parsed.query):
        return parse_qs(parsed.query)["v"][0]
    match = re.search(r"(?:youtu\.be/|/embed/|/v/)([\w-]{6,})", url)
    return match.group(1) if match else ""


def probe_duration_s(path: Path) -> float:
    """Container duration in seconds from PyAV (header only, no decoding).

    Raises:
        ValueError: The file cannot be opened or states no duration.
    """
    import av

    try:
        with av.open(str(path)) as container:
            if container.duration is not None:
                return container.duration / av.time_base
            spans = [float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base]
    except (av.FFmpegError, OSError, ValueError) as err:
        raise ConfigError(f"unreadable ({type(err).__name__}: {err})") from err
    if not spans:
        raise ConfigError("no duration in the container or its streams")
    return max(spans)


def _read_sports1m_list(path: Path, split: str) -> list[tuple[str, list[str], str]]:
    """``(video_id, label indices as strings, split)`` from a JSON list or a partition text file."""
    entries: list[tuple[str, list[str], str]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON list of {{id, source, label487}} entries")
        for i, item in enumerate(data):
            vid = str(item.get("id") or _youtube_id(str(item.get("source") or item.get("url") or "")))
            labels = item.get("label487")
            if not vid or not isinstance(labels, list):
                raise ConfigError(
                    f"{path}: entry {i} has no 'id'/'source' URL or no 'label487' list: {item!r}"
                )
            entries.append((vid, [str(x) for x in labels], split))
        return entries
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = re.split(r"[\s]+", line.strip(), maxsplit=1)
        vid = _youtube_id(parts[0]) if "/" in parts[0] else parts[0]
        if len(parts) != 2 or not vid:
            raise ConfigError(f"{path}:{line_no}: expected 'URL label,label', got {line!r}")
        entries.append((vid, [x for x in re.split(r"[,\s]+", parts[1]) if x], split))
    return entries


@register_recipe("sports1m")
def sports1m(config: PrepareConfig) -> RecipeResult:
    """A Mini-Sports1M-like subset rebuilt from the public Sports-1M lists and the local files.

    Lists (under ``--annotations``, or ROOT): ``labels.txt`` (487 names, line i = index i) and per split
    either the JSON ``sports1m_{train,test}.json`` from the project page's ``sports1m_json.zip`` (a list of
    ``{"id", "label487": [indices], "duration", ...}``; when ``id`` is absent the id is parsed from a
    ``source`` / ``url`` YouTube URL) or the text partitions ``original/{train,test}_partition.txt`` of
    github.com/gtoderici/sports-1m-dataset (``URL idx,idx`` per line). JSON wins when both exist for a
    split. The JSON's ``duration`` is YouTube metadata and is not used: durations are probed locally.

    The label is the first listed index (Sports-1M is multi-label; all names go to the ``labels`` column;
    an index outside labels.txt is reported in ``unknown_labels``, and excludes the video when first).
    As in the paper, each class keeps ``per_class_train`` train and ``per_class_test`` test videos whose
    probed duration is in ``[min_s, max_s]``: candidates with a local file (``<id>.*``) are shuffled with
    ``Random(f"{seed}:{split}:{class}")`` and probed in that order until the quota is filled; the rest
    are excluded with the reason. A test video also in the train list is excluded from test.
    """
    label_file = _annotation_files(config, ("labels.txt",))
    label_file = [p for p in label_file if p.name == "labels.txt"]
    if not label_file:
        raise ConfigError(
            "sports1m: labels.txt not found; pass the sports-1m-dataset folder with --annotations"
        )
    names = [line.strip() for line in label_file[0].read_text(encoding="utf-8").splitlines() if line.strip()]

    listed: list[tuple[str, list[str], str]] = []
    for split in ("train", "test"):
        found = _annotation_files(config, (f"sports1m_{split}.json", f"{split}_partition.txt"))
        json_files = [p for p in found if p.name == f"sports1m_{split}.json"]
        txt_files = [p for p in found if p.name == f"{split}_partition.txt"]
        chosen = json_files or txt_files
        if not chosen:
            raise ConfigError(
                f"sports1m: no sports1m_{split}.json or {split}_partition.txt; fix --annotations"
            )
        listed.extend(_read_sports1m_list(chosen[0], split))

    index = _index_by_stem(config.root)
    unknown: list[str] = []
    excluded: list[dict[str, str]] = []
    rows: list[Row] = []
    seen: dict[str, str] = {}  # video_id -> split of its first listing (train lists are read first)
    candidates: dict[tuple[str, str], list[Row]] = defaultdict(list)
    used: set[Path] = set()
    for vid, indices, split in listed:
        label_names = [names[int(i)] if i.isdigit() and int(i) < len(names) else "" for i in indices]
        unknown.extend(i for i, name in zip(indices, label_names, strict=True) if not name)
        path = _find(index, [vid])
        if not indices or not label_names[0]:
            excluded.append({"video_id": vid, "reason": f"label index {indices[:1]} not in labels.txt"})
            if path is not None:
                used.add(path)  # listed, so not "unlisted"
            continue
        if vid in seen:
            excluded.append({"video_id": vid, "reason": f"{split} listing repeats a {seen[vid]} listing"})
            continue
        seen[vid] = split
        row = Row(
            vid,
            label_names[0],
            split,
            path,
            expected=f"{vid}.*",
            extra={"labels": ";".join(n for n in label_names if n)},
        )
        if row.path is None:
            rows.append(row)  # reported missing
        else:
            candidates[(split, row.label)].append(row)

    for (split, label), group in sorted(candidates.items()):
        quota = config.per_class_train if split == "train" else config.per_class_test
        group = sorted(group, key=lambda r: r.video_id)
        random.Random(f"{config.seed}:{split}:{label}").shuffle(group)
        kept = 0
        for row in group:
            used.add(row.path)
            if kept >= quota:
                excluded.append(
                    {"video_id": row.video_id, "reason": f"{split} quota of {quota} for {label!r} filled"}
                )
                continue
            try:
                duration_s = probe_duration_s(row.path)
            except ValueError as err:
                excluded.append({"video_id": row.video_id, "reason": str(err)})
                continue
            if not config.min_s <= duration_s <= config.max_s:
                excluded.append(
                    {
                        "video_id": row.video_id,
                        "reason": f"duration {duration_s:.1f} s outside [{config.min_s:g}, {config.max_s:g}]",
                    }
                )
                continue
            row.extra["duration_s"] = f"{duration_s:.3f}"
            rows.append(row)
            kept += 1
    rows.sort(key=lambda r: (r.split != "train", r.label, r.video_id))
    return RecipeResult(rows, names, ("duration_s", "labels"), used, unknown, excluded)

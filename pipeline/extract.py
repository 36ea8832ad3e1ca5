"""The extraction engine: probe every video, plan chunk-aligned tasks, write features into one store.

Stages (``shared/design.md`` §4, §5):

1. **Probe** every video of the corpus (batches of :func:`probe_entries`, on the cluster when there is
   one). A video that cannot be probed is recorded ``failed`` with its reason and gets no rows.
2. **Plan** (:func:`pipeline.plan.plan_extraction`): row ranges and chunk-aligned tasks, deterministic.
3. **Create** the store once: arrays sized to the plan, attrs (step, audio front end, models with their
   sha256, extraction config, plan summary and digest, corpus digest) and the index (``pending``).
4. **Run** :func:`extract_task` for every unfinished task: serially, or mapped over a Dask client with
   retries. A task decodes its videos step batch by step batch, runs the students, writes all its rows
   with one ``write_rows`` call, then marks itself done with its result (``FeatureStore.mark_done``, which
   keeps the result with the done marker). A retried task rewrites exactly its own rows.
5. **Finalise** once: the index gets every video's status, error and has_audio.

Rows of a video that fails while decoding (``MediaError``) stay in place with zero features and
``valid`` false; the index says ``failed`` with the reason, and the task goes on with its other videos.
A video without an audio track is ``ok`` with ``has_audio`` false: its audio and fused features are
computed from silence (zeros, as the students were trained to see it) and ``audio_valid`` is false on
all its rows. ``audio_valid`` is also false on steps starting after the end of a shorter audio track.

Resume: running again on an existing store (the same corpus and a compatible config) rebuilds the same
plan from the stored index, checks its digest and runs only the tasks without a done marker. Features
are bitwise reproducible because the batch composition (``batch_steps`` per video) and torch's thread
count (``torch_threads``) are part of the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexing.errors import CheckpointError, ConfigError, MediaError, StoreError
from indexing.feature_sets import STUDENT_SETS, get_feature_set, parse_feature_sets
from indexing.grid import AUDIO_S, SAMPLE_RATE, STEP_S
from indexing.stores import (
    FEATURES,
    FeatureStore,
    VideoRecord,
    available_stores,
    get_store,
    open_store,
    store_format,
)
from pipeline.plan import Plan, Task, TaskVideo, plan_extraction, replan

if TYPE_CHECKING:
    from distributed import Client

    from pipeline.corpus import CorpusEntry

IMAGE_SIZE = 112
# Config fields that change which rows exist or what bytes they hold: a resume must match them.
_RESUME_KEYS = ("store", "dtype", "chunk_rows", "task_steps", "batch_steps", "torch_threads")
# Of stores written before these fields:
_CONFIG_DEFAULTS = {"features": list(STUDENT_SETS), "teacher": "", "model_weights": []}


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides an extraction's output; validated on creation, stored in the store attrs.

    Attributes:
        students: Students checkpoint path, or ``random:SEED[:PRESET]`` for explicitly random weights.
        store: Store backend (one of :func:`indexing.stores.available_stores`).
        dtype: Feature dtype on disk, ``float16`` or ``float32``.
        chunk_rows: Rows per store chunk; tasks always own whole chunks.
        task_steps: Target steps per task (default ``2 * chunk_rows``, about 18 min of video); a task
            closes once it holds this many steps, a longer video makes a longer task.
        batch_steps: Steps per forward pass (per video, so the batches never depend on the schedule).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        torch_threads: torch intra-op threads per task. Part of the output: matrix products round
            differently with other thread counts, so a resume must use the same.
        probe_timeout_s: Give up probing one file after this long (it is then ``failed``).
        probe_batch: Videos per probe task on the cluster.
        retries: Dask retries of a task whose worker died.
        compression: Store codec (``default`` = the backend's measured default).
        features: Feature sets to extract (:mod:`indexing.feature_sets`); the students' ``image``,
            ``audio`` and ``fused`` are always among them.
        teacher: The teacher of the ``teacher`` set: a torchvision r2plus1d_18 state dict file, or
            ``preset:NAME`` for a seeded random preset teacher (``preset:tiny`` in tests). Empty otherwise.
        model_weights: ``NAME=PATH`` for each torchvision image-model set among ``features``
            (:data:`indexing.feature_sets.IMAGE_MODELS`): its local state dict file; none for other sets.

    Raises:
        ConfigError: A bad value; the message names the value and the fix.
    """

    students: str
    store: str = "zarr"
    dtype: str = "float16"
    chunk_rows: int = 1024
    task_steps: int | None = None
    batch_steps: int = 64
    device: str = "cpu"
    torch_threads: int = 1
    probe_timeout_s: float = 60.0
    probe_batch: int = 32
    retries: int = 2
    compression: str = "default"
    features: tuple[str, ...] = STUDENT_SETS
    teacher: str = ""
    model_weights: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", parse_feature_sets(self.features))
        missing = [s for s in STUDENT_SETS if s not in self.features]
        all_sets = STUDENT_SETS + tuple(self.features)
        if missing:
            raise ConfigError(
                f"features {','.join(self.features)} lack {','.join(missing)}: every store holds the "
                f"students' image,audio,fused; pass --features {','.join(parse_feature_sets(all_sets))}"
            )
        object.__setattr__(self, "teacher", str(self.teacher or ""))
        if ("teacher" in self.features) != bool(self.teacher):
            raise ConfigError(
                "the teacher feature set needs a teacher and only it takes one: pass --teacher-weights PATH "
                "or --teacher-preset NAME exactly when --features / --add-features name teacher"
            )
        self._check_model_weights()
        if not str(self.students).strip():
            raise ConfigError("students is empty; pass --students CHECKPOINT or --students random:SEED")
        object.__setattr__(self, "students", str(self.students))
        if self.store not in available_stores():
            raise ConfigError(
                f"Unknown store format {self.store!r}; available: {', '.join(available_stores())}"
            )
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use float16 or float32")
        for name in ("chunk_rows", "batch_steps", "torch_threads", "probe_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.task_steps is None:
            object.__setattr__(self, "task_steps", 2 * self.chunk_rows)
        if not isinstance(self.task_steps, int) or self.task_steps < 1:
            raise ConfigError(f"task_steps must be a positive integer, got {self.task_steps!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries!r}")
        if not self.probe_timeout_s > 0:
            raise ConfigError(f"probe_timeout_s must be > 0, got {self.probe_timeout_s!r}")
        if self.device != "cpu" and not (self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"device {self.device!r} is not supported; use cpu, cuda or cuda:N")

    def _check_model_weights(self) -> None:
        """``model_weights`` as sorted ``NAME=PATH`` entries, one for each image-model set and no other."""
        from indexing.feature_sets import image_model_sets

        given = (self.model_weights,) if isinstance(self.model_weights, str) else tuple(self.model_weights)
        weights: dict[str, str] = {}
        for entry in given:
            name, sep, path = str(entry).partition("=")
            name = name.strip()
            if not sep or not path or name not in image_model_sets():
                raise ConfigError(
                    f"model weights {entry!r}: give NAME=PATH, NAME one of {', '.join(image_model_sets())}"
                )
            if name in weights and weights[name] != path:
                raise ConfigError(f"model weights for {name} given twice ({weights[name]}, {path}); give one")
            weights[name] = path
        wanted = [s for s in self.features if s in image_model_sets()]
        missing = [s for s in wanted if s not in weights]
        if missing:
            raise ConfigError(
                f"feature set(s) {', '.join(missing)} need local weights: pass --model-weights "
                f"{missing[0]}=PATH (a torchvision state dict file; nothing is downloaded)"
            )
        unused = sorted(set(weights) - set(wanted))
        if unused:
            raise ConfigError(
                f"--model-weights {', '.join(unused)}: not among the feature sets; add them to --features"
            )
        object.__setattr__(self, "model_weights", tuple(f"{n}={weights[n]}" for n in sorted(weights)))

    def weights_of(self, name: str) -> str:
        """The weights file of image-model set ``name`` (from ``model_weights``)."""
        return dict(entry.split("=", 1) for entry in self.model_weights)[name]

    def to_dict(self) -> dict[str, Any]:
        """Plain fields, as stored in the store attrs under ``extraction``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["features"] = list(self.features)
        out["model_weights"] = list(self.model_weights)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExtractConfig:
        """The config recorded in a store's attrs (fields it lacks take their defaults)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @property
    def extra_sets(self) -> tuple[str, ...]:
        """The feature sets beyond the students' three."""
        return tuple(s for s in self.features if s not in STUDENT_SETS)


@dataclass(frozen=True)
class VideoResult:
    """What a task learnt about one video."""

    pos: int
    video_id: str
    status: str  # ok | failed
    error: str = ""
    has_audio: bool = False
    steps: int = 0  # valid rows written


@dataclass(frozen=True)
class TaskResult:
    """The outcome of one :func:`extract_task`, kept with the task's done marker in the store.

    Attributes:
        index: Task number.
        start: First row.
        stop: End row.
        videos: Per-video outcomes, in row order.
        seconds: Wall time of the task.
        host: Where it ran.
        pid: Worker process id.
        torch_threads: torch threads the task ran with.
    """

    index: int
    start: int
    stop: int
    videos: tuple[VideoResult, ...]
    seconds: float = 0.0
    host: str = ""
    pid: int = 0
    torch_threads: int = 0

    @property
    def steps(self) -> int:
        """Valid rows written."""
        return sum(v.steps for v in self.videos)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskResult:
        videos = tuple(VideoResult(**v) for v in d["videos"])
        return cls(**{**{k: d[k] for k in d if k != "videos"}, "videos": videos})


@dataclass
class ExtractReport:
    """What :func:`run_extraction` did; ``to_json`` is the CLI's ``--json`` output."""

    store: str
    format: str
    videos: int = 0
    ok: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    pending: int = 0
    steps: int = 0  # valid rows in the store
    rows: int = 0
    tasks: int = 0
    tasks_run: int = 0
    tasks_skipped: int = 0  # already done before this run
    tasks_left: int = 0  # not done after this run (errors, max_tasks)
    task_errors: list[dict[str, str]] = field(default_factory=list)
    steps_run: int = 0  # rows computed by this run
    seconds: float = 0.0  # the whole run: probing, planning, model loading, tasks, finalising
    task_seconds: float = 0.0  # from the first task submitted to the last one finished
    resumed: bool = False
    complete: bool = False
    students_random: bool = False

    @property
    def steps_per_s(self) -> float:
        """Throughput of the task phase (decode + students + writes), all workers together."""
        return self.steps_run / self.task_seconds if self.task_seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form, in the CLI's vocabulary: ``failed`` counts, ``failures`` lists."""
        doc = {**asdict(self), "steps_per_s": round(self.steps_per_s, 2)}
        doc["failures"] = doc.pop("failed")
        doc["failed"] = len(self.failed)
        return doc

    def summary(self) -> str:
        lines = [
            f"store     {self.store} ({self.format}{', resumed' if self.resumed else ''})",
            f"videos    {self.videos}: {self.ok} ok, {len(self.failed)} failed, {self.pending} pending",
            f"steps     {self.steps} in {self.rows} rows; {self.tasks_run} of {self.tasks} tasks run here "
            f"({self.tasks_skipped} already done)",
            f"speed     {self.steps_run} steps in {self.task_seconds:.1f} s of tasks = "
            f"{self.steps_per_s:.1f} steps/s ({self.seconds:.1f} s in all)",
        ]
        if self.students_random:
            lines.append("WARNING   features come from RANDOM student weights (for pipeline tests only)")
        return "\n".join(lines)


# ---- probing ---------------------------------------------------------------------------------------


def probe_entries(entries: Sequence[CorpusEntry], *, timeout_s: float = 60.0) -> list[VideoRecord]:
    """Probe videos and make their index records (a plain function, mapped over batches on the cluster).

    Args:
        entries: Corpus entries.
        timeout_s: Per-file probe timeout.

    Returns:
        One record per entry: ``pending`` with ``steps`` / ``duration_s`` / ``fps`` / ``has_audio`` from
        the probe, or ``failed`` with the reason and 0 steps. Never raises for a bad file.
    """
    from pipeline.media import probe_video

    out = []
    for e in entries:
        rec = VideoRecord(video_id=e.video_id, path=str(e.path), label=e.label or "", split=e.split or "")
        try:
            info = probe_video(e.path, timeout_s=timeout_s)
            steps = int(info.num_steps)
            if steps <= 0:
                raise MediaError(e.path, f"no steps (duration {info.duration_s:.3f} s)")
            rec = replace(
                rec,
                steps=steps,
                duration_s=float(info.duration_s),
                fps=float(info.fps),
                has_audio=bool(info.has_audio),
            )
        except MediaError as err:
            rec = replace(rec, status="failed", error=err.reason)
        except Exception as err:  # one odd file must not stop the corpus: record it as failed
            rec = replace(rec, status="failed", error=f"probe crashed: {type(err).__name__}: {err}")
        out.append(rec)
    return out


def probe_corpus(
    entries: Sequence[CorpusEntry],
    config: ExtractConfig,
    *,
    client: Client | None = None,
    progress: bool = False,
) -> list[VideoRecord]:
    """Probe all entries, in parallel on ``client`` when given; records come back in corpus order."""
    from tqdm import tqdm

    batches = [entries[i : i + config.probe_batch] for i in range(0, len(entries), config.probe_batch)]
    bar = tqdm(total=len(entries), desc="probe", unit="video", disable=not progress, file=sys.stderr)
    out: list[list[VideoRecord]] = [[] for _ in batches]
    with bar:
        if client is None:
            for i, batch in enumerate(batches):
                out[i] = probe_entries(batch, timeout_s=config.probe_timeout_s)
                bar.update(len(batch))
        else:
            from distributed import as_completed

            run = uuid.uuid4().hex[:8]
            futures = client.map(
                probe_entries,
                batches,
                key=[f"probe-{run}-{i:06d}" for i in range(len(batches))],
                timeout_s=config.probe_timeout_s,
                retries=config.retries,
                pure=False,
            )
            where = {f.key: i for i, f in enumerate(futures)}
            for fut in as_completed(futures):
                i = where[fut.key]
                out[i] = fut.result()
                bar.update(len(batches[i]))
    return [rec for batch in out for rec in batch]


# ---- the task ----------------------------------------------------------------------------------------

_STUDENTS: dict[tuple, tuple[Any, dict]] = {}
_STUDENTS_LOCK = threading.Lock()


def cached_students(spec: str, device: str) -> tuple[Any, dict[str, Any]]:
    """``load_students(spec, device=device)``, loaded once per process (a Dask worker keeps it).

    The cache key includes a checkpoint file's size and mtime, so a long-lived worker never keeps
    weights that were replaced on disk.
    """
    path = Path(spec)
    stamp = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
    key = (spec, device, stamp)
    with _STUDENTS_LOCK:
        if key not in _STUDENTS:
            from indexing.models import load_students

            for old in [k for k in _STUDENTS if k[:2] == (spec, device)]:
                del _STUDENTS[old]
            _STUDENTS[key] = load_students(spec, device=device)
        return _STUDENTS[key]


_TEACHERS: dict[tuple, tuple[Any, dict]] = {}


def cached_teacher(spec: str, device: str) -> tuple[Any, dict[str, Any]]:
    """The teacher of ``spec`` (a state dict file or ``preset:NAME``), loaded once per process."""
    from indexing.models import load_teacher

    path = Path(spec)
    stamp = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
    key = (spec, device, stamp)
    with _STUDENTS_LOCK:
        if key not in _TEACHERS:
            if spec.startswith("preset:"):
                _TEACHERS[key] = load_teacher(preset=spec.split(":", 1)[1], device=device)
            else:
                if not path.is_file():
                    raise ConfigError(
                        f"teacher weights {spec!r} do not exist; give a state dict file or preset:tiny"
                    )
                _TEACHERS[key] = load_teacher(spec, device=device)
        return _TEACHERS[key]


_IMAGE_MODELS: dict[tuple, tuple[Any, dict]] = {}


def cached_image_model(name: str, weights: str, device: str) -> tuple[Any, dict[str, Any]]:
    """The torchvision image model of set ``name`` from its local weights, loaded once per process."""
    from indexing.feature_sets import load_image_model

    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"--model-weights {name}={weights}: no such file; give a local state dict file")
    key = (name, weights, device, path.stat().st_size, path.stat().st_mtime_ns)
    with _STUDENTS_LOCK:
        if key not in _IMAGE_MODELS:
            _IMAGE_MODELS[key] = load_image_model(name, weights, device=device)
        return _IMAGE_MODELS[key]


def _set_models(sets: Sequence[str], config: ExtractConfig) -> dict[str, Any]:
    """The model each extra feature set runs (``None`` for sets made from the decoded inputs alone)."""
    models: dict[str, Any] = {}
    for name in sets:
        fs = get_feature_set(name)
        if fs.model == "teacher":
            models[name] = cached_teacher(config.teacher, config.device)[0]
        elif fs.model == "torchvision":
            models[name] = cached_image_model(name, config.weights_of(name), config.device)[0]
        else:
            models[name] = None
    return models


def extract_task(
    task: Task,
    *,
    store_path: str | Path,
    config: ExtractConfig,
    sets: Sequence[str] | None = None,
    fail: dict[int, str] | None = None,
) -> TaskResult:
    """Extract one task: decode its videos, run the models, write its rows, mark it done.

    The same function runs serially and on Dask workers. It is idempotent: a retry recomputes and
    rewrites exactly rows ``[task.start, task.stop)`` (padding included) with one ``write_rows`` call.
    The task's rows are held in memory in the store dtype (about 3 kB per step in float16 for the
    students' sets, 38 kB more with ``inputs``).

    Args:
        task: A task of the store's plan.
        store_path: The store directory (created by :func:`run_extraction`).
        config: The extraction config the store was created with.
        sets: Feature sets to add to this already finished task (``--add-features``): only their arrays are
            computed and written, then added to the task's done marker; videos the task recorded as failed
            keep fill rows. ``None``: the whole task, every set of ``config.features``.
        fail: Videos (index position: reason) another task of which recorded a failed piece: this task
            records its piece of them failed too, with fill rows, so a cut video is never half ok.

    Returns:
        The task's result (per-video status, error, has_audio, rows written).

    Raises:
        CheckpointError: The loaded students or teacher are not the ones the store was created with.
        StoreError: Adding sets to a task that is not done, or a video that was ok fails now.
        Exception: Anything other than a ``MediaError`` (which only fails its video) fails the task, so
            the executor can retry it.
    """
    from pipeline.cluster import pin_torch_threads

    t0 = time.perf_counter()
    threads = pin_torch_threads(config.torch_threads)
    adding = sets is not None
    extra = tuple(sets) if adding else config.extra_sets
    if adding and set(extra) & set(STUDENT_SETS):
        raise ConfigError(
            f"the students' sets {', '.join(STUDENT_SETS)} cannot be added; they are always there"
        )
    students, meta = (None, {}) if adding else cached_students(config.students, config.device)
    models = _set_models(extra, config)
    store = open_store(store_path, "r+")
    try:
        recorded = store.attrs.get("feature_sets", {})
        want = store.attrs.get("models", {}).get("students", {}).get("sha256")
        if not adding and want and meta.get("sha256") != want:
            raise CheckpointError(
                f"students {config.students} have weights sha256 {meta.get('sha256')}, but store "
                f"{store_path} was created with {want}; the checkpoint changed during extraction"
            )
        for name in extra:
            have = _model_meta(name, config).get("sha256")
            want = recorded.get(name, {}).get("sha256")
            if want and have != want:
                raise CheckpointError(
                    f"feature set {name}: model weights sha256 {have} differ from {want} recorded in "
                    f"{store_path}; pass the same --teacher-* as when the set was created"
                )
        n = task.stop - task.start
        dtype = np.dtype(config.dtype)
        rows: dict[str, np.ndarray] = {}
        if not adding:
            rows = {name: np.zeros((n, students.num_features), dtype) for name in FEATURES}
            rows["valid"] = np.zeros(n, bool)
            rows["audio_valid"] = np.zeros(n, bool)
            rows["time_s"] = np.zeros(n, np.float64)
        for name in extra:
            for array, (shape, kind) in get_feature_set(name).arrays.items():
                rows[array] = np.zeros((n, *shape), dtype if kind == "store" else np.dtype(kind))
        before = {}
        if adding:
            record = store.task_record(task.start, task.stop) or {}
            before = {v["pos"]: v for v in (record.get("result") or {}).get("videos", [])}
            if not record or len(before) != len(task.videos):
                raise StoreError(
                    f"{store_path}: task rows [{task.start}, {task.stop}) is not finished; complete the "
                    "extraction (rerun `l2l extract CORPUS STORE`) before adding feature sets"
                )
        results = []
        for video in task.videos:
            lo = video.first_row - task.start
            if adding and before[video.pos]["status"] != "ok":
                results.append(VideoResult(**before[video.pos]))
                continue
            if fail and video.pos in fail and not adding:  # another piece of this video failed
                results.append(VideoResult(video.pos, video.video_id, "failed", fail[video.pos], False, 0))
                continue
            try:
                has_audio = _extract_video(video, rows, lo, students, config, models)
                results.append(VideoResult(video.pos, video.video_id, "ok", "", has_audio, video.steps))
            except MediaError as err:
                if adding:  # the store says ok: fill rows would be a silently wrong answer
                    raise StoreError(
                        f"{video.path} was extracted but now fails ({err.reason}); restore the file or "
                        "extract the corpus into a new store"
                    ) from err
                for arr in rows.values():
                    arr[lo : lo + video.steps] = 0  # a failed video leaves no partial rows behind
                results.append(VideoResult(video.pos, video.video_id, "failed", err.reason, False, 0))
        store.write_rows(task.start, task.stop, rows)
        result = TaskResult(
            index=task.index,
            start=task.start,
            stop=task.stop,
            videos=tuple(results),
            seconds=time.perf_counter() - t0,
            host=socket.gethostname(),
            pid=os.getpid(),
            torch_threads=threads,
        )
        if adding:
            store.record_arrays(task.start, task.stop, list(rows))
        else:
            store.mark_done(task.start, task.stop, result=result.to_dict())
    finally:
        store.close()
    return result


def _extract_video(
    video: TaskVideo,
    rows: dict[str, np.ndarray],
    lo: int,
    students: Any,
    config: ExtractConfig,
    models: dict[str, Any] | None = None,
) -> bool:
    """Fill rows ``[lo, lo + video.steps)`` of the task buffers; returns has_audio. Raises MediaError.

    A piece of a cut video (``video.offset``) decodes only its steps ``[offset, offset + steps)``.

    ``students`` ``None`` leaves the students' arrays and the row arrays alone (adding sets); ``models``
    maps each other feature set to fill to its model.
    """
    from pipeline.media import iter_step_batches, probe_video

    models = models or {}
    info = probe_video(video.path, timeout_s=config.probe_timeout_s)
    if info.num_steps != video.total:
        raise MediaError(
            video.path,
            f"has {info.num_steps} steps now but had {video.total} when the store was planned; "
            "the file changed, extract it into a new store",
        )
    # Steps starting after a shorter audio track ends have silence, not audio (t = 0 is the video start).
    audio_end_s = info.audio_start_s - info.start_s + info.audio_duration_s if info.has_audio else 0.0
    done = np.zeros(video.steps, bool)
    clips = any(get_feature_set(name).needs_clips for name in models)
    first, end = video.offset, video.offset + video.steps
    for batch in iter_step_batches(
        video.path,
        batch_steps=config.batch_steps,
        size=IMAGE_SIZE,
        info=info,
        with_clips=clips,
        start=first,
        stop=end,
    ):
        steps = np.asarray(batch.steps, dtype=np.int64) - first  # (B,) steps of this piece
        if steps.size == 0:
            continue
        if steps.min() < 0 or steps.max() >= video.steps:
            raise MediaError(
                video.path, f"decoder gave step {int(steps.max()) + first} outside steps [{first}, {end})"
            )
        at = lo + steps
        if students is not None:
            feats = students.embed(batch.frames, batch.audio)  # {name: (B, 512) float32}
            for name in FEATURES:
                rows[name][at] = feats[name]
            time_s = np.asarray(batch.time_s, dtype=np.float64)  # (B,) step starts
            rows["time_s"][at] = time_s
            rows["valid"][at] = True
            rows["audio_valid"][at] = bool(info.has_audio) & ((audio_end_s <= 0) | (time_s < audio_end_s))
        for name, model in models.items():
            out = get_feature_set(name).compute(model, batch.frames, batch.audio, batch.clips)
            for array, values in out.items():  # (B, *row shape) each
                rows[array][at] = values
        done[steps] = True
    if not done.all():
        raise MediaError(video.path, f"decoded {int(done.sum())} of {video.steps} steps")
    return bool(info.has_audio)


def _model_meta(name: str, config: ExtractConfig) -> dict[str, Any]:
    """What made feature set ``name`` for its ``feature_sets`` attrs: model spec, weights sha256."""
    fs = get_feature_set(name)
    if fs.model == "teacher":
        meta = cached_teacher(config.teacher, config.device)[1]
        return {
            "model": "teacher",
            "spec": config.teacher,
            "name": meta.get("name"),
            "sha256": meta.get("sha256"),
        }
    if fs.model == "students":
        meta = cached_students(config.students, config.device)[1]
        return {"model": "students", "spec": config.students, "sha256": meta.get("sha256")}
    if fs.model == "torchvision":
        meta = cached_image_model(name, config.weights_of(name), config.device)[1]
        return {
            "model": f"torchvision:{name}",
            "spec": config.weights_of(name),
            "name": name,
            "sha256": meta["sha256"],
            "input": "the step's 112x112 frame, ImageNet mean/std",
        }
    return {"model": "none", "spec": "decoded video", "sha256": None}


def feature_set_attrs(config: ExtractConfig, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The ``feature_sets`` attrs entries of ``names``: arrays with shape and dtype, and the model."""
    out = {}
    for name in names:
        fs = get_feature_set(name)
        arrays = list(fs.arrays)
        shapes = {
            a: {"shape": list(shape), "dtype": config.dtype if kind == "store" else kind}
            for a, (shape, kind) in fs.arrays.items()
        }
        out[name] = {"arrays": arrays, "shapes": shapes, **_model_meta(name, config)}
    return out


def finished_results(store: Any, plan: Plan) -> dict[int, TaskResult]:
    """Results of the plan's tasks that are marked done, by task index (from the markers' results)."""
    done = store.done_results()
    out = {}
    for task in plan.tasks:
        if (task.start, task.stop) not in done:
            continue
        try:
            result = TaskResult.from_dict(done[(task.start, task.stop)])
        except (ValueError, KeyError, TypeError):
            result = _result_from_index(task, plan)  # e.g. a marker written without a result
        if result is not None and [v.pos for v in result.videos] == [v.pos for v in task.videos]:
            out[task.index] = result
    return out


def _result_from_index(task: Task, plan: Plan) -> TaskResult | None:
    """A done task's result rebuilt from a finalised index; ``None`` when the index has it pending."""
    videos = []
    for v in task.videos:
        rec = plan.records[v.pos]
        if rec.status not in ("ok", "failed"):
            return None
        steps = v.steps if rec.status == "ok" else 0
        videos.append(VideoResult(v.pos, v.video_id, rec.status, rec.error, rec.has_audio, steps))
    return TaskResult(task.index, task.start, task.stop, tuple(videos))


# ---- driver ------------------------------------------------------------------------------------------


def corpus_digest(entries: Sequence[CorpusEntry]) -> str:
    """SHA-256 over the (video_id, path) pairs in order: the corpus identity a resume checks."""
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps([e.video_id, str(e.path)]).encode())
    return h.hexdigest()


def store_attrs(
    config: ExtractConfig,
    plan: Plan,
    meta: dict[str, Any],
    *,
    corpus: dict[str, Any],
    students: Any | None = None,
) -> dict[str, Any]:
    """The attrs written once when the store is created.

    ``gflops_per_step`` holds the measured cost of the students that ran (when given) and the paper
    teacher clip's, so ``l2l evaluate`` reports the cost of this store's models.
    """
    import torch

    from indexing import frontend
    from indexing.flops import students_gflops

    gflops = {"teacher_clip": _teacher_gflops(config.teacher)}
    if students is not None:
        gflops |= students_gflops(students)

    student_attrs = {
        "spec": config.students,
        "random": bool(meta.get("random")),
        "sha256": meta.get("sha256"),  # of the weights, independent of the file layout
        "preset": meta.get("preset"),
        "models": meta.get("models"),
        "epoch": meta.get("epoch"),
        "classes": meta.get("classes"),
    }
    if meta.get("path"):
        from indexing.checkpoint import sha256_file

        student_attrs["file_sha256"] = sha256_file(meta["path"])
    return {
        "step_s": STEP_S,
        "image": {"size": IMAGE_SIZE, "frame": "the frame on screen at the step start"},
        "audio": {
            "sample_rate": SAMPLE_RATE,
            "seconds": AUDIO_S,
            "channels": 1,
            "window": "hann",
            "win_length": frontend.N_FFT,
            "n_fft": frontend.N_FFT,
            "hop_length": frontend.HOP,
            "n_mels": frontend.N_MELS,
            "log_mel_shape": [1, frontend.MEL_FRAMES, frontend.N_MELS],
        },
        "models": {"students": student_attrs},
        "feature_sets": feature_set_attrs(config, config.features),
        "gflops_per_step": gflops,
        "extraction": config.to_dict(),
        "plan": plan.summary(),
        "corpus": corpus,
        "software": {"torch": torch.__version__, "l2l": _l2l_version()},
        "created_unix": time.time(),
    }


def _teacher_gflops(teacher: str) -> float:
    """GFLOPs of one clip of the teacher that makes this store's ``teacher`` set (a ``preset:NAME`` teacher
    costs its preset's; state dict files are torchvision's r2plus1d_18, the paper's)."""
    from indexing.flops import measured_gflops

    preset = teacher.split(":", 1)[1] if teacher.startswith("preset:") else "paper"
    return measured_gflops(preset)["teacher_clip"]


def _l2l_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("listen-to-look")
    except PackageNotFoundError:
        return "unknown"


def _check_resume(
    attrs: dict[str, Any], config: ExtractConfig, meta: dict[str, Any], digest: str, path
) -> None:
    fix = "extract into a new store path (or delete this store to start over)"
    old = attrs.get("extraction")
    if not isinstance(old, dict):
        raise ConfigError(
            f"{path} was not written by `l2l extract` (no extraction config in its attrs); {fix}"
        )
    now = config.to_dict()
    diffs = [
        f"{k}: store {old.get(k, _CONFIG_DEFAULTS.get(k))!r}, now {now[k]!r}"
        for k in _RESUME_KEYS + tuple(_CONFIG_DEFAULTS)
        if old.get(k, _CONFIG_DEFAULTS.get(k)) != now[k]
    ]
    old_sha = attrs.get("models", {}).get("students", {}).get("sha256")
    if old_sha != meta.get("sha256"):
        old_spec = attrs.get("models", {}).get("students", {}).get("spec")
        diffs.append(
            f"students: store {old_spec!r} (sha256 {str(old_sha)[:12]}), now {config.students!r} "
            f"(sha256 {str(meta.get('sha256'))[:12]})"
        )
    if attrs.get("corpus", {}).get("digest") != digest:
        diffs.append(
            f"corpus: store has {attrs.get('corpus', {}).get('videos')} videos from "
            f"{attrs.get('corpus', {}).get('spec')!r}, this corpus differs"
        )
    if diffs:
        raise ConfigError(f"{path} was extracted with a different configuration ({'; '.join(diffs)}); {fix}")


def run_extraction(
    corpus: str | Path | Sequence[CorpusEntry],
    store_path: str | Path,
    config: ExtractConfig,
    *,
    client: Client | None = None,
    resume: bool | None = None,
    max_tasks: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> ExtractReport:
    """Extract a corpus into a store, or complete an existing store of the same corpus and config.

    Args:
        corpus: A corpus spec for :func:`pipeline.corpus.read_corpus`, or its entries.
        store_path: The store directory. If it holds a store, the run resumes it.
        config: The extraction config.
        client: A Dask client to run probe and extract tasks on; ``None`` runs them here, serially.
        resume: ``True`` requires an existing store, ``False`` requires none, ``None`` accepts either.
        max_tasks: Run at most this many unfinished tasks, then finalise and stop (a time-boxed job; a
            later run continues). ``None`` runs them all.
        progress: Show tqdm bars on stderr.
        log: Where to print status lines (default: stderr).
        workers: Tasks the cluster runs at once, for planning a new store (fewer tasks than this cut
            videos so that every worker gets work, see :mod:`pipeline.plan`); ``None``: the client's
            worker threads, 1 without a client. A resume keeps the store's recorded plan.

    Returns:
        The report. ``report.complete`` is false when tasks remain (errors or ``max_tasks``).

    Raises:
        ConfigError: Bad corpus, a store locked by another writer, a store made with another config or
            corpus, or ``resume`` contradicting what is at ``store_path``.
    """
    from pipeline.corpus import read_corpus

    log = log or (lambda line: print(line, file=sys.stderr))
    t0 = time.perf_counter()
    store_path = Path(store_path)
    entries = read_corpus(corpus, log=log) if isinstance(corpus, (str, Path)) else list(corpus)
    digest = corpus_digest(entries)
    exists = store_path.exists() and (not store_path.is_dir() or any(store_path.iterdir()))
    if resume is True and not exists:
        raise ConfigError(
            f"--resume: there is no store at {store_path} to resume; drop --resume to create it"
        )
    if resume is False and exists:
        raise ConfigError(f"{store_path} already exists; resume it or choose a new store path")
    students, meta = cached_students(config.students, config.device)  # the serial path reuses this load
    if config.extra_sets and get_store(config.store).add_arrays is FeatureStore.add_arrays:
        raise ConfigError(
            f"{config.store} stores hold the students' image/audio/fused only; use --format zarr for "
            f"--features {','.join(config.extra_sets)}"
        )
    if meta.get("random"):
        log(
            f"l2l: WARNING: students {config.students} are RANDOM weights; "
            "features are for pipeline tests only"
        )

    if not exists:
        records = probe_corpus(entries, config, client=client, progress=progress)
        workers = cluster_slots(client) if workers is None else workers
        plan = plan_extraction(
            records, chunk_rows=config.chunk_rows, task_steps=config.task_steps, workers=workers
        )
        if plan.version > 1:
            log(
                f"l2l: {len(plan.tasks)} tasks for {workers} workers "
                f"({plan.split_videos} video(s) cut at task boundaries)"
            )
        corpus_attrs = {
            "spec": str(corpus) if isinstance(corpus, (str, Path)) else "",
            "videos": len(entries),
            "digest": digest,
        }
        attrs = store_attrs(config, plan, meta, corpus=corpus_attrs, students=students)
        try:
            store = get_store(config.store).create(
                store_path,
                index=list(plan.records),
                rows=plan.rows,
                chunk_rows=config.chunk_rows,
                dim=students.num_features,  # the students say how wide their features are
                dtype=config.dtype,
                attrs=attrs,
                tasks=[(t.start, t.stop) for t in plan.tasks],
                compression=config.compression,
            )
        except ValueError as err:
            if not store_path.exists():
                raise
            try:  # another run created it meanwhile: its lock and attrs decide below
                store = open_store(store_path, "r+")
            except ValueError:
                raise err from None
            resumed = True
        else:
            resumed = False
    else:
        try:
            fmt = store_format(store_path)
        except ValueError:
            raise ConfigError(
                f"{store_path} exists and is not a feature store; choose a new store path"
            ) from None
        if fmt != config.store:
            raise ConfigError(
                f"{store_path} is a {fmt} store but --format {config.store} was asked; extract into a new "
                "store path or pass --format " + fmt
            )
        store = open_store(store_path, "r+")
        resumed = True

    with store, store.lock():
        if resumed:
            _check_resume(store.attrs, config, meta, digest, store_path)
            records = store.videos()
            recorded = store.attrs.get("plan", {})
            plan = replan(records, recorded, chunk_rows=config.chunk_rows, task_steps=config.task_steps)
            if plan.digest() != store.attrs.get("plan", {}).get("digest"):
                raise StoreError(
                    f"{store_path}: its index no longer gives the plan it was created with "
                    f"(digest mismatch); the index is damaged: run `l2l store repair {store_path}`"
                )
        if config.extra_sets:  # on creation, and again on a resume of a run killed before they existed
            store.add_arrays(_set_array_names(config.extra_sets), {})
        done = finished_results(store, plan)
        pending = [t for t in plan.tasks if t.index not in done]
        if resumed:
            log(
                f"l2l: resuming {store_path}: {len(done)} of {len(plan.tasks)} tasks done, "
                f"{len(pending)} to run"
            )
        todo = pending if max_tasks is None else pending[:max_tasks]
        t_tasks = time.perf_counter()
        fail = _failed_pieces(plan, done)
        new, errors = _run_tasks(todo, store_path, config, client=client, progress=progress, fail=fail)
        done.update(new)
        errors += _settle_cut_videos(plan, done, store_path, config, client=client, log=log)
        t_tasks = time.perf_counter() - t_tasks
        report = _finalise(store, plan, done, errors, config)
    report.resumed = resumed
    report.tasks_run = len(new)
    report.tasks_skipped = len(plan.tasks) - len(pending)
    report.steps_run = sum(r.steps for r in new.values())
    report.seconds = time.perf_counter() - t0
    report.task_seconds = t_tasks
    report.students_random = bool(meta.get("random"))
    return report


def add_features(
    store_path: str | Path,
    sets: str | Sequence[str],
    *,
    teacher: str = "",
    model_weights: Sequence[str] = (),
    client: Client | None = None,
    max_tasks: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> ExtractReport:
    """Add feature sets to a finished store over the same rows, by the same tasks (``--add-features``).

    Each of the store's planned tasks decodes its videos again and computes only the new sets' arrays,
    writes them, then adds their files to the task's done marker (so reads, ``store check`` and ``store
    repair`` cover them). A task whose marker already lists them is skipped: a rerun resumes, a retried
    task rewrites its own rows. Rows of a task not yet covered raise on read, never read as zeros.

    Args:
        store_path: A finished format-2 zarr store written by ``l2l extract``.
        sets: Feature set names (``"teacher"``, ``"inputs,teacher"``); not the students' three.
        teacher: The teacher spec (state dict file or ``preset:NAME``) when ``teacher`` is among ``sets``.
        model_weights: ``NAME=PATH`` for each torchvision image-model set among ``sets``.
        client: A Dask client (``None``: serially, here).
        max_tasks: Run at most this many tasks, then stop (a later run continues).
        progress: Show a progress bar on stderr.
        log: Where to print status lines (default: stderr).

    Returns:
        The report (``tasks_run``, ``tasks_skipped``, ``tasks_left``; ``complete`` once all tasks have them).

    Raises:
        ConfigError: Unknown or students' sets, a missing teacher, a backend that cannot add arrays, or a
            store not written by ``l2l extract``.
        StoreError: The store's extraction is unfinished, its index is damaged, or it is locked.
        CheckpointError: The teacher differs from the one that made the set's rows already in the store.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    t0 = time.perf_counter()
    store_path = Path(store_path)
    sets = parse_feature_sets(sets)
    if set(sets) & set(STUDENT_SETS):
        raise ConfigError(
            f"--add-features {','.join(sets)}: the students' {','.join(STUDENT_SETS)} are in every store "
            "already; add other sets (e.g. teacher, inputs)"
        )
    store = open_store(store_path, "r+")
    with store, store.lock():
        old = store.attrs.get("extraction")
        if not isinstance(old, dict):
            raise ConfigError(f"{store_path} was not written by `l2l extract`; only its stores can grow sets")
        if not store.verified:
            raise ConfigError(
                f"{store_path} is a format-1 store without write records; rewrite it with `l2l store export` "
                "first, then add feature sets to the new store"
            )
        base = ExtractConfig.from_dict(old)
        features = parse_feature_sets(base.features + sets)
        config = replace(
            base,
            features=features,
            teacher=teacher or base.teacher,
            model_weights=tuple(base.model_weights) + tuple(model_weights),
        )
        if "teacher" in sets and not teacher:
            raise ConfigError("--add-features teacher needs --teacher-weights PATH or --teacher-preset NAME")
        recorded = store.attrs.get("plan", {})
        plan = replan(store.videos(), recorded, chunk_rows=base.chunk_rows, task_steps=base.task_steps)
        if plan.digest() != store.attrs.get("plan", {}).get("digest"):
            raise StoreError(
                f"{store_path}: its index no longer gives the plan it was created with (digest mismatch); "
                f"run `l2l store repair {store_path}`"
            )
        done = finished_results(store, plan)
        if len(done) < len(plan.tasks):
            raise StoreError(
                f"{store_path}: {len(plan.tasks) - len(done)} of {len(plan.tasks)} tasks are unfinished; "
                "complete the extraction (rerun `l2l extract CORPUS STORE`) before adding feature sets"
            )
        arrays = _set_array_names(sets)
        sets_attrs = dict(store.attrs.get("feature_sets") or store.feature_sets())
        sets_attrs.update(feature_set_attrs(config, [s for s in sets if s not in sets_attrs]))
        more: dict[str, Any] = {"feature_sets": sets_attrs, "extraction": config.to_dict()}
        if "teacher" in sets:  # what recognising a step with the stored teacher set costs (l2l evaluate)
            more["gflops_per_step"] = {
                **store.attrs.get("gflops_per_step", {}),
                "teacher_clip": _teacher_gflops(teacher),
            }
        store.add_arrays(arrays, more)

        def has_sets(t: Task) -> bool:
            files = (store.task_record(t.start, t.stop) or {}).get("files") or {}
            return all(p in files for a in arrays for p in store.files_of(a, t.start, t.stop))

        pending = [t for t in plan.tasks if not has_sets(t)]
        log(f"l2l: adding {','.join(sets)} to {store_path}: {len(pending)} of {len(plan.tasks)} tasks to run")
        todo = pending if max_tasks is None else pending[:max_tasks]
        t_tasks = time.perf_counter()
        new, errors = _run_tasks(todo, store_path, config, client=client, progress=progress, sets=sets)
        t_tasks = time.perf_counter() - t_tasks
        records = store.videos()
    left = len(pending) - len(new)
    failed = [
        {"video_id": r.video_id, "path": r.path, "reason": r.error} for r in records if r.status == "failed"
    ]
    return ExtractReport(
        store=str(store_path),
        format=store.name,
        videos=len(records),
        ok=sum(r.status == "ok" for r in records),
        failed=failed,
        pending=sum(r.status == "pending" for r in records),
        steps=sum(r.steps for r in records if r.status == "ok"),
        rows=plan.rows,
        tasks=len(plan.tasks),
        tasks_run=len(new),
        tasks_skipped=len(plan.tasks) - len(pending),
        tasks_left=left,
        task_errors=errors,
        steps_run=sum(r.steps for r in new.values()),
        seconds=time.perf_counter() - t0,
        task_seconds=t_tasks,
        resumed=True,
        complete=left == 0,
    )


def _set_array_names(sets: Sequence[str]) -> list[str]:
    return [array for name in sets for array in get_feature_set(name).arrays]


def _run_tasks(
    tasks: Sequence[Task],
    store_path: Path,
    config: ExtractConfig,
    *,
    client: Client | None,
    progress: bool,
    sets: Sequence[str] | None = None,
    fail: dict[int, str] | None = None,
) -> tuple[dict[int, TaskResult], list[dict[str, str]]]:
    """Run tasks serially or on Dask (``sets``, ``fail``: see :func:`extract_task`); returns
    results by task index and the tasks that failed."""
    from tqdm import tqdm

    results: dict[int, TaskResult] = {}
    errors: list[dict[str, str]] = []
    videos_total = sum(len(t.videos) for t in tasks)
    bar = tqdm(
        total=sum(t.steps for t in tasks),
        desc="extract",
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    videos_done = 0

    def finished(task: Task, result: TaskResult | None, err: BaseException | None) -> None:
        nonlocal videos_done
        if result is not None:
            results[task.index] = result
        else:
            errors.append(
                {"task": task.key, "rows": f"[{task.start}, {task.stop})", "reason": _describe(err)}
            )
        videos_done += len(task.videos)
        bar.set_postfix_str(f"videos {videos_done}/{videos_total}", refresh=False)
        bar.update(task.steps)

    with bar:
        if client is None:
            for task in tasks:
                try:
                    result = extract_task(task, store_path=store_path, config=config, sets=sets, fail=fail)
                    finished(task, result, None)
                except Exception as err:  # the executor's job: record it, go on, leave the task for a resume
                    finished(task, None, err)
        else:
            from distributed import as_completed

            run = uuid.uuid4().hex[:8]
            futures = client.map(
                extract_task,
                tasks,
                key=[f"{t.key}-{run}" for t in tasks],
                store_path=str(store_path),
                config=config,
                sets=sets,
                fail=fail,
                retries=config.retries,
                pure=False,
            )
            by_key = {f.key: t for f, t in zip(futures, tasks, strict=True)}
            for fut in as_completed(futures):
                task = by_key[fut.key]
                # result() rather than a look at fut.status: a finished task whose worker dies before its
                # result is gathered goes back to pending and is recomputed, and result() waits for that
                # (the status alone read as a failure without an error, then 'finished': a race seen after
                # a worker kill). A task that failed, or was cancelled, raises here and is recorded.
                try:
                    result = fut.result()
                except Exception as err:  # noqa: BLE001 - recorded; the task is left for a resume
                    finished(task, None, err)
                else:
                    finished(task, result, None)
                fut.release()
    return results, errors


def cluster_slots(client: Client | None) -> int:
    """Tasks a client's cluster runs at once (its workers' threads; 1 without a client)."""
    if client is None:
        return 1
    return max(1, sum(client.nthreads().values()))


def _failed_pieces(plan: Plan, done: dict[int, TaskResult]) -> dict[int, str]:
    """Videos cut over several tasks of which a finished task recorded a failed piece: position -> reason."""
    cut = {v.pos for t in plan.tasks for v in t.videos if v.is_piece}
    out: dict[int, str] = {}
    for index in sorted(done):
        for v in done[index].videos:
            if v.pos in cut and v.status == "failed":
                out.setdefault(v.pos, v.error)
    return out


def _settle_cut_videos(
    plan: Plan,
    done: dict[int, TaskResult],
    store_path: Path,
    config: ExtractConfig,
    *,
    client: Client | None,
    log: Callable[[str], None],
) -> list[dict[str, str]]:
    """Rerun finished tasks holding an ok piece of a cut video another piece of which failed, so that it is
    recorded failed there too (fill rows, the same reason): a video is failed as a whole, never half ok.
    Updates ``done``; returns the reruns that failed (those tasks keep their marker; `store check` finds
    the disagreement and `store repair` reruns them)."""
    errors: list[dict[str, str]] = []
    while True:
        fail = _failed_pieces(plan, done)
        todo = [
            plan.tasks[i]
            for i in sorted(done)
            if any(v.pos in fail and v.status == "ok" for v in done[i].videos)
        ]
        if not todo:
            return errors
        log(f"l2l: {len(fail)} cut video(s) failed in one piece; rewriting {len(todo)} task(s) with the rest")
        new, errs = _run_tasks(todo, store_path, config, client=client, progress=False, fail=fail)
        done.update(new)
        errors += errs
        if errs:
            return errors


def _describe(err: BaseException | None) -> str:
    return f"{type(err).__name__}: {err}" if err is not None else "unknown error"


def _finalise(
    store: Any, plan: Plan, done: dict[int, TaskResult], errors: list[dict[str, str]], config: ExtractConfig
) -> ExtractReport:
    """Write every video's status into the index (once per run) and build the report."""
    records = list(plan.records)
    failed_pieces: dict[int, str] = {}
    for result in done.values():
        for v in result.videos:
            rec = records[v.pos]
            has_audio = v.has_audio if v.status == "ok" else rec.has_audio  # a failed video keeps the probe's
            records[v.pos] = replace(rec, status=v.status, error=v.error, has_audio=has_audio)
            if v.status == "failed":
                failed_pieces.setdefault(v.pos, v.error)
    for pos, reason in failed_pieces.items():  # a video cut over tasks fails as a whole, with one reason
        probed = plan.records[pos].has_audio
        records[pos] = replace(records[pos], status="failed", error=reason, has_audio=probed)
    for task in plan.tasks:
        if task.index not in done:
            for v in task.videos:
                records[v.pos] = replace(records[v.pos], status="pending", error="")
    store.set_index(records)
    failed = [
        {"video_id": r.video_id, "path": r.path, "reason": r.error} for r in records if r.status == "failed"
    ]
    return ExtractReport(
        store=str(store.path),
        format=config.store,
        videos=len(records),
        ok=sum(r.status == "ok" for r in records),
        failed=failed,
        pending=sum(r.status == "pending" for r in records),
        steps=sum(r.steps for r in done.values()),
        rows=plan.rows,
        tasks=len(plan.tasks),
        tasks_left=len(plan.tasks) - len(done),
        task_errors=errors,
        complete=len(done) == len(plan.tasks),
    )


# ---- repair ------------------------------------------------------------------------------------------


@dataclass
class RepairReport:
    """What :func:`repair_store` found and did; ``to_json`` is the CLI's ``--json`` output.

    Attributes:
        store: The store path.
        found: The problems the full check found before repairing (``Problem.to_dict()`` each).
        tasks_rerun: Row ranges of the tasks re-extracted.
        removed: Files deleted (extra files, leftovers of killed writes, a stale lock).
        index_rebuilt: Whether the index was rewritten (always, when anything was repaired).
        failed: Videos that failed while re-extracting (e.g. their source is gone), with the reason.
        task_errors: Tasks that could not be rerun (they stay unfinished).
        remaining: Problems the check still finds afterwards (empty when the repair worked).
    """

    store: str
    found: list[dict[str, Any]] = field(default_factory=list)
    tasks_rerun: list[list[int]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    index_rebuilt: bool = False
    failed: list[dict[str, str]] = field(default_factory=list)
    task_errors: list[dict[str, str]] = field(default_factory=list)
    remaining: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` form, in the CLI's vocabulary: ``failed`` counts, ``failures`` lists."""
        doc = asdict(self)
        doc["failures"] = doc.pop("failed")
        doc["failed"] = len(self.failed)
        return doc

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for p in self.found:
            kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
        found = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "nothing"
        lines = [
            f"store     {self.store}",
            f"found     {found}",
            f"repaired  {len(self.tasks_rerun)} task(s) re-extracted, {len(self.removed)} file(s) removed"
            + (", index rewritten" if self.index_rebuilt else ""),
        ]
        for f in self.failed:
            lines.append(f"failed    {f['video_id']}  {f['path']}  {f['reason']}")
        lines.append(
            f"check     {'ok' if not self.remaining else f'{len(self.remaining)} problem(s) remain'}"
        )
        return "\n".join(lines)


def repair_store(
    store_path: str | Path,
    *,
    client: Client | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> RepairReport:
    """Find every problem of a store (the full ``l2l store check``) and repair it in place.

    Exactly the damaged tasks are marked unfinished and re-extracted from their source videos with the
    students and extraction config recorded in the store (bitwise the rows an undamaged run wrote); extra
    files and leftovers of killed writes are deleted; a stale lock is taken over; the index is rewritten
    from the planned index kept in the store plus every task's done marker. A video whose source is gone
    becomes ``failed`` with that reason.

    Args:
        store_path: The store.
        client: A Dask client to rerun tasks on (``None``: serially, here).
        progress: Show progress bars on stderr.
        log: Where to print status lines (default: stderr).

    Returns:
        The report; ``report.remaining`` lists what the check still finds afterwards.

    Raises:
        StoreError: The store is not one ``l2l extract`` wrote with write records (format 1: export it
            first), it is locked by a live writer, or its kept plan is damaged too.
        ConfigError: The recorded students cannot be loaded.
    """
    from indexing.stores import columns_to_records
    from indexing.stores.tools import REPAIRED_BY_TASK, check_store

    log = log or (lambda line: print(line, file=sys.stderr))
    store_path = Path(store_path)
    found = check_store(store_path, progress=progress)
    report = RepairReport(store=str(store_path), found=[p.to_dict() for p in found])
    if not found:
        return report
    if found[0].kind == "unreadable_store":
        raise StoreError(f"{found[0].message}; a store that cannot be opened cannot be repaired")
    store = open_store(store_path, "r+")
    with store:
        if not store.verified:
            raise StoreError(
                f"{store_path} is a format-1 store without write records; rewrite it with `l2l store export "
                f"{store_path} NEW --format {store.name}` (which needs readable rows) and repair that"
            )
        old = store.attrs.get("extraction")
        if not isinstance(old, dict):
            raise StoreError(
                f"{store_path} was not written by `l2l extract`; only its tasks can be re-extracted"
            )
        config = ExtractConfig.from_dict(old)
        planned = store.planned_index()
        if planned is None:
            raise StoreError(f"{store_path}: the planned index is missing, so its tasks cannot be rebuilt")
        plan = replan(
            columns_to_records(planned),
            store.attrs.get("plan", {}),
            chunk_rows=config.chunk_rows,
            task_steps=config.task_steps,
        )
        if plan.digest() != store.attrs.get("plan", {}).get("digest"):
            raise StoreError(f"{store_path}: the kept planned index does not give the store's plan (digest)")
        with store.lock():  # a stale lock (dead writer on this host) is taken over here
            if any(p.kind == "stale_lock" for p in found):
                report.removed.append(str(store_path / "write.lock"))
            planned_ranges = {(t.start, t.stop) for t in plan.tasks}
            damaged = {tuple(p.task) for p in found if p.kind in REPAIRED_BY_TASK and p.task}
            for p in found:
                if p.kind == "marker" and p.task and tuple(p.task) not in planned_ranges:
                    store.unmark_done(*p.task)
                if p.kind == "extra" and p.array:
                    (store_path / p.array).unlink(missing_ok=True)
                    report.removed.append(p.array)
            report.removed += _remove_leftovers(store_path)
            todo = [t for t in plan.tasks if (t.start, t.stop) in damaged]
            for t in todo:
                store.unmark_done(t.start, t.stop)
                for name in store.array_names():  # a clean slate: no damaged file is read back or kept
                    for path in store.files_of(name, t.start, t.stop):
                        (store_path / path).unlink(missing_ok=True)
            log(f"l2l: repairing {store_path}: re-extracting {len(todo)} task(s)")
            fail = _failed_pieces(plan, finished_results(store, plan))
            new, errors = _run_tasks(todo, store_path, config, client=client, progress=progress, fail=fail)
            report.tasks_rerun = [[t.start, t.stop] for t in todo if t.index in new]
            done = finished_results(store, plan)
            errors += _settle_cut_videos(plan, done, store_path, config, client=client, log=log)
            report.task_errors = errors
            final = _finalise(store, plan, done, errors, config)
            report.index_rebuilt = True
        rerun_ids = {v.video_id for t in todo for v in t.videos}
        report.failed = [f for f in final.failed if f["video_id"] in rerun_ids]
    report.remaining = [p.to_dict() for p in check_store(store_path, progress=progress)]
    return report


def _remove_leftovers(store_path: Path) -> list[str]:
    """Delete temporary files of writes killed before their rename (zarr's ``*.partial``, our ``.tmp-``)."""
    removed = []
    for root, _, files in os.walk(store_path):
        for name in files:
            if name.endswith(".partial") or ".tmp-" in name:
                path = Path(root) / name
                path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(store_path)))
    return removed

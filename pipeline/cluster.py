"""Where extraction runs: one validated :class:`ClusterConfig`, one :func:`open_client` context manager.

Cluster kinds are small classes registered by name (``available_clusters()`` feeds ``--cluster``):

- ``local``: start a ``LocalCluster`` of worker *processes* on this machine and stop it on exit.
- ``scheduler``: connect to a running scheduler by address (``tcp://host:8786`` / ``tls://...``).
- ``scheduler-file``: connect through a scheduler file (``dask scheduler --scheduler-file``), the
  batch-script pattern in ``cluster/slurm`` and ``cluster/pbs``.
- ``slurm`` / ``pbs``: build a dask-jobqueue ``SLURMCluster`` / ``PBSCluster`` from a config file
  (``cluster/jobqueue.yaml``), submit jobs for the workers, cancel them on exit.

Threads: every worker runs ``threads_per_worker`` Dask threads (default 1) and each task uses
``torch_threads`` intra-op threads. The BLAS/OpenMP variables are set before a local worker process
is spawned, and the ``TorchThreadsPlugin`` worker plugin sets them (and torch's default) in every
worker of every kind, including workers that join later or restart after their ``lifetime``. torch
keeps a per-OS-thread count once a thread has used it, so tasks call :func:`pin_torch_threads` first.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from indexing.errors import ClusterError, ConfigError
from indexing.options import cli_field

if TYPE_CHECKING:  # distributed is imported lazily so that ``l2l --help`` stays instant
    from distributed import Client
    from distributed.security import Security

logger = logging.getLogger(__name__)

# Dask's Nanny exports MALLOC_TRIM_THRESHOLD_=65536 to its workers. An explicit trim threshold also
# freezes glibc's mmap threshold at 128 KiB, so every activation tensor is mmapped and unmapped and
# page-faulted afresh: measured, the students run 35% slower (21-28 vs 33-40 steps/s, paper preset,
# 1 thread, same worker otherwise). Local workers start without it; see cluster/README.md for others.
KEEP_UNSET = ("MALLOC_TRIM_THRESHOLD_",)
# Thread-pool variables read once by OpenMP (torch), MKL, OpenBLAS and numexpr when they load.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)

# ----------------------------------------------------------------------------------------------
# Torch threads
# ----------------------------------------------------------------------------------------------


def pin_torch_threads(n: int | None = None) -> int:
    """Pin torch's intra-op threads for the calling thread, and the default for threads to come.

    torch (OpenMP) fixes a thread's count the first time that thread uses torch, so a worker thread
    that already ran a task keeps its count; every extraction task therefore calls this first (it is
    idempotent and cheap). The ``TorchThreadsPlugin`` calls it when each worker starts, which sets
    ``OMP_NUM_THREADS`` for the tasks' ``pin_torch_threads()`` to read.

    Args:
        n: Threads; ``None`` reads ``OMP_NUM_THREADS`` (which ``open_client`` sets on local workers
            and the batch scripts export), else 1.

    Returns:
        The thread count torch now uses (``n`` when torch is not installed).

    Raises:
        ValueError: ``n`` (or ``OMP_NUM_THREADS``) is not a positive integer.
    """
    if n is None:
        raw = os.environ.get("OMP_NUM_THREADS", "1") or "1"
        try:
            n = int(raw)
        except ValueError:
            raise ConfigError(f"OMP_NUM_THREADS={raw!r} is not an integer; export a thread count") from None
    if n < 1:
        raise ConfigError(f"torch threads must be >= 1, got {n}")
    # Already-loaded pools ignore these; they reach subprocesses (decoders) and late-loaded libraries.
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(n)
    try:
        import torch
    except ImportError:
        return n
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)  # process-wide: the task threads of this worker see it too
    return torch.get_num_threads()


def torch_threads_plugin(n: int | None) -> Any:
    """A ``TorchThreadsPlugin``: a worker plugin that calls :func:`pin_torch_threads` on worker start.

    The scheduler keeps registered plugins and runs them on workers that join or restart later.

    Args:
        n: Threads per worker; ``None`` lets each worker read its own ``OMP_NUM_THREADS``.
    """
    return _plugin_class()(n)


def _plugin_class() -> type:
    """Define ``TorchThreadsPlugin`` on first use: its base class would import all of distributed."""
    cls = globals().get("TorchThreadsPlugin")
    if cls is None:
        from distributed.diagnostics.plugin import WorkerPlugin

        class TorchThreadsPlugin(WorkerPlugin):
            name = "l2l-torch-threads"  # one per cluster: registering again replaces it

            def __init__(self, n: int | None):
                self.n = n

            def setup(self, worker: Any) -> None:
                pin_torch_threads(self.n)

        # Pickled by reference as pipeline.cluster.TorchThreadsPlugin; workers rebuild it the same way.
        TorchThreadsPlugin.__qualname__ = "TorchThreadsPlugin"
        globals()["TorchThreadsPlugin"] = cls = TorchThreadsPlugin
    return cls


def __getattr__(name: str) -> Any:  # PEP 562: unpickling on a worker looks the class up here
    if name == "TorchThreadsPlugin":
        return _plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how Dask runs; validated on creation, recorded with the outputs.

    Attributes:
        kind: One of :func:`available_clusters`. ``None`` infers it: ``scheduler`` when
            ``scheduler_address`` is set, ``scheduler-file`` when ``scheduler_file`` is, else ``local``.
        workers: Worker processes. local: default ``cpus // (threads_per_worker * torch_threads)``;
            slurm/pbs: worker processes to request (default: one job's ``processes``).
        threads_per_worker: Dask threads (concurrent tasks) per worker process; local only, default 1.
            On slurm/pbs it is ``cores / processes`` of the jobqueue config.
        torch_threads: torch intra-op threads per task. local: default ``cpus // workers`` (at least
            1); other kinds: default each worker's ``OMP_NUM_THREADS`` (else 1).
        memory_limit: Memory per local worker (``"6GiB"``, ``"auto"`` = RAM / workers). On slurm/pbs
            it is ``memory / processes`` of the jobqueue config.
        scheduler_address: Running scheduler to connect to (kind ``scheduler``).
        scheduler_file: Scheduler file to connect through (kind ``scheduler-file``).
        jobqueue_config: dask-jobqueue YAML (kinds ``slurm``/``pbs``); ``None`` uses the user's dask
            config (``~/.config/dask/jobqueue.yaml``).
        tls_ca_file, tls_cert, tls_key: PEM files; all three or none. With them every connection is
            TLS and encryption is required; without them the dask config (``distributed.comm.tls``)
            applies.
        dashboard_address: Dashboard of a scheduler this command starts (local, slurm, pbs);
            ``None`` disables it. A scheduler we connect to keeps its own (its link is logged).
        lifetime: Restart each worker this long after it starts (``"1h"``) to return memory leaked by
            decoders; ``None`` keeps workers forever. local, slurm and pbs only.
        lifetime_stagger: Random +/- spread of ``lifetime`` so workers do not restart together.
        lifetime_restart: Restart the worker when its lifetime ends (else it just exits).
        connect_timeout_s: How long to wait for a scheduler (and a scheduler file to appear).

    Raises:
        ValueError: Unknown kind, a bad value, or options that contradict the kind; the message names
            the flag and the fix.
    """

    kind: str | None = cli_field(
        flag="--cluster", choices=lambda: available_clusters(), help="Cluster kind.  [default: inferred]"
    )
    workers: int | None = cli_field(
        flag="--workers",
        type=int,
        help="Worker processes; extract: 0 runs serially.  [default: all cores; slurm/pbs: one job's]",
    )
    threads_per_worker: int | None = cli_field(
        flag="--threads-per-worker",
        type=int,
        help="Dask threads (concurrent tasks) per local worker.  [default: 1]",
    )
    # The command's --threads (not a cluster option: shared with the extraction config).
    torch_threads: int | None = field(default=None, metadata={"shown_as": "--threads"})
    memory_limit: str | None = cli_field(
        flag="--memory-limit", help="Memory per local worker, e.g. 6GiB.  [default: auto: RAM / workers]"
    )
    scheduler_address: str | None = cli_field(
        flag="--scheduler", help="Use a running Dask scheduler at this address."
    )
    scheduler_file: str | None = cli_field(
        flag="--scheduler-file", type=click.Path(dir_okay=False), help="Use the scheduler in this file."
    )
    jobqueue_config: str | None = cli_field(
        flag="--cluster-config", type=click.Path(dir_okay=False), help="dask-jobqueue YAML (slurm/pbs)."
    )
    tls_ca_file: str | None = cli_field(
        flag="--tls-ca-file",
        type=click.Path(dir_okay=False),
        help="TLS: CA certificate (PEM); with --tls-cert/--tls-key.",
    )
    tls_cert: str | None = cli_field(
        flag="--tls-cert",
        type=click.Path(dir_okay=False),
        help="TLS: certificate of this client and its workers (PEM).",
    )
    tls_key: str | None = cli_field(
        flag="--tls-key", type=click.Path(dir_okay=False), help="TLS: private key (PEM)."
    )
    dashboard_address: str | None = cli_field(
        ":8787",
        flag="--dashboard-address",
        help="Dashboard of a scheduler started here (none: off).",
    )
    lifetime: str | None = cli_field(
        flag="--worker-lifetime", help="Restart each worker after this long, e.g. 1h.  [default: never]"
    )
    lifetime_stagger: str | None = cli_field(
        flag="--worker-lifetime-stagger", help="Random +/- spread of --worker-lifetime, e.g. 5m."
    )
    lifetime_restart: bool = cli_field(
        True,
        flag="--worker-lifetime-restart/--no-worker-lifetime-restart",
        help="Restart a worker whose lifetime ended, or let it exit.",
    )
    connect_timeout_s: float = cli_field(
        60.0, flag="--connect-timeout-s", type=float, help="Seconds to wait for a scheduler."
    )

    def __post_init__(self) -> None:
        kind = self.kind
        if kind is None:
            if self.scheduler_address:
                kind = "scheduler"
            else:
                kind = "scheduler-file" if self.scheduler_file else "local"
            object.__setattr__(self, "kind", kind)
        if kind not in _CLUSTERS:
            raise ConfigError(f"Unknown cluster {kind!r}; available: {', '.join(available_clusters())}")

        for name in ("workers", "threads_per_worker", "torch_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{_FLAGS[name]} must be a positive integer, got {value!r}")
        if not self.connect_timeout_s > 0:
            raise ConfigError(f"--connect-timeout-s must be > 0, got {self.connect_timeout_s!r}")
        if self.memory_limit is not None and self.memory_limit != "auto":
            from dask.utils import parse_bytes

            try:
                parse_bytes(self.memory_limit)
            except (ValueError, TypeError):
                raise ConfigError(
                    f"--memory-limit {self.memory_limit!r} is not a size; write e.g. '6GiB' or 'auto'"
                ) from None
        for name in ("lifetime", "lifetime_stagger"):
            value = getattr(self, name)
            if value is not None:
                from dask.utils import parse_timedelta

                try:
                    parse_timedelta(value)
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(
                        f"{_FLAGS[name]} {value!r} is not a duration; write e.g. '1h', '45m' or '600s'"
                    ) from None
        if self.lifetime_stagger is not None and self.lifetime is None:
            raise ConfigError("--worker-lifetime-stagger needs --worker-lifetime; set both or neither")

        tls = {n: getattr(self, n) for n in ("tls_ca_file", "tls_cert", "tls_key")}
        given = [n for n, v in tls.items() if v]
        if given and len(given) != 3:
            missing = [_FLAGS[n] for n in tls if n not in given]
            raise ConfigError(f"TLS needs a CA, a certificate and a key; also pass {', '.join(missing)}")
        for name in given:
            if not Path(tls[name]).is_file():
                raise ConfigError(f"{_FLAGS[name]} {tls[name]}: no such file")
        if self.jobqueue_config is not None and not Path(self.jobqueue_config).is_file():
            raise ConfigError(f"--cluster-config {self.jobqueue_config}: no such file")

        _CLUSTERS[kind].check(self)

    @property
    def uses_tls(self) -> bool:
        """Whether this config carries its own certificates (and so requires encryption)."""
        return bool(self.tls_ca_file)

    def security(self) -> Security | None:
        """The ``distributed`` Security for these certificates; ``None`` defers to the dask config.

        One certificate/key pair serves the scheduler, the workers and this client; the CA verifies
        the peer on every connection and plain ``tcp://`` is refused.
        """
        if not self.uses_tls:
            return None
        from distributed.security import Security

        roles = ("client", "scheduler", "worker")
        pairs = {
            f"tls_{role}_{part}": path
            for role in roles
            for part, path in (("cert", self.tls_cert), ("key", self.tls_key))
        }
        return Security(tls_ca_file=self.tls_ca_file, require_encryption=True, **pairs)


# The option each field is set by, for error messages (the options are generated from the fields).
_FLAGS = {
    f.name: f.metadata["flag"].split("/")[0]
    if "flag" in f.metadata
    else f.metadata.get("shown_as", "--" + f.name.replace("_", "-"))
    for f in fields(ClusterConfig)
}


def _forbid(config: ClusterConfig, names: dict[str, str]) -> None:
    """Raise for the first field in ``names`` that is set; ``names`` maps the field to the fix."""
    for name, fix in names.items():
        if getattr(config, name) is not None:
            raise ConfigError(f"{_FLAGS[name]} cannot be used with --cluster {config.kind}: {fix}")


# ----------------------------------------------------------------------------------------------
# Kinds
# ----------------------------------------------------------------------------------------------

_CLUSTERS: dict[str, type[ClusterKind]] = {}


def register_cluster(cls: type[ClusterKind]) -> type[ClusterKind]:
    """Class decorator: make a :class:`ClusterKind` available under ``cls.name``."""
    if cls.name in _CLUSTERS:
        raise ValueError(f"cluster kind {cls.name!r} is already registered")
    _CLUSTERS[cls.name] = cls
    return cls


def available_clusters() -> list[str]:
    """Registered cluster kinds, in registration order (``local`` first)."""
    return list(_CLUSTERS)


class ClusterKind:
    """One way of getting a Dask client. Subclasses set ``name`` and implement both methods."""

    name: ClassVar[str]

    @classmethod
    def check(cls, config: ClusterConfig) -> None:
        """Raise ``ValueError`` for options that make no sense for this kind."""

    @classmethod
    def connect(cls, config: ClusterConfig, stack: ExitStack) -> Client:
        """Return a connected client; register everything to shut down on ``stack``."""
        raise NotImplementedError


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects cgroup/taskset pinning, unlike cpu_count
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def local_layout(config: ClusterConfig, cpus: int | None = None) -> tuple[int, int, int]:
    """``(workers, threads_per_worker, torch_threads)`` of a local cluster on ``cpus`` cores.

    Unset values fill the cores: ``workers * threads_per_worker * torch_threads ~= cpus``.
    """
    cpus = cpus or _usable_cpus()
    threads = config.threads_per_worker or 1
    workers, torch_threads = config.workers, config.torch_threads
    if workers is None and torch_threads is None:
        torch_threads = 1
    if workers is None:
        workers = max(1, cpus // (threads * torch_threads))
    if torch_threads is None:
        torch_threads = max(1, cpus // (threads * workers))
    return workers, threads, torch_threads


@contextmanager
def _environ(names: Iterable[str]) -> Iterator[None]:
    """Restore these variables on exit (the Nanny writes its pre-spawn environment into ours)."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@register_cluster
class LocalKind(ClusterKind):
    name = "local"

    @classmethod
    def check(cls, config: ClusterConfig) -> None:
        _forbid(
            config,
            {
                "scheduler_address": "drop --scheduler, or pass --cluster scheduler to connect to it",
                "scheduler_file": "drop --scheduler-file, or pass --cluster scheduler-file",
                "jobqueue_config": "drop --cluster-config, or pass --cluster slurm/pbs to use it",
            },
        )

    @classmethod
    def connect(cls, config: ClusterConfig, stack: ExitStack) -> Client:
        import dask
        from distributed import Client, LocalCluster

        workers, threads, torch_threads = local_layout(config)
        thread_env = {var: str(torch_threads) for var in THREAD_ENV_VARS}
        # Must be in the environment before the worker process starts (OpenMP reads it once); the
        # config stays set while the cluster lives, so lifetime restarts get it too. A None value
        # makes the Nanny leave a variable unset (see KEEP_UNSET).
        pre_spawn = {
            **dask.config.get("distributed.nanny.pre-spawn-environ", {}),
            **thread_env,
            **dict.fromkeys(KEEP_UNSET),
        }
        stack.enter_context(_environ([*thread_env, *KEEP_UNSET]))
        for var in KEEP_UNSET:  # an earlier Nanny in this process may have exported it: workers inherit
            os.environ.pop(var, None)
        stack.enter_context(dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}))
        security = config.security()
        lifetime = (
            {
                "lifetime": config.lifetime,
                "lifetime_stagger": config.lifetime_stagger or "0s",
                "lifetime_restart": config.lifetime_restart,
            }
            if config.lifetime
            else {}
        )
        with warnings.catch_warnings():
            # A busy dashboard port moves to a free one (the line below says where): not worth a warning.
            warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                processes=True,
                memory_limit=config.memory_limit or "auto",
                dashboard_address=config.dashboard_address,
                security=security,
                protocol="tls://" if security else None,
                silence_logs=logging.WARNING,
                env=thread_env,
                **lifetime,
            )
        nanny_log = logging.getLogger("distributed.nanny")
        stack.callback(nanny_log.setLevel, nanny_log.level)  # runs last: restore
        stack.enter_context(cluster)
        # Runs first on exit: a worker still busy in a decoder is killed after 4 s at shutdown, as intended;
        # the nanny's warning about it would be the last line after l2l's report.
        stack.callback(nanny_log.setLevel, logging.ERROR)
        client = Client(cluster, security=security, timeout=config.connect_timeout_s)
        stack.enter_context(client)
        logger.info(
            "local cluster: %d workers x %d threads, %d torch threads each", workers, threads, torch_threads
        )
        return client


_EXTERNAL_WORKERS = "the running scheduler's workers are configured where they start (dask worker ...)"


def _check_external(config: ClusterConfig, other: dict[str, str]) -> None:
    _forbid(
        config,
        {
            "workers": "drop --workers (start more `dask worker` processes instead), or use --cluster local",
            "threads_per_worker": f"drop --threads-per-worker; {_EXTERNAL_WORKERS}, e.g. --nthreads 1",
            "memory_limit": f"drop --memory-limit; {_EXTERNAL_WORKERS}, e.g. --memory-limit 6GiB",
            "lifetime": f"drop --worker-lifetime; {_EXTERNAL_WORKERS}, e.g. --lifetime 1h --lifetime-restart",
            "jobqueue_config": "drop --cluster-config, or pass --cluster slurm/pbs to submit workers",
            **other,
        },
    )


def _connect(config: ClusterConfig, stack: ExitStack, where: str, **kwargs: Any) -> Client:
    from distributed import Client

    try:
        client = Client(security=config.security(), timeout=config.connect_timeout_s, **kwargs)
    except (OSError, TimeoutError) as e:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {where} within {config.connect_timeout_s:g}s ({e}); "
            "check that it is running and reachable from here, or raise --connect-timeout-s"
        ) from e
    stack.enter_context(client)
    return client


@register_cluster
class SchedulerKind(ClusterKind):
    name = "scheduler"

    @classmethod
    def check(cls, config: ClusterConfig) -> None:
        _check_external(config, {"scheduler_file": "pass --scheduler or --scheduler-file, not both"})
        address = config.scheduler_address
        if not address:
            raise ConfigError("--cluster scheduler needs --scheduler ADDRESS, e.g. tcp://10.0.0.5:8786")
        if config.uses_tls and not address.startswith("tls://"):
            rest = address.split("://", 1)[-1]
            raise ConfigError(f"--scheduler {address!r} with TLS certificates: write tls://{rest}")

    @classmethod
    def connect(cls, config: ClusterConfig, stack: ExitStack) -> Client:
        _require_tls_settings(config, config.scheduler_address, "--scheduler")
        return _connect(config, stack, config.scheduler_address, address=config.scheduler_address)


@register_cluster
class SchedulerFileKind(ClusterKind):
    name = "scheduler-file"

    @classmethod
    def check(cls, config: ClusterConfig) -> None:
        _check_external(config, {"scheduler_address": "pass --scheduler or --scheduler-file, not both"})
        if not config.scheduler_file:
            raise ConfigError("--cluster scheduler-file needs --scheduler-file PATH (from dask scheduler)")

    @classmethod
    def connect(cls, config: ClusterConfig, stack: ExitStack) -> Client:
        path = Path(config.scheduler_file)
        address = _read_scheduler_file(path, timeout_s=config.connect_timeout_s)
        if config.uses_tls and not address.startswith("tls://"):
            raise ConfigError(
                f"{path} points at {address} but TLS certificates were given; "
                "start the scheduler with --tls-ca-file/--tls-cert/--tls-key"
            )
        _require_tls_settings(config, address, f"--scheduler-file {path}")
        return _connect(config, stack, f"{address} (from {path})", scheduler_file=str(path))


def _require_tls_settings(config: ClusterConfig, address: str, where: str) -> None:
    """Refuse a ``tls://`` scheduler when neither the flags nor the dask config give certificates."""
    if not address.startswith("tls://") or config.uses_tls:
        return
    from distributed.security import Security

    if Security().get_connection_args("client").get("ssl_context") is None:
        raise ClusterError(
            f"{where}: the scheduler at {address} speaks TLS only and no certificates were given; pass "
            "--tls-ca-file, --tls-cert and --tls-key (or set distributed.comm.tls in the dask config, "
            "see cluster/tls/security.yaml)"
        )


def _read_scheduler_file(path: Path, *, timeout_s: float) -> str:
    """Wait for a batch script's scheduler to write its file; return the address in it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return json.loads(path.read_text())["address"]
        except (FileNotFoundError, ValueError, KeyError):  # not written yet, or half-written
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"--scheduler-file {path}: no scheduler address after {timeout_s:g}s; start "
                    f"`dask scheduler --scheduler-file {path}` first (on a filesystem this host shares)"
                ) from None
            time.sleep(0.1)


# ----------------------------------------------------------------------------------------------
# dask-jobqueue
# ----------------------------------------------------------------------------------------------


def load_jobqueue_config(path: str | Path, kind: str) -> dict[str, Any]:
    """Read a dask-jobqueue YAML file and flatten it to dotted dask-config keys.

    The file is a dask config document (top-level ``jobqueue:``, optionally ``distributed:``); only
    the keys it sets change, dask-jobqueue's defaults fill the rest.

    Raises:
        ValueError: The file is not a mapping or has no ``jobqueue.<kind>`` section.
    """
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    sections = (doc or {}).get("jobqueue") if isinstance(doc, dict) else None
    if not isinstance(sections, dict) or not isinstance(sections.get(kind), dict):
        found = ", ".join(sections) if isinstance(sections, dict) else "none"
        raise ConfigError(
            f"{path}: no `jobqueue: {kind}:` section (found {found}); see cluster/jobqueue.yaml"
        )
    return dict(_flatten(doc))


def _flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@contextmanager
def jobqueue_cluster(config: ClusterConfig) -> Iterator[Any]:
    """A ``SLURMCluster``/``PBSCluster`` from ``config.jobqueue_config``, started with no jobs.

    ``cluster.job_script()`` shows exactly what would be submitted; ``cluster.scale(n)`` submits.
    The file's settings stay in the dask config while the cluster lives (dask-jobqueue reads them
    again for every job it submits); leaving the context cancels the jobs and stops the scheduler.

    Raises:
        ValueError: ``config.kind`` is not a jobqueue kind, or the config file lacks its section.
        ImportError: dask-jobqueue is not installed (``pip install 'listen-to-look[cluster]'``).
    """
    kind = config.kind
    if kind not in _JOBQUEUE:
        raise ConfigError(f"--cluster {kind} is not a batch scheduler; use one of {', '.join(_JOBQUEUE)}")
    import dask

    try:
        import dask_jobqueue
    except ImportError as e:
        raise ImportError(
            f"--cluster {kind} needs dask-jobqueue; pip install 'listen-to-look[cluster]'"
        ) from e
    cls = getattr(dask_jobqueue, _JOBQUEUE[kind])
    overrides = load_jobqueue_config(config.jobqueue_config, kind) if config.jobqueue_config else {}
    with dask.config.set(overrides):
        section = f"jobqueue.{kind}"
        extra_args = list(dask.config.get(f"{section}.worker-extra-args") or [])
        if config.lifetime:
            if any(a.startswith("--lifetime") for a in extra_args):
                raise ConfigError(
                    f"--worker-lifetime given, but {config.jobqueue_config} already sets --lifetime in "
                    "worker-extra-args; keep one of them"
                )
            extra_args += ["--lifetime", config.lifetime]
            if config.lifetime_stagger:
                extra_args += ["--lifetime-stagger", config.lifetime_stagger]
            extra_args.append("--lifetime-restart" if config.lifetime_restart else "--no-lifetime-restart")
        scheduler_options = dict(dask.config.get(f"{section}.scheduler-options") or {})
        scheduler_options["dashboard_address"] = config.dashboard_address
        cluster = cls(
            worker_extra_args=extra_args,
            scheduler_options=scheduler_options,
            security=config.security(),
            silence_logs=logging.WARNING,
        )
        with cluster:
            yield cluster


_JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}


class _JobqueueKind(ClusterKind):
    @classmethod
    def check(cls, config: ClusterConfig) -> None:
        _forbid(
            config,
            {
                "scheduler_address": "drop --scheduler (this command starts one), or use --cluster scheduler",
                "scheduler_file": "drop --scheduler-file, or use --cluster scheduler-file (batch script)",
                "threads_per_worker": "set cores/processes per job in the --cluster-config file instead",
                "memory_limit": "set memory (per job, split across processes) in the --cluster-config file",
            },
        )

    @classmethod
    def connect(cls, config: ClusterConfig, stack: ExitStack) -> Client:
        from distributed import Client

        cluster = stack.enter_context(jobqueue_cluster(config))
        if config.workers:
            cluster.scale(n=config.workers)
        else:
            cluster.scale(jobs=1)
        logger.info("%s: submitted jobs for %s workers", cls.name, config.workers or "one job's")
        client = Client(cluster, security=config.security(), timeout=config.connect_timeout_s)
        stack.enter_context(client)
        return client


@register_cluster
class SlurmKind(_JobqueueKind):
    name = "slurm"


@register_cluster
class PBSKind(_JobqueueKind):
    name = "pbs"


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def dashboard_link(client: Client) -> str | None:
    """The scheduler's dashboard URL, or ``None`` when it serves none (disabled, or no bokeh there)."""
    try:
        shown = client.run_on_scheduler(_serves_dashboard)
    except Exception:  # an old or locked-down scheduler: report the configured link
        shown = True
    return client.dashboard_link if shown else None


def _serves_dashboard(dask_scheduler: Any = None) -> bool:
    # The scheduler imports its bokeh dashboard module only when it serves the dashboard.
    return "distributed.dashboard.scheduler" in sys.modules


@contextmanager
def open_client(
    config: ClusterConfig | None = None, *, announce: Callable[[str], None] | None = None
) -> Iterator[Client]:
    """Yield a Dask client for ``config``; stop whatever was started here on exit.

    Every worker (present and future) gets the ``TorchThreadsPlugin``: its ``OMP_NUM_THREADS`` is the
    configured torch thread count, and a task that calls :func:`pin_torch_threads` first runs with it.

    Args:
        config: Where to run; default a local cluster filling this machine.
        announce: Where to print the dashboard line; default ``stderr``.

    Raises:
        ValueError: Contradictory options (raised by ``ClusterConfig``) or a mismatched scheduler file.
        ConnectionError: The scheduler cannot be reached in ``config.connect_timeout_s``.
        TimeoutError: The scheduler file did not appear in ``config.connect_timeout_s``.
    """
    config = config or ClusterConfig()
    announce = announce or (lambda line: print(line, file=sys.stderr))
    with ExitStack() as stack:
        client = _CLUSTERS[config.kind].connect(config, stack)
        torch_threads = local_layout(config)[2] if config.kind == "local" else config.torch_threads
        client.register_plugin(torch_threads_plugin(torch_threads))
        link = dashboard_link(client)
        address = client.scheduler.address
        announce(f"l2l: dask {config.kind} cluster at {address}; dashboard: {link or 'none'}")
        yield client

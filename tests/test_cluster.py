"""Cluster wiring: config validation, the files in cluster/, and real Dask clusters on loopback.

Real processes only, no mocks of Dask: a LocalCluster with worker processes, the Slurm and PBS batch
scripts run end to end (stock `dask scheduler` + `dask worker` + a stand-in `l2l` that connects by
scheduler file; only `srun` / `pbs_tmrsh` are replaced by a local exec), and TLS with a CA made by
cluster/tls/make-test-ca.sh. Every subprocess runs in its own process group and is killed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from indexing.errors import ClusterError, ConfigError
from pipeline.cluster import (
    THREAD_ENV_VARS,
    ClusterConfig,
    available_clusters,
    jobqueue_cluster,
    load_jobqueue_config,
    local_layout,
    open_client,
    pin_torch_threads,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
VENV_BIN = Path(sys.executable).parent


def pinned_probe() -> tuple[int, int, str | None]:
    """What an extraction task does first: pin torch for this thread from the worker's setting."""
    pin_torch_threads()
    return probe()


def dotted(tree: dict, prefix: str = "") -> dict:
    """A nested dask config document as dotted keys, so ``dask.config.set`` merges instead of replacing."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= dotted(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def probe() -> tuple[int, int, str | None]:
    """(pid, torch threads, OMP_NUM_THREADS) of the process running this."""
    import torch

    return os.getpid(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


# ---- config --------------------------------------------------------------------------------------


def test_kinds_are_registered_and_unknown_names_list_them():
    assert {"local", "scheduler", "scheduler-file", "slurm", "pbs"} <= set(available_clusters())
    assert available_clusters()[0] == "local"  # the default comes first in --help
    with pytest.raises(ConfigError, match="available: " + re.escape(", ".join(available_clusters()))):
        ClusterConfig(kind="yarn")


def test_kind_is_inferred_from_the_connection_option():
    assert ClusterConfig().kind == "local"
    assert ClusterConfig(scheduler_address="tcp://10.0.0.5:8786").kind == "scheduler"
    assert ClusterConfig(scheduler_file="/shared/s.json").kind == "scheduler-file"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"kind": "scheduler", "scheduler_address": "tcp://h:8786", "workers": 4},
            "--workers cannot be used",
        ),
        ({"scheduler_address": "tcp://h:8786", "workers": 4}, "start more `dask worker`"),
        ({"scheduler_file": "s.json", "memory_limit": "4GiB"}, "--memory-limit cannot be used"),
        ({"scheduler_file": "s.json", "lifetime": "1h"}, "--lifetime 1h --lifetime-restart"),
        ({"kind": "scheduler", "scheduler_address": "h:1", "scheduler_file": "s.json"}, "not both"),
        ({"kind": "local", "scheduler_address": "tcp://h:8786"}, "pass --cluster scheduler"),
        (
            {"kind": "slurm", "scheduler_file": "s.json"},
            "--scheduler-file cannot be used with --cluster slurm",
        ),
        ({"kind": "pbs", "memory_limit": "4GiB"}, "in the --cluster-config file"),
        ({"kind": "slurm", "threads_per_worker": 2}, "cores/processes"),
        ({"kind": "scheduler"}, "needs --scheduler ADDRESS"),
        ({"kind": "scheduler-file"}, "needs --scheduler-file PATH"),
        ({"workers": 0}, "--workers must be a positive integer"),
        ({"torch_threads": 2.5}, "--threads must be a positive integer"),
        ({"memory_limit": "lots"}, "not a size"),
        ({"lifetime": "soon"}, "not a duration"),
        ({"lifetime_stagger": "5m"}, "needs --worker-lifetime"),
        ({"kind": "slurm", "jobqueue_config": "/nonexistent.yaml"}, "no such file"),
    ],
)
def test_contradictory_or_bad_options_name_the_fix(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClusterConfig(**options)


def test_tls_needs_all_three_files_and_a_tls_address(tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("")
    with pytest.raises(ValueError, match="also pass --tls-cert, --tls-key"):
        ClusterConfig(tls_ca_file=str(pem))
    with pytest.raises(ValueError, match="write tls://10.0.0.5:8786"):
        ClusterConfig(
            scheduler_address="tcp://10.0.0.5:8786", tls_ca_file=str(pem), tls_cert=str(pem), tls_key=str(pem)
        )


def test_local_layout_fills_the_cores():
    assert local_layout(ClusterConfig(), cpus=16) == (16, 1, 1)
    assert local_layout(ClusterConfig(workers=4), cpus=16) == (4, 1, 4)
    assert local_layout(ClusterConfig(torch_threads=4), cpus=16) == (4, 1, 4)
    assert local_layout(ClusterConfig(workers=3, torch_threads=2), cpus=16) == (3, 1, 2)
    assert local_layout(ClusterConfig(workers=32), cpus=16) == (32, 1, 1)


def test_pin_torch_threads_reads_omp_and_sets_the_env(monkeypatch):
    import torch

    before = torch.get_num_threads()
    for var in THREAD_ENV_VARS:
        monkeypatch.setenv(var, "1")
    try:
        assert pin_torch_threads() == 1
        assert pin_torch_threads(2) == 2 and os.environ["MKL_NUM_THREADS"] == "2"
        with pytest.raises(ValueError, match=">= 1"):
            pin_torch_threads(0)
    finally:
        torch.set_num_threads(before)


# ---- cluster/ files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            "slurm",
            [
                "#SBATCH -J l2l-extract",
                "#SBATCH --cpus-per-task=32",
                "#SBATCH --mem=96G",
                "#SBATCH -t 04:00:00",
                "#SBATCH --hint=nomultithread",
                "#SBATCH --exclusive=user",
                "export OMP_NUM_THREADS=4 MKL_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4",
            ],
        ),
        (
            "pbs",
            [
                "#PBS -N l2l-extract",
                "#PBS -l select=1:ncpus=32:mem=96gb",
                "#PBS -l walltime=04:00:00",
                "#PBS -j oe",
                "#PBS -l place=scatter:excl",
                "export OMP_NUM_THREADS=4 MKL_NUM_THREADS=4 OPENBLAS_NUM_THREADS=4",
            ],
        ),
    ],
)
def test_jobqueue_config_builds_a_cluster_and_renders_its_job_script(kind, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dask-jobqueue creates log-directory relative to here
    config = ClusterConfig(kind=kind, jobqueue_config=str(CLUSTER / "jobqueue.yaml"), dashboard_address=":0")
    with jobqueue_cluster(config) as cluster:  # a real local scheduler; nothing is submitted
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://")
    lines = script.splitlines()
    for line in expected:
        assert line in lines, f"{line!r} not in\n{script}"
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    for arg in (
        "--nthreads 1",
        "--nworkers 8",
        "--memory-limit 12.00GiB",
        "--local-directory $TMPDIR",
        "--death-timeout 120",
        "--lifetime 60m --lifetime-stagger 10m --lifetime-restart",
    ):
        assert arg in worker, f"{arg!r} not in {worker!r}"
    # The file's settings are gone once the cluster is closed.
    import dask

    assert dask.config.get(f"jobqueue.{kind}.cores") is None


def test_jobqueue_lifetime_is_set_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ClusterConfig(kind="slurm", jobqueue_config=str(CLUSTER / "jobqueue.yaml"), lifetime="2h")
    with pytest.raises(ValueError, match="keep one of them"):
        with jobqueue_cluster(config):
            pass
    plain = tmp_path / "jq.yaml"
    plain.write_text(yaml.safe_dump({"jobqueue": {"slurm": {"cores": 2, "processes": 2, "memory": "4GiB"}}}))
    config = ClusterConfig(
        kind="slurm", jobqueue_config=str(plain), lifetime="2h", lifetime_stagger="5m", dashboard_address=":0"
    )
    with jobqueue_cluster(config) as cluster:
        assert "--lifetime 2h --lifetime-stagger 5m --lifetime-restart" in cluster.job_script()


def test_jobqueue_config_without_the_kind_section_is_refused(tmp_path):
    path = tmp_path / "jq.yaml"
    path.write_text("jobqueue:\n  pbs: {cores: 1}\n")
    with pytest.raises(ValueError, match="no `jobqueue: slurm:` section \\(found pbs\\)"):
        load_jobqueue_config(path, "slurm")


@pytest.mark.parametrize("script", ["slurm/extract.sbatch", "pbs/extract.pbs", "tls/make-test-ca.sh"])
def test_batch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(CLUSTER / script)], check=True)


def test_kubernetes_manifest_is_consistent():
    docs = {
        d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kubernetes" / "daskcluster.yaml").read_text())
    }
    assert set(docs) == {"PersistentVolumeClaim", "DaskCluster", "Job"}
    cluster = docs["DaskCluster"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    args, env = worker["args"], {e["name"]: e["value"] for e in worker["env"]}
    assert args[:2] == ["dask", "worker"] and args[args.index("--nthreads") + 1] == "1"
    res = worker["resources"]
    assert res["requests"] == res["limits"]  # guaranteed QoS: no CPU throttling surprises
    assert env["OMP_NUM_THREADS"] == res["limits"]["cpu"]  # torch threads = the CPUs the pod gets
    from dask.utils import parse_bytes

    dask_limit = parse_bytes(args[args.index("--memory-limit") + 1])
    assert dask_limit < parse_bytes(res["limits"]["memory"].replace("Gi", "GiB"))
    assert {"--lifetime", "--lifetime-stagger", "--lifetime-restart"} <= set(args)
    scheduler = cluster["spec"]["scheduler"]
    assert scheduler["service"]["selector"]["dask.org/cluster-name"] == cluster["metadata"]["name"]
    job_args = docs["Job"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert job_args[:2] == ["l2l", "extract"]
    assert (
        job_args[job_args.index("--scheduler") + 1] == f"tcp://{cluster['metadata']['name']}-scheduler:8786"
    )
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = cluster["spec"]["worker"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in volumes


# ---- real clusters -------------------------------------------------------------------------------


def _malloc_trim() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_cluster_pins_torch_threads_and_restarts_workers_after_their_lifetime(monkeypatch):
    saved = os.environ.get("OMP_NUM_THREADS")
    # As if an earlier Nanny in this process had exported Dask's default (it slows the students 35%).
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    lines = []
    config = ClusterConfig(
        workers=2, torch_threads=3, lifetime="10s", lifetime_stagger="2s", dashboard_address=":0"
    )
    with open_client(config, announce=lines.append) as client:
        results = client.gather(client.map(lambda i: probe(), range(8), pure=False))
        first = {pid for pid, _, _ in client.run(probe).values()}
        assert os.getpid() not in {pid for pid, _, _ in results}  # processes, not threads
        assert {(threads, env) for _, threads, env in results} == {(3, "3")}
        assert set(client.run(_malloc_trim).values()) == {None}
        # Each worker retires after ~10 s; its nanny starts a new process, pinned the same way.
        fresh: list[tuple[int, int, str]] = []
        deadline = time.monotonic() + 45
        while not fresh and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                fresh = [r for r in client.run(probe).values() if r[0] not in first]
            except Exception:  # a worker left while we asked; ask again
                pass
        assert fresh, "no worker was restarted after its lifetime"
        assert {tuple(r[1:]) for r in fresh} == {(3, "3")}
        assert set(client.run(_malloc_trim).values()) == {None}  # restarted workers too
    assert lines and lines[0].startswith("l2l: dask local cluster at tcp://127.0.0.1:")
    assert os.environ.get("OMP_NUM_THREADS") == saved  # the client process's environment is restored
    assert os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536"


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(body)
    path.chmod(0o755)


FAKE_L2L = """\
#!{python}
# Stand-in for `l2l extract`: the real CLI parses the arguments (an option it lacks ends this with exit 2),
# then it connects through the scheduler file like the real command and runs one task.
import json, os, sys
import click
from cli import main
from pipeline.cluster import ClusterConfig, open_client

def probe():
    import torch
    return os.getpid(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

if __name__ == "__main__":
    args = sys.argv[1:]
    try:
        command = main.get_command(None, args[0]) if args else None
        if command is None:
            raise click.UsageError(f"no such command {{args[:1]}}")
        params = command.make_context(f"l2l {{args[0]}}", args[1:]).params
    except click.ClickException as err:
        err.show()
        sys.exit(2)
    config = ClusterConfig(scheduler_file=params["scheduler_file"], connect_timeout_s=30)
    with open_client(config) as client:
        client.wait_for_workers(1, timeout=60)
        result = client.submit(probe, pure=False).result(timeout=60)
        workers = len(client.scheduler_info()["workers"])
    with open(os.environ["L2L_FAKE_OUT"], "w") as f:
        json.dump({{"argv": args, "probe": result, "workers": workers}}, f)
"""


def _run_group(
    cmd: list[str], *, env: dict[str, str], cwd: Path, timeout_s: float
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; afterwards make sure nothing of that group survives."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[1]} did not finish in {timeout_s}s:\n{out}")
    finally:
        leftover = _wait_group_gone(proc.pid, timeout_s=15)
        if leftover:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not leftover, f"{cmd[1]} left processes running after it exited"
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _wait_group_gone(pgid: int, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


EXTRA = ["--students", "random:0:tiny", "--batch-steps", "32"]  # what a user adds to the script's command


@pytest.mark.parametrize("system", ["slurm", "pbs"])
def test_batch_script_runs_scheduler_workers_and_client(system, tmp_path):
    """The real script, with a real `dask scheduler` and `dask worker` on loopback."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "scratch").mkdir()
    _fake(bin_dir, "l2l", FAKE_L2L.format(python=sys.executable))
    _fake(bin_dir, "srun", '#!/bin/bash\nwhile [[ $# -gt 0 && $1 == -* ]]; do shift; done\nexec "$@"\n')
    _fake(bin_dir, "pbs_tmrsh", '#!/bin/bash\nshift\nexec "$@"\n')  # drop the host, run here
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{VENV_BIN}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "TMPDIR": str(tmp_path / "scratch"),
        "L2L_SCHEDULER_HOST": "127.0.0.1",
        "L2L_DASHBOARD_PORT": "0",
        "L2L_FAKE_OUT": str(tmp_path / "out.json"),
    }
    if system == "slurm":
        env |= {
            "SLURM_JOB_ID": "42",
            "SLURM_SUBMIT_DIR": str(tmp_path),
            "SLURM_CPUS_PER_TASK": "2",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_MEM_PER_NODE": "4096",
        }
        cmd = ["bash", str(CLUSTER / "slurm" / "extract.sbatch"), "m.csv", "f.zarr", *EXTRA]
        sched_file = tmp_path / "dask-42" / "scheduler.json"
    else:
        nodefile = tmp_path / "nodes"
        nodefile.write_text("localhost\nlocalhost\n")  # one node with two slots: one `dask worker`
        env |= {
            "PBS_JOBID": "77.pbs-server",
            "PBS_O_WORKDIR": str(tmp_path),
            "PBS_NODEFILE": str(nodefile),
            "L2L_MANIFEST": "m.csv",
            "L2L_STORE": "f.zarr",
            "L2L_EXTRACT_ARGS": " ".join(EXTRA),
            "L2L_WORKERS_PER_NODE": "1",
            "L2L_TORCH_THREADS": "2",
            "L2L_MEM_PER_WORKER": "2GiB",
        }
        cmd = ["bash", str(CLUSTER / "pbs" / "extract.pbs")]
        sched_file = tmp_path / "dask-77" / "scheduler.json"
    done = _run_group(cmd, env=env, cwd=tmp_path, timeout_s=90)
    assert done.returncode == 0, done.stdout + "".join(
        f"\n--- {p.name}\n{p.read_text()}" for p in sched_file.parent.glob("*.log")
    )
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["argv"] == [
        "extract",
        "m.csv",
        "f.zarr",
        "--cluster",
        "scheduler-file",
        "--scheduler-file",
        str(sched_file),
        "--threads",
        "2",
        *EXTRA,
    ]
    assert out["workers"] == 1
    assert out["probe"][1:] == [2, "2"]  # torch threads from the script's OMP_NUM_THREADS, via the plugin
    assert "l2l: scheduler" in done.stdout


def test_fake_l2l_of_the_batch_tests_refuses_what_the_real_cli_refuses(tmp_path):
    """The stand-in above parses with the real CLI: a flag `l2l extract` lacks cannot pass unseen."""
    _fake(tmp_path, "l2l", FAKE_L2L.format(python=sys.executable))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["extract", "m.csv", "f.zarr", "--tls-cert-file", "x"], ["extrct", "m.csv"]):
        fake = [str(tmp_path / "l2l"), *args]
        done = subprocess.run(fake, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "Error" in done.stderr, done.stderr


def test_scheduler_file_that_never_appears_times_out(tmp_path):
    config = ClusterConfig(scheduler_file=str(tmp_path / "none.json"), connect_timeout_s=0.3)
    with pytest.raises(ClusterError, match="dask scheduler --scheduler-file"):
        with open_client(config):
            pass


def test_unreachable_scheduler_is_a_connection_error_that_says_so():
    config = ClusterConfig(scheduler_address="tcp://127.0.0.1:9", connect_timeout_s=1)
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        with open_client(config):
            pass


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_local_cluster_and_a_tls_client_from_the_config_snippet(tmp_path):
    subprocess.run(
        ["bash", str(CLUSTER / "tls" / "make-test-ca.sh"), str(tmp_path)], check=True, capture_output=True
    )
    certs = {
        "tls_ca_file": str(tmp_path / "ca.pem"),
        "tls_cert": str(tmp_path / "dask.pem"),
        "tls_key": str(tmp_path / "dask.key"),
    }
    import dask
    from distributed import Client

    with open_client(
        ClusterConfig(workers=1, torch_threads=1, dashboard_address=":0", **certs), announce=lambda line: None
    ) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert client.submit(probe, pure=False).result(timeout=30)[1] == 1
        # A client without certificates is refused.
        with pytest.raises(Exception):  # noqa: B017 - the exact error depends on where TLS fails
            Client(address.replace("tls://", "tcp://"), timeout=3)
        # cluster/tls/security.yaml, pointed at the test certificates, configures a second client.
        snippet = (CLUSTER / "tls" / "security.yaml").read_text().replace("/etc/l2l/tls", str(tmp_path))
        with dask.config.set(dotted(yaml.safe_load(snippet))):
            # --torch-threads 2 on a cluster started with 1: the re-registered plugin changes the running
            # worker's setting, and a task that pins first (as extraction tasks do) follows it, even on
            # a thread that already used torch with 1.
            second = ClusterConfig(scheduler_address=address, torch_threads=2, connect_timeout_s=10)
            with open_client(second, announce=lambda line: None) as other:
                assert other.security.require_encryption
                assert other.submit(pinned_probe, pure=False).result(timeout=30)[1:] == (2, "2")


def test_tls_snippet_keys_are_known_to_distributed():
    import dask
    from distributed.security import Security

    with dask.config.set(dotted(yaml.safe_load((CLUSTER / "tls" / "security.yaml").read_text()))):
        security = Security()
    assert security.require_encryption
    assert security.tls_ca_file == "/etc/l2l/tls/ca.pem"
    assert security.tls_worker_cert == security.tls_scheduler_cert == security.tls_client_cert


def test_extract_on_a_tls_only_scheduler_needs_the_certificates(tmp_path, make_video):
    """Real `dask scheduler` and `dask worker` processes speaking TLS only, on loopback: `l2l extract` with
    --tls-ca-file/--tls-cert/--tls-key fills the store; without them it is refused (exit 5), not a hang."""
    from click.testing import CliRunner

    from cli import main
    from indexing.stores import open_store

    certs = tmp_path / "tls"
    make_ca = ["bash", str(CLUSTER / "tls" / "make-test-ca.sh"), str(certs)]
    subprocess.run(make_ca, check=True, capture_output=True)
    tls = ["--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "dask.pem")]
    tls += ["--tls-key", str(certs / "dask.key")]
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    scheduler = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--protocol", "tls"]
    scheduler += ["--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"]
    worker = [sys.executable, "-m", "distributed.cli.dask_worker", "--nthreads", "1", "--no-dashboard"]
    worker += ["--host", "127.0.0.1"]
    quiet = {
        "env": env,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "start_new_session": True,
    }
    procs = [
        subprocess.Popen([*cmd, "--scheduler-file", str(sched_file), *tls], **quiet)
        for cmd in (scheduler, worker)
    ]
    try:
        for i in range(3):
            make_video(tmp_path / f"v{i}.mp4", 1.2, seed=i)
        corpus = tmp_path / "m.csv"
        corpus.write_text("video_id,path\n" + "".join(f"v{i},v{i}.mp4\n" for i in range(3)))
        store = tmp_path / "s.zarr"
        args = ["extract", str(corpus), str(store), "--students", "random:0:tiny", "--scheduler-file"]
        args += [str(sched_file), "--no-progress"]
        refused = CliRunner().invoke(main, [*args, "--connect-timeout-s", "3"])
        assert refused.exit_code == 5 and isinstance(refused.exception, SystemExit), refused.output
        assert refused.stderr.startswith("error: ") and "speaks TLS only" in refused.stderr
        assert not store.exists()  # refused before anything was written
        done = CliRunner().invoke(main, [*args, "--connect-timeout-s", "30", "--json", *tls])
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout)["complete"]
        with open_store(store) as s:
            assert [v.status for v in s.videos()] == ["ok"] * 3
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_busy_dashboard_port_is_no_warning_and_shutdown_is_quiet(recwarn):
    """l2l's own lines are the last word: no Dask warning about a busy port, no nanny noise at shutdown."""
    import logging
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    nanny = logging.getLogger("distributed.nanny")
    before = nanny.level
    try:
        lines: list[str] = []
        config = ClusterConfig(workers=1, dashboard_address=f"127.0.0.1:{port}")
        with open_client(config, announce=lines.append):
            assert lines and lines[0].startswith("l2l: dask local cluster at")
    finally:
        busy.close()
    assert not [w for w in recwarn if "already in use" in str(w.message)]
    assert nanny.level == before  # quieted for the shutdown only

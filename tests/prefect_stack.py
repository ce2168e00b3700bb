"""A real Prefect deployment stack on 127.0.0.1 for the ops and ui tiers, configured as production is.

One `prefect server start` on PostgreSQL (a throwaway cluster started here with initdb/pg_ctl;
Debian's `postgresql` package, which .ci/run installs), with the server settings synthtune ships
(concurrency leases on disk) and the scheduler running every second; the work pools of
deployments/job-templates, one process worker per pool, and the deployments applied with
`prefect deploy --prefect-file deployments/prefect.yaml --all`, as the README says. Optionally an
S3-compatible server (moto) that the workers' flow runs can reach.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def pg_bindir() -> Path:
    """The PostgreSQL server binaries (Debian keeps them out of PATH, in /usr/lib/postgresql/<v>/bin)."""
    import shutil

    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if versions:
        return versions[-1]
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (fsync off: a test's data need not survive a power cut);
    yields the SQLAlchemy URL of its `prefect` database. initdb refuses to run as root: as root, the
    cluster runs as the `postgres` user in a folder that user owns."""
    import shutil
    import tempfile

    bindir, port = pg_bindir(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="synthtune-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def pg(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")

    data = folder / "data"
    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"), "-w", "-o",
           f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect")
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Stack:
    home: Path
    api_url: str = ""
    ui_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    named: dict[str, subprocess.Popen] = field(default_factory=dict)
    artifact_root: str = ""
    port: int = 0

    def spawn(self, name: str, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        self.named[name] = proc
        return proc

    def start_server(self) -> subprocess.Popen:
        server = self.spawn("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                       "--port", str(self.port)], self.env)
        wait_http(f"{self.api_url}/health", 180, server, self.home / "server.log")
        return server

    def start_worker(self, pool: str) -> subprocess.Popen:
        return self.spawn(f"worker-{pool}", [str(BIN / "prefect"), "worker", "start", "--pool", pool,
                                             "--type", "process", "--name", f"{pool}-worker"], self.env)

    def kill(self, name: str, sig: int = 9) -> None:
        """Signal a started process's whole group (kill -9 by default) and reap it."""
        proc = self.named[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(timeout=60)

    def cli(self, *args: str, unset: tuple[str, ...] = ()) -> str:
        env = {k: v for k, v in self.env.items() if k not in unset}
        out = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        if out.returncode:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out.stdout

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text()

    def stop(self) -> None:
        import signal

        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def prefect_stack(home: Path, artifact_root: str, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Server, pools, workers and deployments; the test process's own Prefect client points at it."""
    from synthtune.server import SERVER_ENV

    stack = Stack(home=home, artifact_root=artifact_root, port=free_port())
    stack.api_url, stack.ui_url = f"http://127.0.0.1:{stack.port}/api", f"http://127.0.0.1:{stack.port}"
    with postgres() as database:
        stack.env = {
            **os.environ, **(extra_env or {}), **SERVER_ENV,
            "PREFECT_HOME": str(home / "prefect-home"),
            "PREFECT_API_URL": stack.api_url,
            "PREFECT_API_DATABASE_CONNECTION_URL": database,
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",  # expired concurrency leases freed quickly
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "SYNTHTUNE_HOME": str(ROOT),
            "SYNTHTUNE_ARTIFACT_ROOT": artifact_root,
            "SYNTHTUNE_GPU_SLOT": "gpu:test-worker",
        }
        try:
            stack.start_server()
            templates = ROOT / "deployments" / "job-templates"
            stack.cli("work-pool", "create", "gpu", "--type", "process", "--base-job-template",
                      str(templates / "process-gpu.json"))
            stack.cli("work-pool", "create", "cpu", "--type", "process")
            # as a user would: the artifact root is filled in now, each worker's checkout at run time
            stack.cli("deploy", "--prefect-file", "deployments/prefect.yaml", "--all", unset=("SYNTHTUNE_HOME",))
            for pool in ("gpu", "cpu"):
                stack.start_worker(pool)
            with _client_env(stack):
                yield stack
        finally:
            stack.stop()


@contextlib.contextmanager
def _client_env(stack: Stack) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        yield


def _forget_s3_clients() -> None:
    """fsspec caches filesystem instances by their arguments: an `s3fs.S3FileSystem()` made while the
    environment pointed at one moto server would be reused after it is gone. Start clean each time."""
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def moto_server(home: Path) -> Iterator[dict[str, str]]:
    """An S3-compatible server on 127.0.0.1; yields the env that points boto/s3fs at it."""
    port = free_port()
    log = home / "moto.log"
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    _forget_s3_clients()
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", 60, proc, log)
        yield {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    finally:
        _forget_s3_clients()
        proc.terminate()
        proc.wait(timeout=20)


# ------------------------------------------------------------------ API helpers (sync client)

def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def deployment_id(name: str):
    with client() as c:
        return c.read_deployment_by_name(name).id


def start_run(name: str, parameters: dict | None = None):
    """A flow run of deployment `flow/deployment`, scheduled now (the worker picks it up)."""
    with client() as c:
        return c.create_flow_run_from_deployment(deployment_id(name), parameters=parameters or {}).id


def run_state(run_id) -> str:
    """The flow run's state type now (RUNNING, COMPLETED, ...)."""
    with client() as c:
        run = c.read_flow_run(run_id)
    return run.state.type.value if run.state else "NONE"


def wait_run(run_id, timeout: float = 600, states: set[str] = FINAL):
    with client() as c:
        deadline = time.monotonic() + timeout
        while True:
            run = c.read_flow_run(run_id)
            if run.state and run.state.type.value in states:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {run.name} still {run.state.name if run.state else None} after {timeout} s")
            time.sleep(1)


def task_runs(run_id, expected: int | None = None, timeout: float = 60) -> dict:
    """Task run name -> task run, polled until every state is final (they land after the flow's)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client() as c:
        deadline = time.monotonic() + timeout
        while True:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
            final = all(r.state and r.state.is_final() for r in runs)
            if (final and (expected is None or len(runs) >= expected)) or time.monotonic() > deadline:
                return {r.name: r for r in runs}
            time.sleep(0.5)


def states(run_id, expected: int | None = None) -> dict[str, str]:
    return {name: r.state.name for name, r in task_runs(run_id, expected).items()}

"""A real Prefect deployment stack on 127.0.0.1 for the ops and ui tiers, configured as production is.

One `prefect server start` on PostgreSQL (a throwaway cluster started here with initdb/pg_ctl;
Debian's `postgresql` package, which .ci/run installs), with the server settings synthtune ships
(concurrency leases on disk) and the scheduler running every second; the work pools of
deployments/job-templates, one process worker per pool, and the deployments applied with
`prefect deploy --prefect-file deployments/prefect.yaml --all`, as the README says. Optionally an
S3-compatible server (moto) that the workers' flow runs can reach; and the API helpers the ops
and ui tiers share.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from synthtune.server import free_port, wait_healthy
from tests.support import ROOT
from tests.support.servers import postgres

BIN = Path(sys.executable).parent
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


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
        wait_healthy(f"{self.api_url}/health", server, self.home / "server.log", 180, "prefect server")
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
    """Server, pools, workers and deployments (point this process's Prefect client at it with `client_env`)."""
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
            yield stack
        finally:
            stack.stop()


@contextlib.contextmanager
def client_env(stack: Stack) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        yield


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


def deployed_config(stack=None) -> dict:
    """The config of the `adhoc` deployment, as the server holds it."""
    with client() as c:
        return c.read_deployment_by_name("synthtune/adhoc").parameters["config"]


def with_changes(config: dict, **sections) -> dict:
    """A copy of a config dict with `section={field: value}` merged in."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for section, fields in sections.items():
        if isinstance(fields, dict):
            out[section] = {**out.get(section, {}), **fields}
        else:
            out[section] = fields
    return out


def latest_attempt(run_id) -> dict[str, str]:
    """Task name -> state of its newest task run (a retried flow run holds both attempts)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client() as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    newest: dict[str, object] = {}
    for r in sorted(runs, key=lambda r: r.created):
        newest[r.name] = r
    return {n: r.state.name for n, r in newest.items()}


def training_children(train_key: str):
    """The training child processes of `train_key` on this machine."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if "synthtune.stages._train_child" in (p.info["cmdline"] or []) and train_key in " ".join(p.info["cmdline"])]


def automations():
    """deployments/automations.py, loaded as the script it is."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("automations", ROOT / "deployments" / "automations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_key(config: dict, run_id, timeout: float = 600) -> str:
    """The train key of a run's config, once the run's data stages have written what training reads (a
    key covers its upstream outputs' digests, so it is known only then)."""
    from synthtune.configs import PipelineConfig
    from synthtune.runner import plan
    from synthtune.store import ArtifactStore

    cfg = PipelineConfig.model_validate(config, context={"base_dir": ROOT})
    store, deadline = ArtifactStore(cfg.artifact_root), time.monotonic() + timeout
    while True:
        keys = plan(cfg)
        if store.ref("template", keys["template"]) is not None:  # template is built: the train key is final
            return keys["train"]
        assert time.monotonic() < deadline, "the data stages never finished"
        assert run_state(run_id) in {"RUNNING", "PENDING", "SCHEDULED"}, run_state(run_id)
        time.sleep(1)

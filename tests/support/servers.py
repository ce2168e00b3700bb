"""Real servers on 127.0.0.1 for the tests, each started as a user would start it and stopped after:
PostgreSQL (a throwaway cluster), an S3-compatible server (moto), an MLflow tracking server,
`transformers serve` with a local model (an OpenAI-compatible teacher), and a hop in front of a
teacher that counts the generation requests that reach it and injects faults."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from synthtune.server import free_port, wait_healthy

BIN = Path(sys.executable).parent


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


def forget_s3_clients() -> None:
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
    forget_s3_clients()
    try:
        wait_healthy(f"http://127.0.0.1:{port}/moto-api/", proc, log, 60, "moto_server")
        yield {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    finally:
        forget_s3_clients()
        proc.terminate()
        proc.wait(timeout=20)


@contextlib.contextmanager
def transformers_serve(path: str) -> Iterator[str]:
    """`transformers serve` of a local model folder; yields its base URL (without /v1)."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="synthtune-serve-")) / "serve.log"
    proc = subprocess.Popen([str(BIN / "transformers"), "serve", path, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log, 120, "transformers serve")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)



@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` (sqlite backend, served artifacts) under `folder`; yields its tracking URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = folder / "mlflow.log"
    proc = subprocess.Popen(cmd, cwd=folder, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"{uri}/health", proc, log, 120, "mlflow server")
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


class FaultyHop:
    """A proxy on 127.0.0.1: POSTs get the scripted faults first (status codes, 'hang', or None to
    pass one through), then pass; `posts` counts the generation requests that reached the teacher,
    `sent` every POST that reached the hop, and `tokens` the `usage` the teacher answered with."""

    def __init__(self, upstream: str, faults: list, always: int | None = None):
        self.faults, self.seen, self.auth, self.posts, self.sent = list(faults), [], [], 0, 0
        self.tokens = {"prompt": 0, "completion": 0}
        hop = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _relay(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
                hop.auth.append(self.headers.get("Authorization", ""))
                hop.sent += method == "POST"
                fault = always or (hop.faults.pop(0) if method == "POST" and hop.faults else None)
                hop.seen.append(fault or 200)
                if fault == "hang":
                    time.sleep(4)  # longer than the client's timeout
                    return
                if fault:
                    self.send_response(fault)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                hop.posts += method == "POST"
                req = urllib.request.Request(upstream + self.path, data=body, method=method,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    data = r.read()
                if method == "POST":  # what the teacher says it billed
                    usage = json.loads(data or b"{}").get("usage") or {}
                    hop.tokens["prompt"] += usage.get("prompt_tokens") or 0
                    hop.tokens["completion"] += usage.get("completion_tokens") or 0
                self.send_response(r.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._relay("GET")

            def do_POST(self):
                self._relay("POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()



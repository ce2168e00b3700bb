"""The embedded Prefect server `synthtune run` starts when no PREFECT_API_URL is set (a laptop).

It is a `prefect server start` child process, started by command (the library never imports
Prefect), tied to the CLI's life:
- in a session of its own, so a Ctrl-C in the terminal reaches the CLI (which stops training,
  releases the GPU slot and reports where the checkpoints are) and not the server it still needs;
- killed by the kernel when the CLI dies, however it dies (PR_SET_PDEATHSIG), so `kill -9` leaves
  no server behind;
- with concurrency leases stored on disk under PREFECT_HOME (Prefect keeps them in memory by
  default, so a server restart forgot them and a slot held at the time stayed taken forever), and
  the repossessor service reclaiming expired leases every few seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from synthtune.child import die_with_parent

# what the embedded server (and any server synthtune starts) runs with
SERVER_ENV = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180,
                 what: str = "the embedded Prefect server") -> None:
    """Wait until `url` answers (any status below 500); raises, with the end of `log`, when `proc`
    exits first or `timeout` seconds pass."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}); its log, {log}:\n" + log.read_text()[-2000:])
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s; see {log}:\n" + log.read_text()[-2000:])


EMBEDDED = "SYNTHTUNE_EMBEDDED_SERVER"


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """A Prefect server for this command only; yields its API URL (also set as PREFECT_API_URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "synthtune-server.log"
    env = {**os.environ, **SERVER_ENV}
    env.pop("PREFECT_API_URL", None)
    command = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
               str(port), "--no-ui", "--no-scheduler", "--no-late-runs"]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)
    previous = os.environ.get("PREFECT_API_URL")
    try:
        wait_healthy(f"{url}/health", proc, log)
        os.environ["PREFECT_API_URL"] = url
        os.environ[EMBEDDED] = url  # this command's own server, UI-less: nothing to link to
        yield url
    finally:
        os.environ.pop(EMBEDDED, None)
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

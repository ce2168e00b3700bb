"""A real OpenAI-compatible teacher for tests: `transformers serve` with the tiny teacher on 127.0.0.1,
behind a hop that counts generation requests and injects faults (status codes, hangs)."""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prefect_stack import free_port


@contextlib.contextmanager
def transformers_serve(path: str) -> Iterator[str]:
    """`transformers serve` of a local model folder; yields its base URL (without /v1)."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", path, "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("transformers serve did not come up")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class FaultyHop:
    """A proxy on 127.0.0.1: POSTs get the scripted faults first (status codes, 'hang', or None to
    pass one through), then pass; `posts` counts the generation requests that reached the teacher."""

    def __init__(self, upstream: str, faults: list, always: int | None = None):
        self.faults, self.seen, self.auth, self.posts = list(faults), [], [], 0
        hop = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _relay(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
                hop.auth.append(self.headers.get("Authorization", ""))
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



"""An OpenAI-compatible test server on 127.0.0.1 that answers every chat completion after a fixed
latency, with no concurrency limit of its own, so the ideal rate with K requests in flight is K/L. It
counts what it sees (requests, the most in flight at once, per-prompt requests, throttled answers),
and injects faults on request: a burst of 429s with Retry-After, a prompt that always fails.

Run as: python -m tests.support.latency_server --port 8123 --latency 0.25
Control: POST /control {"latency": s, "throttle": n, "retry_after": s, "fail_marker": "text", "reset": true}
Stats:   GET /stats
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

MODEL = "latency-teacher"


class State:
    def __init__(self, latency: float):
        self.latency = latency
        self.throttle = 0  # the next n requests get 429
        self.retry_after = 1.0
        self.fail_marker: str | None = None
        self.reset()

    def reset(self) -> None:
        self.first_request_at: float | None = None  # wall clock of the first request since the reset
        self.requests = self.in_flight = self.max_in_flight = self.throttled = self.failed = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.per_prompt: Counter[str] = Counter()

    def stats(self) -> dict:
        return {"requests": self.requests, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "throttled": self.throttled, "failed": self.failed, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "asked_twice": sum(v > 1 for v in self.per_prompt.values()),
                "distinct_prompts": len(self.per_prompt), "first_request_at": self.first_request_at}


def app(state: State):
    async def read_body(receive) -> bytes:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        return body

    async def send_json(send, status: int, obj, headers=()) -> None:
        data = json.dumps(obj).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": data})

    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if path.endswith("/models"):
            await send_json(send, 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
            return
        if path == "/stats":
            await send_json(send, 200, state.stats())
            return
        if path == "/control":
            control = json.loads(await read_body(receive) or b"{}")
            if control.get("reset"):  # counts and faults (the settings given with it apply after)
                state.reset()
                state.throttle, state.fail_marker = 0, None
            for name in ("latency", "throttle", "retry_after", "fail_marker"):
                if name in control:
                    setattr(state, name, control[name])
            await send_json(send, 200, state.stats())
            return
        if method != "POST" or not path.endswith("/chat/completions"):
            await send_json(send, 404, {"error": "not found"})
            return
        request = json.loads(await read_body(receive))
        prompt = request["messages"][-1]["content"]
        if state.first_request_at is None:
            state.first_request_at = time.time()
        state.requests += 1
        state.per_prompt[prompt] += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if state.throttle > 0:
                state.throttle -= 1
                state.throttled += 1
                await send_json(send, 429, {"error": {"message": "slow down", "type": "rate_limit"}},
                                [(b"retry-after", str(state.retry_after).encode())])
                return
            await asyncio.sleep(state.latency)
            if state.fail_marker and state.fail_marker in prompt:
                state.failed += 1
                await send_json(send, 500, {"error": {"message": "this prompt always fails", "type": "server_error"}})
                return
            text = f"An answer to: {prompt}"
            usage = {"prompt_tokens": len(prompt.split()) + 8, "completion_tokens": len(text.split())}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            state.prompt_tokens += usage["prompt_tokens"]
            state.completion_tokens += usage["completion_tokens"]
            await send_json(send, 200, {
                "id": f"chatcmpl-{state.requests}", "object": "chat.completion", "created": int(time.time()),
                "model": request.get("model", MODEL), "usage": usage,
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]})
        finally:
            state.in_flight -= 1

    return asgi


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.25)
    args = parser.parse_args()
    uvicorn.run(app(State(args.latency)), host="127.0.0.1", port=args.port, log_level="warning",
                backlog=4096, limit_concurrency=None, timeout_keep_alive=30)


class Server:
    """A running latency server (a subprocess of its own, so it never shares a GIL with what it serves)."""

    def __init__(self, url: str, proc: subprocess.Popen):
        self.base, self.url, self.proc = url, f"{url}/v1", proc

    def _call(self, path: str, body: dict | None = None) -> dict:
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict:
        return self._call("/stats")

    def control(self, **settings) -> dict:
        return self._call("/control", settings)


@contextlib.contextmanager
def latency_server(latency: float = 0.25) -> Iterator[Server]:
    from synthtune.server import free_port, wait_healthy

    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"synthtune-latency-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.latency_server", "--port", str(port), "--latency",
                             str(latency)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        wait_healthy(f"http://127.0.0.1:{port}/stats", proc, log, 60, "the latency server")
        yield Server(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()

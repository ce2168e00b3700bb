"""Run a stage body in a fresh (spawned) child process.

Why: distilabel forks worker processes; a fork taken after torch has spun up its thread pools in
the parent (any earlier training or evaluation in the same process) can deadlock. A spawned child
starts clean, and whatever the body does to logging, signals or GPU memory ends with it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import threading
import traceback
from collections.abc import Callable
from typing import Any


class ChildError(RuntimeError):
    """The child raised; the message carries its type, message and traceback."""


# child processes doing a stage's work (distilabel, training) that an interrupted command must stop
_LIVE: set = set()
_LIVE_LOCK = threading.Lock()


def track(proc) -> None:
    with _LIVE_LOCK:
        _LIVE.add(proc)


def untrack(proc) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def stop_all(grace: float = 5.0) -> int:
    """Stop every tracked child and what it started (SIGTERM, then SIGKILL after `grace` seconds);
    returns how many there were. Safe to call from a signal handler's thread."""
    import signal

    import psutil

    with _LIVE_LOCK:
        procs = list(_LIVE)
    tree = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            tree += [root, *root.children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    kill_survivors(tree, grace)
    return len(procs)


def kill_survivors(procs: list, grace: float) -> None:
    """SIGKILL whichever of `procs` (psutil processes already asked to stop) still run after `grace` s."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def die_with_parent(sig: int | None = None) -> None:
    """In a child: the kernel sends `sig` (SIGTERM by default) when the parent dies, however it dies
    (`kill -9` included), so no stage's work outlives the command that started it. Linux only."""
    import signal

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig or signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def ranks_command(module: str, spec, ranks: int, device: str, accelerate: list[str]) -> list[str]:
    """`python -m module spec` on `ranks` processes: on a CPU torch's own launcher, one gloo rank per
    process (what `accelerate launch` starts on GPUs: accelerate's CPU path wants MPI); on GPUs
    `accelerate launch` with the `accelerate` flags (the process count among them)."""
    import sys

    launcher = (["torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if device == "cpu"
                else ["accelerate.commands.launch", *accelerate])
    return [sys.executable, "-m", *launcher, "-m", module, str(spec)]


def run_group(cmd: list[str], progress_file=None, kind: str = "train") -> int:
    """Run `cmd` (a training or evaluation child, or a launcher and its ranks) in its own process
    group and return its exit code; whatever happens here, the group dies. It is tracked, so an
    interrupted command (Ctrl-C) stops it at once (stop_all). Its output goes to the run's log file
    when there is one; each JSON line it appends to `progress_file` is forwarded as a `kind` event."""
    import os
    import signal
    import subprocess

    from synthtune import tracking

    log_file = os.environ.get("SYNTHTUNE_LOG_FILE")
    out = open(log_file, "a") if log_file else None  # noqa: SIM115  (closed below)
    env = {**os.environ, **tracking.child_env()}  # TRL's metrics go into this pipeline run's MLflow run
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=out, stderr=out, preexec_fn=die_with_parent, env=env)
    track(proc)
    try:
        if progress_file is None:
            return proc.wait()
        return _forward_progress(proc, progress_file, kind)
    finally:
        if out is not None:
            out.close()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        untrack(proc)


def _forward_progress(proc, path, kind: str) -> int:
    """Wait for the child, forwarding each progress line it writes as a `kind` event."""
    import json
    import time

    from synthtune import progress

    offset = 0
    while True:
        rc = proc.poll()
        if path.exists() and progress.active():
            with open(path) as f:
                f.seek(offset)
                for line in f:
                    if line.endswith("\n"):
                        offset += len(line.encode())
                        with contextlib.suppress(ValueError):
                            progress.emit(kind, **json.loads(line))
        if rc is not None:
            return rc
        time.sleep(0.5)


def _stop_descendants_on_term() -> None:
    """SIGTERM (from the parent's death or stop_all) takes this child's own workers down with it."""
    import os
    import signal

    def handler(signum, frame):
        import psutil

        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                p.kill()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _entry(conn, fn, args, kwargs, log_queue=None, log_name=None) -> None:
    import os

    die_with_parent()
    _stop_descendants_on_term()

    if log_file := os.environ.get("SYNTHTUNE_LOG_FILE"):  # the child's prints and warnings go to the run's log
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    if log_queue is not None:  # forward this logger's records (and its children's) to the parent
        import logging.handlers

        forwarded = logging.getLogger(log_name)
        forwarded.addHandler(logging.handlers.QueueHandler(log_queue))
        forwarded.setLevel(min(forwarded.getEffectiveLevel(), logging.INFO))  # the root's WARNING would drop them
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException as e:  # report everything, including KeyboardInterrupt, to the parent
        conn.send(("error", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        conn.close()


def _drain(queue, on_log) -> None:
    while (record := queue.get()) is not None:
        try:
            on_log(record)
        except Exception:  # a broken log sink must not break the run
            pass


def call_in_child(fn: Callable[..., Any], *args: Any, on_log: Callable[[logging.LogRecord], None] | None = None,
                  log_name: str | None = None, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a spawned process; its return value must pickle. Errors re-raise here
    with the child's traceback; if the parent is interrupted the child is killed. With `on_log`, the
    records of logger `log_name` (and below) in the child are passed to it here, as they happen."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    queue = ctx.Queue() if on_log else None
    proc = ctx.Process(target=_entry, args=(child, fn, args, kwargs, queue, log_name), daemon=False)
    proc.start()
    track(proc)
    child.close()
    listener = None
    if queue is not None:
        listener = threading.Thread(target=_drain, args=(queue, on_log), daemon=True)
        listener.start()
    try:
        try:
            status, payload = parent.recv()
        except EOFError:
            proc.join()
            raise ChildError(f"{getattr(fn, '__name__', fn)} died without a result (exit code {proc.exitcode})") from None
        proc.join()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        untrack(proc)
        if queue is not None:
            queue.put(None)
            listener.join(timeout=10)
    if status == "error":
        name, message, tb = payload
        raise ChildError(f"{name}: {message}\n--- in child process ---\n{tb}")
    return payload

"""A flow run that follows the worker that started it, and gives the GPU slot back when it dies.

`follow_the_worker()`: a flow run a worker started ends when that worker dies, instead of training
on unsupervised or failing on a BrokenPipeError from the first line it prints: it sends itself
SIGTERM, so Prefect records it `Crashed` and runs its on_crashed hooks (`give_back_gpu`); the
training child dies with it. A run whose whole machine is gone stops sending heartbeats, and the
zombie automation (deployments/automations.py) marks it `Crashed`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

from prefect.runtime import deployment

from synthtune.terminal import redirect_stream_handlers
from tasks.gpu_slot import release_for_flow_run, slot_name


class _PipeGuard:
    """A stdout/stderr whose reader (the worker) died: writes are dropped, not raised as
    BrokenPipeError into whatever stage happened to print, and the watchdog is woken."""

    def __init__(self, stream, broken: threading.Event) -> None:
        self._stream, self._broken = stream, broken

    def write(self, text: str) -> int:
        if not self._broken.is_set():
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):
                self._broken.set()
        return len(text)

    def flush(self) -> None:
        if not self._broken.is_set():
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._broken.set()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def follow_the_worker() -> None:
    """End this flow run (SIGTERM to itself) when the worker that started it is gone."""
    if not deployment.get_id():  # the CLI's own process: nothing to follow
        return
    worker, broken = os.getppid(), threading.Event()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        guard = _PipeGuard(stream, broken)
        redirect_stream_handlers(stream, guard)
        setattr(sys, name, guard)

    def watch() -> None:
        while os.getppid() == worker and not broken.wait(1):
            pass
        logging.getLogger("synthtune").error("the worker (pid %d) is gone: ending this flow run", worker)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="synthtune-follow-worker", daemon=True).start()


def give_back_gpu(flow, flow_run, state) -> None:
    """on_crashed / on_cancellation: a run that dies holding the GPU slot gives it back now, not when its
    lease runs out, and a split-mode run's GPU child is cancelled with it, at once (the server's own
    cleanup of orphaned subflows runs only every 20 s). Prefect calls hooks positionally in the flow's
    process and by keyword in the runner's, so the names are its own."""
    with contextlib.suppress(Exception):
        release_for_flow_run(slot_name(flow_run.parameters.get("gpu_slot", "")), str(flow_run.id))
    if flow_run.parameters.get("gpu_deployment") and (state.is_cancelled() or state.is_cancelling()):
        with contextlib.suppress(Exception):
            cancel_children(flow_run.id)


def cancel_children(run_id) -> None:
    """Cancel the flow runs started by run `run_id` that have not ended."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        for child in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))):
            if child.state is None or not child.state.is_final():
                client.set_flow_run_state(child.id, Cancelling(message=f"its parent run {run_id} was cancelled"),
                                          force=True)

"""The worker's GPU slot: a Prefect global concurrency limit of 1 held around the GPU stages.

Named `gpu:<host>` unless `SYNTHTUNE_GPU_SLOT` (or the flow's `gpu_slot`) says otherwise, so two
runs on one machine never share its GPU. Getting it back when a holder dies matters as much as
holding it (a nightly that waits forever behind a dead run is worse than no lock):

- the slot is held with Prefect's public `concurrency(name, occupy=1, lease_duration=LEASE_S)`: a
  *lease*, renewed while held; the server's repossessor takes it back `LEASE_S` after the last
  renewal. The embedded server keeps leases on disk (synthtune.server), so a server restart does not
  forget them;
- the holder is recorded in a Prefect Variable (`synthtune-gpu-slot-<name>`: lease, flow run,
  host, pid). A waiter checks it every `POLL_S`: a holder whose process is gone (same host) or
  whose flow run has ended (any host) is reported in the log and its lease released at once through
  the client's `release_concurrency_slots_with_lease`, without waiting for the lease to run out. The
  lease id of our own hold comes from the `ConcurrencyContext` that Prefect records granted leases
  in (so it can release them if the holder is cancelled);
- a flow that crashes or is cancelled releases it in its hooks (`release_for_flow_run`).

Only public Prefect API is used (tests/test_architecture.py checks no `prefect._*` module is imported).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.context import ConcurrencyContext
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.variables import Variable

LEASE_S = 60.0  # a dead holder's slot comes back at most this long after its last renewal
POLL_S = 10.0  # how often a waiter looks at who holds the slot
ENDED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def slot_name(gpu_slot: str = "") -> str:
    return gpu_slot or os.environ.get("SYNTHTUNE_GPU_SLOT") or f"gpu:{socket.gethostname()}"


def holder_variable(name: str) -> str:
    """The Variable naming the slot's holder (variable names allow letters, digits, - and _)."""
    return "synthtune-gpu-slot-" + re.sub(r"[^a-z0-9_-]", "-", name.lower())


def _ensure_limit(name: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def _process_alive(pid: int, create_time: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 1.0  # not a reused pid
    except psutil.NoSuchProcess:
        return False


def _why_gone(holder: dict) -> str | None:
    """Why `holder` no longer holds the slot in fact, or None when it may still be working."""
    if holder.get("host") == socket.gethostname() and not _process_alive(holder["pid"], holder["create_time"]):
        return f"its process {holder['pid']} on {holder['host']} is gone"
    if run_id := holder.get("flow_run_id"):
        with get_client(sync_client=True) as client:
            try:
                state = client.read_flow_run(UUID(run_id)).state
            except ObjectNotFound:
                return f"its flow run {run_id} no longer exists"
        if state is not None and state.type.value in ENDED:
            return f"its flow run {run_id} ended {state.name}"
    return None


def _release(lease_id: str) -> bool:
    """Release a lease; False when the server no longer knows it (already released or repossessed)."""
    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(UUID(lease_id))
        return True
    except Exception:  # 404 for an unknown lease
        return False


def _forget_holder(name: str, lease_id: str) -> None:
    """Clear the slot's holder record if it still names `lease_id` (a newer holder's stays)."""
    variable = holder_variable(name)
    with contextlib.suppress(Exception):
        if (Variable.get(variable, default=None) or {}).get("lease_id") == lease_id:
            Variable.unset(variable)


def reclaim_if_stale(name: str, log) -> bool:
    """Release the slot's lease if its recorded holder is gone; True if it did."""
    variable = holder_variable(name)
    holder = Variable.get(variable, default=None)
    if not isinstance(holder, dict) or not holder.get("lease_id"):
        return False
    reason = _why_gone(holder)
    if reason is None:
        log.info("GPU slot %s is held by flow run %s (pid %s on %s) since %s", name, holder.get("flow_run_id"),
                 holder.get("pid"), holder.get("host"), holder.get("since"))
        return False
    released = _release(holder["lease_id"])
    _forget_holder(name, holder["lease_id"])
    log.warning("GPU slot %s: stale holder (flow run %s, pid %s on %s, since %s): %s; %s", name,
                holder.get("flow_run_id"), holder.get("pid"), holder.get("host"), holder.get("since"), reason,
                "released its lease" if released else "its lease was already gone")
    return released


@contextlib.contextmanager
def hold(name: str, lease_s: float = LEASE_S, poll_s: float = POLL_S) -> Iterator[None]:
    """One holder at a time on `name` (created with limit 1 if missing). Waits as long as it takes
    for a live holder, but never for a dead one."""
    import psutil

    log = get_run_logger()
    _ensure_limit(name)
    run_id = flow_run.get_id()
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id)) if run_id else None
    log.info("waiting for GPU slot %s", name)
    wait = 1.0  # a slot that is free (or held by the dead) is taken within a second or two
    with ConcurrencyContext() as granted:
        while True:
            held = False
            try:
                with concurrency(name, occupy=1, timeout_seconds=wait, lease_duration=lease_s, strict=True,
                                 holder=holder, raise_on_lease_renewal_failure=False):
                    held = True
                    me = psutil.Process()
                    record = {"lease_id": str(granted.cleanup_lease_ids[-1]), "flow_run_id": run_id,
                              "host": socket.gethostname(), "pid": me.pid, "create_time": me.create_time(),
                              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                    Variable.set(holder_variable(name), record, overwrite=True)
                    log.info("holding GPU slot %s", name)
                    try:
                        yield
                    finally:
                        _forget_holder(name, record["lease_id"])
                return
            except TimeoutError:
                if held:  # the work inside timed out, not the wait for the slot
                    raise
                reclaim_if_stale(name, log)
                wait = poll_s


def release_for_flow_run(name: str, flow_run_id: str) -> bool:
    """Release the slot if `flow_run_id` holds it (a crashed or cancelled flow's hook)."""
    variable = holder_variable(name)
    holder = Variable.get(variable, default=None)
    if not isinstance(holder, dict) or holder.get("flow_run_id") != flow_run_id:
        return False
    released = _release(holder["lease_id"])
    with contextlib.suppress(Exception):
        Variable.unset(variable)
    return released

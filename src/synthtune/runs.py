"""Runs in flight on an artifact root, so `gc` never deletes what a running or waiting run uses.

A run (the CLI's, or each Prefect flow-run process: a split run's parent and GPU child hold one
each) keeps a lease file, `{root}/runs/{pipeline}/{run_id}.json`: its host and pid, when it expires,
and every output it has used so far (`stage/key`). The runner notes an output before the step that
makes or reuses it runs, so gc (which re-reads the leases under each output's lock just before
deleting it) either sees the use, or deletes first and the run rebuilds the output. The lease is
renewed every `RENEW_S` while the process lives; a killed run's lease runs out after `LEASE_S`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

from synthtune.atomic import write_bytes

RUNS = "runs"
LEASE_S = 600.0
RENEW_S = 60.0

_ACTIVE: list[RunLease] = []
_LOCK = threading.Lock()


class RunLease:
    """The lease of one run on one root (see the module docstring)."""

    def __init__(self, store, pipeline: str, run_id: str):
        self.store, self.pipeline, self.run_id = store, pipeline, run_id
        self.path = store.path(RUNS, pipeline, f"{run_id}.json")
        self.outputs: set[str] = set()
        self.started = time.time()
        self._stop = threading.Event()
        self._write_lock = threading.Lock()

    def record(self) -> dict:
        return {"pipeline": self.pipeline, "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                "started": self.started, "expires": time.time() + LEASE_S, "outputs": sorted(self.outputs)}

    def write(self) -> None:
        with self._write_lock:
            write_bytes(self.store.fs, self.path, json.dumps(self.record()).encode())

    def use(self, stage: str, key: str) -> None:
        """Note that this run uses output `stage/key` (written at once: gc must see it before the run reads it)."""
        if f"{stage}/{key}" not in self.outputs:
            self.outputs.add(f"{stage}/{key}")
            self.write()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the lease outlives several
                self.write()

    def __enter__(self) -> RunLease:
        self.store.fs.makedirs(self.store.path(RUNS, self.pipeline), exist_ok=True)
        self.write()
        threading.Thread(target=self._renew, name="synthtune-run-lease", daemon=True).start()
        with _LOCK:
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with _LOCK:
            _ACTIVE.remove(self)
        with contextlib.suppress(FileNotFoundError):
            self.store.fs.rm(self.path)


def leased(store, pipeline: str, run_id: str) -> RunLease:
    """`with leased(store, cfg.name, run_id):` around a run (or one process's part of it)."""
    return RunLease(store, pipeline, run_id)


def using(store, stage: str, key: str) -> None:
    """Note `stage/key` in every lease this process holds on `store`'s root."""
    with _LOCK:
        leases = [lease for lease in _ACTIVE if lease.store.uri() == store.uri()]
    for lease in leases:
        lease.use(stage, key)


def live(store) -> dict[str, dict]:
    """`stage/key` -> the live run using it (expired leases are skipped)."""
    out: dict[str, dict] = {}
    base = store.path(RUNS)
    if not store.fs.exists(base):
        return out
    now = time.time()
    for path in store.fs.find(base):
        if not path.endswith(".json"):
            continue
        try:
            record = json.loads(store.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            continue  # ended (or being written) meanwhile
        if record.get("expires", 0) < now:
            continue
        for output in record.get("outputs", []):
            out.setdefault(output, record)
    return out


def expired(store) -> list[str]:
    """Lease files of runs that stopped renewing (their process is gone)."""
    base = store.path(RUNS)
    if not store.fs.exists(base):
        return []
    out, now = [], time.time()
    for path in store.fs.find(base):
        with contextlib.suppress(FileNotFoundError, ValueError):
            if path.endswith(".json") and json.loads(store.fs.cat_file(path)).get("expires", 0) < now:
                out.append(path)
    return out

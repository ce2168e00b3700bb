"""What `synthtune gc` may delete from an artifact root, and what it must keep.

Kept, always:
- the champion and the last `keep` promoted adapters, each with the data behind it (template,
  filter, generate), its evaluations and its decisions, so any of them can be rolled back to;
- every base evaluation (no adapter: reused night after night);
- everything written after the newest decision (a run still in flight, or not decided yet), and the
  candidate of that newest decision (so the latest night can still be inspected);
- unfinished outputs (no manifest: someone may be writing them), the row cache, the registry,
  Prefect's results of kept outputs, locks.
Deleted: the other finished stage outputs (old candidates, their evaluations and decisions, the
data of old nights), their Prefect cache records, and training checkpoints of decided nights that
no process holds.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

from synthtune import STAGES
from synthtune.registry import Registry
from synthtune.store import MANIFEST, ArtifactStore


@dataclass
class GcPlan:
    delete: list[tuple[str, str, int]] = field(default_factory=list)  # (path under the root, why, bytes)
    keep: dict[str, str] = field(default_factory=dict)  # "stage/key" -> why it is kept

    @property
    def bytes(self) -> int:
        return sum(b for _, _, b in self.delete)


def _size(store: ArtifactStore, path: str) -> int:
    with contextlib.suppress(FileNotFoundError):
        return sum(info.get("size", 0) or 0 for info in store.fs.find(path, detail=True).values())
    return 0


def _outputs(store: ArtifactStore) -> dict[str, dict]:
    """'stage/key' -> manifest, for every finished stage output under the root."""
    out = {}
    for stage in STAGES:
        base = store.path(stage)
        if not store.fs.exists(base):
            continue
        for entry in store.fs.ls(base, detail=False):
            key = entry.rstrip("/").rsplit("/", 1)[-1]
            if key.startswith("."):
                continue
            manifest = store.manifest(stage, key)
            if manifest is not None:
                out[f"{stage}/{key}"] = manifest
    return out


def plan_gc(store: ArtifactStore, keep: int) -> GcPlan:
    registry = Registry(store)
    history, champion = registry.history(), registry.champion()
    outputs = _outputs(store)
    plan = GcPlan()
    decisions = [e for e in history if e.get("event") == "decision"]
    newest = max((e.get("time", "") for e in history), default="")
    pinned = {e["train_key"]: "one of the last promoted adapters" for e in registry.promoted()[-keep:]} if keep else {}
    if champion:
        pinned[champion["train_key"]] = "the champion"
    if decisions:
        pinned.setdefault(decisions[-1]["train_key"], "the candidate of the newest decision")

    def protect(ref: str, why: str) -> None:
        if ref in outputs and ref not in plan.keep:
            plan.keep[ref] = why
            for stage, key in (outputs[ref].get("upstream") or {}).items():
                protect(f"{'evaluate' if stage in ('base', 'tuned', 'champion') else stage}/{key}", why)

    for train_key, why in pinned.items():
        protect(f"train/{train_key}", why)
    for ref, manifest in outputs.items():
        upstream = manifest.get("upstream") or {}
        stage = ref.split("/")[0]
        if stage == "evaluate" and "train" not in upstream:
            protect(ref, "a base evaluation")
        elif stage in ("evaluate", "promote") and upstream.get("train") in pinned:
            protect(ref, pinned[upstream["train"]])
        elif manifest.get("created_at", "") > newest:
            protect(ref, "written after the newest decision (a run in flight)")
        elif stage == "preflight":
            protect(ref, "preflight (a few bytes)")
    for ref in outputs:
        if ref not in plan.keep:
            stage, key = ref.split("/")
            plan.delete.append((ref, "not in the retention policy", _size(store, store.path(stage, key))))
            result = store.path(".prefect-results", f"{stage}-{key}")
            if store.fs.exists(result):
                plan.delete.append((f".prefect-results/{stage}-{key}", f"Prefect's cache record of {ref}", 0))
    work = store.path("train", ".work")
    if store.fs.exists(work):
        for entry in store.fs.ls(work, detail=False):
            key = entry.rstrip("/").rsplit("/", 1)[-1]
            leftover = f"train/{key}" in outputs and f"train/{key}" not in plan.keep
            if leftover or _idle_checkpoints(store, key, newest):
                plan.delete.append((f"train/.work/{key}", "checkpoints of a decided night", _size(store, entry)))
    return plan


def _idle_checkpoints(store: ArtifactStore, key: str, newest: str) -> bool:
    """Checkpoints no process holds, last written before the newest decision."""
    if not store.local:
        return False  # remote roots keep checkpoints in each machine's local cache, not here
    path = store.path("train", ".work", key)
    with contextlib.suppress(OSError):
        written = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.path.getmtime(path)))
        return bool(newest) and written < newest and not _held(store, "train", key)
    return False


def _held(store: ArtifactStore, stage: str, key: str) -> bool:
    """Whether a producer holds the lock of `stage/key` (local roots: a non-blocking flock probe)."""
    import fcntl

    path = store.key_lock_path(stage, key)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def apply_gc(store: ArtifactStore, plan: GcPlan) -> None:
    for path, _, _ in plan.delete:
        parts = path.split("/")
        if parts[-1] != MANIFEST:  # drop the manifest first: a half-deleted output never looks finished
            with contextlib.suppress(FileNotFoundError):
                store.fs.rm(store.path(*parts, MANIFEST))
        with contextlib.suppress(FileNotFoundError):
            store.fs.rm(store.path(*parts), recursive=True)

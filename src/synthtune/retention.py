"""What `synthtune gc` may delete from an artifact root for one pipeline, and what it must keep.

Kept, always:
- every pipeline's champion, with the data behind it (template, filter, generate), its evaluations and
  its decisions;
- of the pipeline collected: its last `keep` promoted adapters and the candidate of its newest
  decision, each with its lineage, so any of them can be rolled back to or inspected;
- everything another pipeline's registry references (every adapter it ever judged, with its lineage)
  and every output another pipeline wrote: gc of one pipeline never touches another's;
- every output a run in flight uses (its lease on the root, synthtune.runs): data made by a run that
  still trains, or that waits for the GPU behind another;
- every base evaluation (no adapter: reused night after night), preflight records, the row cache, the
  registries, unfinished outputs (no manifest: someone may be writing them), locks;
- training checkpoints of a night that was never decided (Ctrl-C said the same command resumes from
  them), and of any night a process is still writing.
Deleted: the pipeline's other finished outputs (old candidates, their evaluations and decisions, the
data of old nights), checkpoints of decided nights, and leases of runs whose process is gone.

gc holds the pipeline's registry lock throughout (a rollback waits, and the champion is read again
under it), and deletes each output under that output's own lock after checking once more that no
run has started using it. Prefect's result records of roots written by earlier versions are left
alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from synthtune import STAGES, runs
from synthtune.registry import Registry, derive, pipelines
from synthtune.store import MANIFEST, ArtifactStore


@dataclass
class GcPlan:
    delete: list[tuple[str, str, int]] = field(default_factory=list)  # (path under the root, why, bytes)
    keep: dict[str, str] = field(default_factory=dict)  # "stage/key" -> why it is kept
    deleted: list[str] = field(default_factory=list)  # what apply removed
    skipped: list[str] = field(default_factory=list)  # planned, but a run started using it meanwhile

    @property
    def bytes(self) -> int:
        return sum(b for _, _, b in self.delete)


def _size(store: ArtifactStore, path: str) -> int:
    with contextlib.suppress(FileNotFoundError):
        return sum(info.get("size", 0) or 0 for info in store.fs.find(path, detail=True).values())
    return 0


def outputs(store: ArtifactStore) -> dict[str, dict]:
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


def _upstream_ref(name: str, key: str) -> str:
    """An upstream entry of a manifest as 'stage/key' (evaluations are named by role: base, tuned, champion)."""
    return f"{'evaluate' if name in ('base', 'tuned', 'champion') else name}/{key}"


def plan_gc(store: ArtifactStore, pipeline: str, keep: int) -> GcPlan:
    """What gc of `pipeline` would delete, and why everything else stays (call under its registry lock)."""
    found = outputs(store)
    live = runs.live(store)
    plan = GcPlan()
    pinned: dict[str, str] = {}  # train key -> why
    decided: set[str] = set()
    for name in sorted({*pipelines(store), pipeline}):
        registry = Registry(store, name)
        history = registry.history()
        decided |= {e["train_key"] for e in history if e.get("event") == "decision"}
        champion = derive(history)
        if champion:
            pinned[champion["train_key"]] = f"the champion of pipeline {name}"
        if name == pipeline:
            if keep:
                for e in registry.promoted()[-keep:]:
                    pinned.setdefault(e["train_key"], f"one of {name}'s last {keep} promoted adapters")
            decisions = [e for e in history if e.get("event") == "decision"]
            if decisions:
                pinned.setdefault(decisions[-1]["train_key"], f"the candidate of {name}'s newest decision")
        else:
            for e in history:
                pinned.setdefault(e["train_key"], f"in pipeline {name}'s registry")

    def protect(ref: str, why: str) -> None:
        if ref in found and ref not in plan.keep:
            plan.keep[ref] = why
            for up, key in (found[ref].get("upstream") or {}).items():
                protect(_upstream_ref(up, key), why)

    for train_key, why in pinned.items():
        protect(f"train/{train_key}", why)
    for ref, run in live.items():
        protect(ref, f"in use by run {run.get('run_id')} of pipeline {run.get('pipeline')} (pid {run.get('pid')} on "
                     f"{run.get('host')})")
    for ref, manifest in found.items():
        stage, owner = ref.split("/")[0], manifest.get("pipeline")
        upstream = manifest.get("upstream") or {}
        if stage == "evaluate" and "train" not in upstream:
            protect(ref, "a base evaluation")
        elif stage in ("evaluate", "promote") and upstream.get("train") in pinned:
            protect(ref, pinned[upstream["train"]])
        elif stage == "preflight":
            protect(ref, "preflight (a few bytes)")
        elif owner not in (None, pipeline):
            protect(ref, f"written by pipeline {owner}")
    for ref in found:
        if ref not in plan.keep:
            stage, key = ref.split("/")
            plan.delete.append((ref, "not in the retention policy", _size(store, store.path(stage, key))))
    work = store.path("train", ".work")
    if store.fs.exists(work):
        for entry in store.fs.ls(work, detail=False):
            key = entry.rstrip("/").rsplit("/", 1)[-1]
            if key in decided and f"train/{key}" not in live and not _held(store, "train", key):
                plan.delete.append((f"train/.work/{key}", "checkpoints of a decided night", _size(store, entry)))
            else:
                plan.keep[f"train/.work/{key}"] = ("checkpoints of a night never decided (the same command resumes "
                                                   "from them)" if key not in decided else "checkpoints in use")
    for path in runs.expired(store):
        plan.delete.append((path[len(store.path()) + 1:], "the lease of a run whose process is gone", 0))
    return plan


def _held(store: ArtifactStore, stage: str, key: str) -> bool:
    """Whether a producer holds the lock of `stage/key` (local roots: a non-blocking flock probe)."""
    import os

    if not store.local:
        return False
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


def collect(store: ArtifactStore, pipeline: str, keep: int, dry_run: bool = False, on_planned=None) -> GcPlan:
    """Plan gc of `pipeline` and, unless `dry_run`, apply it: all under the pipeline's registry lock,
    each output deleted under its own lock once no run uses it."""
    registry = Registry(store, pipeline)
    with registry.locked("gc"):
        registry.champion()  # read again under the lock (and champion.json made to agree with the history)
        plan = plan_gc(store, pipeline, keep)
        if on_planned:
            on_planned(plan)
        if dry_run:
            return plan
        for path, _, _ in plan.delete:
            parts = path.split("/")
            if parts[0] in STAGES and len(parts) == 2:
                with store.key_lock(*parts):
                    if path in runs.live(store):  # a run started using it after the plan: it stays
                        plan.skipped.append(path)
                        continue
                    with contextlib.suppress(FileNotFoundError):  # first: a half-deleted output never looks finished
                        store.fs.rm(store.path(*parts, MANIFEST))
                    with contextlib.suppress(FileNotFoundError):
                        store.fs.rm(store.path(*parts), recursive=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    store.fs.rm(store.path(*parts), recursive=True)
            plan.deleted.append(path)
    return plan

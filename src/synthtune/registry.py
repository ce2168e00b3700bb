"""The model registry on the artifact root: one per pipeline, every gate decision and rollback, and the
model in service derived from them.

    {artifact_root}/registry/{pipeline}/history.jsonl   append-only, the one source of truth: one JSON
                                                        object per event (a gate decision or a rollback),
                                                        oldest first
    {artifact_root}/registry/{pipeline}/champion.json   the model in service: the last promotion or
                                                        rollback in the history, written out for people
                                                        and tools (a serving script, say)
    {artifact_root}/registry/{pipeline}/latest.json     the same record, where tools that predate the
                                                        registry look
    {artifact_root}/registry/{pipeline}/pipeline.json   the config file the pipeline last ran from

Stage outputs are content-addressed and may be shared by pipelines; what each pipeline references
(its champion, its candidates) is known from its own registry. Paths in registry files are relative
to the artifact root, so a root that is moved or copied works where it now lives.

The champion is a pure function of the history (`derive`): a decision is appended first, and
champion.json and latest.json are derived from the history after it. A crash between the writes
leaves them stale, never wrong: every reader derives the champion from the history and writes the
files again when they differ (logged). A missing or corrupt champion file is rebuilt the same way;
an event id already in the history is never appended twice. Every write takes the pipeline's
registry lock (synthtune.atomic: flock locally, an exclusively created lock object on S3) and
replaces files whole. A history line that is not a JSON object is an error naming file and line:
the gate never guesses which model is in service.

A root written before registries were per pipeline (`registry/history.jsonl` and `{root}/latest.json`)
is migrated on first use: each event goes to the registry of the pipeline that wrote it, and the old
files are kept under `registry/.flat/`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from synthtune.atomic import lock, write_bytes
from synthtune.store import ArtifactStore

log = logging.getLogger("synthtune.registry")
REGISTRY = "registry"
CHAMPION_FIELDS = ("train_key", "adapter", "scores", "promoted_at")
FILES = ("history.jsonl", "champion.json", "latest.json")


class RegistryError(ValueError):
    """The registry cannot be read or cannot do what was asked; the message names the file or key."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def adapter_path(train_key: str) -> str:
    """Where a train output's adapter is, relative to the artifact root (what registry files record)."""
    return f"train/{train_key}/adapter"


def champion_record(event: dict, promoted_at: str | None = None, **extra) -> dict:
    """The champion.json record of a promoting decision."""
    keep = ("train_key", "scores", "base_scores", "pipeline", "student", "data_keys", "config", "config_sha256",
            "run_id", "init")
    return {**{k: event.get(k) for k in keep}, "adapter": adapter_path(event["train_key"]), "event_id": event.get("id"),
            "promoted_at": promoted_at or event.get("time") or now(), **extra}


def derive(history: list[dict]) -> dict | None:
    """The model in service after `history`: the last promotion or rollback wins."""
    champion, promoted = None, {}
    for e in history:
        if e.get("event") == "decision" and e.get("promoted"):
            promoted[e["train_key"]] = e
            champion = champion_record(e)
        elif e.get("event") == "rollback":
            target = promoted.get(e["train_key"], e)
            champion = champion_record(target, promoted_at=e.get("time"), rolled_back_from=e.get("from_train_key"),
                                       event_id=e.get("id"))
    return champion


def pipelines(store: ArtifactStore) -> list[str]:
    """The pipelines with a registry on this root."""
    migrate_flat(store)
    base = store.path(REGISTRY)
    if not store.fs.exists(base):
        return []
    names = []
    for entry in store.fs.ls(base, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "directory" and not name.startswith("."):
            names.append(name)
    return sorted(names)


class Registry:
    """The registry of pipeline `pipeline` on the artifact root `store`."""

    def __init__(self, store: ArtifactStore, pipeline: str, migrate: bool = True):
        self.store, self.fs, self.pipeline = store, store.fs, pipeline
        if migrate:
            migrate_flat(store, pipeline)
        self.history_path = store.path(REGISTRY, pipeline, "history.jsonl")
        self.champion_path = store.path(REGISTRY, pipeline, "champion.json")
        self.latest_path = store.path(REGISTRY, pipeline, "latest.json")

    def uri(self, name: str) -> str:
        return self.store.uri(REGISTRY, self.pipeline, name)

    def adapter_uri(self, record: dict) -> str:
        """The adapter of a registry record, where it is on this root now."""
        return self.store.uri(adapter_path(record["train_key"]))

    # ---------------------------------------------------------------- reading

    def _text(self, path: str) -> str | None:
        try:
            return self.fs.cat_file(path).decode()
        except FileNotFoundError:
            return None

    def history(self) -> list[dict]:
        """Every event, oldest first. A line that is not a JSON object is an error naming it."""
        events = []
        for n, line in enumerate((self._text(self.history_path) or "").splitlines(), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as e:
                raise RegistryError(f"{self.uri('history.jsonl')}:{n}: not JSON ({e}): a torn or edited line. The "
                                    "champion is derived from this file: restore the line, or remove it if it is a "
                                    "partial write") from None
            if not isinstance(event, dict) or "event" not in event or "train_key" not in event:
                raise RegistryError(f"{self.uri('history.jsonl')}:{n}: not a registry event (a JSON object with "
                                    "`event` and `train_key`); fix or remove that line")
            events.append(event)
        return events

    def _stored(self, path: str) -> Any:
        """A champion file as stored: its record, None when missing, or the text when it does not parse."""
        text = self._text(path)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text

    def champion(self) -> dict | None:
        """The model in service (None before the first promotion), derived from the history; champion.json
        and latest.json are written again when they disagree with it (a crash between writes, a file
        removed or corrupted), with a log line."""
        derived = derive(self.history())
        if derived is not None and (self._stored(self.champion_path) != derived or self._stored(self.latest_path) != derived):
            with self._lock("registry: rebuilding champion.json from the history"):
                derived = self._sync(derive(self.history()))
        return derived

    def _sync(self, derived: dict | None, repair: bool = True) -> dict | None:
        """champion.json and latest.json made equal to `derived` (under the lock); a file found wrong is
        logged when this repairs it (`repair`), not when it applies a decision or rollback just recorded."""
        if derived is None:
            return None
        data = json.dumps(derived, indent=2, default=str).encode()
        for path, name in ((self.champion_path, "champion.json"), (self.latest_path, "latest.json")):
            stored = self._stored(path)
            if stored != derived:
                if repair and stored is not None:
                    why = "is corrupt" if isinstance(stored, str) else f"says {stored.get('train_key')}"
                    log.warning("%s %s; the history says %s is in service: rebuilt from the history", self.uri(name),
                                why, derived["train_key"])
                elif repair and name == "champion.json":
                    log.warning("%s is missing; rebuilt from the history (%s is in service)", self.uri(name),
                                derived["train_key"])
                write_bytes(self.fs, path, data)
        return derived

    def latest(self) -> dict | None:
        """`latest.json` as stored."""
        stored = self._stored(self.latest_path)
        return stored if isinstance(stored, dict) else None

    def promoted(self) -> list[dict]:
        """Decision events that promoted, oldest first (one per adapter: its latest promotion)."""
        seen: dict[str, dict] = {}
        for e in self.history():
            if e.get("event") == "decision" and e.get("promoted"):
                seen.pop(e["train_key"], None)
                seen[e["train_key"]] = e
        return list(seen.values())

    def problems(self) -> tuple[list[str], list[str]]:
        """(errors, warnings) about this registry, found without changing it. Errors: a history line that
        does not parse, a champion whose output is damaged. Warnings: champion files that disagree with
        the history (the next run writes them again from it), a flat registry still to migrate."""
        warnings = []
        if self.fs.exists(self.store.path(REGISTRY, "history.jsonl")):
            warnings.append(f"{self.store.uri(REGISTRY, 'history.jsonl')} is a registry from before one per pipeline: "
                            "the next run moves its events to registry/<pipeline>/")
        try:
            derived = derive(self.history())
        except RegistryError as e:
            return [str(e)], warnings
        for path, name in ((self.champion_path, "champion.json"), (self.latest_path, "latest.json")):
            stored = self._stored(path)
            if derived is not None and stored != derived:
                state = "is missing" if stored is None else ("is corrupt" if isinstance(stored, str) else
                                                             f"names {stored.get('train_key')}")
                warnings.append(f"{self.uri(name)} {state}; the history says {derived['train_key']} is in service "
                                "(the next run writes it again from the history)")
        errors = []
        if derived is not None and (bad := self.store.problems("train", derived["train_key"])):
            errors.append(f"the champion {derived['train_key']} of pipeline '{self.pipeline}' is damaged: "
                          f"{'; '.join(bad[:3])}. Restore it, or `synthtune rollback --to TRAIN_KEY`")
        return errors, warnings

    # ---------------------------------------------------------------- writing

    def _lock(self, what: str):
        return lock(self.fs, self.store.path(REGISTRY, self.pipeline, ".lock"), f"{self.pipeline} {what}", wait_s=600)

    def locked(self, what: str):
        """Hold this pipeline's registry lock (gc does, while it decides what is live and deletes)."""
        return self._lock(what)

    def _append(self, history: list[dict], event: dict) -> list[dict]:
        text = self._text(self.history_path) or ""
        if text and not text.endswith("\n"):
            text += "\n"
        write_bytes(self.fs, self.history_path, (text + json.dumps(event, default=str) + "\n").encode())
        return [*history, event]

    def decide(self, event: dict[str, Any]) -> tuple[bool, dict | None, dict | None]:
        """Record a gate decision (`event["promoted"]` says whether it promotes); champion.json follows
        the history. Idempotent: a decision whose id is already in the history is not appended again, and
        the champion files are made to agree with the history. Returns (recorded now, the champion
        before, the champion after)."""
        self.fs.makedirs(self.store.path(REGISTRY, self.pipeline), exist_ok=True)
        with self._lock("recording a decision"):
            history = self.history()
            before = derive(history)
            known = any(e.get("id") == event["id"] for e in history)
            if known:
                before = derive(history[:next(i for i, e in enumerate(history) if e.get("id") == event["id"])])
            else:
                history = self._append(history, {"event": "decision", "time": now(), "pipeline": self.pipeline,
                                                  **event})
            after = self._sync(derive(history), repair=known)  # known: a retry repairing a crash's leftovers
        return not known, before, after

    def rollback(self, to: str | None = None, run_id: str | None = None) -> dict:
        """Put the previous promoted adapter back in service (or the one whose train key is `to`). The
        adapter must be intact (its manifest there, its files matching it)."""
        self.fs.makedirs(self.store.path(REGISTRY, self.pipeline), exist_ok=True)
        with self._lock("rollback"):
            history = self.history()
            current, promoted = derive(history), self.promoted()
            if to is not None:
                target = next((e for e in promoted if e["train_key"] == to), None)
                if target is None:
                    known = ", ".join(e["train_key"] for e in promoted) or "none"
                    raise RegistryError(f"--to {to}: pipeline '{self.pipeline}' never promoted an adapter with that "
                                        f"train key (promoted: {known})")
            else:
                keys = [e["train_key"] for e in promoted]
                at = keys.index(current["train_key"]) if current and current["train_key"] in keys else len(keys)
                if at == 0 or not keys:
                    first = next((e["train_key"] for e in history if e.get("event") == "decision" and e.get("promoted")),
                                 None)
                    raise RegistryError("nothing to roll back to: " + (
                        "no champion yet" if not current else
                        f"{current['train_key']} is the first adapter ever promoted" if first == current["train_key"]
                        else f"no other adapter was promoted before {current['train_key']}'s last promotion "
                             f"({promoted[0].get('time')}); `--to TRAIN_KEY` chooses any promoted adapter"))
                target = promoted[at - 1]
            if current and current["train_key"] == target["train_key"]:
                raise RegistryError(f"{target['train_key']} is already the champion")
            bad = self.store.problems("train", target["train_key"])
            if bad:
                raise RegistryError(f"cannot roll back to {target['train_key']}: its output is not intact "
                                    f"({'; '.join(bad[:3])}); nothing was changed")
            import uuid

            history = self._append(history, {
                "event": "rollback", "id": f"rollback-{uuid.uuid4().hex}", "time": now(), "run_id": run_id,
                "pipeline": self.pipeline, "train_key": target["train_key"],
                "adapter": adapter_path(target["train_key"]), "from_train_key": current and current["train_key"],
                "scores": target.get("scores"), "promoted": True,
                "reasons": [f"rolled back from {current and current['train_key']}"]})
            return self._sync(derive(history), repair=False)

    def record_source(self, source: str) -> str | None:
        """Remember the config file this pipeline runs from; returns the one recorded before when it was
        another (two configs with one name would share this registry and its champion)."""
        path = self.store.path(REGISTRY, self.pipeline, "pipeline.json")
        stored = self._stored(path)
        before = stored.get("config_file") if isinstance(stored, dict) else None
        if before != source:
            self.fs.makedirs(self.store.path(REGISTRY, self.pipeline), exist_ok=True)
            write_bytes(self.fs, path, json.dumps({"pipeline": self.pipeline, "config_file": source,
                                                   "recorded": now()}, indent=2).encode())
        return before if before and before != source else None


def migrate_flat(store: ArtifactStore, pipeline: str | None = None) -> None:
    """A root written before registries were per pipeline: move each event of `registry/history.jsonl` to
    the registry of the pipeline that recorded it (events that name none go to `pipeline`), derive each
    pipeline's champion, and keep the old files under `registry/.flat/`. Logged; done once."""
    fs = store.fs
    flat = store.path(REGISTRY, "history.jsonl")
    if not fs.exists(flat):
        return
    with lock(fs, store.path(REGISTRY, ".migrate.lock"), "registry: migrating the flat registry", wait_s=600):
        if not fs.exists(flat):
            return  # another process migrated it meanwhile
        lines = fs.cat_file(flat).decode().splitlines()
        by_pipeline: dict[str, list[str]] = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                raise RegistryError(f"{store.uri(REGISTRY, 'history.jsonl')}:{n}: not JSON; fix or remove that line, "
                                    "then run again (the flat registry is migrated per pipeline first)") from None
            owner = event.get("pipeline") or pipeline or "synthtune"
            event["pipeline"] = owner
            if isinstance(event.get("adapter"), str) and event.get("train_key"):
                event["adapter"] = adapter_path(event["train_key"])  # paths relative to the root from now on
            by_pipeline.setdefault(owner, []).append(json.dumps(event, default=str))
        for owner, events in by_pipeline.items():
            target = store.path(REGISTRY, owner, "history.jsonl")
            existing = fs.cat_file(target).decode() if fs.exists(target) else ""
            fs.makedirs(store.path(REGISTRY, owner), exist_ok=True)
            write_bytes(fs, target, ("\n".join(events) + "\n" + existing).encode())
            registry = Registry(store, owner, migrate=False)
            registry._sync(derive(registry.history()))
        fs.makedirs(store.path(REGISTRY, ".flat"), exist_ok=True)
        for name, path in (("history.jsonl", flat), ("champion.json", store.path(REGISTRY, "champion.json")),
                           ("latest.json", store.path("latest.json"))):
            if fs.exists(path):
                fs.mv(path, store.path(REGISTRY, ".flat", name))
        log.warning("migrated the flat registry of %s into one registry per pipeline: %s (the old files are in %s)",
                    store.uri(), ", ".join(f"{p} ({len(e)} events)" for p, e in sorted(by_pipeline.items())),
                    store.uri(REGISTRY, ".flat"))

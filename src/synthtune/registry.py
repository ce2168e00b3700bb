"""The model registry on the artifact root: every gate decision, and the model in service.

    {artifact_root}/registry/history.jsonl   append-only: one JSON object per event (a gate decision
                                             or a rollback), oldest first
    {artifact_root}/registry/champion.json   the model in service (the champion)
    {artifact_root}/latest.json              the same pointer as before this registry existed; it is
                                             rewritten with champion.json and always equals it

Every write takes the registry lock (synthtune.atomic: flock locally, an exclusively created lock
object on S3) and replaces files whole, so two runs deciding at once both land in history, the
champion is exactly one of them, and no reader ever sees a torn file. A corrupt or unreadable
registry file is an error naming it: the gate never guesses which model is in service.
"""

from __future__ import annotations

import json
import time
from typing import Any

from synthtune.atomic import lock, write_bytes
from synthtune.store import ArtifactStore

LATEST = "latest.json"
CHAMPION_FIELDS = ("train_key", "adapter", "scores", "promoted_at")


class RegistryError(ValueError):
    """The registry cannot be read or cannot do what was asked; the message names the file or key."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    def __init__(self, store: ArtifactStore):
        self.store = store
        self.fs = store.fs
        self.history_path = store.path("registry", "history.jsonl")
        self.champion_path = store.path("registry", "champion.json")

    def uri(self, name: str) -> str:
        return self.store.uri("registry", name)

    # ---------------------------------------------------------------- reading

    def _text(self, path: str) -> str | None:
        try:
            return self.fs.cat_file(path).decode()
        except FileNotFoundError:
            return None

    def latest(self) -> dict | None:
        """`latest.json`: the same record as champion.json, where tools that predate the registry read it."""
        text = self._text(self.store.path(LATEST))
        return None if text is None else json.loads(text)

    def history(self) -> list[dict]:
        """Every event, oldest first. A line that is not a JSON object is an error naming it."""
        events = []
        for n, line in enumerate((self._text(self.history_path) or "").splitlines(), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as e:
                raise RegistryError(f"{self.uri('history.jsonl')}:{n}: not JSON ({e}); fix or remove that line") from None
            if not isinstance(event, dict):
                raise RegistryError(f"{self.uri('history.jsonl')}:{n}: not a JSON object; fix or remove that line")
            events.append(event)
        return events

    def champion(self) -> dict | None:
        """The model in service, or None before the first promotion."""
        text = self._text(self.champion_path)
        if text is None:
            return None
        try:
            record = json.loads(text)
        except ValueError as e:
            raise RegistryError(f"{self.uri('champion.json')} is corrupt ({e}); the gate will not guess which model "
                                "is in service: restore it with `synthtune rollback --to TRAIN_KEY`, or remove it to "
                                "judge the next candidate against the base model only") from None
        missing = [f for f in CHAMPION_FIELDS if not isinstance(record, dict) or f not in record]
        if missing:
            raise RegistryError(f"{self.uri('champion.json')} lacks {', '.join(missing)}; the gate will not guess which "
                                "model is in service: restore it with `synthtune rollback --to TRAIN_KEY`")
        return record

    def promoted(self) -> list[dict]:
        """Decision events that promoted, oldest first (one per adapter: its latest promotion)."""
        seen: dict[str, dict] = {}
        for e in self.history():
            if e.get("event") == "decision" and e.get("promoted"):
                seen.pop(e["train_key"], None)
                seen[e["train_key"]] = e
        return list(seen.values())

    # ---------------------------------------------------------------- writing

    def _append(self, event: dict) -> bool:
        text = self._text(self.history_path) or ""
        if event.get("id") and any(e.get("id") == event["id"] for e in self.history()):
            return False  # the same decision recorded by an earlier attempt
        write_bytes(self.fs, self.history_path, (text + json.dumps(event, default=str) + "\n").encode())
        return True

    def _set_champion(self, record: dict) -> None:
        data = json.dumps(record, indent=2, default=str).encode()
        write_bytes(self.fs, self.champion_path, data)
        write_bytes(self.fs, self.store.path(LATEST), data)

    def _lock(self, what: str):
        return lock(self.fs, self.store.path("registry", ".lock"), what, wait_s=600)

    def decide(self, event: dict[str, Any], champion: dict | None) -> bool:
        """Record a gate decision; with `champion`, it becomes the model in service. False when this
        decision (same id) was already recorded."""
        self.fs.makedirs(self.store.path("registry"), exist_ok=True)
        with self._lock("registry: recording a decision"):
            if not self._append({"event": "decision", "time": now(), **event}):
                return False
            if champion is not None:
                self._set_champion(champion)
        return True

    def rollback(self, to: str | None = None, run_id: str | None = None) -> dict:
        """Put the previous promoted adapter back in service (or the one whose train key is `to`)."""
        with self._lock("registry: rollback"):
            current = self.champion()
            promoted = self.promoted()
            if to is not None:
                target = next((e for e in promoted if e["train_key"] == to), None)
                if target is None:
                    known = ", ".join(e["train_key"] for e in promoted) or "none"
                    raise RegistryError(f"--to {to}: no adapter with that train key was ever promoted "
                                        f"(promoted: {known})")
            else:
                keys = [e["train_key"] for e in promoted]
                at = keys.index(current["train_key"]) if current and current["train_key"] in keys else len(keys)
                if at == 0 or not keys:
                    raise RegistryError("nothing to roll back to: " + (
                        f"{current['train_key']} is the first adapter ever promoted" if current else "no champion yet"))
                target = promoted[at - 1]
            if current and current["train_key"] == target["train_key"]:
                raise RegistryError(f"{target['train_key']} is already the champion")
            if not self.fs.exists(self.store.path("train", target["train_key"], "adapter")):
                raise RegistryError(f"cannot roll back to {target['train_key']}: its adapter is gone from "
                                    f"{target['adapter']}")
            record = champion_record(target, promoted_at=now(), rolled_back_from=current and current["train_key"])
            self._append({"event": "rollback", "time": now(), "run_id": run_id, "pipeline": target.get("pipeline"),
                          "train_key": target["train_key"], "adapter": target["adapter"],
                          "from_train_key": current and current["train_key"], "scores": target.get("scores"),
                          "promoted": True, "reasons": [f"rolled back from {current and current['train_key']}"]})
            self._set_champion(record)
            return record


def champion_record(event: dict, promoted_at: str | None = None, **extra) -> dict:
    """The champion.json record of a promoting decision."""
    keep = ("train_key", "adapter", "scores", "base_scores", "pipeline", "student", "data_keys", "config",
            "config_sha256", "run_id")
    return {**{k: event.get(k) for k in keep}, "promoted_at": promoted_at or event.get("time") or now(), **extra}

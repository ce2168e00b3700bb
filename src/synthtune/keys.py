"""Cache keys: what makes a stage's output what it is, hashed into one short string.

A stage's key covers the config that affects its output (input files and folders by their contents,
never their paths; fields marked `affects_output=False` left out), the identities of the models it
uses, the stage's code version, and the *content digests* of its upstream outputs, not their keys.
That is the early cutoff: when an upstream stage reruns and writes byte-identical output (editing
the eval data reruns filter for decontamination, say), everything after it keeps its key and is
reused, instead of retraining for nothing.

An output's digest is fixed when it is committed (`output_digest` over its files' sha256s, stored
in the manifest): documentation completed later (a model card gaining its evaluation) does not move
it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from synthtune.digests import file_sha256, folder_sha256
from synthtune.fields import content_kind, field_flags

PENDING = "pending:"  # the digest of an upstream output not built yet (see `pending`)


def key_payload(section: BaseModel) -> dict[str, Any]:
    """A config section as key material: fields marked `affects_output=False` or `resolved` dropped, input
    files and folders replaced by the sha256 of their contents (so moving a file changes nothing,
    editing it changes the key)."""
    out: dict[str, Any] = {}
    for name, info in type(section).model_fields.items():
        flags = field_flags(info)
        if flags.get("affects_output") is False or flags.get("resolved"):
            continue
        value = getattr(section, name)
        content = content_kind(info.rebuild_annotation())
        if value is None:
            out[name] = None
        elif isinstance(value, BaseModel):
            out[name] = key_payload(value)
        elif content == "sources":
            from synthtune.seeds import fingerprint

            out[name] = {"files": fingerprint(value)}
        elif content == "dir" or (content == "path" and Path(value).is_dir()):
            out[name] = {"sha256": folder_sha256(value)}
        elif content in ("file", "path"):
            out[name] = {"sha256": file_sha256(value)}
        else:
            out[name] = section.__pydantic_serializer__.to_python(section, mode="json", include={name})[name]
    return out


def stage_key(stage: str, version: str, payload: dict[str, Any], upstream: dict[str, str]) -> str:
    """The cache key of a stage output: sha256 over the stage name, its code version, the config that
    affects it (with file contents), the model identities it uses and its upstream outputs' digests."""
    blob = json.dumps(
        {"stage": stage, "version": version, "config": payload, "upstream": dict(sorted(upstream.items()))},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def output_digest(files: dict[str, dict]) -> str:
    """The content digest of an output from its manifest's `files` ({relative path: {sha256, bytes}})."""
    listing = {rel: meta["sha256"] for rel, meta in sorted(files.items())}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def pending(stage: str, key: str) -> str:
    """Stands for the digest of `stage/key` before it is built: keys planned from it are provisional
    (a plan of a fresh root), and change once the real output exists."""
    return f"{PENDING}{stage}/{key}"

"""Artifact store on fsspec, and the one cache key every stage (and every Prefect task) uses.

Layout: `{root}/{stage}/{key}/...files..., manifest.json`. A stage writes into a local staging
folder, the files are copied to their final place, and `manifest.json` is written last: a folder
without a manifest is unfinished and is never read. `{root}/latest.json` is the explicit pointer
to the promoted adapter.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from pydantic import BaseModel

from synthtune.atomic import lock
from synthtune.digests import file_sha256, remember, stream_sha256
from synthtune.fields import content_kind, field_flags

log = logging.getLogger("synthtune.artifacts")
MANIFEST = "manifest.json"
LATEST = "latest.json"
_VERSIONED_LIBS = ("synthtune", "torch", "transformers", "trl", "peft", "datasets", "distilabel", "lm_eval",
                   "bitsandbytes", "accelerate", "prefect")


class ArtifactRef(BaseModel):
    """A finished stage output: where it is and what it holds (what Prefect passes between tasks)."""

    stage: str
    key: str
    uri: str
    summary: dict[str, Any] = {}


# ---------------------------------------------------------------- cache keys

def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return stream_sha256(f)


def sha256_dir(path: str | Path) -> str:
    """Contents of every file below `path` (names relative to it), in a stable order."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0" + sha256_file(p).encode() + b"\0")
    return h.hexdigest()


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
        elif content == "file":
            out[name] = {"sha256": sha256_file(value)}
        elif content == "dir" or (content == "path" and Path(value).is_dir()):
            out[name] = {"sha256": sha256_dir(value)}
        elif content == "path":
            out[name] = {"sha256": sha256_file(value)}
        else:
            out[name] = section.__pydantic_serializer__.to_python(section, mode="json", include={name})[name]
    return out


def stage_key(stage: str, version: str, payload: dict[str, Any], upstream: dict[str, str]) -> str:
    """The cache key of a stage output: sha256 over stage name, stage code version, the config that
    affects it (with file contents), the model identities it uses and its upstream keys."""
    blob = json.dumps(
        {"stage": stage, "version": version, "config": payload, "upstream": dict(sorted(upstream.items()))},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- store

def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for lib in _VERSIONED_LIBS:
        try:
            out[lib] = version(lib.replace("_", "-"))
        except PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


_swept = False


def staging_dir(stage: str) -> Path:
    """A local temporary folder named after this process, so a killed process's folders are found and
    removed by the next one (they hold nothing finished: outputs are committed elsewhere)."""
    global _swept
    if not _swept:
        _swept = True
        sweep_staging()
    return Path(tempfile.mkdtemp(prefix=f"synthtune-{stage}-{os.getpid()}-"))


def sweep_staging() -> int:
    """Remove the staging folders of processes that are gone; returns how many."""
    import psutil

    removed = 0
    for entry in Path(tempfile.gettempdir()).glob("synthtune-*-*-*"):
        pid = entry.name.split("-")[2]
        if entry.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


RUN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("synthtune_run_id", default=None)


def current_run_id() -> str | None:
    """The orchestrator's run id for manifests (tasks/ set it to the Prefect flow run id)."""
    return RUN_ID.get() or os.environ.get("SYNTHTUNE_RUN_ID")


@dataclass
class Staging:
    """What a stage fills in while it writes: local files under `path`, plus manifest fields."""

    path: Path
    rows: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class ArtifactStore:
    """Stage outputs under one fsspec root (a local folder, s3://bucket/prefix, gs://...)."""

    def __init__(self, root: str):
        self.root_url = root
        self.fs, path = fsspec.core.url_to_fs(root)
        self.local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol
        self.root = os.path.abspath(path) if self.local else path.rstrip("/")

    def uri(self, *parts: str) -> str:
        path = "/".join([self.root, *parts])
        return path if self.local else self.fs.unstrip_protocol(path)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _read_json(self, path: str) -> dict | None:
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def manifest(self, stage: str, key: str) -> dict | None:
        """The manifest of a finished output, or None when it is missing or unfinished."""
        return self._read_json(self._path(stage, key, MANIFEST))

    def ref(self, stage: str, key: str) -> ArtifactRef | None:
        m = self.manifest(stage, key)
        if m is None:
            return None
        return ArtifactRef(stage=stage, key=key, uri=self.uri(stage, key), summary=m.get("summary", {}))

    @contextlib.contextmanager
    def writing(self, stage: str, key: str, upstream: dict[str, str], config: dict) -> Iterator[Staging]:
        """Stage files in a local folder; on success copy them to `{root}/{stage}/{key}/` and write the
        manifest last. On error nothing that looks finished is left behind."""
        tmp = staging_dir(stage)
        staging = Staging(path=tmp)
        try:
            yield staging
            files = {
                str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            final = self._path(stage, key)
            if self.fs.exists(self._path(stage, key, MANIFEST)):
                return  # a concurrent run (same key, same inputs) finished it first: keep theirs whole
            if self.fs.exists(final):  # leftovers of a crashed attempt: never finished, safe to replace
                self.fs.rm(final, recursive=True)
            self.fs.makedirs(final, exist_ok=True)
            for rel, meta in files.items():
                self.fs.makedirs(os.path.dirname(self._path(stage, key, rel)), exist_ok=True)
                self.fs.put_file(str(tmp / rel), self._path(stage, key, rel))
                if self.local:  # the digest is known: checking this output later costs a stat, not a read
                    remember(self._path(stage, key, rel), meta["sha256"])
            manifest = {
                "stage": stage,
                "key": key,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "run_id": current_run_id(),
                "git_sha": git_sha(),
                "versions": library_versions(),
                "upstream": upstream,
                "config": config,
                "rows": staging.rows,
                "metrics": staging.metrics,
                "summary": {"rows": staging.rows, **staging.metrics},
                "files": files,
                **staging.extra,
            }
            self._write_json(self._path(stage, key, MANIFEST), manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def key_lock_path(self, stage: str, key: str) -> str:
        return self._path(".locks", f"{stage}-{key}.lock")

    def key_lock(self, stage: str, key: str, on_wait=None):
        """The lock of output `stage/key` on this root: one producer (or annotator) at a time, across
        processes and machines sharing the root."""
        return lock(self.fs, self.key_lock_path(stage, key), f"{stage}/{key}", on_wait=on_wait)

    def lineage(self, stage: str, key: str, through: tuple[str, ...]) -> dict[str, str]:
        """{upstream stage: key} behind `stage/key`, following each manifest's upstream along `through`
        (e.g. template, filter, generate behind an adapter)."""
        keys: dict[str, str] = {}
        for upstream in through:
            key = ((self.manifest(stage, key) or {}).get("upstream") or {}).get(upstream)
            if key is None:
                break
            keys[upstream], stage = key, upstream
        return keys

    def annotate(self, stage: str, key: str, rel: str, text: str) -> None:
        """Rewrite one documentation file of a finished output (a model card gaining its evaluation)
        and its manifest entry, under the output's lock, so the output stays intact by its manifest.
        Only for files nothing downstream reads: the output's key does not change."""
        with self.key_lock(stage, key):
            manifest = self.manifest(stage, key)
            if manifest is None or rel not in manifest.get("files", {}):
                raise FileNotFoundError(f"{self.uri(stage, key, rel)} is not a file of a finished output")
            data = text.encode()
            path = self._path(stage, key, rel)
            if self.local:
                tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)
            digest = hashlib.sha256(data).hexdigest()
            if self.local:
                remember(path, digest)
            manifest["files"][rel] = {"sha256": digest, "bytes": len(data)}
            self._write_json(self._path(stage, key, MANIFEST), manifest)

    def problems(self, stage: str, key: str, full: bool = False) -> list[str]:
        """How the files of a finished output differ from its manifest: missing, another size, or
        another sha256 (checked through the digest cache on a local root, so an unchanged file costs a
        stat; `full` reads every byte anywhere)."""
        manifest = self.manifest(stage, key)
        if manifest is None:
            return [f"{stage}/{key} is not finished (no {MANIFEST})"]
        base = self._path(stage, key)
        try:
            found = {p[len(base):].lstrip("/"): info for p, info in self.fs.find(base, detail=True).items()}
        except FileNotFoundError:
            found = {}
        out = []
        for rel, meta in manifest.get("files", {}).items():
            info = found.get(rel)
            if info is None:
                out.append(f"{rel} is missing")
            elif int(info.get("size") or 0) != meta["bytes"]:
                out.append(f"{rel} is {info.get('size')} bytes, its manifest says {meta['bytes']}")
            elif full or self.local:
                digest = self._sha256(self._path(stage, key, rel), cached=not full)
                if digest != meta["sha256"]:
                    out.append(f"{rel} was changed after it was written (sha256 differs from its manifest)")
        return out

    def _sha256(self, path: str, cached: bool = True) -> str:
        if self.local and cached:
            return file_sha256(path)
        with self.fs.open(path, "rb") as f:
            return stream_sha256(f)

    def remove(self, *parts: str) -> None:
        """Delete `{root}/{parts...}` (a file or a folder) if it is there."""
        path = self._path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _write_json(self, path: str, obj: Any) -> None:
        # write-then-rename where the filesystem has rename; object stores put whole objects anyway
        if self.local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2, default=str)
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "w") as f:
                json.dump(obj, f, indent=2, default=str)

    @contextlib.contextmanager
    def local_copy(self, ref: ArtifactRef) -> Iterator[Path]:
        """A local folder holding the files of `ref` (the folder itself on a local root)."""
        if self.manifest(ref.stage, ref.key) is None:
            raise FileNotFoundError(
                f"artifact {ref.stage}/{ref.key} is missing or unfinished under {self.root_url} "
                f"(no {MANIFEST}); rerun the {ref.stage} stage"
            )
        if self.local:
            yield Path(self._path(ref.stage, ref.key))
            return
        tmp = staging_dir(ref.stage)
        try:
            self.fs.get(self._path(ref.stage, ref.key) + "/", str(tmp), recursive=True)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def read_json(self, parts: tuple[str, ...]) -> dict | None:
        """A small JSON file under the root (None when missing)."""
        return self._read_json(self._path(*parts))

    def write_json(self, parts: tuple[str, ...], obj: Any) -> None:
        """A small JSON file under the root, replaced whole."""
        self.fs.makedirs(os.path.dirname(self._path(*parts)), exist_ok=True)
        self._write_json(self._path(*parts), obj)

    def read_latest(self) -> dict | None:
        return self._read_json(self._path(LATEST))

    def write_latest(self, pointer: dict) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        self._write_json(self._path(LATEST), pointer)

    def free_bytes(self) -> int | None:
        """Free space at the root for local folders; None for object stores (no such limit)."""
        if not self.local:
            return None
        p = Path(self.root)
        while not p.exists():
            p = p.parent
        return shutil.disk_usage(p).free


# (stage, key) pairs this run must rebuild even if finished (`synthtune run --refresh STAGE`)
REBUILD: contextvars.ContextVar[frozenset[tuple[str, str]]] = contextvars.ContextVar("synthtune_rebuild",
                                                                                   default=frozenset())


def produce(store: ArtifactStore, stage: str, key: str, upstream: dict[str, str], config: dict,
            build) -> ArtifactRef:
    """Return the finished output `{stage}/{key}` if its files match its manifest; else run
    `build(staging)` and commit what it wrote. The one place that decides skip-or-run, with or
    without Prefect. An output whose files were changed, truncated or deleted since it was written is
    never used: it is rebuilt, with a log line saying why."""
    rebuild = (stage, key) in REBUILD.get()
    ref = store.ref(stage, key)
    if ref is not None and not rebuild and not store.problems(stage, key):
        return ref
    # one producer per output, across runs and machines sharing the root: the others wait, then reuse
    with store.key_lock(stage, key, on_wait=lambda holder: log.info(
            "%s/%s is being produced by another run (%s): waiting for it", stage, key, holder)):
        ref = store.ref(stage, key)
        if ref is not None:
            bad = ["rebuild asked for (--refresh)"] if rebuild else store.problems(stage, key)
            if not bad:
                return ref  # another run finished it while this one waited
            log.warning("%s/%s: %s; rebuilding it", stage, key, "; ".join(bad[:3]))
            store.remove(stage, key, MANIFEST)  # first: a half-removed output never looks finished
            store.remove(stage, key)
        with store.writing(stage, key, upstream, config) as staging:
            build(staging)
    return store.ref(stage, key)

"""The artifact store on fsspec, and `produce`: the one place that decides whether an output is
already done.

Layout: `{root}/{stage}/{key}/...files..., manifest.json`. A stage writes into a local staging
folder, the files are copied to their final place, and `manifest.json` is written last: a folder
without a manifest is unfinished and is never read. An output is reused only while its files match
its manifest; the manifest is the only cache (no orchestrator keeps another).
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from pydantic import BaseModel

from synthtune import usage
from synthtune.atomic import is_local, lock, write_bytes
from synthtune.digests import file_sha256, remember, stream_sha256
from synthtune.keys import output_digest

log = logging.getLogger("synthtune.store")
MANIFEST = "manifest.json"
_VERSIONED_LIBS = ("synthtune", "torch", "transformers", "trl", "peft", "datasets", "distilabel", "lm_eval",
                   "bitsandbytes", "accelerate", "prefect")


class ArtifactRef(BaseModel):
    """A finished stage output: where it is, what it holds (what the orchestrator passes between steps),
    its content digest (what downstream keys cover) and whether this run reused it."""

    stage: str
    key: str
    uri: str
    digest: str = ""
    reused: bool = False
    summary: dict[str, Any] = {}


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
# the pipeline whose run writes (recorded in manifests: gc of one pipeline never deletes another's outputs)
PIPELINE: contextvars.ContextVar[str | None] = contextvars.ContextVar("synthtune_pipeline", default=None)


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
    usage: dict[str, Any] = field(default_factory=dict)  # what building it used (synthtune.usage)


class ArtifactStore:
    """Stage outputs under one fsspec root (a local folder, s3://bucket/prefix, gs://...)."""

    def __init__(self, root: str):
        self.root_url = root
        self.fs, path = fsspec.core.url_to_fs(root)
        self.local = is_local(self.fs)
        self.root = os.path.abspath(path) if self.local else path.rstrip("/")

    def uri(self, *parts: str) -> str:
        path = "/".join([self.root, *parts])
        return path if self.local else self.fs.unstrip_protocol(path)

    def path(self, *parts: str) -> str:
        """The path of `{root}/{parts...}` on the store's filesystem (what its `fs` methods take)."""
        return "/".join([self.root, *parts])

    def _read_json(self, path: str) -> dict | None:
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def manifest(self, stage: str, key: str) -> dict | None:
        """The manifest of a finished output, or None when it is missing or unfinished."""
        return self._read_json(self.path(stage, key, MANIFEST))

    def ref(self, stage: str, key: str, reused: bool = False) -> ArtifactRef | None:
        """The finished output `stage/key` (None when it is missing or unfinished)."""
        m = self.manifest(stage, key)
        if m is None:
            return None
        return ArtifactRef(stage=stage, key=key, uri=self.uri(stage, key), summary=m.get("summary", {}),
                           digest=m.get("digest") or output_digest(m.get("files", {})), reused=reused)

    @contextlib.contextmanager
    def writing(self, stage: str, key: str, upstream: dict[str, str], config: dict) -> Iterator[Staging]:
        """Stage files in a local folder; on success copy them to `{root}/{stage}/{key}/` and write the
        manifest last. On error nothing that looks finished is left behind."""
        tmp = staging_dir(stage)
        staging = Staging(path=tmp)
        try:
            yield staging
            files = {
                str(p.relative_to(tmp)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            final = self.path(stage, key)
            if self.fs.exists(self.path(stage, key, MANIFEST)):
                return  # a concurrent run (same key, same inputs) finished it first: keep theirs whole
            if self.fs.exists(final):  # leftovers of a crashed attempt: never finished, safe to replace
                self.fs.rm(final, recursive=True)
            self.fs.makedirs(final, exist_ok=True)
            for rel, meta in files.items():
                self.fs.makedirs(os.path.dirname(self.path(stage, key, rel)), exist_ok=True)
                self.fs.put_file(str(tmp / rel), self.path(stage, key, rel))
                self._committed(self.path(stage, key, rel), meta["sha256"], meta["bytes"])
            manifest = {
                "stage": stage,
                "key": key,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "run_id": current_run_id(),
                "pipeline": PIPELINE.get(),
                "git_sha": git_sha(),
                "versions": library_versions(),
                "upstream": upstream,
                "config": config,
                "rows": staging.rows,
                "metrics": staging.metrics,
                "summary": {"rows": staging.rows, **staging.metrics},
                "files": files,
                "digest": output_digest(files),
                "usage": staging.usage,
                **staging.extra,
            }
            self._write_json(self.path(stage, key, MANIFEST), manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def key_lock_path(self, stage: str, key: str) -> str:
        return self.path(".locks", f"{stage}-{key}.lock")

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
        """Rewrite one documentation file of a finished output (a model card gaining its evaluation)."""
        self.amend(stage, key, texts={rel: text})

    def amend(self, stage: str, key: str, texts: dict[str, str] | None = None, folders: dict[str, Path] | None = None,
              metrics: dict[str, Any] | None = None, held: bool = False) -> None:
        """Add to a finished output what does not change what it is: documentation files rewritten
        (`texts`, relative path -> text; files nothing downstream reads), folders added (`folders`,
        relative path -> local folder: a merged export), manifest metrics merged in. The manifest's file
        list follows, so the output stays intact by its manifest; its key and digest do not change.
        Under the output's lock, unless the caller holds it (`held`)."""
        with contextlib.nullcontext() if held else self.key_lock(stage, key):
            manifest = self.manifest(stage, key)
            if manifest is None:
                raise FileNotFoundError(f"{self.uri(stage, key)} is not a finished output")
            for rel, text in (texts or {}).items():
                if rel not in manifest.get("files", {}):
                    raise FileNotFoundError(f"{self.uri(stage, key, rel)} is not a file of a finished output")
                data = text.encode()
                write_bytes(self.fs, self.path(stage, key, rel), data)
                manifest["files"][rel] = self._committed(self.path(stage, key, rel), hashlib.sha256(data).hexdigest(),
                                                         len(data))
            for prefix, folder in (folders or {}).items():
                for p in sorted(q for q in folder.rglob("*") if q.is_file()):
                    rel = f"{prefix}/{p.relative_to(folder)}"
                    target = self.path(stage, key, rel)
                    self.fs.makedirs(os.path.dirname(target), exist_ok=True)
                    self.fs.put_file(str(p), target)
                    manifest["files"][rel] = self._committed(target, file_sha256(p), p.stat().st_size)
            if metrics:
                manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
                manifest["summary"] = {**manifest.get("summary", {}), **metrics}
            self._write_json(self.path(stage, key, MANIFEST), manifest)

    def _committed(self, path: str, digest: str, size: int) -> dict:
        """A file's manifest entry; on a local root its digest is remembered (checking it later costs a stat)."""
        if self.local:
            remember(path, digest)
        return {"sha256": digest, "bytes": size}

    def problems(self, stage: str, key: str, full: bool = False) -> list[str]:
        """How the files of a finished output differ from its manifest: missing, another size, or
        another sha256 (checked through the digest cache on a local root, so an unchanged file costs a
        stat; `full` reads every byte anywhere)."""
        manifest = self.manifest(stage, key)
        if manifest is None:
            return [f"{stage}/{key} is not finished (no {MANIFEST})"]
        base = self.path(stage, key)
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
                digest = self._sha256(self.path(stage, key, rel), cached=not full)
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
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _write_json(self, path: str, obj: Any) -> None:
        write_bytes(self.fs, path, json.dumps(obj, indent=2, default=str).encode())

    @contextlib.contextmanager
    def local_copy(self, ref: ArtifactRef) -> Iterator[Path]:
        """A local folder holding the files of `ref` (the folder itself on a local root)."""
        if self.manifest(ref.stage, ref.key) is None:
            raise FileNotFoundError(
                f"artifact {ref.stage}/{ref.key} is missing or unfinished under {self.root_url} "
                f"(no {MANIFEST}); rerun the {ref.stage} stage"
            )
        if self.local:
            yield Path(self.path(ref.stage, ref.key))
            return
        tmp = staging_dir(ref.stage)
        try:
            self.fs.get(self.path(ref.stage, ref.key) + "/", str(tmp), recursive=True)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def read_json(self, parts: tuple[str, ...]) -> dict | None:
        """A small JSON file under the root (None when missing)."""
        return self._read_json(self.path(*parts))

    def write_json(self, parts: tuple[str, ...], obj: Any) -> None:
        """A small JSON file under the root, replaced whole."""
        self.fs.makedirs(os.path.dirname(self.path(*parts)), exist_ok=True)
        self._write_json(self.path(*parts), obj)

    def free_bytes(self) -> int | None:
        """Free space at the root for local folders; None for object stores (no such limit)."""
        if not self.local:
            return None
        p = Path(self.root)
        while not p.exists():
            p = p.parent
        return shutil.disk_usage(p).free


GPU_STAGES = ("train", "evaluate")  # the stages that hold the machine's GPUs (their device-seconds are counted)


def produce(store: ArtifactStore, stage: str, key: str, upstream: dict[str, str], config: dict, build,
            rebuild: bool = False, devices: bool | None = None) -> ArtifactRef:
    """The finished output `{stage}/{key}` if its files match its manifest (`reused` set), else what
    `build(staging)` writes, committed. The one place that decides skip-or-run, with or without an
    orchestrator. An output whose files were changed, truncated or deleted since it was written is
    never used: it is rebuilt, with a log line saying why; so is one `rebuild` asks for (--refresh).
    `upstream` ({name: key}) is recorded in the manifest, for lineage; what the build used (synthtune.usage:
    seconds, and the GPUs' device-seconds when it holds them, `devices`, by default the GPU stages'), as
    `usage`."""
    ref = None if rebuild else store.ref(stage, key, reused=True)
    if ref is not None and not store.problems(stage, key):
        return ref
    # one producer per output, across runs and machines sharing the root: the others wait, then reuse
    with store.key_lock(stage, key, on_wait=lambda holder: log.info(
            "%s/%s is being produced by another run (%s): waiting for it", stage, key, holder)):
        if store.manifest(stage, key) is not None:
            bad = ["rebuild asked for (--refresh)"] if rebuild else store.problems(stage, key)
            if not bad:
                return store.ref(stage, key, reused=True)  # another run finished it while this one waited
            log.warning("%s/%s: %s; rebuilding it", stage, key, "; ".join(bad[:3]))
            store.remove(stage, key, MANIFEST)  # first: a half-removed output never looks finished
            store.remove(stage, key)
        with store.writing(stage, key, upstream, config) as staging, \
                usage.measured(staging.usage, stage in GPU_STAGES if devices is None else devices):
            build(staging)
    return store.ref(stage, key)

"""sha256 of files and folders on any fsspec filesystem, remembered per (path, size, stamp).

Cache keys and artifact checks hash contents, never paths; this makes that cheap to repeat: a 16 GB
model folder or a seed folder of a thousand files is read once, and again only when a file's size
or stamp changes. Locally the stamp is mtime, ctime and inode together: an edit in place changes
mtime and ctime, a file put back with `touch -r` (same size and mtime) still has a new ctime, and a
file replaced by another has another inode. On object stores it is the ETag (or last-modified).
The table lives in `$SYNTHTUNE_CACHE/digests.sqlite`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from pathlib import Path

from synthtune.atomic import is_local

CHUNK = 8 << 20


def cache_root() -> Path:
    """synthtune's machine-local cache (tiny models, digests, work folders of remote roots)."""
    return Path(os.environ.get("SYNTHTUNE_CACHE", Path.home() / ".cache" / "synthtune"))


def stream_sha256(f) -> str:
    """sha256 of an open binary file, read in chunks."""
    h = hashlib.sha256()
    while block := f.read(CHUNK):
        h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _table():
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(root / "digests.sqlite", timeout=60)
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, stamp TEXT, sha256 TEXT)")
        yield conn
        conn.commit()
    finally:
        conn.close()


def _remembered(path: str, size: int, stamp: str, compute) -> str:
    with _table() as t:
        row = t.execute("SELECT size, stamp, sha256 FROM digests WHERE path = ?", (path,)).fetchone()
    if row and row[0] == size and row[1] == stamp:
        return row[2]
    digest = compute()
    with _table() as t:
        t.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", (path, size, stamp, digest))
    return digest


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file (remembered per path, size, mtime, ctime and inode)."""
    path = os.path.abspath(path)
    st = os.stat(path)

    def compute() -> str:
        with open(path, "rb") as f:
            return stream_sha256(f)

    return _remembered(path, st.st_size, _stamp(st), compute)


def remember(path: str | os.PathLike, digest: str) -> None:
    """Record the digest of a local file just written (its bytes already hashed elsewhere)."""
    path = os.path.abspath(path)
    st = os.stat(path)
    with _table() as t:
        t.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", (path, st.st_size, _stamp(st), digest))


def folder_files(path: Path) -> list[Path]:
    """The files below a folder, sorted; hidden files and folders (`.cache`, `.git`) aside."""
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def folder_sha256(path: str | os.PathLike) -> str:
    """The contents of every file below a local folder (names relative to it), each file's digest
    remembered: a model folder of many GB is read once."""
    root = Path(path)
    listing = {str(p.relative_to(root)): file_sha256(p) for p in folder_files(root)}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def fs_sha256(fs, path: str) -> str:
    """sha256 of a file on any fsspec filesystem (local files go through `file_sha256`)."""
    if is_local(fs):
        return file_sha256(path)
    info = fs.info(path)
    stamp = str(info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or "")
    url = fs.unstrip_protocol(path)

    def compute() -> str:
        with fs.open(path, "rb") as f:
            return stream_sha256(f)

    if not stamp:  # nothing tells an edit apart: hash every time
        return compute()
    return _remembered(url, int(info.get("size") or 0), stamp, compute)

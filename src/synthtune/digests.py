"""sha256 of files on any fsspec filesystem, remembered per (path, size, modification stamp).

Cache keys and artifact checks hash contents, never paths; this makes that cheap to repeat: a 16 GB
model folder or a seed folder of a thousand files is read once, and again only when a file's size
or stamp (mtime locally; ETag or last-modified on object stores) changes. An edit in place changes
the stamp, so it is always seen. The table lives in `$SYNTHTUNE_CACHE/digests.sqlite`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from pathlib import Path

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


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file (remembered per path, size and mtime)."""
    path = os.path.abspath(path)
    st = os.stat(path)

    def compute() -> str:
        with open(path, "rb") as f:
            return stream_sha256(f)

    return _remembered(path, st.st_size, str(st.st_mtime_ns), compute)


def remember(path: str | os.PathLike, digest: str) -> None:
    """Record the digest of a local file just written (its bytes already hashed elsewhere)."""
    path = os.path.abspath(path)
    st = os.stat(path)
    with _table() as t:
        t.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?)", (path, st.st_size, str(st.st_mtime_ns), digest))


def fs_sha256(fs, path: str) -> str:
    """sha256 of a file on any fsspec filesystem (local files go through `file_sha256`)."""
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
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

"""Atomic writes and locks on any fsspec root: what concurrent runs on one artifact root rely on.

- `write_bytes`: a reader sees the old object or the new one, never a mix (local: a temporary file
  renamed over it; object stores: one PUT).
- `create_exclusive`: write only if nothing is there yet (local: link(2) of a complete temporary
  file; S3: `If-None-Match: *`; other fsspec stores: their `mode="create"`); False when another
  writer got there first.
- `lock`: one holder at a time. Local: flock(2), which the kernel releases when the holder dies.
  Object stores: an exclusively created lock object holding its owner and expiry, renewed while held;
  one left by a dead holder expires and is broken, with a log line naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

log = logging.getLogger("synthtune.atomic")


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is the local disk (the one check: rename, flock and fsync exist there)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_bytes(fs, path: str, data: bytes) -> None:
    """Replace `path` whole: a reader sees the old bytes or the new, and on local disk the new ones are
    on the disk (fsync) before the rename makes them visible."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist yet; True when this call created it."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if path exists; the content is complete the moment it appears
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except OSError as e:  # s3fs maps S3's 412 Precondition Failed to an OSError
        if fs.exists(path):
            return False
        raise e


class LockTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def lock(fs, path: str, what: str, wait_s: float = 24 * 3600, lease_s: float = 120,
         on_wait=None) -> Iterator[None]:
    """Hold the lock at `path` (a file, or an object on object stores) while the block runs.
    `on_wait(holder)` is called once if another holder has it. Raises LockTimeout after `wait_s`."""
    if is_local(fs):
        with _flock(path, what, wait_s, on_wait):
            yield
        return
    with _object_lock(fs, path, what, wait_s, lease_s, on_wait):
        yield


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}


@contextlib.contextmanager
def _flock(path: str, what: str, wait_s: float, on_wait) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait:
                    f.seek(0)
                    on_wait(f.read().strip() or "another process")
                    told = True
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{what}: still locked by another process after {wait_s:.0f} s ({path})") from None
                time.sleep(0.5)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _object_lock(fs, path: str, what: str, wait_s: float, lease_s: float, on_wait) -> Iterator[None]:
    me = _holder()
    deadline, told = time.monotonic() + wait_s, False
    while True:
        body = json.dumps({**me, "expires": time.time() + lease_s}).encode()
        if create_exclusive(fs, path, body):
            break
        try:
            holder = json.loads(fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            continue  # released (or half-broken) meanwhile: try again
        if holder.get("expires", 0) < time.time():
            log.warning("%s: breaking the lock of %s (pid %s): its lease expired, it is gone", what,
                        holder.get("host"), holder.get("pid"))
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)
            continue
        if not told and on_wait:
            on_wait(f"{holder.get('host')} pid {holder.get('pid')}")
            told = True
        if time.monotonic() > deadline:
            raise LockTimeout(f"{what}: still locked by {holder.get('host')} pid {holder.get('pid')} after "
                              f"{wait_s:.0f} s ({path})")
        time.sleep(1.0)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            with contextlib.suppress(Exception):
                write_bytes(fs, path, json.dumps({**me, "expires": time.time() + lease_s}).encode())

    keeper = threading.Thread(target=renew, daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join()
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(fs.cat_file(path)).get("token") == me["token"]:
                fs.rm(path)

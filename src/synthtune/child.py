"""Run a stage body in a fresh (spawned) child process.

Why: distilabel forks worker processes; a fork taken after torch has spun up its thread pools in
the parent (any earlier training or evaluation in the same process) can deadlock. A spawned child
starts clean, and whatever the body does to logging, signals or GPU memory ends with it.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from typing import Any


class ChildError(RuntimeError):
    """The child raised; the message carries its type, message and traceback."""


def _entry(conn, fn, args, kwargs) -> None:
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException as e:  # report everything, including KeyboardInterrupt, to the parent
        conn.send(("error", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        conn.close()


def call_in_child(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in a spawned process; its return value must pickle. Errors re-raise here
    with the child's traceback; if the parent is interrupted the child is killed."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_entry, args=(child, fn, args, kwargs), daemon=False)
    proc.start()
    child.close()
    try:
        try:
            status, payload = parent.recv()
        except EOFError:
            proc.join()
            raise ChildError(f"{getattr(fn, '__name__', fn)} died without a result (exit code {proc.exitcode})") from None
        proc.join()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status == "error":
        name, message, tb = payload
        raise ChildError(f"{name}: {message}\n--- in child process ---\n{tb}")
    return payload

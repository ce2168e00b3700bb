"""Progress of a run, for whoever shows it: the CLI's terminal view listens; nothing else needs to.

Events (a kind and fields):
- `step_start` (step), `step_end` (step, state: Completed / Cached / Failed, seconds, summary);
- `train` (step, total, loss, tokens_per_s): from the training child, as it logs;
- `evaluate` (step, done, total): lm-eval's requests, as they are scored.
Emitting with no listener costs nothing; a listener that raises is dropped from this event only.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

_listeners: list[Callable[[dict[str, Any]], None]] = []
_lock = threading.Lock()


@contextlib.contextmanager
def listen(fn: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    with _lock:
        _listeners.append(fn)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(fn)


def emit(kind: str, **fields: Any) -> None:
    with _lock:
        listeners = list(_listeners)
    for fn in listeners:
        with contextlib.suppress(Exception):
            fn({"kind": kind, **fields})


def active() -> bool:
    return bool(_listeners)

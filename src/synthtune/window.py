"""A steady window of requests in flight to an HTTP teacher: one process, one event loop, `concurrency`
requests at once, each slot refilled the moment its request finishes (no batch barrier).

Behaving well toward the teacher:
- HTTP 429 and 503 honour `Retry-After` (no new request starts before it), and a burst of them
  shrinks the window: halved on a throttled response (at most once a second, so one burst halves it
  once), grown by one per success back to `concurrency` (AIMD);
- optional request and token budgets per time (`max_requests_per_s`, `max_tokens_per_min`) for hosted
  APIs with published limits, as token buckets;
- other failures (5xx, timeouts, a dropped connection) are retried with exponential backoff; a
  request that still fails after `max_retries`, or that the server refuses as malformed (another
  4xx), is given up with its reason: it never stalls the window.

`drive()` knows nothing of distilabel or the row cache: it calls `call(item)` for each item and
reports each outcome to `on_done(index, result)` / `on_fail(index, reason)`, and progress to
`on_progress(stats)`. Retry decisions come from the exception `call` raises (`Throttled`, `Retryable`,
`Refused`, or an openai/httpx error classified by `classify`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

THROTTLED = (429, 503)
RETRYABLE = (408, 409, 425, 500, 502, 504)


class Throttled(Exception):
    """The server asked us to slow down (429/503); `retry_after` seconds when it said how long."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class Retryable(Exception):
    """A failure worth another try (5xx, a timeout, a dropped connection)."""


class Refused(Exception):
    """A request the server will never answer (a malformed or oversized request): not retried."""


def _retry_after(headers) -> float | None:
    value = (headers or {}).get("retry-after") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def classify(error: BaseException) -> Exception:
    """An openai or httpx error as Throttled, Retryable or Refused (anything unknown is retried)."""
    status = getattr(error, "status_code", None)
    response = getattr(error, "response", None)
    if status is None and response is not None:
        status = getattr(response, "status_code", None)
    reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    if status in THROTTLED:
        return Throttled(f"HTTP {status}", _retry_after(getattr(response, "headers", None)))
    if status is not None and status not in RETRYABLE and 400 <= status < 500:
        return Refused(f"HTTP {status}: {reason}")
    return Retryable(f"HTTP {status}" if status else reason)


@dataclass
class Stats:
    """What the window did; `on_progress` receives it (the terminal's generate line shows it)."""

    total: int
    done: int = 0
    failed: int = 0
    retries: int = 0
    throttled: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    window: int = 0
    started: float = field(default_factory=time.monotonic)
    failures: dict[str, str] = field(default_factory=dict)  # filled by the caller: request key -> why given up
    tokens: dict[str, int] = field(default_factory=dict)  # ... and the API's `usage` summed (prompt, completion)

    @property
    def rows_per_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0


class _Bucket:
    """A token bucket: `rate` tokens per second, up to `rate * burst_s` at once."""

    def __init__(self, rate: float, burst_s: float = 1.0):
        self.rate, self.capacity = rate, max(1.0, rate * burst_s)
        self.tokens, self.at = self.capacity, time.monotonic()

    async def take(self, n: float = 1.0) -> None:
        n = min(n, self.capacity)
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


async def drive(items: Sequence[Any], call: Callable[[Any], Awaitable[Any]], *, concurrency: int, max_retries: int,
                on_done: Callable[[int, Any], None], on_fail: Callable[[int, str], None],
                on_progress: Callable[[Stats], None] | None = None, max_requests_per_s: float | None = None,
                max_tokens_per_min: int | None = None, tokens_of: Callable[[Any], int] | None = None,
                backoff_s: float = 0.5, max_backoff_s: float = 20.0) -> Stats:
    """Send every item through `call` with at most `concurrency` in flight (fewer while throttled)."""
    stats = Stats(total=len(items), window=concurrency)
    pending = list(range(len(items)))[::-1]  # popped from the end: in order
    retry_at: list[tuple[float, int, int]] = []  # (when, index, attempt) of requests waiting to try again
    resume_at = 0.0  # no new request before this (Retry-After)
    last_halving = 0.0
    requests = _Bucket(max_requests_per_s) if max_requests_per_s else None
    tokens = _Bucket(max_tokens_per_min / 60.0, burst_s=60.0) if max_tokens_per_min else None
    wake = asyncio.Event()
    running: set[asyncio.Task] = set()

    async def one(index: int, attempt: int) -> None:
        nonlocal resume_at, last_halving
        try:
            if requests:
                await requests.take()
            if tokens:
                await tokens.take(tokens_of(items[index]) if tokens_of else 1)
            result = await call(items[index])
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001  (every failure is classified, none escapes the window)
            error = e if isinstance(e, Throttled | Retryable | Refused) else classify(e)
            now = time.monotonic()
            if isinstance(error, Throttled):
                stats.throttled += 1
                if now - last_halving > 1.0:  # one burst halves the window once
                    stats.window, last_halving = max(1, stats.window // 2), now
                if error.retry_after is not None:
                    resume_at = max(resume_at, now + error.retry_after)
            if isinstance(error, Refused) or attempt >= max_retries:
                stats.failed += 1
                on_fail(index, f"{error} (after {attempt + 1} attempt{'s' if attempt else ''})")
            else:
                stats.retries += 1
                delay = (error.retry_after if isinstance(error, Throttled) and error.retry_after is not None
                         else min(max_backoff_s, backoff_s * 2 ** attempt) * (0.5 + random.random() / 2))
                retry_at.append((now + delay, index, attempt + 1))
        else:
            stats.done += 1
            stats.window = min(concurrency, stats.window + 1)
            on_done(index, result)
        finally:
            stats.in_flight -= 1
            if on_progress:
                on_progress(stats)
            wake.set()

    while pending or retry_at or running:
        now = time.monotonic()
        while stats.in_flight < stats.window and now >= resume_at:
            due = [r for r in retry_at if r[0] <= now]
            if due:
                first = min(due)
                retry_at.remove(first)
                index, attempt = first[1], first[2]
            elif pending:
                index, attempt = pending.pop(), 0
            else:
                break
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            task = asyncio.create_task(one(index, attempt))
            running.add(task)
            task.add_done_callback(running.discard)
        waits = [r[0] for r in retry_at] + ([resume_at] if resume_at > now else [])
        timeout = max(0.0, min(waits) - time.monotonic()) if waits and (stats.in_flight < stats.window) else None
        wake.clear()
        if not running and timeout is None and not pending and not retry_at:
            break
        try:
            await asyncio.wait_for(wake.wait(), timeout=timeout if timeout is not None else 5.0)
        except TimeoutError:
            pass
    return stats

"""What every stage's task shares: the task itself (`stage_task`), the drill that fails a stage on
purpose, and pictures embedded in artifacts."""

from __future__ import annotations

import base64
import contextvars
from collections.abc import Callable
from types import ModuleType
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed

from synthtune.store import RUN_ID, ArtifactRef, ArtifactStore
from synthtune.usage import POOL


class InjectedFault(RuntimeError):
    """Raised by a stage the flow was asked to fail (the `fail_stage` drill parameter)."""


# the stage this flow run attempt must fail (set by the flow from its `fail_stage` parameter)
FAULT: contextvars.ContextVar[str | None] = contextvars.ContextVar("synthtune_fault", default=None)


def stage_task(stage: ModuleType, tags: list[str], retries: int = 0,
               call: Callable[..., ArtifactRef] | None = None):
    """The task of `stage`: runs `stage.run` (or `call`, which takes the same arguments) with the flow
    run's id recorded in every manifest written meanwhile; a reused output ends the task `Cached`.
    Never cached by Prefect: the manifest is the only cache (tasks/__init__.py)."""
    body = call or stage.run

    @task(name=stage.STAGE, cache_policy=NO_CACHE, persist_result=False, retries=retries, tags=tags)
    def run(cfg, upstream: dict[str, ArtifactRef] | None, key: str, rebuild: bool = False) -> Any:
        if FAULT.get() == stage.STAGE:
            raise InjectedFault(f"{stage.STAGE}: failed on purpose (fail_stage={stage.STAGE}, first attempt of the "
                                "flow run)")
        token, pool = RUN_ID.set(flow_run.get_id()), POOL.set(work_pool())
        try:
            ref = body(cfg, ArtifactStore(cfg.artifact_root), upstream or {}, output_key=key, rebuild=rebuild)
        finally:
            RUN_ID.reset(token)
            POOL.reset(pool)
        return Completed(name="Cached", data=ref, message=f"{ref.uri} is done and intact") if ref.reused else ref

    run.__doc__ = (stage.run.__doc__ or "").strip().splitlines()[0]
    return run


_POOLS: dict[str, str | None] = {}


def work_pool() -> str | None:
    """The work pool this flow run is in (what prices its GPU hours: cost.gpu_usd_per_hour); None for a
    run outside a pool. Asked of the server once per flow run."""
    run_id = flow_run.get_id()
    if not run_id:
        return None
    if run_id not in _POOLS:
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                _POOLS[run_id] = client.read_flow_run(run_id).work_pool_name
        except Exception:  # noqa: BLE001  (a price lookup never fails a stage)
            _POOLS[run_id] = None
    return _POOLS[run_id]


def inline_png(store: ArtifactStore, ref: ArtifactRef, name: str, alt: str) -> str:
    """Markdown embedding a PNG of an artifact folder, so the Prefect UI shows it without file access."""
    with store.local_copy(ref) as folder:
        data = base64.b64encode((folder / name).read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"

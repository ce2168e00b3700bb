"""What every stage task shares: its cache key function, the run id in manifests, the store."""

from __future__ import annotations

import base64
import contextlib
import contextvars
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from prefect.context import TaskRunContext

from synthtune.artifacts import RUN_ID, ArtifactRef, ArtifactStore


def cache_key(stage: ModuleType) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """Prefect cache key = the stage's own key over config contents and upstream keys."""

    def fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        upstream = {name: ref.key for name, ref in (parameters.get("upstream") or {}).items()}
        return f"{stage.STAGE}-{stage.key(parameters['cfg'], upstream)}"

    return fn


class InjectedFault(RuntimeError):
    """Raised by a stage the flow was asked to fail (the `fail_stage` drill parameter)."""


# the stage this flow run attempt must fail (set by the flow from its `fail_stage` parameter)
FAULT: contextvars.ContextVar[str | None] = contextvars.ContextVar("synthtune_fault", default=None)


@contextlib.contextmanager
def stage_context(cfg, stage: str) -> Iterator[ArtifactStore]:
    """The artifact store, with the flow run id recorded in every manifest written meanwhile."""
    from prefect.runtime import flow_run

    if FAULT.get() == stage:
        raise InjectedFault(f"{stage}: failed on purpose (fail_stage={stage}, first attempt of the flow run)")
    token = RUN_ID.set(flow_run.get_id())
    try:
        yield ArtifactStore(cfg.artifact_root)
    finally:
        RUN_ID.reset(token)


def inline_png(store: ArtifactStore, ref: ArtifactRef, name: str, alt: str) -> str:
    """Markdown embedding a PNG of an artifact folder, so the Prefect UI shows it without file access."""
    with store.local_copy(ref) as folder:
        data = base64.b64encode((folder / name).read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"

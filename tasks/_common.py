"""What every stage task shares: its cache key function, the run id in manifests, the store."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def stage_context(cfg) -> Iterator[ArtifactStore]:
    """The artifact store, with the flow run id recorded in every manifest written meanwhile."""
    from prefect.runtime import flow_run

    token = RUN_ID.set(flow_run.get_id())
    try:
        yield ArtifactStore(cfg.artifact_root)
    finally:
        RUN_ID.reset(token)


def summary_markdown(ref: ArtifactRef) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in ref.summary.items() if not isinstance(v, (list, dict)))
    counts = ", ".join(f"{k}={v}" for k, v in ref.summary.get("rows", {}).items())
    return f"**{ref.stage}** `{ref.key}` at `{ref.uri}`\n\nrows: {counts or '-'}\n\n| field | value |\n|---|---|\n{rows}\n"

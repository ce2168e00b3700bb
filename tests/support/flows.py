"""Reading a flow run back from the Prefect server: its task runs' states, its artifacts."""

from __future__ import annotations

import time


def task_states(flow_run_id, expected: int = 8) -> dict[str, str]:
    """Task run name -> state name, polled until every state is final (they land after the flow's)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        for _ in range(50):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if len(runs) == expected and all(r.state and r.state.is_final() for r in runs):
                break
            time.sleep(0.2)
    return {r.name: r.state.name for r in runs}


def artifacts_of(flow_run_id, key: str | None = None) -> list:
    """The artifacts a flow run created (those with `key` only, when given)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            key=ArtifactFilterKey(any_=[key]) if key else None))

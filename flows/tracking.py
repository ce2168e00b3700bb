"""A flow run's MLflow run (when tracking.mlflow_uri is set), linked from a Prefect artifact, and the
drain of what Prefect still queues before a short-lived server stops."""

from __future__ import annotations

import contextlib

from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from synthtune import tracking
from synthtune.configs import PipelineConfig


@contextlib.contextmanager
def tracked(config: PipelineConfig, owner: bool):
    """This flow run's MLflow run. The split-mode GPU child joins its parent's MLflow run (both know the
    root flow run's id); only the `owner` ends it."""
    run_id = flow_run.get_id()
    root = flow_run.get_root_flow_run_id() if run_id else None
    tags = {"prefect.flow_run_id": str(run_id), "prefect.flow_run_name": str(flow_run.get_name())}
    with tracking.session(config, pipeline_run=str(root or run_id), name=str(flow_run.get_name()), tags=tags,
                          owner=owner) as tracker:
        if tracker is not None and owner:
            where = f"MLflow run `{tracker.run_id}` in experiment `{config.tracking.experiment}` at {config.tracking.mlflow_uri}"
            if tracker.url:
                create_link_artifact(tracker.url, link_text=where, key="mlflow-run", description="This run in MLflow")
            else:
                create_markdown_artifact(where, key="mlflow-run", description="This run in MLflow")
        yield tracker


def drain() -> None:
    """Send what Prefect still queues (run logs, events) while its server is up: the embedded
    server stops right after the flow returns."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=30)

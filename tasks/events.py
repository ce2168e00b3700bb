"""synthtune's Prefect events: what automations and deployment triggers react to.

- `synthtune.model.promoted` / `.rejected`: the gate's decision (emitted by the promote task);
- `synthtune.model.rolled_back`: `synthtune rollback`;
- `synthtune.seeds.arrived`: `synthtune seeds-arrived`, which starts the nightly deployment early
  (its trigger in deployments/prefect.yaml debounces a burst into one run).

The resource is the pipeline, `synthtune.pipeline.<name>`; the payload carries keys and scores.
"""

from __future__ import annotations

from typing import Any


def pipeline_resource(name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"synthtune.pipeline.{name}", "prefect.resource.name": name}


def emit(event: str, pipeline: str, payload: dict[str, Any]) -> None:
    from prefect.events import emit_event

    emit_event(event=event, resource=pipeline_resource(pipeline), payload=payload)


def model_decided(pipeline: str, summary: dict[str, Any]) -> None:
    """`synthtune.model.promoted` or `.rejected`, with the keys, scores and reasons of the decision."""
    kind = "promoted" if summary["promoted"] else "rejected"
    emit(f"synthtune.model.{kind}", pipeline, {
        "train_key": summary.get("train_key"), "champion_train_key": summary.get("champion_train_key"),
        "reasons": summary.get("reasons"), "p_value": summary.get("p_value"),
        "comparison": summary.get("comparison")})


def flush(timeout: float = 30) -> None:
    """Send what was emitted before a short-lived process (a CLI command) exits."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=timeout)

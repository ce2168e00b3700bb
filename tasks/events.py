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
    """Emit from inside a run (sent in the background, like the run's own events)."""
    from prefect.events import emit_event

    emit_event(event=event, resource=pipeline_resource(pipeline), payload=payload)


def post(event: str, pipeline: str, payload: dict[str, Any]) -> None:
    """Send one event to the server at PREFECT_API_URL and wait for it to be accepted (a CLI command must
    not say "emitted" for an event nobody received). Raises naming the server when it is not."""
    from prefect.client.orchestration import get_client
    from prefect.events import Event

    record = Event(event=event, resource=pipeline_resource(pipeline), payload=payload)
    with get_client(sync_client=True) as client:
        try:
            response = client.request("POST", "/events", json=[record.model_dump(mode="json")])
        except Exception as e:
            raise EventNotAccepted(f"the Prefect server at {client.api_url} did not take {event}: "
                                   f"{type(e).__name__}: {e}") from None
        if response.status_code >= 300:
            raise EventNotAccepted(f"the Prefect server at {client.api_url} refused {event}: HTTP "
                                   f"{response.status_code} {response.text[:300]}")


class EventNotAccepted(RuntimeError):
    """The server did not accept an event; the message names the server and the reason."""


def model_decided(pipeline: str, summary: dict[str, Any]) -> None:
    """`synthtune.model.promoted` or `.rejected`, with the keys, scores and reasons of the decision."""
    kind = "promoted" if summary["promoted"] else "rejected"
    emit(f"synthtune.model.{kind}", pipeline, {
        "train_key": summary.get("train_key"), "champion_train_key": summary.get("champion_train_key"),
        "reasons": summary.get("reasons"), "p_value": summary.get("p_value"),
        "comparison": summary.get("comparison")})

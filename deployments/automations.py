"""Notifications for the nightly loop: one webhook POST (Slack-compatible JSON, `{"text": ...}`) when a
nightly run ends Failed or Crashed, and one on every promotion (event `synthtune.model.promoted`).

Run as (after `prefect deploy`, against the server at $PREFECT_API_URL; running it again updates):
    python deployments/automations.py --webhook-url https://hooks.slack.com/services/T000/B000/XXXX
    python deployments/automations.py --webhook-url http://10.0.0.5:9000/hook --allow-private-urls

It saves a `CustomWebhookNotificationBlock` named `synthtune-webhook` and two automations:
"synthtune: nightly run failed" and "synthtune: model promoted".
"""

from __future__ import annotations

import argparse

BLOCK = "synthtune-webhook"
FAILED = "synthtune: nightly run failed"
PROMOTED = "synthtune: model promoted"


def apply(webhook_url: str, deployment: str = "synthtune/nightly", allow_private_urls: bool = False) -> dict[str, str]:
    """Create or replace the webhook block and the two automations; returns name -> automation id."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block = CustomWebhookNotificationBlock(name="synthtune", url=webhook_url, method="POST",
                                           json_data={"text": "{{subject}}\n{{body}}"},
                                           allow_private_urls=allow_private_urls)
    block_id = block.save(BLOCK, overwrite=True)
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name(deployment)
    wanted = [
        Automation(
            name=FAILED, description=f"A {deployment} run ended Failed or Crashed.",
            trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                                 match={"prefect.resource.id": "prefect.flow-run.*"},
                                 match_related={"prefect.resource.id": f"prefect.deployment.{nightly.id}"},
                                 posture=Posture.Reactive, threshold=1),
            actions=[SendNotification(block_document_id=block_id,
                                      subject="synthtune nightly run {{ flow_run.name }} ended {{ flow_run.state.name }}",
                                      body="{{ flow_run.state.message }}\n{{ flow_run|ui_url }}")]),
        Automation(
            name=PROMOTED, description="The gate promoted a new champion.",
            trigger=EventTrigger(expect={"synthtune.model.promoted"}, match={"prefect.resource.id": "synthtune.pipeline.*"},
                                 posture=Posture.Reactive, threshold=1),
            actions=[SendNotification(block_document_id=block_id,
                                      subject="synthtune {{ event.resource.name }}: {{ event.payload.train_key }} "
                                              "is the new champion",
                                      body="{% for reason in event.payload.reasons %}{{ reason }}\n{% endfor %}")]),
    ]
    ids = {}
    for automation in wanted:
        try:
            Automation.read(name=automation.name).delete()
        except ValueError:  # none yet
            pass
        ids[automation.name] = str(automation.create().id)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webhook-url", required=True, help="Where the POSTs go (a Slack incoming webhook, say).")
    parser.add_argument("--deployment", default="synthtune/nightly", help="The deployment whose failures notify.")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="Allow a webhook on a private or loopback address (a self-hosted receiver).")
    args = parser.parse_args()
    for name, automation_id in apply(args.webhook_url, args.deployment, args.allow_private_urls).items():
        print(f"{name}: {automation_id}")


if __name__ == "__main__":
    main()

"""Automations for the nightly loop, on the server at $PREFECT_API_URL (running it again updates them):

- "synthtune: crash unresponsive runs": a flow run that stops sending heartbeats (its machine or
  container is gone) is marked `Crashed` after `--unresponsive-after` seconds, so it does not sit
  `Running` forever (the job templates set PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30);
- with `--webhook-url`: one webhook POST (Slack-compatible JSON, `{"text": ...}`) when a nightly run
  ends Failed or Crashed, and one on every promotion (event `synthtune.model.promoted`), through a
  `CustomWebhookNotificationBlock` named `synthtune-webhook`.

Run as (after `prefect deploy`):
    python deployments/automations.py
    python deployments/automations.py --webhook-url https://hooks.slack.com/services/T000/B000/XXXX
    python deployments/automations.py --webhook-url http://10.0.0.5:9000/hook --allow-private-urls

A crashed run is retried with `prefect flow-run retry <id>` or Retry in the UI: finished stages come
back `Cached` and training resumes from its newest valid checkpoint.
"""

from __future__ import annotations

import argparse

BLOCK = "synthtune-webhook"
FAILED = "synthtune: nightly run failed"
PROMOTED = "synthtune: model promoted"
UNRESPONSIVE = "synthtune: crash unresponsive runs"


def zombie_automation(unresponsive_after_s: int = 120):
    """Prefect's recipe for zombie flow runs: after a heartbeat, expect another heartbeat (or an end)
    within the window, else change the run's state to Crashed."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    return Automation(
        name=UNRESPONSIVE, description="A flow run stopped sending heartbeats: its process or machine is gone.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": ["prefect.flow-run.*"]}, for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1, within=timedelta(seconds=unresponsive_after_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {unresponsive_after_s} s: the run's process is gone.")])


def apply(webhook_url: str | None = None, deployment: str = "synthtune/nightly", allow_private_urls: bool = False,
          unresponsive_after_s: int = 120) -> dict[str, str]:
    """Create or replace the automations (and the webhook block); returns name -> automation id."""
    from prefect.automations import Automation

    wanted = [zombie_automation(unresponsive_after_s)]
    if webhook_url:
        wanted += notifications(webhook_url, deployment, allow_private_urls)
    ids = {}
    for automation in wanted:
        try:
            Automation.read(name=automation.name).delete()
        except ValueError:  # none yet
            pass
        ids[automation.name] = str(automation.create().id)
    return ids


def notifications(webhook_url: str, deployment: str, allow_private_urls: bool) -> list:
    """The webhook block (saved) and the two notification automations (not yet created)."""
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
    return [
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webhook-url", help="Where notifications are POSTed (a Slack incoming webhook, say).")
    parser.add_argument("--unresponsive-after", type=int, default=120,
                        help="Seconds without a heartbeat before a running flow run is marked Crashed.")
    parser.add_argument("--deployment", default="synthtune/nightly", help="The deployment whose failures notify.")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="Allow a webhook on a private or loopback address (a self-hosted receiver).")
    args = parser.parse_args()
    for name, automation_id in apply(args.webhook_url, args.deployment, args.allow_private_urls,
                                     args.unresponsive_after).items():
        print(f"{name}: {automation_id}")


if __name__ == "__main__":
    main()

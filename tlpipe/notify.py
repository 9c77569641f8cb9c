"""Failed runs, told: a Prefect automation on the Prefect server (PREFECT_API_URL) that
sends a notification whenever a run of the tlpipe flow fails, crashes or times out, a
scheduled one above all, which nobody watches.

The notification goes through a Prefect notification block saved on that server: a Slack
incoming webhook, or any webhook that takes JSON (`{"subject": ..., "text": ...}`). The
message names the flow run, its state and the state's message, which is the failing
stage's own (which gate, by how much), and the deployment it came from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from uuid import UUID

FLOW = "tlpipe"
BLOCK = "tlpipe-failed-runs"
AUTOMATION = "tlpipe run failed"
FAILED_STATES = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut")
SUBJECT = "tlpipe: {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = (
    "Run {{ flow_run.name }} of {{ flow.name }} ({{ deployment.name if deployment else 'no deployment' }}) "
    "ended {{ flow_run.state.name }}: {{ flow_run.state.message }}"
)


@dataclass(frozen=True)
class Registered:
    automation: UUID
    block: UUID


def register_failure_notice(webhook: str | None = None, slack: str | None = None) -> Registered:
    """Save the notification block (`slack`: a Slack incoming-webhook URL; `webhook`: any
    URL that takes a JSON POST) and (re)create the automation that sends through it when a
    tlpipe flow run fails, crashes or times out. Registering again replaces both."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.settings import PREFECT_API_URL

    if (webhook is None) == (slack is None):
        raise ValueError("name one of --webhook URL or --slack URL")
    if not PREFECT_API_URL.value():
        raise ValueError(
            "PREFECT_API_URL is not set: point it at the Prefect server the schedule runs on "
            "(an automation on a temporary server would never fire)"
        )
    block = (
        SlackWebhook(url=slack)
        if slack is not None
        else CustomWebhookNotificationBlock(
            name=BLOCK, url=webhook, json_data={"subject": "{{subject}}", "text": "{{body}}"}
        )
    )
    block_id = block.save(BLOCK, overwrite=True)
    with contextlib.suppress(ValueError):  # none yet
        Automation.read(name=AUTOMATION).delete()
    automation = Automation(
        name=AUTOMATION,
        description=f"A notification through the {BLOCK!r} block when a {FLOW} run does not complete.",
        trigger=EventTrigger(
            expect=set(FAILED_STATES),
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()
    return Registered(automation.id, block_id)

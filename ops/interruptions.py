"""Spot interruption notices from SQS: parse EventBridge events, receive and delete messages.

Strategy: an EventBridge rule (source `aws.ec2`, detail-types below) targets an SQS queue; the waker
long-polls it through `InterruptionQueue` (blocking boto3 calls: run them with trio.to_thread) and maps
each notice's instance id onto one of its upstreams. Event shape (EC2 user guide, "Spot Instance
interruption notices" and "EC2 instance rebalance recommendations"):

    {"version": "0", "id": "...", "detail-type": "EC2 Spot Instance Interruption Warning",
     "source": "aws.ec2", "account": "...", "time": "2024-01-01T00:00:00Z", "region": "us-east-1",
     "resources": ["arn:aws:ec2:us-east-1:123456789012:instance/i-..."],
     "detail": {"instance-id": "i-...", "instance-action": "terminate" | "stop" | "hibernate"}}

    {"detail-type": "EC2 Instance Rebalance Recommendation", ..., "detail": {"instance-id": "i-..."}}

Rules: a body that is not one of these (another event type, junk; an SNS envelope around one of these
is unwrapped) parses to None and never raises. The waker deletes the messages about its own instances
and the ones that are not EC2 notices at all; it leaves notices about other instances alone, so tiers
may share one queue (each takes its own; the rest come back after the visibility timeout and expire
with the queue's retention).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from ops.ec2 import Backoff, Clients, Ec2Error, call

logger = logging.getLogger(__name__)

INTERRUPTION = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
_KINDS = {INTERRUPTION: "interruption", REBALANCE: "rebalance"}

_json = msgspec.json.Decoder()


@dataclass(frozen=True)
class Notice:
    """One warning that an instance is about to go (interruption) or is at elevated risk (rebalance)."""

    kind: str  # "interruption" | "rebalance"
    instance_id: str
    action: str | None = None  # stop | terminate | hibernate (interruptions only)
    time: str | None = None  # the event's time, ISO 8601


def parse_notice(body: str | bytes) -> Notice | None:
    """The notice in an SQS message body (an EventBridge event, possibly inside an SNS envelope)."""
    try:
        event: Any = _json.decode(body)
    except msgspec.DecodeError:
        return None
    if isinstance(event, dict) and event.get("Type") == "Notification" and isinstance(event.get("Message"), str):
        try:
            event = _json.decode(event["Message"])
        except msgspec.DecodeError:
            return None
    if not isinstance(event, dict) or event.get("source") != "aws.ec2":
        return None
    kind = _KINDS.get(event.get("detail-type"))  # type: ignore[arg-type]
    detail = event.get("detail")
    if kind is None or not isinstance(detail, dict):
        return None
    instance_id = detail.get("instance-id")
    if not isinstance(instance_id, str) or not instance_id.startswith("i-"):
        return None
    action = detail.get("instance-action")
    when = event.get("time")
    return Notice(kind, instance_id, action if isinstance(action, str) else None,
                  when if isinstance(when, str) else None)


@dataclass(frozen=True)
class Message:
    receipt: str
    body: str


class InterruptionQueue:
    """ReceiveMessage / DeleteMessageBatch on the interruption queue. Every method blocks."""

    def __init__(self, clients: Clients, queue_url: str, *, backoff: Backoff | None = None) -> None:
        self._clients = clients
        self.queue_url = queue_url
        self._backoff = backoff or Backoff()

    def receive(self, wait_s: int) -> list[Message]:
        """Up to 10 messages; long-polls up to `wait_s` seconds (0..20) when the queue is empty."""
        sqs = self._clients.get("sqs")
        resp = call(sqs.receive_message, backoff=self._backoff, what="sqs.receive_message",
                    QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s)
        return [Message(m["ReceiptHandle"], m.get("Body", "")) for m in resp.get("Messages", [])]

    def delete(self, receipts: list[str]) -> None:
        """Delete handled messages (10 per batch, SQS's limit)."""
        sqs = self._clients.get("sqs")
        for i in range(0, len(receipts), 10):
            entries = [{"Id": str(n), "ReceiptHandle": r} for n, r in enumerate(receipts[i:i + 10])]
            call(sqs.delete_message_batch, backoff=self._backoff, what="sqs.delete_message_batch",
                 QueueUrl=self.queue_url, Entries=entries)


async def poll_notices(queue: InterruptionQueue, handle: Callable[[Notice], bool], *,
                       limiter: trio.CapacityLimiter, wait_s: int, poll_s: float) -> None:
    """Forever: receive, hand each notice to `handle` (True = it concerned us), delete what was handled
    and what is not a notice at all. SQS errors are logged and retried with a capped backoff."""
    delay = poll_s
    while True:
        try:
            # abandon_on_cancel: a long poll must not hold up shutdown; an abandoned receive's messages
            # reappear after the visibility timeout.
            messages = await trio.to_thread.run_sync(queue.receive, wait_s, limiter=limiter,
                                                     abandon_on_cancel=True)
        except Ec2Error as exc:
            logger.warning("interruption queue receive failed", extra={"code": exc.code, "retry_s": delay})
            await trio.sleep(delay)
            delay = min(60.0, delay * 2)
            continue
        delay = poll_s
        done: list[str] = []
        for message in messages:
            notice = parse_notice(message.body)
            if notice is None:
                logger.info("interruption queue: not an EC2 notice, deleting")
                done.append(message.receipt)
            elif handle(notice):
                done.append(message.receipt)
        if done:
            try:
                await trio.to_thread.run_sync(queue.delete, done, limiter=limiter)
            except Ec2Error as exc:
                logger.warning("interruption queue delete failed", extra={"code": exc.code})
        if not messages and wait_s == 0:
            await trio.sleep(poll_s)

"""ops.interruptions: EventBridge notice parsing, and the SQS poller against moto's SQS server."""

from __future__ import annotations

import json

import trio

from ops.ec2 import Clients
from ops.interruptions import InterruptionQueue, Notice, parse_notice, poll_notices
from tests.support.aws import client
from tests.support.notices import rebalance, spot_warning


def test_parse_spot_warning_and_rebalance() -> None:
    assert parse_notice(spot_warning("i-0abc", "stop")) == Notice("interruption", "i-0abc", "stop",
                                                                   "2026-11-22T01:00:00Z")
    assert parse_notice(rebalance("i-0abc").encode()) == Notice("rebalance", "i-0abc", None, "2026-11-22T01:00:00Z")


def test_parse_sns_envelope() -> None:
    body = json.dumps({"Type": "Notification", "MessageId": "x", "Message": spot_warning("i-0def")})
    assert parse_notice(body) == Notice("interruption", "i-0def", "terminate", "2026-11-22T01:00:00Z")


def test_parse_rejects_everything_else() -> None:
    other = json.loads(spot_warning("i-0abc"))
    other["detail-type"] = "EC2 Instance State-change Notification"
    spoofed = json.loads(spot_warning("i-0abc"))
    spoofed["source"] = "my.app"
    no_id = json.loads(spot_warning("i-0abc"))
    no_id["detail"] = {"instance-action": "stop"}
    for body in ("", "not json", "[]", "42", json.dumps(other), json.dumps(spoofed), json.dumps(no_id),
                 json.dumps({"Type": "Notification", "Message": "{broken"})):
        assert parse_notice(body) is None, body


class _WatchedQueue(InterruptionQueue):
    """The real queue, counting the receives that came back empty (each in the poller's thread)."""

    empty_receives = 0

    def receive(self, wait_s: int):
        got = super().receive(wait_s)
        if not got:
            self.empty_receives += 1
        return got


async def test_poller_hands_over_ours_and_deletes_handled(aws_url: str) -> None:
    sqs = client(aws_url, "sqs")
    url = sqs.create_queue(QueueName="interruptions")["QueueUrl"]
    for body in (spot_warning("i-0000000000000000a"), rebalance("i-0000000000000000b"), "junk"):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    seen: list[Notice] = []
    queue = _WatchedQueue(Clients("us-east-1", aws_url), url)
    empty_before_last_notice: list[int] = []

    def handle(notice: Notice) -> bool:
        seen.append(notice)
        empty_before_last_notice[:] = [queue.empty_receives]
        return notice.instance_id == "i-0000000000000000a"  # the other one belongs to another tier

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: poll_notices(queue, handle, limiter=trio.CapacityLimiter(1),
                                                    wait_s=0, poll_s=0.05))
            # The poller deletes a batch before it receives again, so a receive that finds the queue
            # empty after both notices were handed over comes after every deletion it was going to make.
            while len(seen) < 2 or queue.empty_receives <= empty_before_last_notice[0]:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert sorted(n.kind for n in seen) == ["interruption", "rebalance"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages",
                                                                   "ApproximateNumberOfMessagesNotVisible"])
    # Left in the queue: only the other tier's rebalance notice (in flight until its visibility timeout).
    assert int(attrs["Attributes"]["ApproximateNumberOfMessagesNotVisible"]) == 1
    assert int(attrs["Attributes"]["ApproximateNumberOfMessages"]) == 0

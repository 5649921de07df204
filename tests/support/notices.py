"""EC2 interruption notices as EventBridge delivers them to the SQS queue a tier's waker polls
(tests/ops/test_interruptions.py, test_waker.py, tests/e2e/test_wake.py)."""

from __future__ import annotations

import json


def spot_warning(instance_id: str, action: str = "terminate") -> str:
    """The event EventBridge delivers ~2 minutes before a spot interruption (EC2 user guide shape)."""
    return json.dumps({
        "version": "0", "id": "1e5527d7-bb36-4607-3370-4164db56a40e",
        "detail-type": "EC2 Spot Instance Interruption Warning", "source": "aws.ec2",
        "account": "123456789012", "time": "2026-11-22T01:00:00Z", "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "instance-action": action},
    })


def rebalance(instance_id: str) -> str:
    """An EC2 Instance Rebalance Recommendation for `instance_id`."""
    return json.dumps({
        "version": "0", "id": "0d0e5ec0-2d1c-4b4a-8e0e-5a0a7f3c0a11",
        "detail-type": "EC2 Instance Rebalance Recommendation", "source": "aws.ec2",
        "account": "123456789012", "time": "2026-11-22T01:00:00Z", "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}"],
        "detail": {"instance-id": instance_id},
    })

"""Fixtures for tests/ops: moto's server mode with fake credentials (see tests/ops/aws.py)."""

from tests.ops.aws import aws_url, moto_url  # noqa: F401  (fixtures)

"""Fixtures for the whole suite: moto's server mode with fake credentials (tests/support/aws.py)."""

from tests.support.aws import aws_url, moto_url  # noqa: F401  (fixtures)

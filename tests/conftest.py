"""Fixtures for the whole suite: moto's server mode with fake credentials (tests/support/aws.py) and
refusing upstream addresses (tests/support/refusing.py), the wake-wait clock (tests/support/upstream_kit.py)."""

from tests.support.aws import aws_url, moto_url  # noqa: F401  (fixtures)
from tests.support.refusing import dead_upstream  # noqa: F401  (fixture)
from tests.support.upstream_kit import wake_clock  # noqa: F401  (fixture)

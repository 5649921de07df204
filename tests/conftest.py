"""Fixtures for the whole suite: moto's server mode with fake credentials (tests/support/aws.py) and
refusing upstream addresses (tests/support/refusing.py), real Redis and PostgreSQL servers
(tests/support/servers.py), the wake-wait clock (tests/support/upstream_kit.py)."""

from tests.support.aws import aws_url, moto_url  # noqa: F401  (fixtures)
from tests.support.refusing import dead_upstream  # noqa: F401  (fixture)
from tests.support.servers import (  # noqa: F401  (fixtures: real Redis and PostgreSQL)
    fresh_postgres,
    fresh_redis,
    pg_url,
    postgres_server,
    redis_server,
    redis_url,
)
from tests.support.upstream_kit import wake_clock  # noqa: F401  (fixture)

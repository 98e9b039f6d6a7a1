"""Dagster resources, chosen per environment in one place (`resources_for`).

Database URLs are read from the environment when a run connects, so they never sit in run
configuration or the Dagster UI; tests pass explicit URLs instead.
"""

from __future__ import annotations

from typing import Optional

import dagster as dg
import psycopg

from pg2cio_assets import settings
from pg2cio_assets.pg import connect


class PostgresResource(dg.ConfigurableResource):
    """A PostgreSQL database: the commerce source, or pg2cio's state database."""

    role: str = "source"
    url_env: str = settings.SOURCE_URL
    fallback_env: Optional[str] = None
    schema_name: str = settings.DEFAULT_SOURCE_SCHEMA
    url: Optional[str] = None  # explicit URL for tests and scripts; normally read from url_env

    def resolved_url(self) -> str:
        if self.url:
            return self.url
        return settings.resolve_url(self.url_env, self.fallback_env)

    def connect(self) -> psycopg.Connection:
        """A new connection in UTC; errors name the database without its credentials."""
        return connect(self.resolved_url(), self.role)


def resources_for(cfg: settings.Settings, env: str = "default") -> dict[str, object]:
    """The resources of a deployment. Every environment reads its URLs from PG2CIO_* variables;
    tests build their own with explicit URLs (see pg2cio_assets_tests/conftest.py)."""
    if env != "default":
        raise settings.ConfigError(f"unknown pg2cio environment {env!r}")
    return {
        "source": PostgresResource(role="source", url_env=settings.SOURCE_URL, schema_name=cfg.source_schema),
        "state": PostgresResource(
            role="state", url_env=settings.STATE_URL, fallback_env=settings.SOURCE_URL, schema_name=cfg.state_schema
        ),
    }

"""Dagster resources, chosen per environment in one place (`resources_for`).

Database URLs are read from the environment when a run connects, so they never sit in run
configuration or the Dagster UI; tests pass explicit URLs instead.
"""

from __future__ import annotations

import os
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
        "customerio": CustomerIOResource(),
        # The backfill preview's answer lives in its run's metadata; nothing to persist.
        "preview_io_manager": dg.mem_io_manager,
    }


class CustomerIOResource(dg.ConfigurableResource):
    """The Customer.io Track API. Credentials come from CUSTOMERIO_SITE_ID / CUSTOMERIO_API_KEY
    when the run starts (explicit values are for tests); they only ever travel in the
    Authorization header."""

    track_url: Optional[str] = None  # default: $CUSTOMERIO_TRACK_URL, else https://track.customer.io
    site_id: Optional[str] = None
    api_key: Optional[str] = None
    rate_per_second: float = 100.0
    max_retries: int = 6
    backoff_base_seconds: float = 0.5
    dry_run: Optional[bool] = None  # default: $PG2CIO_DRY_RUN
    erase_action: Optional[str] = None  # default: $PG2CIO_ERASURE_ACTION, else delete

    def is_dry_run(self) -> bool:
        return self.dry_run if self.dry_run is not None else settings.Settings.from_env().dry_run

    def erasure(self) -> str:
        action = self.erase_action or os.environ.get(settings.ERASURE_ACTION, "").strip() or "delete"
        if action not in ("delete", "suppress"):
            raise settings.ConfigError(f"{settings.ERASURE_ACTION}={action!r}: use delete or suppress")
        return action

    def client(self, log=lambda _m: None):
        """A TrackClient, or None in a dry run (nothing may be sent)."""
        from pg2cio_assets.customerio import TrackClient

        if self.is_dry_run():
            return None
        url = self.track_url or os.environ.get(settings.CIO_TRACK_URL, "").strip() or settings.DEFAULT_TRACK_URL
        site_id = self.site_id or os.environ.get(settings.CIO_SITE_ID, "").strip()
        api_key = self.api_key or os.environ.get(settings.CIO_API_KEY, "").strip()
        missing = [n for n, v in ((settings.CIO_SITE_ID, site_id), (settings.CIO_API_KEY, api_key)) if not v]
        if missing:
            raise settings.ConfigError(
                f"{' and '.join(missing)} not set: use a Track API key of your workspace, or set "
                f"{settings.DRY_RUN}=1 to build and record payloads without sending"
            )
        return TrackClient(url, site_id, api_key, rate_per_second=self.rate_per_second, max_retries=self.max_retries,
                           backoff_base=self.backoff_base_seconds, log=log)

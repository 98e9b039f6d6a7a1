"""The pg2cio code location: every asset, check, job, sensor, schedule and resource, as
`dagster dev` loads it."""

from __future__ import annotations

import warnings

import dagster as dg

# BackfillPolicy, pools and friends are marked beta/preview in 1.13; the warning repeats per
# asset and buries the messages a data team needs in `dagster dev`'s output.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

from pg2cio_assets import events as ev
from pg2cio_assets.assets.extract import build_extract_assets, source_specs
from pg2cio_assets.assets.events import build_events_asset
from pg2cio_assets.assets.identity import identity_assets, person_attributes
from pg2cio_assets.assets.sync import build_delivery_report, build_events_sync_asset, customerio_people_sync
from pg2cio_assets.orchestration import (
    build_changes_sensor, build_jobs, build_nightly_schedule, build_preview_job, with_freshness,
)
from pg2cio_assets.partitions import daily_partitions
from pg2cio_assets.resources import resources_for
from pg2cio_assets.settings import Settings

SETTINGS = Settings.from_env()
DAILY = daily_partitions(SETTINGS.partition_start)
ENABLED = ev.enabled_events(SETTINGS.enable_events, SETTINGS.disable_events)

ASSETS = with_freshness([
    *source_specs(),
    *build_extract_assets(DAILY, SETTINGS.state_schema),
    identity_assets,
    person_attributes,
    build_events_asset(DAILY, SETTINGS.enable_events, SETTINGS.disable_events),
    customerio_people_sync,
    build_events_sync_asset(DAILY, SETTINGS.backfill_policy),
    build_delivery_report(ENABLED, SETTINGS.recovery_delay_minutes),
], ENABLED)
NEAR_REAL_TIME, NIGHTLY = build_jobs(DAILY)
RESOURCES = resources_for(SETTINGS)

defs = dg.Definitions(
    assets=ASSETS,
    jobs=[NEAR_REAL_TIME, NIGHTLY, build_preview_job(DAILY, SETTINGS)],
    sensors=[build_changes_sensor(NEAR_REAL_TIME, DAILY, SETTINGS)],
    schedules=[build_nightly_schedule(NIGHTLY, DAILY, SETTINGS)],
    resources=RESOURCES,
)

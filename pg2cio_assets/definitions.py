"""The pg2cio code location: every asset, check and resource, as `dagster dev` loads it."""

from __future__ import annotations

import warnings

import dagster as dg

# BackfillPolicy and friends are marked beta in 1.13; the warning repeats per asset and buries
# the messages a data team needs in `dagster dev`'s output.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

from pg2cio_assets.assets.extract import build_extract_assets, source_specs
from pg2cio_assets.assets.events import build_events_asset
from pg2cio_assets.assets.identity import identity_assets, person_attributes
from pg2cio_assets.assets.sync import build_events_sync_asset, customerio_people_sync, delivery_report
from pg2cio_assets.partitions import daily_partitions
from pg2cio_assets.resources import resources_for
from pg2cio_assets.settings import Settings

SETTINGS = Settings.from_env()
DAILY = daily_partitions(SETTINGS.partition_start)

ASSETS = [
    *source_specs(),
    *build_extract_assets(DAILY, SETTINGS.state_schema),
    identity_assets,
    person_attributes,
    build_events_asset(DAILY, SETTINGS.enable_events, SETTINGS.disable_events),
    customerio_people_sync,
    build_events_sync_asset(DAILY),
    delivery_report,
]
RESOURCES = resources_for(SETTINGS)

defs = dg.Definitions(assets=ASSETS, resources=RESOURCES)

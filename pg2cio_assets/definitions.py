"""The pg2cio code location: every asset, check and resource, as `dagster dev` loads it."""

from __future__ import annotations

import dagster as dg

from pg2cio_assets.assets.extract import build_extract_assets, source_specs
from pg2cio_assets.partitions import daily_partitions
from pg2cio_assets.resources import resources_for
from pg2cio_assets.settings import Settings

SETTINGS = Settings.from_env()
DAILY = daily_partitions(SETTINGS.partition_start)

defs = dg.Definitions(
    assets=[*source_specs(), *build_extract_assets(DAILY, SETTINGS.state_schema)],
    resources=resources_for(SETTINGS),
)

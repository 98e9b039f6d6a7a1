"""The daily partitions every time-based asset shares (UTC days, today included)."""

from __future__ import annotations

from datetime import datetime, timezone

import dagster as dg

# The first partition also holds everything before it: an account last updated years before
# PG2CIO_PARTITION_START is still an account.
EARLIEST = datetime(1, 1, 1, tzinfo=timezone.utc)


def daily_partitions(start_date: str) -> dg.DailyPartitionsDefinition:
    # end_offset=1 makes today's partition available, so the near-real-time path can fill it.
    return dg.DailyPartitionsDefinition(start_date=start_date, end_offset=1, timezone="UTC")


def run_window(context: dg.AssetExecutionContext, partitions: dg.TimeWindowPartitionsDefinition) -> tuple[datetime, datetime]:
    """[start, end) of the run's partition or partition range; open below for the first partition."""
    window = context.partition_time_window
    first = partitions.start.astimezone(timezone.utc)
    return (EARLIEST if window.start <= first else window.start), window.end


def sql_bound(moment: datetime) -> datetime | str:
    """A window bound as a query parameter: EARLIEST becomes '-infinity', so even a row stamped
    -infinity lands in the first partition (and fails there, loudly) instead of nowhere."""
    return "-infinity" if moment <= EARLIEST else moment

"""The daily partitions every time-based asset shares (UTC days, today included)."""

from __future__ import annotations

import dagster as dg


def daily_partitions(start_date: str) -> dg.DailyPartitionsDefinition:
    # end_offset=1 makes today's partition available, so the near-real-time path can fill it.
    return dg.DailyPartitionsDefinition(start_date=start_date, end_offset=1, timezone="UTC")

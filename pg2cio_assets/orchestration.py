"""How pg2cio runs day to day: freshness per use case, the near-real-time sensor, the nightly
refresh, and the backfill preview. Dagster wiring only; the decisions live in `changes`,
`suppression` and `delivery`.
"""


from datetime import date, datetime, timedelta, timezone
from typing import Iterable, Optional

import dagster as dg
from pydantic import Field

from pg2cio_assets import changes, contract, delivery
from pg2cio_assets.partitions import EARLIEST
from pg2cio_assets.resources import PostgresResource
from pg2cio_assets.settings import ConfigError, Settings, check_policy
from pg2cio_assets.suppression import TRIGGER_WINDOW, Suppression

SENSOR_NAME = "source_changes_sensor"
NEAR_REAL_TIME_JOB = "near_real_time_sync"
NIGHTLY_JOB = "nightly_refresh"
PREVIEW_JOB = "backfill_preview"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


# --- freshness: derived from the contract's use cases, never typed twice ---------------------


def freshness_windows(enabled: Iterable[contract.Event]) -> dict[str, int]:
    """Asset name -> fail window in minutes: the tightest target among the use cases it serves."""
    return {name: contract.latency_target_minutes(ucs) for name, ucs in contract.asset_use_cases(list(enabled)).items() if ucs}


def with_freshness(assets: list, enabled: Iterable[contract.Event]) -> list:
    """`assets` with a FreshnessPolicy.time_window on every asset that serves a use case."""
    windows = freshness_windows(enabled)

    def apply(spec: dg.AssetSpec) -> dg.AssetSpec:
        minutes = windows.get(spec.key.to_user_string())
        if minutes is None:
            return spec
        return spec.replace_attributes(
            freshness_policy=dg.FreshnessPolicy.time_window(fail_window=timedelta(minutes=minutes),
                                                           warn_window=timedelta(minutes=minutes / 2)),
            metadata={**spec.metadata, "pg2cio/latency_target_minutes": minutes,
                      "pg2cio/use_cases": ", ".join(contract.asset_use_cases(list(enabled))[spec.key.to_user_string()])},
        )

    out = []
    for a in assets:
        if isinstance(a, dg.AssetsDefinition):
            out.append(a.map_asset_specs(apply))
        else:
            out.append(a)
    return out


# --- jobs ------------------------------------------------------------------------------------

def graph_selection() -> dg.AssetSelection:
    """Every asset pg2cio materializes (the store's own relations are not among them)."""
    return dg.AssetSelection.all() - dg.AssetSelection.groups("source")


def build_jobs(partitions: dg.PartitionsDefinition) -> tuple:
    near_real_time = dg.define_asset_job(
        NEAR_REAL_TIME_JOB,
        selection=graph_selection(),
        # One process: a small run starts in seconds instead of spawning a process per step.
        executor_def=dg.in_process_executor,
        description="What source_changes_sensor runs: the changed days' extracts, identity, attributes, events "
        "and both syncs, in one process, so a change reaches Customer.io within the recovery target.",
    )
    nightly = dg.define_asset_job(
        NIGHTLY_JOB,
        selection=graph_selection(),
        description="The nightly refresh: the last days' partitions and every unpartitioned asset, so LTV, counts "
        "and lapse flags move with the calendar even when nothing changed in the source.",
    )
    return near_real_time, nightly


def _clamp(days: list[date], partitions: dg.TimeWindowPartitionsDefinition, now: datetime) -> tuple[str, str]:
    first = partitions.start.astimezone(timezone.utc).date()
    last = now.astimezone(timezone.utc).date()  # today's partition exists (end_offset=1)
    lo = min(max(min(days), first), last)
    hi = min(max(max(days), first), last)
    return lo.isoformat(), hi.isoformat()


def partition_tags(first: str, last: str) -> dict[str, str]:
    return {RANGE_START: first, RANGE_END: last}


# --- the near-real-time sensor ---------------------------------------------------------------


def build_changes_sensor(job, partitions: dg.TimeWindowPartitionsDefinition, cfg: Settings) -> dg.SensorDefinition:
    overlap = timedelta(seconds=cfg.sensor_overlap_seconds)

    @dg.sensor(
        name=SENSOR_NAME,
        job=job,
        minimum_interval_seconds=cfg.sensor_interval_seconds,
        description=(
            f"Every {cfg.sensor_interval_seconds} s, looks for rows of {', '.join(contract.CHANGE_FEEDS)} changed since "
            f"its cursor (updated_at, key), {cfg.sensor_overlap_seconds} s of overlap included so rows committed late "
            "are not missed, and requests one run of near_real_time_sync over the days they touch. The run_key is "
            "derived from the changes, so a batch is never launched twice; the ledger keeps the overlap from "
            "sending twice."
        ),
    )
    def source_changes_sensor(context: dg.SensorEvaluationContext, source: PostgresResource):
        cursor = changes.Cursor.loads(context.cursor)
        now = datetime.now(timezone.utc)
        with source.connect() as conn:
            polled = changes.poll(conn, source.schema_name, cursor, now=now, overlap=overlap)
        found = polled.changes
        batch = changes.plan(found, cursor, now=now, overlap=overlap, stopped_at=polled.stopped_at)
        if polled.stopped_at is not None:
            context.log.info(f"catching up: read {changes.POLL_LIMIT:,} rows of a relation, up to "
                             f"{polled.stopped_at.isoformat()}; the next tick reads on from there")
        context.update_cursor(batch.cursor.dumps())
        if not batch.new:
            return dg.SkipReason(f"no change since {cursor.high.isoformat() if cursor.high else 'the sensor started'} "
                                 f"({len(found)} row(s) in the overlap, all handed to a run already)")
        first, last = _clamp(batch.days(now, TRIGGER_WINDOW), partitions, now)
        counts = batch.by_relation()
        context.log.info(f"{len(batch.new)} changed row(s) {counts}: run over {first}..{last}")
        return dg.RunRequest(
            run_key=batch.run_key,
            tags={**partition_tags(first, last), "pg2cio/changes": ", ".join(f"{k}={v}" for k, v in counts.items())},
        )

    return source_changes_sensor


# --- the nightly refresh -----------------------------------------------------------------------


def build_nightly_schedule(job, partitions: dg.TimeWindowPartitionsDefinition, cfg: Settings) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="nightly_refresh_schedule",
        job=job,
        cron_schedule="0 2 * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"02:00 UTC: rebuild the last {cfg.nightly_days} day(s) and every unpartitioned asset, so "
        "lifetime value, counts and lapse flags are re-evaluated as of the new day (the contract's 24-hour targets), "
        "and anything the sensor left to it is caught up.",
    )
    def nightly_refresh_schedule(context: dg.ScheduleEvaluationContext):
        tick = context.scheduled_execution_time.astimezone(timezone.utc)
        yesterday = tick.date() - timedelta(days=1)
        first = max(yesterday - timedelta(days=cfg.nightly_days - 1), partitions.start.astimezone(timezone.utc).date())
        return dg.RunRequest(run_key=f"nightly-{tick.date().isoformat()}",
                             tags=partition_tags(first.isoformat(), yesterday.isoformat()))

    return nightly_refresh_schedule


# --- the backfill preview ---------------------------------------------------------------------


class PreviewConfig(dg.Config):
    start: str = Field(description="first day of the backfill, YYYY-MM-DD (UTC)")
    end: str = Field(description="last day of the backfill, YYYY-MM-DD (UTC), included")
    policy: Optional[str] = Field(default=None, description="hold, attributes_only or send; default PG2CIO_BACKFILL_POLICY")


def preview_window(start: str, end: str, partitions: dg.TimeWindowPartitionsDefinition) -> tuple[datetime, datetime]:
    """[start, end + 1 day) as a backfill of those partitions would read it (the first one open below)."""
    try:
        a, b = date.fromisoformat(start), date.fromisoformat(end)
    except ValueError:
        raise ConfigError(f"start={start!r} / end={end!r}: use dates as YYYY-MM-DD") from None
    if b < a:
        raise ConfigError(f"end {end} is before start {start}")
    first = partitions.start.astimezone(timezone.utc)
    lo = datetime(a.year, a.month, a.day, tzinfo=timezone.utc)
    hi = datetime(b.year, b.month, b.day, tzinfo=timezone.utc) + timedelta(days=1)
    return (EARLIEST if lo <= first else lo), hi


def preview_table(d: delivery.Delivery) -> list[dict]:
    rows = []
    for name in sorted(d.by_name):
        per = d.by_name[name]
        rows.append({"event": name, "would_send": per.get("would_send", 0), "would_hold": per.get("would_suppress", 0),
                     "would_skip": per.get("would_skip", 0), "over_a_limit": per.get("would_quarantine", 0)})
    return rows


def preview_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(nothing unsettled in this window: a backfill would send no event)"
    cols = ["event", "would_send", "would_hold", "would_skip", "over_a_limit"]
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    lines += ["| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def build_preview_job(partitions: dg.TimeWindowPartitionsDefinition, cfg: Settings) -> dg.JobDefinition:
    @dg.op(name="preview_backfill", out=dg.Out(dict, io_manager_key="preview_io_manager"))
    def preview_backfill(context: dg.OpExecutionContext, config: PreviewConfig, state: PostgresResource):
        """Per event name, what a backfill of [start, end] would send now, hold (stamped within
        72 hours, policy hold), skip (policy attributes_only) or quarantine (over a limit),
        from the events already built for those days. Sends and writes nothing."""
        policy = check_policy(config.policy or cfg.backfill_policy, "backfill_preview config policy")
        lo, hi = preview_window(config.start, config.end, partitions)
        built = context.instance.get_materialized_partitions(dg.AssetKey("events"))
        days = [k for k in partitions.get_partition_keys() if config.start <= k <= config.end]
        unbuilt = [k for k in days if k not in built]
        if unbuilt:
            context.log.warning(f"events are not built for {len(unbuilt)} of the {len(days)} day(s) "
                                f"({', '.join(unbuilt[:5])}{'...' if len(unbuilt) > 5 else ''}): this preview counts "
                                "what is built; materialize the extracts and events for the range first (they send nothing)")
        with state.connect() as conn:
            d = delivery.sync_events(conn, None, state.schema_name, start=lo if lo > EARLIEST else "-infinity", end=hi,
                                     run_id=None, suppression=Suppression(policy, "backfill preview"), preview=True)
        rows = preview_table(d)
        md = preview_markdown(rows)
        context.log.info(f"backfill preview {config.start}..{config.end}, policy {policy}:\n{md}")
        totals = {k: sum(r[k] for r in rows) for k in ("would_send", "would_hold", "would_skip", "over_a_limit")}
        return dg.Output(
            {"policy": policy, "by_name": rows, **totals},
            metadata={"policy": policy, "window": f"{config.start}..{config.end}", "preview": dg.MetadataValue.md(md),
                      **totals, "days_without_events_built": len(unbuilt)},
        )

    @dg.job(name=PREVIEW_JOB, description="Before a backfill: per event name, how many events it would send and how "
            "many it would hold (or skip). Launch it from the Launchpad with start, end and policy.")
    def backfill_preview():
        preview_backfill()

    return backfill_preview


__all__ = ["with_freshness", "build_jobs", "build_changes_sensor", "build_nightly_schedule", "build_preview_job",
           "freshness_windows", "preview_window", "preview_table"]

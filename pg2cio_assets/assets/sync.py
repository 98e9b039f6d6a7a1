"""Customer.io sync assets and the delivery report: thin wiring of pg2cio_assets.delivery."""

from datetime import datetime, timedelta, timezone
from typing import Optional

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext
from psycopg import sql

from pg2cio_assets import contract, delivery
from pg2cio_assets.customerio import MAX_REQUEST_BYTES
from pg2cio_assets.partitions import run_window, sql_bound
from pg2cio_assets.resources import CustomerIOResource, PostgresResource
from pg2cio_assets.settings import DEFAULT_BACKFILL_POLICY, DEFAULT_RECOVERY_DELAY, check_policy
from pg2cio_assets.state import read_frame, replace_table
from pg2cio_assets.suppression import Suppression, decide
from pydantic import Field

# One pool for everything that calls the Track API: with its limit at 1 (dagster.yaml), a
# backfill and the sensor's runs take turns, so together they never exceed the client's rate.
CUSTOMERIO_POOL = "customerio"


def _result(d: delivery.Delivery, dry: bool) -> dict:
    return {
        **{k: (dg.MetadataValue.json(v) if isinstance(v, dict) else v) for k, v in d.metadata().items()},
        "by_name": dg.MetadataValue.json(d.by_name),
        "dry_run": dry,
        "seconds": round(d.seconds, 2),
    }


@dg.asset(
    group_name="sync",
    kinds={"customerio", "postgres"},
    deps=["person_attributes", "people", "identity_merges"],
    pool=CUSTOMERIO_POOL,
)
def customerio_people_sync(context: AssetExecutionContext, state: PostgresResource, customerio: CustomerIOResource) -> dg.MaterializeResult:
    """Identifies every person whose attributes differ from what Customer.io last accepted
    (only the changed attributes, `_timestamp` always, `created_at` on the first identify only),
    then the merges identity resolution asked for (after their primary exists), then a delete
    or suppress, once, for each erased customer. Outcomes are kept in the ledger
    (cio_attribute_ledger, cio_merge_ledger, cio_erasure_ledger): no change, no request."""
    client = customerio.client(context.log.info)
    try:
        with state.connect() as conn:
            d = delivery.sync_people(conn, client, state.schema_name, as_of=datetime.now(timezone.utc),
                                     erase_action=customerio.erasure(), run_id=context.run.run_id, log=context.log.info)
    finally:
        if client is not None:
            client.close()
    context.log.info(f"people sync: {d.outcomes}, {d.requests} request(s)")
    return dg.MaterializeResult(metadata=_result(d, client is None))


class EventsSyncConfig(dg.Config):
    """How this run treats events that could trigger campaigns (see the backfill playbook)."""

    suppress_triggers: Optional[bool] = Field(
        default=None,
        description="Apply the backfill suppression policy. Default: only in backfill runs (dagster/backfill tag). "
        "Set true for a manual range run that replays history; false makes a backfill send like a live run.")
    policy: Optional[str] = Field(
        default=None,
        description="hold (default: events stamped within 72 h are held, older ones sent), attributes_only (no "
        "events) or send (everything, with a warning). Default: the pg2cio/backfill_policy run tag, else "
        "PG2CIO_BACKFILL_POLICY.")


def run_path(tags: dict[str, str], suppression: Suppression | None) -> str:
    """How a run reached Customer.io, for the latency report: sensor, backfill or run."""
    if suppression is not None:
        return "backfill"
    return "sensor" if "dagster/sensor_name" in tags else "run"


def build_events_sync_asset(partitions: dg.PartitionsDefinition, default_policy: str = DEFAULT_BACKFILL_POLICY) -> dg.AssetsDefinition:
    check_policy(default_policy, "PG2CIO_BACKFILL_POLICY")

    @dg.asset(
        name="customerio_events_sync",
        group_name="sync",
        kinds={"customerio", "postgres"},
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=["events", "customerio_people_sync"],
        pool=CUSTOMERIO_POOL,
    )
    def customerio_events_sync(context: AssetExecutionContext, config: EventsSyncConfig, state: PostgresResource,
                               customerio: CustomerIOResource) -> dg.MaterializeResult:
        """Sends the window's events that the ledger has not settled, in batches under 500 KB,
        and records each as accepted, rejected (with Customer.io's reason) or quarantined (over a
        limit). An accepted event is never sent again: not on a rerun, a retry or a backfill.
        A backfill run applies its suppression policy (hold by default): events stamped within
        the last 72 hours, which could fire live campaigns, are held and recorded as suppressed,
        then sent once they are too old to trigger. Preview it first with the backfill_preview job."""
        start, end = run_window(context, partitions)
        tags = dict(context.run.tags)
        if config.policy is not None:
            check_policy(config.policy, "customerio_events_sync config policy")
        suppression = decide(tags, default_policy, config.suppress_triggers, config.policy)
        path = run_path(tags, suppression)
        if suppression is None:
            if config.policy:
                context.log.warning(f"policy {config.policy} ignored: this is a live run (no dagster/backfill tag, "
                                    "suppress_triggers not set)")
        elif suppression.policy == "send":
            context.log.warning(f"backfill with policy send ({suppression.why}): events stamped within the last 72 h "
                                "are sent and CAN trigger live campaigns")
        else:
            context.log.info(f"trigger suppression: {suppression.why}")
        client = customerio.client(context.log.info)
        try:
            with state.connect() as conn:
                d = delivery.sync_events(conn, client, state.schema_name, start=sql_bound(start), end=end,
                                         run_id=context.run.run_id, log=context.log.info, suppression=suppression, path=path)
        finally:
            if client is not None:
                client.close()
        context.log.info(f"events sync: {d.outcomes}, {d.requests} request(s)")
        held = {name: {k: v for k, v in per.items() if k in ("suppressed", "skipped")} for name, per in d.by_name.items()}
        held = {k: v for k, v in held.items() if v}
        return dg.MaterializeResult(metadata={
            **_result(d, client is None),
            "path": path,
            "suppression_policy": suppression.policy if suppression else "none (live run)",
            "suppression_reason": suppression.why if suppression else "not a backfill: every unsettled event is sent",
            "suppressed": d.outcomes.get("suppressed", 0),
            "skipped": d.outcomes.get("skipped", 0),
            "not_sent_by_name": dg.MetadataValue.json(held),
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
        })

    return customerio_events_sync


def _latency_md(rows: list[delivery.Latency]) -> str:
    if not rows:
        return "(no accepted events with a source change time yet)"
    lines = ["| event | path | events | p50 s | p95 s | max s |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.path} | {r.events:,} | {r.p50:,.1f} | {r.p95:,.1f} | {r.max:,.1f} |" for r in rows]
    return "\n".join(lines)


def build_delivery_report(enabled: list[contract.Event], recovery_delay_minutes: int = DEFAULT_RECOVERY_DELAY) -> dg.AssetsDefinition:
    use_cases: dict[str, list[str]] = {}
    for e in enabled:
        use_cases.setdefault(e.use_case, []).append(e.name)
    checks = {
        f"{u}_delivery_within_target": (
            names,
            f"p95 of the time from a source row's change to Customer.io accepting its event, over the {u} events "
            f"({', '.join(names)}) the sensor and live runs delivered in the last 24 hours, is within the contract's "
            f"{contract.USE_CASES[u].latency_minutes} minutes. Backfills are late by design and left out.",
        )
        for u, names in sorted(use_cases.items())
    }

    @dg.asset(
        name="delivery_report",
        group_name="sync",
        kinds={"postgres"},
        deps=["customerio_people_sync", "customerio_events_sync"],
        check_specs=[dg.AssetCheckSpec(name, asset="delivery_report", description=doc) for name, (_, doc) in checks.items()],
    )
    def delivery_report(context: AssetExecutionContext, state: PostgresResource) -> dg.MaterializeResult:
        """What Customer.io holds from pg2cio, from the ledger: events per name and outcome
        (accepted, rejected with a reason, quarantined, suppressed or skipped by a backfill,
        would_send in a dry run), identifies, merges, erasures, held attribute values; requests,
        bytes and mean batch fill; delivery latency (source change to acceptance, p50 / p95 / max
        per event name and path) with a check per use case against its target; and the
        checkout_started events whose purchase reached Customer.io after the first recovery
        message would have gone. Table delivery_report in the state schema."""
        schema = state.schema_name
        now = datetime.now(timezone.utc)
        with state.connect() as conn:
            rows = delivery.report_rows(conn, schema)
            totals = conn.execute(sql.SQL(
                "SELECT count(*), coalesce(sum(bytes), 0), coalesce(avg(bytes), 0), coalesce(sum(ops), 0) FROM {}"
            ).format(delivery.tables(schema)["requests"])).fetchone()
            df = pd.DataFrame(rows, columns=["kind", "outcome", "count"])
            replace_table(conn, schema, "delivery_report", df, [("kind", "text"), ("outcome", "text"), ("count", "bigint")])
            latency = delivery.latency_rows(conn, schema)
            recent = {name: delivery.use_case_latency(conn, schema, names, since=now - timedelta(hours=24))
                      for name, (names, _) in checks.items()}
            risk = delivery.recovery_false_positives(conn, schema, recovery_delay_minutes, now=now)
        requests, sent_bytes, mean_bytes, ops = totals
        results = []
        for name, lat in recent.items():
            use_case = name.removesuffix("_delivery_within_target")
            target = contract.USE_CASES[use_case].latency_minutes * 60
            if lat is None:
                results.append(dg.AssetCheckResult(check_name=name, passed=True, metadata={
                    "events": 0, "target_seconds": target,
                    "note": "no live delivery in the last 24 hours: nothing to measure (switch source_changes_sensor on)"}))
                continue
            passed = lat.p95 <= target
            if not passed:
                context.log.warning(f"{use_case}: p95 delivery latency {lat.p95:,.0f} s is over the target of {target:,} s")
            results.append(dg.AssetCheckResult(check_name=name, passed=passed, metadata={
                "events": lat.events, "p50_seconds": round(lat.p50, 1), "p95_seconds": round(lat.p95, 1),
                "max_seconds": round(lat.max, 1), "target_seconds": target}))
        md = "\n".join(["| kind | outcome | count |", "|---|---|---|"] + [f"| {k} | {o} | {n:,} |" for k, o, n in rows])
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(df),
                "report": dg.MetadataValue.md(md),
                "requests": int(requests),
                "bytes_sent": int(sent_bytes),
                "ops_sent": int(ops),
                "mean_batch_bytes": round(float(mean_bytes)),
                "mean_batch_fill": round(float(mean_bytes) / MAX_REQUEST_BYTES, 3),
                "latency": dg.MetadataValue.md(_latency_md(latency)),
                "latency_by_name": dg.MetadataValue.json(
                    {f"{r.name}/{r.path}": {"events": r.events, "p50": round(r.p50, 1), "p95": round(r.p95, 1),
                                            "max": round(r.max, 1)} for r in latency}),
                "recovery_false_positive_risk": dg.MetadataValue.json(risk),
                "checkouts_paid_before_first_message_but_known_after": risk["paid_before_first_message_but_known_after"],
            },
            check_results=results,
        )

    return delivery_report


__all__ = ["customerio_people_sync", "build_events_sync_asset", "build_delivery_report", "EventsSyncConfig", "read_frame"]

"""Customer.io sync assets and the delivery report: thin wiring of pg2cio_assets.delivery."""

from datetime import datetime, timezone

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext
from psycopg import sql

from pg2cio_assets import delivery
from pg2cio_assets.customerio import MAX_REQUEST_BYTES
from pg2cio_assets.partitions import run_window, sql_bound
from pg2cio_assets.resources import CustomerIOResource, PostgresResource
from pg2cio_assets.state import read_frame, replace_table


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


def build_events_sync_asset(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name="customerio_events_sync",
        group_name="sync",
        kinds={"customerio", "postgres"},
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=["events", "customerio_people_sync"],
    )
    def customerio_events_sync(context: AssetExecutionContext, state: PostgresResource, customerio: CustomerIOResource) -> dg.MaterializeResult:
        """Sends the window's events that the ledger has not settled, in batches under 500 KB,
        and records each as accepted, rejected (with Customer.io's reason) or quarantined (over a
        limit). An accepted event is never sent again: not on a rerun, a retry or a backfill."""
        start, end = run_window(context, partitions)
        client = customerio.client(context.log.info)
        try:
            with state.connect() as conn:
                d = delivery.sync_events(conn, client, state.schema_name, start=sql_bound(start), end=end,
                                         run_id=context.run.run_id, log=context.log.info)
        finally:
            if client is not None:
                client.close()
        context.log.info(f"events sync: {d.outcomes}, {d.requests} request(s)")
        return dg.MaterializeResult(metadata=_result(d, client is None))

    return customerio_events_sync


@dg.asset(group_name="sync", kinds={"postgres"}, deps=["customerio_people_sync", "customerio_events_sync"])
def delivery_report(context: AssetExecutionContext, state: PostgresResource) -> dg.MaterializeResult:
    """What Customer.io holds from pg2cio, from the ledger: events per name and outcome
    (accepted, rejected with a reason, quarantined, would_send in a dry run), identifies,
    merges, erasures, held attribute values; requests, bytes and mean batch fill. Table
    delivery_report in the state schema."""
    schema = state.schema_name
    with state.connect() as conn:
        rows = delivery.report_rows(conn, schema)
        totals = conn.execute(sql.SQL(
            "SELECT count(*), coalesce(sum(bytes), 0), coalesce(avg(bytes), 0), coalesce(sum(ops), 0) FROM {}"
        ).format(delivery.tables(schema)["requests"])).fetchone()
        df = pd.DataFrame(rows, columns=["kind", "outcome", "count"])
        replace_table(conn, schema, "delivery_report", df, [("kind", "text"), ("outcome", "text"), ("count", "bigint")])
    requests, sent_bytes, mean_bytes, ops = totals
    md = "\n".join(["| kind | outcome | count |", "|---|---|---|"] + [f"| {k} | {o} | {n:,} |" for k, o, n in rows])
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(df),
        "report": dg.MetadataValue.md(md),
        "requests": int(requests),
        "bytes_sent": int(sent_bytes),
        "ops_sent": int(ops),
        "mean_batch_bytes": round(float(mean_bytes)),
        "mean_batch_fill": round(float(mean_bytes) / MAX_REQUEST_BYTES, 3),
    })


__all__ = ["customerio_people_sync", "build_events_sync_asset", "delivery_report", "read_frame"]

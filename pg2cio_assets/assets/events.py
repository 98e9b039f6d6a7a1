"""The events asset: behavioural events of a daily window, from the extracts and identity."""

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext
from psycopg import sql
from psycopg.types.json import Jsonb

from pg2cio_assets import events as ev
from pg2cio_assets.partitions import run_window, sql_bound
from pg2cio_assets.resources import PostgresResource
from pg2cio_assets.state import read_frame

EVENT_INPUTS = ["carts", "cart_items", "orders", "order_items", "products", "refunds", "subscriptions",
                "subscription_renewals"]
CHECKS = {
    "ids_unique_and_valid_ulids": "Every event id is a valid ULID and appears once.",
    "names_in_contract": "Every event name is one the contract declares, spelled exactly.",
    "timestamps_inside_partition_window": "Every event happened inside the run's window; timestamp is its unix second.",
    "properties_have_contract_types": "Every property has its contract type.",
}

EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS {events} (
    event_id text PRIMARY KEY, name text NOT NULL, person_key text NOT NULL,
    cio_identifier_type text NOT NULL, cio_identifier text NOT NULL,
    occurred_at timestamptz NOT NULL, timestamp bigint NOT NULL, properties jsonb NOT NULL,
    source_relation text NOT NULL, source_key text NOT NULL, data_bytes integer NOT NULL, use_case text NOT NULL,
    _run_id text
);
ALTER TABLE {events} ADD COLUMN IF NOT EXISTS source_changed_at timestamptz;
CREATE INDEX IF NOT EXISTS events_occurred_at ON {events} (occurred_at);
CREATE INDEX IF NOT EXISTS events_person ON {events} (person_key);
CREATE TABLE IF NOT EXISTS {quarantine} (
    name text NOT NULL, source_relation text NOT NULL, source_key text NOT NULL,
    occurred_at timestamptz NOT NULL, reason text NOT NULL, _run_id text
);
CREATE INDEX IF NOT EXISTS events_quarantine_occurred_at ON {quarantine} (occurred_at);
"""


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def build_events_asset(partitions: dg.PartitionsDefinition, enable: tuple[str, ...], disable: tuple[str, ...]) -> dg.AssetsDefinition:
    enabled = ev.enabled_events(enable, disable)  # unknown names fail when the code location loads

    @dg.asset(
        name="events",
        group_name="events",
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"postgres", "pandas"},
        deps=[dg.AssetKey(f"{r}_extract") for r in EVENT_INPUTS] + [dg.AssetKey("identity_map"), dg.AssetKey("people")],
        check_specs=[dg.AssetCheckSpec(name, asset="events", blocking=True, description=d) for name, d in CHECKS.items()],
        description=(
            "One row per behavioural event (" + ", ".join(e.name for e in enabled) + "), each explained by one "
            "source row: person and Customer.io identifier from identity resolution, deterministic ULID, unix "
            "timestamp of when it happened, typed properties. Daily partitions on when it happened (the first also "
            "holds everything older); rerunning a window replaces it. Facts that cannot become an event are in "
            "events_quarantine (state schema) with a reason."
        ),
    )
    def events(context: AssetExecutionContext, state: PostgresResource) -> dg.MaterializeResult:
        start, end = run_window(context, partitions)
        params = {"start": sql_bound(start), "end": end}
        schema = state.schema_name
        built, held = [], []
        with state.connect() as conn:
            people = read_frame(conn, sql.SQL("SELECT person_key, cio_identifier_type, cio_identifier FROM {}").format(
                sql.Identifier(schema, "people")))
            for spec in enabled:
                facts = read_frame(conn, ev.event_query(spec, schema), params)
                items = read_frame(conn, ev.items_query(spec, schema), params) if spec.items else None
                result = ev.build_events(spec.name, facts, people, items)
                built.append(result.events)
                held.append(result.quarantine)
                context.log.info(f"{spec.name}: {len(result.events):,} events, {len(result.quarantine):,} quarantined")
            all_events = _concat(built, ev.EVENT_COLUMNS)
            all_held = _concat(held, ev.QUARANTINE_COLUMNS)
            run_id = context.run.run_id
            names = {"events": sql.Identifier(schema, "events"), "quarantine": sql.Identifier(schema, "events_quarantine")}
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                cur.execute(sql.SQL(EVENTS_DDL).format(**names))
                for table in names.values():
                    cur.execute(sql.SQL("DELETE FROM {} WHERE occurred_at >= %(start)s AND occurred_at < %(end)s").format(table), params)
                with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(
                        names["events"], sql.SQL(", ").join(map(sql.Identifier, ev.EVENT_COLUMNS + ["_run_id"])))) as copy:
                    for row in all_events.itertuples(index=False, name=None):
                        row = list(row)
                        row[ev.EVENT_COLUMNS.index("properties")] = Jsonb(row[ev.EVENT_COLUMNS.index("properties")])
                        copy.write_row((*row, run_id))
                with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(
                        names["quarantine"], sql.SQL(", ").join(map(sql.Identifier, ev.QUARANTINE_COLUMNS + ["_run_id"])))) as copy:
                    for row in all_held.itertuples(index=False, name=None):
                        copy.write_row((*row, run_id))
        checks = ev.check_events(all_events, start, end)
        per_name = all_events["name"].value_counts().to_dict()
        reasons = all_held["reason"].value_counts().to_dict()
        if reasons:
            context.log.warning(f"{len(all_held):,} facts quarantined: {reasons}")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(all_events),
                "events_by_name": dg.MetadataValue.json({k: int(v) for k, v in sorted(per_name.items())}),
                "quarantined": len(all_held),
                "quarantined_by_reason": dg.MetadataValue.json({k: int(v) for k, v in reasons.items()}),
                "window_start": start.isoformat(),
                "window_end": end.isoformat(),
                "enabled_events": ", ".join(e.name for e in enabled),
            },
            check_results=[dg.AssetCheckResult(check_name=name, passed=bool(passed), metadata=meta)
                           for name, (passed, meta) in checks.items()],
        )

    return events

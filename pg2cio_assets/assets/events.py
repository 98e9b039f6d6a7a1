"""The events asset: behavioural events of a daily window, from the extracts and identity."""

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext
from psycopg import sql
from psycopg.types.json import Jsonb

from pg2cio_assets import events as ev
from pg2cio_assets.partitions import run_window, sql_bound
from pg2cio_assets.resources import PostgresResource
from pg2cio_assets.state import add_missing_columns, read_frame

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
    _run_id text, source_changed_at timestamptz
);
CREATE INDEX IF NOT EXISTS events_occurred_at ON {events} (occurred_at);
CREATE INDEX IF NOT EXISTS events_person ON {events} (person_key);
CREATE TABLE IF NOT EXISTS {quarantine} (
    name text NOT NULL, source_relation text NOT NULL, source_key text NOT NULL,
    occurred_at timestamptz NOT NULL, reason text NOT NULL, _run_id text
);
CREATE INDEX IF NOT EXISTS events_quarantine_occurred_at ON {quarantine} (occurred_at);
"""


CHUNK_ROWS = 50_000


def _chunks(conn, query, params: dict, name: str):
    """The query's rows as DataFrames of up to CHUNK_ROWS, through a server-side cursor (the
    caller's transaction keeps it open). Columns come from the cursor, so an empty result still
    has them."""
    with conn.cursor(name=f"facts_{name}") as cur:
        cur.itersize = CHUNK_ROWS
        cur.execute(query, params)
        columns = None
        while True:
            rows = cur.fetchmany(CHUNK_ROWS)
            columns = columns or [d.name for d in cur.description]
            if not rows:
                break
            yield pd.DataFrame.from_records(rows, columns=columns)


def _copy(cur, table, columns: list[str], frame: pd.DataFrame, run_id: str, jsonb: str | None = None) -> None:
    if frame.empty:
        return
    at = columns.index(jsonb) if jsonb else None
    with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(
            table, sql.SQL(", ").join(map(sql.Identifier, columns + ["_run_id"])))) as copy:
        for row in frame[columns].itertuples(index=False, name=None):
            if at is not None:
                row = (*row[:at], Jsonb(row[at]), *row[at + 1:])
            copy.write_row((*row, run_id))


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
        run_id = context.run.run_id
        per_name: dict[str, int] = {}
        reasons: dict[str, int] = {}
        checks = []
        total = held_total = 0
        names = {"events": sql.Identifier(schema, "events"), "quarantine": sql.Identifier(schema, "events_quarantine")}
        with state.connect() as conn:
            people = read_frame(conn, sql.SQL("SELECT person_key, cio_identifier_type, cio_identifier FROM {}").format(
                sql.Identifier(schema, "people")))
            with conn.transaction():
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                conn.execute(sql.SQL(EVENTS_DDL).format(**names))
            add_missing_columns(conn, schema, "events", {"source_changed_at": "timestamptz"})
            # One transaction: the window is replaced whole or not at all. Facts stream through a
            # server-side cursor in chunks, so memory is bounded by the chunk, not the window.
            with conn.transaction(), conn.cursor() as cur:
                # Two runs rebuilding overlapping days (the nightly refresh and the sensor's) take turns.
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"pg2cio events rebuild {schema}",))
                for table in names.values():
                    cur.execute(sql.SQL("DELETE FROM {} WHERE occurred_at >= %(start)s AND occurred_at < %(end)s").format(table), params)
                for spec in enabled:
                    built = quarantined = 0
                    for facts in _chunks(conn, ev.event_query(spec, schema), params, spec.name):
                        items = None
                        if spec.items:
                            items = read_frame(conn, ev.items_query(spec, schema, by_keys=True),
                                               {"keys": [str(k) for k in facts["source_key"]]})
                        result = ev.build_events(spec.name, facts, people, items)
                        _copy(cur, names["events"], ev.EVENT_COLUMNS, result.events, run_id, jsonb="properties")
                        _copy(cur, names["quarantine"], ev.QUARANTINE_COLUMNS, result.quarantine, run_id)
                        checks.append(ev.check_events(result.events, start, end))
                        for reason, n in result.quarantine["reason"].value_counts().items():
                            reasons[reason] = reasons.get(reason, 0) + int(n)
                        built += len(result.events)
                        quarantined += len(result.quarantine)
                        if len(facts) == CHUNK_ROWS:
                            context.log.info(f"{spec.name}: {built:,} events so far")
                    per_name[spec.name] = built
                    total += built
                    held_total += quarantined
                    context.log.info(f"{spec.name}: {built:,} events, {quarantined:,} quarantined")
        combined = ev.combine_checks(checks) if checks else ev.check_events(pd.DataFrame(columns=ev.EVENT_COLUMNS), start, end)
        if reasons:
            context.log.warning(f"{held_total:,} facts quarantined: {reasons}")
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": total,
                "events_by_name": dg.MetadataValue.json({k: int(v) for k, v in sorted(per_name.items()) if v}),
                "quarantined": held_total,
                "quarantined_by_reason": dg.MetadataValue.json(reasons),
                "window_start": start.isoformat(),
                "window_end": end.isoformat(),
                "enabled_events": ", ".join(e.name for e in enabled),
            },
            check_results=[dg.AssetCheckResult(check_name=name, passed=bool(passed), metadata=meta)
                           for name, (passed, meta) in combined.items()],
        )

    return events

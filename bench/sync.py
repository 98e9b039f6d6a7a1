"""Benchmark: deliver a whole store to the Customer.io emulator, then rerun, then change 1%.

    .venv/bin/python bench/sync.py [--customers 20000] [--write]

The emulator runs in its own process (as Customer.io would be elsewhere), on loopback.
Reports requests, bytes, mean batch fill and events per second through the sync, the
requests of an immediate rerun (target zero) and of a run after 1% of customers changed.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from seed_store import machine, write_section  # noqa: E402
from stack import emulator_process  # noqa: E402

import dagster as dg  # noqa: E402

from pg2cio_assets import contract, delivery  # noqa: E402
from pg2cio_assets.assets.events import build_events_asset  # noqa: E402
from pg2cio_assets.assets.identity import identity_assets, person_attributes  # noqa: E402
from pg2cio_assets.customerio import TrackClient  # noqa: E402
from pg2cio_assets.extract import extract_window  # noqa: E402
from pg2cio_assets.partitions import daily_partitions  # noqa: E402
from pg2cio_assets.pg import connect  # noqa: E402
from pg2cio_assets.pgembed import EmbeddedPostgres  # noqa: E402
from pg2cio_assets.resources import PostgresResource  # noqa: E402
from pg2cio_assets.seed import generate_store, load_store  # noqa: E402

AS_OF = datetime(2026, 12, 1, tzinfo=timezone.utc)
EARLY, LATE = datetime(1, 1, 1, tzinfo=timezone.utc), AS_OF + timedelta(days=1)


def prepare(url: str, src: str, state: str, rows_changed_at: datetime | None = None) -> float:
    t = time.perf_counter()
    with connect(url, "source") as s, connect(url, "state") as d:
        for rel in contract.SOURCE_RELATIONS:
            extract_window(s, d, rel, source_schema=src, state_schema=state, start=EARLY, end=LATE)
    res = {"state": PostgresResource(role="state", url=url, schema_name=state)}
    inst = dg.DagsterInstance.ephemeral()
    dg.materialize([identity_assets], resources=res, instance=inst)
    dg.materialize([person_attributes], resources=res, instance=inst,
                   run_config={"ops": {"person_attributes": {"config": {"as_of": AS_OF.isoformat()}}}})
    dg.materialize([build_events_asset(daily_partitions("2026-12-01"), (), ())], resources=res, instance=inst,
                   partition_key="2026-12-01")
    return time.perf_counter() - t


def sync_all(url: str, state: str, emu_url: str) -> tuple[delivery.Delivery, delivery.Delivery, float]:
    t = time.perf_counter()
    with connect(url, "state") as conn, TrackClient(emu_url, "bench", "bench", rate_per_second=1000) as client:
        people = delivery.sync_people(conn, client, state, as_of=AS_OF, erase_action="delete", run_id="bench")
        events = delivery.sync_events(conn, client, state, start="-infinity", end=LATE, run_id="bench")
    return people, events, time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--no-change", dest="change", action="store_false",
                        help="skip the 1%% change phase (it repeats the whole preparation)")
    args = parser.parse_args()
    with emulator_process("bench", "bench") as emu_url:
        with EmbeddedPostgres() as pg:
            url = pg.url()
            src, state = f"b_src_{uuid.uuid4().hex[:6]}", f"b_state_{uuid.uuid4().hex[:6]}"
            store = generate_store(args.customers, seed=7, as_of=AS_OF)
            with psycopg.connect(url) as conn:
                load_store(conn, store, src)
            prep = prepare(url, src, state)
            people, events, first_s = sync_all(url, state, emu_url)
            people2, events2, rerun_s = sync_all(url, state, emu_url)
            people3 = events3 = None
            change_s, changed = 0.0, 0
            if args.change:
                people3, events3, change_s, changed = change_one_percent(url, src, state, emu_url, args.customers)
            stats = httpx.get(f"{emu_url}/_emulator/stats").json()
    return report(args, prep, people, events, first_s, people2, events2, rerun_s, people3, events3, change_s, changed, stats)


def change_one_percent(url, src, state, emu_url, customers):
    """1% of customers change their email (and so their updated_at); prepare and sync again."""
    with psycopg.connect(url, autocommit=True) as conn:
        changed = conn.execute(sql.SQL(
            "UPDATE {} SET email = 'changed.' || email, updated_at = %s WHERE customer_id IN "
            "(SELECT customer_id FROM {} WHERE deleted_at IS NULL AND email IS NOT NULL ORDER BY customer_id "
            "LIMIT %s)").format(sql.Identifier(src, "customers"), sql.Identifier(src, "customers")),
            (AS_OF - timedelta(hours=1), customers // 100)).rowcount
    prepare(url, src, state)
    people3, events3, change_s = sync_all(url, state, emu_url)
    return people3, events3, change_s, changed


def report(args, prep, people, events, first_s, people2, events2, rerun_s, people3, events3, change_s, changed, stats):
    n_events = events.outcomes.get("accepted", 0)
    req1 = people.requests + events.requests
    bytes1 = people.bytes + events.bytes
    fill = delivery.Delivery(batch_bytes=people.batch_bytes + events.batch_bytes).mean_batch_fill
    text = (
        f"Machine: {machine()}.\n\n"
        f"### Sync to the emulator: {args.customers:,} customers\n\n"
        f"Preparing extracts, identity, attributes and events: {prep:.0f} s.\n\n"
        "| run | requests | bytes | seconds | notes |\n| --- | ---: | ---: | ---: | --- |\n"
        f"| full sync from empty ledger | {req1:,} | {bytes1:,} | {first_s:.1f} | {n_events:,} events accepted "
        f"({n_events / events.seconds:,.0f} events/s through the events sync), {people.outcomes.get('accepted', 0):,} "
        f"identifies/merges/deletes; mean batch fill {fill:.0%} of 500 KB |\n"
        f"| immediate rerun, no source change | {people2.requests + events2.requests:,} | "
        f"{people2.bytes + events2.bytes:,} | {rerun_s:.1f} | target zero |\n"
        + (f"| after {changed:,} customers (1%) changed their email | {people3.requests + events3.requests:,} | "
           f"{people3.bytes + events3.bytes:,} | {change_s:.1f} | {people3.outcomes} |\n" if people3 else "")
        + "\n"
        f"Emulator totals: {stats['requests']:,} requests, {stats['ops']:,} ops, {stats['duplicate_events']:,} duplicate events.\n"
    )
    print(text)
    if args.write:
        write_section(text, f"sync_{args.customers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

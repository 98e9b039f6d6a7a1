"""Benchmark: commit-to-accepted latency with the sensor running against the emulator.

    .venv/bin/python bench/latency.py [--customers 2000] [--minutes 5] [--every 6] [--write]

Starts an embedded PostgreSQL (demo-like: a seeded store and a Postgres-backed Dagster
instance), the Customer.io emulator, loads the history as a backfill, then runs the real
Dagster daemon with `source_changes_sensor` switched on (default interval, 30 s). For
`--minutes`, it commits a new checkout (a cart reaching checkout) every `--every` seconds and
pays every third one a minute later, the way a store's app would. It then waits for every one
of those events to be accepted and reports, per event name, the time from the source row's
commit (its updated_at, set by the database at commit) to Customer.io's acceptance (the
ledger) and to the emulator's receipt: p50 / p95 / max.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from seed_store import machine, write_section  # noqa: E402

from pg2cio_assets.cio_emulator import CustomerIOEmulator  # noqa: E402
from stack import CLI, dagster_stack  # noqa: E402

SECTION = "latency"
SITE, KEY = "bench-site", "bench-key"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def commit_checkout(conn: psycopg.Connection, n: int, email: str) -> str:
    cart = f"live_cart_{n:05d}"
    with conn.transaction():
        conn.execute("INSERT INTO commerce.carts (cart_id, customer_id, email, currency, created_at, updated_at, checkout_started_at) "
                     "VALUES (%s, NULL, %s, 'USD', clock_timestamp(), clock_timestamp(), clock_timestamp())", (cart, email))
        conn.execute("INSERT INTO commerce.cart_items (cart_id, sku, quantity, unit_price) "
                     "SELECT %s, sku, 1, 25 FROM commerce.products ORDER BY sku LIMIT 1", (cart,))
    return cart


def commit_payment(conn: psycopg.Connection, cart: str, email: str) -> str:
    order = cart.replace("cart", "order")
    with conn.transaction():
        conn.execute("INSERT INTO commerce.orders (order_id, cart_id, customer_id, email, currency, subtotal, order_total, "
                     "created_at, updated_at, paid_at) VALUES (%s, %s, NULL, %s, 'USD', 25, 25, clock_timestamp(), "
                     "clock_timestamp(), clock_timestamp())", (order, cart, email))
        conn.execute("INSERT INTO commerce.order_items (order_id, line_no, sku, title, category, quantity, unit_price) "
                     "SELECT %s, 1, sku, title, category, 1, 25 FROM commerce.products ORDER BY sku LIMIT 1", (order,))
        conn.execute("UPDATE commerce.carts SET updated_at = clock_timestamp() WHERE cart_id = %s", (cart,))
    return order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--every", type=float, default=6, help="seconds between two checkouts")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    daemon = None
    emu = CustomerIOEmulator(site_id=SITE, api_key=KEY).start()
    first_day = (datetime.now(timezone.utc) - timedelta(days=29)).date().isoformat()
    try:
        with dagster_stack("pg2cio-latency-", PG2CIO_PARTITION_START=first_day, CUSTOMERIO_TRACK_URL=emu.url,
                           CUSTOMERIO_SITE_ID=SITE, CUSTOMERIO_API_KEY=KEY) as (pg, env, work):
            cli = CLI
            subprocess.run(cli + ["seed", "--customers", str(args.customers)], env=env, check=True, capture_output=True)
            t = time.perf_counter()
            subprocess.run(cli + ["materialize", "--days", "30", "--backfill"], env=env, check=True, capture_output=True)
            print(f"history loaded as a backfill in {time.perf_counter() - t:.0f} s", flush=True)

            log = open(work / "daemon.log", "w")
            daemon = subprocess.Popen([str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(ROOT / "workspace.yaml")],
                                      env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            subprocess.run([sys.executable, "-m", "dagster", "sensor", "start", "source_changes_sensor", "-w",
                            str(ROOT / "workspace.yaml")], env=env, cwd=ROOT, check=True, capture_output=True)
            print("daemon running, sensor on; committing checkouts", flush=True)

            carts, orders = [], []
            pending: list[tuple[float, str, str]] = []
            end = time.monotonic() + args.minutes * 60
            n = 0
            with psycopg.connect(pg.url("store"), autocommit=True) as conn:
                while time.monotonic() < end:
                    n += 1
                    email = f"live.shopper.{n}@example.org"
                    carts.append(commit_checkout(conn, n, email))
                    if n % 3 == 0:
                        pending.append((time.monotonic() + 60, carts[-1], email))
                    while pending and pending[0][0] <= time.monotonic():
                        _, cart, mail = pending.pop(0)
                        orders.append(commit_payment(conn, cart, mail))
                    time.sleep(args.every)
                for _, cart, mail in pending:
                    orders.append(commit_payment(conn, cart, mail))
            expected = {("checkout_started", c) for c in carts} | {("order_paid", o) for o in orders}
            print(f"committed {len(carts)} checkouts and {len(orders)} payments; waiting for delivery", flush=True)

            query = sql.SQL(
                "SELECT l.name, e.source_key, extract(epoch FROM l.updated_at - l.source_changed_at)::float8, l.path, "
                "e.event_id, l.source_changed_at FROM pg2cio.cio_event_ledger l JOIN pg2cio.events e USING (event_id) "
                "WHERE l.status = 'accepted' AND e.source_key LIKE 'live\\_%%'")
            deadline = time.monotonic() + 600
            rows = []
            while time.monotonic() < deadline:
                with psycopg.connect(pg.url("store")) as conn:
                    try:
                        rows = conn.execute(query).fetchall()
                    except psycopg.errors.UndefinedTable:
                        rows = []
                got = {(r[0], r[1]) for r in rows}
                if expected <= got:
                    break
                time.sleep(2)
            received = {e["id"]: e["received_at"] for e in emu.events()}
            with psycopg.connect(pg.url("dagster")) as conn:
                runs = conn.execute(
                    "SELECT count(*), avg(end_time - start_time), max(end_time - start_time) FROM runs r "
                    "WHERE EXISTS (SELECT 1 FROM run_tags t WHERE t.run_id = r.run_id AND t.key = 'dagster/sensor_name') "
                    "AND status = 'SUCCESS'").fetchone()
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
        emu.stop()

    wanted = [r for r in rows if (r[0], r[1]) in expected]
    missing = len(expected) - len({(r[0], r[1]) for r in wanted})
    lines = [f"Machine: {machine()}.", "",
             f"### Commit to accepted, sensor on (default {30} s interval), {args.customers:,}-customer store", "",
             f"{len(carts)} checkouts committed every {args.every:g} s for {args.minutes:g} min, a third of them paid a "
             f"minute later; {missing} event(s) not delivered within 10 minutes of the last commit. "
             f"{runs[0]} sensor runs, mean {runs[1] or 0:.1f} s, max {runs[2] or 0:.1f} s each.", "",
             "| event | events | p50 s | p95 s | max s | to the emulator's receipt p95 s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("checkout_started", "order_paid"):
        lat = [r[2] for r in wanted if r[0] == name]
        recv = [received[r[4]] - r[5].timestamp() for r in wanted if r[0] == name and r[4] in received]
        if lat:
            lines.append(f"| {name} | {len(lat)} | {statistics.median(lat):.1f} | {pct(lat, 0.95):.1f} | {max(lat):.1f} | "
                         f"{pct(recv, 0.95) if recv else float('nan'):.1f} |")
    all_lat = [r[2] for r in wanted]
    if all_lat:
        lines += ["", f"All: p50 **{statistics.median(all_lat):.1f} s**, p95 **{pct(all_lat, 0.95):.1f} s**, "
                      f"max {max(all_lat):.1f} s (target: p95 under 60 s; recovery's contract target is 15 min)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:
        write_section(report, SECTION)
    return 0 if missing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

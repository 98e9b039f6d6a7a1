"""Benchmark: generate and load the 100,000-customer demo store, then extract its whole history.

    .venv/bin/python bench/seed_store.py                   # 100,000 customers, embedded Postgres
    .venv/bin/python bench/seed_store.py --customers 20000 --no-extract
    PG2CIO_BENCH_URL=postgresql://... .venv/bin/python bench/seed_store.py

Prints a markdown report and, with --write, replaces its section in bench/RESULTS.md.
Figures, not pass/fail: targets are stated beside them.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psycopg

from pg2cio_assets import contract
from pg2cio_assets.extract import extract_window
from pg2cio_assets.pg import connect
from pg2cio_assets.pgembed import EmbeddedPostgres
from pg2cio_assets.seed import generate_store, load_store

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "seed_and_extract"


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def run(url: str, customers: int, seed: int, do_extract: bool) -> str:
    as_of = datetime(2026, 12, 1, tzinfo=timezone.utc)
    schema = f"bench_src_{uuid.uuid4().hex[:8]}"
    state_schema = f"bench_state_{uuid.uuid4().hex[:8]}"
    lines = []
    t = time.perf_counter()
    store = generate_store(customers, seed=seed, as_of=as_of)
    gen_s = time.perf_counter() - t
    with psycopg.connect(url) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
        t = time.perf_counter()
        timings = load_store(conn, store, schema)
        load_s = time.perf_counter() - t
    total_rows = sum(store.manifest.rows.values())
    lines += [
        f"Machine: {machine()}; PostgreSQL {pg_version}.",
        "",
        f"### Demo store: {customers:,} customers, seed {seed}",
        "",
        f"- generate (numpy/pandas, in memory): **{gen_s:.1f} s**",
        f"- load with COPY, then keys and indexes: **{load_s:.1f} s** ({total_rows / load_s:,.0f} rows/s)",
        f"- generate + load: **{gen_s + load_s:.1f} s** (target: about a minute)",
        "",
        "| relation | rows | COPY seconds |",
        "| --- | ---: | ---: |",
    ]
    for rel in contract.SOURCE_RELATIONS:
        lines.append(f"| {rel.name} | {store.manifest.rows[rel.name]:,} | {timings[rel.name]:.1f} |")
    lines.append(f"| keys and indexes | | {timings['keys_and_indexes']:.1f} |")
    lines.append(f"| **total** | **{total_rows:,}** | |")

    if do_extract:
        lines += [
            "",
            "### Extract of the whole history in one window (what a single-run backfill does)",
            "",
            "| relation | rows | seconds | rows/s |",
            "| --- | ---: | ---: | ---: |",
        ]
        start = datetime(2023, 1, 1, tzinfo=timezone.utc)
        end = datetime(2026, 12, 2, tzinfo=timezone.utc)
        t_all = time.perf_counter()
        with connect(url, "source") as src, connect(url, "state") as dst:
            for rel in contract.SOURCE_RELATIONS:
                res = extract_window(src, dst, rel, source_schema=schema, state_schema=state_schema, start=start, end=end)
                assert res.rows_read == res.source_count == store.manifest.rows[rel.name], rel.name
                lines.append(f"| {rel.name} | {res.rows_read:,} | {res.seconds:.1f} | {res.rows_read / max(res.seconds, 1e-9):,.0f} |")
        all_s = time.perf_counter() - t_all
        lines.append(f"| **total** | **{total_rows:,}** | **{all_s:.1f}** | **{total_rows / all_s:,.0f}** |")
        lines += ["", "### Identity, attributes and events over the whole history", "", "| stage | rows | seconds |",
                  "| --- | ---: | ---: |"]
        lines += downstream(url, state_schema, as_of)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        lines += ["", f"Peak memory of the benchmark process (generation included): {peak:,.0f} MiB."]
    with psycopg.connect(url, autocommit=True) as conn:
        for s in (schema, state_schema):
            conn.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')
    return "\n".join(lines) + "\n"


def downstream(url: str, state_schema: str, as_of: datetime) -> list[str]:
    """Time identity, person attributes and the events of the whole history, as the assets run them."""
    import dagster as dg

    from pg2cio_assets.assets.events import build_events_asset
    from pg2cio_assets.assets.identity import identity_assets, person_attributes
    from pg2cio_assets.partitions import daily_partitions
    from pg2cio_assets.resources import PostgresResource

    # The first partition holds everything older: one partition is the whole history.
    daily = daily_partitions("2026-12-01")
    resources = {"state": PostgresResource(role="state", url=url, schema_name=state_schema)}
    out = []
    for name, assets, kw in (
        ("identity_map, people, identity_merges", [identity_assets], {}),
        ("person_attributes", [person_attributes],
         {"run_config": {"ops": {"person_attributes": {"config": {"as_of": as_of.isoformat()}}}}}),
        ("events", [build_events_asset(daily, (), ())], {"partition_key": "2026-12-01"}),
    ):
        t = time.perf_counter()
        result = dg.materialize(assets, resources=resources, instance=dg.DagsterInstance.ephemeral(), **kw)
        seconds = time.perf_counter() - t
        rows = sum(e.materialization.metadata["dagster/row_count"].value for e in result.get_asset_materialization_events())
        out.append(f"| {name} | {rows:,} | {seconds:.1f} |")
    return out


def write_section(report: str, section: str = SECTION) -> None:
    """Replace (or append) one benchmark's section of RESULTS.md, leaving the others."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"<!-- bench:{section} -->\n{report}<!-- /bench:{section} -->\n"
    pattern = re.compile(rf"<!-- bench:{section} -->.*?<!-- /bench:{section} -->\n", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-extract", dest="extract", action="store_false")
    parser.add_argument("--write", action="store_true", help=f"replace this benchmark's section in {RESULTS.name}")
    args = parser.parse_args()
    url = os.environ.get("PG2CIO_BENCH_URL")
    if url:
        report = run(url, args.customers, args.seed, args.extract)
    else:
        with EmbeddedPostgres() as pg:
            report = run(pg.url(), args.customers, args.seed, args.extract)
    print(report)
    if args.write:
        write_section(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

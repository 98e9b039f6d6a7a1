"""The `pg2cio` command: seed a demo store, check a store against the contract, run the demo.

    pg2cio seed --customers 2000 --seed 7      # into $PG2CIO_SOURCE_URL
    pg2cio check-source                        # does $PG2CIO_SOURCE_URL provide the contract?
    pg2cio demo                                # embedded Postgres + seeded store + Dagster UI
    pg2cio run --start 2026-11-01 --end 2026-11-30 [--backfill]   # the whole graph over a range
    pg2cio materialize --days 3                # the same over the last 3 days
    pg2cio verify --person cus_0000001         # one test identify + event, read back
    pg2cio emulator --port 8765                # the Customer.io Track API emulator
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from psycopg import sql

from pg2cio_assets import contract, settings
from pg2cio_assets.pg import ContractError, DatabaseUnavailable, check_source, connect
from pg2cio_assets.seed import default_as_of, generate_store, load_store, parse_as_of

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DATABASE = "pg2cio_demo"
DAGSTER_DATABASE = "dagster"
DEMO_CUSTOMERS = 2000
DEMO_SEED = 7


def _say(msg: str) -> None:
    print(f"[pg2cio] {msg}", flush=True)


def seed_store(url: str, schema: str, customers: int, seed: int, as_of, replace: bool, manifest: Path | None) -> None:
    started = time.perf_counter()
    store = generate_store(customers, seed=seed, as_of=as_of)
    _say(f"generated {sum(store.manifest.rows.values()):,} rows for {customers:,} customers "
         f"(seed {seed}, as of {as_of.isoformat()}) in {time.perf_counter() - started:.1f}s")
    with connect(url, "source") as conn:
        load_store(conn, store, schema, replace=replace, progress=_say)
    if manifest:
        manifest.write_text(json.dumps(store.manifest.to_dict(), indent=2, default=str))
        _say(f"manifest (edge cases and their ids) written to {manifest}")


def _cmd_seed(args: argparse.Namespace) -> int:
    url = settings.resolve_url(settings.SOURCE_URL)
    schema = settings.check_identifier(args.schema, "--schema")
    try:
        as_of = parse_as_of(args.as_of) if args.as_of else default_as_of()
    except ValueError:
        raise settings.ConfigError(f"--as-of {args.as_of!r} is not an ISO-8601 instant (e.g. 2026-11-30T00:00:00+00:00)") from None
    seed_store(url, schema, args.customers, args.seed, as_of, args.replace, args.manifest)
    return 0


def _cmd_check_source(args: argparse.Namespace) -> int:
    cfg = settings.Settings.from_env()
    url = settings.resolve_url(settings.SOURCE_URL)
    with connect(url, "source") as conn:
        check_source(conn, cfg.source_schema, list(contract.SOURCE_RELATIONS))
    _say(f"{settings.redact_url(url)} schema {cfg.source_schema}: every contract relation and column is present "
         "with a compatible type")
    return 0


def demo_home() -> Path:
    """Where the demo keeps its Postgres cluster and Dagster home between runs.

    As root the server runs as an unprivileged account, which must be able to reach the data,
    so the cluster lives under /var/tmp rather than in root's home."""
    if os.environ.get("PG2CIO_DEMO_HOME"):
        return Path(os.environ["PG2CIO_DEMO_HOME"]).expanduser()
    if os.geteuid() == 0:
        return Path("/var/tmp/pg2cio-demo")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "pg2cio" / "demo"


def _ensure_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _schema_exists(url: str, schema: str) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def _cmd_demo(args: argparse.Namespace) -> int:
    from pg2cio_assets.pgembed import EmbeddedPostgres

    # `kill` (SIGTERM) unwinds like Ctrl-C, so the embedded server is stopped, not orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    home = demo_home()
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o755)  # the server account must be able to reach its data dir below
    server = EmbeddedPostgres(home / "pgdata", durable=True).start()
    emulator = None
    _say(f"embedded PostgreSQL running on 127.0.0.1:{server.port} (data in {home / 'pgdata'})")
    try:
        _ensure_database(server.url(), DEMO_DATABASE)
        _ensure_database(server.url(), DAGSTER_DATABASE)
        source_url = server.url(DEMO_DATABASE)
        if args.reseed or not _schema_exists(source_url, settings.DEFAULT_SOURCE_SCHEMA):
            # pg2cio's tables describe the old store; a new store starts from empty state.
            with psycopg.connect(source_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(settings.DEFAULT_STATE_SCHEMA)))
            seed_store(source_url, settings.DEFAULT_SOURCE_SCHEMA, args.customers, args.seed, default_as_of(),
                       replace=True, manifest=home / "manifest.json")
        else:
            _say("reusing the seeded store from the last demo (pass --reseed to regenerate it)")

        dagster_home = home / "dagster_home"
        dagster_home.mkdir(exist_ok=True)
        shutil.copyfile(REPO_ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
        env = dict(
            os.environ,
            PG2CIO_SOURCE_URL=source_url,
            PG2CIO_DAGSTER_URL=server.url(DAGSTER_DATABASE),
            DAGSTER_HOME=str(dagster_home),
        )
        env.pop("PG2CIO_STATE_URL", None)  # state lives beside the demo store
        if args.days > 0 and not os.environ.get(settings.PARTITION_START):
            # The first partition holds everything older, so the demo's daily partitions can start
            # where its first run does and that run still covers the whole store.
            first_day = (datetime.now(timezone.utc) - timedelta(days=args.days - 1)).date().isoformat()
            env[settings.PARTITION_START] = first_day
        from pg2cio_assets.cio_emulator import CustomerIOEmulator

        emulator = CustomerIOEmulator(site_id="demo-site", api_key="demo-key", port=args.emulator_port).start()
        _say(f"Customer.io emulator on {emulator.url} (people: {emulator.url}/_emulator/people)")
        env.update(CUSTOMERIO_TRACK_URL=emulator.url, CUSTOMERIO_SITE_ID="demo-site", CUSTOMERIO_API_KEY="demo-key")
        env.pop("PG2CIO_DRY_RUN", None)
        if args.days > 0:
            _say(f"loading the store's history: every asset over the last {args.days} day(s) as one backfill run "
                 "recorded in the instance (events stamped within 72 h are held, as for any backfill)")
            subprocess.run([sys.executable, "-m", "pg2cio_assets.cli", "materialize", "--days", str(args.days), "--backfill"],
                           env=env, check=True)
        if args.no_ui:
            stats = emulator.stats()
            _say(f"Customer.io emulator holds {len(emulator.people()):,} people and {len(emulator.events()):,} events "
                 f"({stats['requests']:,} requests)")
            _say("environment ready; --no-ui given, stopping here")
            return 0
        _say(f"starting the Dagster webserver and daemon: open http://{args.host}:{args.port}")
        _say("in the UI: Assets -> select all -> Materialize -> pick the partition range (one run for the whole range)")
        cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
               "-h", args.host, "-p", str(args.port)]
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # Dagster (webserver, daemon, code server) goes first: it still needs the database.
            proc.send_signal(signal.SIGINT)
            try:
                return proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
    finally:
        if emulator is not None:
            emulator.stop()
        server.stop()
        _say("embedded PostgreSQL stopped")


def _partition_keys(start: str | None, end: str | None, days: int | None, all_: bool) -> list[str]:
    from pg2cio_assets.definitions import DAILY

    keys = DAILY.get_partition_keys()
    if all_:
        return keys
    if days is not None:
        if days < 1:
            raise settings.ConfigError("--days must be at least 1 (or pass --all)")
        return keys[-days:]
    for flag, value in (("--start", start), ("--end", end)):
        try:
            datetime.strptime(value or "", "%Y-%m-%d")
        except ValueError:
            raise settings.ConfigError(f"{flag} {value!r} is not a date: use YYYY-MM-DD") from None
    if end < start:
        raise settings.ConfigError(f"--end {end} is before --start {start}")
    chosen = [k for k in keys if start <= k <= end]
    if not chosen:
        raise settings.ConfigError(
            f"no daily partition between {start} and {end}: partitions run from {keys[0]} to {keys[-1]} "
            f"(PG2CIO_PARTITION_START moves the first; it also holds everything older)")
    return chosen


def run_summary(result) -> dict:
    """People, events per name and outcome, requests: what a run did, from its materializations."""
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    value = lambda asset, key, default=None: meta.get(asset, {}).get(key).value if key in meta.get(asset, {}) else default  # noqa: E731
    people_outcomes = value("customerio_people_sync", "outcomes", {}) or {}
    event_outcomes = value("customerio_events_sync", "outcomes", {}) or {}
    return {
        "people": value("person_attributes", "dagster/row_count"),
        "identifies": (value("customerio_people_sync", "by_name", {}) or {}).get("identify", {}),
        "events_built": value("events", "events_by_name", {}),
        "events_quarantined": value("events", "quarantined", 0),
        "events_sent": value("customerio_events_sync", "by_name", {}),
        "requests": (value("customerio_people_sync", "requests", 0) or 0) + (value("customerio_events_sync", "requests", 0) or 0),
        "accepted": people_outcomes.get("accepted", 0) + event_outcomes.get("accepted", 0),
        "rejected": people_outcomes.get("rejected", 0) + event_outcomes.get("rejected", 0),
        "quarantined": event_outcomes.get("quarantined", 0),
        "suppressed": event_outcomes.get("suppressed", 0),
        "skipped": event_outcomes.get("skipped", 0),
        "suppression": value("customerio_events_sync", "suppression_policy"),
    }


def print_summary(summary: dict) -> None:
    _say(f"people: {summary['people'] if summary['people'] is not None else '(not materialized)'}")
    built = summary["events_built"] or {}
    sent = summary["events_sent"] or {}
    names = sorted(set(built) | set(sent))
    if names:
        _say(f"  {'event':<24}{'built':>10}{'accepted':>10}{'rejected':>10}{'suppressed':>12}{'skipped':>9}{'quarant.':>10}")
        for n in names:
            s = sent.get(n, {})
            _say(f"  {n:<24}{built.get(n, 0):>10,}{s.get('accepted', 0):>10,}{s.get('rejected', 0):>10,}"
                 f"{s.get('suppressed', 0):>12,}{s.get('skipped', 0):>9,}{s.get('quarantined', 0):>10,}")
    _say(f"requests: {summary['requests']:,}; accepted {summary['accepted']:,}, rejected {summary['rejected']:,}, "
         f"quarantined {summary['quarantined']:,} (+{summary['events_quarantined']:,} facts that could not become events), "
         f"suppressed {summary['suppressed']:,}, skipped {summary['skipped']:,}; "
         f"suppression: {summary['suppression']}")


def _cmd_run(args: argparse.Namespace) -> int:
    """Materialize the whole graph over a date range, as one run recorded in $DAGSTER_HOME's instance."""
    import dagster as dg

    if not os.environ.get("DAGSTER_HOME"):
        raise settings.ConfigError(
            "DAGSTER_HOME is not set: point it at a directory holding a copy of the project's dagster.yaml, so the run is "
            "recorded in your Dagster instance and shows in the UI (pg2cio demo sets it for you)"
        )
    if args.policy and not args.backfill:
        raise settings.ConfigError("--policy applies to backfills: add --backfill")
    if args.policy:
        settings.check_policy(args.policy, "--policy")
    from pg2cio_assets.definitions import ASSETS, RESOURCES

    keys = _partition_keys(args.start, args.end, getattr(args, "days", None), getattr(args, "all", False))
    # Progress (rows extracted, batches sent) at INFO; Dagster's per-step DEBUG events stay in the instance.
    run_config: dict = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    if args.backfill:
        run_config["ops"] = {"customerio_events_sync": {"config": {"suppress_triggers": True, "policy": args.policy}}}
    _say(f"running every asset over {keys[0]}..{keys[-1]} ({len(keys)} daily partition(s)) as one run"
         + (f"; backfill: events that could trigger campaigns are handled by policy {args.policy or 'PG2CIO_BACKFILL_POLICY (default hold)'}"
            if args.backfill else "; live: every unsettled event is sent"))
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            ASSETS,
            instance=instance,
            resources=RESOURCES,
            run_config=run_config,
            raise_on_error=False,
            tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1],
                  "pg2cio/cli": "run"},
        )
    print_summary(run_summary(result))
    if not result.success:
        failed = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        for event in result.all_events:
            if event.event_type_value == "STEP_FAILURE":
                err = event.event_specific_data.error
                _say(f"step {event.step_key} failed: {err.message.strip() if err else ''}")
        _say(f"run {result.run_id} FAILED ({', '.join(failed)}); open it in the UI (Runs) for the logs")
        return 1
    _say(f"run {result.run_id} succeeded over {keys[0]}..{keys[-1]}")
    return 0


def _cmd_materialize(args: argparse.Namespace) -> int:
    """The last N days (or all): `pg2cio run` over a range ending today."""
    args.start = args.end = None
    return _cmd_run(args)


def verify_ops(identifiers: dict, now: datetime, check_id: str) -> list[dict]:
    """The test identify and the test event `pg2cio verify` sends (the event is the contract's)."""
    from pg2cio_assets import ulid

    spec = contract.event("pg2cio_verified")
    stamp = int(now.timestamp())
    return [
        {"type": "person", "identifiers": identifiers, "action": "identify",
         "attributes": {contract.VERIFY_ATTRIBUTE: stamp, "_timestamp": stamp}},
        {"type": "person", "identifiers": identifiers, "action": "event", "name": spec.name,
         "id": ulid.event_ulid(now, spec.name, check_id), "timestamp": stamp,
         "attributes": {"check_id": check_id, "sent_by": "pg2cio verify"}},
    ]


def _identifiers_for(args: argparse.Namespace) -> tuple[dict, str]:
    chosen = [(k, v) for k, v in (("person", args.person), ("id", args.id), ("email", args.email)) if v]
    if len(chosen) != 1:
        raise settings.ConfigError("choose the profile with exactly one of --person KEY, --id ID or --email EMAIL")
    kind, value = chosen[0]
    if kind != "person":
        return {kind: value}, f"{kind} {value}"
    cfg = settings.Settings.from_env()
    url = settings.resolve_url(settings.STATE_URL, settings.SOURCE_URL)
    with connect(url, "state") as conn:
        try:
            row = conn.execute(sql.SQL("SELECT cio_identifier_type, cio_identifier FROM {} WHERE person_key = %s").format(
                sql.Identifier(cfg.state_schema, "people")), (value,)).fetchone()
        except psycopg.errors.UndefinedTable:
            raise settings.ConfigError(f"{cfg.state_schema}.people does not exist yet: materialize identity first") from None
    if row is None:
        raise settings.ConfigError(f"no person {value!r} in {cfg.state_schema}.people")
    return {row[0]: row[1]}, f"person {value} ({row[0]} {row[1]})"


def _cmd_verify(args: argparse.Namespace) -> int:
    """Send one identify and one event to a chosen profile, then read them back where the API allows."""
    import uuid

    import httpx

    from pg2cio_assets.customerio import encode
    from pg2cio_assets.resources import CustomerIOResource

    identifiers, who = _identifiers_for(args)
    client = CustomerIOResource(dry_run=False).client(_say)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    check_id = uuid.uuid4().hex[:12]
    ops = verify_ops(identifiers, now, check_id)
    with client:
        result = client.send_batch([encode(op) for op in ops])
        if result.errors:
            for i, reason in sorted(result.errors.items()):
                _say(f"Customer.io rejected the test {ops[i]['action']}: {reason}")
            return 1
        _say(f"sent to {who}: identify ({contract.VERIFY_ATTRIBUTE}={int(now.timestamp())}) and event "
             f"pg2cio_verified (check {check_id}): accepted ({result.status})")
        base = client.base_url
    # Reading back needs read endpoints: the emulator has them; the Track API has none.
    key, value = next(iter(identifiers.items()))
    try:
        people = httpx.get(f"{base}/_emulator/people", timeout=10)
        events = httpx.get(f"{base}/_emulator/events", params={"name": "pg2cio_verified"}, timeout=10)
    except httpx.HTTPError as exc:
        _say(f"read-back unavailable ({type(exc).__name__}); in Customer.io, open People, find {who} and look for "
             f"the event pg2cio_verified with check_id {check_id}")
        return 0
    if people.status_code != 200 or events.status_code != 200:
        _say(f"read-back unavailable at {base} (the Track API has no read endpoint); in Customer.io, open People, find "
             f"{who} and look for the event pg2cio_verified with check_id {check_id} and the attribute {contract.VERIFY_ATTRIBUTE}")
        return 0
    match = lambda p: (p.get(key) or "").lower() == value.lower() if key == "email" else p.get(key) == value  # noqa: E731
    profile = next((p for p in people.json() if match(p)), None)
    event = next((e for e in events.json() if e["data"].get("check_id") == check_id), None)
    ok = (profile is not None and profile["attributes"].get(contract.VERIFY_ATTRIBUTE) == int(now.timestamp())
          and event is not None and event["timestamp"] == int(now.timestamp()))
    if ok:
        _say(f"read back: the profile holds {contract.VERIFY_ATTRIBUTE} and the event pg2cio_verified arrived on it "
             f"({event['person']}): identity validated")
        return 0
    _say(f"read back FAILED: profile {'found' if profile else 'missing'}, event {'found' if event else 'missing'}")
    return 1


def _cmd_emulator(args: argparse.Namespace) -> int:
    from pg2cio_assets.cio_emulator import serve

    serve(args.host, args.port, args.site_id, args.api_key)
    return 0


def _backfill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backfill", action="store_true",
                   help="replaying history: apply the trigger suppression policy to events stamped within 72 h")
    p.add_argument("--policy", choices=settings.BACKFILL_POLICIES,
                   help="with --backfill: hold (default), attributes_only or send")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pg2cio", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("seed", help="create the contract schema in $PG2CIO_SOURCE_URL and fill it with a demo store")
    p.add_argument("--customers", type=int, default=DEMO_CUSTOMERS, help="number of accounts (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="random seed; same seed, same store (default %(default)s)")
    p.add_argument("--as-of", help="the store's 'now', ISO-8601 (default: the current hour, UTC)")
    p.add_argument("--schema", default=settings.DEFAULT_SOURCE_SCHEMA, help="schema to create (default %(default)s)")
    p.add_argument("--replace", action="store_true", help="drop and recreate the schema if it exists")
    p.add_argument("--manifest", type=Path, help="write the edge-case manifest (counts and ids) to this JSON file")
    p.set_defaults(func=_cmd_seed)

    p = sub.add_parser("check-source", help="check that $PG2CIO_SOURCE_URL provides every contract relation and column")
    p.set_defaults(func=_cmd_check_source)

    p = sub.add_parser("demo", help="embedded Postgres, a seeded store and the Dagster UI, with no set-up")
    p.add_argument("--customers", type=int, default=DEMO_CUSTOMERS, help="accounts in the demo store (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEMO_SEED)
    p.add_argument("--reseed", action="store_true", help="regenerate the demo store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--emulator-port", type=int, default=8765, help="port of the Customer.io emulator (default %(default)s)")
    p.add_argument("--days", type=int, default=30,
                   help="materialize the last N days first, so the UI opens on data (0: skip; default %(default)s)")
    p.add_argument("--no-ui", action="store_true", help="prepare Postgres, the store and the first run, then stop")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("verify", help="send one test identify and one test event to a chosen profile and read them back "
                       "(the 'validate identity' step of a rollout)")
    p.add_argument("--person", help="a person_key of pg2cio's people table (uses its Customer.io identifier)")
    p.add_argument("--id", help="a Customer.io id")
    p.add_argument("--email", help="a Customer.io email identifier")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("emulator", help="run the Customer.io Track API emulator in the foreground")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--site-id", default="emulator-site")
    p.add_argument("--api-key", default="emulator-key")
    p.set_defaults(func=_cmd_emulator)

    p = sub.add_parser("run", help="materialize the whole graph over a date range as one run in $DAGSTER_HOME's instance, "
                       "and print what reached Customer.io")
    p.add_argument("--start", required=True, help="first day, YYYY-MM-DD (UTC)")
    p.add_argument("--end", required=True, help="last day, YYYY-MM-DD (UTC), included")
    _backfill_flags(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("materialize", help="like run, over the last N days ending today (or --all)")
    p.add_argument("--days", type=int, default=1, help="how many daily partitions, ending today (default %(default)s)")
    p.add_argument("--all", action="store_true", help="every partition since PG2CIO_PARTITION_START")
    _backfill_flags(p)
    p.set_defaults(func=_cmd_materialize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (settings.ConfigError, DatabaseUnavailable, ContractError, RuntimeError) as exc:
        print(f"pg2cio: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

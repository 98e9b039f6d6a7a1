"""Day-to-day orchestration on real Postgres and real HTTP: backfills that never fire live
campaigns, the preview that predicts them, the near-real-time sensor driven tick by tick,
delivery latency, freshness per use case and the nightly refresh."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pandas as pd
import pytest
from psycopg import sql

from pg2cio_assets import changes, contract, events as ev
from pg2cio_assets.assets.events import build_events_asset
from pg2cio_assets.assets.extract import build_extract_assets
from pg2cio_assets.assets.identity import identity_assets, person_attributes
from pg2cio_assets.assets.sync import build_delivery_report, build_events_sync_asset, customerio_people_sync
from pg2cio_assets.cio_emulator import CustomerIOEmulator
from pg2cio_assets.orchestration import (
    NEAR_REAL_TIME_JOB, RANGE_END, RANGE_START, build_changes_sensor, build_jobs, build_nightly_schedule,
    build_preview_job, freshness_windows,
)
from pg2cio_assets.partitions import daily_partitions
from pg2cio_assets.resources import CustomerIOResource, PostgresResource
from pg2cio_assets.seed import generate_store
from pg2cio_assets.settings import Settings
from pg2cio_assets.suppression import TRIGGER_WINDOW

SITE, KEY = "site-orch", "key-orch"
# A store whose "now" is the real now, so its last days fall inside Customer.io's 72-hour window.
NOW = datetime.now(timezone.utc).replace(second=0, microsecond=0)
DAILY = daily_partitions((NOW - timedelta(days=20)).date().isoformat())
TODAY = NOW.date()
FIRST = DAILY.get_first_partition_key()


def day(n: int) -> str:
    """The partition key n days before today."""
    return (TODAY - timedelta(days=n)).isoformat()


@pytest.fixture(scope="module")
def live_store():
    return generate_store(200, seed=21, as_of=NOW)


@pytest.fixture
def db(make_seeded, live_store):
    return make_seeded(live_store)


@pytest.fixture
def emulator():
    with CustomerIOEmulator(site_id=SITE, api_key=KEY) as emu:
        yield emu


def graph_assets():
    return [*build_extract_assets(DAILY, "unused"), identity_assets, person_attributes, build_events_asset(DAILY, (), ()),
            customerio_people_sync, build_events_sync_asset(DAILY), build_delivery_report(ev.enabled_events())]


def resources(db, emu):
    return {
        "source": PostgresResource(url=db.url, schema_name=db.source_schema),
        "state": PostgresResource(role="state", url=db.url, schema_name=db.state_schema),
        "customerio": CustomerIOResource(track_url=emu.url, site_id=SITE, api_key=KEY, dry_run=False, backoff_base_seconds=0.01),
    }


UP_TO_EVENTS = [f"{r.name}_extract" for r in contract.SOURCE_RELATIONS] + [
    "identity_map", "people", "identity_merges", "person_attributes", "events"]
SYNC = ["customerio_people_sync", "customerio_events_sync", "delivery_report"]


def run(db, emu, first: str, last: str, *, instance=None, selection=None, tags=None, run_config=None):
    return dg.materialize(
        graph_assets(), selection=selection, resources=resources(db, emu), instance=instance or dg.DagsterInstance.ephemeral(),
        tags={RANGE_START: first, RANGE_END: last, **(tags or {})}, run_config=run_config,
    )


def ledger(db) -> pd.DataFrame:
    with db.connect() as conn:
        cur = conn.execute(sql.SQL("SELECT l.*, e.timestamp FROM {} l JOIN {} e USING (event_id)").format(
            sql.Identifier(db.state_schema, "cio_event_ledger"), sql.Identifier(db.state_schema, "events")))
        return pd.DataFrame.from_records(cur.fetchall(), columns=[d.name for d in cur.description])


def metadata(result, key: str) -> dict:
    return next(e.materialization.metadata for e in result.get_asset_materialization_events()
                if e.asset_key == dg.AssetKey(key))


def test_a_backfill_of_the_last_five_days_holds_every_event_that_could_trigger_and_still_updates_attributes(db, emulator):
    assert run(db, emulator, FIRST, day(5)).success  # history, live
    started = datetime.now(timezone.utc)
    result = run(db, emulator, day(4), day(0), tags={"dagster/backfill": "bf1"})
    assert result.success
    cutoff = int((started - TRIGGER_WINDOW).timestamp())
    sent = emulator.events()
    assert sent, "older events of the backfilled days still go out"
    assert all(e["timestamp"] < cutoff + 60 for e in sent), "no event stamped within 72 hours reached Customer.io"
    led = ledger(db)
    recent = led[led["timestamp"] >= cutoff + 60]
    assert len(recent) > 0 and set(recent["status"]) == {"suppressed"}
    assert recent["reason"].str.contains("policy hold").all()
    assert set(led[led["timestamp"] < cutoff]["status"]) <= {"accepted"}
    meta = metadata(result, "customerio_events_sync")
    assert meta["suppression_policy"].value == "hold" and "bf1" in meta["suppression_reason"].value
    assert meta["suppressed"].value == (led["status"] == "suppressed").sum()
    # Attributes still went out: the people of the last days carry their latest orders.
    people = {p["id"]: p["attributes"] for p in emulator.people() if p.get("id")}
    with db.connect() as conn:
        key, orders = conn.execute(sql.SQL(
            "SELECT person_key, orders_count FROM {} WHERE person_type = 'account' AND NOT is_erased "
            "AND last_order_at >= %s ORDER BY person_key LIMIT 1").format(sql.Identifier(db.state_schema, "person_attributes")),
            (cutoff,)).fetchone()
    assert people[key]["orders_count"] == orders

    # A live run of today afterwards does not fire what the backfill held.
    before = len(emulator.events())
    assert run(db, emulator, day(0), day(0)).success
    assert len(emulator.events()) == before
    assert set(ledger(db).query("timestamp >= @cutoff + 60")["status"]) == {"suppressed"}


def test_held_events_go_out_once_they_are_too_old_to_trigger(db, emulator):
    from pg2cio_assets import delivery
    from pg2cio_assets.customerio import TrackClient

    assert run(db, emulator, FIRST, day(0), tags={"dagster/backfill": "bf2"}).success
    held = ledger(db).query("status == 'suppressed'")
    assert len(held) > 0
    later = NOW + TRIGGER_WINDOW + timedelta(hours=1)  # the sync, three days on
    with db.connect() as conn, TrackClient(emulator.url, SITE, KEY) as client:
        d = delivery.sync_events(conn, client, db.state_schema, start=DAILY.start, end=DAILY.start, run_id="later", now=later)
    assert d.outcomes.get("accepted") == len(held)
    assert {e["id"] for e in emulator.events()} >= set(held["event_id"])
    assert set(ledger(db).set_index("event_id").loc[held["event_id"], "path"]) == {"released"}


def test_attributes_only_sends_no_event_but_every_person(db, emulator):
    result = run(db, emulator, FIRST, day(0), tags={"dagster/backfill": "bf3", "pg2cio/backfill_policy": "attributes_only"})
    assert result.success
    assert emulator.events() == []
    assert len(emulator.people()) > 0
    assert set(ledger(db)["status"]) == {"skipped"}
    assert metadata(result, "customerio_events_sync")["skipped"].value == len(ledger(db))
    # The sensor's next live run over the last days must not fire what was skipped.
    started = datetime.now(timezone.utc)
    assert run(db, emulator, day(2), day(0)).success
    cutoff = int((started - TRIGGER_WINDOW).timestamp())
    assert all(e["timestamp"] < cutoff + 60 for e in emulator.events())
    assert set(ledger(db).query("timestamp >= @cutoff + 60")["status"]) == {"skipped"}


def test_a_dry_run_never_turns_a_hold_into_something_a_live_run_would_send(db, emulator):
    from pg2cio_assets import delivery
    from pg2cio_assets.customerio import TrackClient

    assert run(db, emulator, FIRST, day(0), tags={"dagster/backfill": "bf5"}).success
    held = set(ledger(db).query("status == 'suppressed'")["event_id"])
    later = NOW + TRIGGER_WINDOW + timedelta(hours=1)
    with db.connect() as conn:
        dry = delivery.sync_events(conn, None, db.state_schema, start=DAILY.start, end=DAILY.start, run_id="dry", now=later)
    assert dry.outcomes.get("would_send") == len(held)
    assert set(ledger(db).query("status == 'suppressed'")["event_id"]) == held, "still held after the dry run"
    with db.connect() as conn, TrackClient(emulator.url, SITE, KEY) as client:
        delivery.sync_events(conn, client, db.state_schema, start=DAILY.start, end=DAILY.start, run_id="real", now=later)
    assert held <= {e["id"] for e in emulator.events()}


def test_the_preview_counts_what_the_backfill_then_does(db, emulator):
    instance = dg.DagsterInstance.ephemeral()
    assert run(db, emulator, FIRST, day(0), instance=instance, selection=UP_TO_EVENTS).success
    preview = build_preview_job(DAILY, Settings()).execute_in_process(
        run_config={"ops": {"preview_backfill": {"config": {"start": day(6), "end": day(0)}}}},
        resources={"state": PostgresResource(role="state", url=db.url, schema_name=db.state_schema),
                   "preview_io_manager": dg.mem_io_manager},
        instance=instance,
    )
    predicted = {r["event"]: r for r in preview.output_for_node("preview_backfill")["by_name"]}
    assert sum(r["would_hold"] for r in predicted.values()) > 0 and sum(r["would_send"] for r in predicted.values()) > 0
    assert emulator.stats()["requests"] == 0, "a preview sends nothing"
    assert ledger(db).empty, "and records nothing"

    result = run(db, emulator, day(6), day(0), instance=instance, selection=SYNC, tags={"dagster/backfill": "bf4"})
    assert result.success
    done = metadata(result, "customerio_events_sync")["by_name"].value
    for name, row in predicted.items():
        assert done[name].get("accepted", 0) + done[name].get("rejected", 0) == row["would_send"], name
        assert done[name].get("suppressed", 0) == row["would_hold"], name
    assert set(done) == set(predicted)


def test_the_preview_explains_a_bad_window():
    from pg2cio_assets.orchestration import preview_window
    from pg2cio_assets.settings import ConfigError

    with pytest.raises(ConfigError, match="before start"):
        preview_window(day(0), day(3), DAILY)
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        preview_window("yesterday", day(0), DAILY)


# --- the sensor, tick by tick --------------------------------------------------------------


def insert_cart(db, cart_id: str, at: datetime, email: str = "late.shopper@example.org") -> None:
    with db.connect() as conn:
        conn.execute(sql.SQL(
            "INSERT INTO {} (cart_id, customer_id, email, currency, created_at, updated_at, checkout_started_at) "
            "VALUES (%s, NULL, %s, 'USD', %s, %s, %s)").format(sql.Identifier(db.source_schema, "carts")),
            (cart_id, email, at, at, at))
        conn.execute(sql.SQL("INSERT INTO {} (cart_id, sku, quantity, unit_price) SELECT %s, sku, 1, 20 FROM {} LIMIT 1").format(
            sql.Identifier(db.source_schema, "cart_items"), sql.Identifier(db.source_schema, "products")), (cart_id,))


def tick(sensor, ctx):
    result = sensor(ctx)
    requests = [result] if isinstance(result, dg.RunRequest) else []
    return requests


def sensor_for(db, overlap_seconds: int = 300):
    job, _ = build_jobs(DAILY)
    sensor = build_changes_sensor(job, DAILY, Settings(sensor_overlap_seconds=overlap_seconds))
    source = PostgresResource(url=db.url, schema_name=db.source_schema)
    return sensor, source


def test_the_sensor_launches_one_run_per_change_batch_and_never_misses_a_late_commit(seeded):
    sensor, source = sensor_for(seeded)
    keys: list[str] = []
    ctx = dg.build_sensor_context(resources={"source": source})
    assert tick(sensor, ctx) == [], "an old store with nothing new: skip"

    now = datetime.now(timezone.utc)
    insert_cart(seeded, "rt-1", now)
    (req,) = tick(sensor, ctx)
    keys.append(req.run_key)
    assert req.tags[RANGE_START] == req.tags[RANGE_END] == now.date().isoformat()
    assert "carts=1" in req.tags["pg2cio/changes"]
    assert tick(sensor, ctx) == [], "the same change is not handed to a second run"

    # Committed late, stamped two minutes before what the sensor has already seen.
    insert_cart(seeded, "rt-2", now - timedelta(minutes=2))
    (req,) = tick(sensor, ctx)
    keys.append(req.run_key)
    assert req.tags["pg2cio/changes"] == "carts=1"

    # Two changes between ticks make one batch, one run.
    insert_cart(seeded, "rt-3", datetime.now(timezone.utc))
    with seeded.connect() as conn:
        conn.execute(sql.SQL("UPDATE {} SET updated_at = now(), canceled_at = now() WHERE order_id = "
                             "(SELECT min(order_id) FROM {})").format(
            sql.Identifier(seeded.source_schema, "orders"), sql.Identifier(seeded.source_schema, "orders")))
    (req,) = tick(sensor, ctx)
    keys.append(req.run_key)
    assert req.tags["pg2cio/changes"] == "carts=1, orders=1"
    assert tick(sensor, ctx) == []
    assert len(set(keys)) == len(keys) == 3


def test_rows_without_a_key_that_differ_only_in_which_column_is_null_are_two_changes(seeded):
    sensor, source = sensor_for(seeded)
    ctx = dg.build_sensor_context(resources={"source": source})
    tick(sensor, ctx)
    now = datetime.now(timezone.utc)
    with seeded.connect() as conn:
        customer = conn.execute(sql.SQL("SELECT min(customer_id) FROM {}").format(
            sql.Identifier(seeded.source_schema, "customers"))).fetchone()[0]
        for old_email, new_email in ((None, "x@example.org"), ("x@example.org", None)):
            conn.execute(sql.SQL("INSERT INTO {} (customer_id, old_email, new_email, changed_at) VALUES (%s, %s, %s, %s)").format(
                sql.Identifier(seeded.source_schema, "customer_email_changes")), (customer, old_email, new_email, now))
    (req,) = tick(sensor, ctx)
    assert req.tags["pg2cio/changes"] == "customer_email_changes=2"


def test_a_sensor_off_for_long_catches_up_over_several_ticks_without_losing_a_row(seeded):
    sensor, source = sensor_for(seeded)
    found = []
    start = datetime.now(timezone.utc) - timedelta(minutes=4)
    for i in range(5):
        insert_cart(seeded, f"rt-bulk-{i}", start + timedelta(seconds=i))
    cursor = changes.Cursor()
    with source.connect() as conn:
        for _ in range(6):
            now = datetime.now(timezone.utc)
            polled = changes.poll(conn, seeded.source_schema, cursor, now=now, overlap=timedelta(minutes=5),
                                  relations=("carts",), limit=2)
            batch = changes.plan(polled.changes, cursor, now=now, overlap=timedelta(minutes=5), stopped_at=polled.stopped_at)
            found += [c.key for c in batch.new]
            cursor = batch.cursor
    assert sorted(found) == sorted(f'["rt-bulk-{i}"]' for i in range(5))


def test_a_row_committed_later_than_the_overlap_is_left_to_the_nightly_refresh(seeded):
    sensor, source = sensor_for(seeded, overlap_seconds=60)
    ctx = dg.build_sensor_context(resources={"source": source})
    insert_cart(seeded, "rt-a", datetime.now(timezone.utc))
    assert len(tick(sensor, ctx)) == 1
    insert_cart(seeded, "rt-b", datetime.now(timezone.utc) - timedelta(minutes=10))
    assert tick(sensor, ctx) == []


def test_a_cursor_pg2cio_did_not_write_is_refused_with_how_to_reset_it(seeded):
    sensor, source = sensor_for(seeded)
    with pytest.raises(Exception, match="Reset cursor"):
        sensor(dg.build_sensor_context(cursor="not json", resources={"source": source}))


def test_change_planning_keeps_only_the_overlap_and_never_follows_a_future_timestamp():
    now = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
    overlap = timedelta(minutes=5)
    a = changes.Change("carts", "a", now - timedelta(minutes=1))
    future = changes.Change("orders", "f", now + timedelta(days=1))
    batch = changes.plan([a, future], changes.Cursor(), now=now, overlap=overlap)
    assert batch.cursor.high == now and len(batch.new) == 2
    later = now + timedelta(minutes=10)
    again = changes.plan([future], batch.cursor, now=later, overlap=overlap)
    assert again.new == [] and a.digest not in again.cursor.seen and future.digest in again.cursor.seen
    restored = changes.Cursor.loads(batch.cursor.dumps())
    assert restored == batch.cursor


# --- a sensor run end to end: delivery latency and its checks -------------------------------


def checks_of(result) -> dict[str, bool]:
    out = {}
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            data = event.event_specific_data
            out[data.check_name] = (data.passed, data.metadata)
    return out


def test_a_sensor_run_delivers_a_checkout_within_the_recovery_target_and_reports_its_latency(seeded, emulator):
    # The store's history, as a backfill (late by design, left out of the latency checks).
    first = DAILY.get_first_partition_key()
    assert run(seeded, emulator, first, day(0), tags={"dagster/backfill": "history"}).success
    sensor, source = sensor_for(seeded)
    ctx = dg.build_sensor_context(resources={"source": source})
    tick(sensor, ctx)
    insert_cart(seeded, "rt-live", datetime.now(timezone.utc), email="fresh.buyer@example.org")
    (req,) = tick(sensor, ctx)
    result = run(seeded, emulator, req.tags[RANGE_START], req.tags[RANGE_END],
                 tags={**req.tags, "dagster/sensor_name": "source_changes_sensor"})
    assert result.success
    got = [e for e in emulator.events() if e["name"] == "checkout_started" and e["data"]["cart_id"] == "rt-live"]
    assert len(got) == 1
    checks = checks_of(result)
    passed, meta = checks["recovery_delivery_within_target"]
    assert passed and meta["events"].value >= 1 and meta["p95_seconds"].value < 15 * 60
    row = ledger(seeded).query("status == 'accepted' and path == 'sensor'")
    assert "checkout_started" in set(row["name"])
    report = metadata(result, "delivery_report")
    assert "checkout_started/sensor" in report["latency_by_name"].value


def test_recovery_events_that_arrive_late_fail_the_check_and_purchases_known_too_late_are_counted(seeded, emulator):
    assert run(seeded, emulator, FIRST, day(0), tags={"dagster/backfill": "history"}).success
    now = datetime.now(timezone.utc)
    # A checkout two hours ago whose purchase, 20 minutes later, only now reaches Customer.io.
    insert_cart(seeded, "rt-slow", now - timedelta(hours=2), email="slow.buyer@example.org")
    with seeded.connect() as conn:
        conn.execute(sql.SQL(
            "INSERT INTO {} (order_id, customer_id, email, cart_id, currency, subtotal, order_total, created_at, updated_at, paid_at) "
            "VALUES ('rt-order', NULL, 'slow.buyer@example.org', 'rt-slow', 'USD', 20, 20, %s, %s, %s)").format(
            sql.Identifier(seeded.source_schema, "orders")), (now - timedelta(minutes=100),) * 3)
        conn.execute(sql.SQL("INSERT INTO {} (order_id, line_no, sku, title, category, quantity, unit_price) "
                             "SELECT 'rt-order', 1, sku, title, category, 1, 20 FROM {} LIMIT 1").format(
            sql.Identifier(seeded.source_schema, "order_items"), sql.Identifier(seeded.source_schema, "products")))
    result = run(seeded, emulator, day(0), day(0))
    assert result.success
    passed, meta = checks_of(result)["recovery_delivery_within_target"]
    assert not passed and meta["p95_seconds"].value > 15 * 60
    risk = metadata(result, "delivery_report")["recovery_false_positive_risk"].value
    assert risk["paid_before_first_message_but_known_after"] == 1


# --- freshness and the nightly refresh ---------------------------------------------------------


def test_every_use_case_has_a_freshness_policy_with_the_contracts_window():
    from pg2cio_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    windows = freshness_windows(ev.enabled_events())
    for name, minutes in windows.items():
        policy = graph.get(dg.AssetKey(name)).freshness_policy
        assert policy is not None and policy.fail_window.to_timedelta() == timedelta(minutes=minutes), name
    serving = contract.asset_use_cases(ev.enabled_events())
    for use_case in contract.USE_CASES.values():
        enforced = [windows[a] for a, ucs in serving.items() if use_case.name in ucs]
        assert enforced and min(enforced) <= use_case.latency_minutes, use_case.name
    assert windows["customerio_events_sync"] == contract.USE_CASES["recovery"].latency_minutes


def test_the_nightly_refresh_rebuilds_the_last_days_and_every_unpartitioned_asset():
    _, nightly = build_jobs(DAILY)
    schedule = build_nightly_schedule(nightly, DAILY, Settings(nightly_days=3))
    at = datetime.combine(TODAY, datetime.min.time(), tzinfo=timezone.utc).replace(hour=2)
    req = schedule(dg.build_schedule_context(scheduled_execution_time=at))
    assert req.tags[RANGE_START] == day(3) and req.tags[RANGE_END] == day(1)
    assert req.run_key == f"nightly-{TODAY.isoformat()}"
    from pg2cio_assets.definitions import defs

    job = defs.resolve_job_def("nightly_refresh")
    selected = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert {"person_attributes", "customerio_people_sync", "events"} <= selected
    assert defs.resolve_job_def(NEAR_REAL_TIME_JOB).executor_def.name == "in_process"

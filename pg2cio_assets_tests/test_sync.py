"""Customer.io delivery against the emulator over real HTTP: once, and only what changed."""

from __future__ import annotations

from datetime import timedelta

import dagster as dg
import pandas as pd
import pytest
from psycopg import sql

from pg2cio_assets import contract, delivery
from pg2cio_assets import events as ev
from pg2cio_assets.assets.events import build_events_asset
from pg2cio_assets.assets.extract import build_extract_assets
from pg2cio_assets.assets.identity import identity_assets, person_attributes
from pg2cio_assets.assets.sync import build_delivery_report, build_events_sync_asset, customerio_people_sync
from pg2cio_assets.cio_emulator import CustomerIOEmulator
from pg2cio_assets.customerio import CustomerIOUnavailable, TrackClient
from pg2cio_assets.customerio import encode as sync_encode
from pg2cio_assets.partitions import daily_partitions
from pg2cio_assets.resources import CustomerIOResource, PostgresResource
from pg2cio_assets.seed import generate_store

from .conftest import AS_OF, SeededDB

# The first partition holds everything older, so a month of partitions covers the whole store.
DAILY = daily_partitions("2026-11-01")
FIRST, LAST = "2026-11-01", (AS_OF + timedelta(days=1)).date().isoformat()
SITE, KEY = "site-test", "key-test"
delivery_report = build_delivery_report(ev.enabled_events())
SYNC = ["customerio_people_sync", "customerio_events_sync", "delivery_report"]
UP_TO_EVENTS = [f"{r.name}_extract" for r in contract.SOURCE_RELATIONS] + [
    "identity_map", "people", "identity_merges", "person_attributes", "events"]


@pytest.fixture
def emulator():
    with CustomerIOEmulator(site_id=SITE, api_key=KEY) as emu:
        yield emu


@pytest.fixture(scope="module")
def small_store():
    return generate_store(200, seed=5, as_of=AS_OF)


@pytest.fixture
def db(make_seeded, small_store) -> SeededDB:
    return make_seeded(small_store)


def cio(emu: CustomerIOEmulator | None, **kw) -> CustomerIOResource:
    if emu is None:
        return CustomerIOResource(dry_run=True)
    return CustomerIOResource(track_url=emu.url, site_id=SITE, api_key=KEY, dry_run=False, backoff_base_seconds=0.01, **kw)


def run_graph(db, emu, *, first=FIRST, last=LAST, selection=None, **cio_kw) -> dg.ExecuteInProcessResult:
    assets = [*build_extract_assets(DAILY, db.state_schema), identity_assets, person_attributes,
              build_events_asset(DAILY, (), ()), customerio_people_sync, build_events_sync_asset(DAILY), delivery_report]
    return dg.materialize(
        assets,
        selection=selection,
        resources={
            "source": PostgresResource(url=db.url, schema_name=db.source_schema),
            "state": PostgresResource(role="state", url=db.url, schema_name=db.state_schema),
            "customerio": cio(emu, **cio_kw),
        },
        run_config={"ops": {"person_attributes": {"config": {"as_of": AS_OF.isoformat()}}}}
        if selection is None or "person_attributes" in selection else None,
        tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
        instance=dg.DagsterInstance.ephemeral(),
    )


def frame(db, table: str, where: str = "TRUE", params=()) -> pd.DataFrame:
    with db.connect() as conn:
        cur = conn.execute(sql.SQL("SELECT * FROM {} WHERE " + where).format(sql.Identifier(db.state_schema, table)), params)
        return pd.DataFrame.from_records(cur.fetchall(), columns=[d.name for d in cur.description])


def test_a_full_run_leaves_one_profile_per_person_with_its_attributes_and_every_event_once(db, emulator):
    result = run_graph(db, emulator)
    assert result.success
    assert frame(db, "cio_rejections").empty, frame(db, "cio_rejections").head(3).to_dict("records")
    attrs = frame(db, "person_attributes")
    live = attrs[~attrs["is_erased"]]
    profiles = emulator.people()
    assert len(profiles) == len(live)
    by_id = {p["id"]: p for p in profiles if p.get("id")}
    row = live[(live["person_type"] == "account") & (live["orders_count"] > 1)].iloc[0]
    got = by_id[row["person_key"]]["attributes"]
    for name in ("orders_count", "lifetime_value", "last_order_at", "is_lapsed_60d", "email", "top_category"):
        assert got[name] == (row[name].item() if hasattr(row[name], "item") else row[name]), name
    assert isinstance(got["last_order_at"], int) and "created_at" in got
    sent = {e["id"] for e in emulator.events()}
    expected = set(frame(db, "events", "NOT EXISTS (SELECT 1 FROM {s}.person_attributes p WHERE p.person_key = events.person_key "
                                         "AND p.is_erased)".replace("{s}", db.state_schema))["event_id"])
    assert sent == expected and len(emulator.events()) == len(expected) > 0
    report = next(e.materialization.metadata for e in result.get_asset_materialization_events()
                  if e.asset_key == dg.AssetKey("delivery_report"))
    assert report["requests"].value == emulator.stats()["requests"]
    assert 0 < report["mean_batch_fill"].value <= 1


def test_a_second_run_with_no_source_change_sends_nothing(db, emulator):
    assert run_graph(db, emulator).success
    before = emulator.stats()["requests"]
    assert run_graph(db, emulator).success
    assert emulator.stats()["requests"] == before


def test_changing_one_email_sends_one_identify_with_only_that_attribute(db, emulator):
    assert run_graph(db, emulator).success
    ledger_before = frame(db, "cio_attribute_ledger")
    with db.connect() as conn:
        customer_id = conn.execute(sql.SQL("SELECT customer_id FROM {} WHERE deleted_at IS NULL ORDER BY customer_id LIMIT 1").format(
            sql.Identifier(db.source_schema, "customers"))).fetchone()[0]
        conn.execute(sql.SQL("UPDATE {} SET email = 'new.address@example.org', updated_at = %s WHERE customer_id = %s").format(
            sql.Identifier(db.source_schema, "customers")), (AS_OF - timedelta(hours=1), customer_id))
    before = emulator.stats()
    assert run_graph(db, emulator, first=AS_OF.date().isoformat(), last=AS_OF.date().isoformat()).success
    after = emulator.stats()
    assert after["requests"] - before["requests"] == 1 and after["ops"] - before["ops"] == 1
    changed = frame(db, "cio_attribute_ledger").merge(ledger_before, on=["person_key", "attribute"], suffixes=("", "_before"))
    moved = changed[changed["accepted_at"] != changed["accepted_at_before"]]
    assert moved[["person_key", "attribute"]].values.tolist() == [[customer_id, "email"]]
    profile = next(p for p in emulator.people() if p.get("id") == customer_id)
    assert profile["attributes"]["email"] == "new.address@example.org"


def test_a_207_records_the_two_bad_ops_as_rejected_with_reasons_and_accepts_the_rest(db, emulator):
    assert run_graph(db, emulator, selection=UP_TO_EVENTS).success
    with db.connect() as conn:
        t = sql.Identifier(db.state_schema, "events")
        bad = [r[0] for r in conn.execute(sql.SQL("SELECT event_id FROM {} ORDER BY event_id LIMIT 2").format(t))]
        for i, event_id in enumerate(bad):
            conn.execute(sql.SQL("UPDATE {} SET event_id = %s WHERE event_id = %s").format(t), (f"not-a-ulid-{i}", event_id))
    assert run_graph(db, emulator, selection=SYNC).success
    ledger = frame(db, "cio_event_ledger")
    rejected = ledger[ledger["status"] == "rejected"]
    assert sorted(rejected["event_id"]) == ["not-a-ulid-0", "not-a-ulid-1"]
    assert rejected["reason"].str.len().gt(0).all()
    assert (ledger["status"] == "accepted").sum() == len(emulator.events()) == len(ledger) - 2 - (ledger["status"] == "quarantined").sum()


def test_429s_and_5xx_are_retried_to_success(db, emulator):
    emulator.inject(status=429, retry_after=0.05, count=2)
    emulator.inject(status=503, count=1)
    assert run_graph(db, emulator).success
    codes = emulator.stats()["status_counts"]
    assert codes.get(429, codes.get("429")) == 2 and codes.get(503, codes.get("503")) == 1
    assert len(emulator.events()) == len(frame(db, "cio_event_ledger", "status = 'accepted'"))


def test_a_sync_killed_midway_resumes_and_every_event_arrives_exactly_once(db, emulator):
    assert run_graph(db, emulator, selection=UP_TO_EVENTS + ["customerio_people_sync"]).success
    armed = []

    def cut_after_first_batch(message: str) -> None:
        if "batch 1/" in message and not armed:
            armed.append(True)
            emulator.inject(drop=True, count=50)

    with db.connect() as conn, TrackClient(emulator.url, SITE, KEY, max_retries=1, backoff_base=0.01) as client:
        with pytest.raises(CustomerIOUnavailable):
            delivery.sync_events(conn, client, db.state_schema, start="-infinity", end=AS_OF + timedelta(days=2),
                                 run_id="killed", log=cut_after_first_batch)
    partial = len(emulator.events())
    assert armed and 0 < partial
    emulator.reset_faults()
    with db.connect() as conn, TrackClient(emulator.url, SITE, KEY, backoff_base=0.01) as client:
        delivery.sync_events(conn, client, db.state_schema, start="-infinity", end=AS_OF + timedelta(days=2), run_id="resumed")
    ids = [e["id"] for e in emulator.events()]
    assert len(ids) == len(set(ids)) > partial
    assert set(ids) == set(frame(db, "cio_event_ledger", "status = 'accepted'")["event_id"])
    assert frame(db, "cio_event_ledger", "status NOT IN ('accepted', 'quarantined')").empty


def test_an_over_limit_attribute_is_held_back_and_the_rest_is_sent(db, emulator):
    with db.connect() as conn:
        customer_id = conn.execute(sql.SQL("SELECT customer_id FROM {} WHERE deleted_at IS NULL ORDER BY customer_id LIMIT 1").format(
            sql.Identifier(db.source_schema, "customers"))).fetchone()[0]
        conn.execute(sql.SQL("UPDATE {} SET first_name = repeat('x', 1200) WHERE customer_id = %s").format(
            sql.Identifier(db.source_schema, "customers")), (customer_id,))
    assert run_graph(db, emulator).success
    held = frame(db, "cio_held_attributes")
    too_long = held[held["attribute"] == "first_name"]
    assert too_long[["person_key", "attribute"]].values.tolist() == [[customer_id, "first_name"]]
    assert "over Customer.io's 1,000" in too_long["reason"].iloc[0]
    # The only other values held back are the emails two accounts share (one profile each, no email).
    others = held[held["attribute"] != "first_name"]
    assert set(others["person_key"]) == set(db.store.manifest.ids["shared_email_pairs"])
    assert (others["attribute"] == "email").all()
    profile = next(p for p in emulator.people() if p.get("id") == customer_id)
    assert "first_name" not in profile["attributes"] and "orders_count" in profile["attributes"]


def test_a_dry_run_builds_and_records_everything_and_sends_nothing(db, emulator):
    assert run_graph(db, None).success
    assert emulator.stats()["requests"] == 0
    ledger = frame(db, "cio_event_ledger")
    assert len(ledger) > 0 and set(ledger["status"]) <= {"would_send", "quarantined"}
    # The real run afterwards still sends everything.
    assert run_graph(db, emulator).success
    assert len(emulator.events()) == (frame(db, "cio_event_ledger")["status"] == "accepted").sum() > 0


def test_an_erased_customer_is_deleted_once_and_nothing_of_theirs_is_sent(db, emulator):
    assert run_graph(db, emulator).success
    erased = db.store.manifest.ids["erased_customers"]
    assert not any(p.get("id") in erased for p in emulator.people())
    assert not any(e["person"].get("id") in erased for e in emulator.events())
    deletes = frame(db, "cio_erasure_ledger")
    assert sorted(deletes["person_key"]) == sorted(erased) and set(deletes["status"]) == {"accepted"}
    before = emulator.stats()["requests"]
    assert run_graph(db, emulator).success
    assert emulator.stats()["requests"] == before


def test_missing_credentials_fail_naming_the_variables(monkeypatch):
    from pg2cio_assets.settings import ConfigError

    monkeypatch.delenv("CUSTOMERIO_SITE_ID", raising=False)
    monkeypatch.delenv("CUSTOMERIO_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="CUSTOMERIO_SITE_ID and CUSTOMERIO_API_KEY not set"):
        CustomerIOResource(dry_run=False).client()


def test_a_guest_profile_customerio_already_holds_is_merged_into_the_account_that_registered(db, emulator):
    """Before pg2cio knew of the account, the guest's email profile got an event in Customer.io."""
    customer_id = db.store.manifest.ids["registered_later"][0]
    with db.connect() as conn:
        email = conn.execute(sql.SQL("SELECT lower(btrim(email)) FROM {} WHERE customer_id = %s").format(
            sql.Identifier(db.source_schema, "customers")), (customer_id,)).fetchone()[0]
    with TrackClient(emulator.url, SITE, KEY) as client:
        early = {"type": "person", "identifiers": {"email": email}, "action": "event", "name": "order_paid",
                 "id": "01HZZZZZZZZZZZZZZZZZZZZZZZ", "timestamp": int(AS_OF.timestamp()) - 86400 * 400, "attributes": {}}
        guest = {"type": "person", "identifiers": {"email": email}, "action": "identify", "attributes": {"first_name": "guest"}}
        assert client.send_batch([sync_encode(guest), sync_encode(early)]).status == 200
    assert run_graph(db, emulator).success
    mine = [p for p in emulator.people() if p.get("id") == customer_id or (p.get("email") or "").lower() == email]
    assert len(mine) == 1 and mine[0]["id"] == customer_id and (mine[0]["email"] or "").lower() == email
    assert any(e["id"] == "01HZZZZZZZZZZZZZZZZZZZZZZZ" and e["person"].get("id") == customer_id for e in emulator.events())
    assert set(frame(db, "cio_merge_ledger", "primary_id = %s", (customer_id,))["status"]) == {"accepted"}


def test_a_window_is_sent_in_bounded_chunks_and_every_event_arrives_once(db, emulator):
    assert run_graph(db, emulator, selection=UP_TO_EVENTS + ["customerio_people_sync"]).success
    with db.connect() as conn, TrackClient(emulator.url, SITE, KEY) as client:
        sent = delivery.sync_events(conn, client, db.state_schema, start="-infinity", end=AS_OF + timedelta(days=2),
                                    run_id="chunked", chunk=997)
    ids = [e["id"] for e in emulator.events()]
    assert len(ids) == len(set(ids)) == sent.outcomes["accepted"] > 997 * 3
    assert set(ids) == set(frame(db, "cio_event_ledger", "status = 'accepted'")["event_id"])

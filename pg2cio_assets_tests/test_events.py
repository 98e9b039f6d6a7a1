"""Event streams on the generated store: contract names, deterministic ULIDs, real timestamps."""

from __future__ import annotations

import uuid
from datetime import timedelta

import dagster as dg
import pandas as pd
import psycopg
import pytest
from psycopg import sql

from pg2cio_assets import contract, ulid
from pg2cio_assets.assets.events import build_events_asset
from pg2cio_assets.events import build_events, enabled_events
from pg2cio_assets.partitions import daily_partitions
from pg2cio_assets.resources import PostgresResource
from pg2cio_assets.seed import load_store

from .conftest import AS_OF, SeededDB
from .test_identity import extract_everything, resolve

DAILY = daily_partitions("2024-01-01")
LAST = (AS_OF - timedelta(days=1)).date().isoformat()


def run_events(db, first: str, last: str | None = None, enable=(), state_schema=None):
    tags = {} if last is None else {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
    return dg.materialize(
        [build_events_asset(DAILY, tuple(enable), ())],
        resources={"state": PostgresResource(role="state", url=db.url, schema_name=state_schema or db.state_schema)},
        partition_key=None if last else first,
        tags=tags,
        instance=dg.DagsterInstance.ephemeral(),
    )


@pytest.fixture(scope="module")
def history(pg_url, store):
    """The store extracted and resolved, and events built over its whole history in one run."""
    src, state = f"t_evsrc_{uuid.uuid4().hex[:8]}", f"t_evstate_{uuid.uuid4().hex[:8]}"
    db = SeededDB(pg_url, src, state, store)
    with psycopg.connect(pg_url) as conn:
        load_store(conn, store, src)
    extract_everything(db)
    assert resolve(db).success
    result = run_events(db, "2024-01-01", (AS_OF + timedelta(days=1)).date().isoformat())
    assert result.success
    yield db, result
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for s in (src, state):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s)))


def events_table(db, where: str = "TRUE", params=(), table: str = "events") -> pd.DataFrame:
    with db.connect() as conn:
        cur = conn.execute(sql.SQL("SELECT * FROM {} WHERE " + where + " ORDER BY 1").format(
            sql.Identifier(db.state_schema, table)), params)
        return pd.DataFrame.from_records(cur.fetchall(), columns=[d.name for d in cur.description])


def test_a_guest_order_later_linked_is_order_paid_on_the_accounts_id_and_its_first_order(history):
    db, _ = history
    paid = events_table(db, "name = 'order_paid'")
    for customer_id in db.store.manifest.ids["registered_later"]:
        mine = paid[paid["person_key"] == customer_id].sort_values("occurred_at")
        assert (mine["cio_identifier_type"] == "id").all() and (mine["cio_identifier"] == customer_id).all()
        with db.connect() as conn:
            first_is_guest = conn.execute(sql.SQL("SELECT customer_id IS NULL FROM {} WHERE order_id = %s").format(
                sql.Identifier(db.source_schema, "orders")), (mine["properties"].iloc[0]["order_id"],)).fetchone()[0]
        assert first_is_guest, "the first paid order was placed as a guest"
        flags = [p["is_first_order"] for p in mine["properties"]]
        assert flags == [True] + [False] * (len(flags) - 1)
    assert paid["properties"].map(lambda p: p["is_first_order"]).sum() == paid["person_key"].nunique()


def test_a_checkout_paid_four_minutes_later_gives_both_events_four_minutes_apart(history):
    db, _ = history
    for order_id in db.store.manifest.ids["quick_checkout_orders"]:
        with db.connect() as conn:
            cart_id = conn.execute(sql.SQL("SELECT cart_id FROM {} WHERE order_id = %s").format(
                sql.Identifier(db.source_schema, "orders")), (order_id,)).fetchone()[0]
        started = events_table(db, "name = 'checkout_started' AND source_key = %s", (cart_id,))
        paid = events_table(db, "name = 'order_paid' AND source_key = %s", (order_id,))
        if started.empty and paid.empty:
            continue  # an order no person owns is quarantined, both events with it
        assert len(started) == len(paid) == 1
        assert paid["timestamp"].iloc[0] - started["timestamp"].iloc[0] == 240
        assert paid["person_key"].iloc[0] == started["person_key"].iloc[0]


def test_ids_are_deterministic_ulids_stamped_when_it_happened(history, new_schema):
    db, result = history
    events = events_table(db)
    assert events["event_id"].map(ulid.is_valid).all() and events["event_id"].is_unique
    assert (events["event_id"].map(ulid.timestamp_ms) // 1000 == events["timestamp"]).all()
    assert (events["timestamp"] == events["occurred_at"].map(lambda t: int(t.timestamp()))).all()
    assert all(c.passed for c in result.get_asset_check_evaluations())
    # The same day alone, and again, gives the ids the whole-history run gave it.
    day = LAST
    in_range = set(events_table(db, "occurred_at::date = %s::date", (day,))["event_id"])
    assert in_range
    assert run_events(db, day).success and run_events(db, day).success
    assert set(events_table(db, "occurred_at::date = %s::date", (day,))["event_id"]) == in_range
    assert len(events_table(db)) == len(events)


def test_cart_updated_is_off_unless_switched_on(history):
    db, _ = history
    assert events_table(db, "name = 'cart_updated'").empty
    assert run_events(db, LAST, enable=("cart_updated",)).success
    switched_on = events_table(db, "name = 'cart_updated'")
    assert len(switched_on) > 0
    assert run_events(db, LAST).success
    assert events_table(db, "name = 'cart_updated'").empty


def test_items_travel_only_with_the_events_the_contract_turns_them_on_for(history):
    db, _ = history
    events = events_table(db)
    for name, grp in events.groupby("name"):
        has_items = grp["properties"].map(lambda p: "items" in p)
        assert has_items.all() == contract.EVENTS_BY_NAME[name].items and has_items.any() == contract.EVENTS_BY_NAME[name].items
    paid = events[events["name"] == "order_paid"]
    item = next(i for p in paid["properties"] for i in p["items"])
    assert set(item) == {"sku", "title", "category", "quantity", "price"}


def test_every_default_event_is_emitted_and_anonymous_facts_are_quarantined_with_a_reason(history):
    db, result = history
    names = set(events_table(db)["name"])
    assert names == {e.name for e in contract.EVENTS if e.enabled_by_default}
    held = events_table(db, table="events_quarantine")
    assert (held["reason"] == "no person: no customer_id and no resolvable email").sum() > 0
    # A range run reports the whole range on each partition's materialization.
    meta = next(e.materialization.metadata for e in result.get_asset_materialization_events())
    assert sum(meta["events_by_name"].value.values()) == len(events_table(db))
    assert meta["quarantined"].value == len(held)


def test_an_unknown_or_misspelled_event_name_fails_naming_it():
    with pytest.raises(contract.UnknownEventError, match=r"'Order Paid' is not in the contract; did you mean 'order_paid'"):
        build_events("Order Paid", pd.DataFrame(), pd.DataFrame(columns=["person_key", "cio_identifier_type", "cio_identifier"]))
    with pytest.raises(contract.UnknownEventError, match="'order_shipped' is not in the contract"):
        enabled_events(enable=("order_shipped",))


def test_an_event_over_customerio_size_limits_is_quarantined_before_any_sync():
    people = pd.DataFrame({"person_key": ["cus_1"], "cio_identifier_type": ["id"], "cio_identifier": ["cus_1"]})
    facts = pd.DataFrame({"source_key": ["o1"], "occurred_at": [AS_OF], "person_key": ["cus_1"], "order_id": ["o1"],
                          "order_total": [10.0], "currency": ["USD"], "discount_code": [None], "is_first_order": [True]})
    items = pd.DataFrame({"source_key": ["o1"] * 400, "sku": [f"SKU-{i}" for i in range(400)], "title": ["x" * 60] * 400,
                          "category": ["coffee"] * 400, "quantity": [1] * 400, "price": [1.0] * 400})
    built = build_events("order_paid", facts, people, items)
    assert built.events.empty
    assert "over Customer.io's limit" in built.quarantine["reason"].iloc[0]


def test_the_events_checks_fail_on_a_bad_id_a_duplicate_or_an_unknown_name():
    from pg2cio_assets.events import check_events

    good = ulid.event_ulid(AS_OF, "order_paid", "o1")
    events = pd.DataFrame({"event_id": [good, good, "nope"], "name": ["order_paid", "order_paid", "Order Paid"],
                           "person_key": "c", "cio_identifier_type": "id", "cio_identifier": "c",
                           "occurred_at": [AS_OF] * 3, "timestamp": [int(AS_OF.timestamp())] * 3, "source_key": "o1",
                           "data_bytes": [10] * 3, "properties": [{"order_id": "o1"}] * 3})
    checks = check_events(events, AS_OF - timedelta(days=1), AS_OF + timedelta(days=1))
    assert not checks["ids_unique_and_valid_ulids"][0]
    assert checks["names_in_contract"] == (False, {"unknown_names": "Order Paid"})
    assert checks["timestamps_inside_partition_window"][0]

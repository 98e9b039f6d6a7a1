"""Identity resolution and person attributes on the generated store, one edge case at a time."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pandas as pd
import psycopg
import pytest
from psycopg import sql

from pg2cio_assets import contract
from pg2cio_assets.assets.identity import identity_assets, person_attributes
from pg2cio_assets.extract import extract_window
from pg2cio_assets.identity import REASON_NO_EMAIL, normalize_email, resolve_identities
from pg2cio_assets.attributes import type_failures
from pg2cio_assets.pg import connect
from pg2cio_assets.resources import PostgresResource

from .conftest import AS_OF


def extract_everything(db) -> None:
    """Fill every extract table with the whole history (what a single-run backfill does)."""
    with connect(db.url, "source") as src, connect(db.url, "state") as dst:
        for rel in contract.SOURCE_RELATIONS:
            extract_window(src, dst, rel, source_schema=db.source_schema, state_schema=db.state_schema,
                           start=datetime(2020, 1, 1, tzinfo=timezone.utc), end=AS_OF + timedelta(days=1))


def resolve(db) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [identity_assets, person_attributes],
        resources={"state": PostgresResource(role="state", url=db.url, schema_name=db.state_schema)},
        run_config={"ops": {"person_attributes": {"config": {"as_of": AS_OF.isoformat()}}}},
        instance=dg.DagsterInstance.ephemeral(),
    )


@pytest.fixture
def resolved(seeded):
    extract_everything(seeded)
    result = resolve(seeded)
    assert result.success
    return seeded, result


def table(db, name: str) -> pd.DataFrame:
    with db.connect() as conn:
        cur = conn.execute(sql.SQL("SELECT * FROM {} ORDER BY 1").format(sql.Identifier(db.state_schema, name)))
        return pd.DataFrame.from_records(cur.fetchall(), columns=[d.name for d in cur.description])


def source_scalar(db, query: str, *params):
    with db.connect() as conn:
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(db.source_schema)))
        return conn.execute(query, params).fetchone()[0]


def test_guest_who_registers_later_is_one_person_with_one_merge(resolved):
    db, _ = resolved
    people, merges, imap = table(db, "people"), table(db, "identity_merges"), table(db, "identity_map")
    for customer_id in db.store.manifest.ids["registered_later"]:
        mine = people[people["customer_id"] == customer_id]
        assert len(mine) == 1
        email = mine["email"].iloc[0]
        assert not ((people["person_type"] == "guest") & (people["email"] == email)).any()
        assert merges[merges["primary_id"] == customer_id]["secondary_email"].tolist() == [email]
        assert set(imap[imap["normalized"] == email]["person_key"]) == {customer_id}


def test_orders_under_an_old_email_count_for_the_account(resolved):
    db, _ = resolved
    attrs = table(db, "person_attributes").set_index("person_key")
    for customer_id in db.store.manifest.ids["email_changed"]:
        old = source_scalar(db, "SELECT old_email FROM customer_email_changes WHERE customer_id = %s", customer_id)
        expected_count, expected_ltv = (
            source_scalar(db, f"SELECT {agg} FROM orders o WHERE paid_at IS NOT NULL AND canceled_at IS NULL "
                              "AND (customer_id = %s OR (customer_id IS NULL AND lower(btrim(email)) = %s))", customer_id, old)
            for agg in ("count(*)", "coalesce(sum(order_total - coalesce((SELECT sum(amount) FROM refunds r WHERE r.order_id = o.order_id), 0)), 0)")
        )
        guest_orders = source_scalar(db, "SELECT count(*) FROM orders WHERE customer_id IS NULL AND lower(btrim(email)) = %s", old)
        assert guest_orders > 0
        assert attrs.at[customer_id, "orders_count"] == expected_count
        assert attrs.at[customer_id, "lifetime_value"] == pytest.approx(float(expected_ltv), abs=0.005)


def test_case_and_space_variants_of_an_email_resolve_to_one_person(resolved):
    db, _ = resolved
    people, imap = table(db, "people"), table(db, "identity_map")
    for customer_id in db.store.manifest.ids["case_variant_emails"]:
        email = people.loc[people["customer_id"] == customer_id, "email"].iloc[0]
        variants = imap[(imap["identifier_type"] == "email") & (imap["normalized"] == email)]
        assert len(variants) >= 2, "the account's email and at least one variant as typed"
        assert any(v != v.strip() or v != v.lower() for v in variants["identifier"])
        assert set(variants["person_key"]) == {customer_id}
        assert (people["email"] == email).sum() == 1


def test_orders_without_customer_id_or_email_are_quarantined_with_a_reason(resolved):
    db, result = resolved
    q = table(db, "identity_quarantine")
    orders = q[q["relation"] == "orders"]
    assert (orders["reason"] == REASON_NO_EMAIL).sum() == db.store.manifest.plan.unattributable_orders
    assert q["reason"].notna().all()
    meta = next(e.materialization.metadata for e in result.get_asset_materialization_events()
                if e.asset_key == dg.AssetKey("identity_map"))
    assert meta["quarantined_rows"].value == len(q) > 0
    # Anonymous carts are normal shopping: counted, not quarantined.
    anonymous = source_scalar(db, "SELECT count(*) FROM carts WHERE customer_id IS NULL AND email IS NULL")
    assert meta["anonymous_carts"].value == anonymous > 0
    assert not (q["relation"] == "carts").any()


def test_a_subscription_of_an_unknown_customer_is_quarantined_not_lost(resolved):
    db, _ = resolved
    with db.connect() as conn:
        conn.execute(sql.SQL("INSERT INTO {} SELECT 'sub_orphan', 'cus_gone', sku, interval_days, status, created_at, "
                             "canceled_at, updated_at, _partition_at, _extracted_at, _run_id FROM {} LIMIT 1").format(
            sql.Identifier(db.state_schema, "subscriptions_extract"), sql.Identifier(db.state_schema, "subscriptions_extract")))
    assert resolve(db).success
    q = table(db, "identity_quarantine")
    assert q[q["row_key"] == "sub_orphan"]["reason"].tolist() == ["customer_id cus_gone is not among the customers"]


def test_a_view_built_on_people_survives_a_rerun(resolved):
    db, _ = resolved
    with db.connect() as conn:
        conn.execute(sql.SQL("CREATE VIEW {} AS SELECT person_key, email FROM {}").format(
            sql.Identifier(db.state_schema, "my_people"), sql.Identifier(db.state_schema, "people")))
    assert resolve(db).success
    assert len(table(db, "my_people")) == len(table(db, "people")) > 0


def test_lapse_flags_at_the_60_day_boundary(resolved):
    db, _ = resolved
    attrs = table(db, "person_attributes").set_index("person_key")
    for customer_id in db.store.manifest.ids["lapsed_61d"]:
        assert attrs.at[customer_id, "is_lapsed_60d"] and not attrs.at[customer_id, "is_lapsed_90d"]
        assert attrs.at[customer_id, "last_order_at"] == int((AS_OF - timedelta(days=61)).timestamp())
    for customer_id in db.store.manifest.ids["active_59d"]:
        assert not attrs.at[customer_id, "is_lapsed_60d"] and attrs.at[customer_id, "is_lapsed_30d"]
        assert attrs.at[customer_id, "last_order_at"] == int((AS_OF - timedelta(days=59)).timestamp())
    accounts = attrs[attrs["person_type"] == "account"]
    assert accounts["is_lapsed_60d"].sum() == db.store.manifest.lapsed_over_60d


def test_two_accounts_sharing_an_email_stay_two_flagged_people(resolved):
    db, result = resolved
    people = table(db, "people").set_index("person_key")
    pair = db.store.manifest.ids["shared_email_pairs"][:2]
    assert people.loc[pair, "email"].nunique() == 1
    assert people.loc[pair, "email_shared"].all()
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"one_person_per_customer_id": True, "no_email_on_two_people_unless_flagged": True,
                      "attributes_have_contract_types": True, "no_negative_counts": True}


def test_guests_become_one_person_each_identified_by_email(resolved):
    db, _ = resolved
    people = table(db, "people")
    guests = people[people["person_type"] == "guest"]
    assert len(guests) == db.store.manifest.plan.guest_people
    assert (guests["cio_identifier_type"] == "email").all() and (guests["cio_identifier"] == guests["email"]).all()
    accounts = people[people["person_type"] == "account"]
    assert (accounts["cio_identifier"] == accounts["customer_id"]).all()


def test_ltv_is_in_the_store_currency_and_other_currencies_are_flagged(resolved):
    db, _ = resolved
    attrs = table(db, "person_attributes").set_index("person_key")
    flagged = attrs[attrs["other_currency_orders_count"] > 0]
    assert len(flagged) == db.store.manifest.plan.foreign_currency_orders
    for customer_id, row in flagged.iterrows():
        usd = source_scalar(db, "SELECT coalesce(sum(order_total), 0) FROM orders WHERE customer_id = %s AND currency = 'USD' "
                                "AND paid_at IS NOT NULL AND canceled_at IS NULL", customer_id)
        refunds = source_scalar(db, "SELECT coalesce(sum(r.amount), 0) FROM refunds r JOIN orders o USING (order_id) WHERE "
                                    "o.customer_id = %s AND o.currency = 'USD' AND o.paid_at IS NOT NULL AND o.canceled_at IS NULL", customer_id)
        assert row["lifetime_value"] == pytest.approx(float(usd - refunds), abs=0.005)


def test_attribute_types_are_what_customerio_needs(resolved):
    db, _ = resolved
    with db.connect() as conn:
        types = dict(conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = 'person_attributes'",
            (db.state_schema,)).fetchall())
    for attr in contract.PERSON_ATTRIBUTES:
        expected = {"timestamp": "bigint", "integer": "bigint", "money": "double precision", "boolean": "boolean", "string": "text"}[attr.kind]
        assert types[attr.name] == expected, attr.name


def test_rerunning_resolution_gives_identical_keys(resolved):
    db, _ = resolved
    before = {n: table(db, n) for n in ("people", "identity_map", "identity_merges")}
    assert resolve(db).success
    for name, df in before.items():
        pd.testing.assert_frame_equal(table(db, name), df, obj=name)


def test_a_value_that_cannot_take_its_contract_type_is_named_with_its_person():
    row = {a.name: (0 if a.kind in ("integer", "timestamp") else False if a.kind == "boolean" else 0.0 if a.kind == "money" else "x")
           for a in contract.PERSON_ATTRIBUTES}
    df = pd.DataFrame([{**row, "person_key": "cus_1", "person_type": "account", "cio_identifier_type": "id", "cio_identifier": "cus_1"},
                       {**row, "person_key": "cus_2", "person_type": "account", "cio_identifier_type": "id", "cio_identifier": "cus_2"}])
    for a in contract.PERSON_ATTRIBUTES:
        if a.kind == "timestamp":
            df[a.name] = df[a.name].astype("Int64")
    df.loc[1, "last_order_at"] = 1_764_000_000_000  # milliseconds: fails every "within the last N days" segment
    df.loc[1, "lifetime_value"] = 10.005
    failures = type_failures(df)
    assert set(zip(failures["person_key"], failures["attribute"])) == {("cus_2", "last_order_at"), ("cus_2", "lifetime_value")}


def test_normalize_email_trims_lowercases_and_refuses_non_addresses():
    assert normalize_email("  Alice.Smith@Example.COM ") == "alice.smith@example.com"
    assert normalize_email("n/a") is None and normalize_email("") is None and normalize_email(None) is None


def test_an_old_email_now_held_by_another_account_belongs_to_the_current_holder():
    t = pd.Timestamp("2026-01-01", tz="UTC")
    accounts = pd.DataFrame({"customer_id": ["a", "b"], "email": ["a@x.io", "shared@x.io"], "first_name": None, "last_name": None,
                             "email_consent": False, "sms_consent": False, "created_at": t, "deleted_at": pd.NaT})
    changes = pd.DataFrame({"customer_id": ["a"], "old_email": ["Shared@x.io"], "new_email": ["a@x.io"], "changed_at": t})
    guests = pd.DataFrame({"email": [" SHARED@x.io"], "first_seen_at": [t]})
    ids = resolve_identities(accounts, changes, guests)
    routed = ids.identity_map.set_index("identifier").loc[" SHARED@x.io"]
    assert (routed["person_key"], routed["rule"]) == ("b", "current_email")


def test_one_run_over_a_partition_range_takes_extracts_through_identity_attributes_and_events(seeded):
    from pg2cio_assets.assets.events import build_events_asset
    from pg2cio_assets.assets.extract import build_extract_assets
    from pg2cio_assets.partitions import daily_partitions

    daily = daily_partitions("2024-01-01")
    assets = [*build_extract_assets(daily, seeded.state_schema), identity_assets, person_attributes,
              build_events_asset(daily, (), ())]
    result = dg.materialize(
        assets,
        resources={
            "source": PostgresResource(url=seeded.url, schema_name=seeded.source_schema),
            "state": PostgresResource(role="state", url=seeded.url, schema_name=seeded.state_schema),
        },
        tags={"dagster/asset_partition_range_start": "2026-11-20", "dagster/asset_partition_range_end": "2026-11-22"},
        run_config={"ops": {"person_attributes": {"config": {"as_of": AS_OF.isoformat()}}}},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    done = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert {"orders_extract", "identity_map", "people", "identity_merges", "person_attributes", "events"} <= done
    assert all(c.passed for c in result.get_asset_check_evaluations())
    people = table(seeded, "people")
    with seeded.connect() as conn:
        updated_in_range = {r[0] for r in conn.execute(sql.SQL(
            "SELECT customer_id FROM {} WHERE updated_at >= '2026-11-20' AND updated_at < '2026-11-23'"
        ).format(sql.Identifier(seeded.source_schema, "customers"))).fetchall()}
    assert set(people.loc[people["person_type"] == "account", "customer_id"]) == updated_in_range
    assert len(table(seeded, "person_attributes")) == len(people)


def test_a_guest_email_an_account_takes_over_later_is_merged_into_it():
    jan, feb, mar = (pd.Timestamp(f"2026-0{m}-01", tz="UTC") for m in (1, 2, 3))
    accounts = pd.DataFrame({"customer_id": ["a"], "email": ["x@shop.io"], "first_name": None, "last_name": None,
                             "email_consent": False, "sms_consent": False, "created_at": [jan], "deleted_at": pd.NaT})
    changes = pd.DataFrame({"customer_id": ["a"], "old_email": ["y@shop.io"], "new_email": ["x@shop.io"], "changed_at": [mar]})
    before = pd.DataFrame({"email": ["X@shop.io "], "first_seen_at": [feb]})  # guest checkout before the change
    ids = resolve_identities(accounts, changes, before)
    assert ids.merges[["primary_id", "secondary_email"]].values.tolist() == [["a", "x@shop.io"]]
    assert (ids.people["person_type"] == "account").all()
    after = pd.DataFrame({"email": ["x@shop.io"], "first_seen_at": [mar + pd.Timedelta(days=1)]})
    assert resolve_identities(accounts, changes, after).merges.empty
    original = pd.DataFrame({"email": ["y@shop.io"], "first_seen_at": [feb]})  # the first email, held since January
    assert resolve_identities(accounts, changes, original).merges.empty


def test_a_table_that_fails_its_checks_is_not_published(pg_url, new_schema):
    from pg2cio_assets.state import publish

    schema = new_schema("pub")
    cols = [("person_key", "text"), ("orders_count", "bigint")]
    with psycopg.connect(pg_url) as conn:
        good = pd.DataFrame({"person_key": ["a"], "orders_count": [2]})
        assert publish(conn, schema, "person_attributes", good, cols, passed=True) == f"{schema}.person_attributes"
        bad = pd.DataFrame({"person_key": ["a"], "orders_count": [-1]})
        assert publish(conn, schema, "person_attributes", bad, cols, passed=False) == f"{schema}.person_attributes_rejected"
        live = conn.execute(sql.SQL("SELECT orders_count FROM {}").format(sql.Identifier(schema, "person_attributes"))).fetchall()
        rejected = conn.execute(sql.SQL("SELECT orders_count FROM {}").format(
            sql.Identifier(schema, "person_attributes_rejected"))).fetchall()
    assert live == [(2,)] and rejected == [(-1,)]


def test_an_identity_frame_that_breaks_its_schema_is_named():
    from pg2cio_assets.identity import PEOPLE_TABLE, SCHEMAS

    people = pd.DataFrame({c: ["x", "x"] for c, _ in PEOPLE_TABLE})  # two people with one person_key
    for c in ("email_consent", "sms_consent", "email_shared"):
        people[c] = False
    for c in ("created_at", "deleted_at"):
        people[c] = pd.Timestamp("2026-01-01", tz="UTC")
    with pytest.raises(Exception, match="person_key"):
        SCHEMAS["people"].validate(people, lazy=True)

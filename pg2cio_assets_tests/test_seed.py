"""The demo store generator: deterministic, and every planned edge case present in exactly its number."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest

from pg2cio_assets import contract
from pg2cio_assets.pg import check_source
from pg2cio_assets.seed import QUICK_CHECKOUT_SECONDS, EdgeCasePlan, generate_store

from .conftest import AS_OF, STORE_CUSTOMERS, STORE_SEED


def test_same_seed_gives_identical_store_and_another_seed_does_not(store):
    again = generate_store(STORE_CUSTOMERS, seed=STORE_SEED, as_of=AS_OF)
    for name, df in store.tables.items():
        pd.testing.assert_frame_equal(df, again.tables[name], obj=name)
    assert again.manifest == store.manifest
    other = generate_store(STORE_CUSTOMERS, seed=STORE_SEED + 1, as_of=AS_OF)
    assert not other.tables["orders"].equals(store.tables["orders"])


def test_too_small_a_store_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least 100 customers"):
        EdgeCasePlan.for_customers(20)


def _one(conn, query: str, *params):
    return conn.execute(query, params).fetchone()[0]


def test_loaded_store_satisfies_the_contract_and_the_manifest_row_counts(seeded):
    with seeded.connect() as conn:
        check_source(conn, seeded.source_schema, list(contract.SOURCE_RELATIONS))
        conn.execute(f"SET search_path = {seeded.source_schema}")
        for rel in contract.SOURCE_RELATIONS:
            assert _one(conn, f"SELECT count(*) FROM {rel.name}") == seeded.store.manifest.rows[rel.name] > 0, rel.name


def test_store_covers_about_two_years_up_to_as_of(seeded):
    with seeded.connect() as conn:
        conn.execute(f"SET search_path = {seeded.source_schema}")
        first, last = conn.execute("SELECT min(created_at), max(updated_at) FROM orders").fetchone()
        assert AS_OF - timedelta(days=730 + 90) <= first < AS_OF - timedelta(days=700)
        assert AS_OF - timedelta(days=2) < last <= AS_OF
        for rel in contract.SOURCE_RELATIONS:
            if rel.parent is None:
                latest = _one(conn, f"SELECT max({rel.partition_column}) FROM {rel.name}")
                assert latest <= AS_OF, f"{rel.name} has rows after as_of"


def test_each_edge_case_is_present_in_its_planned_number(seeded):
    plan = seeded.store.manifest.plan
    m = seeded.store.manifest
    norm = "lower(btrim({}))"
    with seeded.connect() as conn:
        conn.execute(f"SET search_path = {seeded.source_schema}")
        known = (
            "SELECT lower(btrim(email)) AS e FROM customers WHERE email IS NOT NULL "
            "UNION SELECT lower(btrim(old_email)) FROM customer_email_changes"
        )
        counts = {
            "guest_people": _one(
                conn,
                f"SELECT count(DISTINCT {norm.format('o.email')}) FROM orders o "
                f"WHERE o.customer_id IS NULL AND o.email IS NOT NULL AND {norm.format('o.email')} NOT IN ({known})",
            ),
            "registered_later": _one(
                conn,
                "SELECT count(DISTINCT c.customer_id) FROM customers c JOIN orders o "
                "ON o.customer_id IS NULL AND lower(btrim(o.email)) = lower(btrim(c.email)) AND o.created_at < c.created_at",
            ),
            "email_changed": _one(
                conn,
                "SELECT count(DISTINCT ch.customer_id) FROM customer_email_changes ch JOIN orders o "
                "ON o.customer_id IS NULL AND lower(btrim(o.email)) = lower(btrim(ch.old_email))",
            ),
            "case_variant_emails": _one(
                conn,
                "SELECT count(DISTINCT c.customer_id) FROM customers c JOIN orders o ON o.customer_id IS NULL "
                "AND o.email <> c.email AND lower(btrim(o.email)) = lower(btrim(c.email)) AND o.created_at > c.created_at",
            ),
            "shared_email_pairs": _one(
                conn,
                "SELECT count(*) FROM (SELECT lower(btrim(email)) FROM customers WHERE email IS NOT NULL "
                "GROUP BY 1 HAVING count(*) = 2) s",
            ),
            "unattributable_orders": _one(conn, "SELECT count(*) FROM orders WHERE customer_id IS NULL AND email IS NULL"),
            "quick_checkouts": _one(
                conn,
                "SELECT count(*) FROM orders o JOIN carts c USING (cart_id) "
                "WHERE o.paid_at - c.checkout_started_at = make_interval(secs => %s)",
                QUICK_CHECKOUT_SECONDS,
            ),
            "erased_customers": _one(conn, "SELECT count(*) FROM customers WHERE deleted_at IS NOT NULL"),
            "foreign_currency_orders": _one(conn, "SELECT count(*) FROM orders WHERE currency <> 'USD'"),
        }
        last_paid = (
            "SELECT customer_id, max(paid_at) AS last FROM orders "
            "WHERE customer_id IS NOT NULL AND paid_at IS NOT NULL AND canceled_at IS NULL GROUP BY 1"
        )
        for days, field in ((61, "lapsed_61d"), (59, "active_59d")):
            counts[field] = _one(conn, f"SELECT count(*) FROM ({last_paid}) l WHERE l.last = %s", AS_OF - timedelta(days=days))
        lapsed = _one(conn, f"SELECT count(*) FROM ({last_paid}) l WHERE l.last < %s", AS_OF - timedelta(days=60))
        canceled = _one(conn, "SELECT count(*) FROM orders WHERE canceled_at IS NOT NULL")
        converted, abandoned = conn.execute(
            "SELECT count(*) FILTER (WHERE o.order_id IS NOT NULL), count(*) FILTER (WHERE o.order_id IS NULL) "
            "FROM carts c LEFT JOIN orders o USING (cart_id)"
        ).fetchone()
        refunded_canceled = _one(
            conn, "SELECT count(*) FROM orders o WHERE canceled_at IS NOT NULL AND paid_at IS NOT NULL "
            "AND EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.order_id)"
        )
        paid_canceled = _one(conn, "SELECT count(*) FROM orders WHERE canceled_at IS NOT NULL AND paid_at IS NOT NULL")

    assert counts == {k: getattr(plan, k) for k in counts}
    assert all(v > 0 for v in counts.values())
    assert lapsed == m.lapsed_over_60d > 0
    assert canceled == m.canceled_orders > 0
    assert abandoned > converted > 0  # most carts are abandoned
    assert refunded_canceled == paid_canceled > 0  # money taken on a canceled order is refunded
    for name in ("lapsed_61d", "active_59d", "registered_later", "email_changed"):
        assert len(m.ids[name]) == getattr(plan, name)

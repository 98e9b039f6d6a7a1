"""Source extracts on real Postgres: exact windows, replace-not-append, ranges, and loud failures."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from psycopg import sql

from pg2cio_assets import contract
from pg2cio_assets.assets.extract import WINDOW_CHECK, build_extract_assets
from pg2cio_assets.partitions import daily_partitions
from pg2cio_assets.pg import DatabaseUnavailable
from pg2cio_assets.resources import PostgresResource
from pg2cio_assets.settings import ConfigError


DAY = timedelta(days=1)
D1 = "2026-11-20"


def _day(key: str) -> datetime:
    return datetime.fromisoformat(key).replace(tzinfo=timezone.utc)


def run_extracts(db, *, partition=None, first=None, last=None, relations=None, source_schema=None, state_schema=None,
                 raise_on_error=True):
    state_schema = state_schema or db.state_schema
    assets = build_extract_assets(daily_partitions("2024-01-01"), state_schema)
    resources = {
        "source": PostgresResource(url=db.url, schema_name=source_schema or db.source_schema),
        "state": PostgresResource(role="state", url=db.url, schema_name=state_schema),
    }
    tags = {}
    if partition is None:
        tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
    selection = [f"{r}_extract" for r in relations] if relations else None
    return dg.materialize(
        assets, resources=resources, partition_key=partition, tags=tags, selection=selection,
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=raise_on_error,
    )


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """Every error message of the failed steps, with their causes."""
    texts = []
    for ev in result.all_events:
        if ev.is_step_failure:
            err = ev.step_failure_data.error
            while err is not None:
                texts.append(err.message)
                err = err.cause
    assert texts, "expected a failed step"
    return "\n".join(texts)


def rows(db, schema: str, table: str, columns, where: str = "TRUE", params=()):
    with db.connect() as conn:
        q = sql.SQL("SELECT {} FROM {} WHERE " + where + " ORDER BY 1, 2").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(schema, table)
        )
        return conn.execute(q, params).fetchall()


def source_window(db, rel: contract.Relation, start: datetime, end: datetime):
    """The rows of the window, straight from the source with plain SQL."""
    with db.connect() as conn:
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(db.source_schema)))
        cols = ", ".join(f"r.{c}" for c in rel.column_names)
        if rel.parent:
            join = " AND ".join(f"p.{c} = r.{c}" for c in rel.parent.columns)
            q = f"SELECT {cols} FROM {rel.name} r JOIN {rel.parent.relation} p ON {join} WHERE p.updated_at >= %s AND p.updated_at < %s"
        else:
            q = f"SELECT {cols} FROM {rel.name} r WHERE r.{rel.partition_column} >= %s AND r.{rel.partition_column} < %s"
        return sorted(conn.execute(q + " ORDER BY 1, 2", (start, end)).fetchall())


def state_rows(db, rel: contract.Relation, schema=None):
    return sorted(rows(db, schema or db.state_schema, f"{rel.name}_extract", rel.column_names))


def test_a_partition_holds_exactly_the_rows_sql_finds_in_that_window(seeded):
    result = run_extracts(seeded, partition=D1)
    by_key = {m.asset_key.path[-1]: m for m in (e.materialization for e in result.get_asset_materialization_events())}
    assert set(by_key) == {f"{r.name}_extract" for r in contract.SOURCE_RELATIONS}
    busy = 0
    for rel in contract.SOURCE_RELATIONS:
        expected = source_window(seeded, rel, _day(D1), _day(D1) + DAY)
        assert state_rows(seeded, rel) == expected, rel.name
        assert by_key[f"{rel.name}_extract"].metadata["rows_in_window"].value == len(expected)
        busy += bool(expected)
    assert busy >= 5, "the chosen day should have activity in most relations"
    checks = result.get_asset_check_evaluations()
    assert len(checks) == len(contract.SOURCE_RELATIONS)
    assert all(c.passed and c.check_name == WINDOW_CHECK for c in checks)


def test_rerunning_a_partition_replaces_it_instead_of_doubling_it(seeded):
    run_extracts(seeded, partition=D1)
    first = {r.name: state_rows(seeded, r) for r in contract.SOURCE_RELATIONS}
    result = run_extracts(seeded, partition=D1)
    assert {r.name: state_rows(seeded, r) for r in contract.SOURCE_RELATIONS} == first
    orders = next(e.materialization for e in result.get_asset_materialization_events()
                  if e.materialization.asset_key.path[-1] == "orders_extract")
    assert orders.metadata["rows_replaced"].value == len(first["orders"]) > 0


def test_a_single_run_over_a_range_equals_the_union_of_its_daily_runs(seeded, new_schema):
    days = ["2026-11-18", "2026-11-19", "2026-11-20", "2026-11-21", "2026-11-22"]
    result = run_extracts(seeded, first=days[0], last=days[-1])
    # One run covering five partitions: every extract reports a materialization per day.
    partitions = {(e.asset_key.path[-1], e.partition) for e in result.get_asset_materialization_events()}
    assert len(partitions) == 5 * len(contract.SOURCE_RELATIONS)
    daily_schema = new_schema("daily")
    for d in days:
        run_extracts(seeded, partition=d, state_schema=daily_schema)
    for rel in contract.SOURCE_RELATIONS:
        ranged = state_rows(seeded, rel)
        assert ranged == state_rows(seeded, rel, daily_schema), rel.name
        assert ranged == source_window(seeded, rel, _day(days[0]), _day(days[-1]) + DAY), rel.name


def test_a_row_changed_later_moves_to_its_new_day_and_takes_its_items_with_it(seeded):
    d2 = "2026-11-25"
    run_extracts(seeded, partition=D1, relations=["carts", "cart_items", "orders"])
    with seeded.connect() as conn:
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(seeded.source_schema)))
        order_id = conn.execute(
            "SELECT order_id FROM orders WHERE updated_at >= %s AND updated_at < %s ORDER BY order_id LIMIT 1",
            (_day(D1), _day(D1) + DAY),
        ).fetchone()[0]
        conn.execute("UPDATE orders SET order_total = 1.23, updated_at = %s WHERE order_id = %s", (_day(d2) + timedelta(hours=3), order_id))
        cart_id, n_items = conn.execute(
            "SELECT c.cart_id, count(*) FROM carts c JOIN cart_items i USING (cart_id) "
            "WHERE c.updated_at >= %s AND c.updated_at < %s GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT 1",
            (_day(D1), _day(D1) + DAY),
        ).fetchone()
        removed = conn.execute("DELETE FROM cart_items WHERE cart_id = %s AND sku = (SELECT min(sku) FROM cart_items WHERE cart_id = %s) RETURNING sku", (cart_id, cart_id)).fetchone()[0]
        conn.execute("UPDATE carts SET updated_at = %s WHERE cart_id = %s", (_day(d2) + timedelta(hours=4), cart_id))

    run_extracts(seeded, partition=d2, relations=["carts", "cart_items", "orders"])
    copies = rows(seeded, seeded.state_schema, "orders_extract", ["order_id", "order_total"], "order_id = %s", (order_id,))
    assert [(o, str(t)) for o, t in copies] == [(order_id, "1.23")]
    items = rows(seeded, seeded.state_schema, "cart_items_extract", ["cart_id", "sku"], "cart_id = %s", (cart_id,))
    assert len(items) == n_items - 1 and removed not in {s for _, s in items}
    # Rerunning the old day afterwards does not bring the old copy back.
    run_extracts(seeded, partition=D1, relations=["carts", "cart_items", "orders"])
    assert len(rows(seeded, seeded.state_schema, "orders_extract", ["order_id", "order_total"], "order_id = %s", (order_id,))) == 1
    assert len(rows(seeded, seeded.state_schema, "cart_items_extract", ["cart_id", "sku"], "cart_id = %s", (cart_id,))) == n_items - 1


def test_a_row_breaking_the_schema_fails_naming_column_value_and_row_and_keeps_the_partition(seeded):
    run_extracts(seeded, partition=D1, relations=["carts"])
    before = state_rows(seeded, contract.relation("carts"))
    bad_cart = before[0][0]
    with seeded.connect() as conn:
        conn.execute(sql.SQL("UPDATE {}.carts SET currency = 'usd' WHERE cart_id = %s").format(sql.Identifier(seeded.source_schema)), (bad_cart,))
    result = run_extracts(seeded, partition=D1, relations=["carts"], raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert "carts" in text and "'currency'" in text and "'usd'" in text and bad_cart in text
    assert state_rows(seeded, contract.relation("carts")) == before


@pytest.fixture
def store_views(seeded, new_schema):
    """A store that exposes the contract as views over its own tables (here: the seeded ones)."""
    schema = new_schema("views")
    with seeded.connect() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for rel in contract.SOURCE_RELATIONS:
            conn.execute(sql.SQL("CREATE VIEW {} AS SELECT * FROM {}").format(
                sql.Identifier(schema, rel.name), sql.Identifier(seeded.source_schema, rel.name)))

    def replace(name: str, select: str) -> None:
        with seeded.connect() as conn:
            conn.execute(sql.SQL("DROP VIEW {}").format(sql.Identifier(schema, name)))
            if select:
                conn.execute(sql.SQL("CREATE VIEW {} AS ").format(sql.Identifier(schema, name)) + sql.SQL(select).format(src=sql.Identifier(seeded.source_schema)))

    replace.schema = schema
    return replace


def test_a_store_exposing_the_contract_as_views_extracts_the_same_rows(seeded, store_views, new_schema):
    run_extracts(seeded, partition=D1, source_schema=store_views.schema)
    via_tables = new_schema("tables")
    run_extracts(seeded, partition=D1, state_schema=via_tables)
    for rel in contract.SOURCE_RELATIONS:
        assert state_rows(seeded, rel) == state_rows(seeded, rel, via_tables), rel.name


def test_a_duplicate_key_fails_validation_naming_the_key_column_and_value(seeded, store_views):
    with seeded.connect() as conn:
        dup, updated = conn.execute(sql.SQL("SELECT customer_id, updated_at FROM {}.customers ORDER BY updated_at DESC LIMIT 1").format(
            sql.Identifier(seeded.source_schema))).fetchone()
    store_views("customers", "SELECT * FROM {src}.customers UNION ALL SELECT * FROM {src}.customers WHERE customer_id = " + repr(dup))
    result = run_extracts(seeded, partition=updated.date().isoformat(), relations=["customers"],
                          source_schema=store_views.schema, raise_on_error=False)
    text = failure_text(result)
    assert "customer_id" in text and "not unique" in text and dup in text


def test_a_null_in_a_required_column_fails_naming_column_and_row(seeded, store_views):
    store_views("products", "SELECT sku, CASE WHEN sku = 'SKU-0007' THEN NULL ELSE title END AS title, category, price, "
                "'2026-11-20 10:00+00'::timestamptz AS updated_at FROM {src}.products")
    result = run_extracts(seeded, partition=D1, relations=["products"], source_schema=store_views.schema, raise_on_error=False)
    text = failure_text(result)
    assert "'title' is NULL" in text and "SKU-0007" in text


def test_a_column_of_the_wrong_type_fails_naming_relation_column_and_fix(seeded, store_views):
    store_views("customers", "SELECT customer_id, email, phone, first_name, last_name, email_consent, sms_consent, "
                "created_at::text AS created_at, updated_at, deleted_at FROM {src}.customers")
    result = run_extracts(seeded, partition=D1, relations=["customers"], source_schema=store_views.schema, raise_on_error=False)
    text = failure_text(result)
    assert f"{store_views.schema}.customers.created_at is text" in text and "timestamptz" in text


def test_missing_relations_and_columns_fail_naming_each(seeded, store_views):
    store_views("refunds", "")
    store_views("products", "SELECT sku, title, price, updated_at FROM {src}.products")
    result = run_extracts(seeded, partition=D1, relations=["refunds", "products"], source_schema=store_views.schema, raise_on_error=False)
    text = failure_text(result)
    assert f"relation {store_views.schema}.refunds does not exist" in text
    assert f"{store_views.schema}.products has no column 'category'" in text


def test_a_missing_source_url_fails_saying_which_variable_to_set(seeded, monkeypatch):
    monkeypatch.delenv("PG2CIO_SOURCE_URL", raising=False)
    with pytest.raises(ConfigError, match="PG2CIO_SOURCE_URL is not set"):
        PostgresResource(role="source").connect()
    monkeypatch.delenv("PG2CIO_STATE_URL", raising=False)
    with pytest.raises(ConfigError, match=r"PG2CIO_STATE_URL \(or PG2CIO_SOURCE_URL\) is not set"):
        PostgresResource(role="state", url_env="PG2CIO_STATE_URL", fallback_env="PG2CIO_SOURCE_URL").connect()


def test_an_unreachable_database_is_named_without_its_password():
    with pytest.raises(DatabaseUnavailable) as err:
        PostgresResource(role="source", url="postgresql://shop:s3cret-pw@127.0.0.1:1/commerce").connect()
    message = str(err.value)
    assert "source database" in message and "127.0.0.1:1" in message
    assert "s3cret-pw" not in message and "shop:***@" in message



def test_the_first_partition_also_holds_every_older_row(seeded):
    # A deployment whose partitions start after most accounts were last touched still sees them all.
    assets = build_extract_assets(daily_partitions("2026-11-01"), seeded.state_schema)
    dg.materialize(
        assets, partition_key="2026-11-01", selection=["customers_extract"], instance=dg.DagsterInstance.ephemeral(),
        resources={"source": PostgresResource(url=seeded.url, schema_name=seeded.source_schema),
                   "state": PostgresResource(role="state", url=seeded.url, schema_name=seeded.state_schema)},
    )
    expected = source_window(seeded, contract.relation("customers"), datetime(1, 1, 1, tzinfo=timezone.utc), _day("2026-11-02"))
    assert state_rows(seeded, contract.relation("customers")) == expected
    assert len(expected) > 0.9 * seeded.store.manifest.rows["customers"]


def test_far_future_sentinels_and_exact_money_survive_and_infinity_is_named(seeded, store_views):
    store_views("orders", "SELECT order_id, cart_id, customer_id, email, currency, subtotal, discount_code, discount_total, "
                "CASE WHEN order_id = (SELECT min(order_id) FROM {src}.orders WHERE updated_at >= '2026-11-20' "
                "AND updated_at < '2026-11-21') THEN 12.345::numeric ELSE order_total END AS order_total, created_at, paid_at, "
                "fulfilled_at, coalesce(canceled_at, '9999-12-31 00:00+00') AS canceled_at, updated_at FROM {src}.orders")
    result = run_extracts(seeded, partition=D1, relations=["orders"], source_schema=store_views.schema)
    assert result.success
    with seeded.connect() as conn:
        kept = conn.execute(sql.SQL("SELECT count(*) FILTER (WHERE canceled_at = '9999-12-31 00:00+00'), "
                                    "count(*) FILTER (WHERE order_total = 12.345) FROM {}").format(
            sql.Identifier(seeded.state_schema, "orders_extract"))).fetchone()
    assert kept[0] > 0 and kept[1] == 1
    store_views("refunds", "SELECT refund_id, order_id, amount, CASE WHEN refund_id = (SELECT min(refund_id) FROM "
                "{src}.refunds) THEN '-infinity'::timestamptz ELSE refunded_at END AS refunded_at FROM {src}.refunds")
    bad = run_extracts(seeded, partition="2024-01-01", relations=["refunds"], source_schema=store_views.schema, raise_on_error=False)
    text = failure_text(bad)
    assert f"{store_views.schema}.refunds" in text and "cannot be read" in text


def test_a_keyword_dsn_or_malformed_url_never_shows_its_password():
    for url in ("host=127.0.0.1 port=1 user=shop password=s3cret-pw dbname=x", "mysql://shop:s3cret-pw@127.0.0.1:1/x"):
        with pytest.raises(DatabaseUnavailable) as err:
            PostgresResource(role="source", url=url).connect()
        assert "s3cret-pw" not in str(err.value) and "***" in str(err.value)

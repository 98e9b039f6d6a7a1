"""Person attributes: per-person aggregates in SQL, finished in pandas with the contract's types.

`aggregates_query` is the set-based part (it scales with history, so Postgres does it);
`build_person_attributes` is pure: it turns people + aggregates into one row per person with
every attribute in its Customer.io type (*_at as unix seconds, money rounded to cents).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pandas as pd
import pandera.pandas as pa
from psycopg import sql

from pg2cio_assets import contract
from pg2cio_assets.state import unix_seconds


KEY_COLUMNS = [("person_key", "text"), ("person_type", "text"), ("cio_identifier_type", "text"), ("cio_identifier", "text")]
EXTRA_COLUMNS = [("is_erased", "boolean"), ("email_shared", "boolean"), ("as_of", "timestamptz")]


def table_columns() -> list[tuple[str, str]]:
    return KEY_COLUMNS + [(a.name, contract.ATTRIBUTE_KINDS[a.kind].state_type) for a in contract.PERSON_ATTRIBUTES] + EXTRA_COLUMNS


def order_people_query(state_schema: str) -> sql.Composed:
    """Every order with the person it belongs to: its account, or the owner of its email."""
    return sql.SQL(
        """
        SELECT o.order_id, o.currency, o.order_total, o.paid_at, o.canceled_at,
               CASE WHEN o.customer_id IS NOT NULL THEN o.customer_id ELSE m.person_key END AS person_key
        FROM {orders} o
        LEFT JOIN {identity_map} m
          ON o.customer_id IS NULL AND m.identifier_type = 'email' AND m.identifier = o.email
        """
    ).format(orders=sql.Identifier(state_schema, "orders_extract"), identity_map=sql.Identifier(state_schema, "identity_map"))


def aggregates_query(state_schema: str) -> sql.Composed:
    """One row per person with orders or subscriptions; parameter %(currency)s is the store currency."""
    t = lambda name: sql.Identifier(state_schema, name)  # noqa: E731
    return sql.SQL(
        """
        WITH order_people AS ({order_people}),
        counted AS (
            SELECT * FROM order_people
            WHERE paid_at IS NOT NULL AND canceled_at IS NULL AND person_key IS NOT NULL
        ),
        refunded AS (SELECT order_id, sum(amount) AS amount FROM {refunds} GROUP BY order_id),
        totals AS (
            SELECT c.person_key,
                   count(*) AS orders_count,
                   coalesce(sum(c.order_total) FILTER (WHERE c.currency = %(currency)s), 0) AS paid_total,
                   coalesce(sum(r.amount) FILTER (WHERE c.currency = %(currency)s), 0) AS refunded_total,
                   count(*) FILTER (WHERE c.currency = %(currency)s) AS store_currency_orders,
                   count(*) FILTER (WHERE c.currency <> %(currency)s) AS other_currency_orders_count,
                   min(c.paid_at) AS first_order_at,
                   max(c.paid_at) AS last_order_at
            FROM counted c LEFT JOIN refunded r USING (order_id)
            GROUP BY c.person_key
        ),
        last_category AS (
            SELECT DISTINCT ON (c.person_key) c.person_key, i.category AS last_product_category
            FROM counted c JOIN {order_items} i USING (order_id)
            ORDER BY c.person_key, c.paid_at DESC, c.order_id DESC, i.line_no
        ),
        top_category AS (
            SELECT DISTINCT ON (person_key) person_key, category AS top_category
            FROM (
                SELECT c.person_key, i.category, sum(i.quantity) AS units
                FROM counted c JOIN {order_items} i USING (order_id)
                GROUP BY 1, 2
            ) u
            ORDER BY person_key, units DESC, category
        ),
        subs AS (
            SELECT customer_id AS person_key, count(*) FILTER (WHERE status = 'active') AS active_subscriptions_count
            FROM {subscriptions} GROUP BY customer_id
        )
        SELECT coalesce(t.person_key, s.person_key) AS person_key,
               t.orders_count, t.paid_total, t.refunded_total, t.store_currency_orders,
               t.other_currency_orders_count, t.first_order_at, t.last_order_at,
               l.last_product_category, tc.top_category, s.active_subscriptions_count
        FROM totals t
        FULL JOIN subs s USING (person_key)
        LEFT JOIN last_category l ON l.person_key = coalesce(t.person_key, s.person_key)
        LEFT JOIN top_category tc ON tc.person_key = coalesce(t.person_key, s.person_key)
        """
    ).format(
        order_people=order_people_query(state_schema),
        refunds=t("refunds_extract"),
        order_items=t("order_items_extract"),
        subscriptions=t("subscriptions_extract"),
    )


def build_person_attributes(people: pd.DataFrame, aggregates: pd.DataFrame, as_of: datetime) -> pd.DataFrame:
    """One row per person: identity columns, every contract attribute in its type, flags."""
    df = people.merge(aggregates, on="person_key", how="left")
    out = pd.DataFrame(
        {
            "person_key": df["person_key"],
            "person_type": df["person_type"],
            "cio_identifier_type": df["cio_identifier_type"],
            "cio_identifier": df["cio_identifier"],
            "email": df["email"],
            "first_name": df["first_name"],
            "last_name": df["last_name"],
            "created_at": unix_seconds(df["created_at"]),
            "email_consent": df["email_consent"].astype(bool),
            "sms_consent": df["sms_consent"].astype(bool),
        }
    )
    counts = lambda col: pd.to_numeric(df[col], errors="raise").fillna(0).astype("int64")  # noqa: E731
    out["orders_count"] = counts("orders_count")
    paid = pd.to_numeric(df["paid_total"]).fillna(0).astype(float)
    refunded = pd.to_numeric(df["refunded_total"]).fillna(0).astype(float)
    store_orders = counts("store_currency_orders")
    out["lifetime_value"] = (paid - refunded).round(2)
    out["average_order_value"] = (paid / store_orders.where(store_orders > 0)).round(2)
    out["first_order_at"] = unix_seconds(df["first_order_at"])
    out["last_order_at"] = unix_seconds(df["last_order_at"])
    out["last_product_category"] = df["last_product_category"]
    out["top_category"] = df["top_category"]
    last = pd.to_datetime(df["last_order_at"], utc=True)
    for days in contract.LAPSE_WINDOWS_DAYS:
        out[f"is_lapsed_{days}d"] = (last.notna() & (last < pd.Timestamp(as_of) - timedelta(days=days))).astype(bool)
    out["active_subscriptions_count"] = counts("active_subscriptions_count")
    out["has_active_subscription"] = out["active_subscriptions_count"] > 0
    out["other_currency_orders_count"] = counts("other_currency_orders_count")
    out["is_erased"] = df["deleted_at"].notna()
    out["email_shared"] = df["email_shared"].astype(bool)
    out["as_of"] = pd.Timestamp(as_of)
    ordered = [c for c, _ in table_columns()]
    return out[ordered].sort_values("person_key", ignore_index=True)


def _money_in_cents(series: pd.Series) -> pd.Series:
    return series.isna() | ((series * 100).round(6) % 1 == 0)


def attributes_schema() -> pa.DataFrameSchema:
    """Every attribute in its contract type; counts never negative; money in whole cents."""
    columns: dict[str, pa.Column] = {
        "person_key": pa.Column(str, unique=True),
        "person_type": pa.Column(str, pa.Check.isin(["account", "guest"])),
        "cio_identifier_type": pa.Column(str, pa.Check.isin(["id", "email"])),
        "cio_identifier": pa.Column(str),
    }
    for a in contract.PERSON_ATTRIBUTES:
        checks = []
        if a.kind == "integer":
            checks.append(pa.Check.ge(0, error="must not be negative"))
        if a.kind == "money":
            checks.append(pa.Check(_money_in_cents, element_wise=False, error="must be rounded to cents"))
        if a.kind == "timestamp":
            checks.append(pa.Check.ge(0, error="must be unix seconds"))
            checks.append(pa.Check.lt(10**10, error="must be unix seconds, not milliseconds"))
        dtype = str if a.kind == "string" else contract.ATTRIBUTE_KINDS[a.kind].pandas
        columns[a.name] = pa.Column(dtype, checks=checks, nullable=a.nullable)
    return pa.DataFrameSchema(columns, strict=False, name="person_attributes")


def type_failures(df: pd.DataFrame) -> pd.DataFrame:
    """(person_key, attribute, check, value) for every value that does not take its contract type."""
    try:
        attributes_schema().validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        fc = exc.failure_cases
        keys = df["person_key"]
        return pd.DataFrame(
            {
                "person_key": [keys.get(i) if pd.notna(i) else None for i in fc["index"]],
                "attribute": fc["column"],
                "check": fc["check"].astype(str),
                "value": fc["failure_case"].astype(str),
            }
        )
    return pd.DataFrame(columns=["person_key", "attribute", "check", "value"])

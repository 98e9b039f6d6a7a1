"""Identity and attribute assets: who each row belongs to, and what Customer.io should know of them.

Thin wiring: SQL reads the extract tables (set-based work stays in Postgres), the pure
functions in `pg2cio_assets.identity` / `pg2cio_assets.attributes` decide, and the results are
written back as tables in the state database.
"""

from datetime import datetime, timezone
from typing import Optional

import dagster as dg
import pandas as pd
from dagster import AssetExecutionContext
from psycopg import sql

from pg2cio_assets import attributes, contract, identity
from pg2cio_assets.resources import PostgresResource
from pg2cio_assets.state import read_frame, replace_table

IDENTITY_INPUTS = ["customers", "customer_email_changes", "orders", "carts"]
ATTRIBUTE_INPUTS = ["orders", "order_items", "refunds", "subscriptions"]

IDENTITY_MAP_TYPES = [("identifier_type", "text"), ("identifier", "text"), ("normalized", "text"),
                      ("person_key", "text"), ("rule", "text"), ("reason", "text")]
PEOPLE_TYPES = [("person_key", "text"), ("person_type", "text"), ("customer_id", "text"), ("email", "text"),
                ("cio_identifier_type", "text"), ("cio_identifier", "text"), ("first_name", "text"),
                ("last_name", "text"), ("email_consent", "boolean"), ("sms_consent", "boolean"),
                ("created_at", "timestamptz"), ("deleted_at", "timestamptz"), ("email_shared", "boolean")]
MERGE_TYPES = [("merge_id", "text"), ("primary_id", "text"), ("secondary_email", "text"),
               ("guest_first_seen_at", "timestamptz"), ("account_created_at", "timestamptz")]
QUARANTINE_TYPES = [("relation", "text"), ("row_key", "text"), ("email", "text"), ("reason", "text")]


def _extract_key(relation: str) -> dg.AssetKey:
    return dg.AssetKey(f"{relation}_extract")


def _identity_inputs(conn, schema: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    t = lambda name: sql.Identifier(schema, f"{name}_extract")  # noqa: E731
    accounts = read_frame(conn, sql.SQL(
        "SELECT customer_id, email, first_name, last_name, email_consent, sms_consent, created_at, deleted_at FROM {}"
    ).format(t("customers")))
    changes = read_frame(conn, sql.SQL("SELECT customer_id, old_email, new_email, changed_at FROM {}").format(t("customer_email_changes")))
    # Distinct emails on guest rows, as typed: the history is aggregated here, in Postgres.
    guests = read_frame(conn, sql.SQL(
        """
        SELECT email, min(created_at) AS first_seen_at FROM (
            SELECT email, created_at FROM {orders} WHERE customer_id IS NULL AND email IS NOT NULL
            UNION ALL
            SELECT email, created_at FROM {carts} WHERE customer_id IS NULL AND email IS NOT NULL
        ) g GROUP BY email
        """
    ).format(orders=t("orders"), carts=t("carts")))
    if guests.empty:
        guests = pd.DataFrame({"email": pd.Series(dtype=object), "first_seen_at": pd.Series(dtype="datetime64[ns, UTC]")})
    return accounts, changes, guests


def _quarantine_sql(schema: str) -> sql.Composed:
    """Guest rows no person owns, and rows naming a customer_id that is not an account."""
    t = lambda name: sql.Identifier(schema, name)  # noqa: E731
    return sql.SQL(
        """
        INSERT INTO {q} (relation, row_key, email, reason)
        SELECT 'orders', o.order_id, o.email, coalesce(m.reason, {no_email})
        FROM {orders} o LEFT JOIN {map} m ON m.identifier_type = 'email' AND m.identifier = o.email
        WHERE o.customer_id IS NULL AND m.person_key IS NULL
        UNION ALL
        SELECT 'carts', c.cart_id, c.email, coalesce(m.reason, {no_email})
        FROM {carts} c LEFT JOIN {map} m ON m.identifier_type = 'email' AND m.identifier = c.email
        WHERE c.customer_id IS NULL AND m.person_key IS NULL
        UNION ALL
        SELECT 'orders', o.order_id, o.email, 'customer_id ' || o.customer_id || ' is not among the customers'
        FROM {orders} o WHERE o.customer_id IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM {customers} c WHERE c.customer_id = o.customer_id)
        """
    ).format(
        q=t("identity_quarantine"), orders=t("orders_extract"), carts=t("carts_extract"),
        customers=t("customers_extract"), map=t("identity_map"), no_email=sql.Literal(identity.REASON_NO_EMAIL),
    )


def _markdown(df: pd.DataFrame, limit: int = 10) -> str:
    if df.empty:
        return "(none)"
    head = df.head(limit)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in head.itertuples(index=False)]
    return "\n".join(lines)


@dg.multi_asset(
    specs=[
        dg.AssetSpec("identity_map", group_name="identity", kinds={"postgres", "pandas"},
                     deps=[_extract_key(r) for r in IDENTITY_INPUTS],
                     description="Every customer_id and every email seen (as typed) -> the person it belongs to, "
                                 "with the rule that decided it, or the reason none does. Table pg2cio.identity_map; "
                                 "rows no person owns are listed in pg2cio.identity_quarantine."),
        dg.AssetSpec("people", group_name="identity", kinds={"postgres", "pandas"},
                     deps=[_extract_key(r) for r in IDENTITY_INPUTS],
                     description="One row per real person: each account (Customer.io `id` = customer_id) and each "
                                 "guest email no account claims (identified by `email`). Table pg2cio.people."),
        dg.AssetSpec("identity_merges", group_name="identity", kinds={"postgres", "pandas"},
                     deps=[_extract_key(r) for r in IDENTITY_INPUTS],
                     description="Guest profiles to fold into the account that registered later: primary id = "
                                 "customer_id, secondary email. The sync sends each once. Table pg2cio.identity_merges."),
    ],
    check_specs=[
        dg.AssetCheckSpec("one_person_per_customer_id", asset="people", blocking=True,
                          description="No customer_id belongs to two people."),
        dg.AssetCheckSpec("no_email_on_two_people_unless_flagged", asset="people", blocking=True,
                          description="A normalized email is on one person, unless the accounts sharing it are flagged."),
    ],
)
def identity_assets(context: AssetExecutionContext, state: PostgresResource):
    schema = state.schema_name
    with state.connect() as conn:
        accounts, changes, guests = _identity_inputs(conn, schema)
        context.log.info(f"resolving {len(accounts):,} accounts, {len(changes):,} email changes, "
                         f"{len(guests):,} distinct guest emails")
        ids = identity.resolve_identities(accounts, changes, guests)
        with conn.transaction():
            replace_table(conn, schema, "identity_map", ids.identity_map, IDENTITY_MAP_TYPES,
                          unique=("identifier_type", "identifier"), indexes=[("person_key",)])
            replace_table(conn, schema, "people", ids.people, PEOPLE_TYPES, unique=("person_key",), indexes=[("email",)])
            replace_table(conn, schema, "identity_merges", ids.merges, MERGE_TYPES, unique=("merge_id",))
            replace_table(conn, schema, "identity_quarantine", pd.DataFrame(columns=[c for c, _ in QUARANTINE_TYPES]),
                          QUARANTINE_TYPES, indexes=[("relation", "row_key")])
            conn.execute(_quarantine_sql(schema))
            quarantine = read_frame(conn, sql.SQL(
                "SELECT relation, reason, count(*) AS rows FROM {} GROUP BY 1, 2 ORDER BY 3 DESC"
            ).format(sql.Identifier(schema, "identity_quarantine")))
    counts = ids.counts()
    quarantined = int(quarantine["rows"].sum()) if len(quarantine) else 0
    if quarantined:
        context.log.warning(f"{quarantined:,} rows belong to no person and were quarantined:\n{_markdown(quarantine)}")
    context.log.info(f"identity: {counts}")

    people = ids.people
    cust = people["customer_id"].dropna()
    dup_customers = cust[cust.duplicated()].unique().tolist()
    emails = people.dropna(subset=["email"])
    clash = emails.groupby("email").filter(lambda g: len(g) > 1 and not g["email_shared"].all())
    yield dg.MaterializeResult(asset_key="identity_map", metadata={
        "dagster/row_count": len(ids.identity_map),
        "unresolved_emails": counts["unresolved_emails"],
        "quarantined_rows": quarantined,
        "quarantine_by_reason": dg.MetadataValue.md(_markdown(quarantine)),
    })
    yield dg.MaterializeResult(asset_key="people", metadata={
        "dagster/row_count": counts["people"], "accounts": counts["accounts"], "guests": counts["guests"],
        "accounts_sharing_an_email": counts["accounts_sharing_an_email"],
    })
    yield dg.MaterializeResult(asset_key="identity_merges", metadata={"dagster/row_count": counts["merges"]})
    yield dg.AssetCheckResult(asset_key="people", check_name="one_person_per_customer_id", passed=not dup_customers,
                              metadata={"duplicated_customer_ids": dg.MetadataValue.json(dup_customers[:20])})
    yield dg.AssetCheckResult(asset_key="people", check_name="no_email_on_two_people_unless_flagged", passed=clash.empty,
                              metadata={"unflagged_shared_emails": int(clash["email"].nunique())})


class AttributesConfig(dg.Config):
    as_of: Optional[str] = None  # ISO-8601 instant the lapse flags are evaluated at; default: now


TYPES_CHECK = "attributes_have_contract_types"
COUNTS_CHECK = "no_negative_counts"


@dg.asset(
    group_name="attributes",
    kinds={"postgres", "pandas"},
    deps=["people", "identity_map", *[_extract_key(r) for r in ATTRIBUTE_INPUTS]],
    check_specs=[
        dg.AssetCheckSpec(TYPES_CHECK, asset="person_attributes", blocking=True,
                          description="Every attribute takes its contract type (*_at unix seconds, money in cents, ...)."),
        dg.AssetCheckSpec(COUNTS_CHECK, asset="person_attributes", blocking=True,
                          description="No count attribute is negative."),
    ],
)
def person_attributes(context: AssetExecutionContext, config: AttributesConfig, state: PostgresResource) -> dg.MaterializeResult:
    """One row per person with every contract attribute (LTV, counts, first/last order, categories,
    lapse flags, consents, subscriptions) in its Customer.io type. Guest orders that resolve to
    an account count for that account. Table pg2cio.person_attributes."""
    from pg2cio_assets.settings import Settings

    as_of = datetime.fromisoformat(config.as_of) if config.as_of else datetime.now(timezone.utc)
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=timezone.utc)
    currency = Settings.from_env().store_currency
    schema = state.schema_name
    with state.connect() as conn:
        people = read_frame(conn, sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, "people")))
        aggregates = read_frame(conn, attributes.aggregates_query(schema), {"currency": currency})
        df = attributes.build_person_attributes(people, aggregates, as_of)
        replace_table(conn, schema, "person_attributes", df, attributes.table_columns(), unique=("person_key",))
    failures = attributes.type_failures(df)
    count_cols = [a.name for a in contract.PERSON_ATTRIBUTES if a.kind == "integer"]
    negative = {c: int((df[c] < 0).sum()) for c in count_cols if (df[c] < 0).any()}
    foreign = int((df["other_currency_orders_count"] > 0).sum())
    if foreign:
        context.log.warning(f"{foreign} people have orders outside {currency}; those orders are left out of "
                            "lifetime_value and average_order_value (see other_currency_orders_count)")
    context.log.info(f"person_attributes: {len(df):,} people as of {as_of.isoformat()}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(df),
            "as_of": as_of.isoformat(),
            "store_currency": currency,
            "people_with_other_currency_orders": foreign,
            **{f"lapsed_{d}d": int(df[f"is_lapsed_{d}d"].sum()) for d in contract.LAPSE_WINDOWS_DAYS},
            "buyers": int((df["orders_count"] > 0).sum()),
        },
        check_results=[
            dg.AssetCheckResult(check_name=TYPES_CHECK, passed=failures.empty, metadata={
                "failures": len(failures), "examples": dg.MetadataValue.md(_markdown(failures))}),
            dg.AssetCheckResult(check_name=COUNTS_CHECK, passed=not negative,
                                metadata={"negative_values": dg.MetadataValue.json(negative)}),
        ],
    )

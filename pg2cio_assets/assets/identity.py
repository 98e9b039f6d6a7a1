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
from pg2cio_assets.state import publish, read_frame, replace_table

IDENTITY_INPUTS = ["customers", "customer_email_changes", "orders", "carts"]
ATTRIBUTE_INPUTS = ["orders", "order_items", "refunds", "subscriptions"]

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
    """Rows no person owns: orders with neither customer_id nor a resolvable email, guest rows
    under an ambiguous or unusable email, and rows naming a customer_id that is not an account.
    A cart with neither (an anonymous shopper) is normal and only counted, see _anonymous_carts_sql."""
    t = lambda name: sql.Identifier(schema, name)  # noqa: E731
    orphan = lambda rel, key: sql.SQL(  # noqa: E731
        "SELECT {rel_name}, r.{key}, r.email, 'customer_id ' || r.customer_id || ' is not among the customers' "
        "FROM {rel} r WHERE r.customer_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM {customers} c WHERE c.customer_id = r.customer_id)"
    ).format(rel_name=sql.Literal(rel), key=sql.Identifier(key), rel=t(f"{rel}_extract"), customers=t("customers_extract"))
    return sql.SQL(
        """
        INSERT INTO {q} (relation, row_key, email, reason)
        SELECT 'orders', o.order_id, o.email, coalesce(m.reason, {no_email})
        FROM {orders} o LEFT JOIN {map} m ON m.identifier_type = 'email' AND m.identifier = o.email
        WHERE o.customer_id IS NULL AND m.person_key IS NULL
        UNION ALL
        SELECT 'carts', c.cart_id, c.email, m.reason
        FROM {carts} c JOIN {map} m ON m.identifier_type = 'email' AND m.identifier = c.email
        WHERE c.customer_id IS NULL AND m.person_key IS NULL
        UNION ALL {orphan_orders} UNION ALL {orphan_carts}
        UNION ALL SELECT 'subscriptions', s.subscription_id, NULL, 'customer_id ' || s.customer_id || ' is not among the customers'
        FROM {subs} s WHERE NOT EXISTS (SELECT 1 FROM {customers} c WHERE c.customer_id = s.customer_id)
        """
    ).format(
        q=t("identity_quarantine"), orders=t("orders_extract"), carts=t("carts_extract"), subs=t("subscriptions_extract"),
        customers=t("customers_extract"), map=t("identity_map"), no_email=sql.Literal(identity.REASON_NO_EMAIL),
        orphan_orders=orphan("orders", "order_id"), orphan_carts=orphan("carts", "cart_id"),
    )


def _anonymous_carts_sql(schema: str) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {} WHERE customer_id IS NULL AND email IS NULL").format(
        sql.Identifier(schema, "carts_extract"))


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
                     description="Every customer_id and every email seen -> the person it belongs to, with the "
                                 "rule that decided it, or the reason none does (guest emails as typed, account emails "
                                 "normalized). Table identity_map in the state schema; rows no person owns are listed "
                                 "in identity_quarantine."),
        dg.AssetSpec("people", group_name="identity", kinds={"postgres", "pandas"},
                     deps=[_extract_key(r) for r in IDENTITY_INPUTS],
                     description="One row per real person: each account (Customer.io `id` = customer_id) and each "
                                 "guest email no account claims (identified by `email`). Table people in the state schema."),
        dg.AssetSpec("identity_merges", group_name="identity", kinds={"postgres", "pandas"},
                     deps=[_extract_key(r) for r in IDENTITY_INPUTS],
                     description="Guest profiles to fold into the account that registered later: primary id = "
                                 "customer_id, secondary email. The sync sends each once. Table identity_merges in the "
                                 "state schema."),
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
        ids.validate()
        failures = ids.check_failures()
        passed = not any(failures.values())
        if not passed:
            context.log.error(f"identity checks failed, the published tables are left as they were: {failures}")
        with conn.transaction():
            written = [
                publish(conn, schema, "identity_map", ids.identity_map, identity.IDENTITY_MAP_TABLE, passed=passed,
                        unique=("identifier_type", "identifier"), indexes=[("person_key",)]),
                publish(conn, schema, "people", ids.people, identity.PEOPLE_TABLE, passed=passed,
                        unique=("person_key",), indexes=[("email",)]),
                publish(conn, schema, "identity_merges", ids.merges, identity.MERGES_TABLE, passed=passed, unique=("merge_id",)),
            ]
            if passed:
                replace_table(conn, schema, "identity_quarantine", pd.DataFrame(columns=[c for c, _ in QUARANTINE_TYPES]),
                              QUARANTINE_TYPES, indexes=[("relation", "row_key")])
                conn.execute(_quarantine_sql(schema))
            quarantine = read_frame(conn, sql.SQL(
                "SELECT relation, reason, count(*) AS rows FROM {} GROUP BY 1, 2 ORDER BY 3 DESC"
            ).format(sql.Identifier(schema, "identity_quarantine")))
            anonymous_carts = conn.execute(_anonymous_carts_sql(schema)).fetchone()[0]
    counts = ids.counts()
    quarantined = int(quarantine["rows"].sum()) if len(quarantine) else 0
    if quarantined:
        context.log.warning(f"{quarantined:,} rows belong to no person and were quarantined:\n{_markdown(quarantine)}")
    context.log.info(f"identity: {counts}; {anonymous_carts:,} anonymous carts (no customer_id, no email)")

    yield dg.MaterializeResult(asset_key="identity_map", metadata={
        "dagster/row_count": len(ids.identity_map),
        "published": passed,
        "written_to": written[0],
        "unresolved_emails": counts["unresolved_emails"],
        "quarantined_rows": quarantined,
        "quarantine_by_reason": dg.MetadataValue.md(_markdown(quarantine)),
        "anonymous_carts": int(anonymous_carts),
    })
    yield dg.MaterializeResult(asset_key="people", metadata={
        "dagster/row_count": counts["people"], "accounts": counts["accounts"], "guests": counts["guests"],
        "accounts_sharing_an_email": counts["accounts_sharing_an_email"], "published": passed, "written_to": written[1],
    })
    yield dg.MaterializeResult(asset_key="identity_merges", metadata={
        "dagster/row_count": counts["merges"], "published": passed, "written_to": written[2]})
    for name, bad in failures.items():
        yield dg.AssetCheckResult(asset_key="people", check_name=name, passed=not bad,
                                  metadata={"failing": len(bad), "examples": dg.MetadataValue.json(bad[:20])})


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
    an account count for that account. Table person_attributes in the state schema; when a
    check fails the published table is left as it was and the candidate goes to
    person_attributes_rejected."""
    from pg2cio_assets.settings import ConfigError, Settings

    try:
        as_of = datetime.fromisoformat(config.as_of) if config.as_of else datetime.now(timezone.utc)
    except ValueError:
        raise ConfigError(f"person_attributes config as_of={config.as_of!r} is not an ISO-8601 instant "
                          "(e.g. 2026-11-30T00:00:00+00:00)") from None
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=timezone.utc)
    currency = Settings.from_env().store_currency
    schema = state.schema_name
    with state.connect() as conn:
        people = read_frame(conn, sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, "people")))
        aggregates = read_frame(conn, attributes.aggregates_query(schema), {"currency": currency})
        df = attributes.build_person_attributes(people, aggregates, as_of)
        failures = attributes.type_failures(df)
        count_cols = [a.name for a in contract.PERSON_ATTRIBUTES if a.kind == "integer"]
        negative = {c: int((df[c] < 0).sum()) for c in count_cols if (df[c] < 0).any()}
        passed = failures.empty and not negative
        if not passed:
            context.log.error("person_attributes failed its checks; the published table is left as it was and the "
                              f"candidate is in person_attributes_rejected:\n{_markdown(failures)}")
        written = publish(conn, schema, "person_attributes", df, attributes.table_columns(), passed=passed,
                          unique=("person_key",))
    foreign = int((df["other_currency_orders_count"] > 0).sum())
    if foreign:
        context.log.warning(f"{foreign} people have orders outside {currency}; those orders are left out of "
                            "lifetime_value and average_order_value (see other_currency_orders_count)")
    context.log.info(f"person_attributes: {len(df):,} people as of {as_of.isoformat()}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(df),
            "published": passed,
            "written_to": written,
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

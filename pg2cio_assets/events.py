"""Event streams: one behavioural event per source fact, named and typed by the contract.

`event_query` selects, per contract event, the facts of a time window from the extract tables
with the person each belongs to (SQL: the history-wide parts, such as whether an order is a
person's first, run in Postgres). `build_events` is pure: it checks the name against the
contract, assigns the deterministic ULID and the unix timestamp, builds and types the
properties (with line items where the contract turns them on), bounds the payload, and sends
what cannot become an event to quarantine with a reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal

import pandas as pd
import pandera.pandas as pa
from psycopg import sql

from pg2cio_assets import contract, ulid
from pg2cio_assets.customerio import MAX_EVENT_DATA_BYTES, MAX_OP_BYTES

OP_ENVELOPE_BYTES = 200  # type, action, identifiers, name, id, timestamp around the event data

EVENT_COLUMNS = [
    "event_id", "name", "person_key", "cio_identifier_type", "cio_identifier", "occurred_at", "timestamp",
    "properties", "source_relation", "source_key", "data_bytes", "use_case", "source_changed_at",
]
QUARANTINE_COLUMNS = ["name", "source_relation", "source_key", "occurred_at", "reason"]


# --- SQL: the facts of a window, with their person -----------------------------------------

_PERSON = {
    # how each relation reaches a person: its account, else the owner of its email
    "carts": ("CASE WHEN r.customer_id IS NOT NULL THEN r.customer_id ELSE m.person_key END",
              "LEFT JOIN {identity_map} m ON r.customer_id IS NULL AND m.identifier_type = 'email' AND m.identifier = r.email"),
    "orders": ("CASE WHEN r.customer_id IS NOT NULL THEN r.customer_id ELSE m.person_key END",
               "LEFT JOIN {identity_map} m ON r.customer_id IS NULL AND m.identifier_type = 'email' AND m.identifier = r.email"),
}

_SELECT = {
    "cart_created": "r.cart_id, r.currency",
    "cart_updated": "r.cart_id, r.currency",
    "checkout_started": (
        "r.cart_id, r.currency, "
        "(SELECT coalesce(sum(i.quantity * i.unit_price), 0) FROM {cart_items} i WHERE i.cart_id = r.cart_id) AS cart_total"
    ),
    "order_paid": "r.order_id, r.order_total, r.currency, r.discount_code, (f.order_id IS NOT NULL) AS is_first_order",
    "order_fulfilled": "r.order_id, r.order_total, r.currency",
}


def _first_orders_cte(schema: str) -> sql.Composed:
    """Each person's first paid order over the whole history, guest orders linked to them included."""
    return sql.SQL(
        """
        first_orders AS MATERIALIZED (
            SELECT DISTINCT ON (person_key) person_key, order_id FROM (
                SELECT o.order_id, o.paid_at,
                       CASE WHEN o.customer_id IS NOT NULL THEN o.customer_id ELSE m.person_key END AS person_key
                FROM {orders} o
                LEFT JOIN {identity_map} m ON o.customer_id IS NULL AND m.identifier_type = 'email' AND m.identifier = o.email
                WHERE o.paid_at IS NOT NULL
            ) p
            WHERE person_key IS NOT NULL
            ORDER BY person_key, paid_at, order_id
        )
        """
    ).format(orders=sql.Identifier(schema, "orders_extract"), identity_map=sql.Identifier(schema, "identity_map"))


def event_query(spec: contract.Event, schema: str) -> sql.Composed:
    """source_key, occurred_at, source_changed_at, person_key and every contract property of
    `spec`'s facts in [%(start)s, %(end)s). source_changed_at is when the source row last changed
    (its updated_at, or its immutable *_at): where delivery latency is measured from."""
    t = lambda name: sql.Identifier(schema, name)  # noqa: E731
    ts = sql.Identifier(spec.timestamp_column)
    fmt = {"identity_map": t("identity_map"), "cart_items": t("cart_items_extract")}
    if spec.relation in _PERSON:
        person, join = _PERSON[spec.relation]
        body = sql.SQL(
            "SELECT r.{key} AS source_key, r.{ts} AS occurred_at, r.updated_at AS source_changed_at, " + person
            + " AS person_key, " + _SELECT[spec.name] + " FROM {rel} r " + join + " WHERE r.{ts} >= %(start)s AND r.{ts} < %(end)s"
        ).format(key=sql.Identifier(spec.source_key[0]), ts=ts, rel=t(f"{spec.relation}_extract"), **fmt)
        if spec.name == "order_paid":
            # One pass over the history, joined once (a correlated EXISTS re-ran it per order).
            body = sql.SQL(
                "SELECT r.{key} AS source_key, r.{ts} AS occurred_at, r.updated_at AS source_changed_at, " + person
                + " AS person_key, " + _SELECT[spec.name] + " FROM {rel} r " + join + " LEFT JOIN first_orders f ON f.order_id = r.order_id"
                + " WHERE r.{ts} >= %(start)s AND r.{ts} < %(end)s"
            ).format(key=sql.Identifier(spec.source_key[0]), ts=ts, rel=t(f"{spec.relation}_extract"), **fmt)
            return sql.SQL("WITH {} {}").format(_first_orders_cte(schema), body)
        return body
    if spec.relation == "refunds":
        person, join = _PERSON["orders"]
        return sql.SQL(
            "SELECT f.refund_id AS source_key, f.refunded_at AS occurred_at, f.refunded_at AS source_changed_at, " + person + " AS person_key, "
            "f.refund_id, f.order_id, f.amount, r.currency FROM {refunds} f JOIN {orders} r USING (order_id) " + join
            + " WHERE f.refunded_at >= %(start)s AND f.refunded_at < %(end)s"
        ).format(refunds=t("refunds_extract"), orders=t("orders_extract"), **fmt)
    if spec.relation == "subscriptions":
        return sql.SQL(
            "SELECT s.subscription_id AS source_key, s.{ts} AS occurred_at, s.updated_at AS source_changed_at, "
            "s.customer_id AS person_key, "
            "s.subscription_id, s.sku, s.interval_days FROM {subs} s WHERE s.{ts} >= %(start)s AND s.{ts} < %(end)s"
        ).format(ts=ts, subs=t("subscriptions_extract"))
    if spec.relation == "subscription_renewals":
        return sql.SQL(
            "SELECT n.renewal_id AS source_key, n.renewed_at AS occurred_at, n.renewed_at AS source_changed_at, "
            "s.customer_id AS person_key, "
            "n.subscription_id, n.renewal_id, n.order_id, s.sku, s.interval_days "
            "FROM {renewals} n JOIN {subs} s USING (subscription_id) "
            "WHERE n.renewed_at >= %(start)s AND n.renewed_at < %(end)s"
        ).format(renewals=t("subscription_renewals_extract"), subs=t("subscriptions_extract"))
    raise NotImplementedError(f"event {spec.name}: no query for relation {spec.relation}")


def items_query(spec: contract.Event, schema: str, by_keys: bool = False) -> sql.Composed:
    """Line items of the window's facts: source_key, sku, title, category, quantity, price.
    by_keys: the items of the facts whose keys are in %(keys)s instead (one chunk of facts)."""
    t = lambda name: sql.Identifier(schema, name)  # noqa: E731
    ts = sql.Identifier(spec.timestamp_column)
    if spec.relation == "carts":
        where = "i.cart_id = ANY(%(keys)s)" if by_keys else "r.{ts} >= %(start)s AND r.{ts} < %(end)s"
        return sql.SQL(
            "SELECT i.cart_id AS source_key, i.sku, p.title, p.category, i.quantity, i.unit_price AS price "
            "FROM {items} i JOIN {carts} r USING (cart_id) LEFT JOIN {products} p USING (sku) "
            "WHERE " + where + " ORDER BY i.cart_id, i.sku"
        ).format(items=t("cart_items_extract"), carts=t("carts_extract"), products=t("products_extract"), ts=ts)
    if spec.relation == "orders":
        where = "i.order_id = ANY(%(keys)s)" if by_keys else "r.{ts} >= %(start)s AND r.{ts} < %(end)s"
        return sql.SQL(
            "SELECT i.order_id AS source_key, i.sku, i.title, i.category, i.quantity, i.unit_price AS price "
            "FROM {items} i JOIN {orders} r USING (order_id) "
            "WHERE " + where + " ORDER BY i.order_id, i.line_no"
        ).format(items=t("order_items_extract"), orders=t("orders_extract"), ts=ts)
    raise NotImplementedError(f"event {spec.name}: line items need a carts or orders relation, not {spec.relation}")


# --- pure: facts -> events -----------------------------------------------------------------


def _typed(value: object, kind: str) -> object:
    """A property value in its contract kind; ValueError names what is wrong."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return None
    if kind == "string":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if kind == "integer":
        if isinstance(value, bool) or not float(value).is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if kind == "money":
        if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
            raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
        return round(float(value), 2)
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"expected a boolean, got {type(value).__name__} {value!r}")
        return value
    raise ValueError(f"unknown kind {kind!r}")


@dataclass(frozen=True)
class BuiltEvents:
    events: pd.DataFrame  # EVENT_COLUMNS, properties as dicts
    quarantine: pd.DataFrame  # QUARANTINE_COLUMNS


def build_events(name: str, facts: pd.DataFrame, people: pd.DataFrame, items: pd.DataFrame | None = None) -> BuiltEvents:
    """Events of contract event `name` from its facts (event_query's rows).

    people: person_key, cio_identifier_type, cio_identifier (and is_erased, optional).
    items: source_key, sku, title, category, quantity, price, when the contract turns them on.
    Raises UnknownEventError for a name the contract does not have.
    """
    spec = contract.event(name)
    if spec.owner != "postgres":
        raise ValueError(f"event {name!r} is owned by {spec.owner}; pg2cio never emits it")
    ident = dict(zip(people["person_key"], zip(people["cio_identifier_type"], people["cio_identifier"])))
    line_items: dict[str, list[dict]] = {}
    if spec.items and items is not None and len(items):
        names = [p for p, _ in contract.ITEM_PROPERTIES]
        kinds = [k for _, k in contract.ITEM_PROPERTIES]
        for key, *values in items[["source_key", *names]].itertuples(index=False, name=None):
            line_items.setdefault(key, []).append({p: _typed(v, k) for p, k, v in zip(names, kinds, values)})

    out, held = [], []
    for row in facts.itertuples(index=False):
        source_key = str(row.source_key)
        occurred = pd.Timestamp(row.occurred_at).to_pydatetime()

        def hold(reason: str) -> None:
            held.append((name, spec.relation, source_key, occurred, reason))

        if row.person_key is None or (isinstance(row.person_key, float) and math.isnan(row.person_key)):
            hold("no person: no customer_id and no resolvable email")
            continue
        if row.person_key not in ident:
            hold(f"person {row.person_key} is not among the people")
            continue
        try:
            props = {p.name: _typed(getattr(row, p.name), p.kind) for p in spec.properties}
        except ValueError as exc:
            hold(f"property of the wrong type: {exc}")
            continue
        missing = [p.name for p in spec.properties if props[p.name] is None and not p.nullable]
        if missing:
            hold(f"required propert{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} missing")
            continue
        if spec.items:
            props["items"] = line_items.get(source_key, [])
        data = json.dumps(props, separators=(",", ":"), sort_keys=True)
        size = len(data.encode())
        if size > MAX_EVENT_DATA_BYTES or size + OP_ENVELOPE_BYTES > MAX_OP_BYTES:
            hold(f"event data is {size:,} bytes: over Customer.io's limit ({MAX_OP_BYTES:,} bytes per batched op)")
            continue
        cio_type, cio_id = ident[row.person_key]
        out.append((
            ulid.event_ulid(occurred, name, source_key), name, row.person_key, cio_type, cio_id, occurred,
            int(occurred.timestamp()), props, spec.relation, source_key, size, spec.use_case,
            _changed_at(row, occurred),
        ))
    return BuiltEvents(
        events=pd.DataFrame(out, columns=EVENT_COLUMNS),
        quarantine=pd.DataFrame(held, columns=QUARANTINE_COLUMNS),
    )


def _changed_at(row, occurred):
    value = getattr(row, "source_changed_at", None)
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return occurred
    return pd.Timestamp(value).to_pydatetime()


def enabled_events(enable: tuple[str, ...] = (), disable: tuple[str, ...] = ()) -> list[contract.Event]:
    """The events pg2cio emits: the contract's defaults, plus `enable`, minus `disable`.

    Unknown names raise UnknownEventError; app-owned events are never emitted."""
    on = {e.name for e in contract.EVENTS if e.enabled_by_default}
    for name in enable:
        on.add(contract.event(name).name)
    for name in disable:
        on.discard(contract.event(name).name)
    return [e for e in contract.EVENTS if e.name in on and e.owner == "postgres"]


EVENTS_SCHEMA = pa.DataFrameSchema(
    {
        "event_id": pa.Column(str, pa.Check(lambda s: s.map(ulid.is_valid), element_wise=False, error="must be a ULID"),
                              unique=True, report_duplicates="all"),
        "name": pa.Column(str, pa.Check.isin(list(contract.EVENTS_BY_NAME), error="must be a contract event")),
        "person_key": pa.Column(str),
        "cio_identifier_type": pa.Column(str, pa.Check.isin(["id", "email"])),
        "cio_identifier": pa.Column(str),
        "timestamp": pa.Column("int64", pa.Check.ge(0)),
        "source_key": pa.Column(str),
        "data_bytes": pa.Column("int64", pa.Check.le(MAX_EVENT_DATA_BYTES)),
    },
    strict=False,
    name="events",
)


def check_events(events: pd.DataFrame, start, end) -> dict[str, tuple[bool, dict]]:
    """The blocking checks of the events asset, as (passed, metadata) by check name."""
    failing: dict[str, list] = {}
    if len(events):
        try:
            EVENTS_SCHEMA.validate(events, lazy=True)
        except pa.errors.SchemaErrors as exc:
            for column, value in zip(exc.failure_cases["column"], exc.failure_cases["failure_case"]):
                failing.setdefault(column, []).append(value)
    bad_ids = failing.get("event_id", [])
    bad_names = sorted({str(v) for v in failing.get("name", [])})
    ts = pd.to_datetime(events["occurred_at"], utc=True)
    outside = events[(ts < pd.Timestamp(start)) | (ts >= pd.Timestamp(end))]
    secs_ok = (events["timestamp"] == ts.map(lambda t: int(t.timestamp()))).all() if len(events) else True
    type_errors = []
    for name, props in zip(events["name"], events["properties"]):
        spec = contract.EVENTS_BY_NAME.get(name)
        if spec is None:
            continue
        for p in spec.properties:
            try:
                v = _typed(props.get(p.name), p.kind)
                if v is None and not p.nullable:
                    raise ValueError("missing")
            except ValueError as exc:
                type_errors.append(f"{name}.{p.name}: {exc}")
    return {
        "ids_unique_and_valid_ulids": (not bad_ids, {"invalid_or_duplicated": len(bad_ids)}),
        "names_in_contract": (not bad_names, {"unknown_names": ", ".join(bad_names) or "(none)"}),
        "timestamps_inside_partition_window": (outside.empty and bool(secs_ok), {"outside_window": len(outside)}),
        "properties_have_contract_types": (not type_errors, {"errors": len(type_errors), "examples": "; ".join(type_errors[:5]) or "(none)"}),
    }


def combine_checks(parts: list[dict[str, tuple[bool, dict]]]) -> dict[str, tuple[bool, dict]]:
    """check_events over chunks of one window, as if over the whole: all must pass; counts add up,
    names and examples are merged."""
    out: dict[str, tuple[bool, dict]] = {}
    for part in parts:
        for name, (passed, meta) in part.items():
            if name not in out:
                out[name] = (passed, dict(meta))
                continue
            ok, acc = out[name]
            for key, value in meta.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    acc[key] = acc.get(key, 0) + value
                elif value != "(none)":
                    acc[key] = value if acc.get(key) in (None, "(none)") else f"{acc[key]}; {value}"
            out[name] = (ok and passed, acc)
    return out

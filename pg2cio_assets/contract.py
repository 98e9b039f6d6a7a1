"""The contract: every relation, column and type pg2cio reads or writes is declared here, once.

DDL, Pandera schemas, extract queries, the source check and the README tables all derive from
these declarations; nothing else in the project spells a source column name or type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from psycopg import sql

@dataclass(frozen=True)
class SourceKind:
    """How one kind of source column is accepted, validated and stored."""

    accepted: frozenset[str]  # PostgreSQL types (as format_type spells them) a store may use
    hint: str  # how a store fixes a view of the wrong type
    pandas: object  # dtype the extract schema validates
    state_type: str  # type in pg2cio's extract tables (wide: nothing is rounded or cut)


SOURCE_KINDS: dict[str, SourceKind] = {
    "text": SourceKind(frozenset({"text", "character varying", "character"}), "cast it with ::text", "str", "text"),
    "integer": SourceKind(frozenset({"integer", "smallint", "bigint"}), "cast it with ::integer", "int64", "bigint"),
    "money": SourceKind(frozenset({"numeric"}), "cast it with ::numeric(12,2)", "float64", "numeric"),
    "boolean": SourceKind(frozenset({"boolean"}), "cast it with ::boolean", "bool", "boolean"),
    "timestamp": SourceKind(
        frozenset({"timestamp with time zone"}),
        "cast it with ::timestamptz (a timestamp without time zone is ambiguous: convert it with AT TIME ZONE '<store tz>')",
        "datetime64[us, UTC]",
        "timestamptz",
    ),
}
ACCEPTED_TYPES: dict[str, frozenset[str]] = {k: v.accepted for k, v in SOURCE_KINDS.items()}


@dataclass(frozen=True)
class Column:
    name: str
    pg_type: str  # the type in the contract DDL, e.g. numeric(12,2)
    kind: str  # one of SOURCE_KINDS
    nullable: bool = True
    default: str | None = None  # SQL default in the contract DDL
    references: str | None = None  # "relation" or "relation(column)" for the DDL's foreign key
    isin: tuple[str, ...] | None = None  # allowed values, checked by the extract schema
    ge: float | None = None  # lower bound, checked by the extract schema
    pattern: str | None = None  # regex the value must match in full
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"column {self.name}: unknown kind {self.kind!r}")


@dataclass(frozen=True)
class ParentLink:
    """A child relation (items) travels with its parent: it is extracted in the parent's window."""

    relation: str
    columns: tuple[str, ...]  # join columns, same name in child and parent


@dataclass(frozen=True)
class Relation:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    # The timestamp column that places a row in a daily partition: the relation's own
    # updated_at / immutable *_at, or its parent's (see `parent`).
    partition_column: str
    parent: ParentLink | None = None
    doc: str = ""
    indexes: tuple[tuple[str, ...], ...] = field(default=())

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"relation {self.name} has no column {name!r} in the contract")

    @property
    def replace_key(self) -> tuple[str, ...]:
        """Columns whose values identify the rows a newer extract supersedes.

        A parent row that changed moves to a later partition, so the newer extract replaces
        the older copy by primary key. Items are replaced as a whole set per parent, so a
        line removed from a cart disappears too. A relation without a key (an append-only
        log) is replaced by window only.
        """
        if self.parent is not None:
            return self.parent.columns
        return self.primary_key


def _c(name: str, pg_type: str, kind: str, nullable: bool = True, **kw) -> Column:
    return Column(name=name, pg_type=pg_type, kind=kind, nullable=nullable, **kw)


CURRENCY = r"[A-Z]{3}"

SOURCE_RELATIONS: tuple[Relation, ...] = (
    Relation(
        name="customers",
        doc="One row per registered account; customer_id is the person key everywhere downstream.",
        columns=(
            _c("customer_id", "text", "text", False),
            _c("email", "text", "text", doc="current email; may be NULL, mixed case, padded"),
            _c("phone", "text", "text"),
            _c("first_name", "text", "text"),
            _c("last_name", "text", "text"),
            _c("email_consent", "boolean", "boolean", False, default="false"),
            _c("sms_consent", "boolean", "boolean", False, default="false"),
            _c("created_at", "timestamptz", "timestamp", False),
            _c("updated_at", "timestamptz", "timestamp", False),
            _c("deleted_at", "timestamptz", "timestamp", doc="erasure request"),
        ),
        primary_key=("customer_id",),
        partition_column="updated_at",
        indexes=(("updated_at",),),
    ),
    Relation(
        name="customer_email_changes",
        doc="Every email change of an account, so orders under an old email still resolve.",
        columns=(
            _c("customer_id", "text", "text", False, references="customers"),
            _c("old_email", "text", "text"),
            _c("new_email", "text", "text"),
            _c("changed_at", "timestamptz", "timestamp", False),
        ),
        primary_key=(),
        partition_column="changed_at",
        indexes=(("changed_at",),),
    ),
    Relation(
        name="products",
        doc="The catalogue.",
        columns=(
            _c("sku", "text", "text", False),
            _c("title", "text", "text", False),
            _c("category", "text", "text", False),
            _c("price", "numeric(12,2)", "money", False, ge=0),
            _c("updated_at", "timestamptz", "timestamp", False),
        ),
        primary_key=("sku",),
        partition_column="updated_at",
        indexes=(("updated_at",),),
    ),
    Relation(
        name="carts",
        doc="A cart; checkout_started_at is set when the shopper reaches checkout.",
        columns=(
            _c("cart_id", "text", "text", False),
            _c("customer_id", "text", "text", references="customers", doc="NULL for guests"),
            _c("email", "text", "text", doc="captured at checkout, if any"),
            _c("currency", "char(3)", "text", False, pattern=CURRENCY),
            _c("created_at", "timestamptz", "timestamp", False),
            _c("updated_at", "timestamptz", "timestamp", False),
            _c("checkout_started_at", "timestamptz", "timestamp"),
        ),
        primary_key=("cart_id",),
        partition_column="updated_at",
        indexes=(("updated_at",),),
    ),
    Relation(
        name="cart_items",
        doc="Lines of a cart; they travel with their cart (a change bumps carts.updated_at).",
        columns=(
            _c("cart_id", "text", "text", False, references="carts"),
            _c("sku", "text", "text", False, references="products"),
            _c("quantity", "integer", "integer", False, ge=1),
            _c("unit_price", "numeric(12,2)", "money", False, ge=0),
        ),
        primary_key=("cart_id", "sku"),
        partition_column="updated_at",
        parent=ParentLink("carts", ("cart_id",)),
    ),
    Relation(
        name="orders",
        doc="An order; paid_at is the single moment the store counts as paid (after capture).",
        columns=(
            _c("order_id", "text", "text", False),
            _c("cart_id", "text", "text", references="carts"),
            _c("customer_id", "text", "text", references="customers", doc="NULL for guest checkout"),
            _c("email", "text", "text", doc="the email typed at checkout"),
            _c("currency", "char(3)", "text", False, pattern=CURRENCY),
            _c("subtotal", "numeric(12,2)", "money", False, ge=0),
            _c("discount_code", "text", "text"),
            _c("discount_total", "numeric(12,2)", "money", False, ge=0, default="0"),
            _c("order_total", "numeric(12,2)", "money", False, ge=0),
            _c("created_at", "timestamptz", "timestamp", False),
            _c("paid_at", "timestamptz", "timestamp"),
            _c("fulfilled_at", "timestamptz", "timestamp"),
            _c("canceled_at", "timestamptz", "timestamp"),
            _c("updated_at", "timestamptz", "timestamp", False),
        ),
        primary_key=("order_id",),
        partition_column="updated_at",
        indexes=(("updated_at",), ("customer_id",), ("cart_id",)),
    ),
    Relation(
        name="order_items",
        doc="Lines of an order, with the title and category as sold; they travel with their order.",
        columns=(
            _c("order_id", "text", "text", False, references="orders"),
            _c("line_no", "integer", "integer", False, ge=1),
            _c("sku", "text", "text", False),
            _c("title", "text", "text", False),
            _c("category", "text", "text", False),
            _c("quantity", "integer", "integer", False, ge=1),
            _c("unit_price", "numeric(12,2)", "money", False, ge=0),
        ),
        primary_key=("order_id", "line_no"),
        partition_column="updated_at",
        parent=ParentLink("orders", ("order_id",)),
    ),
    Relation(
        name="refunds",
        doc="Money returned on an order; refunded_at never changes.",
        columns=(
            _c("refund_id", "text", "text", False),
            _c("order_id", "text", "text", False, references="orders"),
            _c("amount", "numeric(12,2)", "money", False, ge=0),
            _c("refunded_at", "timestamptz", "timestamp", False),
        ),
        primary_key=("refund_id",),
        partition_column="refunded_at",
        indexes=(("refunded_at",), ("order_id",)),
    ),
    Relation(
        name="subscriptions",
        doc="A replenishment subscription of one SKU.",
        columns=(
            _c("subscription_id", "text", "text", False),
            _c("customer_id", "text", "text", False, references="customers"),
            _c("sku", "text", "text", False),
            _c("interval_days", "integer", "integer", False, ge=1),
            _c("status", "text", "text", False, isin=("active", "canceled", "paused")),
            _c("created_at", "timestamptz", "timestamp", False),
            _c("canceled_at", "timestamptz", "timestamp"),
            _c("updated_at", "timestamptz", "timestamp", False),
        ),
        primary_key=("subscription_id",),
        partition_column="updated_at",
        indexes=(("updated_at",),),
    ),
    Relation(
        name="subscription_renewals",
        doc="One row per renewal of a subscription, with the order it created.",
        columns=(
            _c("renewal_id", "text", "text", False),
            _c("subscription_id", "text", "text", False, references="subscriptions"),
            _c("order_id", "text", "text", references="orders"),
            _c("renewed_at", "timestamptz", "timestamp", False),
        ),
        primary_key=("renewal_id",),
        partition_column="renewed_at",
        indexes=(("renewed_at",),),
    ),
)

RELATIONS_BY_NAME: dict[str, Relation] = {r.name: r for r in SOURCE_RELATIONS}


def relation(name: str) -> Relation:
    try:
        return RELATIONS_BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"{name!r} is not a contract relation; the contract has: {', '.join(RELATIONS_BY_NAME)}"
        ) from None


# ---------------------------------------------------------------------------------------------
# DDL for the contract (the demo store and tests create it; a real store exposes views instead)
# ---------------------------------------------------------------------------------------------


def _column_ddl(col: Column) -> sql.Composable:
    extra = ("" if col.nullable else " NOT NULL") + (f" DEFAULT {col.default}" if col.default else "")
    return sql.SQL("{} {}").format(sql.Identifier(col.name), sql.SQL(col.pg_type + extra))


def create_table_sql(schema: str, rel: Relation) -> sql.Composed:
    """CREATE TABLE without keys: loading first and adding keys after is much faster."""
    return sql.SQL("CREATE TABLE {} ({})").format(
        sql.Identifier(schema, rel.name), sql.SQL(", ").join(_column_ddl(c) for c in rel.columns)
    )


def constraint_sql(schema: str, rel: Relation) -> list[sql.Composed]:
    """Primary key, foreign keys and extract indexes of one relation, as in source_contract.sql."""
    out: list[sql.Composed] = []
    table = sql.Identifier(schema, rel.name)
    if rel.primary_key:
        out.append(
            sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                table, sql.SQL(", ").join(map(sql.Identifier, rel.primary_key))
            )
        )
    for col in rel.columns:
        if col.references:
            target = RELATIONS_BY_NAME[col.references]
            out.append(
                sql.SQL("ALTER TABLE {} ADD FOREIGN KEY ({}) REFERENCES {} ({})").format(
                    table,
                    sql.Identifier(col.name),
                    sql.Identifier(schema, target.name),
                    sql.SQL(", ").join(map(sql.Identifier, target.primary_key)),
                )
            )
    for cols in rel.indexes:
        out.append(
            sql.SQL("CREATE INDEX ON {} ({})").format(table, sql.SQL(", ").join(map(sql.Identifier, cols)))
        )
    return out


def contract_ddl(schema: str = "commerce") -> list[sql.Composed]:
    """Every statement that creates the contract schema with keys, in dependency order."""
    stmts: list[sql.Composed] = [sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))]
    stmts += [create_table_sql(schema, r) for r in SOURCE_RELATIONS]
    for r in SOURCE_RELATIONS:
        stmts += constraint_sql(schema, r)
    return stmts


# ---------------------------------------------------------------------------------------------
# Use cases and person attributes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UseCase:
    name: str
    doc: str
    latency_minutes: int  # how stale the data behind it may be before journeys misfire


USE_CASES: dict[str, UseCase] = {
    u.name: u
    for u in (
        UseCase("recovery", "cart and checkout recovery; exits on order_paid", 15),
        UseCase("post_purchase", "order confirmation follow-ups, reviews, cross-sell", 60),
        UseCase("replenishment", "reminders timed on what was bought and when", 24 * 60),
        UseCase("winback", "lapsed-customer journeys on lapse flags and LTV", 24 * 60),
        UseCase("subscription", "subscription saves and renewal reminders", 60),
        UseCase("profile", "identity, names and consent for every journey", 24 * 60),
    )
}

# Customer.io attribute kinds. Every *_at is integer unix seconds; money a float in the store
# currency, rounded to cents; a given attribute keeps its kind forever.
@dataclass(frozen=True)
class AttributeKind:
    pandas: object  # dtype in person_attributes frames
    state_type: str  # column type of pg2cio.person_attributes
    customerio: str  # how it reaches Customer.io


ATTRIBUTE_KINDS: dict[str, AttributeKind] = {
    "string": AttributeKind("str", "text", "string"),
    "integer": AttributeKind("int64", "bigint", "integer"),
    "money": AttributeKind("float64", "double precision", "number (2 decimals)"),
    "boolean": AttributeKind("bool", "boolean", "boolean"),
    "timestamp": AttributeKind("Int64", "bigint", "unix seconds"),
}

LAPSE_WINDOWS_DAYS: tuple[int, ...] = (30, 60, 90, 180)


@dataclass(frozen=True)
class Attribute:
    name: str
    kind: str
    doc: str
    source: str  # the contract relations it is derived from
    use_case: str
    nullable: bool = False  # may be absent (no value yet): not sent rather than sent as null

    def __post_init__(self) -> None:
        if self.kind not in ATTRIBUTE_KINDS:
            raise ValueError(f"attribute {self.name}: unknown kind {self.kind!r}")
        if self.use_case not in USE_CASES:
            raise ValueError(f"attribute {self.name}: unknown use case {self.use_case!r}")
        if self.name.endswith("_at") != (self.kind == "timestamp"):
            raise ValueError(f"attribute {self.name}: names ending in _at are timestamps and only they are")


PERSON_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("email", "string", "normalized email (trimmed, lower-case)", "customers, orders, carts", "profile", True),
    Attribute("first_name", "string", "first name of the account", "customers", "profile", True),
    Attribute("last_name", "string", "last name of the account", "customers", "profile", True),
    Attribute("created_at", "timestamp", "account creation, or a guest's first checkout", "customers, orders, carts", "profile"),
    Attribute("email_consent", "boolean", "may receive marketing email (guests: false)", "customers", "profile"),
    Attribute("sms_consent", "boolean", "may receive marketing SMS (guests: false)", "customers", "profile"),
    Attribute("orders_count", "integer", "paid orders that were not canceled", "orders", "winback"),
    Attribute("lifetime_value", "money", "paid totals of those orders minus their refunds, store currency only", "orders, refunds", "winback"),
    Attribute("average_order_value", "money", "paid totals / orders_count, store currency only", "orders", "winback", True),
    Attribute("first_order_at", "timestamp", "paid_at of the first counted order", "orders", "post_purchase", True),
    Attribute("last_order_at", "timestamp", "paid_at of the latest counted order", "orders", "winback", True),
    Attribute("last_product_category", "string", "category of the first line of the latest counted order", "order_items", "replenishment", True),
    Attribute("top_category", "string", "category with the most units over counted orders (ties: alphabetical)", "order_items", "replenishment", True),
    *(
        Attribute(f"is_lapsed_{d}d", "boolean", f"bought before, but not in the {d} days before the run's as-of date", "orders", "winback")
        for d in LAPSE_WINDOWS_DAYS
    ),
    Attribute("has_active_subscription", "boolean", "at least one subscription with status active", "subscriptions", "subscription"),
    Attribute("active_subscriptions_count", "integer", "subscriptions with status active", "subscriptions", "subscription"),
    Attribute("other_currency_orders_count", "integer", "counted orders not in the store currency (left out of LTV and AOV)", "orders", "winback"),
)

ATTRIBUTES_BY_NAME: dict[str, Attribute] = {a.name: a for a in PERSON_ATTRIBUTES}


# ---------------------------------------------------------------------------------------------
# Behavioural events
# ---------------------------------------------------------------------------------------------

EVENT_PROPERTY_KINDS = ("string", "integer", "money", "boolean")
ITEM_PROPERTIES: tuple[tuple[str, str], ...] = (
    ("sku", "string"), ("title", "string"), ("category", "string"), ("quantity", "integer"), ("price", "money"),
)


@dataclass(frozen=True)
class EventProperty:
    name: str
    kind: str
    nullable: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in EVENT_PROPERTY_KINDS:
            raise ValueError(f"event property {self.name}: unknown kind {self.kind!r}")


@dataclass(frozen=True)
class Event:
    name: str
    doc: str
    relation: str  # the source relation whose row the event is explained by
    timestamp_column: str  # when it happened: the event's timestamp and its daily partition
    properties: tuple[EventProperty, ...]
    use_case: str
    owner: str = "postgres"  # "postgres": pg2cio emits it; "app": the store's app does; "verify": only `pg2cio verify`
    enabled_by_default: bool = True
    items: bool = False  # carry the line items (sku, title, category, quantity, price)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name) or len(self.name.encode()) > 100:
            raise ValueError(f"event name {self.name!r} must be snake_case and at most 100 bytes")
        if self.owner not in ("postgres", "app", "verify"):
            raise ValueError(f"event {self.name}: owner must be postgres, app or verify")
        if self.use_case not in USE_CASES:
            raise ValueError(f"event {self.name}: unknown use case {self.use_case!r}")
        RELATIONS_BY_NAME[self.relation].column(self.timestamp_column)

    @property
    def source_key(self) -> tuple[str, ...]:
        return RELATIONS_BY_NAME[self.relation].primary_key


def _p(name: str, kind: str, nullable: bool = False, doc: str = "") -> EventProperty:
    return EventProperty(name, kind, nullable, doc)


EVENTS: tuple[Event, ...] = (
    Event("cart_created", "a shopper put something in a new cart", "carts", "created_at",
          (_p("cart_id", "string"), _p("currency", "string")), "recovery"),
    Event("checkout_started", "the shopper reached checkout: the recovery trigger", "carts", "checkout_started_at",
          (_p("cart_id", "string"), _p("currency", "string"), _p("cart_total", "money")), "recovery", items=True),
    Event("cart_updated", "any change to a cart (noisy: off unless switched on)", "carts", "updated_at",
          (_p("cart_id", "string"), _p("currency", "string")), "recovery", enabled_by_default=False),
    Event("order_paid", "the store counts the order as paid: the universal stop of recovery journeys", "orders", "paid_at",
          (_p("order_id", "string"), _p("order_total", "money"), _p("currency", "string"),
           _p("discount_code", "string", True), _p("is_first_order", "boolean")), "recovery", items=True),
    Event("order_fulfilled", "the order left the warehouse", "orders", "fulfilled_at",
          (_p("order_id", "string"), _p("order_total", "money"), _p("currency", "string")), "post_purchase"),
    Event("order_refunded", "money went back to the shopper", "refunds", "refunded_at",
          (_p("refund_id", "string"), _p("order_id", "string"), _p("amount", "money"), _p("currency", "string")),
          "post_purchase"),
    Event("subscription_created", "a replenishment subscription started", "subscriptions", "created_at",
          (_p("subscription_id", "string"), _p("sku", "string"), _p("interval_days", "integer")), "subscription"),
    Event("subscription_renewed", "a subscription renewed and created an order", "subscription_renewals", "renewed_at",
          (_p("subscription_id", "string"), _p("renewal_id", "string"), _p("order_id", "string", True),
           _p("sku", "string"), _p("interval_days", "integer")), "replenishment"),
    Event("subscription_canceled", "a subscription was canceled: the save trigger", "subscriptions", "canceled_at",
          (_p("subscription_id", "string"), _p("sku", "string"), _p("interval_days", "integer")), "subscription"),
    Event("pg2cio_verified", "a test event `pg2cio verify` sends to one chosen profile during a rollout; build no journey on it",
          "customers", "updated_at", (_p("check_id", "string"), _p("sent_by", "string")), "profile", owner="verify",
          enabled_by_default=False),
)
# The attribute `pg2cio verify` sets on the profile it checks (unix seconds, like every *_at).
VERIFY_ATTRIBUTE = "pg2cio_verified_at"

EVENTS_BY_NAME: dict[str, Event] = {e.name: e for e in EVENTS}


class UnknownEventError(KeyError):
    """An event name that is not in the contract; never sent under a second name."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


def event(name: str) -> Event:
    """The contract's event of that exact name, or an error naming it (and the near miss, if any)."""
    if name in EVENTS_BY_NAME:
        return EVENTS_BY_NAME[name]
    canonical = re.sub(r"[\s\-]+", "_", name.strip()).lower()
    hint = (
        f"; did you mean {canonical!r}? Event names are exact and snake_case, so {name!r} would be a second, "
        "different event in Customer.io"
        if canonical in EVENTS_BY_NAME
        else f"; the contract's events are: {', '.join(EVENTS_BY_NAME)}"
    )
    raise UnknownEventError(f"event {name!r} is not in the contract{hint}")


# ---------------------------------------------------------------------------------------------
# Which assets serve which use cases: their freshness policies are derived from this
# ---------------------------------------------------------------------------------------------


def asset_use_cases(enabled: tuple[Event, ...] | list[Event] = EVENTS) -> dict[str, tuple[str, ...]]:
    """Asset name -> the use cases whose data it carries (events: those `enabled`)."""
    events = tuple(sorted({e.use_case for e in enabled if e.owner == "postgres"}))
    attributes = tuple(sorted({a.use_case for a in PERSON_ATTRIBUTES}))
    return {
        "identity_map": ("profile",),
        "people": ("profile",),
        "identity_merges": ("profile",),
        "person_attributes": attributes,
        "customerio_people_sync": attributes,
        "events": events,
        "customerio_events_sync": events,
    }


def latency_target_minutes(use_cases: tuple[str, ...]) -> int:
    """The tightest latency target among `use_cases`: what an asset serving all of them must meet."""
    return min(USE_CASES[u].latency_minutes for u in use_cases)


# Watched by the near-real-time sensor, each on its partition column (updated_at, or the
# immutable *_at of an append-only relation). Line items bump their cart's or order's
# updated_at (see the contract DDL), so carts and orders cover them; products change no event.
CHANGE_FEEDS: tuple[str, ...] = (
    "customers", "customer_email_changes", "carts", "orders", "refunds", "subscriptions", "subscription_renewals",
)


def event_timestamp_columns(relation_name: str) -> tuple[str, ...]:
    """The columns of `relation_name` that stamp a contract event (they place it in a partition)."""
    return tuple(sorted({e.timestamp_column for e in EVENTS if e.relation == relation_name}))

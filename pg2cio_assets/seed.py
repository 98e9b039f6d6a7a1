"""A deterministic, realistic D2C store for the demo, the tests and the benchmarks.

`generate_store` is pure (numpy + pandas, no database): the same customers, seed and as-of
instant give the same rows, byte for byte. It plants the cases that break retention data in
numbers fixed by `EdgeCasePlan`, and reports them (with the ids involved) in a manifest.
`load_store` writes the rows into the contract schema with COPY.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from pg2cio_assets import contract

DAY = 86_400
HISTORY_DAYS = 730

CATEGORIES = {
    # category: (price range in cents, subscribable)
    "skincare": ((1_800, 6_500), False),
    "haircare": ((1_400, 4_800), False),
    "supplements": ((2_200, 5_900), True),
    "coffee": ((1_200, 3_200), True),
    "apparel": ((2_500, 12_000), False),
    "home": ((1_500, 9_000), False),
}
ADJECTIVES = ["Daily", "Pure", "Calm", "Bright", "Bold", "Everyday", "Night", "Morning", "Wild", "Classic"]
NOUNS = {
    "skincare": ["Serum", "Cleanser", "Moisturiser", "Toner", "Mask"],
    "haircare": ["Shampoo", "Conditioner", "Hair Oil", "Styling Cream"],
    "supplements": ["Magnesium", "Omega-3", "Vitamin D", "Collagen", "Protein"],
    "coffee": ["Espresso Beans", "Filter Roast", "Decaf", "Cold Brew Pack"],
    "apparel": ["Tee", "Hoodie", "Leggings", "Socks", "Cap"],
    "home": ["Candle", "Diffuser", "Throw", "Mug", "Towel"],
}
FIRST_NAMES = ["Alice", "Ben", "Chloe", "David", "Emma", "Farah", "George", "Hana", "Ivan", "Julia",
               "Kenji", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
LAST_NAMES = ["Smith", "Jones", "Garcia", "Müller", "Nguyen", "Okafor", "Rossi", "Kowalski",
              "Silva", "Tanaka", "Brown", "Dubois", "Khan", "Larsen", "Novak", "Moreau"]
DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "icloud.com", "proton.me", "hey.com"]
DISCOUNTS = [("WELCOME10", 10), ("SPRING15", 15), ("VIP20", 20), ("WINBACK25", 25)]
STORE_CURRENCY = "USD"
FOREIGN_CURRENCY = "EUR"
QUICK_CHECKOUT_SECONDS = 240


@dataclass(frozen=True)
class EdgeCasePlan:
    """How many of each hard case a store of `customers` accounts contains. Exact, not approximate."""

    customers: int
    guest_people: int = field(metadata={"doc": "guests who never register: 1-3 guest orders under their own email"})
    registered_later: int = field(metadata={"doc": "guest orders first, then an account with the same email (half typed in another case)"})
    email_changed: int = field(metadata={"doc": "orders under an old email, then an email change recorded in customer_email_changes"})
    case_variant_emails: int = field(metadata={"doc": "guest orders whose email differs from the account's only in case and surrounding spaces"})
    shared_email_pairs: int = field(metadata={"doc": "pairs of accounts holding one email"})
    unattributable_orders: int = field(metadata={"doc": "orders with neither customer_id nor email"})
    quick_checkouts: int = field(metadata={"doc": f"checkouts paid exactly {QUICK_CHECKOUT_SECONDS // 60} minutes after checkout_started_at (the recovery stop case)"})
    lapsed_61d: int = field(metadata={"doc": "accounts whose last paid order is exactly 61 days before as-of"})
    active_59d: int = field(metadata={"doc": "accounts whose last paid order is exactly 59 days before as-of"})
    erased_customers: int = field(metadata={"doc": "accounts with an erasure request (deleted_at)"})
    foreign_currency_orders: int = field(metadata={"doc": f"orders in {FOREIGN_CURRENCY} (the store currency is {STORE_CURRENCY})"})

    @classmethod
    def for_customers(cls, n: int) -> EdgeCasePlan:
        if n < 100:
            raise ValueError(f"a demo store needs at least 100 customers to hold every edge case (got {n})")
        return cls(
            customers=n,
            guest_people=n * 3 // 100,
            registered_later=n // 100,
            email_changed=n // 100,
            case_variant_emails=n // 100,
            shared_email_pairs=max(1, n // 2000),
            unattributable_orders=max(1, n // 200),
            quick_checkouts=n // 100,
            lapsed_61d=max(1, n // 1000),
            active_59d=max(1, n // 1000),
            erased_customers=max(1, n // 1000),
            foreign_currency_orders=max(1, n // 1000),
        )


@dataclass
class StoreManifest:
    """What was generated: the plan, row counts, derived facts and the ids behind each edge case."""

    seed: int
    as_of: str
    plan: EdgeCasePlan
    rows: dict[str, int]
    canceled_orders: int
    lapsed_over_60d: int  # accounts whose last paid, non-canceled order is over 60 days old
    ids: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        return d


@dataclass
class Store:
    tables: dict[str, pd.DataFrame]
    manifest: StoreManifest


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------


def _ids(prefix: str, start: int, count: int, width: int) -> np.ndarray:
    return (prefix + pd.Series(np.arange(start, start + count)).astype(str).str.zfill(width)).to_numpy(object)


def _cents_text(cents: np.ndarray) -> np.ndarray:
    cents = np.asarray(cents, dtype=np.int64)
    return (pd.Series(cents // 100).astype(str) + "." + pd.Series(cents % 100).astype(str).str.zfill(2)).to_numpy(object)


def _vary_case_and_space(emails: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same address as typed by a hurried shopper: capitalised and padded with spaces."""
    out = []
    for i, e in enumerate(emails):
        local, _, domain = e.partition("@")
        variant = local[:1].upper() + local[1:] + "@" + domain.upper()
        pad = rng.integers(0, 3)
        out.append(("  " if pad else "") + variant + (" " if pad != 1 else ""))
    return np.array(out, dtype=object)


def generate_store(customers: int, seed: int, as_of: datetime) -> Store:
    """Build the whole store in memory. Deterministic for (customers, seed, as_of)."""
    if as_of.tzinfo is None:
        raise ValueError("as_of must be timezone-aware (UTC)")
    plan = EdgeCasePlan.for_customers(customers)
    rng = np.random.default_rng(seed)
    now = int(as_of.timestamp())
    t0 = now - HISTORY_DAYS * DAY
    n = customers

    # --- products -----------------------------------------------------------------------
    prod_rows = []
    for cat, ((lo, hi), _sub) in CATEGORIES.items():
        for adj in ADJECTIVES:
            for noun in NOUNS[cat][:3]:
                prod_rows.append((cat, f"{adj} {noun}", int(rng.integers(lo, hi) // 100 * 100 - 1)))
    n_prod = len(prod_rows)
    prod_cat = np.array([r[0] for r in prod_rows], dtype=object)
    prod_title = np.array([r[1] for r in prod_rows], dtype=object)
    prod_price = np.array([r[2] for r in prod_rows], dtype=np.int64)
    prod_sku = _ids("SKU-", 1, n_prod, 4)
    cat_names = list(CATEGORIES)
    prod_by_cat = {c: np.flatnonzero(prod_cat == c) for c in cat_names}
    subscribable = np.concatenate([prod_by_cat[c] for c, (_, sub) in CATEGORIES.items() if sub])
    products = pd.DataFrame(
        {
            "sku": prod_sku,
            "title": prod_title,
            "category": prod_cat,
            "price": _cents_text(prod_price),
            "updated_at": t0 + rng.integers(0, HISTORY_DAYS * DAY, n_prod),
        }
    )

    # --- customers ----------------------------------------------------------------------
    cust_id = _ids("cus_", 1, n, 7)
    first = np.array(FIRST_NAMES, dtype=object)[rng.integers(0, len(FIRST_NAMES), n)]
    last = np.array(LAST_NAMES, dtype=object)[rng.integers(0, len(LAST_NAMES), n)]
    domain = np.array(DOMAINS, dtype=object)[rng.integers(0, len(DOMAINS), n)]
    email = (
        pd.Series(first).str.lower() + "." + pd.Series(last).str.lower().str.replace("ü", "u")
        + pd.Series(np.arange(1, n + 1)).astype(str) + "@" + pd.Series(domain)
    ).to_numpy(object)
    fav_cat = rng.integers(0, len(cat_names), n)

    # Disjoint groups for the planned cases; the rest are ordinary customers.
    perm = rng.permutation(n)
    cursor = 0

    def take(k: int) -> np.ndarray:
        nonlocal cursor
        out = np.sort(perm[cursor:cursor + k])
        cursor += k
        return out

    g_shared = take(2 * plan.shared_email_pairs)
    g_registered = take(plan.registered_later)
    g_changed = take(plan.email_changed)
    g_variant = take(plan.case_variant_emails)
    g_l61 = take(plan.lapsed_61d)
    g_a59 = take(plan.active_59d)
    g_rest = np.sort(perm[cursor:])

    # The second account of each shared pair holds the first one's email.
    email[g_shared[1::2]] = email[g_shared[0::2]]

    # Every account's "last order" is planned, so lapse is known by construction for the
    # planned groups. Ordinary customers: 30% never buy, the rest split lapsed / active.
    last_ago = np.full(n, -1, dtype=np.int64)  # seconds before now of the last order, -1 = never
    roll = rng.random(n)
    lapsed_secs = (rng.integers(62, HISTORY_DAYS - 10, n) * DAY + rng.integers(0, DAY, n))
    active_secs = rng.integers(3600, 58 * DAY, n)
    buyer_like = np.concatenate([g_shared, g_registered, g_changed, g_variant, g_rest])
    never = g_rest[roll[g_rest] < 0.30]  # planned groups always buy
    is_lapsed = roll >= 0.65
    last_ago[buyer_like] = np.where(is_lapsed[buyer_like], lapsed_secs[buyer_like], active_secs[buyer_like])
    last_ago[never] = -1
    last_ago[g_l61] = 61 * DAY
    last_ago[g_a59] = 59 * DAY

    buyers = np.flatnonzero(last_ago >= 0)
    # Orders per buyer and the span they cover, ending at the planned last order.
    k_orders = 1 + rng.poisson(12.0, n)
    k_orders[g_l61] = 2
    k_orders[g_a59] = 2
    last_t = now - last_ago
    span = np.minimum(rng.integers(30, HISTORY_DAYS, n) * DAY, (last_t - t0) - DAY)
    span = np.maximum(span, DAY)
    first_t = last_t - span

    created = np.where(
        last_ago >= 0,
        first_t - rng.integers(DAY, 60 * DAY, n),
        # accounts that never bought signed up during the history (or up to 60 days before it)
        t0 - 60 * DAY + rng.integers(0, (HISTORY_DAYS + 59) * DAY, n),
    )
    # Registered-later accounts: created after their guest orders (which sit just before).
    created[g_registered] = first_t[g_registered] - rng.integers(600, 3 * DAY, len(g_registered))

    # --- account orders (from carts) ----------------------------------------------------
    kb = k_orders[buyers]
    o_cust = np.repeat(buyers, kb)
    pos = np.arange(len(o_cust)) - np.repeat(np.cumsum(kb) - kb, kb)
    is_last = pos == np.repeat(kb - 1, kb)
    frac = rng.random(len(o_cust))
    o_time = np.where(
        is_last,
        last_t[o_cust],
        first_t[o_cust] + (frac * (last_t[o_cust] - first_t[o_cust] - 60)).astype(np.int64),
    )
    o_email = email[o_cust]
    o_customer = cust_id[o_cust]

    # --- guest orders of the planned identity cases ---------------------------------------
    g_orders_cust: list[np.ndarray] = []
    g_orders_time: list[np.ndarray] = []
    g_orders_email: list[np.ndarray] = []

    def guest_orders(group: np.ndarray, emails: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        k = 1 + rng.integers(0, 2, len(group))
        idx = np.repeat(np.arange(len(group)), k)
        width = np.maximum(hi[idx] - lo[idx], 60)
        g_orders_cust.append(group[idx])
        g_orders_time.append(lo[idx] + (rng.random(len(idx)) * width).astype(np.int64))
        g_orders_email.append(emails[idx])

    # registered later: guest orders in the 60 days before the account existed
    guest_orders(
        g_registered,
        np.where(rng.random(len(g_registered)) < 0.5, email[g_registered], _vary_case_and_space(email[g_registered], rng)),
        created[g_registered] - 60 * DAY,
        created[g_registered] - 300,
    )
    # email changed: the old address was used for guest orders before the change
    old_email = (
        pd.Series(first[g_changed]).str.lower() + "." + pd.Series(np.arange(len(g_changed))).astype(str)
        + "@oldmail.example"
    ).to_numpy(object)
    change_t = first_t[g_changed] + (span[g_changed] // 2)
    # Their own account orders before the change were placed under the old address too.
    changed_pos = np.full(n, -1)
    changed_pos[g_changed] = np.arange(len(g_changed))
    before_change = (changed_pos[o_cust] >= 0) & (o_time < change_t[np.maximum(changed_pos[o_cust], 0)])
    o_email = o_email.copy()
    o_email[before_change] = old_email[changed_pos[o_cust[before_change]]]
    guest_orders(g_changed, old_email, created[g_changed] + 60, change_t - 60)
    # case/space variants of the current email, between sign-up and the last order
    guest_orders(g_variant, _vary_case_and_space(email[g_variant], rng), created[g_variant] + 60, last_t[g_variant] - 60)

    planned_guest_cust = np.concatenate(g_orders_cust)
    planned_guest_time = np.concatenate(g_orders_time)
    planned_guest_email = np.concatenate(g_orders_email)

    # guests who never register
    guest_k = 1 + rng.integers(0, 3, plan.guest_people)
    guest_email = (
        "guest" + pd.Series(np.arange(1, plan.guest_people + 1)).astype(str) + "@"
        + pd.Series(np.array(DOMAINS, dtype=object)[rng.integers(0, len(DOMAINS), plan.guest_people)])
    ).to_numpy(object)
    gi = np.repeat(np.arange(plan.guest_people), guest_k)
    pure_guest_time = t0 + rng.integers(DAY, HISTORY_DAYS * DAY - 3600, len(gi))
    pure_guest_email = guest_email[gi]

    unattr_time = t0 + rng.integers(DAY, HISTORY_DAYS * DAY - 3600, plan.unattributable_orders)

    # Assemble the cart orders: account, planned guest, pure guest, unattributable.
    n_pg, n_pure, n_un = len(planned_guest_cust), len(gi), plan.unattributable_orders
    co_time = np.concatenate([o_time, planned_guest_time, pure_guest_time, unattr_time])
    co_customer = np.concatenate([o_customer, np.full(n_pg + n_pure + n_un, None, dtype=object)])
    co_email = np.concatenate([o_email, planned_guest_email, pure_guest_email, np.full(n_un, None, dtype=object)])
    co_owner = np.concatenate([o_cust, planned_guest_cust, np.full(n_pure + n_un, -1)])  # for category taste
    co_is_last = np.concatenate([is_last, np.zeros(n_pg + n_pure + n_un, dtype=bool)])
    n_co = len(co_time)

    # Checkout to payment: most pay 5-15 minutes after starting checkout, some are recovered
    # hours later, and exactly plan.quick_checkouts pay QUICK_CHECKOUT_SECONDS after.
    delay = np.where(rng.random(n_co) < 0.8, rng.integers(300, 900, n_co), rng.integers(3600, 3 * DAY, n_co))
    eligible_quick = np.flatnonzero(co_time - t0 > 2 * DAY)
    quick = np.sort(rng.choice(eligible_quick, plan.quick_checkouts, replace=False))
    delay[quick] = QUICK_CHECKOUT_SECONDS
    checkout_t = co_time - delay
    cart_created_t = checkout_t - rng.integers(120, 2 * DAY, n_co)
    order_created_t = co_time - rng.integers(1, 30, n_co)
    order_created_t = np.maximum(order_created_t, checkout_t + 1)

    # Cancellations: 3% of orders that are nobody's planned last order; half before payment.
    cancel_pool = np.flatnonzero(~co_is_last & (co_time < now - 3 * DAY))
    cancel_pool = np.setdiff1d(cancel_pool, quick)
    n_cancel = round(0.03 * len(cancel_pool))
    canceled = np.sort(rng.choice(cancel_pool, n_cancel, replace=False))
    unpaid = canceled[rng.random(n_cancel) < 0.5]
    paid_t = co_time.astype(np.int64).copy()
    paid_t[unpaid] = -1
    canceled_t = np.full(n_co, -1, dtype=np.int64)
    canceled_t[canceled] = co_time[canceled] + rng.integers(600, 2 * DAY, n_cancel)
    canceled_t[unpaid] = order_created_t[unpaid] + rng.integers(600, DAY, len(unpaid))

    # --- subscriptions and renewal orders ------------------------------------------------
    sub_pool = np.setdiff1d(np.concatenate([g_rest, g_shared]), never)
    n_sub = int(0.15 * len(sub_pool))
    sub_cust = np.sort(rng.choice(sub_pool, n_sub, replace=False))
    sub_sku = subscribable[rng.integers(0, len(subscribable), n_sub)]
    sub_interval = np.array([30, 60, 90])[rng.integers(0, 3, n_sub)]
    sub_created = np.maximum(created[sub_cust] + DAY, t0) + rng.integers(0, 300 * DAY, n_sub)
    sub_created = np.minimum(sub_created, now - 2 * DAY)
    status_roll = rng.random(n_sub)
    sub_status = np.where(status_roll < 0.4, "canceled", np.where(status_roll < 0.5, "paused", "active")).astype(object)
    life = rng.integers(1, 12, n_sub) * sub_interval * DAY + rng.integers(DAY, 10 * DAY, n_sub)
    sub_end = np.where(sub_status == "active", now, np.minimum(sub_created + life, now - 3600))
    sub_canceled_t = np.where(sub_status == "canceled", sub_end, -1)
    n_ren = np.maximum((sub_end - sub_created - 1) // (sub_interval * DAY), 0)
    ri = np.repeat(np.arange(n_sub), n_ren)
    rpos = 1 + np.arange(len(ri)) - np.repeat(np.cumsum(n_ren) - n_ren, n_ren)
    ren_t = sub_created[ri] + rpos * sub_interval[ri] * DAY
    pause_t = np.where(sub_status == "paused", sub_end, -1)
    sub_last_ren = np.full(n_sub, -1, dtype=np.int64)
    if len(ri):
        np.maximum.at(sub_last_ren, ri, ren_t)
    sub_updated = np.maximum.reduce([sub_created, sub_canceled_t, pause_t, sub_last_ren])
    sub_ids = _ids("sub_", 1, n_sub, 7)
    subscriptions = pd.DataFrame(
        {
            "subscription_id": sub_ids,
            "customer_id": cust_id[sub_cust],
            "sku": prod_sku[sub_sku],
            "interval_days": sub_interval,
            "status": sub_status,
            "created_at": sub_created,
            "canceled_at": sub_canceled_t,
            "updated_at": sub_updated,
        }
    )
    n_r = len(ri)

    # --- all orders -------------------------------------------------------------------------
    n_orders = n_co + n_r
    order_ids = _ids("ord_", 1, n_orders, 8)
    cart_ids_conv = _ids("cart_", 1, n_co, 8)
    all_customer = np.concatenate([co_customer, cust_id[sub_cust[ri]]])
    all_email = np.concatenate([co_email, email[sub_cust[ri]]])
    all_owner = np.concatenate([co_owner, sub_cust[ri]])
    all_paid = np.concatenate([paid_t, ren_t])
    all_created = np.concatenate([order_created_t, ren_t - 5])
    all_canceled = np.concatenate([canceled_t, np.full(n_r, -1, dtype=np.int64)])
    all_cart = np.concatenate([cart_ids_conv, np.full(n_r, None, dtype=object)])
    currency = np.full(n_orders, STORE_CURRENCY, dtype=object)
    foreign = rng.choice(np.flatnonzero(co_customer != None), plan.foreign_currency_orders, replace=False)  # noqa: E711
    currency[foreign] = FOREIGN_CURRENCY

    # Order lines: renewal orders carry their subscription's SKU; others follow the buyer's taste.
    n_lines = np.concatenate([1 + rng.poisson(0.6, n_co), np.ones(n_r, dtype=np.int64)])
    li = np.repeat(np.arange(n_orders), n_lines)
    owner = all_owner[li]
    taste = np.where(owner >= 0, fav_cat[np.maximum(owner, 0)], rng.integers(0, len(cat_names), len(li)))
    cat_of_line = np.where(rng.random(len(li)) < 0.6, taste, rng.integers(0, len(cat_names), len(li)))
    per_cat = len(prod_by_cat[cat_names[0]])  # every category has the same number of products
    cat_offsets = np.array([prod_by_cat[c][0] for c in cat_names])
    line_prod = cat_offsets[cat_of_line] + rng.integers(0, per_cat, len(li))
    is_ren_line = li >= n_co
    line_prod[is_ren_line] = sub_sku[ri]
    # A cart holds one line per SKU: merge duplicate SKUs within an order into a quantity bump.
    line_df = pd.DataFrame({"o": li, "p": line_prod, "q": 1 + (rng.random(len(li)) < 0.15).astype(np.int64)})
    line_df = line_df.groupby(["o", "p"], sort=True, as_index=False)["q"].sum()
    line_df["line_no"] = line_df.groupby("o").cumcount() + 1
    l_o = line_df["o"].to_numpy()
    l_p = line_df["p"].to_numpy()
    l_q = line_df["q"].to_numpy()
    line_cents = prod_price[l_p] * l_q
    subtotal = np.bincount(l_o, weights=line_cents, minlength=n_orders).astype(np.int64)
    disc_roll = rng.random(n_orders)
    disc_idx = rng.integers(0, len(DISCOUNTS), n_orders)
    has_disc = (disc_roll < 0.2) & (np.arange(n_orders) < n_co)
    disc_pct = np.array([d[1] for d in DISCOUNTS])[disc_idx]
    discount = np.where(has_disc, subtotal * disc_pct // 100, 0)
    total = subtotal - discount
    disc_code = np.where(has_disc, np.array([d[0] for d in DISCOUNTS], dtype=object)[disc_idx], None)

    # Fulfilment 1-5 days after payment, if that moment has come.
    fulfilled = np.where(all_paid >= 0, all_paid + rng.integers(DAY // 2, 5 * DAY, n_orders), -1)
    fulfilled[(all_canceled >= 0) & (fulfilled >= 0) & (all_canceled < fulfilled)] = -1
    fulfilled[fulfilled >= now] = -1

    # Refunds: every paid-then-canceled order in full; 4% of other paid orders in part.
    paid_canceled = np.flatnonzero((all_paid >= 0) & (all_canceled >= 0))
    partial_pool = np.flatnonzero((all_paid >= 0) & (all_canceled < 0) & (all_paid < now - 3 * DAY))
    partial = np.sort(rng.choice(partial_pool, int(0.04 * len(partial_pool)), replace=False))
    r_order = np.concatenate([paid_canceled, partial])
    r_amount = np.concatenate(
        [total[paid_canceled], np.maximum(1, (total[partial] * rng.uniform(0.3, 1.0, len(partial))).astype(np.int64))]
    )
    r_time = np.concatenate(
        [all_canceled[paid_canceled] + 600, np.minimum(all_paid[partial] + rng.integers(3 * DAY, 30 * DAY, len(partial)), now - 60)]
    )
    r_sort = np.argsort(r_time, kind="stable")
    r_order, r_amount, r_time = r_order[r_sort], r_amount[r_sort], r_time[r_sort]
    last_refund = np.full(n_orders, -1, dtype=np.int64)
    np.maximum.at(last_refund, r_order, r_time)
    refunds = pd.DataFrame(
        {
            "refund_id": _ids("re_", 1, len(r_order), 7),
            "order_id": order_ids[r_order],
            "amount": _cents_text(r_amount),
            "refunded_at": r_time,
        }
    )

    order_updated = np.maximum.reduce([all_created, all_paid, fulfilled, all_canceled, last_refund])
    orders = pd.DataFrame(
        {
            "order_id": order_ids,
            "cart_id": all_cart,
            "customer_id": all_customer,
            "email": all_email,
            "currency": currency,
            "subtotal": _cents_text(subtotal),
            "discount_code": disc_code,
            "discount_total": _cents_text(discount),
            "order_total": _cents_text(total),
            "created_at": all_created,
            "paid_at": all_paid,
            "fulfilled_at": fulfilled,
            "canceled_at": all_canceled,
            "updated_at": order_updated,
        }
    )
    order_items = pd.DataFrame(
        {
            "order_id": order_ids[l_o],
            "line_no": line_df["line_no"].to_numpy(),
            "sku": prod_sku[l_p],
            "title": prod_title[l_p],
            "category": prod_cat[l_p],
            "quantity": l_q,
            "unit_price": _cents_text(prod_price[l_p]),
        }
    )

    # --- carts: the converted ones, then abandoned ones (most carts are abandoned) --------
    n_ab = int(1.2 * n_co)
    ab_created = t0 + rng.integers(0, HISTORY_DAYS * DAY - 3600, n_ab)
    owner_roll = rng.random(n_ab)
    ab_owner = np.where(owner_roll < 0.55, rng.integers(0, n, n_ab), -1)
    ab_customer = np.where(ab_owner >= 0, cust_id[np.maximum(ab_owner, 0)], None)
    ab_checkout = np.where(rng.random(n_ab) < 0.45, ab_created + rng.integers(60, 3 * 3600, n_ab), -1)
    ab_checkout = np.where(ab_checkout >= now, -1, ab_checkout)
    guest_with_email = (ab_owner < 0) & (owner_roll < 0.85)
    ab_email = np.where(
        ab_owner >= 0,
        np.where(ab_checkout >= 0, email[np.maximum(ab_owner, 0)], None),
        np.where(guest_with_email & (ab_checkout >= 0), guest_email[rng.integers(0, max(1, len(guest_email)), n_ab)], None),
    )
    ab_updated = np.maximum(ab_created + rng.integers(0, 1800, n_ab), ab_checkout)
    ab_updated = np.minimum(ab_updated, now - 1)
    conv_owner_customer = co_customer
    carts = pd.DataFrame(
        {
            "cart_id": np.concatenate([cart_ids_conv, _ids("cart_", n_co + 1, n_ab, 8)]),
            "customer_id": np.concatenate([conv_owner_customer, ab_customer]),
            "email": np.concatenate([co_email, ab_email]),
            "currency": np.concatenate([currency[:n_co], np.full(n_ab, STORE_CURRENCY, dtype=object)]),
            "created_at": np.concatenate([cart_created_t, ab_created]),
            "updated_at": np.concatenate([order_created_t, ab_updated]),
            "checkout_started_at": np.concatenate([checkout_t, ab_checkout]),
        }
    )
    # Converted carts hold what was ordered; abandoned ones 1-3 lines.
    conv_lines = l_o < n_co
    ab_k = 1 + rng.integers(0, 3, n_ab)
    abi = np.repeat(np.arange(n_ab), ab_k)
    ab_prod = rng.integers(0, n_prod, len(abi))
    ab_lines = pd.DataFrame({"c": abi, "p": ab_prod}).drop_duplicates()
    cart_items = pd.DataFrame(
        {
            "cart_id": np.concatenate([cart_ids_conv[l_o[conv_lines]], _ids("cart_", n_co + 1, n_ab, 8)[ab_lines["c"].to_numpy()]]),
            "sku": np.concatenate([prod_sku[l_p[conv_lines]], prod_sku[ab_lines["p"].to_numpy()]]),
            "quantity": np.concatenate([l_q[conv_lines], 1 + (rng.random(len(ab_lines)) < 0.2).astype(np.int64)]),
            "unit_price": np.concatenate([_cents_text(prod_price[l_p[conv_lines]]), _cents_text(prod_price[ab_lines["p"].to_numpy()])]),
        }
    )

    # --- email changes, erasures and the customers table ------------------------------------
    email_changes = pd.DataFrame(
        {
            "customer_id": cust_id[g_changed],
            "old_email": old_email,
            "new_email": email[g_changed],
            "changed_at": change_t,
        }
    )
    # Erased accounts stopped buying before their erasure request.
    erase_pool = np.setdiff1d(g_rest[(last_ago[g_rest] < 0) | (last_ago[g_rest] > 31 * DAY)], sub_cust)
    erased = np.sort(rng.choice(erase_pool, plan.erased_customers, replace=False))
    deleted_t = np.full(n, -1, dtype=np.int64)
    deleted_t[erased] = now - rng.integers(DAY, 30 * DAY, len(erased))
    cust_updated = np.maximum.reduce([created + rng.integers(0, 30 * DAY, n), deleted_t])
    cust_updated[g_changed] = np.maximum(cust_updated[g_changed], change_t)
    cust_updated = np.minimum(cust_updated, now - 1)
    cust_updated = np.maximum(cust_updated, np.maximum(created, deleted_t))
    phone = np.where(rng.random(n) < 0.6, "+1555" + pd.Series(rng.integers(1_000_000, 9_999_999, n)).astype(str).to_numpy(object), None)
    customers_df = pd.DataFrame(
        {
            "customer_id": cust_id,
            "email": email,
            "phone": phone,
            "first_name": first,
            "last_name": last,
            "email_consent": rng.random(n) < 0.65,
            "sms_consent": rng.random(n) < 0.3,
            "created_at": created,
            "updated_at": cust_updated,
            "deleted_at": deleted_t,
        }
    )

    renewals = pd.DataFrame(
        {
            "renewal_id": _ids("ren_", 1, n_r, 8),
            "subscription_id": sub_ids[ri],
            "order_id": order_ids[n_co:],
            "renewed_at": ren_t,
        }
    )

    tables = {
        "customers": customers_df,
        "customer_email_changes": email_changes,
        "products": products,
        "carts": carts,
        "cart_items": cart_items,
        "orders": orders,
        "order_items": order_items,
        "refunds": refunds,
        "subscriptions": subscriptions,
        "subscription_renewals": renewals,
    }

    # Lapse as the attribute will compute it: last paid, non-canceled order of the account.
    paid_ok = (all_paid >= 0) & (all_canceled < 0) & (all_customer != None)  # noqa: E711
    last_paid = pd.Series(all_paid[paid_ok]).groupby(all_customer[paid_ok]).max()
    lapsed = int((last_paid < now - 60 * DAY).sum())

    manifest = StoreManifest(
        seed=seed,
        as_of=as_of.astimezone(timezone.utc).isoformat(),
        plan=plan,
        rows={k: len(v) for k, v in tables.items()},
        canceled_orders=int(n_cancel),
        lapsed_over_60d=lapsed,
        ids={
            "registered_later": cust_id[g_registered].tolist(),
            "email_changed": cust_id[g_changed].tolist(),
            "case_variant_emails": cust_id[g_variant].tolist(),
            "shared_email_pairs": cust_id[g_shared].tolist(),
            "lapsed_61d": cust_id[g_l61].tolist(),
            "active_59d": cust_id[g_a59].tolist(),
            "erased_customers": cust_id[erased].tolist(),
            "quick_checkout_orders": order_ids[quick].tolist(),
        },
    )
    return Store(tables=tables, manifest=manifest)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

_NULL = "\\N"
COPY_CHUNK_ROWS = 250_000


def _as_copy_frame(rel: contract.Relation, df: pd.DataFrame) -> pd.DataFrame:
    """Timestamps are epoch seconds in memory (-1 = NULL); COPY wants ISO-8601 text."""
    out = {}
    for col in rel.columns:
        values = df[col.name].to_numpy()
        if col.kind == "timestamp":
            arr = values.astype(np.int64)
            text = np.datetime_as_string(arr.astype("datetime64[s]"), unit="s").astype(object) + "Z"
            text[arr < 0] = None
            out[col.name] = text
        elif col.kind == "boolean":
            out[col.name] = np.where(values.astype(bool), "t", "f")
        else:
            out[col.name] = values
    return pd.DataFrame(out)


def _copy_frame(cur: psycopg.Cursor, schema: str, rel: contract.Relation, df: pd.DataFrame) -> None:
    stmt = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv, NULL {})").format(
        sql.Identifier(schema, rel.name),
        sql.SQL(", ").join(map(sql.Identifier, rel.column_names)),
        sql.Literal(_NULL),
    )
    with cur.copy(stmt) as cp:
        for start in range(0, len(df), COPY_CHUNK_ROWS):
            chunk = _as_copy_frame(rel, df.iloc[start:start + COPY_CHUNK_ROWS])
            buf = io.StringIO()
            chunk.to_csv(buf, header=False, index=False, na_rep=_NULL)
            cp.write(buf.getvalue().encode())


def load_store(conn: psycopg.Connection, store: Store, schema: str = "commerce", *, replace: bool = False,
               progress=None) -> dict[str, float]:
    """Create the contract schema and COPY the store into it, then add keys and indexes.

    Returns seconds per relation. Refuses to touch an existing schema unless replace=True.
    """
    import time

    timings: dict[str, float] = {}
    with conn.transaction(), conn.cursor() as cur:
        exists = cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        if exists and not replace:
            raise RuntimeError(f"schema {schema!r} already exists; pass replace=True (CLI: --replace) to recreate it")
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        cur.execute("SET LOCAL timezone = 'UTC'")
        for rel in contract.SOURCE_RELATIONS:
            start = time.perf_counter()
            cur.execute(contract.create_table_sql(schema, rel))
            _copy_frame(cur, schema, rel, store.tables[rel.name])
            timings[rel.name] = time.perf_counter() - start
            if progress:
                progress(f"loaded {rel.name}: {len(store.tables[rel.name]):,} rows in {timings[rel.name]:.1f}s")
        start = time.perf_counter()
        for rel in contract.SOURCE_RELATIONS:
            for stmt in contract.constraint_sql(schema, rel):
                cur.execute(stmt)
        timings["keys_and_indexes"] = time.perf_counter() - start
        if progress:
            progress(f"keys and indexes in {timings['keys_and_indexes']:.1f}s")
    with conn.cursor() as cur:
        for rel in contract.SOURCE_RELATIONS:
            cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(schema, rel.name)))
    return timings


def default_as_of() -> datetime:
    """The current hour, so a store seeded now has recent activity but stays reproducible within the hour."""
    return datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)


def parse_as_of(text: str) -> datetime:
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


__all__ = ["EdgeCasePlan", "Store", "StoreManifest", "generate_store", "load_store", "default_as_of", "parse_as_of", "timedelta"]

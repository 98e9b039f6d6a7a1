"""Delivery to Customer.io through the ledger: what was accepted is never sent again.

The ledger lives in the state database. Each batch's outcome is committed as soon as
Customer.io answers, so a run that dies midway resumes from the ledger: accepted ops are
skipped, the batch in flight is sent again (same event ids, which Customer.io drops as
duplicates). With no client (dry run) everything is built, checked and recorded as
"would_send", and no request is made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pg2cio_assets import sync
from pg2cio_assets.customerio import MAX_REQUEST_BYTES, TRIGGER_WINDOW_HOURS, TrackClient, encode, op_problem, pack_batches
from pg2cio_assets.suppression import SEND, SUPPRESS, Suppression, classify, trigger_cutoff
from pg2cio_assets.state import add_missing_columns, read_frame

LEDGER_DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {events} (
    event_id text PRIMARY KEY, name text NOT NULL, person_key text NOT NULL, status text NOT NULL,
    reason text, op_bytes integer, occurred_at timestamptz, updated_at timestamptz NOT NULL, run_id text,
    source_changed_at timestamptz, path text
);
CREATE INDEX IF NOT EXISTS cio_event_ledger_status ON {events} (status) WHERE status IN ('suppressed', 'skipped');
CREATE TABLE IF NOT EXISTS {attributes} (
    person_key text NOT NULL, attribute text NOT NULL, value jsonb NOT NULL, accepted_at timestamptz NOT NULL,
    PRIMARY KEY (person_key, attribute)
);
CREATE TABLE IF NOT EXISTS {merges} (
    merge_id text PRIMARY KEY, primary_id text NOT NULL, secondary_email text NOT NULL, status text NOT NULL,
    reason text, updated_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {erasures} (
    person_key text PRIMARY KEY, action text NOT NULL, status text NOT NULL, reason text, updated_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {held} (
    person_key text NOT NULL, attribute text NOT NULL, reason text NOT NULL, run_id text, held_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {rejections} (
    kind text NOT NULL, key text NOT NULL, reason text NOT NULL, run_id text, rejected_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {requests} (
    run_id text, asset text NOT NULL, sent_at timestamptz NOT NULL, ops integer NOT NULL, bytes integer NOT NULL,
    status integer NOT NULL, attempts integer NOT NULL, rejected_ops integer NOT NULL
);
"""
LEDGER_TABLES = {
    "events": "cio_event_ledger", "attributes": "cio_attribute_ledger", "merges": "cio_merge_ledger",
    "erasures": "cio_erasure_ledger", "held": "cio_held_attributes", "rejections": "cio_rejections",
    "requests": "cio_requests",
}


def tables(schema: str) -> dict[str, sql.Identifier]:
    return {k: sql.Identifier(schema, v) for k, v in LEDGER_TABLES.items()}


def ensure_ledger(conn: psycopg.Connection, schema: str) -> None:
    with conn.transaction():
        conn.execute(sql.SQL(LEDGER_DDL).format(schema=sql.Identifier(schema), **tables(schema)))
    # Ledgers from earlier releases gain their new columns; ALTER TABLE locks the table even
    # when the column exists, so it only runs when one is missing.
    add_missing_columns(conn, schema, LEDGER_TABLES["events"], {"source_changed_at": "timestamptz", "path": "text"})


@dataclass
class Delivery:
    """What one sync did: counts by outcome, requests, bytes, batch sizes."""

    outcomes: dict[str, int] = field(default_factory=dict)
    by_name: dict[str, dict[str, int]] = field(default_factory=dict)
    requests: int = 0
    bytes: int = 0
    batch_bytes: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, outcome: str, name: str | None = None, n: int = 1) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + n
        if name:
            per = self.by_name.setdefault(name, {})
            per[outcome] = per.get(outcome, 0) + n

    @property
    def mean_batch_fill(self) -> float:
        return sync.batch_fill(self.batch_bytes, MAX_REQUEST_BYTES)

    def metadata(self) -> dict:
        return {
            "outcomes": dict(sorted(self.outcomes.items())),
            "requests": self.requests,
            "bytes_sent": self.bytes,
            "mean_batch_bytes": round(sum(self.batch_bytes) / len(self.batch_bytes)) if self.batch_bytes else 0,
            "mean_batch_fill": round(self.mean_batch_fill, 3),
        }


def _now() -> datetime:
    return datetime.now(timezone.utc)


def send_in_batches(
    conn: psycopg.Connection, client: TrackClient | None, schema: str, asset: str, run_id: str | None,
    ops: list[dict], on_done: Callable[[psycopg.Connection, list[int], dict[int, str]], None], delivery: Delivery,
    log: Callable[[str], None], encoded: list[bytes] | None = None,
) -> None:
    """Pack ops into batches and send them in order; after each answer, `on_done(conn, accepted,
    rejected)` records the outcome in the ledger in the same transaction as the request log.
    `encoded`: the ops already encoded (each op is encoded once per sync, not once per use)."""
    if not ops:
        return
    encoded = encoded if encoded is not None else [encode(op) for op in ops]
    batches = pack_batches(encoded)
    for n, batch in enumerate(batches, 1):
        body = [encoded[i] for i in batch]
        if client is None:
            with conn.transaction():
                on_done(conn, batch, {})
            continue
        result = client.send_batch(body)
        rejected = {batch[i]: reason for i, reason in result.errors.items()}
        accepted = [i for i in batch if i not in rejected]
        with conn.transaction():
            on_done(conn, accepted, rejected)
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(tables(schema)["requests"]),
                (run_id, asset, _now(), len(batch), result.request_bytes, result.status, result.attempts, len(rejected)),
            )
        delivery.requests += 1
        delivery.bytes += result.request_bytes
        delivery.batch_bytes.append(result.request_bytes)
        log(f"{asset}: batch {n}/{len(batches)}: {len(accepted):,} accepted, {len(rejected):,} rejected, "
            f"{result.request_bytes:,} bytes, {result.attempts} attempt(s)")


def sync_people(
    conn: psycopg.Connection, client: TrackClient | None, schema: str, *, as_of: datetime, erase_action: str,
    run_id: str | None, log: Callable[[str], None] = lambda _m: None,
) -> Delivery:
    """Identify people whose attributes changed, then send merges and erasures, through the ledger."""
    started = time.perf_counter()
    ensure_ledger(conn, schema)
    t = tables(schema)
    delivery = Delivery()
    dry = client is None
    people = read_frame(conn, sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, "person_attributes")))
    ledger: dict[str, dict[str, object]] = {}
    for key, attribute, value in conn.execute(sql.SQL("SELECT person_key, attribute, value FROM {}").format(t["attributes"])):
        ledger.setdefault(key, {})[attribute] = value
    erased_done = {r[0] for r in conn.execute(sql.SQL(
        "SELECT person_key FROM {} WHERE status = 'accepted'").format(t["erasures"]))}

    rows = people.to_dict("records")
    live = [r for r in rows if not r["is_erased"]]
    erased = [r for r in rows if r["is_erased"] and r["person_key"] not in erased_done]
    pending_merges = read_frame(conn, sql.SQL(
        "SELECT m.merge_id, m.primary_id, m.secondary_email FROM {merges} m "
        "WHERE NOT EXISTS (SELECT 1 FROM {ledger} l WHERE l.merge_id = m.merge_id AND l.status IN ('accepted', 'rejected')) "
        "ORDER BY m.merge_id"
    ).format(merges=sql.Identifier(schema, "identity_merges"), ledger=t["merges"])).to_dict("records")
    held_rows: list[tuple[str, str, str]] = []

    def identify(plan: sync.PersonOps) -> None:
        def identified(conn, accepted, rejected):
            now = _now()
            values = []
            for i in accepted:
                change = plan.changes[i]
                key = change["person_key"]
                for attribute, value in change.items():
                    if attribute != "person_key":
                        ledger.setdefault(key, {})[attribute] = value
                        values.append((key, attribute, Jsonb(value), now))
            with conn.cursor() as cur:
                if values and not dry:
                    cur.executemany(sql.SQL(
                        "INSERT INTO {} VALUES (%s, %s, %s, %s) ON CONFLICT (person_key, attribute) "
                        "DO UPDATE SET value = EXCLUDED.value, accepted_at = EXCLUDED.accepted_at"
                    ).format(t["attributes"]), values)
                if rejected:
                    cur.executemany(sql.SQL("INSERT INTO {} VALUES ('identify', %s, %s, %s, %s)").format(t["rejections"]),
                                    [(plan.changes[i]["person_key"], reason, run_id, now) for i, reason in rejected.items()])
            delivery.count("would_send" if dry else "accepted", "identify", len(accepted))
            delivery.count("rejected", "identify", len(rejected))

        send_in_batches(conn, client, schema, "customerio_people_sync", run_id, plan.ops, identified, delivery, log)

    # 1. Identify everyone who changed; a primary with a merge to come is identified without its email.
    first = sync.people_ops(live, ledger, as_of, withhold_email=frozenset(m["primary_id"] for m in pending_merges))
    delivery.count("unchanged", n=first.unchanged)
    held_rows += first.held
    identify(first)

    # 2. Merges, once their primary exists in Customer.io.
    merge_rows = [m for m in pending_merges if m["primary_id"] in ledger]

    def merged(conn, accepted, rejected):
        now = _now()
        for i in accepted + list(rejected):
            m = merge_rows[i]
            status = "would_send" if dry else ("rejected" if i in rejected else "accepted")
            conn.execute(sql.SQL(
                "INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (merge_id) DO UPDATE SET "
                "status = EXCLUDED.status, reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at").format(t["merges"]),
                (m["merge_id"], m["primary_id"], m["secondary_email"], status, rejected.get(i), now))
        delivery.count("would_send" if dry else "accepted", "merge", len(accepted))
        delivery.count("rejected", "merge", len(rejected))

    send_in_batches(conn, client, schema, "customerio_people_sync", run_id,
                    [sync.merge_op(m["primary_id"], m["secondary_email"]) for m in merge_rows], merged, delivery, log)

    # 3. The emails withheld in step 1, now that their guest profiles are folded in.
    merged_keys = {m["primary_id"] for m in merge_rows}
    second = sync.people_ops([r for r in live if r["person_key"] in merged_keys], ledger, as_of)
    identify(second)
    with conn.transaction():
        conn.execute(sql.SQL("DELETE FROM {}").format(t["held"]))
        for key, attribute, reason in held_rows:
            conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s)").format(t["held"]),
                         (key, attribute, reason, run_id, _now()))
    delivery.count("held", n=len(held_rows))
    if held_rows:
        log(f"{len(held_rows):,} attribute value(s) held back (see {schema}.{LEDGER_TABLES['held']}): {held_rows[:3]}")

    def erased_cb(conn, accepted, rejected):
        now = _now()
        for i in accepted + list(rejected):
            status = "would_send" if dry else ("rejected" if i in rejected else "accepted")
            conn.execute(sql.SQL(
                "INSERT INTO {} VALUES (%s, %s, %s, %s, %s) ON CONFLICT (person_key) DO UPDATE SET "
                "status = EXCLUDED.status, reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at").format(t["erasures"]),
                (erased[i]["person_key"], erase_action, status, rejected.get(i), now))
        delivery.count("would_send" if dry else "accepted", erase_action, len(accepted))
        delivery.count("rejected", erase_action, len(rejected))

    send_in_batches(conn, client, schema, "customerio_people_sync", run_id,
                    [sync.erase_op(r["cio_identifier_type"], r["cio_identifier"], erase_action) for r in erased],
                    erased_cb, delivery, log)
    delivery.seconds = time.perf_counter() - started
    return delivery


EVENT_CHUNK = 50_000
# Ledger statuses an events sync never sends again. 'suppressed' (held by a backfill) is
# released once the event is older than the trigger window; 'skipped' (attributes_only) and
# 'would_send' (dry run) are sent by the next live run of their window.
SETTLED = ("accepted", "rejected", "quarantined")
PATHS = ("sensor", "run", "backfill", "released")


def _events_query(schema: str, t: dict, released: bool) -> sql.Composed:
    """One chunk of unsettled events: of the window, or (released) held events now too old to trigger."""
    scope = (
        "l.status = 'suppressed' AND e.timestamp < %(cutoff)s "
        "AND NOT (e.occurred_at >= %(start)s AND e.occurred_at < %(end)s)"
        if released else
        "e.occurred_at >= %(start)s AND e.occurred_at < %(end)s "
        "AND (l.status IS NULL OR l.status NOT IN ('accepted', 'rejected', 'quarantined')) "
        "AND (l.status IS NULL OR l.status NOT IN ('suppressed', 'skipped') OR e.timestamp < %(cutoff)s)"
    )
    return sql.SQL(
        """
        SELECT e.event_id, e.name, e.person_key, e.cio_identifier_type, e.cio_identifier, e.timestamp,
               e.properties, e.occurred_at, e.source_changed_at, l.status AS ledger_status
        FROM {events} e LEFT JOIN {ledger} l ON l.event_id = e.event_id
        WHERE """ + scope + """
          AND (e.occurred_at, e.event_id) > (%(after_at)s, %(after_id)s)
          AND NOT EXISTS (SELECT 1 FROM {erasures} x WHERE x.person_key = e.person_key)
          AND NOT EXISTS (SELECT 1 FROM {attrs} p WHERE p.person_key = e.person_key AND p.is_erased)
        ORDER BY e.occurred_at, e.event_id
        LIMIT %(chunk)s
        """
    ).format(events=sql.Identifier(schema, "events"), ledger=t["events"], erasures=t["erasures"],
             attrs=sql.Identifier(schema, "person_attributes"))


def sync_events(
    conn: psycopg.Connection, client: TrackClient | None, schema: str, *, start, end, run_id: str | None,
    log: Callable[[str], None] = lambda _m: None, chunk: int = EVENT_CHUNK,
    suppression: Suppression | None = None, now: datetime | None = None, path: str = "run", preview: bool = False,
) -> Delivery:
    """Send the window's events that the ledger has not settled, skipping erased people.

    The window is read in chunks of `chunk` events (keyset pagination on occurred_at, event_id),
    so memory is bounded by the chunk, not by the window: a first partition can hold years.
    `suppression` (a backfill's policy) holds or skips events instead of sending them; events a
    backfill held earlier are sent once they are older than the trigger window, whatever the
    window. `preview` decides everything and counts it, and writes and sends nothing: the
    counts are what the same call without `preview` would do now."""
    started = time.perf_counter()
    ensure_ledger(conn, schema)
    t = tables(schema)
    delivery = Delivery()
    now = now or _now()
    cutoff = trigger_cutoff(now)
    scopes = [(False, path)]
    if suppression is None or suppression.policy != "attributes_only":
        scopes.append((True, "released"))
    for released, scope_path in scopes:
        query = _events_query(schema, t, released)
        after_at, after_id = "-infinity", ""
        while True:
            with conn.cursor(row_factory=dict_row) as cur:
                rows = cur.execute(query, {"start": start, "end": end, "after_at": after_at, "after_id": after_id,
                                           "chunk": chunk, "cutoff": cutoff}).fetchall()
            if not rows:
                break
            after_at, after_id = rows[-1]["occurred_at"], rows[-1]["event_id"]
            if released:
                log(f"customerio_events_sync: {len(rows):,} events held by a backfill are now older than "
                    f"{TRIGGER_WINDOW_HOURS} h and go out (they can no longer trigger a campaign)")
            _send_events(conn, client, schema, t, rows, run_id, delivery, log,
                         suppression=None if released else suppression, now=now, path=scope_path, preview=preview)
    delivery.seconds = time.perf_counter() - started
    return delivery


def _send_events(conn, client, schema, t, rows, run_id, delivery, log, *, suppression, now, path, preview) -> None:
    dry = client is None
    ops, encoded, sendable, held = [], [], [], []
    for row in rows:
        op = sync.event_op(row)
        body = encode(op)
        problem = op_problem(op, body)
        if problem:
            held.append(_event_row(row, "quarantined", problem, run_id, None, path))
            delivery.count("would_quarantine" if preview else "quarantined", row["name"])
            continue
        decision = classify(int(row["timestamp"]), now, suppression)
        if decision == SEND:
            ops.append(op)
            encoded.append(body)
            sendable.append(row)
            continue
        status = "suppressed" if decision == SUPPRESS else "skipped"
        held.append(_event_row(row, status, suppression.reason(), run_id, None, path))
        delivery.count(("would_" + decision) if preview else status, row["name"])
    if preview:
        for row in sendable:
            delivery.count("would_send", row["name"])
        return
    with conn.transaction():
        _record_events(conn, t, held)
    log(f"customerio_events_sync: {len(ops):,} events to send, {len(held):,} not sent "
        f"({delivery.outcomes.get('suppressed', 0):,} suppressed, {delivery.outcomes.get('skipped', 0):,} skipped, "
        f"{delivery.outcomes.get('quarantined', 0):,} over a limit so far)")

    def settled(conn, accepted, rejected):
        status = "would_send" if dry else "accepted"
        records = [_event_row(sendable[i], status, None, run_id, len(encoded[i]), path) for i in accepted]
        records += [_event_row(sendable[i], "rejected", reason, run_id, len(encoded[i]), path) for i, reason in rejected.items()]
        _record_events(conn, t, records)
        for i in accepted:
            delivery.count(status, sendable[i]["name"])
        for i in rejected:
            delivery.count("rejected", sendable[i]["name"])

    send_in_batches(conn, client, schema, "customerio_events_sync", run_id, ops, settled, delivery, log, encoded)


def _event_row(row: dict, status: str, reason: str | None, run_id: str | None, op_bytes: int | None, path: str) -> tuple:
    return (row["event_id"], row["name"], row["person_key"], status, reason, op_bytes, row["occurred_at"], _now(), run_id,
            row.get("source_changed_at"), path)


LEDGER_COLUMNS = ["event_id", "name", "person_key", "status", "reason", "op_bytes", "occurred_at", "updated_at", "run_id",
                  "source_changed_at", "path"]


def _record_events(conn: psycopg.Connection, t: dict, records: list[tuple]) -> None:
    """Upsert ledger rows (LEDGER_COLUMNS order): COPY into a scratch table, then one INSERT ...
    ON CONFLICT, in the caller's transaction (several times faster than row-by-row inserts)."""
    if not records:
        return
    cols = sql.SQL(", ").join(map(sql.Identifier, LEDGER_COLUMNS))
    updates = sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in LEDGER_COLUMNS[3:])
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS pg2cio_ledger_in (LIKE {} INCLUDING DEFAULTS) "
                            "ON COMMIT DELETE ROWS").format(t["events"]))
        with cur.copy(sql.SQL("COPY pg2cio_ledger_in ({}) FROM STDIN").format(cols)) as copy:
            for record in records:
                copy.write_row(record)
        # A final outcome is never overwritten (two syncs overlapping, say), and a hold survives a
        # dry run or an attributes_only backfill, so the released scope still finds it.
        cur.execute(sql.SQL(
            "INSERT INTO {ledger} AS l ({cols}) SELECT {cols} FROM pg2cio_ledger_in "
            "ON CONFLICT (event_id) DO UPDATE SET {updates} "
            "WHERE l.status NOT IN ('accepted', 'rejected', 'quarantined') "
            "AND NOT (l.status = 'suppressed' AND EXCLUDED.status IN ('would_send', 'skipped'))"
        ).format(ledger=t["events"], cols=cols, updates=updates))
        cur.execute("TRUNCATE pg2cio_ledger_in")


def report_rows(conn: psycopg.Connection, schema: str) -> list[tuple[str, str, int]]:
    """(kind, outcome, count) over the whole ledger: events per name, identifies, merges, erasures."""
    t = tables(schema)
    ensure_ledger(conn, schema)
    rows = conn.execute(sql.SQL(
        """
        SELECT name, status, count(*) FROM {events} GROUP BY 1, 2
        UNION ALL SELECT 'merge', status, count(*) FROM {merges} GROUP BY 2
        UNION ALL SELECT action, status, count(*) FROM {erasures} GROUP BY 1, 2
        UNION ALL SELECT 'identify', 'rejected', count(*) FROM {rejections} WHERE kind = 'identify'
        UNION ALL SELECT 'attribute', 'held', count(*) FROM {held}
        UNION ALL SELECT 'person', 'identified', count(DISTINCT person_key) FROM {attributes}
        ORDER BY 1, 2
        """
    ).format(**t)).fetchall()
    return [(k, s, int(n)) for k, s, n in rows if n]





# --- delivery latency: from the source row's change to Customer.io's acceptance -------------
# These read a ledger that exists (ensure_ledger, or report_rows, has run on the connection).

LIVE_PATHS = ("sensor", "run")  # backfills and released holds are late by design


@dataclass(frozen=True)
class Latency:
    name: str  # an event name, or a use case
    path: str
    events: int
    p50: float  # seconds
    p95: float
    max: float


def latency_rows(conn: psycopg.Connection, schema: str, since: datetime | None = None) -> list[Latency]:
    """p50 / p95 / max seconds from source_changed_at to acceptance, per event name and path."""
    t = tables(schema)
    rows = conn.execute(sql.SQL(
        """
        SELECT name, path, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY s),
               percentile_cont(0.95) WITHIN GROUP (ORDER BY s), max(s)
        FROM (SELECT name, coalesce(path, 'run') AS path, extract(epoch FROM updated_at - source_changed_at)::float8 AS s
              FROM {events} WHERE status = 'accepted' AND source_changed_at IS NOT NULL
                AND (%(since)s::timestamptz IS NULL OR updated_at >= %(since)s)) x
        GROUP BY 1, 2 ORDER BY 1, 2
        """
    ).format(**t), {"since": since}).fetchall()
    return [Latency(n, p, int(c), float(a), float(b), float(m)) for n, p, c, a, b, m in rows]


def use_case_latency(conn: psycopg.Connection, schema: str, names: list[str], since: datetime) -> Latency | None:
    """Latency of the live paths (sensor, run) over `names`, for events accepted since `since`."""
    t = tables(schema)
    row = conn.execute(sql.SQL(
        """
        SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY s), percentile_cont(0.95) WITHIN GROUP (ORDER BY s), max(s)
        FROM (SELECT extract(epoch FROM updated_at - source_changed_at)::float8 AS s FROM {events}
              WHERE status = 'accepted' AND source_changed_at IS NOT NULL AND name = ANY(%(names)s)
                AND coalesce(path, 'run') = ANY(%(paths)s) AND updated_at >= %(since)s) x
        """
    ).format(**t), {"names": names, "paths": list(LIVE_PATHS), "since": since}).fetchone()
    if not row[0]:
        return None
    return Latency(",".join(names), "live", int(row[0]), float(row[1]), float(row[2]), float(row[3]))


def recovery_false_positives(conn: psycopg.Connection, schema: str, delay_minutes: int, now: datetime | None = None) -> dict:
    """checkout_started events that could trigger a recovery journey, and how many of them had
    an order_paid paid before the journey's first message (checkout + delay) that Customer.io
    learnt of only after it (or not yet): the shoppers who get a "you forgot something" after buying."""
    t = tables(schema)
    empty = {"checkouts_that_could_trigger": 0, "paid_before_first_message_but_known_after": 0,
             "first_message_after_minutes": delay_minutes}
    if not conn.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = %s AND table_name = 'events'",
                        (schema,)).fetchone():
        return empty
    checkouts, at_risk = conn.execute(sql.SQL(
        """
        WITH c AS (
            SELECT e.person_key, e.occurred_at FROM {ev} e JOIN {ledger} l USING (event_id)
            WHERE e.name = 'checkout_started' AND l.status = 'accepted' AND coalesce(l.path, 'run') = ANY(%(paths)s)
              AND l.updated_at < e.occurred_at + make_interval(hours => %(window)s)
        ), o AS (
            SELECT e.person_key, e.occurred_at AS paid_at,
                   coalesce(CASE WHEN l.status = 'accepted' THEN l.updated_at END, %(now)s) AS known_at
            FROM {ev} e LEFT JOIN {ledger} l USING (event_id) WHERE e.name = 'order_paid'
        )
        SELECT count(*), count(*) FILTER (WHERE EXISTS (
            SELECT 1 FROM o WHERE o.person_key = c.person_key AND o.paid_at >= c.occurred_at
              AND o.paid_at < c.occurred_at + make_interval(mins => %(delay)s)
              AND o.known_at > c.occurred_at + make_interval(mins => %(delay)s)))
        FROM c
        """
    ).format(ev=sql.Identifier(schema, "events"), ledger=t["events"]),
        {"paths": list(LIVE_PATHS), "window": TRIGGER_WINDOW_HOURS, "delay": delay_minutes, "now": now or _now()}).fetchone()
    return {"checkouts_that_could_trigger": int(checkouts), "paid_before_first_message_but_known_after": int(at_risk),
            "first_message_after_minutes": delay_minutes}

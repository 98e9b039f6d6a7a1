"""What changed in the source since the sensor last looked: the near-real-time path's input.

The cursor is the highest (changed_at, key) seen, plus the digests of the rows seen within
the safety overlap behind it. Each poll reads again from `high - overlap`, so a row committed
late with an older updated_at (a long transaction, a clock a little behind) is still found;
the digests keep rows already handed to a run from being handed again. A row that changes
again has a new changed_at, hence a new digest, and counts as a new change.

`poll` reads the source (SQL, bound parameters, identifiers composed); `plan` is pure.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import psycopg
from psycopg import sql

from pg2cio_assets import contract


@dataclass(frozen=True)
class Change:
    relation: str
    key: str
    changed_at: datetime
    event_times: tuple[datetime, ...] = ()  # when the row's events happened (they pick the events partitions)

    @property
    def digest(self) -> str:
        raw = f"{self.relation}\x1f{self.key}\x1f{self.changed_at.isoformat()}"
        return hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()


@dataclass
class Cursor:
    high: datetime | None = None  # highest changed_at handed to a run (never beyond the poll's now)
    seen: dict[str, float] = field(default_factory=dict)  # digest -> changed_at (unix) of rows inside the overlap

    def dumps(self) -> str:
        return json.dumps({"high": self.high.isoformat() if self.high else None, "seen": self.seen},
                          separators=(",", ":"), sort_keys=True)

    @classmethod
    def loads(cls, raw: str | None) -> Cursor:
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            high = datetime.fromisoformat(data["high"]) if data.get("high") else None
            return cls(high, {str(k): float(v) for k, v in data.get("seen", {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"the sensor cursor {raw[:80]!r} is not one pg2cio wrote ({exc}); "
                             "reset it in the UI (Sensors -> source_changes_sensor -> Reset cursor)") from None


@dataclass(frozen=True)
class Batch:
    new: list[Change]  # changes no run has been asked for yet
    cursor: Cursor  # the cursor after this batch
    run_key: str | None  # deterministic: the same changes give the same key

    def by_relation(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.new:
            out[c.relation] = out.get(c.relation, 0) + 1
        return dict(sorted(out.items()))

    def days(self, now: datetime, trigger_window: timedelta) -> list[date]:
        """UTC days to rebuild: where the changed rows now sit (their changed_at), and where
        their events fall while those can still trigger a campaign. An event stamped before the
        trigger window cannot start a journey: the nightly refresh or a backfill rebuilds its day."""
        days = {c.changed_at.astimezone(timezone.utc).date() for c in self.new}
        for c in self.new:
            days.update(t.astimezone(timezone.utc).date() for t in c.event_times if t >= now - trigger_window)
        return sorted(days)


POLL_LIMIT = 100_000  # rows per relation per poll: a sensor off for days catches up over several ticks


def _key_sql(rel: contract.Relation) -> sql.Composable:
    # A JSON array keeps NULLs and separators apart: ('a', NULL, 'b') and ('a', 'b', NULL) differ.
    cols = rel.primary_key or rel.column_names
    return sql.SQL("json_build_array({})::text").format(sql.SQL(", ").join(map(sql.Identifier, cols)))


def changes_query(relation: str, schema: str, ahead: bool) -> sql.Composed:
    """The relation's changed rows: within the overlap, [%(since)s, %(high)s], all of them (late
    commits land there); or ahead of the cursor, > %(high)s, the first %(limit)s."""
    rel = contract.relation(relation)
    times = [c for c in contract.event_timestamp_columns(relation) if c != rel.partition_column]
    where = ("{col} > %(high)s ORDER BY {col} LIMIT %(limit)s" if ahead
             else "{col} >= %(since)s AND {col} <= %(high)s")
    return sql.SQL("SELECT {key}, {col}{times} FROM {table} WHERE " + where).format(
        key=_key_sql(rel), col=sql.Identifier(rel.partition_column), table=sql.Identifier(schema, relation),
        times=sql.SQL("").join(sql.SQL(", {}").format(sql.Identifier(c)) for c in times),
    )


@dataclass
class Poll:
    changes: list[Change]
    # When a relation had more than `limit` rows ahead of the cursor, the changed_at it stopped
    # at: the cursor goes no further this tick, and the next one reads on from there.
    stopped_at: datetime | None = None


def poll(conn: psycopg.Connection, schema: str, cursor: Cursor, *, now: datetime, overlap: timedelta,
         relations: tuple[str, ...] = contract.CHANGE_FEEDS, limit: int = POLL_LIMIT) -> Poll:
    """Every watched row changed at or after `cursor.high - overlap` (first poll: `now - overlap`):
    the overlap in full, and at most `limit` rows per relation beyond the cursor."""
    params = {"since": (cursor.high or now) - overlap, "high": cursor.high or (now - overlap - timedelta(microseconds=1)),
              "limit": limit}
    found: list[Change] = []
    stopped: list[datetime] = []
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for relation in relations:
            rows = conn.execute(changes_query(relation, schema, ahead=False), params).fetchall() if cursor.high else []
            ahead = conn.execute(changes_query(relation, schema, ahead=True), params).fetchall()
            for key, changed_at, *times in rows + ahead:
                found.append(Change(relation, key, changed_at, tuple(t for t in times if t is not None) + (changed_at,)))
            if len(ahead) == limit:
                stopped.append(ahead[-1][1])
    return Poll(found, min(stopped) if stopped else None)


def plan(changes: list[Change], cursor: Cursor, *, now: datetime, overlap: timedelta,
         stopped_at: datetime | None = None) -> Batch:
    """Which of `changes` are new, and the cursor after handing them to a run."""
    new = [c for c in changes if c.digest not in cursor.seen]
    high = cursor.high
    if changes:
        top = min(max(c.changed_at for c in changes), now)  # a row stamped in the future never drags the cursor there
        if stopped_at is not None:
            top = min(top, stopped_at)
        high = top if high is None or top > high else high
    floor = ((high or now) - overlap).timestamp()
    seen = {d: t for d, t in cursor.seen.items() if t >= floor}
    seen.update({c.digest: c.changed_at.timestamp() for c in changes if c.changed_at.timestamp() >= floor})
    run_key = None
    if new:
        run_key = "changes-" + hashlib.blake2b("".join(sorted(c.digest for c in new)).encode(), digest_size=10).hexdigest()
    return Batch(new=new, cursor=Cursor(high, seen), run_key=run_key)

"""Incremental, partition-replacing extracts of contract relations into pg2cio's state database.

One call moves one relation's rows for a time window: it streams them from the source in a
consistent snapshot, validates each chunk against the contract's Pandera schema, and, in one
state transaction, replaces the window (and any older copy of the same rows) with what it
read. A failure anywhere rolls back: no partially written partition is ever left behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import psycopg
from psycopg import sql

from pg2cio_assets import contract
from pg2cio_assets.partitions import sql_bound
from pg2cio_assets.pg import check_source
from pg2cio_assets.schemas import ValidationError, frame_from_rows, validate_frame

CHUNK_ROWS = 50_000
META_COLUMNS = ("_partition_at", "_extracted_at", "_run_id")


def state_table_name(rel: contract.Relation) -> str:
    return f"{rel.name}_extract"


@dataclass(frozen=True)
class ExtractResult:
    relation: str
    table: str  # schema.table in the state database
    window_start: datetime
    window_end: datetime
    rows_read: int  # rows of the window, as read from the source
    source_count: int  # SQL count of the window in the same snapshot
    rows_replaced: int  # older copies removed from the state table (this window, or superseded rows)
    window_rows: int  # rows of the window in the state table after the write
    table_rows: int  # rows in the state table afterwards
    chunks: int
    seconds: float


def _idents(names) -> sql.Composed:
    return sql.SQL(", ").join(map(sql.Identifier, names))


def _state_column_type(col: contract.Column) -> str:
    return contract.SOURCE_KINDS[col.kind].state_type


def window_filter(rel: contract.Relation, source_schema: str) -> tuple[sql.Composed, sql.Composed]:
    """FROM clause and WHERE clause placing the relation's rows in [start, end)."""
    if rel.parent is None:
        src = sql.SQL("{} AS r").format(sql.Identifier(source_schema, rel.name))
        where = sql.SQL("r.{col} >= %(start)s AND r.{col} < %(end)s").format(col=sql.Identifier(rel.partition_column))
        return src, where
    join = sql.SQL(" AND ").join(
        sql.SQL("p.{c} = r.{c}").format(c=sql.Identifier(c)) for c in rel.parent.columns
    )
    src = sql.SQL("{} AS r JOIN {} AS p ON {}").format(
        sql.Identifier(source_schema, rel.name), sql.Identifier(source_schema, rel.parent.relation), join
    )
    where = sql.SQL("p.{col} >= %(start)s AND p.{col} < %(end)s").format(col=sql.Identifier(rel.partition_column))
    return src, where


def window_query(rel: contract.Relation, source_schema: str) -> sql.Composed:
    src, where = window_filter(rel, source_schema)
    owner = "p" if rel.parent else "r"
    order = rel.primary_key or rel.column_names
    return sql.SQL("SELECT {cols}, {owner}.{pcol} FROM {src} WHERE {where} ORDER BY {order}").format(
        cols=sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in rel.column_names),
        owner=sql.Identifier(owner),
        pcol=sql.Identifier(rel.partition_column),
        src=src,
        where=where,
        order=sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in order),
    )


def window_count_query(rel: contract.Relation, source_schema: str) -> sql.Composed:
    src, where = window_filter(rel, source_schema)
    return sql.SQL("SELECT count(*) FROM {} WHERE {}").format(src, where)


def _parent_keys_query(rel: contract.Relation, source_schema: str) -> sql.Composed:
    assert rel.parent is not None
    return sql.SQL("SELECT {keys} FROM {parent} WHERE {col} >= %(start)s AND {col} < %(end)s").format(
        keys=_idents(rel.parent.columns),
        parent=sql.Identifier(source_schema, rel.parent.relation),
        col=sql.Identifier(rel.partition_column),
    )


def ensure_state_table(cur: psycopg.Cursor, rel: contract.Relation, state_schema: str) -> sql.Identifier:
    table = sql.Identifier(state_schema, state_table_name(rel))
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(state_schema)))
    cols = [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(_state_column_type(c))) for c in rel.columns]
    cols += [
        sql.SQL("_partition_at timestamptz NOT NULL"),
        sql.SQL("_extracted_at timestamptz NOT NULL"),
        sql.SQL("_run_id text"),
    ]
    cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(table, sql.SQL(", ").join(cols)))
    # A contract that grew a column since the table was made: add it (older rows hold NULL).
    for c in rel.columns:
        cur.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                table, sql.Identifier(c.name), sql.SQL(_state_column_type(c))
            )
        )
    base = state_table_name(rel)
    cur.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (_partition_at)").format(sql.Identifier(f"{base}_partition_at"), table)
    )
    if rel.primary_key:
        cur.execute(
            sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})").format(
                sql.Identifier(f"{base}_key"), table, _idents(rel.primary_key)
            )
        )
    if rel.parent:
        cur.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                sql.Identifier(f"{base}_parent"), table, _idents(rel.parent.columns)
            )
        )
    return table


def extract_window(
    source: psycopg.Connection,
    state: psycopg.Connection,
    rel: contract.Relation,
    *,
    source_schema: str,
    state_schema: str,
    start: datetime,
    end: datetime,
    run_id: str | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    chunk_rows: int = CHUNK_ROWS,
) -> ExtractResult:
    """Replace the window [start, end) of `rel`'s extract in the state database with the source's rows."""
    began = time.perf_counter()
    params = {"start": sql_bound(start), "end": end}
    where = f"{source_schema}.{rel.name} [{start.isoformat()}, {end.isoformat()})"
    needed = [rel] + ([contract.relation(rel.parent.relation)] if rel.parent else [])
    check_source(source, source_schema, needed)
    source.commit()

    # One snapshot for the rows, the parent keys and the count, so they agree with each other.
    source.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    source.read_only = True
    extracted_at = datetime.now(timezone.utc)
    rows_read = chunks = 0
    try:
        with source.transaction(), state.transaction(), state.cursor() as scur:
            table = ensure_state_table(scur, rel, state_schema)
            # Two runs writing the same relation (a backfill and a sensor run) take turns.
            scur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"pg2cio:{state_schema}.{rel.name}",))
            scur.execute(
                sql.SQL("CREATE TEMP TABLE _incoming (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP").format(table)
            )
            copy_in = sql.SQL("COPY _incoming ({}) FROM STDIN").format(_idents(rel.column_names + META_COLUMNS))
            with source.cursor(name=f"pg2cio_extract_{rel.name}") as src_cur, scur.copy(copy_in) as copy:
                src_cur.itersize = chunk_rows
                src_cur.execute(window_query(rel, source_schema), params)
                while True:
                    try:
                        rows = src_cur.fetchmany(chunk_rows)
                    except psycopg.DataError as exc:  # e.g. a timestamp of 'infinity'
                        raise ValidationError(f"{where}: a value cannot be read: {exc}".strip()) from None
                    if not rows:
                        break
                    chunks += 1
                    frame = frame_from_rows(rel, [r[:-1] for r in rows])
                    validate_frame(rel, frame, where)
                    for r in rows:
                        copy.write_row((*r, extracted_at, run_id))
                    rows_read += len(rows)
                    log(f"{rel.name}: {rows_read:,} rows read and validated ({chunks} chunk(s))")

            if rel.primary_key:
                # Chunks are validated one at a time; duplicates across chunks are caught here.
                dup = scur.execute(
                    sql.SQL("SELECT {k}, count(*) FROM _incoming GROUP BY {k} HAVING count(*) > 1 LIMIT 3").format(
                        k=_idents(rel.primary_key)
                    )
                ).fetchall()
                if dup:
                    examples = ", ".join(
                        "(" + ", ".join(f"{k}={v!r}" for k, v in zip(rel.primary_key, d[:-1])) + f": {d[-1]} rows)"
                        for d in dup
                    )
                    raise ValidationError(
                        f"{where}: rows break the contract:\n  - key {', '.join(rel.primary_key)} is not unique: {examples}"
                    )

            source_count = source.execute(window_count_query(rel, source_schema), params).fetchone()[0]

            # Two runs replacing overlapping windows of this table (the nightly refresh and the
            # sensor's) take turns, so neither sees the other's rows half-way.
            scur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"pg2cio extract {state_schema}.{rel.name}",))
            # Rows this window supersedes: the window itself, plus older copies of the same rows
            # (a parent that changed moved to a later day; its items move with it).
            scur.execute(
                sql.SQL("DELETE FROM {} WHERE _partition_at >= %(start)s AND _partition_at < %(end)s").format(table),
                params,
            )
            replaced = scur.rowcount
            key = rel.replace_key
            if key:
                scur.execute(sql.SQL("CREATE TEMP TABLE _replace_keys AS SELECT {} FROM _incoming WITH NO DATA").format(_idents(key)))
                if rel.parent:
                    with source.cursor() as kcur, scur.copy(sql.SQL("COPY _replace_keys FROM STDIN")) as kcopy:
                        for krow in kcur.stream(_parent_keys_query(rel, source_schema), params):
                            kcopy.write_row(krow)
                else:
                    scur.execute(sql.SQL("INSERT INTO _replace_keys SELECT {} FROM _incoming").format(_idents(key)))
                scur.execute(
                    sql.SQL("DELETE FROM {t} AS s USING _replace_keys AS k WHERE {cond}").format(
                        t=table,
                        cond=sql.SQL(" AND ").join(sql.SQL("s.{c} = k.{c}").format(c=sql.Identifier(c)) for c in key),
                    )
                )
                replaced += scur.rowcount
                scur.execute("DROP TABLE _replace_keys")
            scur.execute(sql.SQL("INSERT INTO {} SELECT * FROM _incoming").format(table))
            table_rows = scur.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()[0]
            window_rows = scur.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE _partition_at >= %(start)s AND _partition_at < %(end)s").format(table),
                params,
            ).fetchone()[0]
    finally:
        source.read_only = False
        source.isolation_level = None

    return ExtractResult(
        relation=rel.name,
        table=f"{state_schema}.{state_table_name(rel)}",
        window_start=start,
        window_end=end,
        rows_read=rows_read,
        source_count=source_count,
        rows_replaced=replaced,
        window_rows=window_rows,
        table_rows=table_rows,
        chunks=chunks,
        seconds=time.perf_counter() - began,
    )

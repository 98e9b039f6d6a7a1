"""Reading and writing pg2cio's own tables in the state database (schema `pg2cio` by default).

Whole-table outputs (identity, attributes) are replaced inside one transaction: readers see
the previous version until the new one commits, and a failure leaves the previous one.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql


def read_frame(conn: psycopg.Connection, query: sql.Composable, params: dict | Sequence | None = None) -> pd.DataFrame:
    with conn.cursor() as cur:
        cur.execute(query, params)
        cols = [d.name for d in cur.description]
        return pd.DataFrame.from_records(cur.fetchall(), columns=cols)


def _plain(value: object) -> object:
    """pandas/numpy scalars -> what psycopg can bind; missing values -> None."""
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA:
        return None
    return value


class StateTableError(RuntimeError):
    """A pg2cio table cannot be replaced (for instance a view of yours depends on its old columns)."""


def _existing_columns(cur: psycopg.Cursor, schema: str, table: str) -> list[tuple[str, str]] | None:
    rows = cur.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod)
        FROM pg_catalog.pg_attribute a
        JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (schema, table),
    ).fetchall()
    return [(r[0], r[1]) for r in rows] or None


def replace_table(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    df: pd.DataFrame,
    columns: Iterable[tuple[str, str]],
    *,
    indexes: Iterable[tuple[str, ...]] = (),
    unique: tuple[str, ...] | None = None,
) -> int:
    """Replace the rows of schema.table with df (columns: (name, postgres type)) in one transaction.

    The table is kept (TRUNCATE) when its columns are unchanged, so views built on it survive;
    it is recreated when pg2cio's columns changed."""
    columns = list(columns)
    names = [c for c, _ in columns]
    missing = [c for c in names if c not in df.columns]
    if missing:
        raise StateTableError(f"{schema}.{table}: the frame lacks column(s) {', '.join(missing)}")
    target = sql.Identifier(schema, table)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        existing = _existing_columns(cur, schema, table)
        if existing is not None and [c for c, _ in existing] == names:
            cur.execute(sql.SQL("TRUNCATE {}").format(target))
        else:
            if existing is not None:
                try:
                    with conn.transaction():
                        cur.execute(sql.SQL("DROP TABLE {}").format(target))
                except psycopg.errors.DependentObjectsStillExist:
                    raise StateTableError(
                        f"{schema}.{table} has new columns in this version of pg2cio and must be recreated, but "
                        "objects of yours depend on it (views?): drop them, rerun, and create them again"
                    ) from None
            cur.execute(
                sql.SQL("CREATE TABLE {} ({})").format(
                    target, sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in columns)
                )
            )
            if unique:
                cur.execute(
                    sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(target, sql.SQL(", ").join(map(sql.Identifier, unique)))
                )
            for cols in indexes:
                cur.execute(sql.SQL("CREATE INDEX ON {} ({})").format(target, sql.SQL(", ").join(map(sql.Identifier, cols))))
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(target, sql.SQL(", ").join(map(sql.Identifier, names)))) as copy:
            for row in df[names].itertuples(index=False, name=None):
                copy.write_row(tuple(_plain(v) for v in row))
        cur.execute(sql.SQL("ANALYZE {}").format(target))
    return len(df)


def publish(
    conn: psycopg.Connection,
    schema: str,
    table: str,
    df: pd.DataFrame,
    columns: Iterable[tuple[str, str]],
    *,
    passed: bool,
    **index_kw,
) -> str:
    """Replace `table` when its checks passed; otherwise leave it as it was and write the
    candidate to `<table>_rejected` for inspection. Returns the table written."""
    target = table if passed else f"{table}_rejected"
    replace_table(conn, schema, target, df, columns, **index_kw)
    return f"{schema}.{target}"


def unix_seconds(values: pd.Series) -> pd.Series:
    """Timestamps -> integer unix seconds (nullable Int64): what Customer.io needs for every *_at."""
    ts = pd.to_datetime(values, utc=True)
    return pd.Series(pd.array([None if pd.isna(t) else int(t.timestamp()) for t in ts], dtype="Int64"), index=values.index)


def add_missing_columns(conn: psycopg.Connection, schema: str, table: str, columns: dict[str, str]) -> None:
    """ALTER TABLE ... ADD COLUMN for those of `columns` (name -> SQL type, from the code, never
    from configuration) the table lacks, in a short transaction of its own."""
    have = {r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s", (schema, table))}
    missing = {c: t for c, t in columns.items() if c not in have}
    if not missing:
        return
    with conn.transaction():
        for name, sql_type in missing.items():
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} " + sql_type).format(
                sql.Identifier(schema, table), sql.Identifier(name)))

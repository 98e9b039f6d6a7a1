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
    """Replace schema.table with df (columns: (name, postgres type)) in one transaction."""
    columns = list(columns)
    names = [c for c, _ in columns]
    target = sql.Identifier(schema, table)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target))
        cur.execute(
            sql.SQL("CREATE TABLE {} ({})").format(
                target, sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in columns)
            )
        )
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(target, sql.SQL(", ").join(map(sql.Identifier, names)))) as copy:
            for row in df[names].itertuples(index=False, name=None):
                copy.write_row(tuple(_plain(v) for v in row))
        if unique:
            cur.execute(
                sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(target, sql.SQL(", ").join(map(sql.Identifier, unique)))
            )
        for cols in indexes:
            cur.execute(sql.SQL("CREATE INDEX ON {} ({})").format(target, sql.SQL(", ").join(map(sql.Identifier, cols))))
        cur.execute(sql.SQL("ANALYZE {}").format(target))
    return len(df)


def unix_seconds(values: pd.Series) -> pd.Series:
    """Timestamps -> integer unix seconds (nullable Int64): what Customer.io needs for every *_at."""
    ts = pd.to_datetime(values, utc=True)
    return pd.Series(pd.array([None if pd.isna(t) else int(t.timestamp()) for t in ts], dtype="Int64"), index=values.index)

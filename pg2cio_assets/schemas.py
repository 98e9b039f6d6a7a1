"""Pandera schemas derived from the contract, and readable validation errors.

`frame_from_rows` turns rows as psycopg returns them into a DataFrame with the contract's
dtypes; `validate_frame` checks it and raises `ValidationError` naming relation, column,
check, offending values and the keys of the rows that hold them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import pandas as pd
import pandera.pandas as pa

from pg2cio_assets import contract

# Microseconds, like PostgreSQL: a sentinel such as 9999-12-31 fits (nanoseconds stop in 2262).
UTC_TS = pd.DatetimeTZDtype("us", "UTC")
MAX_EXAMPLES = 3


class ValidationError(ValueError):
    """Rows broke the contract; the message names relation, column, check, values and row keys."""

    def __init__(self, message: str, failures: pd.DataFrame | None = None):
        super().__init__(message)
        self.failures = failures


def _checks(col: contract.Column) -> list[pa.Check]:
    checks: list[pa.Check] = []
    if col.isin is not None:
        checks.append(pa.Check.isin(list(col.isin), error=f"must be one of {', '.join(col.isin)}"))
    if col.ge is not None:
        checks.append(pa.Check.ge(col.ge, error=f"must be >= {col.ge:g}"))
    if col.kind == "money":
        checks.append(pa.Check(lambda s: s.isna() | np.isfinite(s), element_wise=False, error="must be a finite amount"))
    if col.pattern is not None:
        checks.append(pa.Check.str_matches(f"^(?:{col.pattern})$", error=f"must match {col.pattern}"))
    return checks


@lru_cache(maxsize=None)
def extract_schema(relation_name: str) -> pa.DataFrameSchema:
    """The schema of one source relation's extract: types, nullability, domain checks, unique key."""
    rel = contract.relation(relation_name)
    return pa.DataFrameSchema(
        {
            c.name: pa.Column(str if c.kind == "text" else contract.SOURCE_KINDS[c.kind].pandas, nullable=c.nullable, checks=_checks(c), description=c.doc or None)
            for c in rel.columns
        },
        unique=list(rel.primary_key) or None,
        report_duplicates="all",
        strict=True,
        ordered=True,
        name=f"{relation_name}_extract",
    )


def frame_from_rows(rel: contract.Relation, rows: Sequence[tuple]) -> pd.DataFrame:
    """Rows in contract column order -> a DataFrame with the contract's dtypes (money as float)."""
    df = pd.DataFrame.from_records(rows, columns=list(rel.column_names))
    for col in rel.columns:
        if col.kind == "timestamp":
            df[col.name] = pd.Series(df[col.name], dtype=UTC_TS)
        elif col.kind == "money":
            # Decimal -> float for validation only; the stored copy keeps the exact numeric.
            df[col.name] = pd.to_numeric(df[col.name], errors="coerce").astype("float64") if len(df) else df[col.name].astype("float64")
        elif col.kind == "integer" and len(df) == 0:
            df[col.name] = df[col.name].astype("int64")
        elif col.kind == "boolean" and len(df) == 0:
            df[col.name] = df[col.name].astype(bool)
    return df


def describe_failures(rel: contract.Relation, where: str, df: pd.DataFrame, failures: pd.DataFrame) -> str:
    """One line per (column, check): how many rows, a few values, and the keys of those rows."""
    key = list(rel.primary_key)
    lines = []
    for (column, check), grp in failures.groupby(["column", "check"], sort=False, dropna=False):
        values = list(dict.fromkeys(repr(v) for v in grp["failure_case"]))[:MAX_EXAMPLES]
        idx = [i for i in grp["index"].dropna().head(MAX_EXAMPLES) if i in df.index]
        keys = ""
        if key and idx:
            keys = "; rows " + ", ".join(
                "(" + ", ".join(f"{k}={df.at[i, k]!r}" for k in key) + ")" for i in idx
            )
        what = "is not unique" if "uniqueness" in str(check) else ("is NULL (not_nullable)" if check == "not_nullable" else str(check))
        lines.append(f"column {column!r} {what}: {len(grp)} row(s), e.g. {', '.join(values)}{keys}")
    return f"{where}: rows break the contract:\n  - " + "\n  - ".join(lines)


def validate_frame(rel: contract.Relation, df: pd.DataFrame, where: str) -> pd.DataFrame:
    try:
        return extract_schema(rel.name).validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        raise ValidationError(describe_failures(rel, where, df, exc.failure_cases), exc.failure_cases) from None

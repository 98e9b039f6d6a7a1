"""PostgreSQL access shared by every stage: connecting with clear errors and checking the contract.

`check_source` compares the store's relations with the contract before anything is read, so a
missing view or a column of the wrong type fails with its name instead of deep in a query.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from pg2cio_assets import contract
from pg2cio_assets.settings import redact_url, scrub


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached; the message names which one (without credentials)."""


class ContractError(RuntimeError):
    """The store does not provide a contract relation or column, or gives it the wrong type."""


def connect(url: str, what: str, *, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection in UTC, naming `what` ("source", "state") and the redacted URL on failure."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10, application_name=f"pg2cio-{what}")
    except psycopg.OperationalError as exc:
        reason = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip()) or type(exc).__name__
        raise DatabaseUnavailable(
            f"cannot connect to the {what} database at {redact_url(url)}: {scrub(reason, url)}"
        ) from None
    except psycopg.ProgrammingError:  # malformed: libpq would quote the whole string, password included
        raise DatabaseUnavailable(
            f"the {what} database URL {redact_url(url)} is not a PostgreSQL connection string: "
            "use postgresql://user:password@host:5432/dbname or key=value pairs"
        ) from None
    conn.execute("SET timezone = 'UTC'")
    if not autocommit:
        conn.commit()
    return conn


@dataclass(frozen=True)
class ColumnFound:
    name: str
    data_type: str  # format_type without the modifier: "numeric", "character varying", ...


def relation_columns(conn: psycopg.Connection, schema: str, name: str) -> dict[str, ColumnFound] | None:
    """Columns of a table, view, materialized view or foreign table; None when it does not exist."""
    rows = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, NULL)
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
        ORDER BY a.attnum
        """,
        (schema, name),
    ).fetchall()
    exists = conn.execute(
        """
        SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
        """,
        (schema, name),
    ).fetchone()
    if not exists:
        return None
    return {r[0]: ColumnFound(r[0], r[1]) for r in rows}


def check_source(conn: psycopg.Connection, schema: str, relations: list[contract.Relation]) -> None:
    """Raise ContractError listing every missing relation, missing column and wrong type at once."""
    problems: list[str] = []
    for rel in relations:
        found = relation_columns(conn, schema, rel.name)
        if found is None:
            problems.append(
                f"relation {schema}.{rel.name} does not exist (create it, or a view with that name over your own table)"
            )
            continue
        for col in rel.columns:
            have = found.get(col.name)
            if have is None:
                problems.append(f"{schema}.{rel.name} has no column {col.name!r} (contract type {col.pg_type})")
            elif have.data_type not in contract.ACCEPTED_TYPES[col.kind]:
                problems.append(
                    f"{schema}.{rel.name}.{col.name} is {have.data_type}, the contract needs "
                    f"{col.pg_type}: {contract.SOURCE_KINDS[col.kind].hint}"
                )
    if problems:
        raise ContractError("the source does not match the pg2cio contract:\n  - " + "\n  - ".join(problems))


def qualified(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)

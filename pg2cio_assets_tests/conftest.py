"""Shared fixtures: a real Postgres (PG2CIO_TEST_URL, or a throwaway embedded server), fresh
schemas per test, and a small seeded demo store."""

from __future__ import annotations

import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
import pytest
from psycopg import sql

from pg2cio_assets.pgembed import postgres_url
from pg2cio_assets.seed import Store, generate_store, load_store

AS_OF = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
STORE_CUSTOMERS = 1000
STORE_SEED = 11


def pytest_configure(config):
    # Dagster marks BackfillPolicy and friends as beta/preview; keep test output readable.
    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)


@pytest.fixture(scope="session")
def pg_url():
    with postgres_url("PG2CIO_TEST_URL") as url:
        yield url


@pytest.fixture
def new_schema(pg_url):
    """A factory of uniquely named schemas, all dropped when the test ends."""
    made: list[str] = []

    def make(prefix: str) -> str:
        name = f"t_{prefix}_{uuid.uuid4().hex[:10]}"
        made.append(name)
        return name

    yield make
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def store() -> Store:
    return generate_store(STORE_CUSTOMERS, seed=STORE_SEED, as_of=AS_OF)


@dataclass
class SeededDB:
    url: str
    source_schema: str
    state_schema: str
    store: Store

    def connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=True)
        conn.execute("SET timezone = 'UTC'")
        return conn


@pytest.fixture
def make_seeded(pg_url, new_schema):
    """Load a store into its own source schema, with an empty state schema beside it."""

    def make(store: Store) -> SeededDB:
        db = SeededDB(pg_url, new_schema("src"), new_schema("state"), store)
        with psycopg.connect(pg_url) as conn:
            load_store(conn, store, db.source_schema)
        return db

    return make


@pytest.fixture
def seeded(make_seeded, store) -> SeededDB:
    """The 1,000-customer demo store, loaded for this test alone."""
    return make_seeded(store)


@pytest.fixture
def dagster_database(pg_url):
    """A database of its own for a Postgres-backed Dagster instance (dagster.yaml), dropped after."""
    name = f"t_dagster_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))

"""The `pg2cio` command as a user runs it: seeding a store, checking a source, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
from psycopg import sql

from pg2cio_assets import contract


def pg2cio(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PG2CIO_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pg2cio_assets.cli", *args], env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_seed_creates_a_store_that_passes_check_source_and_writes_its_manifest(pg_url, new_schema, tmp_path):
    schema = new_schema("cli")
    manifest = tmp_path / "m.json"
    out = pg2cio("seed", "--customers", "200", "--seed", "3", "--as-of", "2026-11-30T00:00:00+00:00",
                 "--schema", schema, "--manifest", str(manifest), env={"PG2CIO_SOURCE_URL": pg_url})
    assert out.returncode == 0, out.stderr
    facts = json.loads(manifest.read_text())
    with psycopg.connect(pg_url) as conn:
        for rel in contract.SOURCE_RELATIONS:
            n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, rel.name))).fetchone()[0]
            assert n == facts["rows"][rel.name] > 0
    check = pg2cio("check-source", env={"PG2CIO_SOURCE_URL": pg_url, "PG2CIO_SOURCE_SCHEMA": schema})
    assert check.returncode == 0 and "every contract relation and column is present" in check.stdout

    again = pg2cio("seed", "--customers", "200", "--schema", schema, env={"PG2CIO_SOURCE_URL": pg_url})
    assert again.returncode == 2 and "already exists" in again.stderr and "--replace" in again.stderr


def test_check_source_lists_what_an_empty_schema_lacks(pg_url, new_schema):
    schema = new_schema("empty")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    out = pg2cio("check-source", env={"PG2CIO_SOURCE_URL": pg_url, "PG2CIO_SOURCE_SCHEMA": schema})
    assert out.returncode == 2
    for rel in contract.SOURCE_RELATIONS:
        assert f"relation {schema}.{rel.name} does not exist" in out.stderr


def test_seed_without_a_source_url_says_which_variable_to_set():
    out = pg2cio("seed", "--customers", "200")
    assert out.returncode == 2
    assert "PG2CIO_SOURCE_URL is not set" in out.stderr and "Traceback" not in out.stderr

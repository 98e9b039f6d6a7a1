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


# --- pg2cio run and pg2cio verify --------------------------------------------------------------

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pg2cio_assets.cio_emulator import CustomerIOEmulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITE, KEY = "cli-site", "cli-key"


@pytest.fixture
def emulator():
    with CustomerIOEmulator(site_id=SITE, api_key=KEY) as emu:
        yield emu


def run_env(seeded, dagster_database, emulator, tmp_path) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    return {"DAGSTER_HOME": str(home), "PG2CIO_DAGSTER_URL": dagster_database, "PG2CIO_SOURCE_URL": seeded.url,
            "PG2CIO_SOURCE_SCHEMA": seeded.source_schema, "PG2CIO_STATE_SCHEMA": seeded.state_schema,
            "PG2CIO_PARTITION_START": "2026-11-01", "CUSTOMERIO_TRACK_URL": emulator.url,
            "CUSTOMERIO_SITE_ID": SITE, "CUSTOMERIO_API_KEY": KEY}


def test_run_over_a_date_range_is_one_recorded_run_and_prints_what_reached_customerio(
        seeded, dagster_database, emulator, tmp_path):
    env = run_env(seeded, dagster_database, emulator, tmp_path)
    out = pg2cio("run", "--start", "2026-11-01", "--end", "2026-11-30", "--backfill", env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "running every asset over 2026-11-01..2026-11-30 (30 daily partition(s)) as one run" in text
    with psycopg.connect(seeded.url) as conn:
        people = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(seeded.state_schema, "person_attributes"))).fetchone()[0]
    assert f"people: {people}\n" in text
    for name in ("checkout_started", "order_paid"):
        assert f"  {name} " in text, name
    requests = emulator.stats()["requests"]
    assert f"requests: {requests:,};" in text
    assert "suppression: hold" in text
    with psycopg.connect(dagster_database) as conn:
        runs = conn.execute("SELECT status FROM runs").fetchall()
    assert runs == [("SUCCESS",)], "one run, recorded in the instance (so it shows in the UI)"


def test_run_explains_a_bad_range_and_a_missing_dagster_home(seeded, dagster_database, emulator, tmp_path):
    env = run_env(seeded, dagster_database, emulator, tmp_path)
    out = pg2cio("run", "--start", "2026-11-30", "--end", "2026-11-01", env=env)
    assert out.returncode == 2 and "--end 2026-11-01 is before --start 2026-11-30" in out.stderr
    out = pg2cio("run", "--start", "2026-13-01", "--end", "2026-11-01", env=env)
    assert out.returncode == 2 and "is not a date" in out.stderr
    out = pg2cio("run", "--start", "2026-11-01", "--end", "2026-11-02", "--policy", "send", env=env)
    assert out.returncode == 2 and "add --backfill" in out.stderr
    env.pop("DAGSTER_HOME")
    out = pg2cio("run", "--start", "2026-11-01", "--end", "2026-11-02", env=env)
    assert out.returncode == 2 and "DAGSTER_HOME is not set" in out.stderr


def test_verify_sends_one_identify_and_one_event_and_reads_them_back(emulator):
    env = {"CUSTOMERIO_TRACK_URL": emulator.url, "CUSTOMERIO_SITE_ID": SITE, "CUSTOMERIO_API_KEY": KEY}
    out = pg2cio("verify", "--id", "cus_verify_1", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "identity validated" in out.stdout
    (person,) = [p for p in emulator.people() if p.get("id") == "cus_verify_1"]
    assert isinstance(person["attributes"][contract.VERIFY_ATTRIBUTE], int)
    (event,) = emulator.events("pg2cio_verified")
    assert event["person"] == {"id": "cus_verify_1"} and event["data"]["sent_by"] == "pg2cio verify"


def test_verify_with_a_wrong_key_says_what_to_check_and_never_prints_the_key(emulator):
    env = {"CUSTOMERIO_TRACK_URL": emulator.url, "CUSTOMERIO_SITE_ID": SITE, "CUSTOMERIO_API_KEY": "not-the-key"}
    out = pg2cio("verify", "--email", "someone@example.org", env=env)
    assert out.returncode != 0
    assert "401" in out.stderr + out.stdout and "CUSTOMERIO_API_KEY" in out.stderr + out.stdout
    assert "not-the-key" not in out.stderr + out.stdout
    out = pg2cio("verify", env=env)
    assert out.returncode == 2 and "exactly one of --person" in out.stderr

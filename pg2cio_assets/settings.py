"""Configuration: the environment variables pg2cio reads, their defaults, and the errors for bad values.

Secrets (database URLs, Customer.io keys) are read when a run needs them, never at import,
and never appear in messages: `redact_url` hides passwords in anything we print.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import date
from typing import Mapping

SOURCE_URL = "PG2CIO_SOURCE_URL"
SOURCE_SCHEMA = "PG2CIO_SOURCE_SCHEMA"
STATE_URL = "PG2CIO_STATE_URL"
STATE_SCHEMA = "PG2CIO_STATE_SCHEMA"
PARTITION_START = "PG2CIO_PARTITION_START"
DRY_RUN = "PG2CIO_DRY_RUN"
STORE_CURRENCY = "PG2CIO_STORE_CURRENCY"
ENABLE_EVENTS = "PG2CIO_ENABLE_EVENTS"
DISABLE_EVENTS = "PG2CIO_DISABLE_EVENTS"
ERASURE_ACTION = "PG2CIO_ERASURE_ACTION"
BACKFILL_POLICY = "PG2CIO_BACKFILL_POLICY"
SENSOR_INTERVAL = "PG2CIO_SENSOR_INTERVAL_SECONDS"
SENSOR_OVERLAP = "PG2CIO_SENSOR_OVERLAP_SECONDS"
RECOVERY_DELAY = "PG2CIO_RECOVERY_DELAY_MINUTES"
NIGHTLY_DAYS = "PG2CIO_NIGHTLY_DAYS"
CIO_SITE_ID = "CUSTOMERIO_SITE_ID"
CIO_API_KEY = "CUSTOMERIO_API_KEY"
CIO_TRACK_URL = "CUSTOMERIO_TRACK_URL"
DEFAULT_TRACK_URL = "https://track.customer.io"

DEFAULT_SOURCE_SCHEMA = "commerce"
DEFAULT_STATE_SCHEMA = "pg2cio"
DEFAULT_PARTITION_START = "2024-01-01"
DEFAULT_STORE_CURRENCY = "USD"
BACKFILL_POLICIES = ("hold", "attributes_only", "send")
DEFAULT_BACKFILL_POLICY = "hold"
DEFAULT_SENSOR_INTERVAL = 30
DEFAULT_SENSOR_OVERLAP = 300
DEFAULT_RECOVERY_DELAY = 60
DEFAULT_NIGHTLY_DAYS = 3

# Every variable pg2cio reads: (name, meaning, default). The README's table is generated from it.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    (SOURCE_URL, "the commerce Postgres; pg2cio only reads the contract relations there", "none (the demo starts an embedded one)"),
    (SOURCE_SCHEMA, "schema holding the contract relations", DEFAULT_SOURCE_SCHEMA),
    (STATE_URL, "where pg2cio keeps its tables (extracts, identity, attributes, events); unset, they go to a schema of the source database", SOURCE_URL),
    (STATE_SCHEMA, "schema for pg2cio's tables in the state database", DEFAULT_STATE_SCHEMA),
    (PARTITION_START, "first daily partition (UTC); it also holds every older row", DEFAULT_PARTITION_START),
    (STORE_CURRENCY, "currency of lifetime_value and average_order_value; orders in others are counted apart", DEFAULT_STORE_CURRENCY),
    (ENABLE_EVENTS, "comma-separated contract events to switch on beyond the defaults (e.g. cart_updated)", "none"),
    (DISABLE_EVENTS, "comma-separated contract events to switch off", "none"),
    (DRY_RUN, "build and record payloads, send nothing", "false"),
    (CIO_SITE_ID + ", " + CIO_API_KEY, "Track API credentials (never logged)", "none"),
    (CIO_TRACK_URL, "Track API base URL (EU: https://track-eu.customer.io; or the emulator)", DEFAULT_TRACK_URL),
    (ERASURE_ACTION, "what an erased customer (deleted_at) gets, once: delete or suppress", "delete"),
    (BACKFILL_POLICY, "what a backfill run does with events that could trigger campaigns (stamped within 72 h): hold, attributes_only or send", DEFAULT_BACKFILL_POLICY),
    (SENSOR_INTERVAL, "seconds between two polls of the source by source_changes_sensor", str(DEFAULT_SENSOR_INTERVAL)),
    (SENSOR_OVERLAP, "how far behind its cursor the sensor looks again, for rows committed late with an older updated_at", str(DEFAULT_SENSOR_OVERLAP)),
    (RECOVERY_DELAY, "minutes after checkout_started that a journey's first recovery message goes (for the false-positive count)", str(DEFAULT_RECOVERY_DELAY)),
    (NIGHTLY_DAYS, "daily partitions the nightly refresh rebuilds (yesterday and the days before it)", str(DEFAULT_NIGHTLY_DAYS)),
    ("PG2CIO_DAGSTER_URL", "Postgres for Dagster's own runs, events and schedules (dagster.yaml)", "set by the demo"),
    ("PG2CIO_TEST_URL", "tests use this Postgres instead of starting a throwaway one", "none"),
    ("PG2CIO_DEMO_HOME", "where `pg2cio demo` keeps its cluster and DAGSTER_HOME", "~/.local/share/pg2cio/demo (root: /var/tmp/pg2cio-demo)"),
)

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message says which and how to fix it."""


def _secrets_in(url: str) -> list[str]:
    """The password(s) a connection string carries, in URL or keyword form, however malformed."""
    found = re.findall(r"(?i)password\s*=\s*'((?:[^'\\]|\\.)*)'", url)
    found += re.findall(r"(?i)password\s*=\s*([^'\s&;]+)", url)
    m = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@?#]*)@", url)
    if m and ":" in m.group(1):
        found.append(m.group(1).split(":", 1)[1])
    return [s for s in found if s]


def redact_url(url: str) -> str:
    """The connection string (URL or key=value form) with every password replaced by ***."""
    out = re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^'\s&;]+)", r"\1***", url)
    out = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@?#:]*):[^/@?#]*@", r"\1:***@", out)
    return out


def scrub(text: str, url: str) -> str:
    """`text` (an error message, say) with the URL's password and the URL itself made safe."""
    for secret in sorted(_secrets_in(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text.replace(url, redact_url(url))


def check_identifier(value: str, variable: str) -> str:
    """Schema names come from configuration; refuse anything that is not a plain identifier."""
    if not _IDENTIFIER.match(value):
        raise ConfigError(
            f"{variable}={value!r} is not a valid schema name: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters"
        )
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


@dataclass(frozen=True)
class Settings:
    """The non-secret configuration, read once when the code location loads."""

    source_schema: str = DEFAULT_SOURCE_SCHEMA
    state_schema: str = DEFAULT_STATE_SCHEMA
    partition_start: str = DEFAULT_PARTITION_START
    dry_run: bool = False
    store_currency: str = DEFAULT_STORE_CURRENCY
    enable_events: tuple[str, ...] = ()
    disable_events: tuple[str, ...] = ()
    backfill_policy: str = DEFAULT_BACKFILL_POLICY
    sensor_interval_seconds: int = DEFAULT_SENSOR_INTERVAL
    sensor_overlap_seconds: int = DEFAULT_SENSOR_OVERLAP
    recovery_delay_minutes: int = DEFAULT_RECOVERY_DELAY
    nightly_days: int = DEFAULT_NIGHTLY_DAYS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        start = env.get(PARTITION_START, "").strip() or DEFAULT_PARTITION_START
        try:
            date.fromisoformat(start)
        except ValueError:
            raise ConfigError(f"{PARTITION_START}={start!r} is not a date: use YYYY-MM-DD") from None
        currency = env.get(STORE_CURRENCY, "").strip() or DEFAULT_STORE_CURRENCY
        if not re.fullmatch(r"[A-Z]{3}", currency):
            raise ConfigError(f"{STORE_CURRENCY}={currency!r} is not an ISO 4217 code such as USD or EUR")
        names = lambda var: tuple(n.strip() for n in env.get(var, "").split(",") if n.strip())  # noqa: E731
        return cls(
            enable_events=names(ENABLE_EVENTS),
            disable_events=names(DISABLE_EVENTS),
            store_currency=currency,
            source_schema=check_identifier(env.get(SOURCE_SCHEMA, "").strip() or DEFAULT_SOURCE_SCHEMA, SOURCE_SCHEMA),
            state_schema=check_identifier(env.get(STATE_SCHEMA, "").strip() or DEFAULT_STATE_SCHEMA, STATE_SCHEMA),
            partition_start=start,
            dry_run=_flag(env, DRY_RUN),
            backfill_policy=check_policy(env.get(BACKFILL_POLICY, "").strip() or DEFAULT_BACKFILL_POLICY, BACKFILL_POLICY),
            sensor_interval_seconds=_count(env, SENSOR_INTERVAL, DEFAULT_SENSOR_INTERVAL, low=1),
            sensor_overlap_seconds=_count(env, SENSOR_OVERLAP, DEFAULT_SENSOR_OVERLAP, low=0),
            recovery_delay_minutes=_count(env, RECOVERY_DELAY, DEFAULT_RECOVERY_DELAY, low=1),
            nightly_days=_count(env, NIGHTLY_DAYS, DEFAULT_NIGHTLY_DAYS, low=1),
        )


def check_policy(value: str, where: str) -> str:
    """A backfill suppression policy, or an error naming the three there are."""
    if value not in BACKFILL_POLICIES:
        raise ConfigError(f"{where}={value!r} is not a backfill policy: use one of {', '.join(BACKFILL_POLICIES)}")
    return value


def _count(env: Mapping[str, str], name: str, default: int, low: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"\d+", raw) or int(raw) < low:
        raise ConfigError(f"{name}={raw!r} is not a whole number of at least {low}")
    return int(raw)


def resolve_url(primary: str, fallback: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The database URL from `primary`, else `fallback`; a clear error when neither is set."""
    env = os.environ if env is None else env
    for name in (primary, fallback):
        if name and env.get(name, "").strip():
            return env[name].strip()
    names = primary + (f" (or {fallback})" if fallback else "")
    raise ConfigError(
        f"{names} is not set. Point it at a PostgreSQL database, e.g. "
        f"{primary}=postgresql://user:password@host:5432/dbname, or run `pg2cio demo`, "
        "which starts an embedded Postgres with a seeded store and sets it for you."
    )

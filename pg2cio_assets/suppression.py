"""Trigger suppression: what a backfill may send without firing live campaigns.

Customer.io triggers campaigns on events stamped within the last 72 hours. A backfill replays
history, so it applies a policy to the events it would send:

- ``hold`` (default): events stamped within the trigger window are not sent; the ledger records
  them as ``suppressed``. Once they are older than the window they can no longer trigger, and the
  next events sync sends them (they still count for segments). Older events are sent.
- ``attributes_only``: no event is sent; the ledger records them as ``skipped``, which a later
  live run of the same window sends. Attribute updates go out as usual.
- ``send``: the explicit opt-out; everything is sent and the run logs a warning.

Pure: no database, no HTTP, no Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pg2cio_assets.customerio import TRIGGER_WINDOW_HOURS
from pg2cio_assets.settings import BACKFILL_POLICIES, ConfigError

TRIGGER_WINDOW = timedelta(hours=TRIGGER_WINDOW_HOURS)
BACKFILL_TAG = "dagster/backfill"
POLICY_TAG = "pg2cio/backfill_policy"

SEND, SUPPRESS, SKIP = "send", "suppress", "skip"


@dataclass(frozen=True)
class Suppression:
    """The policy a run applies, and why it applies one (shown in the run's metadata)."""

    policy: str
    why: str

    def __post_init__(self) -> None:
        if self.policy not in BACKFILL_POLICIES:
            raise ConfigError(f"backfill policy {self.policy!r} is not one of {', '.join(BACKFILL_POLICIES)}")

    def reason(self) -> str:
        if self.policy == "hold":
            return f"held by a backfill (policy hold): stamped within {TRIGGER_WINDOW_HOURS} h, it could trigger a live campaign; sent once older"
        if self.policy == "attributes_only":
            return "skipped by a backfill (policy attributes_only): events not sent, attributes were; a live run of this window sends it"
        return ""


def decide(run_tags: dict[str, str], default_policy: str, suppress_triggers: bool | None = None,
           policy: str | None = None) -> Suppression | None:
    """The suppression a run applies, or None for a live run.

    A run is a backfill when it carries the dagster/backfill tag, or when its config says
    suppress_triggers=true (a manual range run); suppress_triggers=false makes a backfill live.
    The policy comes from the run config, else the run's pg2cio/backfill_policy tag, else the
    configured default."""
    backfill = run_tags.get(BACKFILL_TAG)
    on = suppress_triggers if suppress_triggers is not None else bool(backfill)
    if not on:
        return None
    chosen = policy or run_tags.get(POLICY_TAG) or default_policy
    source = "run config" if policy else (f"the run's {POLICY_TAG} tag" if run_tags.get(POLICY_TAG) else "PG2CIO_BACKFILL_POLICY or its default")
    why = (f"backfill {backfill} (dagster/backfill tag)" if backfill and suppress_triggers is None
           else "run config suppress_triggers: true")
    return Suppression(chosen, f"{why}; policy {chosen} from {source}")


def classify(timestamp: int, now: datetime, suppression: Suppression | None) -> str:
    """send, suppress or skip, for one event that the ledger has not settled."""
    if suppression is None or suppression.policy == "send":
        return SEND
    if suppression.policy == "attributes_only":
        return SKIP
    return SUPPRESS if timestamp >= trigger_cutoff(now) else SEND


def trigger_cutoff(now: datetime) -> int:
    """Unix second from which an event can still trigger a campaign."""
    return int((now - TRIGGER_WINDOW).timestamp())


__all__ = ["Suppression", "decide", "classify", "trigger_cutoff", "TRIGGER_WINDOW", "BACKFILL_TAG", "POLICY_TAG"]

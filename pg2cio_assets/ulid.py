"""Deterministic ULIDs: the time part is when the fact happened, the random part a hash of it.

The same source fact gives the same id on every run, rerun and backfill, so Customer.io's
duplicate-id rule and pg2cio's ledger both recognise a replay.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
_MAX_MS = (1 << 48) - 1


def encode(ms: int, entropy: bytes) -> str:
    """A ULID from a 48-bit millisecond timestamp and 80 bits of entropy (Crockford base32)."""
    if not 0 <= ms <= _MAX_MS:
        raise ValueError(f"ULID time must be 0..{_MAX_MS} ms since the epoch, got {ms}")
    if len(entropy) != 10:
        raise ValueError(f"ULID entropy must be 10 bytes, got {len(entropy)}")
    value = (ms << 80) | int.from_bytes(entropy, "big")
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def event_ulid(occurred_at: datetime, name: str, source_key: str) -> str:
    """The id of event `name` for the source row `source_key`, stamped at `occurred_at`."""
    ms = int(occurred_at.timestamp() * 1000)
    entropy = hashlib.sha256(f"{name}\x00{source_key}".encode()).digest()[:10]
    return encode(ms, entropy)


def is_valid(value: object) -> bool:
    return isinstance(value, str) and bool(_VALID.match(value))


def timestamp_ms(value: str) -> int:
    """The millisecond time part of a ULID."""
    if not is_valid(value):
        raise ValueError(f"{value!r} is not a ULID")
    n = 0
    for ch in value[:10]:
        n = n * 32 + _CROCKFORD.index(ch)
    return n

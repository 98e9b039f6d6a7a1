"""A local emulator of Customer.io's Track API, strict wherever the real API is lenient or unclear.

No machine here reaches Customer.io, so the demo and every test send their data to this
emulator over real HTTP. It follows the Track API contract: HTTP Basic auth,
`POST /api/v2/batch` with 207 partial success, `POST /api/v2/entity`, the v1 endpoints, the
documented size limits, ULID event ids with de-duplication, `_timestamp` ordering of identify
calls, merge, delete, suppress and unsuppress. Anything the contract marks *unclear* is read
the strict way, so that a client that passes against the emulator also works against the
real API. On top of the documented limits it rejects what Customer.io would accept but then
mishandle without telling anyone: NaN/Infinity in a body, `*_at` attributes that are not
integer unix seconds, an attribute that changes its JSON type, an event without a timestamp.

It records what it accepted (people, events, request stats) for tests and the demo to read,
directly or through the unauthenticated `/_emulator/*` endpoints, and it can inject faults
(429/5xx with Retry-After, delays, dropped connections) into the next API requests.
Standard library only.

    with CustomerIOEmulator() as cio:
        httpx.post(f"{cio.url}/api/v2/batch", auth=("emulator-site", "emulator-key"), json={"batch": ops})
        cio.people(), cio.events(), cio.stats()
"""

from __future__ import annotations

import base64
import copy
import hmac
import itertools
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

__all__ = ["CustomerIOEmulator", "serve"]

# --- The contract's limits (see customerio_facts.md) -------------------------------------

MAX_BATCH_BYTES = 500 * 1024  # a batch request must be *under* this
MAX_OP_BYTES = 32 * 1024  # an op inside a batch may be this or less
MAX_ENTITY_BYTES = 32 * 1024  # an /entity request must be *under* this
MAX_IDENTIFIER_BYTES = 150
MAX_ATTRIBUTE_NAME_BYTES = 150
MAX_ATTRIBUTE_VALUE_BYTES = 1000
MAX_ATTRIBUTES = 300  # per identify call, and per person
MAX_EVENT_NAME_BYTES = 100
MAX_EVENT_DATA_BYTES = 100_000
# An integer at or above this is milliseconds (year 2286+), not the unix seconds Customer.io wants.
UNIX_SECONDS_LIMIT = 10**10
# Not a Customer.io limit: beyond this the emulator refuses to buffer a body at all.
MAX_READ_BYTES = 16 * 1024 * 1024

_ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_IDENTIFIER_KINDS = ("id", "email", "cio_id")
_ACTION_FIELDS = {
    "identify": {"identifiers", "attributes", "timestamp"},
    "event": {"identifiers", "name", "id", "timestamp", "attributes"},
    "delete": {"identifiers", "timestamp"},
    "suppress": {"identifiers", "timestamp"},
    "unsuppress": {"identifiers", "timestamp"},
    "merge": {"primary", "secondary", "timestamp"},
}

# What applying an accepted op did.
APPLIED, IGNORED, DUPLICATE = "applied", "ignored", "duplicate"


class _Invalid(Exception):
    """An op or request Customer.io would reject; carries the fields of its error entry."""

    def __init__(self, reason: str, field: str, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message

    def as_error(self, **extra: Any) -> dict:
        return {**extra, "reason": self.reason, "field": self.field, "message": self.message}


def _errors(reason: str, message: str, field: str = "") -> dict:
    return {"errors": [_Invalid(reason, field, message).as_error()]}


# --- JSON ---------------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    # Python's json accepts NaN and Infinity, but they are not JSON: a pandas NaN leaking into
    # a payload has to fail here rather than reach Customer.io.
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> tuple[str, Any]:
    """The body's text and its parsed value; strict JSON in UTF-8 or an `invalid json` error."""
    try:
        text = body.decode("utf-8")
        return text, json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Invalid("invalid json", "", f"the body is not valid UTF-8 JSON: {exc}") from None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _batch_op_sizes(text: str) -> list[int]:
    """The size in bytes of each op of `batch` exactly as the client sent it.

    The 32 KB op limit applies to the bytes on the wire; re-serializing the parsed op would
    measure different whitespace and escaping than the client's own size check did. `text`
    has already parsed as JSON, so this walk can trust its structure.
    """
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    sizes: list[int] = []
    i = _skip_ws(text, 0) + 1  # past the top-level '{'
    i = _skip_ws(text, i)
    while i < len(text) and text[i] != "}":
        key, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ':'
        if key == "batch" and text[i] == "[":
            sizes, i = _array_element_sizes(text, i, decoder)
        else:
            _, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, i)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    return sizes


def _array_element_sizes(text: str, i: int, decoder: json.JSONDecoder) -> tuple[list[int], int]:
    sizes: list[int] = []
    i = _skip_ws(text, i + 1)  # past '['
    while text[i] != "]":
        _, end = decoder.raw_decode(text, i)
        sizes.append(len(text[i:end].encode("utf-8")))
        i = _skip_ws(text, end)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    return sizes, i + 1


def _compact_bytes(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _json_type(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object"


def _is_unix_seconds(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < UNIX_SECONDS_LIMIT


def _new_ulid(now: float) -> str:
    """A fresh ULID, for v1 events sent without an id (they cannot be de-duplicated)."""
    value = (int(now * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> (5 * k)) & 31] for k in reversed(range(26)))


# --- Validation of one op, before it meets the store --------------------------------------


def _validate_op(op: Any) -> None:
    """Raise _Invalid if `op` breaks the contract on its own (state-dependent checks come later)."""
    if not isinstance(op, dict):
        raise _Invalid("invalid op", "", "an op must be a JSON object")
    if op.get("type") != "person":
        raise _Invalid("unknown type", "type", f"unsupported op type {op.get('type')!r}; only 'person' is emulated")
    action = op.get("action")
    allowed = _ACTION_FIELDS.get(action) if isinstance(action, str) else None
    if allowed is None:
        raise _Invalid("unknown action", "action", f"unknown person action {action!r}")
    # A misspelt key ("attribute", "data") is silently dropped by a lenient server: a lost update.
    unknown = sorted(set(op) - allowed - {"type", "action"})
    if unknown:
        raise _Invalid("unknown field", unknown[0], f"{action} ops take no {unknown[0]!r} field")
    if action == "merge":
        _identifier(op.get("primary"), "primary")
        _identifier(op.get("secondary"), "secondary")
    else:
        _identifier(op.get("identifiers"), "identifiers")
    if "timestamp" in op and not _is_unix_seconds(op["timestamp"]):
        raise _Invalid("invalid timestamp", "timestamp", "timestamp must be integer unix seconds")
    if action == "identify":
        _check_attributes(op.get("attributes", {}), "attributes")
    elif action == "event":
        _check_event(op)


def _identifier(value: Any, field: str) -> tuple[str, str]:
    """(kind, value) of an identifiers object holding exactly one of id, email, cio_id."""
    if not isinstance(value, dict) or len(value) != 1:
        raise _Invalid("invalid identifiers", field, f"{field} must hold exactly one of id, email, cio_id")
    ((kind, ident),) = value.items()
    if kind not in _IDENTIFIER_KINDS:
        raise _Invalid("invalid identifiers", f"{field}.{kind}", f"{kind!r} is not an identifier (id, email, cio_id)")
    if not isinstance(ident, str) or not ident:
        raise _Invalid("invalid identifiers", f"{field}.{kind}", f"{kind} must be a non-empty string")
    if _nbytes(ident) > MAX_IDENTIFIER_BYTES:
        raise _Invalid("identifier too long", f"{field}.{kind}", f"{kind} is over {MAX_IDENTIFIER_BYTES} bytes")
    if kind == "email":
        if not _EMAIL.match(ident):
            raise _Invalid("invalid identifiers", f"{field}.email", f"{ident!r} is not an email address")
        ident = ident.lower()  # emails match case-insensitively
    return kind, ident


def _check_attributes(attributes: Any, field: str) -> None:
    if not isinstance(attributes, dict):
        raise _Invalid("invalid attributes", field, "attributes must be a JSON object")
    names = [name for name in attributes if name != "_timestamp"]
    if len(names) > MAX_ATTRIBUTES:
        raise _Invalid("too many attributes", field, f"{len(names)} attributes; at most {MAX_ATTRIBUTES} per identify")
    if "_timestamp" in attributes and not _is_unix_seconds(attributes["_timestamp"]):
        raise _Invalid("invalid timestamp", f"{field}._timestamp", "_timestamp must be integer unix seconds")
    for name in names:
        _check_attribute(name, attributes[name], f"{field}.{name}")


def _check_attribute(name: str, value: Any, field: str) -> None:
    if not name:
        raise _Invalid("invalid attribute name", field, "attribute names must not be empty")
    if _nbytes(name) > MAX_ATTRIBUTE_NAME_BYTES:
        raise _Invalid("attribute name too long", field, f"attribute name is over {MAX_ATTRIBUTE_NAME_BYTES} bytes")
    if name == "cio_id":
        raise _Invalid("invalid attribute", field, "cio_id is assigned by Customer.io")
    if name == "id":  # an identifier carried as an attribute: same rules as identifiers.id
        _identifier({"id": value}, field.rpartition(".")[0] or field)
        return
    if value is None:  # null removes the attribute
        return
    if isinstance(value, list) or not isinstance(value, (str, int, float, dict)):
        raise _Invalid("invalid attribute value", field, "values must be a string, number, boolean, object or null")
    size = _nbytes(value) if isinstance(value, str) else _compact_bytes(value)
    if size > MAX_ATTRIBUTE_VALUE_BYTES:
        raise _Invalid("attribute value too long", field, f"value is {size} bytes; at most {MAX_ATTRIBUTE_VALUE_BYTES}")
    # Milliseconds or ISO strings in *_at are accepted by Customer.io and then fail every
    # timestamp rule in silence; here they fail loudly.
    if name.endswith("_at") and not _is_unix_seconds(value):
        raise _Invalid("invalid timestamp", field, f"{name} must be integer unix seconds")
    if name == "email" and not (isinstance(value, str) and _EMAIL.match(value)):
        raise _Invalid("invalid attribute value", field, f"{value!r} is not an email address")


def _check_event(op: dict) -> None:
    name = op.get("name")
    if not isinstance(name, str) or not name:
        raise _Invalid("invalid event name", "name", "an event needs a non-empty string name")
    if _nbytes(name) > MAX_EVENT_NAME_BYTES:
        raise _Invalid("event name too long", "name", f"event name is over {MAX_EVENT_NAME_BYTES} bytes")
    if not isinstance(op.get("id"), str) or not _ULID.match(op["id"]):
        raise _Invalid("invalid event id", "id", "an event needs an id that is a ULID (26 Crockford base32 chars)")
    # Without a timestamp Customer.io uses the receive time, which breaks delays and
    # "within the last X days" for every replayed or late event: required here.
    if "timestamp" not in op:
        raise _Invalid("invalid timestamp", "timestamp", "an event needs its integer unix-seconds timestamp")
    data = op.get("attributes", {})
    if not isinstance(data, dict):
        raise _Invalid("invalid event data", "attributes", "event data (attributes) must be a JSON object")
    size = _compact_bytes(data)
    if size > MAX_EVENT_DATA_BYTES:
        raise _Invalid("event data too large", "attributes",
                       f"event data is {size} bytes; at most {MAX_EVENT_DATA_BYTES}")


# --- The store: people, events and what Customer.io remembers about them -----------------


@dataclass
class _Profile:
    key: int
    cio_id: str
    id: str | None = None
    email: str | None = None  # lower-cased
    attributes: dict = field(default_factory=dict)
    # attribute -> timestamp of the write that set it; kept after a null removes the
    # attribute, so that an older update cannot bring it back.
    stamps: dict = field(default_factory=dict)

    def identifiers(self) -> list[tuple[str, str]]:
        pairs = (("id", self.id), ("email", self.email), ("cio_id", self.cio_id))
        return [(kind, value) for kind, value in pairs if value is not None]

    def reference(self) -> dict:
        if self.id is not None:
            return {"id": self.id}
        if self.email is not None:
            return {"email": self.email}
        return {"cio_id": self.cio_id}

    def snapshot(self) -> dict:
        return {"id": self.id, "email": self.email, "cio_id": self.cio_id,
                "attributes": copy.deepcopy(self.attributes), "suppressed": False}


class _Store:
    """People, events and bookkeeping. Not thread-safe on its own: the emulator's lock guards it."""

    def __init__(self) -> None:
        self.profiles: dict[int, _Profile] = {}
        self.index: dict[tuple[str, str], int] = {}  # (kind, value) -> profile key
        self.events: list[dict] = []  # accepted events in order; "_key" is the owner's profile key
        self.seen_event_ids: set[str] = set()
        self.deleted: set[tuple[str, str]] = set()  # identifiers deleted and not identified since
        self.suppressed: dict[tuple[str, str], int] = {}  # identifier -> suppression group
        self.suppression_groups: dict[int, dict] = {}  # group -> {"id": ..., "email": ...}
        # Workspace-wide: a given attribute keeps one JSON type forever (segments compare by type).
        self.attribute_types: dict[str, str] = {}
        self._keys = itertools.count(1)

    # Applying ops; each raises _Invalid *before* changing anything.

    def apply(self, op: dict, now: float) -> str:
        return getattr(self, f"_{op['action']}")(op, now)

    def _identify(self, op: dict, now: float) -> str:
        who = _identifier(op["identifiers"], "identifiers")
        attributes = dict(op.get("attributes", {}))
        # Ordering: the attributes' _timestamp, else the op's timestamp, else the receive time.
        stamp = attributes.pop("_timestamp", op.get("timestamp", now))
        if who in self.suppressed:
            return IGNORED
        profile = self._find(who)
        if profile is None and who[0] == "cio_id":
            raise _Invalid("person not found", "identifiers.cio_id", "no person has this cio_id")
        self._check_types(attributes)
        claims = _identifier_claims(_newer(profile, attributes, stamp))
        if any(claim in self.suppressed for claim in claims):
            return IGNORED
        profile, adopt = self._owner_for_identify(who, profile, claims)
        winners = _newer(profile, attributes, stamp)  # against the adopted profile, if any
        self._check_capacity(profile, winners)
        if profile is None:
            profile = self._create(who)
        elif adopt:
            self._assign(profile, *who)
        self._write(profile, winners, stamp)
        self.deleted.difference_update(profile.identifiers())
        return APPLIED

    def _event(self, op: dict, now: float) -> str:
        who = _identifier(op["identifiers"], "identifiers")
        if who in self.suppressed:
            return IGNORED
        if op["id"] in self.seen_event_ids:
            return DUPLICATE
        profile = self._find(who)
        if profile is None:
            if who[0] == "cio_id":
                raise _Invalid("person not found", "identifiers.cio_id", "no person has this cio_id")
            if who in self.deleted:
                return IGNORED  # a deleted person comes back only through an identify
            profile = self._create(who)
        self.seen_event_ids.add(op["id"])
        self.events.append({"id": op["id"], "name": op["name"], "timestamp": op["timestamp"],
                            "data": copy.deepcopy(op.get("attributes", {})), "received_at": now, "_key": profile.key})
        return APPLIED

    def _delete(self, op: dict, now: float) -> str:
        who = _identifier(op["identifiers"], "identifiers")
        profile = None if who in self.suppressed else self._find(who)
        if profile is None:
            return IGNORED
        self.deleted.update(profile.identifiers())
        self._remove(profile)
        return APPLIED

    def _suppress(self, op: dict, now: float) -> str:
        who = _identifier(op["identifiers"], "identifiers")
        profile = self._find(who)
        if who in self.suppressed or (profile is None and who[0] == "cio_id"):
            return IGNORED
        members = {who} | ({ident for ident in profile.identifiers() if ident[0] != "cio_id"} if profile else set())
        group = next(self._keys)
        self.suppression_groups[group] = {kind: value for kind, value in members}
        for member in members:
            self.suppressed[member] = group
        if profile is not None:
            self._remove(profile)
        return APPLIED

    def _unsuppress(self, op: dict, now: float) -> str:
        group = self.suppressed.get(_identifier(op["identifiers"], "identifiers"))
        if group is None:
            return IGNORED
        for member in [m for m, g in self.suppressed.items() if g == group]:
            del self.suppressed[member]
        del self.suppression_groups[group]
        return APPLIED

    def _merge(self, op: dict, now: float) -> str:
        primary = self._find(_identifier(op["primary"], "primary"))
        if primary is None:
            raise _Invalid("primary not found", "primary", "the primary person must already exist")
        secondary = self._find(_identifier(op["secondary"], "secondary"))
        if secondary is None:
            return IGNORED  # nothing to merge in
        if secondary is primary:
            raise _Invalid("same person", "secondary", "primary and secondary are the same person")
        for name, value in secondary.attributes.items():
            if name not in primary.attributes:
                primary.attributes[name] = value
                primary.stamps[name] = secondary.stamps.get(name, 0)
        for event in self.events:
            if event["_key"] == secondary.key:
                event["_key"] = primary.key
        self._remove(secondary)
        # The primary takes over an identifier it lacks; the rest of the secondary's are freed.
        for kind in ("id", "email"):
            if getattr(primary, kind) is None and getattr(secondary, kind) is not None:
                self._assign(primary, kind, getattr(secondary, kind))
        return APPLIED

    # Helpers of identify.

    def _check_types(self, attributes: dict) -> None:
        for name, value in attributes.items():
            expected = self.attribute_types.get(name)
            if value is not None and expected is not None and expected != _json_type(value):
                raise _Invalid("attribute type changed", f"attributes.{name}",
                               f"{name} was a {expected}, now a {_json_type(value)}; an attribute keeps one type")

    def _owner_for_identify(self, who, profile, claims) -> tuple[_Profile | None, bool]:
        """The profile an identify writes to, and whether it adopts the op's identifier.

        Customer.io adds an id to a person known only by that email (and an email to a person
        known only by that id). Any other clash of identifiers between two people is an error
        rather than a silent re-assignment.
        """
        adopt = False
        for kind, value in claims:
            owner = self._find((kind, value))
            if owner is None or owner is profile:
                continue
            if profile is None and getattr(owner, who[0]) is None:
                profile, adopt = owner, True
                continue
            raise _Invalid("identifier conflict", f"attributes.{kind}", f"{kind} {value!r} belongs to another person")
        current_id = profile.id if profile is not None else None
        for kind, value in claims:
            if kind == "id" and current_id is not None and value != current_id and who[0] != "cio_id":
                raise _Invalid("identifier conflict", "attributes.id",
                               "an id can only be changed when identifying by cio_id")
        return profile, adopt

    def _check_capacity(self, profile: _Profile | None, winners: dict) -> None:
        names = set(profile.attributes) if profile else set()
        names |= {name for name, value in winners.items() if value is not None and name != "id"}
        names -= {name for name, value in winners.items() if value is None}
        if len(names) > MAX_ATTRIBUTES:
            raise _Invalid("too many attributes", "attributes",
                           f"the person would hold {len(names)} attributes; at most {MAX_ATTRIBUTES}")

    def _write(self, profile: _Profile, winners: dict, stamp: float) -> None:
        for name, value in winners.items():
            profile.stamps[name] = stamp
            if name in ("id", "email"):
                self._assign(profile, name, value.lower() if name == "email" and value else value)
            if name == "id":
                continue  # the id lives in the profile's identifier, not among its attributes
            if value is None:
                profile.attributes.pop(name, None)
            else:
                profile.attributes[name] = value
                self.attribute_types.setdefault(name, _json_type(value))

    # Profiles and the identifier index.

    def _find(self, who: tuple[str, str]) -> _Profile | None:
        key = self.index.get(who)
        return None if key is None else self.profiles[key]

    def _create(self, who: tuple[str, str]) -> _Profile:
        key = next(self._keys)
        profile = _Profile(key=key, cio_id=f"e{key:07x}")
        self.profiles[key] = profile
        self.index[("cio_id", profile.cio_id)] = key
        self._assign(profile, *who)
        return profile

    def _assign(self, profile: _Profile, kind: str, value: str | None) -> None:
        old = getattr(profile, kind)
        if old is not None:
            self.index.pop((kind, old), None)
        setattr(profile, kind, value)
        if value is not None:
            self.index[(kind, value)] = profile.key

    def _remove(self, profile: _Profile) -> None:
        """Remove a person with their events (Customer.io deletes a person's activity too)."""
        for ident in profile.identifiers():
            self.index.pop(ident, None)
        del self.profiles[profile.key]
        self.events = [event for event in self.events if event["_key"] != profile.key]

    # Snapshots for tests and the /_emulator endpoints.

    def people(self) -> list[dict]:
        tombstones = [{"id": group.get("id"), "email": group.get("email"), "cio_id": None,
                       "attributes": {}, "suppressed": True} for group in self.suppression_groups.values()]
        return [profile.snapshot() for profile in self.profiles.values()] + tombstones

    def person(self, ref: str) -> dict | None:
        """The person `ref` names: an id (exact), else an email (any case), else a cio_id."""
        for who in (("id", ref), ("email", ref.lower()), ("cio_id", ref)):
            profile = self._find(who)
            if profile is not None:
                return profile.snapshot()
        for who in (("id", ref), ("email", ref.lower())):
            if who in self.suppressed:
                group = self.suppression_groups[self.suppressed[who]]
                return {"id": group.get("id"), "email": group.get("email"), "cio_id": None,
                        "attributes": {}, "suppressed": True}
        return None

    def event_list(self, name: str | None = None) -> list[dict]:
        return [{"id": e["id"], "name": e["name"], "timestamp": e["timestamp"], "data": copy.deepcopy(e["data"]),
                 "person": self.profiles[e["_key"]].reference(), "received_at": e["received_at"]}
                for e in self.events if name is None or e["name"] == name]


def _newer(profile: _Profile | None, attributes: dict, stamp: float) -> dict:
    """The attributes this write wins: those the profile last set at `stamp` or earlier.

    Equal stamps go to the later call; an older call never overwrites a newer value.
    """
    if profile is None:
        return dict(attributes)
    return {name: value for name, value in attributes.items() if stamp >= profile.stamps.get(name, float("-inf"))}


def _identifier_claims(winners: dict) -> list[tuple[str, str]]:
    """The identifiers an identify's winning attributes give the person (email, id)."""
    claims = []
    if isinstance(winners.get("email"), str):
        claims.append(("email", winners["email"].lower()))
    if isinstance(winners.get("id"), str):
        claims.append(("id", winners["id"]))
    return claims


# --- Request stats and injected faults ----------------------------------------------------


@dataclass
class _Stats:
    requests: int = 0
    bytes: int = 0  # request body bytes
    by_path: Counter = field(default_factory=Counter)
    ops: int = 0
    rejected_ops: int = 0
    ignored_ops: int = 0  # accepted, but nothing to do (suppressed, deleted, absent)
    duplicate_events: int = 0
    status_counts: Counter = field(default_factory=Counter)
    dropped_connections: int = 0

    def snapshot(self) -> dict:
        return {"requests": self.requests, "bytes": self.bytes, "by_path": dict(self.by_path), "ops": self.ops,
                "rejected_ops": self.rejected_ops, "ignored_ops": self.ignored_ops,
                "duplicate_events": self.duplicate_events, "status_counts": dict(self.status_counts),
                "dropped_connections": self.dropped_connections}


@dataclass
class _Fault:
    status: int | None
    retry_after: float | None
    delay: float
    drop: bool
    remaining: int


def _check_fault(status, retry_after, delay, drop, count) -> None:
    if status is not None and (isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599):
        raise ValueError("status must be an HTTP error status (429, 5xx)")
    if retry_after is not None and (status is None or not isinstance(retry_after, (int, float)) or retry_after < 0):
        raise ValueError("retry_after needs a status and must be >= 0 seconds")
    if not isinstance(delay, (int, float)) or delay < 0:
        raise ValueError("delay must be >= 0 seconds")
    if drop and status is not None:
        raise ValueError("a dropped connection sends no status")
    if status is None and not drop and not delay:
        raise ValueError("inject a status, a delay or a drop")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError("count must be a positive integer (0 only clears pending faults)")


# --- HTTP -----------------------------------------------------------------------------------


@dataclass
class _Reply:
    status: int
    payload: Any
    headers: tuple = ()


@dataclass
class _Route:
    method: str
    pattern: re.Pattern
    template: str  # the path as counted in stats.by_path
    handler: str  # name of the CustomerIOEmulator method that serves it


def _route(method: str, template: str, handler: str) -> _Route:
    pattern = re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template))
    return _Route(method, pattern, template, handler)


_API_ROUTES = [
    _route("POST", "/api/v2/batch", "_api_batch"),
    _route("POST", "/api/v2/entity", "_api_entity"),
    _route("PUT", "/api/v1/customers/{id}", "_api_v1_identify"),
    _route("DELETE", "/api/v1/customers/{id}", "_api_v1_delete"),
    _route("POST", "/api/v1/customers/{id}/events", "_api_v1_event"),
    _route("POST", "/api/v1/merge_customers", "_api_v1_merge"),
]
_CONTROL_ROUTES = [
    _route("GET", "/_emulator/people", "_control_people"),
    _route("GET", "/_emulator/people/{id}", "_control_person"),
    _route("GET", "/_emulator/events", "_control_events"),
    _route("GET", "/_emulator/stats", "_control_stats"),
    _route("POST", "/_emulator/faults", "_control_faults"),
    _route("POST", "/_emulator/reset", "_control_reset"),
]


def _match(routes: list[_Route], method: str, path: str) -> tuple[_Route | None, dict, int]:
    """The route for (method, path) and its path parameters, else None and 404 or 405."""
    on_path = [(route, m) for route in routes if (m := route.pattern.fullmatch(path))]
    for route, m in on_path:
        if route.method == method:
            return route, {k: unquote(v) for k, v in m.groupdict().items()}, 200
    return None, {}, 405 if on_path else 404


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class _Handler(BaseHTTPRequestHandler):
    """HTTP plumbing only: read the body, apply faults, write the reply the emulator computed."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real clients use it
    server_version = "CustomerIOEmulator/1"
    timeout = 30  # a client that stops mid-body does not hold a thread forever
    # Headers and body go out in separate writes; with Nagle on, a keep-alive client's
    # delayed ACK adds ~40 ms to every response.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the demo and tests read stats(), not access logs

    def _handle(self) -> None:
        emulator: CustomerIOEmulator = self.server.emulator  # type: ignore[attr-defined]
        path, _, query = self.path.partition("?")
        try:
            body = self._read_body()
        except _BadRequest as exc:
            self.close_connection = True  # the rest of the body was not read
            self._send(_Reply(exc.status, _errors(exc.reason, exc.message)))
            return
        if path == "/_emulator" or path.startswith("/_emulator/"):
            self._send(emulator._serve_control(self.command, path, query, body))
            return
        route, params, miss = _match(_API_ROUTES, self.command, path)
        emulator._count_request(route.template if route else path, len(body))
        fault = emulator._take_fault()
        if fault is not None and self._apply_fault(emulator, fault):
            return
        reply = emulator._serve_api(route, params, miss, self.headers, body)
        emulator._count_status(reply.status)
        self._send(reply)

    def _apply_fault(self, emulator: CustomerIOEmulator, fault: _Fault) -> bool:
        """Play an injected fault; True if it replaced the normal reply."""
        if fault.delay:
            time.sleep(fault.delay)
        if fault.drop:
            emulator._count_drop()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return True
        if fault.status is not None:
            # Retry-After in delay-seconds must be an integer (RFC 9110): round up.
            headers = () if fault.retry_after is None else (("Retry-After", str(math.ceil(fault.retry_after))),)
            emulator._count_status(fault.status)
            self._send(_Reply(fault.status, _errors("injected fault", f"emulated HTTP {fault.status}"), headers))
            return True
        return False

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise _BadRequest(411, "length required", "send a Content-Length; chunked bodies are not accepted")
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            size = int(length)
        except ValueError:
            raise _BadRequest(400, "invalid request", "Content-Length is not a number") from None
        if size < 0 or size > MAX_READ_BYTES:
            raise _BadRequest(400, "request too large", f"a body of {length} bytes is refused unread")
        return self.rfile.read(size)

    def _send(self, reply: _Reply) -> None:
        data = json.dumps(reply.payload).encode("utf-8")
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up, e.g. timed out during an injected delay


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: CustomerIOEmulator):
        super().__init__(address, _Handler)
        self.emulator = emulator

    def handle_error(self, request, client_address) -> None:
        # A client hanging up mid-request (timeouts, retries) is routine here; anything else is a bug.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


# --- The emulator -------------------------------------------------------------------------


class CustomerIOEmulator:
    """Customer.io's Track API on loopback, with snapshots and fault injection for tests."""

    def __init__(self, site_id: str = "emulator-site", api_key: str = "emulator-key",
                 host: str = "127.0.0.1", port: int = 0):
        self.site_id, self.api_key = site_id, api_key
        self._address = (host, port)
        # One lock guards the store, the stats and the fault queue: a batch applies atomically.
        self._lock = threading.RLock()
        self._store = _Store()
        self._stats = _Stats()
        self._faults: deque[_Fault] = deque()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle.

    def start(self) -> CustomerIOEmulator:
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        self._server = _Server(self._address, self)
        # A short poll interval keeps stop() fast in tests.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="customerio-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not running; call start()")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> CustomerIOEmulator:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # Snapshots and control (thread-safe).

    def people(self) -> list[dict]:
        with self._lock:
            return self._store.people()

    def person(self, ref: str) -> dict | None:
        """One person by id, email or cio_id (None if absent); suppressed ones come back flagged."""
        with self._lock:
            return self._store.person(ref)

    def events(self, name: str | None = None) -> list[dict]:
        with self._lock:
            return self._store.event_list(name)

    def stats(self) -> dict:
        with self._lock:
            return self._stats.snapshot()

    def inject(self, *, status: int | None = None, retry_after: float | None = None, delay: float = 0.0,
               drop: bool = False, count: int = 1) -> None:
        """Make the next `count` API requests fail: a `status` (+ Retry-After), a `delay`, or a `drop`.

        Faults queue up in order. `count=0` injects nothing and cancels every pending fault.
        """
        if count == 0 and not isinstance(count, bool):
            self.reset_faults()
            return
        _check_fault(status, retry_after, delay, drop, count)
        with self._lock:
            self._faults.append(_Fault(status, retry_after, float(delay), bool(drop), count))

    def reset_faults(self) -> None:
        """Cancel every pending injected fault; people, events and stats stay."""
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        with self._lock:
            self._store = _Store()
            self._stats = _Stats()
            self._faults.clear()

    # Bookkeeping called by the handler.

    def _count_request(self, path: str, size: int) -> None:
        with self._lock:
            self._stats.requests += 1
            self._stats.bytes += size
            self._stats.by_path[path] += 1

    def _count_status(self, status: int) -> None:
        with self._lock:
            self._stats.status_counts[status] += 1

    def _count_drop(self) -> None:
        with self._lock:
            self._stats.dropped_connections += 1

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            if not self._faults:
                return None
            fault = self._faults[0]
            fault.remaining -= 1
            if fault.remaining == 0:
                self._faults.popleft()
            return fault

    # The Track API.

    def _serve_api(self, route: _Route | None, params: dict, miss: int, headers, body: bytes) -> _Reply:
        if route is None:
            return _Reply(miss, _errors("not found" if miss == 404 else "method not allowed", "no such endpoint"))
        if not self._authorized(headers.get("Authorization")):
            return _Reply(401, _errors("unauthorized", "HTTP Basic site_id:api_key required"),
                          (("WWW-Authenticate", 'Basic realm="Track API"'),))
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if body and content_type != "application/json":
            return _Reply(415, _errors("unsupported media type", "send Content-Type: application/json"))
        try:
            return getattr(self, route.handler)(params, body)
        except _Invalid as exc:  # the request as a whole is invalid
            return _Reply(400, {"errors": [exc.as_error()]})

    def _authorized(self, header: str | None) -> bool:
        scheme, _, credentials = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(decoded, f"{self.site_id}:{self.api_key}".encode("utf-8"))

    def _api_batch(self, params: dict, body: bytes) -> _Reply:
        if len(body) >= MAX_BATCH_BYTES:
            raise _Invalid("request too large", "",
                           f"a batch request must be under {MAX_BATCH_BYTES} bytes; got {len(body)}")
        text, document = _parse_json(body)
        batch = document.get("batch") if isinstance(document, dict) else None
        if not isinstance(batch, list) or not batch:
            raise _Invalid("invalid batch", "batch", 'the body must be {"batch": [op, ...]} with at least one op')
        errors = []
        with self._lock:  # the whole batch applies in order, without interleaving
            for index, (op, size) in enumerate(zip(batch, _batch_op_sizes(text))):
                try:
                    self._apply(op, size, MAX_OP_BYTES)
                except _Invalid as exc:
                    errors.append(exc.as_error(batch_index=index))
        return _Reply(207, {"errors": errors}) if errors else _Reply(200, {})

    def _api_entity(self, params: dict, body: bytes) -> _Reply:
        if len(body) >= MAX_ENTITY_BYTES:
            raise _Invalid("request too large", "", f"an entity request must be under {MAX_ENTITY_BYTES} bytes")
        return self._single(_parse_json(body)[1])

    def _api_v1_identify(self, params: dict, body: bytes) -> _Reply:
        attributes = _parse_json(body)[1] if body else {}
        return self._single({"type": "person", "action": "identify", "identifiers": {"id": params["id"]},
                             "attributes": attributes})

    def _api_v1_event(self, params: dict, body: bytes) -> _Reply:
        document = _v1_object(body, {"name", "data", "timestamp", "id"})
        now = time.time()
        op = {"type": "person", "action": "event", "identifiers": {"id": params["id"]},
              "id": document.get("id", _new_ulid(now)), "timestamp": document.get("timestamp", int(now)),
              "attributes": document.get("data", {})}
        if "name" in document:
            op["name"] = document["name"]
        return self._single(op)

    def _api_v1_delete(self, params: dict, body: bytes) -> _Reply:
        return self._single({"type": "person", "action": "delete", "identifiers": {"id": params["id"]}})

    def _api_v1_merge(self, params: dict, body: bytes) -> _Reply:
        document = _v1_object(body, {"primary", "secondary"})
        return self._single({"type": "person", "action": "merge", "primary": document.get("primary"),
                             "secondary": document.get("secondary")})

    def _single(self, op: Any) -> _Reply:
        """One op on its own (entity, v1): 200 {} or 400 with its error."""
        with self._lock:
            self._apply(op)
        return _Reply(200, {})

    def _apply(self, op: Any, size: int | None = None, limit: int | None = None) -> None:
        """Validate and apply one op, counting it; raises _Invalid (nothing applied) if it is invalid."""
        self._stats.ops += 1
        try:
            if size is not None and limit is not None and size > limit:
                raise _Invalid("op too large", "", f"the op is {size} bytes; at most {limit}")
            _validate_op(op)
            outcome = self._store.apply(op, time.time())
        except _Invalid:
            self._stats.rejected_ops += 1
            raise
        if outcome == IGNORED:
            self._stats.ignored_ops += 1
        elif outcome == DUPLICATE:
            self._stats.duplicate_events += 1

    # The /_emulator endpoints (no auth, no faults, not counted in stats).

    def _serve_control(self, method: str, path: str, query: str, body: bytes) -> _Reply:
        route, params, miss = _match(_CONTROL_ROUTES, method, path)
        if route is None:
            return _Reply(miss, _errors("not found" if miss == 404 else "method not allowed", "no such endpoint"))
        return getattr(self, route.handler)(params, query, body)

    def _control_people(self, params: dict, query: str, body: bytes) -> _Reply:
        return _Reply(200, self.people())

    def _control_person(self, params: dict, query: str, body: bytes) -> _Reply:
        person = self.person(params["id"])
        return _Reply(200, person) if person is not None else _Reply(404, _errors("not found", "no such person"))

    def _control_events(self, params: dict, query: str, body: bytes) -> _Reply:
        names = parse_qs(query).get("name")
        return _Reply(200, self.events(names[0] if names else None))

    def _control_stats(self, params: dict, query: str, body: bytes) -> _Reply:
        return _Reply(200, self.stats())

    def _control_faults(self, params: dict, query: str, body: bytes) -> _Reply:
        try:
            fields = _v1_object(body, {"status", "retry_after", "delay", "drop", "count"})
            self.inject(**fields)
        except (_Invalid, ValueError) as exc:
            return _Reply(400, _errors("invalid fault", str(exc)))
        return _Reply(200, {})

    def _control_reset(self, params: dict, query: str, body: bytes) -> _Reply:
        self.reset()
        return _Reply(200, {})


def _v1_object(body: bytes, allowed: set[str]) -> dict:
    """A JSON object body holding only `allowed` keys (a misspelt key must not vanish silently)."""
    document = _parse_json(body)[1] if body else {}
    if not isinstance(document, dict):
        raise _Invalid("invalid body", "", "the body must be a JSON object")
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise _Invalid("unknown field", unknown[0], f"unexpected field {unknown[0]!r}; allowed: {sorted(allowed)}")
    return document


def serve(host: str, port: int, site_id: str, api_key: str) -> None:
    """Run the emulator in the foreground until interrupted (for a CLI); prints its URL."""
    emulator = CustomerIOEmulator(site_id=site_id, api_key=api_key, host=host, port=port).start()
    print(emulator.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Serve the Customer.io Track API emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--site-id", default="emulator-site")
    parser.add_argument("--api-key", default="emulator-key")
    args = parser.parse_args()
    serve(args.host, args.port, args.site_id, args.api_key)

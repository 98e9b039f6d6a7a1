"""Deciding what Customer.io should receive: attribute diffs against the ledger, and the ops.

Pure functions: no database, no HTTP. `people_ops` turns person attributes and the last
accepted value of each attribute into identify ops carrying only what changed (`created_at`
only on a first identify, `_timestamp` always); `event_op` builds one event op; values that
break a limit, or would change the type of an attribute Customer.io already holds, are held
back with a reason instead of being sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from pg2cio_assets import contract
from pg2cio_assets.customerio import MAX_NAME_BYTES, MAX_VALUE_BYTES, encode, op_problem

ATTRIBUTE_NAMES = [a.name for a in contract.PERSON_ATTRIBUTES]


KINDS = {a.name: a.kind for a in contract.PERSON_ATTRIBUTES}


def plain(value: object, kind: str | None = None) -> object:
    """A value as Customer.io must receive it: None for missing, else its contract kind.

    A nullable bigint read back from Postgres arrives as a float (1764000000.0); sent like
    that, every "within the last N days" segment on it would fail, so kinds are enforced here."""
    if value is None or value is getattr(__import__("pandas"), "NA", object()):
        return None
    if hasattr(value, "item"):  # numpy / pandas scalars
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if kind in ("integer", "timestamp"):
        if isinstance(value, bool) or not float(value).is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(value)
    if kind == "money":
        return round(float(value), 2)
    if kind == "boolean":
        return bool(value)
    return value


def json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


@dataclass
class PersonOps:
    ops: list[dict] = field(default_factory=list)  # identify ops, one per person with changes
    changes: list[dict] = field(default_factory=list)  # per op: {attribute: value} it would make true
    held: list[tuple[str, str, str]] = field(default_factory=list)  # (person_key, attribute, reason)
    unchanged: int = 0


def identifiers(cio_type: str, cio_id: str) -> dict:
    return {cio_type: cio_id}


def people_ops(people: list[dict], ledger: dict[str, dict[str, object]], as_of: datetime,
               withhold_email: frozenset[str] = frozenset()) -> PersonOps:
    """Identify ops for people whose attributes differ from what Customer.io last accepted.

    people: rows of person_attributes (person_key, cio_identifier_type, cio_identifier, attributes...)
    ledger: person_key -> {attribute: last accepted value}; a person absent has never been identified.
    withhold_email: people with a merge still to send. Their email would attach the guest profile
    to them before the merge can fold it in, so it goes in a second pass, after the merge.
    """
    out = PersonOps()
    stamp = int(as_of.timestamp())
    for person in people:
        key = person["person_key"]
        known = ledger.get(key)
        first = known is None
        known = known or {}
        changed: dict[str, object] = {}
        for name in ATTRIBUTE_NAMES:
            try:
                value = plain(person.get(name), KINDS[name])
            except ValueError as exc:
                out.held.append((key, name, f"cannot take its contract type {KINDS[name]}: {exc}"))
                continue
            if value is None:
                continue  # absent, not sent as null
            if name == "email" and key in withhold_email:
                continue
            if name == "email" and person.get("email_shared"):
                # email identifies a profile in Customer.io: sent for two accounts, it would fold them into one
                out.held.append((key, name, "email shared with another account: not sent, so the two stay two profiles"))
                continue
            if name == "created_at" and not first:
                continue  # Customer.io takes created_at once, on the first identify
            if name in known and known[name] == value:
                continue
            if name in known and json_kind(known[name]) != json_kind(value):
                out.held.append((key, name, f"type change refused: Customer.io holds a {json_kind(known[name])}, "
                                            f"this is a {json_kind(value)}"))
                continue
            size = len(value.encode()) if isinstance(value, str) else len(str(value))
            if size > MAX_VALUE_BYTES:
                out.held.append((key, name, f"value is {size:,} bytes, over Customer.io's {MAX_VALUE_BYTES:,}"))
                continue
            if len(name.encode()) > MAX_NAME_BYTES:
                out.held.append((key, name, f"attribute name over {MAX_NAME_BYTES} bytes"))
                continue
            changed[name] = value
        if not changed:
            out.unchanged += 1
            continue
        op = {
            "type": "person",
            "identifiers": identifiers(person["cio_identifier_type"], person["cio_identifier"]),
            "action": "identify",
            "attributes": {**changed, "_timestamp": stamp},
        }
        problem = op_problem(op)
        if problem:
            out.held.append((key, "*", problem))
            continue
        out.ops.append(op)
        out.changes.append({"person_key": key, **changed})
    return out


def event_op(row: dict) -> dict:
    return {
        "type": "person",
        "identifiers": identifiers(row["cio_identifier_type"], row["cio_identifier"]),
        "action": "event",
        "name": row["name"],
        "id": row["event_id"],
        "timestamp": int(row["timestamp"]),
        "attributes": row["properties"],
    }


def merge_op(primary_id: str, secondary_email: str) -> dict:
    return {"type": "person", "action": "merge", "primary": {"id": primary_id}, "secondary": {"email": secondary_email}}


def erase_op(cio_type: str, cio_id: str, action: str) -> dict:
    if action not in ("delete", "suppress"):
        raise ValueError(f"erasure action must be delete or suppress, not {action!r}")
    return {"type": "person", "identifiers": identifiers(cio_type, cio_id), "action": action}


def batch_fill(request_bytes: list[int], limit: int) -> float:
    """Mean fill of the batches as a fraction of the request limit."""
    return sum(request_bytes) / (len(request_bytes) * limit) if request_bytes else 0.0


__all__ = ["people_ops", "event_op", "merge_op", "erase_op", "batch_fill", "encode", "PersonOps"]

"""The Track API limits, batch packing and people diffs, without a network."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pg2cio_assets.customerio import (
    MAX_OP_BYTES, MAX_REQUEST_BYTES, batch_body, encode, op_problem, pack_batches, retry_after_seconds,
)
from pg2cio_assets.sync import event_op, people_ops

AS_OF = datetime(2026, 11, 30, tzinfo=timezone.utc)


def test_batches_stay_under_500kb_keep_order_and_fill_up():
    ops = [encode({"type": "person", "identifiers": {"id": f"c{i}"}, "action": "identify",
                   "attributes": {"note": "x" * (200 + i % 700)}}) for i in range(5000)]
    batches = pack_batches(ops)
    assert [i for b in batches for i in b] == list(range(len(ops)))
    sizes = [len(batch_body([ops[i] for i in b])) for b in batches]
    assert max(sizes) < MAX_REQUEST_BYTES
    assert min(sizes[:-1]) > MAX_REQUEST_BYTES - 1100  # closed only when the next op would not fit


def test_ops_over_a_limit_are_named_before_sending():
    base = {"type": "person", "identifiers": {"id": "c1"}, "action": "identify"}
    assert op_problem({**base, "attributes": {"a": 1}}) is None
    assert "exactly one" in op_problem({**base, "identifiers": {"id": "c1", "email": "a@b.co"}})
    assert "over 1,000" in op_problem({**base, "attributes": {"bio": "x" * 1001}})
    assert "over the 300" in op_problem({**base, "attributes": {f"a{i}": i for i in range(301)}})
    assert "32,768-byte" in op_problem({**base, "attributes": {f"a{i}": "x" * 900 for i in range(40)}})
    event = {"type": "person", "identifiers": {"id": "c1"}, "action": "event", "id": "01J0000000000000000000000", "timestamp": 1}
    assert "event name" in op_problem({**event, "name": "x" * 101})
    assert MAX_OP_BYTES == 32 * 1024


def test_an_identify_carries_only_what_changed_and_created_at_only_the_first_time():
    person = {"person_key": "c1", "cio_identifier_type": "id", "cio_identifier": "c1", "email": "a@b.co",
              "created_at": 1_700_000_000, "orders_count": 3, "lifetime_value": 10.5, "first_name": None}
    first = people_ops([person], {}, AS_OF)
    assert first.ops[0]["attributes"] == {"email": "a@b.co", "created_at": 1_700_000_000, "orders_count": 3,
                                          "lifetime_value": 10.5, "_timestamp": int(AS_OF.timestamp())}
    ledger = {"c1": {"email": "a@b.co", "created_at": 1_700_000_000, "orders_count": 3, "lifetime_value": 10.5}}
    assert people_ops([person], ledger, AS_OF).ops == []
    changed = people_ops([{**person, "orders_count": 4, "created_at": 1_800_000_000}], ledger, AS_OF)
    assert changed.ops[0]["attributes"] == {"orders_count": 4, "_timestamp": int(AS_OF.timestamp())}


def test_an_attribute_whose_type_would_change_is_refused_and_reported():
    person = {"person_key": "c1", "cio_identifier_type": "id", "cio_identifier": "c1", "orders_count": 3}
    plan = people_ops([person], {"c1": {"orders_count": "3"}}, AS_OF)
    assert plan.ops == [] and plan.held == [("c1", "orders_count", "type change refused: Customer.io holds a string, this is a number")]


def test_event_ops_carry_the_ulid_and_unix_timestamp():
    op = event_op({"cio_identifier_type": "email", "cio_identifier": "g@x.io", "name": "order_paid",
                   "event_id": "01JD0000000000000000000000", "timestamp": 1_764_000_000, "properties": {"order_id": "o1"}})
    assert op == {"type": "person", "identifiers": {"email": "g@x.io"}, "action": "event", "name": "order_paid",
                  "id": "01JD0000000000000000000000", "timestamp": 1_764_000_000, "attributes": {"order_id": "o1"}}


@pytest.mark.parametrize("header, seconds", [("2", 2.0), ("0.5", 0.5), (None, None), ("soon", None)])
def test_retry_after_is_read_as_seconds(header, seconds):
    assert retry_after_seconds(header) == seconds

"""The Customer.io Track API emulator keeps the contract, strictly, over real HTTP on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from pg2cio_assets.cio_emulator import CustomerIOEmulator

AUTH = ("emulator-site", "emulator-key")
TS = 1_764_000_000  # a plausible event time, in unix seconds


@pytest.fixture(scope="module")
def server():
    with CustomerIOEmulator() as emulator:
        yield emulator


@pytest.fixture
def cio(server):
    """The module's emulator, emptied for each test (one server keeps the file fast)."""
    server.reset()
    return server


@pytest.fixture(scope="module")
def clients(server):
    with httpx.Client(base_url=server.url, auth=AUTH, timeout=5) as authed, \
            httpx.Client(base_url=server.url, timeout=5) as anonymous:
        yield authed, anonymous


@pytest.fixture
def client(cio, clients):
    """A client with the emulator's credentials."""
    return clients[0]


@pytest.fixture
def anon(cio, clients):
    """A client without credentials (the /_emulator endpoints need none)."""
    return clients[1]


def ulid(n: int) -> str:
    return f"01{n:024d}"  # digits are Crockford base32; first char 0


def identify(ident: dict, attributes: dict | None = None, **extra) -> dict:
    return {"type": "person", "identifiers": ident, "action": "identify", "attributes": attributes or {}, **extra}


def event(ident: dict, n: int, name: str = "order_paid", data: dict | None = None, **extra) -> dict:
    op = {"type": "person", "identifiers": ident, "action": "event", "name": name, "id": ulid(n), "timestamp": TS}
    if data is not None:
        op["attributes"] = data
    return {**op, **extra}


def person_op(action: str, ident: dict) -> dict:
    return {"type": "person", "identifiers": ident, "action": action}


def merge(primary: dict, secondary: dict) -> dict:
    return {"type": "person", "action": "merge", "primary": primary, "secondary": secondary}


def batch(client: httpx.Client, *ops) -> httpx.Response:
    return client.post("/api/v2/batch", json={"batch": list(ops)})


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def post_raw(client: httpx.Client, path: str, text: str) -> httpx.Response:
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def error_indexes(response: httpx.Response) -> list[int]:
    return sorted(e["batch_index"] for e in response.json()["errors"])


def only_error(response: httpx.Response) -> dict:
    (error,) = response.json()["errors"]
    return error


# --- Auth and routing ---------------------------------------------------------------------


@pytest.mark.parametrize("auth", [None, ("emulator-site", "wrong"), ("other-site", "emulator-key")])
def test_missing_or_wrong_credentials_get_401_and_change_nothing(cio, auth, anon):
    response = anon.post("/api/v2/batch", auth=auth, json={"batch": [identify({"id": "1"})]})
    assert response.status_code == 401
    assert only_error(response)["reason"] == "unauthorized"
    assert cio.people() == []


def test_malformed_authorization_header_gets_401(cio, anon):
    for header in ("Bearer emulator-key", "Basic not-base64!", "Basic"):
        response = anon.put("/api/v1/customers/1", headers={"Authorization": header}, json={})
        assert response.status_code == 401


def test_emulator_endpoints_need_no_auth_and_unknown_paths_get_json_404(cio, client, anon):
    assert anon.get("/_emulator/people").json() == []
    for response in (client.post("/api/v2/nope", json={}), anon.get("/_emulator/nope")):
        assert response.status_code == 404
        assert response.json()["errors"][0]["reason"] == "not found"
    assert client.get("/api/v2/batch").status_code == 405
    assert anon.get("/_emulator/people/nobody").status_code == 404


# --- v2 batch ----------------------------------------------------------------------------------


def test_valid_batch_is_accepted_and_readable_through_emulator_endpoints(cio, client, anon):
    response = batch(client, identify({"id": "c1"}, {"first_name": "Ada", "created_at": TS}),
                     event({"id": "c1"}, 1, data={"order_id": "o1", "total": 12.5}))
    assert response.status_code == 200 and response.json() == {}
    person = anon.get("/_emulator/people/c1").json()
    assert (person["id"], person["email"], person["suppressed"]) == ("c1", None, False)
    assert person["attributes"] == {"first_name": "Ada", "created_at": TS}
    (ev,) = anon.get("/_emulator/events", params={"name": "order_paid"}).json()
    assert (ev["id"], ev["name"], ev["timestamp"], ev["person"]) == (ulid(1), "order_paid", TS, {"id": "c1"})
    assert ev["data"] == {"order_id": "o1", "total": 12.5} and ev["received_at"] > 0
    assert anon.get("/_emulator/events", params={"name": "other"}).json() == []
    assert cio.people() == anon.get("/_emulator/people").json()


def test_invalid_ops_get_207_with_their_batch_index_and_the_valid_ops_still_apply(cio, client):
    response = batch(client,
                     identify({"id": "a"}, {"plan": "gold"}),
                     identify({"id": "b", "email": "b@x.com"}),  # two identifiers
                     event({"id": "a"}, 1),
                     event({"id": "a"}, 2, name=""),  # no name
                     identify({"id": "c"}))
    assert response.status_code == 207
    assert error_indexes(response) == [1, 3]
    for error in response.json()["errors"]:
        assert set(error) == {"batch_index", "reason", "field", "message"}
    assert sorted(p["id"] for p in cio.people()) == ["a", "c"]
    assert [e["id"] for e in cio.events()] == [ulid(1)]
    stats = cio.stats()
    assert (stats["ops"], stats["rejected_ops"]) == (5, 2)


def test_request_of_500kb_or_more_is_rejected_whole_and_nothing_applies(cio, client):
    ops = [identify({"id": f"p{i}"}, {"bio": "x" * 900}) for i in range(400)]
    text = compact({"batch": ops})
    assert len(text) < 500 * 1024
    just_under = text + " " * (500 * 1024 - 1 - len(text))  # JSON whitespace pads the body to size
    at_limit = text + " " * (500 * 1024 - len(text))
    response = post_raw(client, "/api/v2/batch", at_limit)
    assert response.status_code == 400
    assert only_error(response)["reason"] == "request too large"
    assert cio.people() == [] and cio.stats()["ops"] == 0
    assert post_raw(client, "/api/v2/batch", just_under).status_code == 200
    assert len(cio.people()) == 400


def test_op_over_32kb_as_sent_is_invalid_and_one_of_exactly_32kb_is_not(cio, client):
    base = event({"id": "big"}, 1, data={"pad": ""})
    pad = 32 * 1024 - len(compact(base))
    at_limit = event({"id": "big"}, 1, data={"pad": "x" * pad})
    over = event({"id": "big"}, 2, data={"pad": "x" * (pad + 1)})
    assert len(compact(at_limit)) == 32 * 1024
    response = post_raw(client, "/api/v2/batch", compact({"batch": [at_limit, over]}))
    assert response.status_code == 207
    assert only_error(response)["batch_index"] == 1 and only_error(response)["reason"] == "op too large"
    assert [e["id"] for e in cio.events()] == [ulid(1)]


@pytest.mark.parametrize("body", ["not json", '{"batch": {}}', '{"ops": []}', '{"batch": []}', "[]",
                                  '{"batch": [{"type": "person", "identifiers": {"id": "1"}, "action": "identify",'
                                  ' "attributes": {"ltv": NaN}}]}'])
def test_body_that_is_not_strict_json_with_a_batch_list_is_400(cio, client, body):
    response = post_raw(client, "/api/v2/batch", body)
    assert response.status_code == 400
    assert cio.people() == []


def test_body_without_json_content_type_is_refused(cio, client):
    response = client.post("/api/v2/batch", content=compact({"batch": [identify({"id": "1"})]}),
                           headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert cio.people() == []


@pytest.mark.parametrize("identifiers", [
    {"id": "1", "email": "a@x.com"}, {}, {"phone": "+4712345678"}, {"id": ""}, {"id": 42},
    {"id": "x" * 151}, {"email": "not-an-email"}, None,
])
def test_identifiers_must_hold_exactly_one_valid_id_email_or_cio_id(cio, client, identifiers):
    response = batch(client, identify({"id": "ok"}), {**identify({}), "identifiers": identifiers})
    assert response.status_code == 207 and error_indexes(response) == [1]
    assert [p["id"] for p in cio.people()] == ["ok"]


def test_merge_op_takes_no_identifiers_key(client):
    op = {**merge({"id": "a"}, {"id": "b"}), "identifiers": {"id": "a"}}
    response = batch(client, identify({"id": "a"}), op)
    assert error_indexes(response) == [1] and response.json()["errors"][0]["reason"] == "unknown field"


def test_unknown_type_action_or_misspelt_field_is_an_invalid_op(client):
    response = batch(client, {**identify({"id": "a"}), "type": "object"}, {**identify({"id": "a"}), "action": "upsert"},
                     {"type": "person", "identifiers": {"id": "a"}, "action": "identify", "attribute": {"x": 1}},
                     "not an op")
    assert error_indexes(response) == [0, 1, 2, 3]
    assert [e["reason"] for e in response.json()["errors"]][:3] == ["unknown type", "unknown action", "unknown field"]


@pytest.mark.parametrize("event_id", ["01" + "0" * 23, "01" + "0" * 25, "81" + "0" * 24, "01" + "U" * 24,
                                      "01" + "a" * 24, "", 123, None])
def test_event_id_that_is_not_a_ulid_is_invalid(cio, client, event_id):
    response = batch(client, event({"id": "a"}, 1, id=event_id))
    assert response.status_code == 207 and only_error(response)["reason"] == "invalid event id"
    assert cio.events() == [] and cio.people() == []


def test_event_without_id_is_invalid(client):
    op = event({"id": "a"}, 1)
    del op["id"]
    assert only_error(batch(client, op))["field"] == "id"


@pytest.mark.parametrize("timestamp", [TS + 0.5, str(TS), TS * 1000, -1, True, None, "missing"])
def test_event_timestamp_must_be_integer_unix_seconds(client, timestamp):
    op = event({"id": "a"}, 1, timestamp=timestamp)
    if timestamp == "missing":
        del op["timestamp"]
    assert only_error(batch(client, op))["reason"] == "invalid timestamp"


@pytest.mark.parametrize("name", ["", "x" * 101, None, 7])
def test_event_name_missing_or_over_100_bytes_is_invalid(client, name):
    response = batch(client, event({"id": "a"}, 1, name=name), event({"id": "a"}, 2, name="x" * 100))
    assert error_indexes(response) == [0]


@pytest.mark.parametrize("attributes, reason", [
    ({"x" * 151: 1}, "attribute name too long"),
    ({"é" * 76: 1}, "attribute name too long"),  # 152 bytes in 76 characters
    ({"bio": "x" * 1001}, "attribute value too long"),
    ({"bio": "é" * 501}, "attribute value too long"),
    ({"prefs": {"k": "x" * 1000}}, "attribute value too long"),
    ({f"a{i}": i for i in range(301)}, "too many attributes"),
    ({"tags": ["a", "b"]}, "invalid attribute value"),
    ({"last_order_at": TS * 1000}, "invalid timestamp"),
    ({"last_order_at": "2026-01-01T00:00:00Z"}, "invalid timestamp"),
    ({"last_order_at": 1.5}, "invalid timestamp"),
    ({"_timestamp": "yesterday"}, "invalid timestamp"),
    ({"email": "nobody"}, "invalid attribute value"),
    ({"cio_id": "abc"}, "invalid attribute"),
])
def test_attribute_outside_the_limits_makes_the_identify_invalid(cio, client, attributes, reason):
    response = batch(client, identify({"id": "a"}, attributes))
    assert response.status_code == 207 and only_error(response)["reason"] == reason
    assert cio.people() == []


def test_attributes_exactly_at_the_limits_are_accepted(cio, client):
    at_limits = {"x" * 150: "é" * 500, "prefs": {"nested": True}, "gone": None, "last_order_at": TS}
    at_limits.update({f"a{i}": i for i in range(300 - len(at_limits))})
    assert len(at_limits) == 300
    assert batch(client, identify({"id": "a"}, at_limits)).status_code == 200
    (person,) = cio.people()
    assert len(person["attributes"]) == 299 and person["attributes"]["prefs"] == {"nested": True}


def test_a_person_cannot_accumulate_more_than_300_attributes(client):
    assert batch(client, identify({"id": "a"}, {f"a{i}": i for i in range(300)})).status_code == 200
    assert only_error(batch(client, identify({"id": "a"}, {"one_more": 1})))["reason"] == "too many attributes"


def test_an_attribute_keeps_one_type_across_the_workspace(cio, client):
    response = batch(client, identify({"id": "a"}, {"zip": "0150"}), identify({"id": "b"}, {"zip": 150}),
                     identify({"id": "b"}, {"zip": None}))
    assert error_indexes(response) == [1]
    assert only_error(response)["reason"] == "attribute type changed"


# --- Events --------------------------------------------------------------------------------


def test_duplicate_event_id_is_ignored_not_an_error_and_counted(cio, client):
    assert batch(client, event({"id": "a"}, 1, data={"v": 1}), event({"id": "a"}, 1, data={"v": 2})).status_code == 200
    assert batch(client, event({"id": "b"}, 1)).status_code == 200
    (ev,) = cio.events()
    assert ev["data"] == {"v": 1} and ev["person"] == {"id": "a"}
    assert cio.stats()["duplicate_events"] == 2
    assert [p["id"] for p in cio.people()] == ["a"]  # the ignored duplicate created no one


def test_event_for_unknown_id_or_email_creates_the_person_but_unknown_cio_id_is_invalid(cio, client):
    response = batch(client, event({"id": "new"}, 1), event({"email": "New@X.com"}, 2), event({"cio_id": "nope"}, 3))
    assert error_indexes(response) == [2] and only_error(response)["reason"] == "person not found"
    assert [(p["id"], p["email"]) for p in cio.people()] == [("new", None), (None, "new@x.com")]


# --- Identify ordering and identity ------------------------------------------------------


def test_older_identify_never_overwrites_a_newer_attribute(cio, client):
    assert batch(client,
                 identify({"id": "a"}, {"plan": "gold", "_timestamp": 200}),
                 identify({"id": "a"}, {"plan": "silver", "city": "Oslo", "_timestamp": 100}),  # late and older
                 identify({"id": "a"}, {"tier": 2}, timestamp=150),
                 identify({"id": "a"}, {"tier": 1}, timestamp=120)).status_code == 200
    assert cio.person("a")["attributes"] == {"plan": "gold", "city": "Oslo", "tier": 2}
    batch(client, identify({"id": "a"}, {"plan": "platinum", "_timestamp": 300}))
    assert cio.person("a")["attributes"]["plan"] == "platinum"


def test_a_removed_attribute_is_not_brought_back_by_an_older_identify(cio, client):
    batch(client, identify({"id": "a"}, {"plan": "gold", "_timestamp": 100}),
          identify({"id": "a"}, {"plan": None, "_timestamp": 300}),
          identify({"id": "a"}, {"plan": "silver", "_timestamp": 200}))
    assert "plan" not in cio.person("a")["attributes"]


def test_created_at_is_kept_as_sent(cio, client):
    batch(client, identify({"id": "a"}, {"created_at": 1_600_000_000}))
    assert cio.person("a")["attributes"]["created_at"] == 1_600_000_000


def test_email_matches_case_insensitively_and_id_does_not(cio, client, anon):
    assert batch(client, identify({"email": "Ann@Example.COM"}, {"first_name": "Ann"}),
                 identify({"email": "ann@example.com"}, {"last_name": "Lee"}),
                 event({"email": "ANN@EXAMPLE.com"}, 1),
                 identify({"id": "abc"}), identify({"id": "ABC"})).status_code == 200
    ann = [p for p in cio.people() if p["email"]]
    assert len(ann) == 1 and ann[0]["email"] == "ann@example.com"
    assert ann[0]["attributes"] == {"first_name": "Ann", "last_name": "Lee"}
    assert cio.events()[0]["person"] == {"email": "ann@example.com"}
    assert sorted(p["id"] for p in cio.people() if p["id"]) == ["ABC", "abc"]
    assert anon.get("/_emulator/people/ANN@example.com").json()["email"] == "ann@example.com"


def test_email_set_by_id_identify_names_the_same_person(cio, client):
    batch(client, identify({"id": "42"}, {"email": "Zoe@x.com"}),
          identify({"email": "zoe@X.com"}, {"first_name": "Zoe"}), event({"email": "zoe@x.com"}, 1))
    (person,) = cio.people()
    assert (person["id"], person["email"]) == ("42", "zoe@x.com")
    assert person["attributes"] == {"email": "Zoe@x.com", "first_name": "Zoe"}
    assert cio.events()[0]["person"] == {"id": "42"}


def test_id_identify_adopts_an_email_only_person_with_that_email(cio, client):
    batch(client, identify({"email": "guest@x.com"}, {"first_name": "G"}), event({"email": "guest@x.com"}, 1),
          identify({"id": "7"}, {"email": "guest@x.com"}))
    (person,) = cio.people()
    assert (person["id"], person["email"]) == ("7", "guest@x.com")
    assert cio.events()[0]["person"] == {"id": "7"}


def test_an_email_owned_by_another_id_is_an_identifier_conflict(cio, client):
    response = batch(client, identify({"id": "1"}, {"email": "a@x.com"}), identify({"id": "2"}, {"email": "A@x.com"}),
                     identify({"email": "a@x.com"}, {"id": "3"}))
    assert error_indexes(response) == [1, 2]
    assert {e["reason"] for e in response.json()["errors"]} == {"identifier conflict"}
    assert [(p["id"], p["email"]) for p in cio.people()] == [("1", "a@x.com")]


# --- Merge, delete, suppress -------------------------------------------------------------------


def test_merge_moves_events_fills_missing_attributes_and_removes_the_secondary(cio, client):
    batch(client, identify({"id": "p"}, {"first_name": "Primary"}),
          identify({"email": "s@x.com"}, {"first_name": "Secondary", "city": "Oslo"}),
          event({"email": "s@x.com"}, 1), event({"id": "p"}, 2))
    assert batch(client, merge({"id": "p"}, {"email": "S@x.com"})).status_code == 200
    (person,) = cio.people()
    assert person["id"] == "p" and person["attributes"] == {"first_name": "Primary", "city": "Oslo"}
    assert person["email"] == "s@x.com"  # the primary had none, so it takes the secondary's
    assert [e["person"] for e in cio.events()] == [{"id": "p"}, {"id": "p"}]


def test_merge_into_a_missing_primary_is_invalid_and_from_a_missing_secondary_is_a_no_op(cio, client):
    batch(client, identify({"id": "p"}), identify({"id": "s"}))
    response = batch(client, merge({"id": "ghost"}, {"id": "s"}), merge({"id": "p"}, {"email": "ghost@x.com"}),
                     merge({"id": "p"}, {"id": "p"}))
    assert error_indexes(response) == [0, 2]
    assert response.json()["errors"][0]["reason"] == "primary not found"
    assert sorted(p["id"] for p in cio.people()) == ["p", "s"]


def test_delete_removes_the_person_and_only_a_new_identify_brings_them_back(cio, client, anon):
    batch(client, identify({"id": "d"}, {"plan": "gold"}), event({"id": "d"}, 1))
    assert batch(client, person_op("delete", {"id": "d"})).status_code == 200
    assert cio.people() == [] and cio.events() == []
    assert anon.get("/_emulator/people/d").status_code == 404
    assert batch(client, event({"id": "d"}, 2)).status_code == 200  # accepted, but no one to record it on
    assert cio.people() == [] and cio.stats()["ignored_ops"] == 1
    batch(client, identify({"id": "d"}), event({"id": "d"}, 3))
    assert cio.person("d")["attributes"] == {} and [e["id"] for e in cio.events()] == [ulid(3)]


def test_suppress_removes_the_person_and_ignores_their_later_ops_until_unsuppressed(cio, client, anon):
    batch(client, identify({"id": "s"}, {"email": "s@x.com", "plan": "gold"}), event({"id": "s"}, 1))
    assert batch(client, person_op("suppress", {"id": "s"})).status_code == 200
    assert cio.people() == [{"id": "s", "email": "s@x.com", "cio_id": None, "attributes": {}, "suppressed": True}]
    assert anon.get("/_emulator/people/S@X.com").json()["suppressed"] is True
    assert batch(client, identify({"id": "s"}, {"plan": "silver"}), identify({"email": "s@x.com"}),
                 event({"id": "s"}, 2), event({"email": "s@x.com"}, 3)).status_code == 200
    assert cio.events() == [] and cio.stats()["ignored_ops"] == 4
    unsuppress_then_identify = (person_op("unsuppress", {"email": "s@x.com"}), identify({"id": "s"}, {"plan": "bronze"}))
    assert batch(client, *unsuppress_then_identify).status_code == 200
    assert cio.people() == [{"id": "s", "email": None, "cio_id": cio.person("s")["cio_id"],
                             "attributes": {"plan": "bronze"}, "suppressed": False}]


# --- /entity and v1 -------------------------------------------------------------------------


def test_entity_endpoint_takes_one_op_under_32kb(cio, client):
    assert client.post("/api/v2/entity", json=identify({"id": "e"}, {"plan": "gold"})).json() == {}
    response = client.post("/api/v2/entity", json=event({"id": "e"}, 1, id="bad"))
    assert response.status_code == 400 and only_error(response)["reason"] == "invalid event id"
    pad = 32 * 1024 - len(compact(event({"id": "e"}, 2, data={"pad": ""})))
    at_limit = compact(event({"id": "e"}, 2, data={"pad": "x" * pad}))
    just_under = compact(event({"id": "e"}, 2, data={"pad": "x" * (pad - 1)}))
    assert len(at_limit) == 32 * 1024
    assert post_raw(client, "/api/v2/entity", at_limit).status_code == 400  # "under 32 KB"
    assert post_raw(client, "/api/v2/entity", just_under).status_code == 200
    assert [p["attributes"] for p in cio.people()] == [{"plan": "gold"}]


def test_v1_identify_event_merge_and_delete_map_onto_the_same_store(cio, client):
    assert client.put("/api/v1/customers/c%201", json={"first_name": "Cy", "_timestamp": 100}).json() == {}
    assert client.put("/api/v1/customers/c%201", json={"first_name": "Old", "_timestamp": 50}).status_code == 200
    assert cio.person("c 1")["attributes"] == {"first_name": "Cy"}
    event_body = {"name": "viewed", "data": {"sku": "A"}, "timestamp": TS, "id": ulid(1)}
    assert client.post("/api/v1/customers/c%201/events", json=event_body).status_code == 200
    assert client.post("/api/v1/customers/c%201/events", json=event_body).status_code == 200  # duplicate id
    assert client.post("/api/v1/customers/c%201/events", json={"name": "no_id"}).status_code == 200
    assert [e["name"] for e in cio.events()] == ["viewed", "no_id"] and cio.stats()["duplicate_events"] == 1
    assert client.put("/api/v1/customers/c2", json={"city": "Oslo"}).status_code == 200
    merge_body = {"primary": {"id": "c 1"}, "secondary": {"id": "c2"}}
    assert client.post("/api/v1/merge_customers", json=merge_body).json() == {}
    assert [p["id"] for p in cio.people()] == ["c 1"] and cio.person("c 1")["attributes"]["city"] == "Oslo"
    assert client.delete("/api/v1/customers/c%201").status_code == 200
    assert cio.people() == [] and cio.events() == []


def test_v1_invalid_requests_get_400_with_errors(cio, client):
    cases = [client.post("/api/v1/customers/c/events", json={"data": {}}),  # no name
             client.post("/api/v1/customers/c/events", json={"name": "x", "data": {"big": "x" * 100_001}}),
             client.post("/api/v1/customers/c/events", json={"name": "x", "timestamp": "now"}),
             client.post("/api/v1/customers/c/events", json={"name": "x", "properties": {}}),
             client.put("/api/v1/customers/c", json={"orders": [1, 2]}),
             client.put("/api/v1/customers/" + "x" * 151, json={}),
             client.post("/api/v1/merge_customers", json={"primary": {"id": "missing"}, "secondary": {"id": "c"}})]
    for response in cases:
        assert response.status_code == 400 and response.json()["errors"][0]["reason"]
    assert cio.people() == [] and cio.events() == []


# --- Injected faults ---------------------------------------------------------------------------


def test_injected_429_carries_retry_after_applies_nothing_then_service_resumes(cio, client):
    cio.inject(status=429, retry_after=2)
    response = batch(client, identify({"id": "a"}))
    assert response.status_code == 429 and response.headers["Retry-After"] == "2"
    assert cio.people() == []
    assert batch(client, identify({"id": "a"})).status_code == 200
    assert [p["id"] for p in cio.people()] == ["a"]


def test_injected_503_hits_the_next_count_requests_only(cio, client):
    cio.inject(status=503, count=2)
    statuses = [batch(client, identify({"id": "a"})).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert cio.stats()["status_counts"] == {503: 2, 200: 1}


def test_injected_delay_precedes_normal_handling(cio, client):
    cio.inject(delay=0.3)
    started = time.monotonic()
    assert batch(client, identify({"id": "a"})).status_code == 200
    assert time.monotonic() - started >= 0.3
    assert [p["id"] for p in cio.people()] == ["a"]


def test_a_client_that_times_out_during_a_delay_still_had_its_request_applied(cio, anon):
    cio.inject(delay=0.5)
    with pytest.raises(httpx.ReadTimeout):
        anon.post("/api/v2/batch", auth=AUTH, json={"batch": [event({"id": "a"}, 1)]}, timeout=0.1)
    deadline = time.monotonic() + 3
    while not cio.events() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["id"] for e in cio.events()] == [ulid(1)]  # why retries need deterministic event ids


def test_injected_drop_closes_the_connection_without_a_response_then_service_resumes(cio, client):
    cio.inject(drop=True)
    with pytest.raises(httpx.RemoteProtocolError):
        batch(client, identify({"id": "a"}))
    assert cio.people() == [] and cio.stats()["dropped_connections"] == 1
    assert batch(client, identify({"id": "a"})).status_code == 200


def test_faults_can_be_injected_over_http_and_do_not_hit_emulator_endpoints(cio, client, anon):
    assert anon.post("/_emulator/faults", json={"status": 500, "count": 1}).json() == {}
    assert anon.get("/_emulator/stats").status_code == 200  # not an API request
    assert batch(client, identify({"id": "a"})).status_code == 500
    assert batch(client, identify({"id": "a"})).status_code == 200
    for bad in ({"status": 200}, {"drop": True, "status": 500}, {}, {"count": -1, "status": 500}, {"colour": "red"}):
        assert anon.post("/_emulator/faults", json=bad).status_code == 400


def test_inject_rejects_nonsense(cio):
    for nonsense in ({"retry_after": 1}, {"status": 503, "count": -1}, {"status": 200}, {"delay": -1}, {}):
        with pytest.raises(ValueError):
            cio.inject(**nonsense)


def test_inject_with_count_0_or_reset_faults_cancels_pending_faults(cio, client, anon):
    cio.inject(drop=True, count=50)
    cio.inject(drop=False, count=0)
    assert batch(client, identify({"id": "a"})).status_code == 200
    cio.inject(status=503, count=5)
    cio.reset_faults()
    assert batch(client, identify({"id": "a"})).status_code == 200
    anon.post("/_emulator/faults", json={"status": 503, "count": 5})
    anon.post("/_emulator/faults", json={"count": 0})
    assert batch(client, identify({"id": "a"})).status_code == 200
    assert [p["id"] for p in cio.people()] == ["a"]


# --- Stats, reset, lifecycle ----------------------------------------------------------------------


def test_stats_count_api_requests_bytes_paths_and_statuses(cio, client, anon):
    first = compact({"batch": [identify({"id": "a"}), identify({"id": "b", "email": "b@x.com"})]})
    second = compact({"name": "x", "timestamp": TS, "id": ulid(1)})
    post_raw(client, "/api/v2/batch", first)
    post_raw(client, "/api/v1/customers/a/events", second)
    anon.post("/api/v2/entity", json={})  # no auth
    anon.get("/_emulator/people")  # emulator endpoints are not counted
    stats = anon.get("/_emulator/stats").json()
    assert stats["requests"] == 3
    assert stats["bytes"] == len(first) + len(second) + len("{}")
    assert stats["by_path"] == {"/api/v2/batch": 1, "/api/v1/customers/{id}/events": 1, "/api/v2/entity": 1}
    assert stats["status_counts"] == {"207": 1, "200": 1, "401": 1}
    assert (stats["ops"], stats["rejected_ops"]) == (3, 1)
    assert cio.stats()["status_counts"] == {207: 1, 200: 1, 401: 1}


def test_reset_clears_people_events_stats_and_pending_faults(cio, client, anon):
    batch(client, identify({"id": "a"}, {"zip": "1"}), event({"id": "a"}, 1))
    cio.inject(status=503, count=5)
    assert anon.post("/_emulator/reset").json() == {}
    assert cio.people() == [] and cio.events() == [] and cio.stats()["requests"] == 0
    # faults, seen event ids and attribute types are gone too
    assert batch(client, identify({"id": "a"}, {"zip": 1}), event({"id": "a"}, 1)).status_code == 200
    assert len(cio.events()) == 1


def test_concurrent_clients_lose_nothing(cio, client):
    def send(worker: int) -> None:
        for i in range(10):
            assert batch(client, event({"id": f"w{worker}"}, worker * 100 + i)).status_code == 200

    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cio.events()) == 80 and len(cio.people()) == 8 and cio.stats()["requests"] == 80


def test_lifecycle_picks_a_free_port_and_stop_is_idempotent():
    emulator = CustomerIOEmulator(site_id="s", api_key="k")
    with pytest.raises(RuntimeError):
        emulator.url
    emulator.start()
    try:
        assert emulator.url.startswith("http://127.0.0.1:") and not emulator.url.endswith(":0")
        assert httpx.put(f"{emulator.url}/api/v1/customers/1", auth=("s", "k"), json={}).status_code == 200
    finally:
        emulator.stop()
    emulator.stop()


def test_command_line_serves_and_prints_its_url():
    proc = subprocess.Popen([sys.executable, "-m", "pg2cio_assets.cio_emulator", "--site-id", "s", "--api-key", "k"],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert httpx.put(f"{url}/api/v1/customers/1", auth=("s", "k"), json={}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=5)

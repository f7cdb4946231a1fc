"""The pure parts of MQTT: payload limits, reply routes, records and the federation state."""

from __future__ import annotations

import json
from functools import cache

import msgpack
import pytest

from nearest_wire import WireError
from nearestd.core.devices import DeviceTable, Record
from nearestd.core.federation import (
    OFFLINE,
    ONLINE,
    Federation,
    Inventory,
    RecordError,
    device_record,
    device_topic_id,
    encode_record,
    name_error,
    parse_record,
    record_origin,
    topic_device_id,
)
from nearestd.core.model import DeviceKind, PlacementMethod
from nearestd.core.mqtt_payload import (
    decode_json,
    decode_request,
    encode_reply,
    route_v5,
    route_v311,
    topic_error,
)
from nearestd.core.sitemap import SiteMap, build_sitemap
from support import DEMO_CSV, DEMO_MAP


@cache
def sitemap() -> SiteMap:
    doc = json.loads(DEMO_MAP.read_text())
    return build_sitemap([(str(DEMO_MAP), doc)], [(str(DEMO_CSV), DEMO_CSV.read_text())])


def table() -> DeviceTable:
    return DeviceTable(sitemap())


# ---- payloads ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"", "empty payload"),
        (b"\xff", "not UTF-8"),
        (b"{", "malformed JSON"),
        (b"null", "JSON null, expected an object"),
        (b'"x"', "JSON string, expected an object"),
        (b'{"a": Infinity}', "Infinity is not a JSON number"),
        (b'{"a": ' + b"[" * 9 + b"]" * 9 + b"}", "a[0][0][0][0][0][0][0]: nesting deeper than 8"),
        (b"[" * 100000 + b"]" * 100000, "nesting deeper than 8"),
        (json.dumps({"a": {"b": "\u00e9" * 2049}}).encode(), "a.b: string longer than 4096"),
        (json.dumps({"k" * 5000: 1}).encode(), "string longer than 4096"),
        (json.dumps({"a": list(range(1025))}).encode(), "a: more than 1024 items"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "malformed JSON"),
    ],
)
def test_json_limits_give_precise_errors(payload: bytes, words: str) -> None:
    with pytest.raises(WireError) as err:
        decode_json(payload)
    assert err.value.code == "bad-request"
    assert words in err.value.message


def test_json_within_limits_decodes() -> None:
    obj = {"v": 1, "id": 1, "op": "ping", "deep": [[[[[[1]]]]]], "s": "x" * 4096}
    assert decode_json(json.dumps(obj).encode()) == obj


def test_decode_request_picks_the_codec_by_content_type_and_checks_size() -> None:
    req = {"v": 1, "id": 2, "op": "ping"}
    assert decode_request(msgpack.packb(req), "application/msgpack", 1000) == req
    assert decode_request(json.dumps(req).encode(), None, 1000) == req
    assert decode_request(json.dumps(req).encode(), "text/plain", 1000) == req
    with pytest.raises(WireError) as err:
        decode_request(b"{}" * 600, None, 1000)
    assert err.value.code == "too-large"
    with pytest.raises(WireError, match="MessagePack"):
        decode_request(json.dumps(req).encode(), "application/msgpack", 1000)


def test_replies_use_the_request_encoding() -> None:
    reply = {"v": 1, "id": 1, "ok": True, "name": "Drucker \u00fc"}
    assert json.loads(encode_reply(reply, False)) == reply
    assert msgpack.unpackb(encode_reply(reply, True)) == reply


@pytest.mark.parametrize(
    ("topic", "ok"),
    [
        ("replies/abc", True),
        ("P/replies/1", True),
        ("", False),
        ("a/+/b", False),
        ("a/#", False),
        ("$SYS/x", False),
        ("P/query", False),
        ("P/query/other", False),
        ("P/devices/x", False),
        ("P/status/x", False),
        ("x" * 2000, False),
        (42, False),
    ],
)
def test_reply_topics_never_wildcards_nor_our_own(topic: object, ok: bool) -> None:
    assert (topic_error(topic, "P") is None) is ok
    assert (route_v5(topic, b"c", "P") is not None) is ok


def test_v311_routes_echo_the_correlation() -> None:
    route, why = route_v311({"reply_to": "r/1", "correlation": "abc"}, "P")
    assert why is None and route is not None
    assert route.topic == "r/1" and route.has_echo and route.echo == "abc"
    route, why = route_v311({"reply_to": "r/1"}, "P")
    assert route is not None and not route.has_echo and why is None
    route, why = route_v311({"reply_to": "r/1", "correlation": {"x": 1}}, "P")
    assert route is not None and why is not None and "correlation" in why
    route, why = route_v311({}, "P")
    assert route is None and why is not None and "reply_to: missing" in why
    route, why = route_v311({"reply_to": "P/status/me"}, "P")
    assert route is None and why is not None and "own topics" in why


# ---- records -------------------------------------------------------------------------------
def test_topic_ids_round_trip_and_stay_one_level() -> None:
    for device_id in ("prn-n0-lobby", "a/b+c#d", "uuid:3f5e", "Caf\u00e9 printer", "%41"):
        level = device_topic_id(device_id)
        assert "/" not in level and "+" not in level and "#" not in level
        assert topic_device_id(level) == device_id


def test_names_usable_in_topics() -> None:
    assert name_error("ws-17.example", "instance") is None
    assert name_error("a/b", "instance") is not None
    assert name_error("", "instance") is not None
    assert name_error("nearest/v1", "prefix") is None
    assert name_error("/nearest", "prefix") is not None
    assert name_error("a/#", "prefix") is not None


def lobby() -> Record:
    rec = table().get("prn-n0-lobby")
    assert rec is not None
    return rec


def test_a_record_round_trips_into_a_federated_device_placed_where_the_origin_put_it() -> None:
    rec = lobby()
    payload = encode_record(device_record(rec, "origin-a"))
    assert record_origin(payload) == "origin-a"
    dev = parse_record(payload, "prn-n0-lobby")
    assert dev.source == "mqtt" and dev.origin == "origin-a"
    assert dev.kind == DeviceKind.PRINTER and dev.capabilities == rec.device.capabilities
    t = DeviceTable(sitemap())
    t.upsert(dev.__class__(**{**_fields(dev), "id": "copy"}), 1.0)
    placed = t.get("copy")
    assert placed is not None and placed.placement is not None and rec.placement is not None
    assert placed.placement.method == PlacementMethod.FEDERATED
    assert (placed.placement.zone, placed.placement.level) == (rec.placement.zone, 0)
    assert abs(placed.placement.x - rec.placement.x) < 0.01
    assert abs(placed.placement.y - rec.placement.y) < 0.01


def _fields(dev: object) -> dict[str, object]:
    return {name: getattr(dev, name) for name in dev.__dataclass_fields__}  # type: ignore[attr-defined]


def test_a_record_for_an_unknown_site_is_unlocated() -> None:
    obj = device_record(lobby(), "o")
    obj["placement"]["site"] = "elsewhere"
    dev = parse_record(encode_record(obj), "prn-n0-lobby")
    t = DeviceTable(sitemap())
    t.upsert(dev.__class__(**{**_fields(dev), "id": "far"}), 1.0)
    got = t.get("far")
    assert got is not None and got.placement is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"v": 2}, "v:"),
        ({"id": "other"}, "does not match"),
        ({"id": ""}, "id:"),
        ({"origin": "a/b"}, "origin"),
        ({"kind": "fax"}, "kind"),
        ({"uri": "javascript:alert(1)"}, "uri"),
        ({"name": "x" * 300}, "name: longer"),
        ({"name": "bell\x07"}, "control characters"),
        ({"state": "exploded"}, "state"),
        ({"capabilities": {"color": "yes"}}, "color"),
        ({"capabilities": {"paper_max": "A0"}}, "paper_max"),
        ({"placement": {"site": "hq"}}, "placement.building"),
        ({"state_reasons": ["x"] * 20}, "state_reasons"),
    ],
)
def test_hostile_records_are_refused_naming_the_field(
    change: dict[str, object], words: str
) -> None:
    obj = device_record(lobby(), "o")
    obj.update(change)
    with pytest.raises(RecordError, match=words):
        parse_record(encode_record(obj), "prn-n0-lobby")


@pytest.mark.parametrize(
    "placement",
    [
        {"lat": float("nan")},
        {"lon": 500},
        {"level": 10**9},
        {"level": True},
    ],
)
def test_hostile_placements_are_refused(placement: dict[str, object]) -> None:
    obj = device_record(lobby(), "o")
    obj["placement"].update(placement)
    with pytest.raises(RecordError, match="placement"):
        parse_record(json.dumps(obj).encode(), "prn-n0-lobby")


def test_garbage_records_are_refused() -> None:
    for payload in (b"\xff", b"[]", b"{", b"[" * 10000, b" " * 70000 + b"{}"):
        with pytest.raises(RecordError):
            parse_record(payload, "x")


def test_inventory_diff_publishes_changes_and_clears_what_left() -> None:
    t = table()
    inv = Inventory()
    changed, gone = inv.diff(t.records(), "me")
    assert len(changed) == 17 and gone == []
    inv.mark(changed, gone)
    assert inv.diff(t.records(), "me") == ([], [])
    recs = [r for r in t.records() if r.device.id != "prn-n0-lobby"]
    changed, gone = inv.diff(recs, "me")
    assert changed == [] and gone == ["prn-n0-lobby"]


# ---- federation ----------------------------------------------------------------------------
def rec_for(device_id: str, origin: str) -> bytes:
    obj = device_record(lobby(), origin)
    obj["id"] = device_id
    return encode_record(obj)


def test_foreign_devices_are_served_only_while_their_origin_is_online() -> None:
    f = Federation("me")
    assert f.on_record("d1", rec_for("d1", "a")) == []  # origin status unknown: held
    changes = f.on_status("a", ONLINE)
    assert [(c.device_id, c.device is not None) for c in changes] == [("d1", True)]
    changes = f.on_record("d2", rec_for("d2", "a"))
    assert [(c.device_id, c.origin) for c in changes] == [("d2", "a")]
    assert {d.id for d in f.served()} == {"d1", "d2"}
    changes = f.on_status("a", OFFLINE)
    assert sorted((c.device_id, c.device) for c in changes) == [("d1", None), ("d2", None)]
    assert f.served() == []
    assert f.on_status("a", OFFLINE) == []
    assert len(f.on_status("a", ONLINE)) == 2
    changes = f.on_record("d1", b"")  # cleared
    assert [(c.device_id, c.device) for c in changes] == [("d1", None)]


def test_own_records_are_never_foreign() -> None:
    f = Federation("me")
    f.on_status("me", ONLINE)
    assert f.on_record("d1", rec_for("d1", "me")) == []
    assert f.served() == [] and f.records == {}
    # Our own record replacing another origin's record at the same topic removes theirs.
    f.on_status("a", ONLINE)
    f.on_record("d2", rec_for("d2", "a"))
    changes = f.on_record("d2", rec_for("d2", "me"))
    assert [(c.device_id, c.origin, c.device) for c in changes] == [("d2", "a", None)]


def test_a_record_moving_between_origins_moves_its_tag() -> None:
    f = Federation("me")
    f.on_status("a", ONLINE)
    f.on_status("b", ONLINE)
    f.on_record("d", rec_for("d", "a"))
    changes = f.on_record("d", rec_for("d", "b"))
    assert [(c.origin, c.device is None) for c in changes] == [("a", True), ("b", False)]


def test_resync_forgets_what_the_broker_no_longer_holds() -> None:
    f = Federation("me")
    f.on_status("a", ONLINE)
    f.on_status("b", ONLINE)
    f.on_record("d1", rec_for("d1", "a"))
    f.on_record("d2", rec_for("d2", "a"))
    f.on_record("d3", rec_for("d3", "b"))
    f.begin_resync()
    f.on_status("a", ONLINE)
    f.on_record("d1", rec_for("d1", "a"))
    changes = f.end_resync()
    assert sorted(c.device_id for c in changes) == ["d2", "d3"]
    assert {d.id for d in f.served()} == {"d1"}


def test_federation_is_bounded_and_counts_refusals() -> None:
    f = Federation("me", max_devices=2)
    f.on_record("d1", rec_for("d1", "a"))
    f.on_record("d2", rec_for("d2", "a"))
    with pytest.raises(RecordError, match="more than 2"):
        f.on_record("d3", rec_for("d3", "a"))
    with pytest.raises(RecordError):
        f.on_record("d4", b"junk")
    assert f.refused == 2
    f.on_record("d1", rec_for("d1", "a"))  # an update of a known record still passes
    assert f.on_status("a", b"something else") == []


def test_config_names_each_bad_mqtt_key() -> None:
    from nearestd.config import ConfigError, parse_config

    text = """
[mqtt]
url = "mqtt://127.0.0.1:1883"
topic_prefix = "/bad/+/"
instance = "a/b"
keepalive = 1
max_payload = 10
password_file = "pw"
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "x.toml")
    problems = "\n".join(err.value.problems)
    for key in ("topic_prefix", "instance", "keepalive", "max_payload", "password_file"):
        assert f"x.toml: [mqtt] {key}:" in problems
    ok = parse_config('[mqtt]\ntopic_prefix = "site/nearest/v1"\ninstance = "ws-1"\n', "y.toml")
    assert ok.mqtt is not None and ok.mqtt.instance == "ws-1"

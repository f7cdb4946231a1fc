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
    interest,
    name_error,
    parse_record,
    record_origin,
    record_topic,
    split_key,
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
    # Each record's topic carries its site, so bridges and daemons subscribe per site.
    assert all(level.startswith("hq/") for level, _ in changed)
    inv.mark(changed, gone)
    assert inv.diff(t.records(), "me") == ([], [])
    recs = [r for r in t.records() if r.device.id != "prn-n0-lobby"]
    changed, gone = inv.diff(recs, "me")
    assert changed == [] and gone == ["hq/prn-n0-lobby"]


def test_an_inventory_seeded_with_what_the_broker_holds_sends_only_changes() -> None:
    t = table()
    first = Inventory()
    changed, _ = first.diff(t.records(), "me")
    held = dict(changed)
    held["hq/gone-printer"] = b"{}"
    held["prn-n0-lobby"] = b"{}"  # the one-level layout of an older version
    again = Inventory(published=held)
    changed, gone = again.diff(t.records(), "me")
    assert changed == [] and sorted(gone) == ["hq/gone-printer", "prn-n0-lobby"]


@pytest.mark.parametrize(
    ("site", "device_id", "key"),
    [
        ("hq", "prn-1", "hq/prn-1"),
        (None, "prn-1", "_/prn-1"),
        ("_", "prn-1", "%5F/prn-1"),
        ("North campus/B", "a/b", "North%20campus%2FB/a%2Fb"),
    ],
)
def test_record_topics_carry_the_site_as_one_level(
    site: str | None, device_id: str, key: str
) -> None:
    assert record_topic(site, device_id) == key
    assert split_key(key) == (key.split("/")[0], key.split("/")[1])
    assert split_key("prn-1") == (None, "prn-1")


def test_interest_is_per_site_plus_the_legacy_layout() -> None:
    assert interest("P", ["b", "a", "a"]) == [
        "P/devices/a/+",
        "P/devices/b/+",
        "P/devices/_/+",
        "P/devices/+",
    ]
    assert interest("P", None) == ["P/devices/+/+", "P/devices/+"]


# ---- federation ----------------------------------------------------------------------------
T = 1000.0


def rec_for(device_id: str, origin: str, site: str | None = "hq") -> bytes:
    obj = device_record(lobby(), origin)
    obj["id"] = device_id
    if site is None:
        obj["placement"] = None
    else:
        obj["placement"]["site"] = site
    return encode_record(obj)


def test_foreign_devices_are_served_only_while_their_origin_is_online() -> None:
    f = Federation("me")
    assert f.on_record("d1", rec_for("d1", "a"), T) == []  # origin status unknown: held
    changes = f.on_status("a", ONLINE, T)
    assert [(c.device_id, c.device is not None) for c in changes] == [("d1", True)]
    changes = f.on_record("hq/d2", rec_for("d2", "a"), T)
    assert [(c.device_id, c.origin) for c in changes] == [("d2", "a")]
    assert {d.id for d in f.served()} == {"d1", "d2"}
    changes = f.on_status("a", OFFLINE, T)  # no grace: gone at once
    assert sorted((c.device_id, c.device) for c in changes) == [("d1", None), ("d2", None)]
    assert f.served() == []
    assert f.on_status("a", OFFLINE, T) == []
    assert len(f.on_status("a", ONLINE, T)) == 2
    changes = f.on_record("d1", b"", T)  # cleared
    assert [(c.device_id, c.device) for c in changes] == [("d1", None)]
    assert f.legacy == 1


def test_an_offline_origin_s_devices_stay_stale_for_the_grace_then_leave() -> None:
    f = Federation("me", grace=60.0)
    f.on_status("a", ONLINE, T)
    f.on_record("hq/d1", rec_for("d1", "a"), T)
    assert f.next_wakeup() is None
    changes = f.on_status("a", OFFLINE, T + 1)
    assert [(c.device_id, c.device is not None and c.device.stale) for c in changes] == [
        ("d1", True)
    ]
    assert f.stale_count() == 1 and f.next_wakeup() == T + 61
    assert f.tick(T + 60.9) == []
    changes = f.tick(T + 61)
    assert [(c.device_id, c.device) for c in changes] == [("d1", None)]
    assert f.served() == [] and f.expired == 1 and f.next_wakeup() is None
    # The record is kept: the origin coming back brings its device back, fresh.
    changes = f.on_status("a", ONLINE, T + 90)
    assert [(c.device_id, c.device is not None and not c.device.stale) for c in changes] == [
        ("d1", True)
    ]


@pytest.mark.parametrize("link", ["broker", "bridge:hub"])
def test_a_link_down_makes_every_foreign_device_stale_and_up_makes_it_fresh(link: str) -> None:
    f = Federation("me", grace=30.0)
    for origin in ("a", "b"):
        f.on_status(origin, ONLINE, T)
        f.on_record(f"hq/{origin}1", rec_for(f"{origin}1", origin), T)
    changes = f.link_down(link, T + 5)
    assert sorted((c.device_id, c.device.stale) for c in changes if c.device) == [
        ("a1", True),
        ("b1", True),
    ]
    assert f.link_down(link, T + 6) == []  # already down: the grace runs from the first
    # Records that change while the link is down arrive stale too.
    changes = f.on_record("hq/a2", rec_for("a2", "a"), T + 10)
    assert [(c.device_id, c.device is not None and c.device.stale) for c in changes] == [
        ("a2", True)
    ]
    changes = f.link_up(link, T + 20)
    assert sorted((c.device_id, c.device.stale) for c in changes if c.device) == [
        ("a1", False),
        ("a2", False),
        ("b1", False),
    ]
    assert f.tick(T + 100) == [] and f.stale_count() == 0
    f.link_down(link, T + 200)
    changes = f.tick(T + 230)
    assert sorted(c.device_id for c in changes if c.device is None) == ["a1", "a2", "b1"]
    # Back up after the grace: the kept records are served again without any replay.
    assert len(f.link_up(link, T + 300)) == 3


def test_a_second_link_down_keeps_devices_stale_until_both_are_up() -> None:
    f = Federation("me", grace=30.0)
    f.on_status("a", ONLINE, T)
    f.on_record("hq/a1", rec_for("a1", "a"), T)
    f.link_down("broker", T)
    f.link_down("bridge:hub", T + 1)
    assert f.link_up("broker", T + 2) == []
    assert f.stale_count() == 1
    assert [c.device.stale for c in f.link_up("bridge:hub", T + 3) if c.device] == [False]


def test_an_origin_whose_heartbeats_stop_is_cut_off_and_revives_with_the_next() -> None:
    f = Federation("me", grace=10.0)
    f.on_status("a", ONLINE, T)
    f.on_record("hq/a1", rec_for("a1", "a"), T)
    assert f.on_heartbeat("a", b"2", T) == []
    assert f.next_wakeup() == T + 6  # three of its own intervals
    assert f.on_heartbeat("a", b"2", T + 2) == [] and f.tick(T + 7.9) == []
    changes = f.tick(T + 8)
    assert [(c.device_id, c.device is not None and c.device.stale) for c in changes] == [
        ("a1", True)
    ]
    assert f.next_wakeup() == T + 18  # the grace runs from when it fell silent
    assert [c.device is None for c in f.tick(T + 18)] == [True]
    changes = f.on_heartbeat("a", b"2", T + 30)
    assert [(c.device_id, c.device is not None and c.device.stale) for c in changes] == [
        ("a1", False)
    ]


@pytest.mark.parametrize("payload", [b"", b"x", b"0", b"-1", b"nan", b"99999", "\u00e9".encode()])
def test_a_malformed_heartbeat_is_ignored(payload: bytes) -> None:
    f = Federation("me")
    assert f.on_heartbeat("a", payload, T) == [] and f.heard == {}


def test_only_the_served_sites_are_held() -> None:
    f = Federation("me", sites=frozenset({"hq"}))
    f.on_status("a", ONLINE, T)
    assert len(f.on_record("hq/d1", rec_for("d1", "a"), T)) == 1
    assert f.on_record("lab/d2", rec_for("d2", "a", site="lab"), T) == []
    assert f.on_record("d3", rec_for("d3", "a", site="lab"), T) == []  # legacy layout
    assert f.other_site == 2 and set(f.records) == {"hq/d1"}
    # Unlocated devices are never answered, but the inventory shows them.
    assert len(f.on_record("_/d4", rec_for("d4", "a", site=None), T)) == 1


def test_a_record_whose_site_disagrees_with_its_topic_is_refused() -> None:
    f = Federation("me")
    with pytest.raises(RecordError, match=r"placement\.site"):
        f.on_record("lab/d1", rec_for("d1", "a", site="hq"), T)
    with pytest.raises(RecordError, match=r"placement\.site"):
        f.on_record("hq/d1", rec_for("d1", "a", site=None), T)
    assert f.refused == 2 and f.records == {}


def test_own_records_are_never_foreign() -> None:
    f = Federation("me")
    f.on_status("me", ONLINE, T)
    assert f.on_record("hq/d1", rec_for("d1", "me"), T) == []
    assert f.served() == [] and f.records == {}
    # Our own record replacing another origin's record at the same topic removes theirs.
    f.on_status("a", ONLINE, T)
    f.on_record("hq/d2", rec_for("d2", "a"), T)
    changes = f.on_record("hq/d2", rec_for("d2", "me"), T)
    assert [(c.device_id, c.origin, c.device) for c in changes] == [("d2", "a", None)]


def test_a_record_moving_between_origins_moves_its_tag() -> None:
    f = Federation("me")
    f.on_status("a", ONLINE, T)
    f.on_status("b", ONLINE, T)
    f.on_record("hq/d", rec_for("d", "a"), T)
    changes = f.on_record("hq/d", rec_for("d", "b"), T)
    assert [(c.origin, c.device is None) for c in changes] == [("a", True), ("b", False)]


def test_a_replayed_identical_record_changes_nothing() -> None:
    f = Federation("me")
    f.on_status("a", ONLINE, T)
    assert len(f.on_record("hq/d", rec_for("d", "a"), T)) == 1
    assert f.on_record("hq/d", rec_for("d", "a"), T + 1) == []


def test_resync_forgets_what_the_broker_no_longer_holds() -> None:
    f = Federation("me")
    f.on_status("a", ONLINE, T)
    f.on_status("b", ONLINE, T)
    f.on_record("hq/d1", rec_for("d1", "a"), T)
    f.on_record("hq/d2", rec_for("d2", "a"), T)
    f.on_record("hq/d3", rec_for("d3", "b"), T)
    f.begin_resync()
    f.on_status("a", ONLINE, T)
    f.on_record("hq/d1", rec_for("d1", "a"), T)
    changes = f.end_resync(T)
    assert sorted(c.device_id for c in changes) == ["d2", "d3"]
    assert {d.id for d in f.served()} == {"d1"}


def test_federation_is_bounded_and_counts_refusals() -> None:
    f = Federation("me", max_devices=2)
    f.on_record("hq/d1", rec_for("d1", "a"), T)
    f.on_record("hq/d2", rec_for("d2", "a"), T)
    with pytest.raises(RecordError, match="more than 2"):
        f.on_record("hq/d3", rec_for("d3", "a"), T)
    with pytest.raises(RecordError):
        f.on_record("hq/d4", b"junk", T)
    assert f.refused == 2
    f.on_record("hq/d1", rec_for("d1", "a"), T)  # an update of a known record still passes
    assert f.on_status("a", b"something else", T) == []


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


def test_an_origin_falling_silent_touches_only_its_own_records() -> None:
    f = Federation("me", grace=10.0)
    for o in ("a", "b", "c"):
        f.on_status(o, ONLINE, T)
        f.on_heartbeat(o, b"1", T)
        for i in range(3):
            f.on_record(f"hq/{o}{i}", rec_for(f"{o}{i}", o), T)
    f.on_record("hq/a0", rec_for("a0", "b"), T)  # a record moving to another origin
    f.on_record("hq/c2", b"", T)  # and one cleared
    expected: dict[str, set[str]] = {}
    for key, dev in f.records.items():
        expected.setdefault(dev.origin or "", set()).add(key)
    assert f._by_origin == expected
    f.on_heartbeat("a", b"1", T + 2.5)
    f.on_heartbeat("c", b"1", T + 2.5)
    changes = f.tick(T + 3.5)  # only b is silent (3 x its 1 s interval)
    assert sorted(c.device_id for c in changes) == ["a0", "b0", "b1", "b2"]
    assert all(c.device is not None and c.device.stale for c in changes)

"""Visibility rules: restricted devices never reach other clients' answers or listings."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearest_wire import Need
from nearestd import service as service_module
from nearestd.config import parse_config
from nearestd.core.devices import DeviceTable
from nearestd.core.model import Device, DeviceKind
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import SiteMapError, build_sitemap
from nearestd.service import ADMIN_PEER, Peer, Service
from support import DEMO_MAP

FINANCE_PIN_NAME = "Finance LaserJet"


def demo() -> dict[str, Any]:
    return json.loads(DEMO_MAP.read_text())  # type: ignore[no-any-return]


def restricted_demo() -> dict[str, Any]:
    """The demo campus with a finance-only static printer, a restricted zone and pin."""
    doc = demo()
    feats = doc["features"]
    pin = next(f for f in feats if f["properties"].get("match") == {"name": FINANCE_PIN_NAME})
    pin["properties"]["visible_to"] = ["10.20.23.0/24", "2001:db8:20:23::/64"]
    static = copy.deepcopy(pin)
    static["properties"] = {
        "feature_type": "device",
        "static": True,
        "id": "prn-finance",
        "name": "Finance Secure Colour",
        "kind": "printer",
        "uri": "ipps://10.20.23.50:631/ipp/print",
        "site": "hq",
        "building": "north",
        "level": 1,
        "visible_to": ["n1-finance"],
    }
    feats.append(static)
    board = next(f for f in feats if f["properties"].get("id") == "n2-boardroom")
    board["properties"]["visible_to"] = ["n2-boardroom", "n2-it", "10.20.99.0/24"]
    return doc


def service(doc: dict[str, Any]) -> Service:
    cfg = parse_config("[metrics]\nlisten = ''\n", "test.toml")
    return Service(cfg, build_sitemap([("campus.geojson", doc)]), 0.0, lambda: b"k" * 32)


def tcp(ip: str) -> Peer:
    return Peer("tcp", ip, trusted=False)


def nearest_ids(svc: Service, ip: str, k: int = 20) -> list[str]:
    reply = svc.handle({"v": 1, "id": 1, "op": "nearest", "kind": "printer", "k": k}, tcp(ip), 1.0)
    assert reply["ok"], reply
    return [d["id"] for d in reply["devices"]]


def test_static_device_visible_only_to_its_zone() -> None:
    svc = service(restricted_demo())
    assert nearest_ids(svc, "10.20.23.9")[0] == "prn-finance"
    for ip in ("10.20.22.9", "10.20.21.9", "10.20.10.9", "10.20.61.9"):
        assert "prn-finance" not in nearest_ids(svc, ip)


def test_zone_rule_restricts_devices_placed_in_it_by_zone_or_prefix() -> None:
    svc = service(restricted_demo())
    assert "prn-n2-boardroom" in nearest_ids(svc, "10.20.34.9")  # its own zone
    assert "prn-n2-boardroom" in nearest_ids(svc, "10.20.32.9")  # n2-it, named
    assert "prn-n2-boardroom" not in nearest_ids(svc, "10.20.30.9")  # n2-west
    assert "prn-n2-boardroom" not in nearest_ids(svc, "10.20.22.9")


def test_prefix_rule_by_client_address_within_a_zone() -> None:
    doc = restricted_demo()
    lobby = next(f for f in doc["features"] if f["properties"].get("id") == "n0-lobby")
    dev = next(f for f in doc["features"] if f["properties"].get("id") == "prn-n0-lobby")
    dev["properties"]["visible_to"] = ["10.20.10.128/25"]
    assert "10.20.10.0/24" in lobby["properties"]["subnets"]
    svc = service(doc)
    assert "prn-n0-lobby" in nearest_ids(svc, "10.20.10.200")
    assert "prn-n0-lobby" not in nearest_ids(svc, "10.20.10.5")  # same zone, other half


def test_restricted_devices_absent_from_listings_and_inventory_filters() -> None:
    svc = service(restricted_demo())

    def listing(peer: Peer, **extra: Any) -> set[str]:
        req = {"v": 1, "id": 2, "op": "devices", **extra}
        reply = svc.handle(req, peer, 1.0)
        assert reply["ok"], reply
        return {d["id"] for d in reply["devices"]}

    outsider = listing(tcp("10.20.22.9"))
    assert "prn-finance" not in outsider and "prn-n2-boardroom" not in outsider
    assert "prn-n1-hr" in outsider
    assert "prn-finance" not in listing(tcp("10.20.22.9"), kind="printer", site="hq")
    assert "prn-finance" in listing(tcp("10.20.23.9"), kind="printer")
    assert "prn-finance" not in listing(tcp("192.0.2.1"))  # no zone at all
    # The operator sees everything, with the rule; asking for a client filters as that client.
    admin = svc.handle({"v": 1, "id": 3, "op": "devices"}, ADMIN_PEER, 1.0)["devices"]
    fin = next(d for d in admin if d["id"] == "prn-finance")
    assert fin["visible_to"] == ["n1-finance"]
    assert "prn-finance" not in listing(ADMIN_PEER, client_ip="10.20.22.9")
    # Untrusted peers cannot ask as somebody else.
    reply = svc.handle(
        {"v": 1, "id": 4, "op": "devices", "client_ip": "10.20.23.9"}, tcp("10.20.22.9"), 1.0
    )
    assert reply["error"]["code"] == "forbidden"


def test_zone_only_request_satisfies_a_prefix_rule_that_covers_the_zone() -> None:
    svc = service(restricted_demo())
    trusted = Peer("tcp", "127.0.0.1", trusted=True)
    req = {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "k": 20}
    ids = [d["id"] for d in svc.handle({**req, "zone": "n1-finance"}, trusted, 1.0)["devices"]]
    assert "prn-finance" in ids
    ids = [d["id"] for d in svc.handle({**req, "zone": "n1-hr"}, trusted, 1.0)["devices"]]
    assert "prn-finance" not in ids


def test_pin_rule_and_cache_never_leak_across_clients() -> None:
    svc = service(restricted_demo())
    dev = Device(
        id="mdns-printer-fin",
        kind=DeviceKind.PRINTER,
        name=FINANCE_PIN_NAME,
        uri="ipp://10.20.23.40:631/ipp/print",
        source="mdns",
        instance=FINANCE_PIN_NAME,
        addresses=("10.20.23.40",),
    )
    assert svc.upsert_device(dev, 1.0) == "added"
    # Same zone, different prefix side: the first answer must not be served from cache.
    assert "mdns-printer-fin" in nearest_ids(svc, "10.20.23.9")
    assert "mdns-printer-fin" not in nearest_ids(svc, "10.20.22.9")
    assert "mdns-printer-fin" in nearest_ids(svc, "10.20.23.10")
    assert not svc.is_public("mdns-printer-fin")
    assert svc.is_public("prn-n1-hr")


def test_answer_cache_is_bounded_and_drops_its_oldest_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_module, "CACHE_MAX", 3)
    svc = service(demo())
    fresh = service(demo())
    for k in range(1, 7):
        assert nearest_ids(svc, "10.20.23.9", k) == nearest_ids(fresh, "10.20.23.9", k)
        assert len(svc._cache) == min(k, 3)
    assert [key[3] for key in svc._cache] == [4, 5, 6]
    for k in range(1, 7):  # dropped or kept, every answer is still the right one
        fresh._cache.clear()
        assert nearest_ids(svc, "10.20.23.9", k) == nearest_ids(fresh, "10.20.23.9", k)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("n1-finance", "expected a non-empty list"),
        ([], "expected a non-empty list"),
        (["no-such-zone"], "unknown zone 'no-such-zone'"),
        (["10.1.2.300/24"], "neither a zone id nor a CIDR prefix"),
        ([5], "expected a non-empty list"),
    ],
)
def test_bad_visible_to_is_a_located_problem(value: Any, message: str) -> None:
    doc = demo()
    dev = next(f for f in doc["features"] if f["properties"].get("id") == "prn-n1-hr")
    dev["properties"]["visible_to"] = value
    with pytest.raises(SiteMapError) as err:
        build_sitemap([("campus.geojson", doc)])
    text = str(err.value)
    assert "feature 'prn-n1-hr'" in text and "properties.visible_to" in text and message in text


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_index_equals_brute_force_under_random_visibility(data: st.DataObject) -> None:
    doc = demo()
    zone_ids = [f["properties"]["id"] for f in doc["features"] if "subnets" in f["properties"]]
    for f in doc["features"]:
        p = f["properties"]
        if p.get("static") and data.draw(st.booleans()):
            p["visible_to"] = data.draw(
                st.lists(st.sampled_from(zone_ids), min_size=1, max_size=3, unique=True)
            )
    sm = build_sitemap([("campus.geojson", doc)])
    table = DeviceTable(sm)
    ranking = Ranking(20, 100, False)
    for zid in data.draw(st.lists(st.sampled_from(zone_ids), min_size=1, max_size=5)):
        zone = sm.zones[zid]
        visible = sm.visibility.client_mask(zid, None) if sm.visibility.active else -1
        for kind in ("printer", "scanner"):
            k = data.draw(st.integers(1, 20))
            fast = table.index.nearest(zone, kind, Need(), k, ranking, visible)
            slow = table.index.brute_force(zone, kind, Need(), k, ranking, visible)
            assert [h.device_id for h in fast] == [h.device_id for h in slow]
            for h in fast:
                entry = table.index.get(h.device_id)
                assert entry is not None and not entry.restrict & ~visible


def test_quarantine_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    svc = service(demo())
    rogue = Device(
        id="mdns-printer-rogue",
        kind=DeviceKind.PRINTER,
        name=FINANCE_PIN_NAME,
        uri="ipp://10.66.0.5:631/ipp/print",
        source="mdns",
        instance=FINANCE_PIN_NAME,
        addresses=("10.66.0.5",),
    )
    with caplog.at_level(logging.WARNING, logger="nearestd.security"):
        assert svc.upsert_device(rogue, 1.0) == "quarantined"
        assert svc.upsert_device(rogue, 2.0) == "unchanged"
    assert [r.getMessage() for r in caplog.records].count("device quarantined") == 1

"""A rogue service sharing a pinned device's UUID is kept apart from the real device.

Without this, the merger would group the rogue's services with the real device's (same
UUID), and the table would then quarantine the merged record: the rogue could withhold
the real printer, or, if it were not caught, lend it its own URI.
"""

from __future__ import annotations

import json
from typing import Any

from nearest_wire import Need
from nearestd.core.devices import DeviceTable
from nearestd.core.discovery import Merger, ServiceRecord
from nearestd.core.quarantine import service_is_suspect
from nearestd.core.ranking import Ranking
from nearestd.core.sitemap import build_sitemap
from support import DEMO_MAP

UUID = "3f5e2c1a-7b1d-4c8e-9a4f-2b6d8e1f0a11"  # pinned to s1-east (10.20.61.0/24)


def sitemap() -> Any:
    return build_sitemap([("m", json.loads(DEMO_MAP.read_text()))])


def suspect_for(sm: Any):  # type: ignore[no-untyped-def]
    return lambda p: service_is_suspect(p, sm)


def service(name: str, host: str, addr: str, type_: str = "_ipp._tcp.local.") -> ServiceRecord:
    return ServiceRecord(
        type_,
        f"{name}.{type_}",
        host,
        631,
        (addr,),
        (b"txtvers=1", f"UUID={UUID}".encode(), b"rp=ipp/print", b"Color=T"),
        interface="eth0",
    )


def test_rogue_with_the_pinned_uuid_neither_merges_nor_withholds_the_real_device() -> None:
    sm = sitemap()
    merger = Merger(suspect=suspect_for(sm))
    table = DeviceTable(sm)
    changes, _ = merger.upsert(service("Real", "real.local", "10.20.61.40"), 1.0)
    changes += merger.upsert(
        service("Rogue", "rogue.local", "10.20.99.66", "_ipps._tcp.local."), 1.0
    )[0]
    for ch in changes:
        if ch.device is not None:
            table.upsert(ch.device, 1.0)
    devices = {d.uri: d for d in merger.devices()}
    assert set(devices) == {"ipp://10.20.61.40:631/ipp/print", "ipps://10.20.99.66:631/ipp/print"}
    real = devices["ipp://10.20.61.40:631/ipp/print"]
    rogue = devices["ipps://10.20.99.66:631/ipp/print"]
    assert real.id == f"mdns-printer-{UUID}" and rogue.id != real.id
    assert real.addresses == ("10.20.61.40",)
    hits = table.index.nearest(sm.zones["s1-east"], "printer", Need(), 20, Ranking())
    assert real.id in [h.device_id for h in hits]
    assert rogue.id not in [h.device_id for h in hits]
    assert any(k[0] == rogue.id for k in table.quarantine)


def test_without_pins_services_sharing_a_uuid_still_merge() -> None:
    merger = Merger(suspect=lambda p: False)
    merger.upsert(service("Real", "real.local", "10.20.61.40"), 1.0)
    merger.upsert(service("Real", "real.local", "10.20.61.40", "_ipps._tcp.local."), 1.0)
    (dev,) = merger.devices()
    assert dev.uri == "ipps://10.20.61.40:631/ipp/print"

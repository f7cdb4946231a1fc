"""The answer cache: who is answered and in what order, re-drawn per reply (service.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nearestd.core.model import Device, DeviceKind, DeviceState, Supply
from nearestd.core.state import Live
from nearestd.loader import load_world
from nearestd.service import ADMIN_PEER, Service
from support import DEMO_MAP, write_config

LOBBY_IP = "10.20.10.5"  # a client in n0-lobby (demo campus)


@pytest.fixture
def svc(tmp_path: Path) -> Service:
    data = json.loads(DEMO_MAP.read_text())
    site = tmp_path / "site.geojson"
    site.write_text(json.dumps(data))
    world = load_world(str(write_config(tmp_path, maps=[str(site)])))
    return Service(world.config, world.sitemap, time.time(), lambda: b"k" * 32)


def ask(svc: Service) -> list[dict[str, object]]:
    reply = svc.handle(
        {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "k": 3, "client_ip": LOBBY_IP},
        ADMIN_PEER,
        time.time(),
    )
    assert reply["ok"], reply
    return list(reply["devices"])


@pytest.mark.parametrize(
    ("live", "reranks"),
    [
        (Live(DeviceState.IDLE, supplies=(Supply("Black Toner", "toner", 40),)), False),
        (Live(DeviceState.IDLE, reasons=("media-low",)), False),
        (Live(DeviceState.PROCESSING), True),  # the state tie-break can reorder
        (Live(DeviceState.STOPPED), True),  # no longer available
        (Live(DeviceState.IDLE, accepting_jobs=False), True),
    ],
)
def test_what_only_shows_keeps_the_cache_and_shows_at_once(
    svc: Service, live: Live, reranks: bool
) -> None:
    first = ask(svc)
    target = str(first[0]["id"])
    svc.set_live(target, Live(DeviceState.IDLE))
    ask(svc)
    before = svc.table.rank_generation
    svc.set_live(target, live)
    assert (svc.table.rank_generation != before) is reranks
    again = {d["id"]: d for d in ask(svc)}
    if target in again:  # what the reply shows is the device as it is now
        shown = again[target]
        assert shown["state"] == str(live.state)
        assert tuple(shown.get("state_reasons", ())) == live.reasons
        if live.supplies:
            assert shown["supplies"][0]["level"] == 40
    else:  # it left the answer: it can no longer print
        assert live.state == DeviceState.STOPPED or not live.accepting_jobs


def test_a_new_device_or_a_move_invalidates_and_answers_equal_an_uncached_ranking(
    svc: Service,
) -> None:
    ask(svc)
    before = svc.table.rank_generation
    svc.upsert_device(
        Device("new-lobby", DeviceKind.PRINTER, "New", "ipp://10.20.10.77/ipp/print",
               source="mdns", addresses=("10.20.10.77",)),
        time.time(),
    )  # fmt: skip
    assert svc.table.rank_generation != before
    assert "new-lobby" in [d["id"] for d in ask(svc)]
    # A device on another site changes nothing for this site's clients (own site only).
    site = svc.table.rank_version("hq")
    svc.table._ranked("elsewhere")
    assert svc.table.rank_version("hq") == site
    assert svc.table.rank_version(None) != (site[0], before)
    # The cached answer equals one computed afresh.
    cached = ask(svc)
    svc._cache.clear()
    assert ask(svc) == cached

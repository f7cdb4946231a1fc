"""The MQTT adapter's incoming queue: per-asker admission, the bound on requests, drop counts."""

from __future__ import annotations

import json
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from nearestd.adapters.mqtt import Inbox, MqttAdapter, Verdict
from nearestd.config import load_config
from nearestd.loader import load_world
from nearestd.service import Service
from support import write_config

QUERY = "p/query"


def request(reply_topic: str | None, v311_reply_to: str | None = None) -> aiomqtt.Message:
    props = None
    if reply_topic is not None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
    body: dict[str, object] = {"v": 1, "id": 1, "op": "ping"}
    if v311_reply_to is not None:
        body["reply_to"] = v311_reply_to
    return aiomqtt.Message(QUERY, json.dumps(body).encode(), 0, False, 1, props)


async def test_requests_over_the_bound_are_dropped_and_counted_other_messages_are_not() -> None:
    inbox = Inbox(frozenset({QUERY}), lambda m: Verdict.KNOWN, max_requests=3, max_others=10)
    for _ in range(5):
        inbox.put_nowait(request("r/a"))
    assert (inbox.qsize(), inbox.requests, inbox.dropped) == (3, 3, 2)
    record = aiomqtt.Message("p/devices/x", b"{}", 1, True, 2, None)
    inbox.put_nowait(record)  # not a request: only its own bound applies
    assert inbox.qsize() == 4
    got = [await inbox.get() for _ in range(4)]
    assert got[-1] is record
    assert inbox.requests == 0
    inbox.put_nowait(request("r/a"))  # room again once answered
    assert inbox.requests == 1


async def test_records_have_their_own_bound_which_requests_cannot_fill() -> None:
    inbox = Inbox(frozenset({QUERY}), lambda m: Verdict.KNOWN, max_requests=3, max_others=5)
    for _ in range(3):
        inbox.put_nowait(request("r/a"))
    records = [aiomqtt.Message(f"p/devices/s/{i}", b"{}", 1, True, i, None) for i in range(7)]
    for rec in records:
        inbox.put_nowait(rec)
    # Queued requests do not take the records' room: five records kept, two dropped.
    assert (inbox.qsize(), inbox.dropped_other, inbox.dropped) == (8, 2, 0)


async def test_a_refused_request_is_never_queued() -> None:
    seen: list[str] = []

    def admit(m: aiomqtt.Message) -> Verdict:
        seen.append(m.topic.value)
        return Verdict.REFUSED

    inbox = Inbox(frozenset({QUERY}), admit, max_requests=3)
    inbox.put_nowait(request("r/a"))
    assert (inbox.qsize(), inbox.requests, inbox.dropped, seen) == (0, 0, 0, [QUERY])


def test_askers_are_known_by_reply_topic_each_with_its_own_bucket(tmp_path: Path) -> None:
    cfg_path = write_config(tmp_path, {"mqtt": {"topic_prefix": "p", "rate": 1.0, "burst": 3}})
    cfg = load_config(cfg_path)
    service = Service(cfg, load_world(str(cfg_path)).sitemap, 0.0, lambda: b"k" * 32)
    assert cfg.mqtt is not None
    adapter = MqttAdapter(service, cfg.mqtt, cfg, clock=lambda: 100.0)
    new, known, refused = Verdict.NEW, Verdict.KNOWN, Verdict.REFUSED
    flood = [adapter._admit(request("r/flood")) for _ in range(10)]
    # The burst, then nothing (the clock stands still).
    assert flood == [new] * 3 + [refused] * 7
    # Another asker, MQTT 5 or 3.1.1, has its own bucket; 3.1.1 is known by reply_to.
    assert adapter._admit(request("r/honest")) is new
    assert [adapter._admit(request(None, "r/old")) for _ in range(4)] == [new] * 3 + [refused]
    # Requests naming no reply address share one bucket.
    assert [adapter._admit(request(None)) for _ in range(4)] == [new] * 3 + [refused]
    # Once answered, an asker is known: half the bound on queued requests is kept for it.
    msg = request("r/honest")
    assert adapter.answer(msg.payload, msg.properties) is not None
    assert adapter._admit(request("r/honest")) is known
    assert adapter.counters.rate_limited == 7 + 1 + 1
    assert adapter.stats()["askers"] == 4


async def test_half_the_bound_is_kept_for_askers_already_seen() -> None:
    verdicts = {"r/known": Verdict.KNOWN}
    inbox = Inbox(
        frozenset({QUERY}),
        lambda m: verdicts.get(m.properties.ResponseTopic, Verdict.NEW),
        max_requests=4,
    )
    for i in range(10):  # a fresh reply topic per request: new askers, up to half the bound
        inbox.put_nowait(request(f"r/fresh/{i}"))
    assert (inbox.requests, inbox.dropped) == (2, 8)
    for _ in range(3):
        inbox.put_nowait(request("r/known"))
    assert (inbox.requests, inbox.dropped) == (4, 9)

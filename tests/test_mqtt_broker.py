"""The MQTT adapter against real mosquitto processes: no mocks of aiomqtt or paho.

Most tests share the session's broker (each under a fresh topic prefix); the tests that
kill, restart or lock the broker start their own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mosquitto import Mosquitto
from mqtt_helpers import asker, retained, split_map, wait_payload
from nearest_client import Client
from support import DaemonProcess, free_port, require_tools, tcp_url, write_config

pytestmark = pytest.mark.realpeer

NEAREST_LOBBY = {"v": 1, "id": 7, "op": "nearest", "kind": "printer", "zone": "n0-lobby"}


def mqtt_daemon(
    directory: Path,
    broker: Mosquitto,
    prefix: str,
    instance: str,
    maps: list[str] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    **mqtt: Any,
) -> DaemonProcess:
    cfg = write_config(
        directory,
        {
            **(sections or {}),
            "mqtt": {"url": broker.url, "topic_prefix": prefix, "instance": instance, **mqtt},
        },
        maps=maps,
    )
    return DaemonProcess(cfg).wait_ready()


@pytest.fixture
def daemon(
    tmp_path: Path, mosquitto_broker: Mosquitto, mqtt_prefix: str
) -> Iterator[DaemonProcess]:
    d = mqtt_daemon(tmp_path, mosquitto_broker, mqtt_prefix, "solo")
    try:
        yield d
    finally:
        d.stop()


async def started(*args: Any, **kwargs: Any) -> DaemonProcess:
    """Start a daemon from a worker thread: waiting for it must not block the test's loop."""
    return await asyncio.to_thread(mqtt_daemon, *args, **kwargs)


async def restarted(d: DaemonProcess) -> DaemonProcess:
    """Start the daemon of ``d``'s config again (from a worker thread)."""
    return await asyncio.to_thread(lambda: DaemonProcess(d.config).wait_ready())


async def stopped(d: DaemonProcess) -> int:
    """Stop a daemon from a worker thread; return its exit status."""
    return await asyncio.to_thread(d.stop)


async def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """Run a command from a worker thread."""
    return await asyncio.to_thread(subprocess.run, argv, **kwargs)


async def devices(d: DaemonProcess) -> list[dict[str, Any]]:
    """Return the daemon's admin ``devices`` listing (asked from a worker thread)."""

    def ask() -> list[dict[str, Any]]:
        with Client(f"unix://{d.admin}") as c:
            return c.request({"op": "devices"})["devices"]  # type: ignore[no-any-return]

    return await asyncio.to_thread(ask)


async def stats(d: DaemonProcess) -> dict[str, Any]:
    """Return the daemon's admin ``stats`` (asked from a worker thread)."""
    return await asyncio.to_thread(admin_stats, d)


def admin_stats(d: DaemonProcess) -> dict[str, Any]:
    with Client(f"unix://{d.admin}") as c:
        stats: dict[str, Any] = c.request({"op": "stats"})["stats"]
    return stats


async def online(broker: Mosquitto, prefix: str, instance: str, timeout: float = 10.0) -> float:
    return await wait_payload(broker.port, f"{prefix}/status/{instance}", b"online", timeout)


async def test_json_and_msgpack_round_trips(
    daemon: DaemonProcess, mosquitto_broker: Mosquitto, mqtt_prefix: str
) -> None:
    await online(mosquitto_broker, mqtt_prefix, "solo")
    async with asker(mosquitto_broker.port) as a:
        reply = await a.ask(f"{mqtt_prefix}/query", NEAREST_LOBBY)
        assert reply["ok"] and reply["id"] == 7
        assert reply["where"]["zone"] == "n0-lobby"
        assert reply["devices"][0]["id"] == "prn-n0-lobby"
        packed = await a.ask(
            f"{mqtt_prefix}/query",
            {"v": 1, "id": 8, "op": "nearest", "kind": "scanner", "client_ip": "127.0.0.1"},
            use_msgpack=True,
        )
        assert packed["ok"] and packed["id"] == 8
        assert packed["devices"][0]["id"] == "scn-n0-mailroom"
        # The instance's own topic answers too; the same maps as the socket protocol.
        loc = await a.ask(
            f"{mqtt_prefix}/query/solo", {"v": 1, "id": 9, "op": "locate", "zone": "s1-lab"}
        )
        assert loc["where"]["building"] == "south"
        with Client(tcp_url(daemon.config)) as c:
            assert c.nearest("printer").to_wire()["devices"] == reply["devices"]


async def test_v311_reply_to_with_correlation(
    daemon: DaemonProcess, mosquitto_broker: Mosquitto, mqtt_prefix: str
) -> None:
    await online(mosquitto_broker, mqtt_prefix, "solo")
    async with asker(mosquitto_broker.port, v311=True) as a:
        reply = await a.ask(f"{mqtt_prefix}/query", NEAREST_LOBBY)
    assert reply["ok"] and reply["devices"][0]["id"] == "prn-n0-lobby"
    assert reply["correlation"] == "1"


async def test_malformed_requests_get_precise_errors_and_never_break_the_subscription(
    daemon: DaemonProcess, mosquitto_broker: Mosquitto, mqtt_prefix: str
) -> None:
    await online(mosquitto_broker, mqtt_prefix, "solo")
    q = f"{mqtt_prefix}/query"
    cases: list[tuple[bytes, str | None, str, str]] = [
        (b"{not json", None, "bad-request", "malformed JSON"),
        (b"\xff\xfe", None, "bad-request", "not UTF-8"),
        (b"[1, 2]", None, "bad-request", "JSON array, expected an object"),
        (b"[" * 5000 + b"]" * 5000, None, "bad-request", "nesting deeper than 8"),
        (
            json.dumps({"v": 1, "id": 1, "op": "ping", "x": "a" * 5000}).encode(),
            None,
            "bad-request",
            "longer than 4096",
        ),
        (
            json.dumps({"v": 1, "id": 1, "op": "ping", "l": list(range(2000))}).encode(),
            None,
            "bad-request",
            "more than 1024 items",
        ),
        (b'{"v": 1, "id": 1, "op": "ping", "n": NaN}', None, "bad-request", "NaN"),
        (b"x" * 70000, None, "too-large", "at most 65536"),
        (b"\xc1", "application/msgpack", "bad-request", "malformed MessagePack"),
        (
            json.dumps({"v": 1, "id": 3, "op": "nearest", "kind": "printer"}).encode(),
            None,
            "bad-request",
            "client_ip or zone: required over mqtt",
        ),
        (
            json.dumps(
                {"v": 1, "id": 4, "op": "nearest", "kind": "fax", "zone": "n0-lobby"}
            ).encode(),
            None,
            "bad-request",
            "kind:",
        ),
        (
            json.dumps({"v": 2, "id": 5, "op": "ping"}).encode(),
            None,
            "unsupported-version",
            "version 2",
        ),
        (json.dumps({"v": 1, "id": 6, "op": "stats"}).encode(), None, "forbidden", "admin socket"),
        (
            json.dumps(
                {"v": 1, "id": 7, "op": "nearest", "kind": "printer", "zone": "nowhere"}
            ).encode(),
            None,
            "unknown-location",
            "no such zone",
        ),
    ]
    async with asker(mosquitto_broker.port) as a:
        for payload, ctype, code, words in cases:
            fut = await a.send(q, payload, content_type=ctype)
            body, _ = await asyncio.wait_for(fut, 5)
            reply = msgpack.unpackb(body) if ctype else json.loads(body)
            assert reply["ok"] is False, payload[:60]
            assert reply["error"]["code"] == code, (payload[:60], reply)
            assert words in reply["error"]["message"], (payload[:60], reply)
        # No reply address at all, or a reply address on the daemon's own topics: dropped.
        await a.send(q, json.dumps({"v": 1, "id": 1, "op": "ping"}).encode(), response_topic=None)
        await a.send(q, b"garbage", response_topic=None)
        await a.send(q, b"{}", response_topic=f"{mqtt_prefix}/status/solo")
        async with asker(mosquitto_broker.port, v311=True) as b:
            await b.client.publish(q, json.dumps({"v": 1, "id": 1, "op": "ping"}), qos=1)
            await b.client.publish(
                q, json.dumps({"v": 1, "id": 1, "op": "ping", "reply_to": "a/+/b"}), qos=1
            )
            bad_corr = {
                "v": 1,
                "id": 2,
                "op": "ping",
                "reply_to": b.reply_topic,
                "correlation": [1],
            }
            fut2 = b.pending.setdefault(b"None", asyncio.get_running_loop().create_future())
            await b.client.publish(q, json.dumps(bad_corr), qos=1)
            body, _ = await asyncio.wait_for(fut2, 5)
            assert "correlation: expected" in json.loads(body)["error"]["message"]
        # The subscription survived all of it.
        assert (await a.ask(q, NEAREST_LOBBY))["ok"]
    st = (await stats(daemon))["mqtt"]
    assert st["connected"] is True
    assert st["malformed"] >= len(cases) - 2 + 4  # unknown-location and forbidden are not malformed
    assert st["unanswerable"] == 5
    assert st["received"] >= len(cases) + 7
    assert "Traceback" not in daemon.logs()


async def test_mosquitto_rr_is_answered(
    daemon: DaemonProcess, mosquitto_broker: Mosquitto, mqtt_prefix: str
) -> None:
    require_tools("mosquitto_rr")
    await online(mosquitto_broker, mqtt_prefix, "solo")
    out = await run(
        [
            "mosquitto_rr", "-h", "127.0.0.1", "-p", str(mosquitto_broker.port),
            "-t", f"{mqtt_prefix}/query", "-e", f"{mqtt_prefix}-rr/reply",
            "-m", json.dumps(NEAREST_LOBBY), "-W", "5",
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["ok"] and reply["devices"][0]["id"] == "prn-n0-lobby"


async def test_inventory_is_retained_updated_and_cleared(
    tmp_path: Path, mosquitto_broker: Mosquitto, mqtt_prefix: str
) -> None:
    port = mosquitto_broker.port
    devices = f"{mqtt_prefix}/devices"
    # A record this instance published in an earlier life, for a device it no longer has.
    ghost = {"v": 1, "id": "prn-gone", "origin": "inv", "kind": "printer"}
    other = {"v": 1, "id": "prn-elsewhere", "origin": "another", "kind": "printer"}
    for rec in (ghost, other):
        await run(
            ["mosquitto_pub", "-p", str(port), "-t", f"{devices}/{rec['id']}", "-r", "-m", json.dumps(rec)],
            check=True,
        )  # fmt: skip
    both = await asyncio.to_thread(split_map, tmp_path / "maps", {"north", "south"})
    d = await started(tmp_path / "d", mosquitto_broker, mqtt_prefix, "inv", maps=[str(both)])
    try:
        await online(mosquitto_broker, mqtt_prefix, "inv")
        held = await retained(port, f"{devices}/#")
        # An earlier version's one-level record of ours: cleared; another instance's: left.
        assert f"{devices}/prn-gone" not in held
        assert f"{devices}/prn-elsewhere" in held
        ours = {t: json.loads(p) for t, p in held.items() if json.loads(p)["origin"] == "inv"}
        assert len(ours) == 17
        # The site is a topic level: a bridge or a daemon subscribes to its sites only.
        lobby = ours[f"{devices}/hq/prn-n0-lobby"]
        assert lobby["placement"]["zone"] == "n0-lobby" and lobby["kind"] == "printer"
        # The south building's devices go away (reload with a smaller map): cleared.
        both.write_text(split_map(tmp_path / "maps2", {"north"}).read_text())
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            held = await retained(port, f"{devices}/#", settle=0.3)
            if f"{devices}/hq/prn-s0-plotter" not in held:
                break
        assert f"{devices}/hq/prn-s0-plotter" not in held
        assert f"{devices}/hq/prn-n0-lobby" in held
        assert (await stats(d))["mqtt"]["records_cleared"] >= 8
    finally:
        await stopped(d)


async def test_status_online_offline_and_will_on_kill_9(
    tmp_path: Path, mosquitto_broker: Mosquitto, mqtt_prefix: str
) -> None:
    status = f"{mqtt_prefix}/status/st"
    d = await started(tmp_path / "a", mosquitto_broker, mqtt_prefix, "st")
    await online(mosquitto_broker, mqtt_prefix, "st")
    await asyncio.to_thread(d.kill)
    await wait_payload(mosquitto_broker.port, status, b"offline", timeout=5)
    d = await started(tmp_path / "b", mosquitto_broker, mqtt_prefix, "st")
    await online(mosquitto_broker, mqtt_prefix, "st")
    assert await stopped(d) == 0
    held = await retained(mosquitto_broker.port, status)
    assert held[status] == b"offline"


async def test_broker_absent_at_start_then_restarted_mid_run(
    tmp_path: Path, mqtt_prefix: str
) -> None:
    require_tools("mosquitto")
    broker = Mosquitto(tmp_path / "broker")  # not started yet
    try:
        metrics = f"127.0.0.1:{free_port()}"
        d = await started(
            tmp_path / "d", broker, mqtt_prefix, "rs", sections={"metrics": {"listen": metrics}}
        )
        try:
            with Client(tcp_url(d.config)) as c:  # sockets serve without a broker
                assert c.nearest("printer").devices[0].id == "prn-n0-lobby"
            await asyncio.to_thread(broker.start)
            await online(broker, mqtt_prefix, "rs")
            for cycle in range(2):
                await asyncio.to_thread(broker.restart)
                waited = await online(broker, mqtt_prefix, "rs", timeout=10)
                assert waited < 5, waited
                async with asker(broker.port) as a:
                    for i in range(20):
                        r = await a.ask(f"{mqtt_prefix}/query", {**NEAREST_LOBBY, "id": i})
                        assert r["ok"] and r["id"] == i
                held = await retained(broker.port, f"{mqtt_prefix}/devices/#")
                assert len(held) == 17, cycle  # the inventory was republished
            st = (await stats(d))["mqtt"]
            assert st["connected"] and st["reconnects"] == 2
            page = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
            assert "nearest_mqtt_connected 1.0" in page
            assert "nearest_mqtt_reconnects_total 2.0" in page
            logs = d.logs()
            # Each state change is logged once, not once per retry.
            assert logs.count('"mqtt connected"') == 3
            assert logs.count("mqtt connection lost") == 2
            assert logs.count("mqtt broker unreachable") <= 3
        finally:
            await stopped(d)
    finally:
        await asyncio.to_thread(broker.close)


async def test_wrong_password_is_logged_clearly_and_sockets_still_serve(
    tmp_path: Path, mqtt_prefix: str
) -> None:
    require_tools("mosquitto", "mosquitto_passwd")
    broker = await asyncio.to_thread(
        Mosquitto(tmp_path / "broker", users={"nearestd": "right"}).start
    )
    try:
        (tmp_path / "pw").write_text("Bad-Pa55word\n")
        d = await started(
            tmp_path / "d", broker, mqtt_prefix, "pw",
            username="nearestd", password_file=str(tmp_path / "pw"),
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while "refused the credentials" not in d.logs() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            # A few more attempts, each refused by the broker, and still one line in our log.
            deadline = time.monotonic() + 15
            while broker.logs().count("not authorised") < 3:
                assert time.monotonic() < deadline, broker.logs()
                await asyncio.sleep(0.1)
            with Client(tcp_url(d.config)) as c:
                assert c.nearest("printer").devices[0].id == "prn-n0-lobby"
            logs = d.logs()
            assert logs.count("refused the credentials") == 1, logs
            assert "username=nearestd" in logs and "Bad-Pa55word" not in logs
            assert (await stats(d))["mqtt"]["connected"] is False
        finally:
            await stopped(d)
        # The right password connects.
        (tmp_path / "pw").write_text("right\n")
        d = await restarted(d)
        try:
            deadline = time.monotonic() + 10
            while not (await stats(d))["mqtt"]["connected"]:
                assert time.monotonic() < deadline, d.logs()
                await asyncio.sleep(0.1)
        finally:
            await stopped(d)
    finally:
        await asyncio.to_thread(broker.close)


async def test_federation_serves_the_other_daemons_devices_while_it_is_online(
    tmp_path: Path, mosquitto_broker: Mosquitto, mqtt_prefix: str
) -> None:
    north = await asyncio.to_thread(split_map, tmp_path / "maps", {"north"})
    south = await asyncio.to_thread(split_map, tmp_path / "maps", {"south"})
    a = await started(
        tmp_path / "a", mosquitto_broker, mqtt_prefix, "fed-a", maps=[str(north)], federate=True,
        foreign_grace="3s",
    )  # fmt: skip
    b = await started(tmp_path / "b", mosquitto_broker, mqtt_prefix, "fed-b", maps=[str(south)], federate=True)  # fmt: skip
    try:
        await online(mosquitto_broker, mqtt_prefix, "fed-a")
        await online(mosquitto_broker, mqtt_prefix, "fed-b")
        ask_south = {"v": 1, "id": 1, "op": "nearest", "kind": "printer", "zone": "s0-print-shop"}
        ask_north = {"v": 1, "id": 2, "op": "nearest", "kind": "printer", "zone": "n0-lobby"}
        async with asker(mosquitto_broker.port) as q:
            deadline = time.monotonic() + 10
            while True:
                ra = await q.ask(f"{mqtt_prefix}/query/fed-a", ask_south)
                rb = await q.ask(f"{mqtt_prefix}/query/fed-b", ask_north)
                if ra["devices"][0].get("origin") and rb["devices"][0].get("origin"):
                    break
                assert time.monotonic() < deadline, (ra, rb)
                await asyncio.sleep(0.1)
            assert ra["devices"][0]["id"] == "prn-s0-print-shop"
            assert ra["devices"][0]["origin"] == "fed-b"
            assert ra["devices"][0]["distance_m"] == 0
            assert rb["devices"][0]["id"] == "prn-n0-lobby"
            assert rb["devices"][0]["origin"] == "fed-a"
            # The shared subscription: a query on P/query is answered once, by either.
            fut = await q.send(f"{mqtt_prefix}/query", json.dumps(ask_south).encode())
            body, _ = await asyncio.wait_for(fut, 5)
            assert json.loads(body)["devices"][0]["id"] == "prn-s0-print-shop"
            await asyncio.sleep(0.3)
            assert q.stray == []
            # Records a daemon published itself are never read back as foreign.
            inv = await devices(a)
            mine = [x for x in inv if x["source"] != "mqtt"]
            theirs = [x for x in inv if x["source"] == "mqtt"]
            assert len(mine) == 10 and len(theirs) == 7
            assert {x["origin"] for x in theirs} == {"fed-b"}
            assert {x["placed_by"] for x in theirs} == {"federated"}
            # A device B no longer has (its record cleared) leaves A too.
            smaller = json.loads(south.read_text())
            smaller["features"] = [
                f for f in smaller["features"] if f["properties"].get("id") != "prn-s0-print-shop"
            ]
            south.write_text(json.dumps(smaller))
            b.signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while True:
                ra = await q.ask(f"{mqtt_prefix}/query/fed-a", ask_south)
                if ra["devices"][0]["id"] != "prn-s0-print-shop":
                    break
                assert time.monotonic() < deadline, ra
                await asyncio.sleep(0.1)
            assert ra["devices"][0]["origin"] == "fed-b"
            # Taking B down: its devices are served stale for the grace, then leave A.
            await asyncio.to_thread(b.kill)
            deadline = time.monotonic() + 10
            while True:
                ra = await q.ask(f"{mqtt_prefix}/query/fed-a", ask_south)
                if ra["devices"][0].get("stale"):
                    break
                assert time.monotonic() < deadline, ra
                await asyncio.sleep(0.1)
            assert ra["devices"][0]["origin"] == "fed-b"
            assert (await stats(a))["mqtt"]["federated_stale"] == 6
            deadline = time.monotonic() + 10
            while True:
                ra = await q.ask(f"{mqtt_prefix}/query/fed-a", ask_south)
                if "origin" not in ra["devices"][0]:
                    break
                assert time.monotonic() < deadline, ra
                await asyncio.sleep(0.1)
            assert ra["devices"][0]["building"] == "north"
            inv = await devices(a)
            assert [x for x in inv if x["source"] == "mqtt"] == []
            assert (await stats(a))["mqtt"]["federated_devices"] == 0
    finally:
        await stopped(a)
        await stopped(b)


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """Return (ca, cert, key): a throwaway CA and a server certificate for 127.0.0.1."""
    require_tools("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr = directory / "srv.crt", directory / "srv.key", directory / "srv.csr"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for argv in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=test-ca"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    key.chmod(0o600)
    return ca, cert, key


async def test_mqtts_with_a_configured_ca_file(tmp_path: Path, mqtt_prefix: str) -> None:
    require_tools("mosquitto")
    ca, cert, key = await asyncio.to_thread(make_certs, tmp_path / "pki")
    broker = await asyncio.to_thread(Mosquitto(tmp_path / "broker", tls=(cert, key)).start)
    try:
        assert broker.url.startswith("mqtts://")
        d = await started(tmp_path / "ok", broker, mqtt_prefix, "tls-ok", ca_file=str(ca))
        try:
            deadline = time.monotonic() + 10
            while not (await stats(d))["mqtt"]["connected"]:
                assert time.monotonic() < deadline, d.logs()
                await asyncio.sleep(0.1)
            out = await run(
                ["mosquitto_rr", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(ca),
                 "-t", f"{mqtt_prefix}/query", "-e", f"{mqtt_prefix}-rr/tls",
                 "-m", json.dumps(NEAREST_LOBBY), "-W", "5"],
                capture_output=True, text=True, timeout=15,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["devices"][0]["id"] == "prn-n0-lobby"
        finally:
            await stopped(d)
        # The system CA store does not know our throwaway CA: a clear error, sockets serve.
        d = await started(tmp_path / "no", broker, mqtt_prefix, "tls-no")
        try:
            deadline = time.monotonic() + 10
            while "mqtt TLS failed" not in d.logs():
                assert time.monotonic() < deadline, d.logs()
                await asyncio.sleep(0.1)
            with Client(tcp_url(d.config)) as c:
                assert c.nearest("printer").devices
            assert (await stats(d))["mqtt"]["connected"] is False
        finally:
            await stopped(d)
    finally:
        await asyncio.to_thread(broker.close)


async def test_two_daemons_with_one_instance_name_are_told_so(
    tmp_path: Path, mosquitto_broker: Mosquitto, mqtt_prefix: str
) -> None:
    a = await started(tmp_path / "a", mosquitto_broker, mqtt_prefix, "twin")
    try:
        await online(mosquitto_broker, mqtt_prefix, "twin")
        b = await started(tmp_path / "b", mosquitto_broker, mqtt_prefix, "twin")
        try:
            deadline = time.monotonic() + 10
            while "another daemon seems to use this instance name" not in a.logs() + b.logs():
                assert time.monotonic() < deadline, a.logs() + b.logs()
                await asyncio.sleep(0.1)
            # They do not duel at full speed: the backoff grows while the rival is there.
            before = (await stats(a))["mqtt"]["reconnects"] + (await stats(b))["mqtt"]["reconnects"]
            await asyncio.sleep(4)
            after = (await stats(a))["mqtt"]["reconnects"] + (await stats(b))["mqtt"]["reconnects"]
            assert after - before <= 14, (before, after)  # a duel at full speed: ~25
        finally:
            await stopped(b)
    finally:
        await stopped(a)


async def test_federated_devices_restored_from_a_snapshot_leave_when_their_origin_is_gone(
    tmp_path: Path, mosquitto_broker: Mosquitto, mqtt_prefix: str
) -> None:
    north = await asyncio.to_thread(split_map, tmp_path / "maps", {"north"})
    south = await asyncio.to_thread(split_map, tmp_path / "maps", {"south"})
    a = await started(
        tmp_path / "a", mosquitto_broker, mqtt_prefix, "snap-a", maps=[str(north)], federate=True
    )
    b = await started(tmp_path / "b", mosquitto_broker, mqtt_prefix, "snap-b", maps=[str(south)], federate=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while (await stats(a))["mqtt"]["federated_devices"] < 7:
            assert time.monotonic() < deadline, a.logs()
            await asyncio.sleep(0.1)
        assert await stopped(a) == 0  # writes the inventory snapshot, B's devices included
        snapshot = tmp_path / "a" / "state" / "inventory.json"
        assert b"snap-b" in snapshot.read_bytes()
        await asyncio.to_thread(b.kill)
        await wait_payload(mosquitto_broker.port, f"{mqtt_prefix}/status/snap-b", b"offline", 5)
        a = await restarted(a)
        await online(mosquitto_broker, mqtt_prefix, "snap-a")
        inv = await devices(a)
        assert [x["id"] for x in inv if x["source"] == "mqtt"] == []
        assert "inventory restored" in a.logs()
    finally:
        await stopped(a)
        await stopped(b)

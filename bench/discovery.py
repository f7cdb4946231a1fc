"""Discovery benchmark on the isolated namespace LAN (root; skipped with a reason otherwise).

Figures, each with the same run's baseline beside it:
- appearance: from a printer's first SRV announcement on the wire (the responder
  process timestamps the moment its first announcement packet is handed to the kernel)
  to its first appearance in a ``nearest`` answer (a client polling every ~2 ms);
  baseline: a bare python-zeroconf ``AsyncServiceBrowser`` + ``async_request`` on
  another host of the same LAN, timestamped when resolved;
- removal: from the first goodbye packet to the printer's absence from ``nearest``;
  baseline: the same bare browser's ``Removed`` event;
- 500 devices announced at once by one responder: time until all 500 are in the
  daemon's table, placed and indexed (answerable), and the daemon's CPU time for it;
  baseline: the bare browser resolving all 500 in the same run.
Goals (issue 3): appearance <= 100 ms, removal <= 50 ms, 500 devices < 20 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

RUNS = int(os.environ.get("BENCH_DISCOVERY_RUNS", "25"))
MANY = 500
APPEAR_GOAL_MS = 100.0
REMOVE_GOAL_MS = 50.0
MANY_GOAL_S = 20.0
POLL_S = 0.002


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]


def _summary(xs: list[float]) -> str:
    if not xs:
        return "no samples"
    return (
        f"median {statistics.median(xs):7.1f}  p90 {_pct(xs, 0.9):7.1f}  "
        f"min {min(xs):7.1f}  max {max(xs):7.1f}  (n={len(xs)})"
    )


class Observer:
    """A bare python-zeroconf browser in another namespace: the baseline."""

    def __init__(self, lan: Any, host: int) -> None:
        self.resolved: dict[str, float] = {}
        self.removed: dict[str, float] = {}
        self.lock = threading.Lock()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, args=(lan, host), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self, lan: Any, host: int) -> None:
        from zeroconf import IPVersion, ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        async def main() -> None:
            with lan.netns(host) as ip:  # this thread's sockets live in that host
                aiozc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
            self._stop = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            tasks: set[asyncio.Task[None]] = set()

            async def resolve(zc: Any, type_: str, name: str) -> None:
                info = AsyncServiceInfo(type_, name)
                if await info.async_request(zc, 3000):
                    with self.lock:
                        self.resolved.setdefault(name, time.time())

            def handler(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
                if state_change is ServiceStateChange.Removed:
                    with self.lock:
                        self.removed.setdefault(name, time.time())
                else:
                    t = asyncio.ensure_future(resolve(zeroconf, service_type, name))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)

            browser = AsyncServiceBrowser(aiozc.zeroconf, ["_ipp._tcp.local."], handlers=[handler])
            self._ready.set()
            await self._stop.wait()
            await browser.async_cancel()
            await aiozc.async_close()

        asyncio.run(main())

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _poll(pred: Callable[[], bool], timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.time()
        time.sleep(POLL_S)
    return None


def _site(lan: Any, path: Path) -> Path:
    lon, lat, w = 4.9, 52.37, 0.0002
    ring = [[lon, lat], [lon + w, lat], [lon + w, lat + w], [lon, lat + w], [lon, lat]]
    zone = {
        "type": "Feature",
        "properties": {
            "feature_type": "zone",
            "id": "bench-lan",
            "site": "bench",
            "building": "b",
            "level": 0,
            "name": "Bench LAN",
            "subnets": [lan.subnet],
        },
        "geometry": {"type": "Polygon", "coordinates": [ring]},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [zone]}))
    return path


def _udp_drops(lan: Any, host: int) -> int:
    """Return UDP RcvbufErrors in a host's namespace (datagrams lost to a full buffer)."""
    out = lan.run(host, ["cat", "/proc/net/snmp"]).stdout.splitlines()
    head, values = [line.split() for line in out if line.startswith("Udp:")][:2]
    return int(values[head.index("RcvbufErrors")])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    from lan import Lan, can_run
    from nearest_client import Client
    from support import DaemonProcess, write_config

    reason = can_run()
    if reason:
        print(f"skipped: cannot build the test LAN: {reason}")
        return
    lan = Lan(n_hosts=3, net=120).up()
    tmp = Path(tempfile.mkdtemp(prefix="bench-disc-"))
    daemon = None
    observer = None
    peer = None
    try:
        cfg = write_config(
            tmp,
            sections={
                "discovery": {
                    "enabled": True,
                    "interfaces": ["eth0"],
                    "expire_after": "10m",
                    "max_devices": 2000,
                },
                "logging": {"level": "warning"},
            },
            maps=[str(_site(lan, tmp / "site.geojson"))],
            subnets=[],
        )
        daemon = DaemonProcess(cfg, netns=lan.ns(1)).wait_ready()
        observer = Observer(lan, 2)
        peer = lan.zeroconf(3)
        client = Client(f"unix://{tmp / 'query.sock'}", timeout=5)
        admin = Client(f"unix://{tmp / 'admin.sock'}", timeout=10)
        asker = lan.ip(2)

        def answered(name: str) -> bool:
            reply = client.request(
                {"op": "nearest", "kind": "printer", "k": 20, "client_ip": asker}
            )
            return any(d["name"] == name for d in reply["devices"])

        appear, remove, base_appear, base_remove = [], [], [], []
        uris: set[str] = set()
        for i in range(RUNS):
            name = f"Bench Printer {i}"
            full = f"{name}._ipp._tcp.local."
            spec = {
                "host": f"bench-{i}.local.",
                "addresses": [lan.ip(3)],
                "txt": {
                    "txtvers": "1",
                    "rp": "ipp/print",
                    "UUID": f"b0000000-0000-4000-8000-{i:012d}",
                },
            }
            seen: dict[str, float | None] = {}
            poller = threading.Thread(
                target=lambda n=name, out=seen: out.__setitem__("t", _poll(lambda: answered(n), 10))
            )
            poller.start()
            t_ann = peer.register(f"b{i}", name, **spec)
            poller.join()
            if seen.get("t") is not None:
                appear.append((seen["t"] - t_ann) * 1000)  # type: ignore[operator]
            reply = client.request(
                {"op": "nearest", "kind": "printer", "k": 20, "client_ip": asker}
            )
            uris |= {d["uri"] for d in reply["devices"] if d["name"] == name}
            _poll(lambda f=full: f in observer.resolved, 5)  # type: ignore[union-attr]
            with observer.lock:
                if full in observer.resolved:
                    base_appear.append((observer.resolved[full] - t_ann) * 1000)
            gone: dict[str, float | None] = {}
            poller = threading.Thread(
                target=lambda n=name, out=gone: out.__setitem__(
                    "t", _poll(lambda: not answered(n), 10)
                )
            )
            poller.start()
            t_bye = peer.unregister(f"b{i}")
            poller.join()
            if gone.get("t") is not None:
                remove.append((gone["t"] - t_bye) * 1000)  # type: ignore[operator]
            _poll(lambda f=full: f in observer.removed, 5)  # type: ignore[union-attr]
            with observer.lock:
                if full in observer.removed:
                    base_remove.append((observer.removed[full] - t_bye) * 1000)
            time.sleep(0.05)

        print(
            f"printer appearance, ms from its first announcement to a `nearest` answer ({RUNS} runs)"
        )
        print(f"  nearestd                     {_summary(appear)}   goal <= {APPEAR_GOAL_MS:.0f}")
        print(f"  bare python-zeroconf resolve {_summary(base_appear)}")
        print("printer removal, ms from its first goodbye to its absence from `nearest`")
        print(f"  nearestd                     {_summary(remove)}   goal <= {REMOVE_GOAL_MS:.0f}")
        print(f"  bare python-zeroconf Removed {_summary(base_remove)}")
        literal = all(u.startswith(f"ipp://{lan.ip(3)}:") for u in uris)
        print(
            f"  uri built from an address literal (no .local resolution needed): {literal} {sorted(uris)[:1]}"
        )
        print(
            "  published baselines (reference note, same kind of LAN): cups-browsed +433 ms after "
            "the announcement; avahi-based tools 1000 ms to notice a goodbye"
        )

        def stats() -> dict[str, Any]:
            return dict(admin.request({"op": "stats"})["stats"])

        base_devices = stats()["discovery"]["devices"]
        items = [
            {
                "id": f"m{j}",
                "name": f"Many {j}",
                "type": "_ipp._tcp.local.",
                "host": f"many-{j}.local.",
                "addresses": [lan.ip(3)],
                "port": 631,
                "txt": {"txtvers": "1", "rp": "ipp/print", "UUID": f"c0000000-0000-4000-8000-{j:012d}",
                        "Color": "T" if j % 2 else "F"},
            }
            for j in range(MANY)
        ]  # fmt: skip
        drops0 = _udp_drops(lan, 1)
        cpu0 = _cpu_seconds(daemon.proc.pid)
        reply = peer.call(timeout=120, op="register_many", items=items)
        t_first = float(reply["t"])
        t_sent = time.time()
        done = _poll(
            lambda: (
                (s := stats())["discovery"]["devices"] - base_devices >= MANY
                and s["unlocated"] == 0
            ),
            60,
        )
        cpu1 = _cpu_seconds(daemon.proc.pid)
        drops = _udp_drops(lan, 1) - drops0
        _poll(lambda: sum(1 for n in list(observer.resolved) if n.startswith("Many ")) >= MANY, 30)  # type: ignore[union-attr]
        with observer.lock:
            many = sorted(t for n, t in observer.resolved.items() if n.startswith("Many "))
        sample = client.request(
            {
                "op": "nearest",
                "kind": "printer",
                "k": 20,
                "client_ip": asker,
                "need": {"color": True},
            }
        )
        ok_sample = len(sample["devices"]) == 20
        print(f"{MANY} devices announced at once by one responder")
        if done is None:
            print("  nearestd: not all answerable within 60 s")
        else:
            print(f"  nearestd: all {MANY} answerable {done - t_first:.2f} s after the first "
                  f"announcement   goal < {MANY_GOAL_S:.0f} s; daemon CPU {cpu1 - cpu0:.2f} s "
                  f"(includes serving the stats polls); nearest(color) answers 20: {ok_sample}")  # fmt: skip
        print(
            f"  responder: registering all {MANY} returned {t_sent - t_first:.2f} s after its first announcement"
        )
        print(f"  datagrams lost to a full receive buffer in the daemon's namespace: {drops}")
        if len(many) >= MANY:
            print(f"  bare python-zeroconf resolved all {MANY}: {many[-1] - t_first:.2f} s")
        else:
            print(f"  bare python-zeroconf resolved {len(many)} of {MANY}")
    finally:
        if peer is not None:
            peer.kill()
        if observer is not None:
            observer.close()
        if daemon is not None:
            daemon.stop()
        lan.down()


if __name__ == "__main__":
    main()

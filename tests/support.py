"""Shared test helpers: temp configs, a daemon subprocess, the real-peer skip policy."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "config"
DEMO_MAP = CONFIG_DIR / "sites" / "campus.geojson"
DEMO_CSV = CONFIG_DIR / "sites" / "ipam-export.csv"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip a real-peer test with a reason; under CI=true a skip is a failure."""
    if IN_CI:
        pytest.fail(f"real-peer test cannot run under CI: {reason}")
    pytest.skip(reason)


def require_tools(*tools: str) -> None:
    """Skip (or fail under CI) unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail(f"missing tools: {', '.join(missing)}")


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(v: Any) -> str:
    """Render a Python value as TOML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def write_config(
    directory: Path,
    sections: dict[str, dict[str, Any]] | None = None,
    maps: list[str] | None = None,
    subnets: list[str] | None = None,
) -> Path:
    """Write a config into ``directory`` with sockets there; sections override defaults."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base: dict[str, dict[str, Any]] = {
        "daemon": {
            "listen": [f"tcp://127.0.0.1:{port}", f"unix://{directory}/query.sock"],
            "admin_socket": str(directory / "admin.sock"),
            "state_dir": str(directory / "state"),
            "trusted_peers": ["127.0.0.1/32", "::1/128"],
        },
        "site": {
            "maps": maps if maps is not None else [str(DEMO_MAP)],
            "subnets": subnets if subnets is not None else [str(DEMO_CSV)],
        },
        "metrics": {"listen": ""},
    }
    for name, values in (sections or {}).items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        lines.append("")
    path = directory / "nearestd.toml"
    path.write_text("\n".join(lines))
    return path


def tcp_url(config: Path) -> str:
    """Return the first tcp:// listen URL of a config written by write_config."""
    import tomllib

    data = tomllib.loads(config.read_text())
    return next(u for u in data["daemon"]["listen"] if u.startswith("tcp://"))


class DaemonProcess:
    """``nearestd`` in a subprocess; logs captured to a file."""

    def __init__(
        self,
        config: Path,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        netns: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.config = config
        self.log_path = log_path or config.parent / "nearestd.log"
        argv = [sys.executable, "-m", "nearestd.cli", "--config", str(config), *(extra_args or [])]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.admin = config.parent / "admin.sock"

    def wait_ready(self, timeout: float = 15.0) -> DaemonProcess:
        """Wait until the admin socket answers ping."""
        from nearest_client import Client, ClientError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nearestd exited {self.proc.returncode}: {self.logs()}")
            if self.admin.exists():
                try:
                    with Client(f"unix://{self.admin}", timeout=1) as c:
                        c.request({"op": "ping"})
                        return self
                except ClientError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"nearestd not ready in {timeout}s: {self.logs()}")

    def logs(self) -> str:
        """Return what the daemon logged so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        """Send a signal to the daemon."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the daemon."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def zone_feature(
    zid: str,
    ring: list[list[float]],
    subnets: list[str],
    *,
    building: str = "main",
    level: int = 0,
    name: str | None = None,
    aliases: list[str] | None = None,
) -> dict[str, Any]:
    """Return a GeoJSON zone feature on the test site ``lab`` (aliases only when given)."""
    props: dict[str, Any] = {
        "feature_type": "zone",
        "id": zid,
        "site": "lab",
        "building": building,
        "level": level,
        "name": zid if name is None else name,
        "subnets": subnets,
    }
    if aliases is not None:
        props["aliases"] = aliases
    return {
        "type": "Feature",
        "properties": props,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
    }


def lab_square(k: int) -> list[list[float]]:
    """Return the ring of the k-th of a row of 0.0002° squares on the test site."""
    lon, lat, w = 4.9 + k * 0.0003, 52.37, 0.0002
    return [[lon, lat], [lon + w, lat], [lon + w, lat + w], [lon, lat + w], [lon, lat]]


def device_feature(
    did: str,
    name: str,
    kind: str,
    uri: str,
    lonlat: tuple[float, float],
    *,
    building: str = "main",
    **props: Any,
) -> dict[str, Any]:
    """Return a static device feature on the ground floor of the test site ``lab``."""
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": list(lonlat)},
        "properties": {
            "feature_type": "device",
            "static": True,
            "id": did,
            "name": name,
            "kind": kind,
            "uri": uri,
            "site": "lab",
            "building": building,
            "level": 0,
            **props,
        },
    }


def lab_device(
    did: str, square: int, kind: str, uri: str, name: str, dx: float = 0.0, dy: float = 1e-4, **props: Any
) -> dict[str, Any]:
    """Return a static device feature inside the k-th lab square (``lab_square``)."""
    ring = lab_square(square)
    return device_feature(
        did, name, kind, uri, (ring[0][0] + 0.00005 + dx, ring[0][1] + dy), **props
    )


def read_frame(s: Any) -> dict[str, Any] | None:
    """Read one reply frame from a blocking socket; None when the peer closed first."""
    import struct

    from nearest_wire import decode_reply

    buf = b""
    while len(buf) < 4:
        chunk = s.recv(4 - len(buf))
        if not chunk:
            return None
        buf += chunk
    (n,) = struct.unpack(">I", buf)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    return decode_reply(body)


def ask(daemon: DaemonProcess, req: dict[str, Any], admin: bool = False) -> dict[str, Any]:
    """Send one request over the daemon's query (or admin) Unix socket; return the reply."""
    from nearest_client import Client

    sock = daemon.admin if admin else daemon.config.parent / "query.sock"
    with Client(f"unix://{sock}", timeout=5) as c:
        return c.request(req)


def devices_by_name(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    """Return the daemon's inventory (admin ``devices``) by device name."""
    return {d["name"]: d for d in ask(daemon, {"op": "devices"}, admin=True)["devices"]}


def discovery_stats(daemon: DaemonProcess) -> dict[str, Any]:
    """Return the discovery section of the daemon's admin ``stats``."""
    return dict(ask(daemon, {"op": "stats"}, admin=True)["stats"]["discovery"])


def wait_for(what: str, pred: Any, timeout: float = 10.0, show: Any = str) -> Any:
    """Poll ``pred`` until it returns something true; fail naming ``what`` (and ``show()``)."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {show()}")
        time.sleep(0.02)
    return value


def rss_of(pid: int) -> int:
    """Return a process's resident set size in bytes (0 once it is gone)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssPeak(threading.Thread):
    """Samples a process's RSS every 10 ms; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = rss_of(pid)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.01):
            self.peak = max(self.peak, rss_of(self.pid))

    def stop(self) -> int:
        """Stop sampling (joined within 5 s) and return the peak."""
        self._halt.set()
        self.join(5)
        return self.peak

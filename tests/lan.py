"""An isolated test LAN: network namespaces joined by veth pairs on a bridge (Linux, root).

One bridge namespace and N host namespaces, each host with ``eth0`` at 198.18.<net>.<10+i>/24
(RFC 2544 benchmark range) and no default route; no real interface is touched, and
everything is deleted by :meth:`Lan.down`. Peers that run inside a host:

* :meth:`Lan.zeroconf` -- a python-zeroconf responder process (tests/zc_peer.py) driven
  over stdin, which can register, update, unregister (goodbye) or be SIGKILLed (silence);
* :meth:`Lan.avahi_node` -- avahi-daemon with a private dbus-daemon and a private /run
  (mount namespace), then :meth:`Lan.avahi_publish` (``avahi-publish-service``);
* :meth:`Lan.ippeveprinter` -- CUPS's IPP Everywhere printer, advertising through that avahi.

Code under test runs in a host either as a subprocess (:meth:`Lan.popen`, or
``DaemonProcess(..., netns=lan.ns(i))``) or in-process via :meth:`Lan.netns`, which moves
the *calling thread* into the namespace (sockets made there stay there). Unix sockets are
files, so a test in the root namespace can still reach a daemon's Unix sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

DBUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/>
    <allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
"""

AVAHI_CONF = """[server]
host-name={host}
domain-name=local
use-ipv4=yes
use-ipv6=no
allow-interfaces=eth0
enable-dbus=yes
disallow-other-stacks=no
ratelimit-interval-usec=1000000
ratelimit-burst=1000
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
publish-aaaa-on-ipv4=no
[reflector]
[rlimits]
"""

# Runs inside `ip netns exec NS unshare -m`: private /run and /etc/avahi/services.
NODE_SH = r"""
set -u
mount -t tmpfs tmpfs /run || exit 3
mkdir -p /run/dbus /run/avahi-daemon
mount --bind "$STATE/services" /etc/avahi/services || exit 4
dbus-daemon --config-file="$STATE/dbus.conf" --nofork --nopidfile >"$STATE/dbus.log" 2>&1 &
DP=$!
for i in $(seq 100); do [ -S /run/dbus/system_bus_socket ] && break; sleep 0.05; done
avahi-daemon -f "$STATE/avahi-daemon.conf" --no-drop-root --no-chroot --no-rlimits >"$STATE/avahi.log" 2>&1 &
AP=$!
trap 'kill -TERM $AP $DP 2>/dev/null; wait; exit 0' TERM INT
for i in $(seq 200); do grep -q "Server startup complete" "$STATE/avahi.log" && break; sleep 0.05; done
echo READY > "$STATE/ready"
sleep "$MAXSECS" & wait $!
kill -TERM $AP $DP 2>/dev/null; wait
"""


def can_run() -> str | None:
    """Return None when namespaces can be made here, else the reason they cannot."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) for ip netns"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"lanprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add is not permitted: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class ZcPeer:
    """A zc_peer.py process: register/update/unregister services, or die silently."""

    def __init__(self, prefix: list[str], ifaces: list[str], log: Path) -> None:
        self.log = log
        self._err = open(log, "wb")  # noqa: SIM115
        iface_args = [a for iface in ifaces for a in ("--iface", iface)]
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(HERE / "zc_peer.py"), *iface_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            start_new_session=True,
        )
        self._buf = b""
        self.call_ready()

    @classmethod
    def local(cls, iface: str = "127.0.0.1", log: Path | None = None) -> ZcPeer:
        """Start a responder in this namespace on one interface address (loopback)."""
        if log is None:
            fd, name = tempfile.mkstemp(prefix="zcpeer-", suffix=".log")
            os.close(fd)
            log = Path(name)
        return cls([], [iface], log)

    def call_ready(self, timeout: float = 15.0) -> None:
        """Wait for the peer's ready line."""
        reply = self._read(timeout)
        if reply.get("op") != "ready":
            raise RuntimeError(f"zc peer did not start: {reply}")

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"zc peer silent: {self.log.read_text(errors='replace')}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"zc peer exited: {self.log.read_text(errors='replace')}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return dict(json.loads(line))

    def call(self, timeout: float = 30.0, **cmd: Any) -> dict[str, Any]:
        """Send one command and return its reply."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._read(timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"zc peer refused {cmd.get('op')}: {reply}")
        return reply

    def register(self, id: str, name: str, **spec: Any) -> float:
        """Advertise a service; return when its first announcement left."""
        return float(self.call(op="register", id=id, name=name, **spec)["t"])

    def update(self, id: str, name: str, **spec: Any) -> float:
        """Re-advertise a service with new data."""
        return float(self.call(op="update", id=id, name=name, **spec)["t"])

    def unregister(self, id: str) -> float:
        """Send goodbyes for a service; return when the first left."""
        return float(self.call(op="unregister", id=id)["t"])

    def pause(self) -> None:
        """SIGSTOP: a sleeping device, silent but not gone."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the device wakes up."""
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the peer's records stay in caches with no goodbye."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._err.close()

    def close(self) -> None:
        """Unregister everything (goodbyes) and exit."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._err.close()


class Lan:
    """A bridge and ``n_hosts`` hosts in their own network namespaces."""

    def __init__(self, n_hosts: int = 6, net: int = 77, prefix: str | None = None) -> None:
        self.n = n_hosts
        self.net = net
        self.prefix = prefix or f"np{os.getpid() % 100000}x{net}-"
        self.bridge_ns = self.prefix + "br"
        self.tmp = Path(tempfile.mkdtemp(prefix="lan-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.peers: list[ZcPeer] = []
        self._is_up = False

    # ---- topology ------------------------------------------------------------------------
    def ns(self, i: int) -> str:
        """Return host i's namespace name (1-based)."""
        return f"{self.prefix}{i}"

    def ip(self, i: int) -> str:
        """Return host i's address."""
        return f"198.18.{self.net}.{10 + i}"

    @property
    def subnet(self) -> str:
        """Return the LAN's prefix."""
        return f"198.18.{self.net}.0/24"

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def up(self) -> Lan:
        """Create the namespaces, the bridge and the veth pairs."""
        self._is_up = True
        self._ip("netns", "add", self.bridge_ns)
        self._ip("-n", self.bridge_ns, "link", "set", "lo", "up")
        self._ip(
            "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"
        )
        self._ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i in range(1, self.n + 1):
            ns = self.ns(i)
            self._ip("netns", "add", ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip(
                "link", "add", "eth0", "netns", ns, "type", "veth",
                "peer", "name", f"p{i}", "netns", self.bridge_ns,
            )  # fmt: skip
            self._ip("-n", self.bridge_ns, "link", "set", f"p{i}", "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
        return self

    def link_ip(self, i: int) -> str:
        """Return host i's address on the second link (see :meth:`add_link`)."""
        return f"198.18.{self.net + 1}.{10 + i}"

    def add_link(self, i: int) -> str:
        """Give host i an ``eth1`` on a second bridge (another link); return its address."""
        r = subprocess.run(["ip", "-n", self.bridge_ns, "link", "show", "br1"], capture_output=True)
        if r.returncode != 0:
            self._ip(
                "-n", self.bridge_ns, "link", "add", "br1", "type", "bridge", "mcast_snooping", "0"
            )
            self._ip("-n", self.bridge_ns, "link", "set", "br1", "up")
        r = subprocess.run(["ip", "-n", self.ns(i), "link", "show", "eth1"], capture_output=True)
        if r.returncode == 0:
            return self.link_ip(i)
        self._ip(
            "link", "add", "eth1", "netns", self.ns(i), "type", "veth",
            "peer", "name", f"q{i}", "netns", self.bridge_ns,
        )  # fmt: skip
        self._ip("-n", self.bridge_ns, "link", "set", f"q{i}", "master", "br1", "up")
        self._ip("-n", self.ns(i), "addr", "add", f"{self.link_ip(i)}/24", "dev", "eth1")
        self._ip("-n", self.ns(i), "link", "set", "eth1", "up")
        return self.link_ip(i)

    def add_ipv6(self, i: int, cidr: str, dev: str = "eth0") -> None:
        """Give host i an IPv6 address, usable at once (no duplicate address detection)."""
        self._ip("-n", self.ns(i), "-6", "addr", "add", cidr, "dev", dev, "nodad")

    def route6(self, i: int, prefix: str, via: str) -> None:
        """Route an IPv6 prefix from host i through another host's address on the LAN."""
        self._ip("-n", self.ns(i), "-6", "route", "add", prefix, "via", via)

    def down(self) -> None:
        """Stop every peer, kill stragglers inside our namespaces, delete everything."""
        for peer in self.peers:
            with contextlib.suppress(Exception):
                peer.kill()
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(2)
        for ns in [self.bridge_ns] + [self.ns(i) for i in range(1, self.n + 1)]:
            pids = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._is_up = False

    # ---- running things ------------------------------------------------------------------
    def exec_prefix(self, i: int) -> list[str]:
        """Return the argv prefix that runs a command in host i."""
        return ["ip", "netns", "exec", self.ns(i)]

    def popen(
        self, i: int, argv: list[str], log: str | None = None, **kw: Any
    ) -> subprocess.Popen[bytes]:
        """Start argv in host i (its own session, so it can be killed as a group)."""
        out: IO[bytes] | int = open(self.tmp / log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        p = subprocess.Popen(
            [*self.exec_prefix(i), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kw,
        )
        self.procs.append(p)
        return p

    def run(self, i: int, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run argv in host i to completion."""
        return subprocess.run(
            [*self.exec_prefix(i), *argv], capture_output=True, text=True, timeout=timeout
        )

    @contextlib.contextmanager
    def netns(self, i: int) -> Iterator[str]:
        """Move the calling thread into host i's namespace; yield its address."""
        with (
            open("/proc/thread-self/ns/net") as orig,
            open(f"/run/netns/{self.ns(i)}") as target,
        ):
            if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            try:
                yield self.ip(i)
            finally:
                _libc.setns(orig.fileno(), CLONE_NEWNET)

    def log(self, name: str) -> str:
        """Return a peer's log."""
        path = self.tmp / name
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- peers ---------------------------------------------------------------------------
    def zeroconf(self, i: int, iface: str | None = None) -> ZcPeer:
        """Start a python-zeroconf responder in host i, bound to one of its addresses only."""
        log = self.tmp / f"zc-{i}-{len(self.peers)}.log"
        peer = ZcPeer(self.exec_prefix(i), [iface or self.ip(i)], log)
        self.peers.append(peer)
        return peer

    def avahi_node(
        self, i: int, host: str | None = None, maxsecs: int = 900, browse_domains: str = ""
    ) -> Path:
        """Start avahi-daemon (and its private dbus) in host i; return its state directory.

        ``browse_domains`` turns wide-area (unicast DNS-SD) browsing on for those domains,
        asking the name servers of ``/etc/netns/<ns>/resolv.conf``.
        """
        state = self.tmp / f"avahi{i}"
        if (state / "ready").exists():
            return state
        (state / "services").mkdir(parents=True, exist_ok=True)
        (state / "dbus.conf").write_text(DBUS_CONF)
        conf = AVAHI_CONF.format(host=host or f"node{i}")
        if browse_domains:
            conf = conf.replace("enable-wide-area=no", "enable-wide-area=yes").replace(
                "domain-name=local\n", f"domain-name=local\nbrowse-domains={browse_domains}\n"
            )
        (state / "avahi-daemon.conf").write_text(conf)
        env = dict(os.environ, STATE=str(state), MAXSECS=str(maxsecs))
        self.popen(
            i,
            ["unshare", "-m", "--propagation", "private", "bash", "-c", NODE_SH],
            log=f"node{i}.log",
            env=env,
        )
        deadline = time.monotonic() + 15
        while not (state / "ready").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"avahi node {i} did not start: {self.log(f'avahi{i}/avahi.log')}"
                )
            time.sleep(0.05)
        return state

    def in_node(self, i: int, argv: list[str], log: str | None = None) -> subprocess.Popen[bytes]:
        """Start argv inside host i's avahi node (its network and mount namespaces)."""
        pids = subprocess.run(
            ["ip", "netns", "pids", self.ns(i)], capture_output=True, text=True
        ).stdout.split()
        dbus = [
            p
            for p in pids
            if Path(f"/proc/{p}/comm").exists()
            and Path(f"/proc/{p}/comm").read_text().strip() == "dbus-daemon"
        ]
        if not dbus:
            raise RuntimeError(f"no avahi node in {self.ns(i)}")
        out: IO[bytes] | int = open(self.tmp / log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        p = subprocess.Popen(
            ["nsenter", "-t", dbus[0], "-m", "-n", "--", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def avahi_publish(
        self, i: int, name: str, type_: str, port: int, txt: dict[str, str] | list[str]
    ) -> subprocess.Popen[bytes]:
        """Publish a service through host i's avahi (``avahi-publish-service``)."""
        strings = txt if isinstance(txt, list) else [f"{k}={v}" for k, v in txt.items()]
        return self.in_node(
            i,
            ["avahi-publish-service", name, type_, str(port), *strings],
            log=f"pub-{i}-{port}-{len(self.procs)}.log",
        )

    def ippeveprinter(
        self, i: int, name: str, port: int, location: str = "", extra: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start CUPS's IPP Everywhere printer in host i, advertised by its avahi."""
        spool = self.tmp / f"spool{i}-{port}"
        spool.mkdir(exist_ok=True)
        return self.in_node(
            i,
            [
                "ippeveprinter",
                "-p",
                str(port),
                "-l",
                location,
                "-d",
                str(spool),
                *(extra or []),
                name,
            ],
            log=f"ippeve-{i}-{port}.log",
        )

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 5) -> None:
        """Signal a peer's process group and wait for it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(2)

"""The one typed configuration, loaded from TOML.

Each section is a frozen dataclass; each field's docstring is its ``doc`` metadata.
Unknown keys and wrong types are errors that name the file, the key path and the
expected type; every problem in a file is reported at once.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, cast, get_args, get_origin, get_type_hints

from nearestd.core.netset import normalise_network
from nearestd.core.ranking import Ranking as RankingConfig

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(Exception):
    """The configuration is wrong; ``problems`` holds one sentence per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Duration(float):
    """Seconds, written in TOML as a string like "90s", "10m" or "24h"."""


def parse_duration(text: str) -> float:
    """Return seconds for a duration string, or raise ValueError."""
    m = DURATION.match(text)
    if not m:
        raise ValueError(f'expected a duration like "90s", "10m" or "24h", got {_shown(text)}')
    seconds = float(m.group(1)) * UNITS[m.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"expected a finite duration, got {_shown(text)}")
    return seconds


YEAR = 365 * 86400.0


class Parsed(str):
    """A config string parsed once, when the file is read, into typed parts.

    The text stays what the file said (for messages, docs and comparisons); the parts are
    attributes, so no edge parses it again.
    """

    @classmethod
    def parse(cls, text: str) -> Any:
        """Return the parsed value, or raise ValueError saying what was expected."""
        raise NotImplementedError  # pragma: no cover


_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^:/\s\[\]]+):(\d{1,5})")


def _port(text: str) -> int | None:
    port = int(text)
    return port if 0 <= port <= 65535 else None


class SocketUrl(Parsed):
    """A query socket: ``tcp://HOST:PORT`` or ``unix:///PATH``."""

    unix: bool
    path: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> SocketUrl:
        """Return the URL's parts, or raise ValueError."""
        out = cls(text)
        if text.startswith("unix://"):
            if not text[7:]:
                raise ValueError("expected unix:///PATH")
            out.unix, out.path, out.host, out.port = True, text[7:], "", 0
            return out
        try:
            if not text.startswith("tcp://") or not text[6:]:
                raise ValueError
            where = HostPort.parse(text[6:])
        except ValueError:
            raise ValueError(f"expected tcp://HOST:PORT or unix:///PATH, got {text!r}") from None
        out.unix, out.path, out.host, out.port = False, "", where.host, where.port
        return out


class HostPort(Parsed):
    """``HOST:PORT`` or ``[IPv6]:PORT`` to listen on; empty (where allowed) means off."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Return the address's parts, or raise ValueError."""
        out = cls(text)
        out.host, out.port = "", 0
        if not text:
            return out
        m = _HOST_PORT.fullmatch(text)
        port = _port(m.group(2)) if m else None
        if m is None or port is None:
            raise ValueError(f"expected HOST:PORT, got {_shown(text)}")
        out.host, out.port = m.group(1).strip("[]"), port
        return out


class AddressPort(HostPort):
    """``IP:PORT`` or ``[IPv6]:PORT``: an address, not a host name."""

    @classmethod
    def parse(cls, text: str) -> AddressPort:
        """Return the address's parts, or raise ValueError."""
        try:
            out = super().parse(text)
            ipaddress.ip_address(out.host)  # an empty host (no text) is refused here too
        except ValueError:
            raise ValueError(
                f"expected IP:PORT or [IPv6]:PORT (an address, not a host name), got {_shown(text)}"
            ) from None
        return cast(AddressPort, out)


class BrokerUrl(Parsed):
    """An MQTT broker: ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT`` (port optional)."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, text: str) -> BrokerUrl:
        """Return the URL's parts, or raise ValueError."""
        out = cls(text)
        m = re.fullmatch(r"(mqtts?)://(\[[0-9a-fA-F:.]+\]|[^\s/:\[\]]+)(?::(\d{1,5}))?/?", text)
        port = _port(m.group(3)) if m and m.group(3) else None
        if m is None or (m.group(3) and port is None):
            raise ValueError("expected mqtt://HOST:PORT or mqtts://HOST:PORT")
        out.tls = m.group(1) == "mqtts"
        out.host = m.group(2).strip("[]")
        out.port = port or (8883 if out.tls else 1883)
        return out


class Cidr(Parsed):
    """A CIDR prefix; ``network`` is it parsed (host bits dropped, IPv4-mapped as IPv4)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    @classmethod
    def parse(cls, text: str) -> Cidr:
        """Return the prefix, or raise ValueError."""
        out = cls(text)
        try:
            out.network = normalise_network(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"expected a CIDR prefix, got {text!r}") from None
        return out


class Mode(int):
    """File permissions, written in TOML as an octal string like "0600"."""

    @classmethod
    def parse(cls, text: str) -> Mode:
        """Return the permission bits, or raise ValueError."""
        if not re.fullmatch(r"0?[0-7]{3}", text):
            raise ValueError('expected octal permissions like "0600"')
        return cls(int(text, 8))

    def __repr__(self) -> str:
        return repr(f"{int(self):04o}")

    def __str__(self) -> str:
        return f"{int(self):04o}"


class _ItemError(ValueError):
    """A list item that did not parse: which one, and why."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


def _doc(
    text: str,
    default: Any = MISSING,
    factory: Any = MISSING,
    within: tuple[float, float] | None = None,
) -> Any:
    """Return a dataclass field with its docstring and, for numbers, its allowed range."""
    meta: dict[str, Any] = {"doc": text}
    if within is not None:
        meta["range"] = within
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """[daemon]: sockets, who may ask, limits."""

    listen: list[SocketUrl] = _doc(
        "Sockets to serve queries on: tcp://HOST:PORT or unix:///PATH.",
        factory=lambda: [
            SocketUrl.parse("tcp://127.0.0.1:7310"),
            SocketUrl.parse("unix:///run/nearestd/nearestd.sock"),
        ],
    )
    admin_socket: str = _doc("Unix socket for nearestctl.", "/run/nearestd/admin.sock")
    admin_mode: Mode = _doc("Permissions of the admin socket, octal.", Mode(0o600))
    admin_group: str = _doc("Group that may use the admin socket (mode 0660 then).", "")
    socket_mode: Mode = _doc("Permissions of the query Unix sockets, octal.", Mode(0o666))
    allow: list[Cidr] = _doc(
        "CIDRs that may query over TCP; others get 'forbidden'.",
        factory=lambda: [Cidr.parse("0.0.0.0/0"), Cidr.parse("::/0")],
    )
    trusted_peers: list[Cidr] = _doc(
        "CIDRs that may ask on behalf of another IP (client_ip).",
        factory=lambda: [Cidr.parse("127.0.0.1/32"), Cidr.parse("::1/128")],
    )
    state_dir: str = _doc(
        "Directory for the device inventory snapshot and the compiled site map (a cache).",
        "/var/lib/nearestd",
    )
    max_connections: int = _doc(
        "Open connections at most, over all sockets.", 1024, within=(1, 1_000_000)
    )
    max_connections_per_source: int = _doc(
        "Open connections at most from one untrusted TCP address (IPv6: from one /64).",
        64,
        within=(1, 1_000_000),
    )
    reserved_connections: int = _doc(
        "Of max_connections, kept for trusted peers and Unix sockets (at most half is used).",
        64,
        within=(0, 1_000_000),
    )
    max_frame: int = _doc("Largest frame accepted, in bytes.", 65536, within=(1, 16 * 1024 * 1024))
    max_in_flight: int = _doc("Pipelined requests buffered per connection.", 64, within=(1, 65536))
    idle_timeout: Duration = _doc(
        "Close connections idle this long.", Duration(60.0), within=(0.001, YEAR)
    )
    frame_timeout: Duration = _doc(
        "Close a connection whose frame takes longer.", Duration(5.0), within=(0.001, YEAR)
    )
    rate: float = _doc(
        "Requests per second allowed per client address (IPv6: per /64); more than 0.",
        200.0,
        within=(0.0, 1e9),
    )
    burst: int = _doc(
        "Token-bucket burst per client address (IPv6: per /64).", 400, within=(1, 1_000_000_000)
    )
    rate_clients: int = _doc(
        "Client sources (address or IPv6 /64) rate-limited at once.", 16384, within=(1, 100_000_000)
    )


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """[discovery]: mDNS/DNS-SD browsing."""

    enabled: bool = _doc("Browse mDNS for printers and scanners.", False)
    interfaces: list[str] = _doc(
        "Interface names or addresses to browse on; required when enabled.", factory=list
    )
    expire_after: Duration = _doc(
        "Grace before a silent device is dropped.", Duration(600.0), within=(0.1, YEAR)
    )
    max_devices: int = _doc("Discovered devices kept at most.", 5000, within=(1, 10_000_000))
    max_devices_per_source: int = _doc(
        "Discovered devices one address may announce at most (a print server's queues count).",
        256,
        within=(1, 10_000_000),
    )
    ipv6: bool = _doc("Also browse over IPv6.", False)


@dataclass(frozen=True, slots=True)
class SiteConfig:
    """[site]: the floor plans."""

    maps: list[str] = _doc("GeoJSON site maps.", factory=list)
    subnets: list[str] = _doc("IPAM CSV files of prefix,zone_id.", factory=list)


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """[privacy]: the location log."""

    retention: Duration = _doc("How long location-log entries live.", Duration(86400.0))
    log_ip: str = _doc("'truncated' (/24 or /48 in logs) or 'none'.", "truncated")
    max_entries: int = _doc("Location-log entries held at most.", 100000, within=(1, 100_000_000))
    spike_per_minute: int = _doc(
        "Warn when one pseudonym asks more often.", 600, within=(1, 1_000_000_000)
    )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: the Prometheus exporter."""

    listen: HostPort = _doc(
        "HOST:PORT for /metrics; empty to disable.", HostPort.parse("127.0.0.1:9464")
    )


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """[mqtt]: absent means MQTT is off."""

    url: BrokerUrl = _doc(
        "mqtt://HOST:PORT or mqtts://HOST:PORT.", BrokerUrl.parse("mqtt://127.0.0.1:1883")
    )
    username: str = _doc("User name; empty for none.", "")
    password_file: str = _doc("File holding the password.", "")
    ca_file: str = _doc("CA bundle for mqtts; empty for the system store.", "")
    topic_prefix: str = _doc("Prefix P of every topic.", "nearest/v1")
    instance: str = _doc("This daemon's instance name; 'hostname' for the host name.", "hostname")
    federate: bool = _doc("Also serve devices other instances publish.", False)
    keepalive: int = _doc("MQTT keepalive, seconds.", 30)
    max_payload: int = _doc("Largest request payload accepted, bytes.", 65536)
    rate: float = _doc(
        "Requests per second per asker (its reply topic); more than 0.", 100.0, within=(0.0, 1e6)
    )
    burst: int = _doc("Token-bucket burst per asker.", 200, within=(1, 1_000_000))
    max_queued: int = _doc(
        "Requests waiting to be answered at most; more are dropped.", 1024, within=(16, 1_000_000)
    )
    foreign_grace: Duration = _doc(
        "How long other instances' devices stay served, marked stale, after their origin goes "
        "offline or the link to it (this daemon's broker, or a bridge) goes down.",
        Duration(60.0),
    )
    heartbeat: Duration = _doc(
        "With federate: how often to publish a heartbeat on P/alive/<instance>; an origin "
        "silent for three of its intervals counts as cut off. 0s: none.",
        Duration(5.0),
    )
    max_foreign: int = _doc("Most devices of other instances held, over all sites.", 10000)
    max_foreign_per_site: int = _doc(
        "Most devices of other instances held per site this daemon serves.", 2000
    )


@dataclass(frozen=True, slots=True)
class PollerConfig:
    """[poller]: live state from IPP Get-Printer-Attributes and eSCL ScannerStatus."""

    enabled: bool = _doc(
        "Poll every discovered printer (ipp/ipps) and scanner (eSCL) for its live state.", True
    )
    static: bool = _doc(
        "Poll the site maps' static devices too; a device's own 'poll' property overrides this.",
        False,
    )
    interval: Duration = _doc(
        "Time between polls of one device (spread +/- jitter).", Duration(30.0)
    )
    timeout: Duration = _doc(
        "Per-device time limit of one poll, connect to last byte.", Duration(5.0)
    )
    concurrency: int = _doc("Polls in flight at most.", 16)
    max_backoff: Duration = _doc(
        "Longest wait between polls of an unreachable device (doubling per failure).",
        Duration(300.0),
        within=(0.0, YEAR),
    )
    jitter: float = _doc("Fraction by which each wait is randomly shortened or lengthened.", 0.1)
    max_response: int = _doc(
        "Largest status reply read from a device, in bytes.",
        262144,
        within=(1024, 1024 * 1024 * 1024),
    )
    poll_this_host: bool = _doc(
        "Also poll devices at this host's own or loopback addresses (a local CUPS); off, "
        "such addresses (and unspecified, multicast, link-local) are never polled.",
        False,
    )


@dataclass(frozen=True, slots=True)
class DnssdConfig:
    """[dnssd]: absent means off; unicast DNS-SD answered per location (docs/dnssd.md)."""

    listen: list[AddressPort] = _doc(
        "HOST:PORT addresses to serve DNS on, each over UDP and TCP.",
        factory=lambda: [AddressPort.parse("127.0.0.1:8053")],
    )
    domain: str = _doc("The DNS-SD domain delegated to nearestd; required.", "")
    per_type: int = _doc("Devices published per service type and zone.", 4)
    ttl: Duration = _doc("TTL of every record and the SOA MINIMUM; at most 10s.", Duration(10.0))
    trusted_resolvers: list[Cidr] = _doc(
        "CIDRs of resolvers whose EDNS Client Subnet option is honoured (and not rate-limited).",
        factory=list,
    )


@dataclass(frozen=True, slots=True)
class WebConfig:
    """[web]: the read-only web view for operators; absent means off."""

    listen: HostPort = _doc("HOST:PORT to serve the pages on.", HostPort.parse("127.0.0.1:9465"))
    token_file: str = _doc(
        "File holding the bearer token every request must carry; required when listen is "
        "not a loopback address.",
        "",
    )


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """[logging]: one line per event to stderr."""

    format: str = _doc("'kv' (key=value) or 'json'.", "kv")
    level: str = _doc("debug, info, warning or error.", "info")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; ``path`` is the file it came from."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    mqtt: MqttConfig | None = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    poller: PollerConfig = field(default_factory=PollerConfig)
    dnssd: DnssdConfig | None = None
    web: WebConfig | None = None
    path: str = ""

    @property
    def base(self) -> Path:
        """Return the directory that relative paths are resolved against."""
        return Path(self.path).resolve().parent if self.path else Path.cwd()

    def resolve(self, p: str) -> Path:
        """Resolve a path from the config relative to the config file."""
        return (self.base / os.path.expanduser(p)).resolve() if p else Path()


SECTIONS = {
    "daemon": DaemonConfig,
    "discovery": DiscoveryConfig,
    "site": SiteConfig,
    "ranking": RankingConfig,
    "privacy": PrivacyConfig,
    "metrics": MetricsConfig,
    "mqtt": MqttConfig,
    "logging": LoggingConfig,
    "poller": PollerConfig,
    "dnssd": DnssdConfig,
    "web": WebConfig,
}


def _parsed(t: Any) -> bool:
    """Return whether a field's type is written as a string and parsed (``parse``)."""
    return t is Mode or (isinstance(t, type) and issubclass(t, Parsed))


def _type_name(t: Any) -> str:
    if _parsed(t):
        return "a string"  # what TOML holds; the parse says what it must say
    if t is Duration:
        return 'a duration string like "90s"'
    if t is bool:
        return "a boolean"
    if t is int:
        return "an integer"
    if t is float:
        return "a number"
    if t is str:
        return "a string"
    if get_origin(t) is list:
        return f"a list of {_type_name(get_args(t)[0]).removeprefix('a ').removeprefix('an ')}s"
    return str(t)


def _convert(value: Any, t: Any) -> Any:
    """Return the value converted to type t, or raise TypeError/ValueError."""
    if _parsed(t):
        if not isinstance(value, str):
            raise TypeError
        return t.parse(value)
    if t is Duration:
        if not isinstance(value, str):
            raise TypeError
        return Duration(parse_duration(value))
    if t is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if t is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError
        return value
    if t is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {_shown(value)}")
        return number
    if t is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if get_origin(t) is list:
        if not isinstance(value, list):
            raise TypeError
        inner = get_args(t)[0]
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(v, inner))
            except ValueError as exc:
                raise _ItemError(i, str(exc)) from None
        return out
    raise TypeError  # pragma: no cover


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) and not x.is_integer() else f"{int(x)}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _section(cls: type[Any], data: Any, name: str, file: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{file}: [{name}]: expected a table")
        return cls()
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    ranges = {f.name: f.metadata["range"] for f in fields(cls) if "range" in f.metadata}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            problems.append(
                f"{file}: [{name}] {key}: unknown key (known keys: {', '.join(sorted(known))})"
            )
            continue
        t = hints[key]
        try:
            values[key] = _convert(value, t)
            if key in ranges and not ranges[key][0] <= values[key] <= ranges[key][1]:
                lo, hi = ranges[key]
                problems.append(
                    f"{file}: [{name}] {key}: expected {_type_name(t)} from {_num(lo)} to "
                    f"{_num(hi)}, got {_shown(value)}"
                )
                del values[key]
        except _ItemError as exc:
            problems.append(f"{file}: [{name}] {key}[{exc.index}]: {exc.message}")
        except ValueError as exc:
            problems.append(f"{file}: [{name}] {key}: {exc}")
        except TypeError:
            problems.append(
                f"{file}: [{name}] {key}: expected {_type_name(t)}, got {_shown(value)}"
            )
    return cls(**values)


def _check(cfg: Config, file: str, problems: list[str]) -> None:
    d = cfg.daemon
    if d.rate <= 0:
        problems.append(f"{file}: [daemon] rate: expected a positive number")
    if cfg.discovery.enabled and not cfg.discovery.interfaces:
        problems.append(
            f"{file}: [discovery] interfaces: required when discovery is enabled "
            "(there is no default interface)"
        )
    if cfg.privacy.log_ip not in ("truncated", "none"):
        problems.append(f'{file}: [privacy] log_ip: expected "truncated" or "none"')
    if cfg.privacy.retention <= 0:
        problems.append(f"{file}: [privacy] retention: expected a positive duration")
    if cfg.mqtt is not None:
        problems.extend(f"{file}: [mqtt] {p}" for p in _mqtt_problems(cfg.mqtt))
    pc = cfg.poller
    for key in ("interval", "timeout"):
        if getattr(pc, key) <= 0:
            problems.append(f"{file}: [poller] {key}: expected a positive duration")
    if pc.concurrency < 1 or pc.concurrency > 1024:
        problems.append(f"{file}: [poller] concurrency: expected an integer from 1 to 1024")
    if not 0 <= pc.jitter <= 0.5:
        problems.append(f"{file}: [poller] jitter: expected a number from 0 to 0.5")
    if cfg.dnssd is not None:
        problems.extend(f"{file}: [dnssd] {p}" for p in _dnssd_problems(cfg.dnssd))
    if cfg.web is not None:
        problems.extend(f"{file}: [web] {p}" for p in _web_problems(cfg.web))
    if cfg.logging.format not in ("kv", "json"):
        problems.append(f'{file}: [logging] format: expected "kv" or "json"')
    if cfg.logging.level.lower() not in ("debug", "info", "warning", "error"):
        problems.append(f"{file}: [logging] level: expected debug, info, warning or error")


def _mqtt_problems(m: MqttConfig) -> list[str]:
    out = []
    if not re.fullmatch(r"[^$/+#\x00]([^+#\x00]*[^/+#\x00])?", m.topic_prefix):
        out.append(
            "topic_prefix: expected topic levels without '+', '#', NUL, a leading '$' or '/' "
            f"or a trailing '/', got {_shown(m.topic_prefix)}"
        )
    if not re.fullmatch(r"[^/+#\x00]{1,128}", m.instance):
        out.append(
            f"instance: expected 1-128 characters without '/', '+' or '#', got {_shown(m.instance)}"
        )
    if not 5 <= m.keepalive <= 65535:
        out.append(f"keepalive: expected 5 to 65535 seconds, got {m.keepalive}")
    if not 256 <= m.max_payload <= 16 * 1024 * 1024:
        out.append(f"max_payload: expected 256 to 16777216 bytes, got {m.max_payload}")
    if m.rate <= 0:
        out.append("rate: expected a positive number")
    if not 0 <= m.foreign_grace <= 86400:
        out.append(f"foreign_grace: expected 0s to 24h, got {float(m.foreign_grace):g} seconds")
    if float(m.heartbeat) != 0.0 and not 0.1 <= m.heartbeat <= 3600:
        out.append(
            f"heartbeat: expected 0s (none) or 0.1s to 1h, got {float(m.heartbeat):g} seconds"
        )
    if not 1 <= m.max_foreign <= 1_000_000:
        out.append(f"max_foreign: expected 1 to 1000000, got {m.max_foreign}")
    if not 1 <= m.max_foreign_per_site <= 1_000_000:
        out.append(f"max_foreign_per_site: expected 1 to 1000000, got {m.max_foreign_per_site}")
    if m.password_file and not m.username:
        out.append("password_file: set, but username is empty")
    return out


_DNS_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)


def domain_error(name: str) -> str | None:
    """Return why a DNS domain name is not usable (LDH labels, 253 bytes at most), or None."""
    text = name.removesuffix(".")
    if not text:
        return 'required: the DNS-SD domain delegated to nearestd, like "print.example.org"'
    if len(text) > 253:
        return f"expected at most 253 characters, got {len(text)}"
    for label in text.split("."):
        if not _DNS_LABEL.fullmatch(label):
            return (
                f"expected a domain name of letters, digits and hyphens (labels of 1-63 "
                f"characters, none starting or ending with a hyphen), got {_shown(name)}"
            )
    if text.lower().endswith((".in-addr.arpa", ".ip6.arpa", ".local")) or text.lower() in (
        "arpa",
        "local",
    ):
        return f"expected a domain outside .local and the reverse-mapping trees, got {_shown(name)}"
    return None


def _dnssd_problems(c: DnssdConfig) -> list[str]:
    out = []
    if not c.listen:
        out.append("listen: expected at least one HOST:PORT")
    err = domain_error(c.domain)
    if err:
        out.append(f"domain: {err}")
    if not 1 <= c.per_type <= 32:
        out.append(f"per_type: expected an integer from 1 to 32, got {c.per_type}")
    if not 0 < c.ttl <= 10:
        out.append(
            f"ttl: expected a duration above 0 and at most 10s (RFC 8766 5.5.1), got {c.ttl:g}s"
        )
    return out


def _web_problems(w: WebConfig) -> list[str]:
    if not w.listen:
        return ["listen: expected HOST:PORT, got ''"]
    if not w.token_file and not is_loopback_host(w.listen.host):
        return [
            f"listen: {_shown(w.listen)} is not a loopback address; set token_file so that "
            "every request must carry a bearer token"
        ]
    return []


def is_loopback_host(host: str) -> bool:
    """Return whether a listen host (an address, [v6] or 'localhost') is loopback only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MAX_INT_DIGITS = 4300


def _deepest_line(text: str) -> str:
    """Return " (line N)" where brackets first nest 100 deep, ignoring quoting; or ""."""
    depth = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        for ch in line:
            depth += 1 if ch in "[{" else -1 if ch in "]}" else 0
            if depth >= 100:
                return f" (line {lineno})"
    return ""


def parse_config(text: str, file: str) -> Config:
    """Parse TOML text into a Config, or raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML: {exc}"]) from None
    except ValueError as exc:  # an integer of more than 4,300 digits (CPython's limit)
        m = re.search(r"\d{" + str(MAX_INT_DIGITS + 1) + ",}", text)
        where = f" (line {text.count(chr(10), 0, m.start()) + 1})" if m else ""
        what = f"an integer longer than {MAX_INT_DIGITS} digits" if m else str(exc)
        raise ConfigError([f"{file}: not valid TOML{where}: {what}"]) from None
    except RecursionError:
        raise ConfigError(
            [f"{file}: not valid TOML{_deepest_line(text)}: arrays or tables nested too deeply"]
        ) from None
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        cls = SECTIONS.get(name)
        if cls is None:
            problems.append(f"{file}: [{name}]: unknown section (known: {', '.join(SECTIONS)})")
            continue
        kwargs[name] = _section(cls, value, name, file, problems)
    cfg = Config(path=file, **kwargs)
    _check(cfg, file, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8").removeprefix("\ufeff")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: not UTF-8 text"]) from None
    return parse_config(text, str(p))


def section_docs() -> dict[str, list[tuple[str, str, Any]]]:
    """Return each section's (key, doc, default) for the README."""
    out: dict[str, list[tuple[str, str, Any]]] = {}
    for name, cls in SECTIONS.items():
        rows = []
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
            doc = f.metadata.get("doc", "")
            if "range" in f.metadata:
                lo, hi = f.metadata["range"]
                doc += f" From {_num(lo)} to {_num(hi)}."
            rows.append((f.name, doc, default))
        out[name] = rows
    return out

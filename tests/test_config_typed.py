"""Config strings are parsed once, when the file is read: the edges take typed parts."""

from __future__ import annotations

import ipaddress

import pytest

from nearestd.config import (
    AddressPort,
    BrokerUrl,
    Cidr,
    ConfigError,
    HostPort,
    Mode,
    SocketUrl,
    parse_config,
)


@pytest.mark.parametrize(
    ("text", "unix", "path", "host", "port"),
    [
        ("tcp://127.0.0.1:7310", False, "", "127.0.0.1", 7310),
        ("tcp://[::1]:0", False, "", "::1", 0),
        ("tcp://printers.example.org:65535", False, "", "printers.example.org", 65535),
        ("unix:///run/nearestd/q.sock", True, "/run/nearestd/q.sock", "", 0),
        ("unix://relative.sock", True, "relative.sock", "", 0),
    ],
)
def test_socket_urls(text: str, unix: bool, path: str, host: str, port: int) -> None:
    url = SocketUrl.parse(text)
    assert (url, url.unix, url.path, url.host, url.port) == (text, unix, path, host, port)


@pytest.mark.parametrize(
    "text", ["tcp://x", "tcp://x:65536", "http://x:1", "unix://", "tcp://[::1:1", "tcp://a b:1"]
)
def test_bad_socket_urls(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        SocketUrl.parse(text)


@pytest.mark.parametrize(
    ("cls", "text", "host", "port"),
    [
        (HostPort, "127.0.0.1:9464", "127.0.0.1", 9464),
        (HostPort, "[::]:80", "::", 80),
        (HostPort, "localhost:1", "localhost", 1),
        (HostPort, "", "", 0),
        (AddressPort, "127.0.0.1:53", "127.0.0.1", 53),
        (AddressPort, "[2001:db8::1]:8053", "2001:db8::1", 8053),
    ],
)
def test_host_ports(cls: type[HostPort], text: str, host: str, port: int) -> None:
    hp = cls.parse(text)
    assert (hp, hp.host, hp.port) == (text, host, port)


@pytest.mark.parametrize(
    ("cls", "text"),
    [
        (HostPort, "9464"),
        (HostPort, "x:70000"),
        (AddressPort, "localhost:53"),
        (AddressPort, "::1:53"),
        (AddressPort, ""),
    ],
)
def test_bad_host_ports(cls: type[HostPort], text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        cls.parse(text)


@pytest.mark.parametrize(
    ("text", "host", "port", "tls"),
    [
        ("mqtt://127.0.0.1:1883", "127.0.0.1", 1883, False),
        ("mqtts://broker.example.org", "broker.example.org", 8883, True),
        ("mqtt://[::1]/", "::1", 1883, False),
    ],
)
def test_broker_urls(text: str, host: str, port: int, tls: bool) -> None:
    url = BrokerUrl.parse(text)
    assert (url.host, url.port, url.tls) == (host, port, tls)


def test_cidrs_and_modes_hold_their_parsed_values() -> None:
    assert Cidr.parse("10.20.99.1/24").network == ipaddress.ip_network("10.20.99.0/24")
    assert Cidr.parse("::ffff:10.0.0.0/104").network == ipaddress.ip_network("10.0.0.0/8")
    assert Mode.parse("0660") == 0o660 and Mode.parse("640") == 0o640
    assert str(Mode(0o600)) == "0600" and repr(Mode(0o600)) == "'0600'"


def test_a_config_holds_typed_values_and_names_the_bad_item() -> None:
    cfg = parse_config(
        '[daemon]\nlisten = ["tcp://[::1]:7310"]\nadmin_mode = "0660"\n'
        'allow = ["10.0.0.1/8"]\n[metrics]\nlisten = ""\n',
        "f.toml",
    )
    assert cfg.daemon.listen[0].host == "::1" and cfg.daemon.admin_mode == 0o660
    assert cfg.daemon.allow[0].network == ipaddress.ip_network("10.0.0.0/8")
    assert not cfg.metrics.listen
    with pytest.raises(ConfigError) as ei:
        parse_config('[daemon]\nlisten = ["unix:///a", "tcp://b"]\n', "f.toml")
    assert ei.value.problems == [
        "f.toml: [daemon] listen[1]: expected tcp://HOST:PORT or unix:///PATH, got 'tcp://b'"
    ]

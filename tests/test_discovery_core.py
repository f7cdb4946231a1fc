"""The pure discovery core: TXT parsing, merging, URIs and expiry, by tables of cases."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearestd.core.discovery import (
    AddressPolicy,
    Merger,
    Problem,
    ServiceRecord,
    address_refusal,
    device_id,
    host_literal,
    instance_of,
    order_addresses,
    parse_txt,
    plain_path,
    split_txt,
)
from nearestd.core.model import DeviceKind

UUID_A = "6f1c3c1e-0000-4000-8000-00000000000a"
UUID_B = "6f1c3c1e-0000-4000-8000-00000000000b"


def txt(d: dict[str, str | None]) -> tuple[bytes, ...]:
    return tuple(k.encode() if v is None else f"{k}={v}".encode() for k, v in d.items())


def rec(
    type_: str,
    name: str,
    host: str | None = "p1.local",
    port: int = 631,
    addresses: tuple[str, ...] = ("198.18.77.12",),
    t: dict[str, str | None] | tuple[bytes, ...] = (),
    interface: str = "eth0",
) -> ServiceRecord:
    strings = txt(t) if isinstance(t, dict) else t
    return ServiceRecord(
        f"{type_}.local.",
        f"{name}.{type_}.local.",
        host,
        port,
        addresses,
        strings,
        interface=interface,
    )


# ---- TXT ---------------------------------------------------------------------------------

TXT_CASES: list[tuple[str, list[bytes], dict[str, bytes | None], set[str]]] = [
    ("plain", [b"txtvers=1", b"rp=ipp/print"], {"txtvers": b"1", "rp": b"ipp/print"}, set()),
    ("keys fold case", [b"UUID=x", b"Color=T"], {"uuid": b"x", "color": b"T"}, set()),
    ("first duplicate wins", [b"Color=T", b"color=F"], {"color": b"T"}, {Problem.DUPLICATE}),
    ("key without =", [b"Duplex"], {"duplex": None}, set()),
    ("key with empty value", [b"note="], {"note": b""}, set()),
    ("value holds =", [b"adminurl=http://x/?a=b"], {"adminurl": b"http://x/?a=b"}, set()),
    ("string without key", [b"=oops", b"ty=X"], {"ty": b"X"}, {Problem.NO_KEY}),
    ("empty record", [b""], {}, set()),
    ("non-UTF-8 value", [b"note=Caf\xe9"], {"note": b"Caf\xe9"}, {Problem.NON_UTF8}),
    ("non-ASCII key", [b"n\xf6te=x", b"ty=Y"], {"ty": b"Y"}, {Problem.BAD_KEY}),
    ("255-byte string", [b"note=" + b"x" * 250], {"note": b"x" * 250}, set()),
]


@pytest.mark.parametrize(
    ("strings", "values", "problems"),
    [c[1:] for c in TXT_CASES],
    ids=[c[0] for c in TXT_CASES],
)
def test_parse_txt(strings: list[bytes], values: dict[str, Any], problems: set[str]) -> None:
    parsed = parse_txt(strings)
    assert dict(parsed.values) == values
    assert {p for p, _ in parsed.problems} == problems


def test_txt_text_and_flags() -> None:
    t = parse_txt([b"note=Caf\xe9\x01 ", b"Color=t", b"Duplex=maybe", b"Staple"])
    assert t.text("note") == "Caf\ufffd"  # replacement char, control char gone, trimmed
    assert t.flag("color") is True
    assert t.flag("duplex") is None
    assert t.has("staple") and t.text("staple") is None
    assert t.text("absent") is None


def test_split_txt_wire() -> None:
    assert split_txt(b"\x03a=b\x00\x02cd") == ([b"a=b", b"", b"cd"], [])
    strings, problems = split_txt(b"\x03a=b\x09short")
    assert strings == [b"a=b", b"short"]
    assert problems and problems[0][0] == Problem.TRUNCATED


def test_instance_names_may_hold_dots() -> None:
    assert instance_of("HP v1.2 (A)._ipp._tcp.local.", "_ipp._tcp.local.") == "HP v1.2 (A)"
    assert instance_of("X._IPP._tcp.local.", "_universal._sub._ipp._tcp.local.") == "X"


# ---- addresses and URIs --------------------------------------------------------------------


def test_address_order_and_literals() -> None:
    addrs = ["fe80::1%3", "2001:db8::5", "169.254.1.2", "198.18.77.12"]
    assert order_addresses(addrs) == ("198.18.77.12", "169.254.1.2", "2001:db8::5", "fe80::1%3")
    assert host_literal("fe80::1%3") == "[fe80::1%253]"
    assert host_literal("2001:db8::5") == "[2001:db8::5]"
    assert host_literal("198.18.77.12") == "198.18.77.12"


URI_CASES: list[tuple[str, ServiceRecord, DeviceKind, str]] = [
    (
        "ipp with rp",
        rec("_ipp._tcp", "P", t={"rp": "ipp/print"}),
        DeviceKind.PRINTER,
        "ipp://198.18.77.12:631/ipp/print",
    ),
    ("ipp without rp", rec("_ipp._tcp", "P"), DeviceKind.PRINTER, "ipp://198.18.77.12:631/"),
    (
        "rp is quoted",
        rec("_ipp._tcp", "P", t={"rp": "printers/Main Hall"}),
        DeviceKind.PRINTER,
        "ipp://198.18.77.12:631/printers/Main%20Hall",
    ),
    (
        "raw ignores rp",
        rec("_pdl-datastream._tcp", "P", port=9100, t={"rp": "x"}),
        DeviceKind.PRINTER,
        "socket://198.18.77.12:9100",
    ),
    (
        "lpd queue",
        rec("_printer._tcp", "P", port=515, t={"rp": "lp1"}),
        DeviceKind.PRINTER,
        "lpd://198.18.77.12:515/lp1",
    ),
    (
        "escl rs absent",
        rec("_uscan._tcp", "S", port=8080),
        DeviceKind.SCANNER,
        "http://198.18.77.12:8080/eSCL/",
    ),
    (
        "escl rs empty",
        rec("_uscan._tcp", "S", port=8080, t={"rs": ""}),
        DeviceKind.SCANNER,
        "http://198.18.77.12:8080/",
    ),
    (
        "escl rs slashes",
        rec("_uscans._tcp", "S", port=443, t={"rs": "/eSCL/"}),
        DeviceKind.SCANNER,
        "https://198.18.77.12:443/eSCL/",
    ),
    (
        "ipv6 link-local",
        rec("_ipp._tcp", "P", addresses=("fe80::1%2",)),
        DeviceKind.PRINTER,
        "ipp://[fe80::1%252]:631/",
    ),
    (
        "no address: the host",
        rec("_ipp._tcp", "P", addresses=()),
        DeviceKind.PRINTER,
        "ipp://p1.local:631/",
    ),
]


@pytest.mark.parametrize(
    ("record", "kind", "uri"), [c[1:] for c in URI_CASES], ids=[c[0] for c in URI_CASES]
)
def test_uri(record: ServiceRecord, kind: DeviceKind, uri: str) -> None:
    # A daemon whose links have only link-local addresses accepts link-local devices.
    m = Merger(policy=AddressPolicy(link_local_ok=True))
    changes, _ = m.upsert(record, 0.0)
    [change] = changes
    assert change.device is not None
    assert change.device.kind is kind
    assert change.device.uri == uri
    # The .local host stays in the endpoint list for clients that resolve it.
    if record.host and record.addresses:
        assert any(".local:" in e.uri for e in change.device.endpoints)


# ---- merging -------------------------------------------------------------------------------


def merged(records: list[ServiceRecord]) -> list[Any]:
    m = Merger()
    for r in records:
        m.upsert(r, 0.0)
    return sorted(m.devices(), key=lambda d: d.id)


def test_one_printer_on_ipp_ipps_and_placeholder_lpd() -> None:
    t = {"UUID": UUID_A, "rp": "ipp/print", "Color": "T", "note": "Lab 7"}
    devices = merged(
        [
            rec("_ipp._tcp", "Lab Printer", t=t),
            rec("_ipps._tcp", "Lab Printer", port=443, t=t),
            rec("_printer._tcp", "Lab Printer", port=0, t={"UUID": UUID_A}),
        ]
    )
    [d] = devices
    assert d.id == f"mdns-printer-{UUID_A}"
    assert d.uri == "ipps://198.18.77.12:443/ipp/print"
    assert [e.service for e in d.endpoints] == ["ipps", "ipps", "ipp", "ipp"]
    assert d.capabilities.secure and d.capabilities.color
    assert d.note == "Lab 7"


MERGE_CASES: list[tuple[str, list[ServiceRecord], int]] = [
    (
        "same name on two types and two hosts, no UUID: apart",
        [rec("_ipp._tcp", "Twin", host="a.local"), rec("_ipps._tcp", "Twin", host="b.local")],
        2,
    ),
    (
        "same name and host on two links, no UUID: apart",
        [rec("_ipp._tcp", "Twin", interface="eth0"), rec("_ipp._tcp", "Twin", interface="eth1")],
        2,
    ),
    (
        "same UUID on two links: one",
        [
            rec("_ipp._tcp", "A", t={"UUID": UUID_A}, interface="eth0"),
            rec("_ipp._tcp", "A", t={"UUID": UUID_A}, interface="eth1"),
        ],
        1,
    ),
    (
        "same name and host, different UUIDs: apart",
        [
            rec("_ipp._tcp", "Q", t={"UUID": UUID_A}),
            rec("_ipps._tcp", "Q", t={"UUID": UUID_B}),
        ],
        2,
    ),
    (
        "a service without UUID joins its named sibling",
        [rec("_ipp._tcp", "Q", t={"UUID": UUID_A}), rec("_pdl-datastream._tcp", "Q", port=9100)],
        1,
    ),
    (
        "UUID case and urn prefix",
        [
            rec("_ipp._tcp", "A", t={"UUID": UUID_A.upper()}),
            rec("_ipps._tcp", "B", host="x.local", t={"uuid": f"urn:uuid:{UUID_A}"}),
        ],
        1,
    ),
    (
        "an MFP is a printer and a scanner",
        [
            rec("_ipp._tcp", "MFP", t={"UUID": UUID_A}),
            rec("_uscan._tcp", "MFP", t={"UUID": UUID_A}),
        ],
        2,
    ),
    ("port-0 placeholder alone: no device", [rec("_printer._tcp", "P", port=0)], 0),
    ("_scanner._tcp alone is only a hint", [rec("_scanner._tcp", "S", port=0)], 0),
    (
        "a CUPS queue is not merged with the device",
        [
            rec("_ipp._tcp", "P", t={"UUID": UUID_A}),
            rec("_ipps._tcp", "P", t={"printer-type": "0x1234"}),
        ],
        2,
    ),
]


@pytest.mark.parametrize(
    ("records", "n"), [c[1:] for c in MERGE_CASES], ids=[c[0] for c in MERGE_CASES]
)
def test_merge(records: list[ServiceRecord], n: int) -> None:
    assert len(merged(records)) == n


def test_queue_marking_by_key_and_subtype() -> None:
    m = Merger()
    m.upsert(rec("_ipp._tcp", "Shared", t={"printer-type": "0x801046"}), 0.0)
    m.upsert(rec("_ipp._tcp", "Other", host="o.local"), 0.0)
    m.set_flag("eth0", "Other._ipp._tcp.local.", "cups", True)
    assert all(d.is_queue for d in m.devices())
    assert all("-queue-" in d.id for d in m.devices())


def test_scanner_capabilities() -> None:
    [d] = merged(
        [
            rec(
                "_uscans._tcp",
                "Scan",
                port=443,
                t={"is": "platen,adf", "duplex": "T", "cs": "color,grayscale", "ty": "Acme S1"},
            )
        ]
    )
    caps = d.capabilities
    assert (caps.adf, caps.duplex, caps.color, caps.secure) == (True, True, True, True)
    assert d.make_model == "Acme S1"


def test_printer_capabilities_and_make_model() -> None:
    [d] = merged(
        [rec("_ipp._tcp", "P", t={"PaperMax": "tabloid-A3", "Duplex": "T", "product": "(Acme P)"})]
    )
    assert d.capabilities.paper_max == "tabloid-A3" and d.capabilities.duplex
    assert not d.capabilities.secure and not d.capabilities.color
    assert d.make_model == "Acme P"


def test_broken_txt_keeps_the_device() -> None:
    strings = (
        b"=x",
        b"UUID=" + UUID_A.encode(),
        b"note=\xff\xfe",
        b"note=second",
        b"PaperMax=huge",
    )
    m = Merger()
    changes, parsed = m.upsert(rec("_ipp._tcp", "Broken", t=strings), 0.0)
    assert parsed is not None
    kinds = {p for p, _ in parsed.problems}
    assert kinds == {Problem.NO_KEY, Problem.NON_UTF8, Problem.DUPLICATE, Problem.BAD_PAPER}
    [c] = changes
    assert c.device is not None and c.device.uuid == UUID_A
    assert c.device.capabilities.paper_max is None
    assert c.device.note == "\ufffd\ufffd"


def test_unsafe_uuid_is_hashed_into_the_id() -> None:
    [d] = merged([rec("_ipp._tcp", "P", t={"UUID": "../../etc"})])
    assert d.id.startswith("mdns-printer-") and "/" not in d.id
    assert device_id(DeviceKind.PRINTER, ("u", "d", UUID_A)) == f"mdns-printer-{UUID_A}"


def test_lifecycle_changes() -> None:
    m = Merger()
    a = rec("_ipp._tcp", "P", t={"UUID": UUID_A, "note": "one"})
    [c] = m.upsert(a, 0.0)[0]
    assert c.device is not None
    assert m.upsert(a, 1.0)[0] == []  # a re-announcement changes nothing
    [c] = m.upsert(rec("_ipp._tcp", "P", t={"UUID": UUID_A, "note": "two"}), 2.0)[0]
    assert c.device is not None and c.device.note == "two"
    [c] = m.upsert(
        rec("_ipp._tcp", "P", t={"UUID": UUID_A, "note": "two"}, addresses=("198.18.77.13",)), 3.0
    )[0]
    assert c.device is not None and c.device.uri.startswith("ipp://198.18.77.13:")
    m.upsert(rec("_ipps._tcp", "P", t={"UUID": UUID_A}), 4.0)
    [c] = m.remove("eth0", "_ipps._tcp.local.", "P._ipps._tcp.local.")
    assert c.device is not None and c.device.uri.startswith("ipp://")
    [c] = m.remove("eth0", "_ipp._tcp.local.", "p._IPP._tcp.local.")
    assert c.device is None and c.device_id == f"mdns-printer-{UUID_A}"
    assert len(m) == 0 and not m.services


def test_expiry_and_probes() -> None:
    m = Merger()
    m.upsert(rec("_ipp._tcp", "Quiet", host="quiet.local"), 0.0)
    m.upsert(rec("_ipp._tcp", "Chatty", host="chatty.local"), 0.0)
    assert m.due_probes(2.0, 3.0) == []
    assert m.due_probes(3.0, 3.0) == [
        ("eth0", "_ipp._tcp.local.", "Quiet._ipp._tcp.local."),
        ("eth0", "_ipp._tcp.local.", "Chatty._ipp._tcp.local."),
    ]
    assert m.due_probes(4.0, 3.0) == []  # asked already
    m.hear("eth0", "chatty.local.", 5.0)  # its A record answered
    m.hear("eth1", "quiet.local.", 5.0)  # another link: not this one
    assert m.expire(9.0, 10.0) == []
    [gone] = m.expire(10.0, 10.0)
    assert gone.device is None and [d.name for d in m.devices()] == ["Chatty"]
    m.hear("eth0", "Chatty._ipp._tcp.local.", 14.0)
    assert m.expire(20.0, 10.0) == []
    assert m.device_heard() == {m.devices()[0].id: 14.0}


def test_max_devices_bounds_new_devices_only() -> None:
    m = Merger(max_devices=2)
    for i in range(4):
        m.upsert(rec("_ipp._tcp", f"P{i}", host=f"p{i}.local", t={"UUID": f"u{i}"}), 0.0)
    assert len(m) == 2 and m.refused == 2
    # Another service of a known device still joins it.
    changes, _ = m.upsert(rec("_ipps._tcp", "P0", host="p0.local", t={"UUID": "u0"}), 0.0)
    assert changes and len(m) == 2


def test_an_expired_service_that_speaks_again_is_resolved_again() -> None:
    m = Merger()
    m.upsert(rec("_ipp._tcp", "Sleeper", host="sleeper.local"), 0.0)
    [gone] = m.expire(10.0, 10.0)
    assert gone.device is None
    assert m.hear("eth1", "Sleeper._ipp._tcp.local.", 11.0) is None  # another link
    assert m.hear("eth0", "sleeper._ipp._tcp.local.", 11.0) == (
        "_ipp._tcp.local.",
        "Sleeper._ipp._tcp.local.",
    )
    assert m.hear("eth0", "Sleeper._ipp._tcp.local.", 12.0) is None  # asked once


def test_a_host_name_unfit_for_a_uri_gives_no_endpoint() -> None:
    [d] = merged([rec("_ipp._tcp", "P", host="evil host/x.local")])
    assert [e.uri for e in d.endpoints] == ["ipp://198.18.77.12:631/"]


def test_ipv6_endpoints_and_unscoped_link_local() -> None:
    m = Merger(policy=AddressPolicy(link_local_ok=True))
    m.upsert(rec("_ipp._tcp", "P6", addresses=("fe80::9", "2001:db8::5", "198.18.77.12")), 0.0)
    [d] = m.devices()
    uris = [e.uri for e in d.endpoints]
    assert uris == [
        "ipp://198.18.77.12:631/",
        "ipp://[2001:db8::5]:631/",
        "ipp://p1.local:631/",
    ]
    assert d.addresses == ("198.18.77.12", "2001:db8::5", "fe80::9")


def test_a_service_nobody_can_reach_is_no_device_and_endpoints_are_unique() -> None:
    assert merged([rec("_ipp._tcp", "P", host="bad host", addresses=("fe80::9",))]) == []
    same = {"UUID": UUID_A}
    [d] = merged(
        [
            rec("_ipp._tcp", "P", t=same, interface="eth0"),
            rec("_ipp._tcp", "P", t=same, interface="eth1"),
        ]
    )
    assert [e.uri for e in d.endpoints] == ["ipp://198.18.77.12:631/", "ipp://p1.local:631/"]


# ---- incremental merging equals merging from scratch -----------------------------------------

TYPES = ["_ipp._tcp", "_ipps._tcp", "_printer._tcp", "_pdl-datastream._tcp", "_uscan._tcp"]


@st.composite
def service(draw: Any) -> ServiceRecord:
    txt: dict[str, str | None] = {}
    uuid = draw(st.sampled_from([None, UUID_A, UUID_B, UUID_A.upper()]))
    if uuid:
        txt["UUID"] = uuid
    if draw(st.booleans()):
        txt["note"] = draw(st.sampled_from(["Lab", "Hall"]))
    if draw(st.integers(0, 5)) == 0:
        txt["printer-type"] = "0x1"
    return rec(
        draw(st.sampled_from(TYPES)),
        draw(st.sampled_from(["A", "B", "a"])),
        host=draw(st.sampled_from(["h1.local", "h2.local"])),
        port=draw(st.sampled_from([0, 631])),
        # Every service shares one address, so no UUID claim is another host's: those
        # depend on who came first, by design (see the UUID binding tests).
        addresses=draw(st.sampled_from([("198.18.77.12",), ("2001:db8::1", "198.18.77.12")])),
        t=txt,
        interface=draw(st.sampled_from(["eth0", "eth1"])),
    )


ops = st.lists(st.tuples(st.booleans(), service()), min_size=1, max_size=25)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_incremental_merge_equals_a_fresh_merge(steps: list[tuple[bool, ServiceRecord]]) -> None:
    m = Merger()
    shown: dict[str, Any] = {}
    for remove, r in steps:
        changes = m.remove(r.interface, r.type, r.name) if remove else m.upsert(r, 0.0)[0]
        for c in changes:  # what the device table sees
            if c.device is None:
                shown.pop(c.device_id, None)
            else:
                shown[c.device_id] = c.device
        live = [p.record for p in m.services.values()]
        for order in (live, live[::-1]):
            fresh = Merger()
            for x in order:
                fresh.upsert(x, 0.0)
            assert sorted(fresh.devices(), key=lambda d: d.id) == sorted(
                m.devices(), key=lambda d: d.id
            )
        assert shown == {d.id: d for d in m.devices()}


# ---- addresses and paths a device may have ------------------------------------------------

OWN = AddressPolicy(own=frozenset({"198.18.77.11", "2001:db8:77::11"}))
ADDRESS_CASES: list[tuple[str, AddressPolicy, str | None]] = [
    ("198.18.77.12", OWN, None),
    ("2001:db8:77::12", OWN, None),
    ("127.0.0.1", OWN, "loopback"),
    ("127.8.9.10", OWN, "loopback"),
    ("::1", OWN, "loopback"),
    ("::ffff:127.0.0.1", OWN, "loopback"),
    ("0.0.0.0", OWN, "unspecified"),
    ("::", OWN, "unspecified"),
    ("224.0.0.251", OWN, "multicast"),
    ("ff02::fb", OWN, "multicast"),
    ("255.255.255.255", OWN, "broadcast"),
    ("169.254.7.7", OWN, "link-local"),
    ("fe80::1%eth0", OWN, "link-local"),
    ("169.254.7.7", AddressPolicy(link_local_ok=True), None),
    ("fe80::1%eth0", AddressPolicy(link_local_ok=True), None),
    ("198.18.77.11", OWN, "own-address"),
    ("::ffff:198.18.77.11", OWN, "own-address"),
    ("2001:db8:77::11", OWN, "own-address"),
    ("printer.local", OWN, "not-an-address"),
]


@pytest.mark.parametrize(("addr", "policy", "reason"), ADDRESS_CASES)
def test_address_refusal(addr: str, policy: AddressPolicy, reason: str | None) -> None:
    assert address_refusal(addr, policy) == reason


def test_a_device_announced_only_at_refused_addresses_is_never_made() -> None:
    m = Merger(policy=OWN)
    for bad in (("127.0.0.1",), ("0.0.0.0", "224.0.0.1"), ("198.18.77.11",), ("169.254.1.1",)):
        changes, parsed = m.upsert(rec("_ipp._tcp", "Rogue", addresses=bad), 0.0)
        assert changes == [] and parsed is None
    assert m.devices() == []
    assert m.refused_by == {
        "address-loopback": 1,
        "address-unspecified": 1,
        "address-multicast": 1,
        "address-own-address": 1,
        "address-link-local": 1,
    }
    # Announced again: counted once per service and reason.
    m.upsert(rec("_ipp._tcp", "Rogue", addresses=("127.0.0.1",)), 1.0)
    assert m.refused_by["address-loopback"] == 1


def test_refused_addresses_are_trimmed_and_a_move_to_loopback_removes() -> None:
    m = Merger(policy=OWN)
    [ch] = m.upsert(rec("_ipp._tcp", "P", addresses=("127.0.0.1", "198.18.77.12")), 0.0)[0]
    assert ch.device is not None and ch.device.addresses == ("198.18.77.12",)
    assert all("127.0.0.1" not in e.uri for e in ch.device.endpoints)
    [gone] = m.upsert(rec("_ipp._tcp", "P", addresses=("127.0.0.1",)), 1.0)[0]
    assert gone.device is None and m.devices() == []


def test_only_mdns_host_names_become_endpoints() -> None:
    for host, expect in (("p1.local", True), ("localhost", False), ("evil.example", False)):
        [d] = merged([rec("_ipp._tcp", "P", host=host)])
        assert any(host in e.uri for e in d.endpoints) is expect, host


PATH_CASES: list[tuple[str | None, str | None]] = [
    (None, "/"),
    ("", "/"),
    ("/", "/"),
    ("ipp/print", "/ipp/print"),
    ("/ipp/print/", "/ipp/print"),
    ("printers/Main Hall", "/printers/Main%20Hall"),
    ("eSCL", "/eSCL"),
    ("../../etc/passwd", None),
    ("ipp/../x", None),
    ("./x", None),
    ("admin/secret?token=1", None),
    ("x#frag", None),
    ("a%2e%2e", None),
    ("a//b", None),
    ("//evil.example/x", None),
    ("a\\b", None),
    ("ipp/\x00print", None),
    ("ipp/\x1bprint", None),
    ("ipp/\x7f", None),
    ("x" * 300, None),
]


@pytest.mark.parametrize(("text", "path"), PATH_CASES)
def test_plain_path(text: str | None, path: str | None) -> None:
    assert plain_path(text) == path


@pytest.mark.parametrize(
    ("type_", "key", "value"),
    [
        ("_ipp._tcp", "rp", "../../etc/passwd"),
        ("_ipps._tcp", "rp", "ipp/print?x=1"),
        ("_uscan._tcp", "rs", "admin/secret?token=1"),
        ("_uscans._tcp", "rs", "eSCL/%2e%2e"),
    ],
)
def test_a_bad_request_path_gives_no_device_and_a_problem(type_: str, key: str, value: str) -> None:
    m = Merger()
    changes, parsed = m.upsert(rec(type_, "P", t={key: value}), 0.0)
    assert changes == [] and m.devices() == []
    assert parsed is not None and Problem.BAD_PATH in {k for k, _ in parsed.problems}


@pytest.mark.parametrize("mark", ["\u202e", "\u202a", "\u2066", "\u2069", "\u200e", "\u200f"])
def test_bidi_controls_are_stripped_from_names_like_control_characters(mark: str) -> None:
    [d] = merged([rec("_ipp._tcp", f"Finance{mark}txt.exe", t={"note": f"Lab{mark}7"})])
    assert mark not in d.name and d.name == "Finance txt.exe"
    assert d.note == "Lab 7"

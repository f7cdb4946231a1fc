"""Property-based fuzzing of every parser (bounded here; ``make fuzz`` runs 10^6 per harness and
reports the slowest input: speed is measured there, not asserted here)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_harness as fh
from nearest_wire import encode_frame, encode_payload

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

requests = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, "1", None]), "id": st.integers(-2, 2**64 - 1)},
    optional={
        "op": st.sampled_from(["nearest", "locate", "devices", "ping", "stats", "x", ""]),
        "kind": st.sampled_from(["printer", "scanner", "fax", 1]),
        "k": st.integers(-1, 25),
        "need": st.dictionaries(
            st.sampled_from(["color", "duplex", "adf", "secure", "paper", "state", "zz"]),
            st.one_of(st.booleans(), st.sampled_from(["A4", "A3", "any", "x"]), st.none()),
            max_size=4,
        ),
        "client_ip": st.one_of(st.ip_addresses().map(str), st.text(max_size=70)),
        "zone": st.one_of(st.sampled_from(["n1-finance", "s1-east", "nope"]), st.text(max_size=5)),
        "site": st.text(max_size=5),
        "reply_to": st.text(max_size=10),
    },
)
values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(),
        st.binary(),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=30,
)


@FAST
@given(
    st.lists(
        st.one_of(requests, st.dictionaries(st.text(max_size=8), values, max_size=6)), max_size=4
    ),
    st.binary(max_size=64),
)
def test_frames_structured(reqs: list[dict[str, object]], junk: bytes) -> None:
    stream = b"".join(encode_frame(r) for r in reqs) + junk
    fh.frames(stream)


@FAST
@given(st.binary(max_size=600))
def test_frames_bytes(data: bytes) -> None:
    fh.frames(data)


@FAST
@given(st.one_of(requests, st.dictionaries(st.text(max_size=8), values, max_size=6)))
def test_mqtt_payloads_structured(req: dict[str, object]) -> None:
    try:
        text = json.dumps(req).encode()
    except (TypeError, ValueError):
        text = b"{}"
    fh.mqtt_payloads(b"\x00" + text)
    fh.mqtt_payloads(b"\x02" + encode_payload(req))


@FAST
@given(st.binary(max_size=400))
def test_mqtt_payloads_bytes(data: bytes) -> None:
    fh.mqtt_payloads(data)


@FAST
@given(
    st.fixed_dictionaries(
        {"v": st.sampled_from([1, 2]), "id": st.sampled_from(["d1", "mdns-printer-x"])},
        optional={
            "origin": st.text(max_size=10),
            "kind": st.sampled_from(["printer", "scanner", "fax"]),
            "name": st.text(max_size=30),
            "uri": st.sampled_from(["ipp://h/p", "javascript:x", "ipps://10.0.0.1/ipp"]),
            "state": st.sampled_from(["idle", "stopped", "weird"]),
            "state_reasons": st.lists(st.text(max_size=10), max_size=3),
            "capabilities": st.dictionaries(st.text(max_size=8), values, max_size=3),
            "placement": st.dictionaries(st.text(max_size=8), values, max_size=6),
        },
    )
)
def test_mqtt_federated_records(record: dict[str, object]) -> None:
    try:
        payload = json.dumps(record).encode()
    except (TypeError, ValueError):
        return
    fh.mqtt_payloads(b"\x01" + payload)


@FAST
@given(
    st.integers(0, 255),
    st.text(max_size=70),
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.tuples(
                st.sampled_from(
                    [
                        b"ty",
                        b"note",
                        b"uuid",
                        b"color",
                        b"duplex",
                        b"papermax",
                        b"rp",
                        b"pdl",
                        b"product",
                        b"is",
                        b"cs",
                        b"printer-type",
                        b"adminurl",
                    ]
                ),
                st.binary(max_size=60),
            ).map(lambda kv: kv[0] + b"=" + kv[1]),
        ),
        max_size=12,
    ),
    st.binary(max_size=8),
)
def test_txt_records(flags: int, name: str, strings: list[bytes], tail: bytes) -> None:
    raw_name = name.encode()[:255]
    wire = b"".join(bytes([min(len(s), 255)]) + s[:255] for s in strings) + tail
    fh.txt_records(bytes([flags, len(raw_name)]) + raw_name + wire)


@FAST
@given(st.binary(max_size=300))
def test_txt_records_bytes(data: bytes) -> None:
    fh.txt_records(data)


@FAST
@given(
    st.one_of(
        st.ip_addresses().map(str),
        st.ip_addresses(network="10.20.0.0/16").map(str),
        st.ip_addresses(network="2001:db8:20::/48").map(str),
        st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
        st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
        st.text(alphabet="0123456789abcdefABCDEF:.%/ x", max_size=45),
    )
)
def test_addresses(text: str) -> None:
    fh.addresses(text.encode())


@pytest.mark.parametrize("name", sorted(fh.HARNESSES))
def test_every_seed_passes(name: str) -> None:
    seeds = fh.seeds()[name]
    assert seeds
    for seed in seeds:
        fh.HARNESSES[name](seed)


@FAST
@given(st.integers(0, 3), st.binary(max_size=600))
def test_dns_packets_bytes(flags: int, data: bytes) -> None:
    fh.dns_packets(bytes([flags]) + data)


@FAST
@given(st.randoms(use_true_random=False))
def test_dns_packets_structured(rng: object) -> None:
    fh.dns_packets(fh.structured("dns_packets", rng))  # type: ignore[arg-type]


@FAST
@given(st.integers(0, 255), st.binary(max_size=800))
def test_poll_replies_bytes(step: int, data: bytes) -> None:
    fh.poll_replies(bytes([step]) + data)


@FAST
@given(st.integers(0, 255), st.sampled_from(fh.seeds()["poll_replies"]), st.binary(max_size=8), st.integers(0, 400))
def test_poll_replies_spliced(step: int, seed: bytes, junk: bytes, at: int) -> None:
    body = seed[1:]
    fh.poll_replies(bytes([step]) + body[:at] + junk + body[at:])

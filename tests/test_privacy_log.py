"""The location log: keyed pseudonyms, retention, key rotation, cap, export and erase."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearestd.core.privacy import PSEUDONYM_BYTES, LocationLog
from nearestd.logs import AddressScrubber, KeyValueFormatter, client_label, scrub

KEY = b"k" * 32


def make(retention: float = 60.0, cap: int = 1000, now: float = 1000.0) -> LocationLog:
    return LocationLog(retention, cap, secrets.token_bytes(32), now)


def test_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="256 bits"):
        LocationLog(60, 10, b"x" * 31, 0.0)
    log = make()
    with pytest.raises(ValueError, match="256 bits"):
        log.rotate(b"x" * 16, 1.0)


def test_entry_holds_no_ip_and_pseudonym_is_keyed_hmac() -> None:
    log = LocationLog(60, 10, KEY, 0.0)
    p = log.record("10.20.23.7", "n1-finance", "nearest", ("prn-a",), 1.0)
    assert p == hmac.new(KEY, b"10.20.23.7", hashlib.sha256).digest()[:PSEUDONYM_BYTES]
    assert p != hashlib.sha256(b"10.20.23.7").digest()[:PSEUDONYM_BYTES]
    (entry,) = log.entries()
    assert "10.20.23.7" not in repr(entry)
    assert entry.to_export() == {
        "ts": 1.0,
        "zone": "n1-finance",
        "op": "nearest",
        "devices": ["prn-a"],
    }


def test_entries_older_than_retention_are_purged() -> None:
    log = make(retention=10.0, now=0.0)
    for t in range(20):
        log.record("10.0.0.1", "z", "nearest", (), float(t))
    assert log.purge(15.0) == 6  # ts 0..5 are <= 15 - 10
    assert len(log) == 14
    assert all(e.ts > 5.0 for e in log.entries())
    assert log.purged == 6
    log.purge(100.0)
    assert len(log) == 0


def test_cap_drops_oldest_first_and_counts() -> None:
    log = make(cap=5)
    for i in range(8):
        log.record(f"10.0.0.{i}", "z", "nearest", (), 1000.0 + i)
    assert len(log) == 5
    assert log.dropped == 3
    assert [e.ts for e in log.entries()] == [1003.0, 1004.0, 1005.0, 1006.0, 1007.0]
    assert log.export("10.0.0.0") == []
    assert len(log.export("10.0.0.7")) == 1


def test_export_and_erase_by_ip_across_epochs() -> None:
    log = make(retention=100.0, now=0.0)
    log.record("2001:db8::1", "z1", "nearest", ("d1",), 1.0)
    log.record("2001:db8::2", "z2", "nearest", ("d2",), 2.0)
    log.rotate(secrets.token_bytes(32), 3.0)
    log.record("2001:db8::1", "z3", "locate", (), 4.0)
    got = log.export("2001:db8::1")
    assert [e["zone"] for e in got] == ["z1", "z3"]
    assert log.erase("2001:db8::1") == 2
    assert log.export("2001:db8::1") == []
    assert len(log.export("2001:db8::2")) == 1


def test_rotation_makes_pseudonyms_unlinkable_and_destroys_the_old_key() -> None:
    log = make(retention=10.0, now=0.0)
    before = log.record("10.9.8.7", "z", "nearest", (), 1.0)
    old_key = log._epochs[0].key
    assert old_key is not None
    assert log.needs_rotation(10.0)
    log.rotate(secrets.token_bytes(32), 10.0)
    after = log.record("10.9.8.7", "z", "nearest", (), 11.0)
    assert before != after
    # The old key is kept while its entry lives, so export still finds both.
    assert log.keys_held == 2
    assert len(log.export("10.9.8.7")) == 2
    log.purge(11.5)  # the entry of epoch 0 (ts 1) is older than 10 s
    assert log.keys_held == 1
    assert old_key == bytearray(32), "the dropped key must be overwritten with zeros"
    assert len(log.export("10.9.8.7")) == 1
    # Without the destroyed key nothing links the old pseudonym to the address.
    candidates = [f"10.9.8.{i}" for i in range(256)]
    assert before not in {log.pseudonym(c) for c in candidates}


def test_same_ip_same_pseudonym_within_an_epoch() -> None:
    log = make()
    assert log.record("10.1.1.1", "z", "nearest", (), 1000.0) == log.record(
        "10.1.1.1", "z", "locate", (), 1001.0
    )


def test_record_action_holds_the_count_and_no_pseudonym() -> None:
    log = make()
    log.record_action("privacy.erase", 3, 1000.0)
    (e,) = log.entries()
    assert (e.op, e.devices, e.pseudonym, e.zone) == ("privacy.erase", ("3",), b"", None)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 7), st.floats(0, 5, allow_nan=False), st.booleans()),
        max_size=60,
    ),
    st.floats(0.5, 10, allow_nan=False),
)
def test_log_model(events: list[tuple[int, float, bool]], retention: float) -> None:
    """Property: the log equals a plain list model under records, rotations and purges."""
    log = LocationLog(retention, 25, secrets.token_bytes(32), 0.0)
    model: list[tuple[float, str]] = []
    now = 0.0
    for who, dt, rotate in events:
        now += dt
        ip = f"10.0.0.{who}"
        log.record(ip, "z", "nearest", (), now)
        model.append((now, ip))
        model = model[-25:]
        if rotate and log.needs_rotation(now):
            log.rotate(secrets.token_bytes(32), now)
        log.purge(now)
        model = [(t, i) for t, i in model if t > now - retention]
        assert len(log) == len(model)
        assert log.keys_held <= 2 + int(retention == 0)
    for who in range(8):
        ip = f"10.0.0.{who}"
        assert len(log.export(ip)) == sum(1 for _, i in model if i == ip)


def test_client_label_truncates() -> None:
    assert client_label("10.20.23.77", "truncated") == "10.20.23.0/24"
    assert client_label("2001:db8:20:23::77", "truncated") == "2001:db8:20::/48"
    assert client_label("::ffff:10.1.2.3", "truncated") == "10.1.2.0/24"
    assert client_label("10.20.23.77", "none") == "-"
    assert client_label(None, "truncated") == "-"


@pytest.mark.parametrize(
    ("text", "truncated", "none"),
    [
        ("from 127.5.6.7.", "from 127.5.6.0/24.", "from -."),
        ("peer ('10.1.2.3', 5555)", "peer ('10.1.2.0/24', 5555)", "peer ('-', 5555)"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1::/48", "-"),
        ("::ffff:10.1.2.3", "10.1.2.0/24", "-"),
        ("fe80::1%eth0 up", "fe80::/48 up", "- up"),
        ("net 10.1.2.0/24 ok", "net 10.1.2.0/24 ok", "net - ok"),
        ("net 10.1.2.0/25", "net 10.1.2.0/24", "net -"),
        ("ts=2026-11-27T09:48:01.123Z", "ts=2026-11-27T09:48:01.123Z", None),
        ("version 1.2.3.4.5", "version 1.2.3.4.5", None),
        ("bind 0.0.0.0 and ::", "bind 0.0.0.0 and ::", None),
    ],
)
def test_scrub(text: str, truncated: str, none: str | None) -> None:
    assert scrub(text, "truncated") == truncated
    assert scrub(text, "none") == (none if none is not None else truncated)


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(), st.text(max_size=20), st.text(max_size=20))
def test_scrub_never_lets_a_full_address_through(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, before: str, after: str
) -> None:
    if addr.is_unspecified:
        return
    text = f"{before} {addr} {after}"
    out = scrub(text, "none")
    assert str(addr) not in out.replace(before, "").replace(after, "")


def test_scrubber_rewrites_message_and_fields_but_not_device_addresses() -> None:
    record = logging.LogRecord("x", logging.INFO, "f", 1, "client %s asked", ("10.7.7.7",), None)
    record.client = "10.7.7.7"
    record.uri = "ipp://10.20.23.50:631/ipp/print"
    AddressScrubber("none").filter(record)
    line = KeyValueFormatter().format(record)
    assert "10.7.7.7" not in line
    assert "client=-" in line
    assert "uri=ipp://10.20.23.50:631/ipp/print" in line

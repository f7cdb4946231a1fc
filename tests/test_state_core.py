"""Pure tests: the IPP codec, state decisions, geo: URIs, eSCL status, the backoff schedule."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearestd.core import ipp
from nearestd.core.ipp import IppDecodeError, decode_response, encode_get_printer_attributes
from nearestd.core.model import Device, DeviceKind, DeviceState, Supply
from nearestd.core.state import (
    PRINTER_ATTRIBUTES,
    Live,
    StatusError,
    next_delay,
    overlay,
    parse_geo_uri,
    poll_target,
    printer_live,
    scanner_live,
    unreachable,
)


def attr(tag: int, name: str, value: bytes) -> bytes:
    n = name.encode()
    return struct.pack(">BH", tag, len(n)) + n + struct.pack(">H", len(value)) + value


def response(*attrs: bytes, status: int = 0, group: int = ipp.TAG_PRINTER) -> bytes:
    head = struct.pack(">BBHI", 2, 0, status, 7) + bytes([ipp.TAG_OPERATION])
    head += attr(ipp.TAG_CHARSET, "attributes-charset", b"utf-8")
    return head + bytes([group]) + b"".join(attrs) + bytes([ipp.TAG_END])


def enum(name: str, v: int) -> bytes:
    return attr(ipp.TAG_ENUM, name, struct.pack(">i", v))


def kw(name: str, *values: str) -> bytes:
    out = attr(ipp.TAG_KEYWORD, name, values[0].encode())
    for v in values[1:]:
        out += attr(ipp.TAG_KEYWORD, "", v.encode())
    return out


# ---- codec --------------------------------------------------------------------------------


def test_request_asks_for_each_attribute_explicitly() -> None:
    data = encode_get_printer_attributes("ipp://h:631/ipp/print", 5, PRINTER_ATTRIBUTES)
    assert data[:8] == struct.pack(">BBHI", 1, 1, ipp.GET_PRINTER_ATTRIBUTES, 5)
    # The request decodes with the same grammar: operation group holds every attribute.
    decoded = decode_response(data)
    assert decoded.operation["requested-attributes"] == PRINTER_ATTRIBUTES
    assert decoded.operation["printer-uri"] == ("ipp://h:631/ipp/print",)
    assert "printer-geo-location" in PRINTER_ATTRIBUTES
    assert "printer-is-accepting-jobs" in PRINTER_ATTRIBUTES


def test_request_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="request_id"):
        encode_get_printer_attributes("ipp://h/", 0, ["printer-state"])
    with pytest.raises(ValueError, match="65535"):
        encode_get_printer_attributes("ipp://h/" + "x" * 70000, 1, ["printer-state"])


def test_decodes_values_of_each_syntax() -> None:
    lang = struct.pack(">H", 2) + b"en" + struct.pack(">H", 5) + b"Hallo"
    data = response(
        enum("printer-state", 4),
        kw("printer-state-reasons", "media-empty-error", "toner-low-warning"),
        attr(ipp.TAG_BOOLEAN, "printer-is-accepting-jobs", b"\x00"),
        attr(0x12, "printer-geo-location", b""),
        attr(ipp.TAG_TEXT_WITH_LANGUAGE, "printer-location", lang),
        attr(ipp.TAG_INTEGER, "marker-levels", struct.pack(">i", -2)),
        attr(ipp.TAG_INTEGER, "", struct.pack(">i", 40)),
    )
    r = decode_response(data)
    assert r.ok and r.request_id == 7
    assert r.printer["printer-state"] == (4,)
    assert r.printer["printer-state-reasons"] == ("media-empty-error", "toner-low-warning")
    assert r.printer["printer-is-accepting-jobs"] == (False,)
    assert r.printer["printer-geo-location"] == (None,)
    assert r.printer["printer-location"] == ("Hallo",)
    assert r.printer["marker-levels"] == (-2, 40)


def test_collections_are_skipped_with_their_members() -> None:
    member = attr(ipp.TAG_MEMBER_NAME, "", b"media-size")
    inner = attr(ipp.TAG_BEGIN_COLLECTION, "", b"") + attr(ipp.TAG_END_COLLECTION, "", b"")
    coll = (
        attr(ipp.TAG_BEGIN_COLLECTION, "media-col-ready", b"")
        + member
        + inner
        + attr(ipp.TAG_END_COLLECTION, "", b"")
    )
    r = decode_response(response(coll, enum("printer-state", 3)))
    assert r.printer["media-col-ready"] == (None,)
    assert r.printer["printer-state"] == (3,)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x02\x00\x00", "needs 2 bytes"),
        (struct.pack(">BBHI", 2, 0, 0, 1), "no end-of-attributes"),
        (struct.pack(">BBHI", 9, 0, 0, 1) + b"\x03", "unsupported IPP version"),
        (struct.pack(">BBHI", 2, 0, 0, 1) + attr(0x41, "x", b"y") + b"\x03", "before any"),
        (
            struct.pack(">BBHI", 2, 0, 0, 1) + b"\x04" + attr(0x41, "", b"y") + b"\x03",
            "without an attribute name",
        ),
        (
            struct.pack(">BBHI", 2, 0, 0, 1) + b"\x04" + b"\x41\xff\xfd" + b"\x03",
            "name needs 65533",
        ),
        (
            struct.pack(">BBHI", 2, 0, 0, 1) + b"\x04" + attr(ipp.TAG_ENUM, "e", b"\x01") + b"\x03",
            "not 4",
        ),
        (
            struct.pack(">BBHI", 2, 0, 0, 1)
            + b"\x04"
            + attr(ipp.TAG_BOOLEAN, "b", b"\x07")
            + b"\x03",
            "boolean",
        ),
        (
            struct.pack(">BBHI", 2, 0, 0, 1)
            + b"\x04"
            + attr(ipp.TAG_BEGIN_COLLECTION, "c", b"")
            + b"\x03",
            "collection not closed",
        ),
    ],
)
def test_malformed_responses_are_precise_errors(data: bytes, message: str) -> None:
    with pytest.raises(IppDecodeError, match=message):
        decode_response(data)


def test_the_pyipp_infinite_loop_input_is_an_error_here() -> None:
    # 19 bytes that make pyipp 0.17.2's parser loop forever: a name length of -5 as signed.
    data = (
        bytes([2, 0, 0, 0, 0, 0, 0, 1, 0x04, 0x41, 0, 1])
        + b"a"
        + bytes([0, 0, 0x41])
        + struct.pack(">h", -5)
        + b"\x03"
    )
    with pytest.raises(IppDecodeError):
        decode_response(data)


def test_bounds_on_attribute_and_value_counts() -> None:
    many = b"".join(attr(ipp.TAG_INTEGER, f"a{i}", struct.pack(">i", i)) for i in range(50))
    with pytest.raises(IppDecodeError, match="more than 10 attribute"):
        decode_response(response(many), max_attributes=10)
    values = attr(ipp.TAG_INTEGER, "m", b"\0\0\0\0") + attr(ipp.TAG_INTEGER, "", b"\0\0\0\1") * 5
    with pytest.raises(IppDecodeError, match="more than 3 values"):
        decode_response(response(values), max_values=3, max_attributes=100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_never_fails_other_than_by_its_error(data: bytes) -> None:
    with contextlib.suppress(IppDecodeError):
        decode_response(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.integers(0, 60))
def test_decoder_survives_corrupted_real_responses(noise: bytes, at: int) -> None:
    base = response(enum("printer-state", 3), kw("printer-state-reasons", "none"))
    data = base[:at] + noise + base[at:]
    with contextlib.suppress(IppDecodeError):
        decode_response(data)


# ---- printer state ------------------------------------------------------------------------


def attrs(**kw: tuple[object, ...]) -> dict[str, tuple[object, ...]]:
    return {k.replace("_", "-"): v for k, v in kw.items()}


def test_idle_processing_stopped_from_printer_state() -> None:
    assert printer_live(attrs(printer_state=(3,))).state == DeviceState.IDLE
    assert printer_live(attrs(printer_state=(4,))).state == DeviceState.PROCESSING
    assert printer_live(attrs(printer_state=(5,))).state == DeviceState.STOPPED
    assert printer_live({}).state == DeviceState.UNKNOWN
    assert printer_live(attrs(printer_state=("idle",))).state == DeviceState.UNKNOWN


def test_reasons_lose_suffixes_and_errors_stop_the_printer() -> None:
    live = printer_live(
        attrs(
            printer_state=(3,),
            printer_state_reasons=("toner-low-warning", "media-empty-error", "toner-low-report"),
        )
    )
    assert live.reasons == ("toner-low", "media-empty")
    assert live.state == DeviceState.STOPPED
    warn = printer_live(attrs(printer_state=(4,), printer_state_reasons=("media-jam-warning",)))
    assert warn.state == DeviceState.PROCESSING and warn.reasons == ("media-jam",)
    bare = printer_live(attrs(printer_state=(3,), printer_state_reasons=("media-jam",)))
    assert bare.state == DeviceState.STOPPED
    none = printer_live(attrs(printer_state=(3,), printer_state_reasons=("none",)))
    assert none.reasons == () and none.state == DeviceState.IDLE


def test_bad_reason_values_are_dropped_and_bounded() -> None:
    junk = ("", "UPPER-CASE-report", "has space", "x" * 200, None, 5, *[f"r{i}" for i in range(40)])
    live = printer_live(attrs(printer_state=(3,), printer_state_reasons=junk))
    assert "upper-case" in live.reasons
    assert len(live.reasons) == 16
    assert all(" " not in r and len(r) < 64 for r in live.reasons)


def test_accepting_location_uuid_make_model() -> None:
    live = printer_live(
        attrs(
            printer_state=(3,),
            printer_is_accepting_jobs=(False,),
            printer_location=("  Floor 1,\n  Finance  ",),
            printer_uuid=("urn:uuid:3F5E2C1A-7B1D-4C8E-9A4F-2B6D8E1F0A11",),
            printer_make_and_model=("HP LaserJet",),
        )
    )
    assert live.accepting_jobs is False
    assert live.location_text == "Floor 1, Finance"
    assert live.uuid == "3f5e2c1a-7b1d-4c8e-9a4f-2b6d8e1f0a11"
    assert live.make_model == "HP LaserJet"
    assert printer_live(attrs(printer_is_accepting_jobs=(None,))).accepting_jobs is True


def test_supplies_from_marker_attributes() -> None:
    live = printer_live(
        attrs(
            marker_names=("Black", "Cyan", "Waste"),
            marker_types=("toner", "toner"),
            marker_levels=(80, -3, 101),
        )
    )
    assert live.supplies == (
        Supply("Black", "toner", 80),
        Supply("Cyan", "toner", None),
        Supply("Waste", "other", 100),
    )


def test_supplies_from_printer_supply_as_ippeveprinter_sends_them() -> None:
    live = printer_live(
        attrs(
            printer_supply=(
                "index=1;class=receptacleThatIsFilled;type=wasteToner;unit=percent;"
                "maxcapacity=100;level=25;colorantname=unknown;",
                "index=2;class=supplyThatIsConsumed;type=toner;unit=percent;maxcapacity=200;"
                "level=150;colorantname=black;",
                "garbage;level=x",
            ),
            printer_supply_description=("Toner Waste Tank", "Black Toner"),
        )
    )
    assert live.supplies == (
        Supply("Toner Waste Tank", "wasteToner", 25),
        Supply("Black Toner", "toner", 75),
    )


def test_geo_location_from_printer() -> None:
    live = printer_live(attrs(printer_geo_location=("geo:52.5,13.4;u=3",)))
    assert live.geo == (52.5, 13.4)
    assert printer_live(attrs(printer_geo_location=(None,))).geo is None


# ---- geo: URIs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("geo:13.4125,103.8667", (13.4125, 103.8667)),
        ("GEO:48.2010,16.3695,183", (48.2010, 16.3695)),
        ("geo:48.198634,16.371648;crs=wgs84;u=40", (48.198634, 16.371648)),
        ("geo:-33.5,151;CRS=WGS84", (-33.5, 151.0)),
        ("geo:90,-22.43;crs=WGS84", (90.0, 0.0)),
        ("geo:0,0;foo=bar", (0.0, 0.0)),
        ("geo:91,0", None),
        ("geo:0,181", None),
        ("geo:1,2;crs=moon-2011", None),
        ("geo:1,2;u=-1", None),
        ("geo:1,2;u=abc", None),
        ("geo:1", None),
        ("geo:1,2,3,4", None),
        ("geo:1e3,2", None),
        ("unknown", None),
        ("http://example.com/", None),
        ("geo:1,2;u=nan", None),
    ],
)
def test_geo_uris(text: str, expected: tuple[float, float] | None) -> None:
    assert parse_geo_uri(text) == expected


@given(st.text(max_size=80))
def test_geo_parser_never_raises(text: str) -> None:
    result = parse_geo_uri(text)
    if result is not None:
        assert -90 <= result[0] <= 90 and -180 <= result[1] <= 180


# ---- eSCL ---------------------------------------------------------------------------------

ESCL = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<scan:ScannerStatus xmlns:scan="http://schemas.hp.com/imaging/escl/2011/05/03" '
    'xmlns:pwg="http://www.pwg.org/schemas/2010/12/sm">'
    "<pwg:Version>2.63</pwg:Version><pwg:State>{state}</pwg:State>{adf}"
    "</scan:ScannerStatus>"
)


def escl(state: str, adf: str = "") -> bytes:
    return ESCL.format(
        state=state, adf=f"<scan:AdfState>{adf}</scan:AdfState>" if adf else ""
    ).encode()


def test_escl_states() -> None:
    assert scanner_live(escl("Idle")).state == DeviceState.IDLE
    assert scanner_live(escl("Processing")).state == DeviceState.PROCESSING
    assert scanner_live(escl("Testing")).state == DeviceState.PROCESSING
    assert scanner_live(escl("Stopped")).state == DeviceState.STOPPED
    assert scanner_live(escl("Down")).state == DeviceState.STOPPED
    jam = scanner_live(escl("Idle", "ScannerAdfJam"))
    assert jam.state == DeviceState.STOPPED and jam.reasons == ("media-jam",)
    empty = scanner_live(escl("Idle", "ScannerAdfEmpty"))
    assert empty.state == DeviceState.IDLE and empty.reasons == ("media-empty",)
    assert scanner_live(escl("Idle", "ScannerAdfLoaded")).reasons == ()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"<notxml", "not well-formed"),
        (b"<Other/>", "root element"),
        (b'<ScannerStatus xmlns="x"><Version>1</Version></ScannerStatus>', "no pwg:State"),
        (escl("Sleeping"), "unknown pwg:State"),
        (b'<!DOCTYPE x [<!ENTITY a "b">]><ScannerStatus/>', "DTDs"),
        (b"<ScannerStatus>" + b" " * 70000 + b"</ScannerStatus>", "too large"),
    ],
)
def test_escl_bad_documents(doc: bytes, message: str) -> None:
    with pytest.raises(StatusError, match=message):
        scanner_live(doc)


# ---- overlay and backoff ------------------------------------------------------------------


def test_overlay_keeps_identity_and_fills_gaps() -> None:
    dev = Device("p1", DeviceKind.PRINTER, "P", "ipp://h/", uuid="aaa", make_model="")
    live = Live(
        DeviceState.STOPPED,
        ("paused",),
        False,
        (Supply("Black", "toner", 5),),
        "Finance",
        (1.0, 2.0),
        uuid="bbb",
        make_model="Model X",
    )
    out = overlay(dev, live)
    assert (out.state, out.state_reasons, out.accepting_jobs) == (
        DeviceState.STOPPED,
        ("paused",),
        False,
    )
    assert out.uuid == "aaa" and out.make_model == "Model X"
    assert out.location_text == "Finance" and out.geo == (1.0, 2.0)
    assert not out.available
    gone = overlay(out, unreachable(live, "timeout"))
    assert gone.state == DeviceState.UNREACHABLE and gone.state_reasons == ("timeout",)
    assert gone.supplies == live.supplies and gone.location_text == "Finance"
    assert unreachable(None, "refused") == Live(DeviceState.UNREACHABLE, ("refused",))


def test_backoff_schedule() -> None:
    assert next_delay(0, 30, 300, 0.5) == 30
    assert next_delay(1, 30, 300, 0.5) == 30
    assert next_delay(2, 30, 300, 0.5) == 60
    assert next_delay(3, 30, 300, 0.5) == 120
    assert next_delay(5, 30, 300, 0.5) == 300
    assert next_delay(10_000, 30, 300, 0.5) == 300
    assert next_delay(0, 30, 300, 0.0) == pytest.approx(27)
    assert next_delay(0, 30, 300, 0.999999) == pytest.approx(33, abs=1e-3)
    # max_backoff below the interval never shortens the interval.
    assert next_delay(4, 30, 10, 0.5) == 30


@given(st.integers(0, 100), st.floats(0.01, 1000), st.floats(0, 5000), st.floats(0, 0.999))
def test_backoff_is_bounded(failures: int, interval: float, cap: float, rand: float) -> None:
    d = next_delay(failures, interval, cap, rand, jitter=0.1)
    assert 0.9 * interval - 1e-9 <= d <= 1.1 * max(cap, interval) + 1e-9


@pytest.mark.parametrize(
    ("source", "is_queue", "polled"),
    [("mdns", False, True), ("static", False, True), ("mqtt", False, False), ("cups", True, False)],
)
def test_only_devices_this_daemon_can_reach_are_polled(
    source: str, is_queue: bool, polled: bool
) -> None:
    # Another instance's device is polled by its origin, which publishes the state.
    dev = Device(
        id="p", kind=DeviceKind.PRINTER, name="P", uri="ipp://198.18.1.2/ipp/print",
        source=source, is_queue=is_queue,
    )  # fmt: skip
    assert (poll_target(dev) is not None) is polled

"""Write frames.json: scripted malformed-input cases with their exact expected outcome.

Run ``python tests/malformed/generate.py`` after a deliberate change to the wire
protocol's messages, then review the diff of frames.json like any other code: the
table is the specification the daemon is held to (in the manner of mosquitto's
test/broker/data/*.json). Each case is

    {"group", "name", "send": hex, "half_close": bool,
     "expect": [reply, ...],   # exact replies, in order (v, id, ok, error.code, error.message)
     "after": "open" | "close"}

Hand-written cases state their expectation here; the generated families (every
prefix of every sample frame, every byte >= 0x80) are computed by the codec and
checked against the rules stated beside them, so a regression in either the codec
or the table shows up as a diff.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "clients"), str(ROOT / "daemon")]

from nearest_wire import WireError, decode_payload, parse_request  # noqa: E402

OUT = Path(__file__).with_name("frames.json")
MAX_FRAME = 65536


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def err(code: str, message: str, rid: int | None = None) -> dict[str, Any]:
    return {"id": rid, "ok": False, "code": code, "message": message}


OK = {"ok": True}
RESERVED = err(
    "bad-request", "malformed MessagePack: invalid data (a reserved or unknown type byte)"
)


def codec_outcome(payload: bytes) -> dict[str, Any]:
    """What the request codec says about a payload (the daemon adds the answer itself)."""
    try:
        obj = decode_payload(payload)
        req = parse_request(obj)
    except WireError as exc:
        return err(str(exc.code), exc.message, exc.request_id)
    return {"ok": True, "id": req.id}


SAMPLES = {
    "ping": {"v": 1, "id": 7, "op": "ping"},
    "nearest": {
        "v": 1,
        "id": 42,
        "op": "nearest",
        "kind": "printer",
        "k": 3,
        "need": {"color": True, "duplex": True, "paper": "A3"},
    },
    "nearest-client-ip": {
        "v": 1,
        "id": 43,
        "op": "nearest",
        "kind": "scanner",
        "client_ip": "10.20.23.9",
        "need": {"adf": True},
    },
    "locate": {"v": 1, "id": 9, "op": "locate", "client_ip": "2001:db8:20:23::9"},
    "devices": {"v": 1, "id": 11, "op": "devices", "kind": "printer", "site": "hq"},
}


def cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(
        group: str,
        name: str,
        send: bytes,
        expect: list[dict[str, Any]],
        after: str,
        half_close: bool = False,
    ) -> None:
        out.append(
            {
                "group": group,
                "name": name,
                "send": send.hex(),
                "half_close": half_close,
                "expect": expect,
                "after": after,
            }
        )

    # ---- framing -----------------------------------------------------------------------
    too_large = "frame of {} bytes exceeds the limit of 65536 bytes"
    add(
        "framing",
        "length header claiming 4 GiB then junk",
        b"\xff\xff\xff\xff" + b"\x00" * 4096,
        [err("too-large", too_large.format(2**32 - 1))],
        "close",
    )
    add(
        "framing",
        "length header one over the limit",
        struct.pack(">I", MAX_FRAME + 1),
        [err("too-large", too_large.format(MAX_FRAME + 1))],
        "close",
    )
    add(
        "framing",
        "oversized frame after a valid one is answered in order",
        frame(pack(SAMPLES["ping"])) + struct.pack(">I", 10**9),
        [{"ok": True, "id": 7}, err("too-large", too_large.format(10**9))],
        "close",
    )
    add(
        "framing",
        "frame of exactly the limit, junk inside",
        frame(b"\xc1" * MAX_FRAME),
        [RESERVED],
        "open",
    )
    add(
        "framing",
        "empty frame",
        frame(b""),
        [err("bad-request", "empty frame: expected a MessagePack map")],
        "open",
    )
    add("framing", "header only, then half-close", b"\x00\x00\x00\x10", [], "close", True)
    for n in range(1, 4):
        add("framing", f"{n} byte(s) of a header, then half-close", b"\x00" * n, [], "close", True)

    # ---- MessagePack: CVE-class shapes ---------------------------------------------------
    many = "malformed MessagePack: array or map with more than 1024 items"
    add(
        "msgpack",
        "array32 claiming 2^32-1 items",
        frame(b"\xdd\xff\xff\xff\xff"),
        [err("bad-request", many)],
        "open",
    )
    add(
        "msgpack",
        "map32 claiming 2^32-1 items",
        frame(b"\xdf\xff\xff\xff\xff"),
        [err("bad-request", many)],
        "open",
    )
    add(
        "msgpack",
        "map with a field holding array32 claiming 2^32-1 items",
        frame(b"\x81\xa3why\xdd\xff\xff\xff\xff"),
        [err("bad-request", many)],
        "open",
    )
    add(
        "msgpack",
        "array16 of 1025 nils",
        frame(b"\xdc\x04\x01" + b"\xc0" * 1025),
        [err("bad-request", many)],
        "open",
    )
    add(
        "msgpack",
        "map of 1025 entries",
        frame(b"\xde\x04\x01" + b"".join(pack(f"k{i}") + b"\xc0" for i in range(1025))),
        [err("bad-request", many)],
        "open",
    )
    for name, head in (("str32", b"\xdb"), ("bin32", b"\xc6")):
        # Only the header arrives: refused without allocating, as truncated or too long.
        payload = head + b"\xff\xff\xff\xff"
        got = codec_outcome(payload)
        assert got["message"] in (
            "malformed MessagePack: truncated or invalid data",
            "malformed MessagePack: string longer than 4096 bytes",
        ), got
        add("msgpack", f"{name} claiming 2^32-1 bytes", frame(payload), [got], "open")
    add(
        "msgpack",
        "string of 4097 bytes",
        frame(pack({"v": 1, "id": 1, "op": "x" * 4097})),
        [err("bad-request", "malformed MessagePack: string longer than 4096 bytes")],
        "open",
    )
    add(
        "msgpack",
        "ext32 claiming 2^32-1 bytes",
        frame(b"\xc9\xff\xff\xff\xff\x01"),
        [err("bad-request", "malformed MessagePack: extension types are not accepted")],
        "open",
    )
    deep = "malformed MessagePack: nesting deeper than 8 levels"
    add(
        "msgpack",
        "arrays nested 10,000 deep",
        frame(b"\x91" * 10000 + b"\xc0"),
        [err("bad-request", deep)],
        "open",
    )
    add(
        "msgpack",
        "maps nested 10,000 deep",
        frame(b"\x81\xa1a" * 10000 + b"\xc0"),
        [err("bad-request", deep)],
        "open",
    )
    nested: Any = 1
    for _ in range(8):
        nested = {"n": nested}
    add(
        "msgpack",
        "maps nested 9 deep (one over the limit)",
        frame(pack({"v": 1, "id": 5, "op": "ping", "x": nested})),
        [err("bad-request", "nesting deeper than 8 levels")],
        "open",
    )
    add(
        "msgpack",
        "two objects in one frame",
        frame(pack(SAMPLES["ping"]) + b"\xc0"),
        [err("bad-request", "frame holds more than one MessagePack object")],
        "open",
    )
    for name, obj in (
        ("array", [1, 2]),
        ("integer", 7),
        ("nil", None),
        ("string", "ping"),
        ("float", 1.5),
        ("boolean", True),
    ):
        got = codec_outcome(pack(obj))
        assert got["code"] == "bad-request" and "expected a map" in got["message"], got
        add("msgpack", f"top-level {name}", frame(pack(obj)), [got], "open")
    add(
        "msgpack",
        "integer map keys",
        frame(b"\x81\x01\x01"),
        [codec_outcome(b"\x81\x01\x01")],
        "open",
    )

    # ---- bytes >= 0x80 -----------------------------------------------------------------------
    for b in range(0x80, 0x100):
        payload = bytes([b])
        got = codec_outcome(payload)
        assert not got["ok"] and got["code"] == "bad-request", (hex(b), got)
        add("high-bytes", f"payload is the single byte {b:#04x}", frame(payload), [got], "open")
    for b in (0x80, 0xC0, 0xFE, 0xFF):
        bad = bytes([0xA2, b, b])
        payload = b"\x83\xa1v\x01\xa2id\x01\xa2op" + bad
        got = codec_outcome(payload)
        assert got["code"] == "bad-request" and "codec can't decode" in got["message"], got
        add("high-bytes", f"op string of bytes {b:#04x}", frame(payload), [got], "open")
        payload = b"\x81" + bad + b"\x01"
        add(
            "high-bytes",
            f"map key of bytes {b:#04x}",
            frame(payload),
            [codec_outcome(payload)],
            "open",
        )
    payload = pack({"v": 1, "id": 3, "op": "nëarest"})
    add(
        "high-bytes",
        "valid UTF-8 op that is not an op",
        frame(payload),
        [codec_outcome(payload)],
        "open",
    )

    # ---- request fields ------------------------------------------------------------------
    base = {"v": 1, "id": 5, "op": "nearest", "kind": "printer"}
    fields: list[tuple[str, dict[str, Any]]] = [
        ("v missing", {"id": 5, "op": "ping"}),
        ("v is 2", {**base, "v": 2}),
        ("v is a string", {**base, "v": "1"}),
        ("v is true", {**base, "v": True}),
        ("id missing", {"v": 1, "op": "ping"}),
        ("id -1 is echoed", {"v": 1, "id": -1, "op": "ping"}),
        ("id int64 minimum is echoed", {"v": 1, "id": -(2**63), "op": "ping"}),
        ("id uint64 maximum is echoed", {"v": 1, "id": 2**64 - 1, "op": "ping"}),
        ("id is a float", {**base, "id": 1.0}),
        ("id is a boolean", {**base, "id": True}),
        ("op missing", {"v": 1, "id": 5}),
        ("op is an integer", {**base, "op": 3}),
        ("op unknown", {**base, "op": "print"}),
        ("op of 4096 bytes", {**base, "op": "o" * 4096}),
        ("kind missing", {"v": 1, "id": 5, "op": "nearest"}),
        ("kind unknown", {**base, "kind": "fax"}),
        ("kind is a list", {**base, "kind": ["printer"]}),
        ("k zero", {**base, "k": 0}),
        ("k 21", {**base, "k": 21}),
        ("k is a string", {**base, "k": "3"}),
        ("k is a boolean", {**base, "k": True}),
        ("need is a list", {**base, "need": []}),
        ("need.color is a string", {**base, "need": {"color": "yes"}}),
        ("need.paper unknown", {**base, "need": {"paper": "A0"}}),
        ("need.unknown", {**base, "need": {"stapler": True}}),
        ("need.state unknown", {**base, "need": {"state": "broken"}}),
        ("client_ip not an address", {**base, "client_ip": "printer.local"}),
        ("client_ip with prefix", {**base, "client_ip": "10.0.0.0/8"}),
        ("client_ip of 65 bytes", {**base, "client_ip": "1" * 65}),
        ("client_ip with a zone index", {**base, "client_ip": "fe80::1%eth0"}),
        ("client_ip is an integer", {**base, "client_ip": 167772161}),
        ("client_ip is bytes", {**base, "client_ip": b"\n\x00\x00\x01"}),
        ("zone empty", {**base, "zone": ""}),
        ("zone of 129 bytes", {**base, "zone": "z" * 129}),
        ("zone unknown", {**base, "zone": "no-such-zone"}),
        ("unknown field", {**base, "colour": True}),
        ("devices with k", {"v": 1, "id": 5, "op": "devices", "k": 1}),
        ("locate with kind", {"v": 1, "id": 5, "op": "locate", "kind": "printer"}),
        ("ping with extra", {"v": 1, "id": 5, "op": "ping", "x": 1}),
        ("admin op stats on the query socket", {"v": 1, "id": 5, "op": "stats"}),
        ("admin op reload on the query socket", {"v": 1, "id": 5, "op": "reload"}),
        (
            "privacy.export on the query socket",
            {"v": 1, "id": 5, "op": "privacy.export", "ip": "10.0.0.1"},
        ),
        ("privacy.erase without ip", {"v": 1, "id": 5, "op": "privacy.erase"}),
    ]
    for name, obj in fields:
        payload = pack(obj)
        got = codec_outcome(payload)
        if got["ok"]:
            # Valid to the codec; the daemon refuses it (admin op, unknown zone).
            if name == "zone unknown":
                got = err("unknown-location", "zone: no such zone", 5)
            elif name.endswith("is echoed"):
                got = {"id": obj["id"], "ok": True}
            elif name == "client_ip with a zone index":
                got = err("unknown-location", "no zone's subnets contain this client's address", 5)
            else:
                got = err("forbidden", f"op {obj['op']!r} is only served on the admin socket", 5)
        add("fields", name, frame(payload), [got], "open")

    # ---- truncation: every sample frame cut at every byte ---------------------------------
    for sname, obj in SAMPLES.items():
        payload = pack(obj)
        whole = frame(payload)
        for cut in range(len(whole)):
            # The stream ends inside the frame: nothing to answer; the half-close closes it.
            add(
                "cut-stream",
                f"{sname} cut after {cut} of {len(whole)} bytes",
                whole[:cut],
                [],
                "close",
                True,
            )
        for cut in range(len(payload)):
            body = payload[:cut]
            got = codec_outcome(body)
            assert not got["ok"], (sname, cut, got)
            assert got["message"] in (
                "empty frame: expected a MessagePack map",
                "malformed MessagePack: truncated or invalid data",
            ) or got["message"].startswith("frame holds a "), (sname, cut, got)
            add(
                "cut-body",
                f"{sname} body cut to {cut} of {len(payload)} bytes, reframed",
                frame(body),
                [got],
                "open",
            )
        add("valid", f"{sname} whole", whole, [codec_outcome(payload)], "open")

    # ---- sequences -------------------------------------------------------------------------
    ping = frame(pack(SAMPLES["ping"]))
    add(
        "sequence",
        "valid, malformed, valid: answered in order",
        ping + frame(b"\xc1") + frame(pack({"v": 1, "id": 8, "op": "ping"})),
        [{"ok": True, "id": 7}, RESERVED, {"ok": True, "id": 8}],
        "open",
    )
    add(
        "sequence",
        "200 pipelined pings then half-close: all answered, then closed",
        b"".join(frame(pack({"v": 1, "id": i, "op": "ping"})) for i in range(200)),
        [{"ok": True, "id": i} for i in range(200)],
        "close",
        True,
    )
    return out


def main() -> None:
    table = cases()
    OUT.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{len(table)} cases written to {OUT}")


if __name__ == "__main__":
    main()

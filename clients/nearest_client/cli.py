"""The ``nearest`` command: ask nearestd for the nearest printer or scanner."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nearest_client.client import Client, ClientError, ServerError, Unreachable, default_server
from nearest_wire import PAPER_NEEDS, Need

EXIT_FOUND, EXIT_NONE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    p = argparse.ArgumentParser(
        prog="nearest", description="Find the nearest printer or scanner for this machine."
    )
    p.add_argument(
        "--server",
        help="tcp://HOST:PORT or unix:///PATH (default: $NEAREST_SERVER, "
        "/etc/nearest/client.toml, the daemon's socket, tcp://127.0.0.1:7310)",
    )
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon")
    p.add_argument(
        "--where",
        action="store_true",
        help="say which server is used and where it places this machine",
    )
    sub = p.add_subparsers(dest="kind")
    for kind in ("printer", "scanner"):
        s = sub.add_parser(kind, help=f"the nearest {kind}")
        s.add_argument("--color", action="store_true", help="colour")
        s.add_argument("--duplex", action="store_true", help="two-sided")
        if kind == "printer":
            s.add_argument("--paper", choices=list(PAPER_NEEDS), help="paper size needed")
        s.add_argument("--adf", action="store_true", help="automatic document feeder (scanners)")
        s.add_argument("--secure", action="store_true", help="reachable over IPPS or HTTPS only")
        s.add_argument(
            "--any-state", action="store_true", help="include stopped or unreachable devices"
        )
        s.add_argument("-k", type=int, default=1, metavar="N", help="N alternatives (1-20)")
        s.add_argument("--json", action="store_true", dest="json_sub", help="print JSON")
        s.add_argument("--server", dest="server_sub", help=argparse.SUPPRESS)
    return p


def _place(d: dict[str, Any]) -> str:
    parts = [str(d.get(k)) for k in ("site", "building") if d.get(k)]
    if d.get("level") is not None:
        parts.append(f"level {d['level']}")
    if d.get("zone"):
        parts.append(str(d["zone"]))
    return " / ".join(parts) or "unknown"


def format_answer(reply: dict[str, Any]) -> str:
    """Return the human-readable form of a ``nearest`` reply."""
    where = reply.get("where", {})
    lines = [f"You are in {where.get('zone_name') or where.get('zone')} ({_place(where)})."]
    for i, d in enumerate(reply.get("devices", []), start=1):
        caps = d.get("capabilities", {})
        flags = [name for name in ("color", "duplex", "adf", "secure") if caps.get(name)]
        if caps.get("paper_max"):
            flags.append(f"up to {caps['paper_max']}")
        lines.append(
            f"{i}. {d.get('name')}" + (f"  [{d.get('make_model')}]" if d.get("make_model") else "")
        )
        lines.append(f"   where: {_place(d)}, {d.get('distance_m')} m away")
        lines.append(f"   uri:   {d.get('uri')}")
        state = d.get("state")
        lines.append(f"   has:   {', '.join(flags) or 'no stated capabilities'}; state {state}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the contract's exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    server = args.server or getattr(args, "server_sub", None)
    source = "--server"
    if not server:
        server, source = default_server()
    as_json = args.json or getattr(args, "json_sub", False)
    if args.where:
        return _where(server, source, args.timeout, as_json)
    if args.kind is None:
        parser.print_usage(sys.stderr)
        print("nearest: say 'printer' or 'scanner'", file=sys.stderr)
        return EXIT_USAGE
    if not 1 <= args.k <= 20:
        print("nearest: -k must be from 1 to 20", file=sys.stderr)
        return EXIT_USAGE
    need = Need(
        color=args.color,
        duplex=args.duplex,
        adf=args.adf,
        secure=args.secure,
        paper=PAPER_NEEDS[args.paper] if getattr(args, "paper", None) else None,
        any_state=args.any_state,
    )
    try:
        with Client(server, timeout=args.timeout) as client:
            reply = client.nearest(args.kind, need, args.k)
    except ServerError as exc:
        print(f"nearest: the daemon refused: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_NONE if exc.code == "unknown-location" else EXIT_UNREACHABLE
    except Unreachable as exc:
        print(f"nearest: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ClientError as exc:
        print(f"nearest: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps(reply, indent=2, ensure_ascii=False))
    elif reply.get("devices"):
        print(format_answer(reply))
    else:
        print(f"nearest: no {args.kind} matches what you asked for", file=sys.stderr)
    return EXIT_FOUND if reply.get("devices") else EXIT_NONE


def _where(server: str, source: str, timeout: float, as_json: bool) -> int:
    try:
        with Client(server, timeout=timeout) as client:
            reply = client.request({"op": "locate"})
    except ServerError as exc:
        print(
            f"server: {server} (from {source})\nthe daemon cannot place this machine: {exc.message}"
        )
        return EXIT_NONE
    except ClientError as exc:
        print(f"server: {server} (from {source})\nnearest: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps({"server": server, "source": source, "where": reply["where"]}, indent=2))
    else:
        print(f"server: {server} (from {source})\nwhere:  {_place(reply['where'])}")
    return EXIT_FOUND


if __name__ == "__main__":
    sys.exit(main())

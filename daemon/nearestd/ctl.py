"""The ``nearestctl`` command: operators' tool over the admin socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from nearest_client.cli import quiet_broken_pipe
from nearest_client.client import Client, ClientError, ServerError, Unreachable
from nearest_wire import (
    DevicesReply,
    DevicesRequest,
    DeviceView,
    EraseReply,
    ExportEntry,
    ExportReply,
    LocateReply,
    LocateRequest,
    MapReply,
    MapRequest,
    NearestReply,
    NearestRequest,
    PingReply,
    PingRequest,
    PrivacyRequest,
    ReloadReply,
    ReloadRequest,
    Reply,
    Request,
    StatsReply,
    StatsRequest,
    WireError,
)
from nearestd.config import ConfigError, load_config

DEFAULT_ADMIN = "/run/nearestd/admin.sock"
SOCKET_ENV = "NEARESTCTL_SOCKET"
PLACEMENT_ORDER = (
    "static (site-map position) > pin (site-map match on uuid, name, host, ip) > "
    "geo (printer-geo-location inside a zone) > note (DNS-SD note names a zone) > "
    "location (printer-location names a zone) > subnet (device address in a zone's subnets)"
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    p = argparse.ArgumentParser(prog="nearestctl", description="Operate a running nearestd.")
    p.add_argument(
        "--socket",
        help=f"admin socket (default: from --config, else ${SOCKET_ENV}, then {DEFAULT_ADMIN})",
    )
    p.add_argument("--config", "-c", help="nearestd config file, to find its admin socket")
    p.add_argument(
        "--json", action="store_true", help="the daemon's reply as JSON (default: human output)"
    )
    p.add_argument("--timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("devices", help="every device with kind, state, placement; unlocated first")
    d.add_argument("--kind", choices=["printer", "scanner"])
    d.add_argument("--site")
    loc = sub.add_parser("locate", help="where the daemon places an IP")
    loc.add_argument("ip")
    n = sub.add_parser("nearest", help="what a client at IP would be answered")
    n.add_argument("ip")
    n.add_argument("kind", choices=["printer", "scanner"])
    n.add_argument("-k", type=int, default=3)
    m = sub.add_parser("map", help="one floor as SVG (zones, devices by state), for reports")
    m.add_argument("site")
    m.add_argument("building")
    m.add_argument("level", type=int)
    sub.add_parser("reload", help="re-read config and site maps (all or nothing)")
    sub.add_parser("stats", help="counters and sizes")
    sub.add_parser("ping", help="is the daemon alive")
    priv = sub.add_parser("privacy", help="subject-access export and erasure")
    psub = priv.add_subparsers(dest="action", required=True)
    for action in ("export", "erase"):
        a = psub.add_parser(action)
        a.add_argument("ip")
    return p


def admin_sockets(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """Return the admin sockets to try, in order, each with where it came from."""
    env = os.environ if env is None else env
    if args.socket:
        return [(str(args.socket), "--socket")]
    if args.config:
        cfg = load_config(args.config)
        return [(str(cfg.resolve(cfg.daemon.admin_socket)), f"--config {args.config}")]
    out = []
    if env.get(SOCKET_ENV):
        out.append((env[SOCKET_ENV], SOCKET_ENV))
    if DEFAULT_ADMIN not in (path for path, _ in out):
        out.append((DEFAULT_ADMIN, "default"))
    return out


def connect(candidates: list[tuple[str, str]], timeout: float) -> Client:
    """Return a client connected to the first admin socket that answers; name all tried."""
    tried = []
    for path, source in candidates:
        client = Client(f"unix://{path}", timeout=timeout)
        try:
            client.connect()
        except Unreachable as exc:
            tried.append(f"{path} (from {source}): {str(exc).rsplit(': ', 1)[-1]}")
            continue
        return client
    raise Unreachable("cannot reach nearestd's admin socket; tried " + "; ".join(tried))


def request_for(args: argparse.Namespace, rid: int) -> Request:
    """Return the admin request of a command line (``devices``: its first page)."""
    cmd = args.command
    if cmd == "devices":
        return DevicesRequest(rid, kind=args.kind, site=args.site)
    if cmd == "locate":
        return LocateRequest(rid, client_ip=args.ip)
    if cmd == "nearest":
        return NearestRequest(rid, args.kind, args.k, client_ip=args.ip)
    if cmd == "privacy":
        return PrivacyRequest(rid, f"privacy.{args.action}", args.ip)
    if cmd == "map":
        return MapRequest(rid, args.site, args.building, args.level)
    if cmd == "ping":
        return PingRequest(rid)
    if cmd == "reload":
        return ReloadRequest(rid)
    return StatsRequest(rid)


def fetch(client: Client, req: Request) -> Reply:
    """Send a request; for ``devices``, follow the cursor and return every page as one."""
    reply = client.send(req)
    if isinstance(req, DevicesRequest) and isinstance(reply, DevicesReply):
        devices = list(reply.devices)
        while reply.next_cursor is not None:
            reply = client.send(replace(req, id=client.next_id(), cursor=reply.next_cursor))
            assert isinstance(reply, DevicesReply)
            devices.extend(reply.devices)
        return DevicesReply(req.id, tuple(devices))
    return reply


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def format_devices(devices: Sequence[DeviceView]) -> str:
    """Return the devices as a table, unlocated ones first."""
    rows = [["ID", "KIND", "STATE", "PLACEMENT", "PLACED BY", "SOURCE", "NAME"]]
    unlocated = 0
    for d in devices:
        inv = d.inventory
        if inv is not None and inv.located:
            place = f"{d.site}/{d.building}/L{d.level}/{d.zone or '-'}"
        else:
            place = "UNLOCATED"
            unlocated += 1
        state = d.state
        if d.state_reasons:
            state += f" ({','.join(d.state_reasons)})"
        if not d.accepting_jobs:
            state += " not-accepting"
        if inv is not None and inv.quarantined:
            state = f"quarantined ({inv.quarantined})"
        placed_by = (inv.placed_by if inv else None) or "-"
        rows.append([d.id, d.kind, state, place, placed_by, inv.source if inv else "-", d.name])
    return (
        _table(rows)
        + f"\nplaced by, first that applies: {PLACEMENT_ORDER}"
        + f"\n{len(devices)} devices, {unlocated} unlocated"
    )


def format_reply(reply: Reply) -> str:
    """Return a human-readable reply."""
    if isinstance(reply, DevicesReply):
        return format_devices(reply.devices)
    if isinstance(reply, LocateReply):
        w = reply.where
        return f"{w.site} / {w.building} / level {w.level} / {w.zone} ({w.zone_name})"
    if isinstance(reply, NearestReply):
        lines = [f"{d.distance_m:>8} m  {d.id}  {d.name}  {d.uri}" for d in reply.devices]
        return "\n".join(lines) or "nothing matches"
    if isinstance(reply, EraseReply):
        return f"erased {reply.erased} entries"
    if isinstance(reply, ExportReply):
        return format_entries(reply.entries)
    if isinstance(reply, MapReply):
        return reply.svg
    if isinstance(reply, ReloadReply):
        return "reloaded"
    if isinstance(reply, PingReply):
        return f"alive (nearestd {reply.version})"
    assert isinstance(reply, StatsReply)
    return format_stats(reply.stats)


def iso_time(ts: float) -> str:
    """Return an epoch time as ISO 8601 in UTC, to the second (2026-01-31T09:05:00Z)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_entries(entries: Sequence[ExportEntry]) -> str:
    """Return a subject-access export as a table with ISO 8601 UTC times."""
    rows = [["TIME (UTC)", "OP", "ZONE", "DEVICES"]]
    for e in entries:
        rows.append([iso_time(e.ts), e.op, e.zone or "-", ",".join(e.devices) or "-"])
    return _table(rows) + f"\n{len(entries)} entries"


# Stats keys that hold epoch times (shown in ISO 8601 UTC).
TIME_KEYS = ("ts", "last_seen", "first_seen", "started", "oldest_entry")


def _stat_lines(prefix: str, value: Any, out: list[str]) -> None:
    if isinstance(value, Mapping):
        if not value:
            out.append(f"{prefix}: -")
        for key in sorted(value, key=str):
            _stat_lines(f"{prefix}.{key}" if prefix else str(key), value[key], out)
        return
    last = prefix.rsplit(".", 1)[-1]
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (last in TIME_KEYS or last.endswith("_at"))
    ):
        shown = iso_time(float(value))
    elif isinstance(value, list):
        shown = ", ".join(str(v) for v in value) or "-"
    elif value is None:
        shown = "-"
    else:
        shown = str(value)
    out.append(f"{prefix}: {shown}")


def format_stats(stats: Mapping[str, Any]) -> str:
    """Return stats as one ``dotted.key: value`` line each, sorted, times in ISO 8601 UTC."""
    out: list[str] = []
    _stat_lines("", stats, out)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 success, 1 refused, 2 usage, 3 unreachable, 141 stdout closed."""
    try:
        status = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        return quiet_broken_pipe()
    return status


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        candidates = admin_sockets(args)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    try:
        req = request_for(args, 0)
    except WireError as exc:  # refused as it was built: a usage error, nothing is sent
        print(f"nearestctl: {exc.message}", file=sys.stderr)
        return 2
    try:
        with connect(candidates, args.timeout) as client:
            reply = fetch(client, req)
    except ServerError as exc:
        if args.json:
            print(json.dumps(exc.reply, indent=2))
        else:
            print(f"nearestctl: {exc.message} ({exc.code})", file=sys.stderr)
            for problem in exc.reply.get("problems", []):
                print(f"  {problem}", file=sys.stderr)
        return 1
    except Unreachable as exc:
        print(f"nearestctl: {exc}", file=sys.stderr)
        return 3
    except ClientError as exc:
        print(f"nearestctl: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(reply.to_wire(), indent=2, ensure_ascii=False))
    else:
        print(format_reply(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())

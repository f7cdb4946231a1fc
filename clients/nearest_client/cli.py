"""The ``nearest`` command: ask nearestd for the nearest printer or scanner."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from urllib.parse import urlsplit

from nearest_client import agent
from nearest_client.client import (
    Client,
    ClientError,
    ServerError,
    Unreachable,
    default_server,
    parse_url,
)
from nearest_client.cups import Cups, CupsError, DeviceUnusable, Target, place_text, readiness
from nearest_wire import KINDS, PAPER_NEEDS, DeviceView, NearestReply, Need, Where

EXIT_FOUND, EXIT_NONE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# --set-default asks for this many candidates, in case the nearest is not driverless.
SET_DEFAULT_CANDIDATES = 5
EPILOG = """exit status: 0 found (or done), 1 nothing matches (for --set-default: no nearby
printer can be set up driverless), 2 usage or client configuration error,
3 the daemon or CUPS is unreachable or refused."""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    p = argparse.ArgumentParser(
        prog="nearest",
        description="Find the nearest printer or scanner for this machine.",
        epilog=EPILOG,
    )
    p.add_argument(
        "--server",
        help="tcp://HOST:PORT or unix:///PATH (default: $NEAREST_SERVER, then server in "
        "$NEAREST_CLIENT_CONFIG or /etc/nearest/client.toml, then the daemon's socket, "
        "then tcp://127.0.0.1:7310)",
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
        # An option of the other kind is accepted by the parser only to be refused by name.
        if kind == "printer":
            s.add_argument("--paper", choices=list(PAPER_NEEDS), help="paper size needed")
            s.add_argument("--adf", action="store_true", help=argparse.SUPPRESS)
        else:
            s.add_argument("--adf", action="store_true", help="automatic document feeder")
            s.add_argument("--paper", help=argparse.SUPPRESS)
        s.add_argument("--secure", action="store_true", help="reachable over IPPS or HTTPS only")
        s.add_argument(
            "--any-state", action="store_true", help="include stopped or unreachable devices"
        )
        s.add_argument("-k", type=int, default=1, metavar="N", help="N alternatives (1-20)")
        s.add_argument("--json", action="store_true", dest="json_sub", help="print JSON")
        s.add_argument("--server", dest="server_sub", help=argparse.SUPPRESS)
        if kind == "printer":
            s.add_argument(
                "--set-default",
                action="store_true",
                help="make it your CUPS default (creates a driverless queue if needed)",
            )
            s.add_argument(
                "--forget",
                action="store_true",
                help="remove the CUPS queues nearest created, and nothing else",
            )
            s.add_argument(
                "--driver-timeout",
                type=float,
                default=30.0,
                metavar="SECONDS",
                help="how long CUPS may take to set up a new driverless queue (default 30)",
            )
    agent.add_parser(sub)
    return p


def _place(d: DeviceView | Where) -> str:
    return place_text(d.site, d.building, d.level, d.zone) or "unknown"


def format_answer(reply: NearestReply) -> str:
    """Return the human-readable form of a ``nearest`` reply."""
    where = reply.where
    lines = [f"You are in {where.zone_name or where.zone} ({_place(where)})."]
    for i, d in enumerate(reply.devices, start=1):
        caps = d.capabilities
        flags = [name for name in ("color", "duplex", "adf", "secure") if getattr(caps, name)]
        if caps.paper_max:
            flags.append(f"up to {caps.paper_max}")
        lines.append(f"{i}. {d.name}" + (f"  [{d.make_model}]" if d.make_model else ""))
        lines.append(f"   where: {_place(d)}, {d.distance_m} m away")
        lines.append(f"   uri:   {d.uri}")
        lines.append(f"   has:   {', '.join(flags) or 'no stated capabilities'}; state {d.state}")
        if d.kind == "scanner":
            lines.extend(_scanner_lines(d))
    return "\n".join(lines)


def sane_device(name: str, uri: str) -> dict[str, str] | None:
    """Return sane-airscan strings for a scanner, or None if ``uri`` is not eSCL.

    sane-airscan (0.99.4 and later) opens ``airscan:escl:NAME:URL`` directly, without any
    configuration; the ``[devices]`` line makes the scanner permanent in airscan.conf.
    """
    try:
        scheme = urlsplit(uri).scheme
    except ValueError:
        return None
    if scheme not in ("http", "https"):
        return None
    # sane-airscan splits the device string at the first two colons.
    name = " ".join((name or "scanner").replace(":", " ").split())
    device = f"airscan:escl:{name}:{uri}"
    conf_name = name.replace('"', "'")
    return {
        "escl": uri,
        "device": device,
        "scanimage": f"scanimage -d {shlex.quote(device)} --format=png > scan.png",
        "airscan_conf": f'"{conf_name}" = {uri}, eSCL',
    }


def _scanner_lines(d: DeviceView) -> list[str]:
    sane = sane_device(d.name or d.id, d.uri)
    if sane is None:
        return [f"   sane:  no eSCL (AirScan) endpoint: {d.uri}"]
    return [
        f"   eSCL:  {sane['escl']}",
        f"   scan:  {sane['scanimage']}",
        f"   airscan.conf [devices]: {sane['airscan_conf']}",
    ]


# Options that only one kind has: given to the other kind, they are usage errors.
ONLY_FOR = {"adf": "scanner", "paper": "printer"}
# What a shell reports for a tool that SIGPIPE ended (128 + 13), as `yes | head -1` does.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the contract's exit status (141 when stdout's reader left)."""
    try:
        status = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        return quiet_broken_pipe()
    return status


def quiet_broken_pipe() -> int:
    """Stop writing to a closed stdout without a traceback; return the SIGPIPE-style status."""
    # Python flushes stdout once more at exit; point it at /dev/null so that flush is silent.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    server = args.server or getattr(args, "server_sub", None)
    source = "--server"
    try:
        if server:
            parse_url(server)
        else:
            server, source = default_server()
    except ClientError as exc:
        where = "--server: " if source == "--server" and server else ""
        print(f"nearest: {where}{exc}", file=sys.stderr)
        return EXIT_USAGE
    for option, kind in ONLY_FOR.items():
        if args.kind in KINDS and args.kind != kind and getattr(args, option, None):
            print(
                f"nearest: --{option} applies to {kind}s only, not to {args.kind}s",
                file=sys.stderr,
            )
            return EXIT_USAGE
    as_json = args.json or getattr(args, "json_sub", False)
    if args.where:
        return _where(server, source, args.timeout, as_json)
    if args.kind is None:
        parser.print_usage(sys.stderr)
        print("nearest: say 'printer', 'scanner' or 'agent'", file=sys.stderr)
        return EXIT_USAGE
    if args.kind == "agent":
        return agent.run(args, server, source, args.timeout)
    set_default = getattr(args, "set_default", False)
    if getattr(args, "forget", False):
        if set_default:
            print("nearest: --forget and --set-default exclude each other", file=sys.stderr)
            return EXIT_USAGE
        return _forget(as_json)
    if not 1 <= args.k <= 20:
        print("nearest: -k must be from 1 to 20", file=sys.stderr)
        return EXIT_USAGE
    need = Need(
        color=args.color,
        duplex=args.duplex,
        adf=args.adf,
        secure=args.secure,
        paper=PAPER_NEEDS[args.paper] if args.kind == "printer" and args.paper else None,
        any_state=args.any_state,
    )
    k = max(args.k, SET_DEFAULT_CANDIDATES) if set_default else args.k
    try:
        with Client(server, timeout=args.timeout) as client:
            reply = client.nearest(args.kind, need, k)
    except ServerError as exc:
        print(f"nearest: the daemon refused: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_NONE if exc.code == "unknown-location" else EXIT_UNREACHABLE
    except Unreachable as exc:
        print(f"nearest: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ClientError as exc:
        print(f"nearest: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if set_default:
        return _set_default(reply, as_json, args.driver_timeout)
    if as_json:
        out = reply.to_wire()
        if args.kind == "scanner":
            for d, view in zip(out["devices"], reply.devices, strict=True):
                sane = sane_device(view.name or view.id, view.uri)
                if sane is not None:
                    d["sane"] = sane
        print(json.dumps(out, indent=2, ensure_ascii=False))
    elif reply.devices:
        print(format_answer(reply))
    else:
        print(f"nearest: no {args.kind} matches what you asked for", file=sys.stderr)
    return EXIT_FOUND if reply.devices else EXIT_NONE


def _set_default(reply: NearestReply, as_json: bool, driver_timeout: float) -> int:
    devices = reply.devices
    if not devices:
        print(
            "nearest: no printer matches what you asked for; the default is unchanged",
            file=sys.stderr,
        )
        return EXIT_NONE
    ready = readiness()
    for advice in ready.advice:
        print(f"nearest: {advice}", file=sys.stderr)
    if ready.missing_tools:
        print("nearest: the default is unchanged", file=sys.stderr)
        return EXIT_UNREACHABLE
    cups = Cups(driver_timeout=driver_timeout)
    for i, device in enumerate(devices):
        target = Target.from_reply(device)
        try:
            outcome = cups.apply(target)
        except DeviceUnusable as exc:
            print(f"nearest: {exc}", file=sys.stderr)
            continue
        except CupsError as exc:
            print(f"nearest: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        if as_json:
            print(
                json.dumps(
                    {**outcome.to_json(), "rank": i + 1, "where": reply.where.to_wire()},
                    indent=2,
                    ensure_ascii=False,
                )
            )
            return EXIT_FOUND
        if i > 0:
            print(f"Using the next nearest printer, {target.name}.")
        if outcome.action == "created":
            print(f"Created the CUPS queue {outcome.queue} for {target.name} ({target.uri}).")
        elif outcome.action == "updated":
            print(f"Updated the CUPS queue {outcome.queue} for {target.name} ({target.uri}).")
        elif outcome.action == "reused":
            print(f"Using the existing CUPS queue {outcome.queue} for {target.name}.")
        where = f" ({target.location})" if target.location else ""
        if outcome.default_changed:
            print(f"{outcome.queue} is now your default printer: {target.name}{where}.")
        else:
            print(f"{outcome.queue} is already your default printer: {target.name}{where}.")
        for var in ("LPDEST", "PRINTER"):
            value = os.environ.get(var)
            if value and value != outcome.queue:
                print(
                    f"nearest: note: ${var}={value} overrides the CUPS default in programs "
                    "that read it; unset it to print to the nearest printer.",
                    file=sys.stderr,
                )
        return EXIT_FOUND
    print(
        f"nearest: none of the {len(devices)} nearest matching printers can be set up "
        "driverless; the default is unchanged",
        file=sys.stderr,
    )
    return EXIT_NONE


def _forget(as_json: bool) -> int:
    try:
        removed = Cups().forget()
    except CupsError as exc:
        print(f"nearest: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps({"removed": removed}))
    elif removed:
        print(f"Removed {len(removed)} CUPS queue(s) nearest had created: {', '.join(removed)}.")
    else:
        print("No CUPS queues created by nearest; nothing removed.")
    return EXIT_FOUND


def _where(server: str, source: str, timeout: float, as_json: bool) -> int:
    try:
        with Client(server, timeout=timeout) as client:
            where = client.locate().where
    except ServerError as exc:
        print(f"server: {server} (from {source})")
        if exc.code == "unknown-location":
            print(f"the daemon cannot place this machine: {exc.message}")
            return EXIT_NONE
        print(f"nearest: the daemon refused: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ClientError as exc:
        print(f"server: {server} (from {source})")
        print(f"nearest: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps({"server": server, "source": source, "where": where.to_wire()}, indent=2))
    else:
        name = where.zone_name or where.zone
        print(f"server: {server} (from {source})\nwhere:  {name} ({_place(where)})")
    return EXIT_FOUND


if __name__ == "__main__":
    sys.exit(main())

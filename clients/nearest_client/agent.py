"""``nearest agent``: one re-evaluation of the default printer after a network change.

NetworkManager's dispatcher (through the user's systemd service) and a user timer call it.
Each call is one short evaluation with a trailing-edge debounce: a call records itself as
the latest trigger, waits ``--settle`` seconds for the network to settle, and hands over to
any newer trigger that arrived meanwhile. Evaluations never overlap (a lock file), and one
that started after this trigger already saw the network this trigger announced.

It never blocks a login: every daemon problem (unreachable, refused, unknown network) is
logged in one line and ends with status 0, keeping the current default.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nearest_client.client import Client, ClientError, ServerError, Unreachable
from nearest_client.cups import Cups, CupsError, DeviceUnusable, Target
from nearest_wire import PAPER_NEEDS, Need

CANDIDATES = 5


def add_parser(sub: Any) -> None:
    """Add the ``agent`` subcommand to the ``nearest`` parser."""
    a = sub.add_parser(
        "agent",
        help="re-evaluate the default printer once (for the NetworkManager hook and timer)",
        description="Make the nearest printer the CUPS default; meant for the NetworkManager "
        "dispatcher and the systemd user timer. Exits 0 whenever the daemon cannot help.",
    )
    a.add_argument("--color", action="store_true", help="the default must print in colour")
    a.add_argument("--duplex", action="store_true", help="the default must print two-sided")
    a.add_argument("--paper", choices=list(PAPER_NEEDS), help="paper size the default needs")
    a.add_argument("--secure", action="store_true", help="reachable over IPPS only")
    a.add_argument(
        "--settle",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="wait this long for the network to settle; a newer trigger takes over (default 2)",
    )
    a.add_argument(
        "--driver-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long CUPS may take to set up a new driverless queue (default 30)",
    )
    a.add_argument("--state-dir", help="where the lock and last result live (default: per user)")
    a.add_argument("--server", dest="server_sub", help=argparse.SUPPRESS)


def state_dir(explicit: str | None = None) -> Path:
    """Return the per-user directory for the lock, trigger and last result."""
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "nearest"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "nearest"


def log(message: str) -> None:
    """Write one log line (journald picks up stderr)."""
    print(f"nearest agent: {message}", file=sys.stderr, flush=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[bool]:
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.1)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run(args: argparse.Namespace, server: str, source: str, timeout: float) -> int:
    """Run one debounced evaluation; return the exit status."""
    directory = state_dir(args.state_dir)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        log(f"cannot use {directory}: {exc.strerror}")
        return 1
    trigger = directory / "trigger"
    token = f"{time.time():.6f} {os.getpid()}"
    triggered_at = time.time()
    _write_atomic(trigger, token)
    if args.settle > 0:
        time.sleep(args.settle)
    with contextlib.suppress(OSError):
        if trigger.read_text() != token:
            log("a newer network event took over")
            return 0
    budget = timeout + args.driver_timeout * CANDIDATES + 30
    with _locked(directory / "lock", budget) as got:
        if not got:
            log("another evaluation is still running; leaving it to that one")
            return 0
        last = _read_last(directory)
        if float(last.get("started", 0)) >= triggered_at:
            log("an evaluation after this event already ran")
            return 0
        started = time.time()
        status, result = _evaluate(args, server, source, timeout)
        result["started"] = started
        result["server"] = server
        with contextlib.suppress(OSError):
            _write_atomic(directory / "last.json", json.dumps(result))
        return status


def _read_last(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / "last.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _evaluate(
    args: argparse.Namespace, server: str, source: str, timeout: float
) -> tuple[int, dict[str, Any]]:
    need = Need(
        color=args.color,
        duplex=args.duplex,
        secure=args.secure,
        paper=PAPER_NEEDS[args.paper] if args.paper else None,
    )
    try:
        with Client(server, timeout=timeout) as client:
            reply = client.nearest("printer", need, CANDIDATES)
    except ServerError as exc:
        if exc.code == "unknown-location":
            log(f"{server} does not know this network; keeping the current default")
        else:
            log(f"{server} refused ({exc.code}: {exc.message}); keeping the current default")
        return 0, {"result": exc.code}
    except Unreachable as exc:
        log(f"{exc} (server from {source}); keeping the current default")
        return 0, {"result": "unreachable"}
    except ClientError as exc:
        log(f"{exc}; keeping the current default")
        return 0, {"result": "error"}
    devices = reply.devices
    if not devices:
        log("no printer matches here; keeping the current default")
        return 0, {"result": "none"}
    cups = Cups(interactive=False, driver_timeout=args.driver_timeout)
    for device in devices:
        target = Target.from_reply(device)
        try:
            outcome = cups.apply(target)
        except DeviceUnusable as exc:
            log(str(exc))
            continue
        except CupsError as exc:
            log(str(exc))
            return 1, {"result": "cups-error", "message": str(exc)}
        if outcome.default_changed:
            log(f"default printer is now {outcome.queue} ({target.name}, {target.location})")
        else:
            log(f"default printer stays {outcome.queue} ({target.name})")
        return 0, {"result": "ok", **outcome.to_json()}
    log("none of the nearest printers can be set up driverless; keeping the current default")
    return 0, {"result": "unusable"}

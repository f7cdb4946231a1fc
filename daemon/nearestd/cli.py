"""The ``nearestd`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys

from nearestd import __version__
from nearestd.config import ConfigError, load_config
from nearestd.loader import load_world
from nearestd.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    p = argparse.ArgumentParser(
        prog="nearestd", description="Answer 'which printer or scanner is nearest to me?'"
    )
    p.add_argument("--config", "-c", default="/etc/nearestd/nearestd.toml", help="TOML config file")
    p.add_argument("--check", action="store_true", help="validate config and site maps, then exit")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    p.add_argument("--version", action="version", version=f"nearestd {__version__}")
    return p


def check(path: str) -> int:
    """Validate config and site maps; print every problem; return the exit status."""
    try:
        world = load_world(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return 1
    sm = world.sitemap
    print(
        f"ok: {len(sm.zones)} zones, {len(sm.prefixes)} prefixes, "
        f"{len(sm.static_devices)} static devices, {len(sm.pins)} pins"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the daemon or the check."""
    args = build_parser().parse_args(argv)
    if args.check:
        return check(args.config)
    try:
        cfg = load_config(args.config)
        setup_logging(cfg.logging.format, args.log_level or cfg.logging.level, cfg.privacy.log_ip)
    except ConfigError:
        setup_logging("kv", args.log_level or "info", "none")
    from nearestd.app import serve

    try:
        return asyncio.run(serve(args.config))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

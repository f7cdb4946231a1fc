"""Run the benchmark sections; each prints its figures with the same run's baseline beside them.

Usage: python -m bench [SECTION ...]   (default: every section)
A section is a module bench/<name>.py with a ``main() -> None`` function.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time

SECTIONS = ["startup", "resolver", "reload", "discovery", "mqtt", "floods", "poller", "sites", "dnssd", "web"]


def main(argv: list[str]) -> int:
    wanted = argv or SECTIONS
    print(
        f"# nearest-peripheral bench on {platform.node()} ({platform.processor() or platform.machine()}), "
        f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    failed = []
    for name in wanted:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                print(f"\n## {name}: not present")
                continue
            raise
        print(f"\n## {name}", flush=True)
        t0 = time.monotonic()
        try:
            mod.main()
        except Exception as exc:  # a broken section must not hide the others' figures
            failed.append(name)
            print(f"!! section {name} failed: {type(exc).__name__}: {exc}")
        print(f"(section {name} took {time.monotonic() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

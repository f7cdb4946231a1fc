"""Write docs/configuration.md from the typed config model (run: make docs)."""

from __future__ import annotations

import sys
from pathlib import Path

from nearestd.config import SECTIONS, section_docs

OUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `daemon/nearestd/config.py` by `make docs`; a test keeps it in step.",
        'One TOML file; paths are relative to it; durations are strings like `"90s"`, `"10m"`, `"24h"`.',
        "Unknown sections or keys and wrong types are errors naming the file, key path and expected type.",
        "Socket URLs, HOST:PORT addresses, broker URLs, CIDR prefixes and octal modes are parsed",
        "once, when the file is read, into typed values (`SocketUrl`, `HostPort`, `AddressPort`,",
        "`BrokerUrl`, `Cidr`, `Mode` in `config.py`); a bad one names its key and list index.",
        "",
    ]
    for name, rows in section_docs().items():
        doc = (SECTIONS[name].__doc__ or "").strip()
        lines += [f"## `[{name}]`", "", doc, "", "| key | default | meaning |", "|---|---|---|"]
        for key, text, default in rows:
            shown = repr(default).replace("|", "\\|")
            lines.append(f"| `{key}` | `{shown}` | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == render() else 1)
    OUT.write_text(render())

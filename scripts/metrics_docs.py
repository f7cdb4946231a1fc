"""Write docs/metrics.md from the metrics family definitions (run: make docs)."""

from __future__ import annotations

import sys
from pathlib import Path

from nearestd.adapters.metrics import FAMILIES, UNEXPORTED

OUT = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
SHOWN = {
    "": "always",
    "operations": "always",
    "connections": "always",
    "security": "always",
    "discovery": "`[discovery] enabled`",
    "mqtt": "an `[mqtt]` section",
    "poller": "always",
    "dnssd": "a `[dnssd]` section",
    "web": "a `[web]` section",
}


def render() -> str:
    lines = [
        "# Metrics reference",
        "",
        "Generated from `FAMILIES` in `daemon/nearestd/adapters/metrics.py` by `make docs`;",
        "`tests/test_docs.py` keeps it in step and `tests/test_metrics_scrape.py` compares the",
        "families a running daemon serves with this list. Counters are listed as their samples",
        "are named (with `_total`). prometheus-client adds its own `process_*`, `python_info`",
        "and `python_gc_*` families, not listed here.",
        "",
        "No label carries an IP address, pseudonym, URI or client: label values that do not",
        "look like names are folded into `other`. The one family keyed by device id is the",
        "supply level, capped in series; an id that holds an address is left out.",
        "",
        "| family | type | labels | shown | help |",
        "|---|---|---|---|---|",
    ]
    for fam in FAMILIES:
        labels = ", ".join(f"`{label}`" for label in fam.labels) or "–"
        shown = SHOWN.get(fam.section, f"while `{fam.section}` runs")
        lines.append(f"| `{fam.name}` | {fam.type} | {labels} | {shown} | {fam.help} |")
    lines += [
        "",
        "## Figures in `nearestctl stats` on no family",
        "",
        "| section | key | why |",
        "|---|---|---|",
    ]
    for section, keys in sorted(UNEXPORTED.items()):
        for key, why in sorted(keys.items()):
            lines.append(f"| `{section}` | `{key}` | {why} |")
    lines.append("")
    return "\n".join(lines)


def listed(text: str) -> list[str]:
    """Return the family names a rendered docs/metrics.md lists, in order."""
    out = []
    for line in text.splitlines():
        if line.startswith("| `nearest_"):
            out.append(line.split("`")[1])
    return out


if __name__ == "__main__":
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == render() else 1)
    OUT.write_text(render())

"""The documentation stays true to the code."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from support import ROOT, DaemonProcess, tcp_url


def test_configuration_reference_is_current() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_docs.py"), "--check"], timeout=60
    )
    assert r.returncode == 0, "docs/configuration.md is out of date: run `make docs`"


def test_metrics_reference_is_current() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "metrics_docs.py"), "--check"], timeout=60
    )
    assert r.returncode == 0, "docs/metrics.md is out of date: run `make docs`"


def test_readme_names_the_two_commands_and_every_op() -> None:
    text = (ROOT / "README.md").read_text()
    for needle in (
        "make run",
        "make test",
        "make bench",
        "nearest printer",
        "nearestctl",
        "`nearest`",
        "`locate`",
        "`devices`",
        "`ping`",
        "`privacy.export`",
        "`privacy.erase`",
        "`reload`",
        "`stats`",
    ):
        assert needle in text, needle


# ---- every `nearest` / `nearestctl` command the README shows is run --------------------

# Placeholders the README writes in capitals, and what the demo campus answers them with.
PLACEHOLDERS = {
    "IP": "10.20.50.7",
    "SITE": "hq",
    "BUILDING": "north",
    "LEVEL": "1",
    "P": "A4",
    "S": "0",
    "<kind>": "printer",
    "per_type": "3",  # the [dnssd] key the DNS-SD section names as the -k it answers with
}
# Commands that change the user's CUPS setup: checked to parse here, run for real by the
# CUPS tests (tests/test_cups_queues.py, tests/test_client_agent.py).
CUPS_COMMANDS = ("--set-default", "--forget", "agent")
COMMAND = re.compile(r"^(?:\.venv/bin/)?(nearest|nearestctl)(?: |$)")


def readme_commands() -> list[str]:
    """Return every nearest/nearestctl command in README.md: code spans and sh blocks."""
    text = (ROOT / "README.md").read_text()
    found = []
    in_sh = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_sh = line.strip() == "```sh"
            continue
        if in_sh:
            found.append(line.split("  #", 1)[0].strip())
    found.extend(re.findall(r"`([^`\n]+)`", text))
    # A tool's bare name is a name, not a command.
    return sorted({c for c in found if COMMAND.match(c) and " " in c})


def argv_of(command: str) -> list[str]:
    """Return the argv of a README command: options in brackets given, placeholders filled."""
    command = command.split(" > ", 1)[0].split(" | ", 1)[0]
    words = shlex.split(command.replace("[", "").replace("]", ""))
    words = [PLACEHOLDERS.get(w, w) for w in words]
    words[0] = words[0].rsplit("/", 1)[-1]
    if words[0] == "nearestctl":
        # The daemon under test: its admin socket instead of the example config's.
        while "--config" in words:
            i = words.index("--config")
            del words[i : i + 2]
    return words


def test_the_readme_shows_commands_of_both_tools() -> None:
    commands = readme_commands()
    assert any(c.startswith(".venv/bin/nearest printer") for c in commands), commands
    assert "nearestctl nearest IP printer" in commands
    assert len(commands) >= 15, commands


def test_every_readme_command_runs(demo_daemon: DaemonProcess, tmp_path: Path) -> None:
    from nearest_client.cli import build_parser as nearest_parser
    from nearestd.ctl import build_parser as ctl_parser

    env = {**os.environ, "NEAREST_SERVER": tcp_url(demo_daemon.config)}
    env["NEARESTCTL_SOCKET"] = str(demo_daemon.admin)
    failures = []
    for command in readme_commands():
        argv = argv_of(command)
        tool, args = argv[0], argv[1:]
        parser = nearest_parser() if tool == "nearest" else ctl_parser()
        try:
            parser.parse_args(args)
        except SystemExit:
            failures.append(f"{command!r}: does not parse as {argv}")
            continue
        if any(word in CUPS_COMMANDS for word in args):
            continue
        module = "nearest_client.cli" if tool == "nearest" else "nearestd.ctl"
        line = shlex.join([sys.executable, "-m", module, *args])
        if " | " in command:  # run the pipeline as a shell would
            line += " | " + command.split(" | ", 1)[1]
        r = subprocess.run(
            ["bash", "-c", line],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )
        if r.returncode != 0 or not r.stdout.strip() or "Traceback" in r.stderr:
            failures.append(f"{command!r} -> {argv}: exit {r.returncode}: {r.stderr.strip()}")
    assert not failures, "\n".join(failures)

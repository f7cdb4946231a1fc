"""Export and erase appear in the daemon's log (action and count, no address); stats show the log."""

from __future__ import annotations

import time
from pathlib import Path

from nearestd.core.privacy import LocationLog, entry_bytes
from support import DaemonProcess, ask, wait_for, write_config

CLIENT = "10.20.11.77"


def test_export_and_erase_are_logged_without_the_address_and_stats_show_the_log(
    tmp_path: Path,
) -> None:
    d = DaemonProcess(write_config(tmp_path)).wait_ready()
    try:
        before = ask(d, {"v": 1, "id": 1, "op": "stats"}, admin=True)["stats"]
        assert before["location_log_entries"] == 0
        assert before["location_log_bytes"] == 0
        assert before["location_log_oldest_at"] is None
        t0 = time.time()
        for i in range(3):
            ask(d, {"v": 1, "id": i, "op": "locate", "client_ip": CLIENT})
        stats = ask(d, {"v": 1, "id": 4, "op": "stats"}, admin=True)["stats"]
        assert stats["location_log_entries"] == 3
        assert stats["location_log_bytes"] > 0
        assert t0 - 1 <= stats["location_log_oldest_at"] <= time.time()
        assert stats["location_log_oldest_age_s"] >= 0
        exported = ask(d, {"v": 1, "id": 5, "op": "privacy.export", "ip": CLIENT}, admin=True)
        assert len(exported["entries"]) == 3
        erased = ask(d, {"v": 1, "id": 6, "op": "privacy.erase", "ip": CLIENT}, admin=True)
        assert erased["erased"] == 3
        lines = wait_for(
            "both actions in the log",
            lambda: (
                [x for x in d.logs().splitlines() if "location log exported" in x or "erased" in x]
                or None
            ),
            show=d.logs,
        )
        after = ask(d, {"v": 1, "id": 7, "op": "stats"}, admin=True)["stats"]
    finally:
        d.stop()
    exported_line = next(x for x in lines if "location log exported" in x)
    erased_line = next(x for x in lines if "location log erased" in x)
    assert "op=privacy.export" in exported_line and "count=3" in exported_line
    assert "op=privacy.erase" in erased_line and "count=3" in erased_line
    for line in (exported_line, erased_line):
        assert "10.20.11" not in line, line  # neither the address nor its /24
    # What remains: the two actions themselves, recorded with their counts and no pseudonym.
    assert after["location_log_entries"] == 2
    assert 0 < after["location_log_bytes"] < stats["location_log_bytes"] + 1000


def test_the_byte_count_follows_entries_in_and_out() -> None:
    log = LocationLog(10.0, 3, b"k" * 32, 0.0)
    assert (log.bytes, log.oldest) == (0, None)
    for t in range(5):
        log.record("10.0.0.1", "z", "nearest", ("a", "b"), float(t))
    assert len(log) == 3 and log.oldest == 2.0
    assert log.bytes == sum(entry_bytes(e) for e in log.entries())
    log.purge(13.0)
    assert len(log) == 1 and log.bytes == entry_bytes(log._entries[0])
    log.erase("10.0.0.1")
    assert (log.bytes, log.oldest) == (0, None)


def test_nearestctl_stats_shows_the_log_size_and_its_oldest_entry_in_utc(tmp_path: Path) -> None:
    import subprocess
    import sys

    d = DaemonProcess(write_config(tmp_path)).wait_ready()
    try:
        ask(d, {"v": 1, "id": 1, "op": "locate", "client_ip": CLIENT})
        r = subprocess.run(
            [sys.executable, "-m", "nearestd.ctl", "--socket", str(d.admin), "stats"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        d.stop()
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert lines["location_log_entries"] == "1"
    assert int(lines["location_log_bytes"]) > 0
    assert lines["location_log_oldest_at"].endswith("Z"), lines["location_log_oldest_at"]
    assert lines["location_log_oldest_at"].startswith(time.strftime("%Y-", time.gmtime()))

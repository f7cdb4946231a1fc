"""`nearest agent`: debounce, lock, never blocking when the daemon is away; the unit files."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import ROOT, free_port, require_tools

SYSTEMD = ROOT / "systemd"


def agent(state: Path, *args: str, server: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "NEAREST_SERVER": server or f"tcp://127.0.0.1:{free_port()}"}
    return subprocess.Popen(
        [sys.executable, "-m", "nearest_client.cli", "agent", "--state-dir", str(state), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = p.communicate(timeout=60)
    return p.returncode, err


def test_an_unreachable_daemon_is_logged_and_exits_0_at_once(tmp_path: Path) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    code, err = finish(agent(tmp_path, "--settle", "0", server=url))
    elapsed = time.monotonic() - t0
    assert code == 0
    assert err.startswith(f"nearest agent: cannot reach nearestd at {url}: ")
    assert err.rstrip().endswith("(server from NEAREST_SERVER); keeping the current default")
    assert elapsed < 10
    last = json.loads((tmp_path / "last.json").read_text())
    assert last["result"] == "unreachable" and last["server"] == url


def wait_for_trigger(state: Path, p: subprocess.Popen[str]) -> None:
    """Wait until agent ``p`` has recorded itself as the latest trigger."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if (state / "trigger").read_text().split()[1] == str(p.pid):
                return
        except (OSError, IndexError):
            pass
        time.sleep(0.01)
    raise AssertionError("the agent never recorded its trigger")


def test_a_burst_of_events_gives_one_evaluation(tmp_path: Path) -> None:
    first = agent(tmp_path, "--settle", "2")
    wait_for_trigger(tmp_path, first)
    second = agent(tmp_path, "--settle", "0.2")
    (c1, e1), (c2, e2) = finish(first), finish(second)
    assert (c1, c2) == (0, 0)
    assert e1 == "nearest agent: a newer network event took over\n"
    assert "keeping the current default" in e2


def test_waiting_triggers_share_one_evaluation(tmp_path: Path) -> None:
    # Hold the evaluation lock, as a running evaluation would.
    with open(tmp_path / "lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        a = agent(tmp_path, "--settle", "0")
        wait_for_trigger(tmp_path, a)
        b = agent(tmp_path, "--settle", "0")
        wait_for_trigger(tmp_path, b)
        time.sleep(0.3)
        assert a.poll() is None and b.poll() is None
        fcntl.flock(lock, fcntl.LOCK_UN)
    (ca, ea), (cb, eb) = finish(a), finish(b)
    assert (ca, cb) == (0, 0)
    logs = sorted([ea, eb], key=lambda e: "already ran" in e)
    assert "keeping the current default" in logs[0]
    assert logs[1] == "nearest agent: an evaluation after this event already ran\n"


def test_state_dir_is_private_and_per_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert finish(agent(state, "--settle", "0"))[0] == 0
    assert state.stat().st_mode & 0o777 == 0o700


def test_agent_refuses_bad_options() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "nearest_client.cli", "agent", "--paper", "B5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "invalid choice: 'B5'" in r.stderr


def test_unit_files_verify() -> None:
    require_tools("systemd-analyze")
    env = {**os.environ, "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp")}
    r = subprocess.run(
        ["systemd-analyze", "verify", "--user"]
        + [str(SYSTEMD / n) for n in ("nearest-agent.service", "nearest-agent.timer")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    # verify exits 0 even for unknown keys; its warnings go to stderr.
    assert r.returncode == 0 and r.stderr == "", r.stderr
    service = (SYSTEMD / "nearest-agent.service").read_text()
    assert "ExecStart=/usr/bin/env nearest agent --settle 2\n" in service
    assert "Type=oneshot\n" in service
    # Nothing waits for the agent at login: the service has no [Install] of its own.
    assert "[Install]" not in service
    assert "WantedBy=timers.target" in (SYSTEMD / "nearest-agent.timer").read_text()


@pytest.fixture
def dispatcher_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose systemctl records its arguments, and a fake /run/user with uid 0."""
    require_tools("sh", "id", "timeout")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    stub = bin_dir / "systemctl"
    stub.write_text(
        '#!/bin/sh\necho "$*" >> "$CALLS"\n'
        'case "$*" in *is-enabled*) exit "${ENABLED_STATUS:-0}";; esac\nexit 0\n'
    )
    stub.chmod(0o755)
    runtime = tmp_path / "run-user"
    (runtime / "0").mkdir(parents=True)
    (runtime / "not-a-uid").mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(calls),
        "NEAREST_RUNTIME_ROOT": str(runtime),
    }
    return env, calls


def dispatch(env: dict[str, str], *args: str) -> int:
    script = SYSTEMD / "90-nearest-dispatcher"
    shell = shutil.which("dash") or "sh"
    return subprocess.run([shell, str(script), *args], env=env, timeout=30).returncode


def test_dispatcher_starts_the_users_agent_on_network_events(
    dispatcher_env: tuple[dict[str, str], Path],
) -> None:
    env, calls = dispatcher_env
    assert os.access(SYSTEMD / "90-nearest-dispatcher", os.X_OK)
    assert dispatch(env, "wlan0", "up") == 0
    user = subprocess.run(["id", "-nu", "0"], capture_output=True, text=True).stdout.strip()
    assert calls.read_text().splitlines() == [
        f"--user --machine={user}@ --quiet is-enabled nearest-agent.timer",
        f"--user --machine={user}@ --no-block start nearest-agent.service",
    ]


def test_dispatcher_ignores_other_events_and_users_without_the_timer(
    dispatcher_env: tuple[dict[str, str], Path],
) -> None:
    env, calls = dispatcher_env
    for action in ("pre-up", "hostname", "reapply", ""):
        assert dispatch(env, "eth0", action) == 0
    assert not calls.exists()
    assert dispatch({**env, "ENABLED_STATUS": "1"}, "eth0", "vpn-up") == 0
    assert calls.read_text().splitlines() == [
        f"--user --machine={line}@ --quiet is-enabled nearest-agent.timer"
        for line in [
            subprocess.run(["id", "-nu", "0"], capture_output=True, text=True).stdout.strip()
        ]
    ]

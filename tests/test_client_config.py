"""Client configuration (NEAREST_SERVER, client.toml, defaults), `--where` and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nearest_client import DEFAULT_SOCKET, DEFAULT_TCP, ClientError, default_server
from support import DaemonProcess, free_port, tcp_url


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("NEAREST_SERVER",)}
    return subprocess.run(
        [sys.executable, "-m", "nearest_client.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def fallback() -> tuple[str, str]:
    if Path(DEFAULT_SOCKET).exists():
        return f"unix://{DEFAULT_SOCKET}", "default socket"
    return DEFAULT_TCP, "default TCP port"


def test_nearest_server_wins_over_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "client.toml"
    conf.write_text('server = "tcp://10.0.0.1:7310"\n')
    env = {"NEAREST_SERVER": "unix:///tmp/x.sock", "NEAREST_CLIENT_CONFIG": str(conf)}
    assert default_server(env) == ("unix:///tmp/x.sock", "NEAREST_SERVER")


def test_the_config_file_comes_next(tmp_path: Path) -> None:
    conf = tmp_path / "client.toml"
    conf.write_text('# where the site daemon is\nserver = "tcp://nearest.example:7310"\n')
    assert default_server({"NEAREST_CLIENT_CONFIG": str(conf)}) == (
        "tcp://nearest.example:7310",
        str(conf),
    )
    # An explicit path argument beats the environment.
    other = tmp_path / "other.toml"
    other.write_text('server = "unix:///run/other.sock"\n')
    assert default_server({"NEAREST_CLIENT_CONFIG": str(conf)}, str(other))[0] == (
        "unix:///run/other.sock"
    )


def test_without_env_or_file_the_daemon_default_is_used(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert default_server({"NEAREST_CLIENT_CONFIG": str(missing)}) == fallback()
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert default_server({"NEAREST_CLIENT_CONFIG": str(empty)}) == fallback()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = tcp://x:1\n", "not valid TOML: Invalid value (at line 1, column 10)"),
        ('servr = "tcp://x:1"\n', "unknown key 'servr' (known: server)"),
        ("server = 7310\n", "server: expected a string tcp://HOST:PORT or unix:///PATH"),
        ('server = "http://x:1"\n', "server: expected a string tcp://HOST:PORT or unix:///PATH"),
        ('server = "tcp://x"\n', "bad server URL 'tcp://x': expected tcp://HOST:PORT"),
    ],
)
def test_a_broken_config_file_is_named_with_its_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    conf = tmp_path / "client.toml"
    conf.write_text(text)
    with pytest.raises(ClientError) as err:
        default_server({"NEAREST_CLIENT_CONFIG": str(conf)})
    assert str(err.value).endswith(message)
    assert str(conf) in str(err.value) or "bad server URL" in str(err.value)
    r = run("printer", env={"NEAREST_CLIENT_CONFIG": str(conf)})
    assert r.returncode == 2
    assert r.stderr.startswith("nearest: ") and message in r.stderr
    assert "Traceback" not in r.stderr


def test_where_names_the_server_and_the_place(tmp_path: Path, demo_daemon: DaemonProcess) -> None:
    conf = tmp_path / "client.toml"
    url = tcp_url(demo_daemon.config)
    conf.write_text(f'server = "{url}"\n')
    r = run("--where", env={"NEAREST_CLIENT_CONFIG": str(conf)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"server: {url} (from {conf})",
        "where:  North lobby (hq / north / level 0 / n0-lobby)",
    ]
    sock = f"unix://{demo_daemon.config.parent / 'query.sock'}"
    r = run("--where", "--json", env={"NEAREST_SERVER": sock})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["server"] == sock and out["source"] == "NEAREST_SERVER"
    assert out["where"]["zone"] == "n0-lobby"
    r = run("--server", url, "--where")
    assert r.stdout.startswith(f"server: {url} (from --server)\n")


def test_where_says_which_server_it_could_not_reach() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    r = run("--where", env={"NEAREST_SERVER": url})
    assert r.returncode == 3
    assert r.stdout == f"server: {url} (from NEAREST_SERVER)\n"
    assert r.stderr.startswith(f"nearest: cannot reach nearestd at {url}: ")


def test_exit_codes(demo_daemon: DaemonProcess) -> None:
    url = tcp_url(demo_daemon.config)
    assert run("--server", url, "printer").returncode == 0
    none = run("--server", url, "printer", "--paper", "A2", "--duplex")
    assert none.returncode == 1
    assert none.stderr == "nearest: no printer matches what you asked for\n"
    assert run("--server", url).returncode == 2
    assert run("--server", url, "printer", "-k", "21").returncode == 2
    assert run("--server", url, "printer", "--set-default", "--forget").returncode == 2
    assert run("--server", url, "printer", "--paper", "B5").returncode == 2
    dead = run("--server", f"tcp://127.0.0.1:{free_port()}", "printer", "--set-default")
    assert dead.returncode == 3
    assert "Traceback" not in dead.stderr

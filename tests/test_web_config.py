"""[web]: off unless set, loopback by default, a token required anywhere else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nearestd.config import ConfigError, is_loopback_host, load_config, parse_config
from nearestd.loader import web_token
from support import CONFIG_DIR


def test_web_is_off_unless_set_and_on_at_loopback_in_the_example() -> None:
    assert parse_config("", "f.toml").web is None
    assert parse_config("[web]\n", "f.toml").web is not None
    example = load_config(CONFIG_DIR / "example.toml")
    assert example.web is not None
    assert example.web.listen == "127.0.0.1:9465"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[web]\nlisten = 'nowhere'\n", "f.toml: [web] listen: expected HOST:PORT, got 'nowhere'"),
        ("[web]\nlisten = 'h:99999'\n", "f.toml: [web] listen: expected HOST:PORT"),
        (
            "[web]\nlisten = '0.0.0.0:9465'\n",
            "f.toml: [web] listen: '0.0.0.0:9465' is not a loopback address; set token_file",
        ),
        (
            "[web]\nlisten = '[::]:9465'\n",
            "f.toml: [web] listen: '[::]:9465' is not a loopback address; set token_file",
        ),
        (
            "[web]\nlisten = 'printers.example:80'\n",
            "f.toml: [web] listen: 'printers.example:80' is not a loopback address",
        ),
        ("[web]\ntoken_file = 3\n", "f.toml: [web] token_file: expected a string, got 3"),
        ("[web]\nport = 3\n", "f.toml: [web] port: unknown key"),
    ],
)
def test_web_config_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "f.toml")
    assert any(p.startswith(expected) for p in ei.value.problems), ei.value.problems


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.1", False),
        ("printers.example", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_token_file_is_read_and_checked(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("s3cret-token-0123456789\n")
    cfg = parse_config(f"[web]\nlisten = '0.0.0.0:1'\ntoken_file = '{tok}'\n", "f.toml")
    assert web_token(cfg) == "s3cret-token-0123456789"
    tok.write_text("short")
    with pytest.raises(ConfigError, match="token_file: expected one token of 16"):
        web_token(cfg)
    tok.unlink()
    with pytest.raises(ConfigError, match="token_file: cannot read"):
        web_token(cfg)


def _check(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nearestd.cli", "--config", str(cfg), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_refuses_a_public_listen_without_a_token(tmp_path: Path) -> None:
    maps = CONFIG_DIR / "sites"
    site = f"[site]\nmaps = ['{maps / 'campus.geojson'}']\n"
    cfg = tmp_path / "c.toml"
    cfg.write_text(site + "[web]\nlisten = '0.0.0.0:9465'\n")
    r = _check(cfg)
    assert r.returncode == 1
    assert "[web] listen: '0.0.0.0:9465' is not a loopback address; set token_file" in r.stderr
    tok = tmp_path / "tok"
    tok.write_text("0123456789abcdef0123\n")
    cfg.write_text(site + f"[web]\nlisten = '0.0.0.0:9465'\ntoken_file = '{tok}'\n")
    r = _check(cfg)
    assert r.returncode == 0, r.stderr
    cfg.write_text(site + "[web]\nlisten = '0.0.0.0:9465'\ntoken_file = 'absent'\n")
    r = _check(cfg)
    assert r.returncode == 1
    assert "[web] token_file: cannot read" in r.stderr

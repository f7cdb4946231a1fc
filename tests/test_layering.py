"""Imports point inward: adapters -> service -> core; the wire package and clients stay apart."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_FORBIDDEN = {
    "asyncio",
    "socket",
    "logging",
    "random",
    "secrets",
    "time",
    "os",
    "subprocess",
    "threading",
    "aiomqtt",
    "zeroconf",
    "prometheus_client",
    "nearestd.adapters",
    "nearestd.service",
    "nearestd.app",
}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def _hits(mods: set[str], forbidden: set[str]) -> set[str]:
    return {m for m in mods for f in forbidden if m == f or m.startswith(f + ".")}


def test_core_is_pure() -> None:
    for path in (ROOT / "daemon/nearestd/core").glob("*.py"):
        assert not _hits(imports(path), CORE_FORBIDDEN), path


def test_wire_imports_neither_daemon_nor_client() -> None:
    for path in (ROOT / "clients/nearest_wire").glob("*.py"):
        assert not _hits(imports(path), {"nearestd", "nearest_client"}), path


def test_client_imports_only_the_wire_package() -> None:
    for path in (ROOT / "clients/nearest_client").glob("*.py"):
        assert not _hits(imports(path), {"nearestd"}), path


def test_service_does_not_import_adapters() -> None:
    assert not _hits(
        imports(ROOT / "daemon/nearestd/service.py"), {"nearestd.adapters", "nearestd.app"}
    )
    for path in (ROOT / "daemon/nearestd/core").glob("*.py"):
        assert not _hits(imports(path), {"nearestd.service"}), path


def test_no_adapter_imports_the_app() -> None:
    """Adapters are components the app lists; none knows the app (not even for typing)."""
    for path in (ROOT / "daemon/nearestd/adapters").glob("*.py"):
        assert not _hits(imports(path), {"nearestd.app"}), path


HOOK_NAMES = {"starters", "stoppers", "reload_hooks", "extra_stats", "reloader"}


def _names(path: Path) -> set[str]:
    """Return every identifier a module defines or uses (names, attributes, defs, arguments)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.arg) or (isinstance(node, ast.keyword) and node.arg):
            out.add(node.arg)
    return out


def test_no_hooks_remain_only_components() -> None:
    """Edges join the app one way: as components, not attach_* functions or hook lists."""
    for path in (ROOT / "daemon/nearestd").rglob("*.py"):
        names = _names(path)
        assert not names & HOOK_NAMES, (path, names & HOOK_NAMES)
        assert not [n for n in names if n.startswith("attach_")], path


def test_every_component_of_the_app_has_the_component_face(tmp_path: Path) -> None:
    from nearestd.adapters.component import Component
    from nearestd.app import Daemon
    from nearestd.loader import load_world
    from support import write_config

    cfg = write_config(
        tmp_path,
        sections={
            "mqtt": {"url": "mqtt://127.0.0.1:1"},
            "discovery": {"enabled": True, "interfaces": ["lo"]},
        },
    )
    daemon = Daemon(load_world(cfg), str(cfg))  # a sync test: no loop to block
    names = [c.name for c in daemon.components]
    assert names == [
        "inventory",
        "discovery",
        "poller",
        "mqtt",
        "metrics",
        "connections",
        "systemd",
    ]
    for component in daemon.components:
        assert isinstance(component, Component), component
        assert isinstance(component.stats(), Mapping), component.name

"""Imports point inward: adapters -> service -> core; the wire package and clients stay apart."""

from __future__ import annotations

import ast
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

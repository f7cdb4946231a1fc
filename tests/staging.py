"""A world-readable copy of what the tests that run as ``nobody`` need, wherever the checkout is.

A checkout under a directory only root may enter (``/root``, or ``mktemp -d``) is
unreadable to any other user, and so is its virtualenv. The tests that run code as an
unprivileged user (the daemon under the unit's sandbox, ``nearest`` as an ordinary user)
get a staged tree instead, made once per test session in a fresh mode-0755 temporary
directory: a virtualenv without pip whose site-packages holds the project's packages
(copied from this checkout) and its runtime dependencies (hard links, or copies, of the
files each installed distribution lists), the demo site maps, and the test helpers those
users run. Nothing in it is writable by that user.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import venv
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "nearest-peripheral"
PACKAGES = (("daemon", "nearestd"), ("clients", "nearest_client"), ("clients", "nearest_wire"))
HELPERS = ("sandbox_exec.py",)


@dataclass(frozen=True)
class Stage:
    """Where the staged tree is: its python, its copy of the demo config and the helpers."""

    root: Path
    python: str
    config: Path
    tests: Path


def _runtime_distributions() -> list[metadata.Distribution]:
    """Return the installed distributions the project needs at run time (no extras)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [PROJECT]
    while todo:
        name = todo.pop()
        dist = metadata.distribution(name)
        key = (dist.metadata["Name"] or name).lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [d for k, d in seen.items() if k != PROJECT]


def _place(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links refused
        shutil.copy2(src, dest)


def _copy_tree(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@functools.cache
def stage() -> Stage:
    """Build the staged tree once per session (removed at exit) and return where it is."""
    root = Path(tempfile.mkdtemp(prefix="nearest-staged-"))
    root.chmod(0o755)
    atexit.register(shutil.rmtree, root, True)
    env = root / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    python = env / "bin" / "python"
    lib = next((env / "lib").glob("python3*"))
    site = lib / "site-packages"
    for dist in _runtime_distributions():
        for item in dist.files or ():
            if ".." in item.parts or item.suffix == ".pyc":
                continue
            src = Path(str(dist.locate_file(item)))
            if src.is_file():
                _place(src, site / item)
    for source_root, package in PACKAGES:
        _copy_tree(ROOT / source_root / package, site / package)
    _copy_tree(ROOT / "config", root / "config")
    (root / "tests").mkdir()
    for helper in HELPERS:
        shutil.copy2(ROOT / "tests" / helper, root / "tests" / helper)
    for path in (root, *root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    return Stage(root, str(python), root / "config", root / "tests")

"""Reads the config file and the site maps it names: the file I/O edge of the core."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nearestd.config import Config, ConfigError, load_config
from nearestd.core.sitemap import Problem, SiteMap, SiteMapError, build_sitemap

MAX_MAP_BYTES = 64 * 1024 * 1024
# GeoJSON needs a handful of levels (a MultiPolygon's positions are 6 deep); Python's
# parser gives up near 1,000 with a RecursionError, which must not become a traceback.
MAX_JSON_DEPTH = 64
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> tuple[int, int] | None:
    """Return (line, column) where JSON text nests deeper than ``limit``, or None."""
    depth = 0
    for m in _JSON_TOKENS.finditer(text):
        ch = m.group()
        if ch in "[{":
            depth += 1
            if depth > limit:
                line = text.count("\n", 0, m.start()) + 1
                return line, m.start() - text.rfind("\n", 0, m.start())
        elif ch in "]}":
            depth -= 1
    return None


@dataclass(frozen=True, slots=True)
class World:
    """A validated config and the site map built from it."""

    config: Config
    sitemap: SiteMap


def _read(path: Path, problems: list[Problem]) -> str | None:
    try:
        if path.stat().st_size > MAX_MAP_BYTES:
            problems.append(Problem(str(path), "file", f"larger than {MAX_MAP_BYTES} bytes"))
            return None
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except FileNotFoundError:
        problems.append(Problem(str(path), "file", "not found"))
    except UnicodeDecodeError:
        problems.append(Problem(str(path), "file", "not UTF-8 text"))
    except OSError as exc:
        problems.append(Problem(str(path), "file", f"cannot read: {exc.strerror or exc}"))
    return None


def load_sitemap(cfg: Config) -> SiteMap:
    """Read and validate every site map and IPAM file the config names."""
    map_problems: list[Problem] = []

    def docs() -> Iterator[tuple[str, Any]]:
        # One parsed document at a time: a large map's objects are freed before the next.
        for name in cfg.site.maps:
            path = cfg.resolve(name)
            text = _read(path, map_problems)
            if text is None:
                continue
            try:
                doc = json.loads(text)
            except RecursionError:
                deep = json_too_deep(text)
                where = f"line {deep[0]} column {deep[1]}" if deep else "file"
                map_problems.append(
                    Problem(str(path), where, f"nested more than {MAX_JSON_DEPTH} levels deep")
                )
                continue
            except json.JSONDecodeError as exc:
                map_problems.append(
                    Problem(
                        str(path),
                        f"line {exc.lineno} column {exc.colno}",
                        f"not valid JSON: {exc.msg}",
                    )
                )
                continue
            del text
            yield str(path), doc
            del doc

    csv_problems: list[Problem] = []
    csvs: list[tuple[str, str]] = []
    for name in cfg.site.subnets:
        path = cfg.resolve(name)
        text = _read(path, csv_problems)
        if text is not None:
            csvs.append((str(path), text))
    problems = map_problems
    try:
        sitemap = build_sitemap(docs(), csvs)
    except RecursionError:
        # A document under the parser's limit but deep enough for a recursive check.
        problems.extend(csv_problems)
        problems.append(Problem("site maps", "file", f"nested more than {MAX_JSON_DEPTH} deep"))
        raise SiteMapError(problems) from None
    except SiteMapError as exc:
        problems.extend(csv_problems)
        problems.extend(exc.problems)
        raise SiteMapError(problems) from None
    problems.extend(csv_problems)
    if problems:
        raise SiteMapError(problems)
    return sitemap


def load_world(path: str | Path) -> World:
    """Load config and site maps; raise ConfigError listing every problem found."""
    cfg = load_config(path)
    try:
        sitemap = load_sitemap(cfg)
    except SiteMapError as exc:
        raise ConfigError([str(p) for p in exc.problems]) from None
    return World(cfg, sitemap)

"""Reads the config file and the site maps it names: the file I/O edge of the core."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import orjson

from nearestd import mapcache
from nearestd.config import Config, ConfigError, load_config
from nearestd.core.sitemap import Problem, SiteMap, SiteMapError, build_sitemap
from nearestd.logs import host_literals

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
    # Writes the compiled site map to the cache (None: loaded from it, or no cache wanted).
    save_cache: Callable[[], None] | None = field(default=None, compare=False)


def _read_bytes(path: Path, problems: list[Problem]) -> bytes | None:
    try:
        if path.stat().st_size > MAX_MAP_BYTES:
            problems.append(Problem(str(path), "file", f"larger than {MAX_MAP_BYTES} bytes"))
            return None
        return path.read_bytes()
    except FileNotFoundError:
        problems.append(Problem(str(path), "file", "not found"))
    except OSError as exc:
        problems.append(Problem(str(path), "file", f"cannot read: {exc.strerror or exc}"))
    return None


def _text(path: Path, data: bytes, problems: list[Problem]) -> str | None:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        problems.append(Problem(str(path), "file", "not UTF-8 text"))
    return None


def _read(path: Path, problems: list[Problem]) -> str | None:
    data = _read_bytes(path, problems)
    return None if data is None else _text(path, data, problems)


def _cache_key(cfg: Config) -> bytes | None:
    """Return the cache key of the config's map files, or None when one cannot be read."""
    key = mapcache.KeyHasher()
    for kind, names in (("map", cfg.site.maps), ("csv", cfg.site.subnets)):
        for name in names:
            path = cfg.resolve(name)
            try:
                if path.stat().st_size > MAX_MAP_BYTES:
                    return None
                # One file at a time: a large map is never held whole just to be hashed.
                key.add(f"{kind}:{path}", path.read_bytes())
            except OSError:
                return None
    return key.digest()


def load_sitemap(cfg: Config) -> SiteMap:
    """Read and validate every site map and IPAM file the config names."""
    map_problems: list[Problem] = []

    def docs() -> Iterator[tuple[str, Any]]:
        # One parsed document at a time: a large map's objects are freed before the next.
        for name in cfg.site.maps:
            path = cfg.resolve(name)
            data = _read_bytes(path, map_problems)
            if data is None:
                continue
            # orjson reads the UTF-8 bytes as they are (no text made); the text is made only
            # for the standard parser, which decides whatever orjson refuses, with its words.
            start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
            try:
                doc = orjson.loads(memoryview(data)[start:])
            except orjson.JSONDecodeError:
                pass
            else:
                del data
                yield str(path), doc
                del doc
                continue
            text = _text(path, data, map_problems)
            del data
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


MAX_TOKEN_BYTES = 4096


def web_token(cfg: Config) -> str | None:
    """Return the web view's bearer token (None: none needed), or raise ConfigError."""
    if cfg.web is None or not cfg.web.token_file:
        return None
    path = cfg.resolve(cfg.web.token_file)
    try:
        raw = path.read_bytes()[: MAX_TOKEN_BYTES + 1]
    except OSError as exc:
        raise ConfigError(
            [f"{path}: [web] token_file: cannot read: {exc.strerror or exc}"]
        ) from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: [web] token_file: expected ASCII text"]) from None
    if len(raw) > MAX_TOKEN_BYTES or len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(
            [f"{path}: [web] token_file: expected one token of 16 to {MAX_TOKEN_BYTES} characters"]
        )
    return token


def load_world(path: str | Path, use_cache: bool = False) -> World:
    """Load config and site maps; raise ConfigError listing every problem found.

    With ``use_cache``, a compiled map in ``state_dir`` made from the very same files is
    used instead of validating them again; otherwise the returned world can write one.
    """
    cfg = load_config(path)
    web_token(cfg)
    key = _cache_key(cfg) if use_cache and cfg.site.maps else None
    state_dir = cfg.resolve(cfg.daemon.state_dir)
    if key is not None:
        cached = mapcache.load(state_dir, key)
        if cached is not None:
            return World(cfg, cached)
    try:
        sitemap = load_sitemap(cfg)
    except SiteMapError as exc:
        raise ConfigError([str(p) for p in exc.problems]) from None
    if key is None:
        return World(cfg, sitemap)

    def save() -> None:
        # The files may have changed while they were validated: then this map is not theirs.
        if _cache_key(cfg) == key:
            mapcache.save(state_dir, key, sitemap)

    return World(cfg, sitemap, save)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            yield from _strings(getattr(value, f.name))
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)


_ADDRESS_START = frozenset("0123456789[")


def config_addresses(cfg: Config) -> set[str]:
    """Return the host addresses the config names (not personal data)."""
    found: set[str] = set()
    for text in _strings(cfg):
        found |= host_literals(text)
    return found


def map_addresses(sitemap: SiteMap) -> set[str]:
    """Return the host addresses the site maps' static devices and pins name."""
    found: set[str] = set()
    for device, _ in sitemap.static_devices:
        host = device.uri.partition("://")[2].partition("/")[0].rpartition("@")[2]
        # Most devices have names: only an address-like host is worth parsing.
        if host[:1] in _ADDRESS_START:
            found |= host_literals(host)
    for pin in sitemap.pins:
        if pin.field == "ip":
            found |= host_literals(pin.value)
    return found

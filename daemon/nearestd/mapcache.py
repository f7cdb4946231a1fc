"""The compiled site map in ``state_dir``: a validated map loaded with one read at start.

Validating a large map (tens of MB of GeoJSON) takes seconds; the result depends only on
the map and IPAM files (their paths, in order, and their bytes) and on this code. The
cache is keyed by a hash of exactly that, never by anything a client sent, and only a
map that passed validation is written. A cache that is corrupt, truncated, of another
format version or for other files is ignored (and rebuilt from the files); so a stale
cache can never change an answer or hide a validation error.

The payload is a pickle written by this daemon into its own 0700 directory (the file
0600); it is only unpickled when the file is owned by the daemon's user and writable by
nobody else, and after its SHA-256 digest (stored in the header) matches, so a torn or
bit-flipped file is refused before it is decoded.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import pickle
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO

import pytricia
import shapely

from nearestd.core.model import Capabilities, Device, Placement, Zone
from nearestd.core.sitemap import Pin, PrefixTable, SiteMap
from nearestd.core.visibility import VisibilityPolicy

LOG = logging.getLogger("nearestd.mapcache")
FILE_NAME = "sitemap.cache"
# Bump whenever SiteMap or anything it holds changes shape or meaning.
FORMAT = 3
MAGIC = b"NEARESTD-SITEMAP\n"
_DIGEST = 32
_HEADER = len(MAGIC) + 4 + _DIGEST + _DIGEST
_CHUNK = 1 << 20


class KeyHasher:
    """The key of a set of map files: their paths, in order, and their bytes, one at a time."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(
            f"format {FORMAT} python {sys.version_info[:2]} shapely {shapely.__version__}".encode()
        )

    def add(self, path: str, data: bytes) -> None:
        """Add one file."""
        self._hash.update(b"\0file\0" + path.encode("utf-8", "surrogateescape") + b"\0")
        self._hash.update(len(data).to_bytes(8, "big"))
        self._hash.update(data)

    def digest(self) -> bytes:
        """Return the key."""
        return self._hash.digest()


def _tricia(bits: int, items: list[tuple[str, Any]]) -> pytricia.PyTricia:
    tree = pytricia.PyTricia(bits)
    for key, value in items:
        tree[key] = value
    return tree


def _prefixes(items: list[tuple[str, str]]) -> PrefixTable:
    table = PrefixTable()
    for key, zid in items:
        # Keys are already canonical (str of a validated network): no re-parsing.
        tree = table._v6 if ":" in key else table._v4
        tree[key] = zid
    return table


def _policy(state: tuple[Any, ...]) -> VisibilityPolicy:
    rules, zone_restrict, device_restrict, zone_sees, v4, v6 = state
    return VisibilityPolicy(
        rules,
        zone_restrict,
        device_restrict,
        zone_sees,
        None if v4 is None else _tricia(32, v4),
        None if v6 is None else _tricia(128, v6),
    )


def _items(tree: pytricia.PyTricia | None) -> list[tuple[str, Any]] | None:
    return None if tree is None else [(key, tree[key]) for key in tree]


_PLAIN = {
    cls: tuple(f.name for f in fields(cls)) for cls in (Device, Placement, Capabilities, Pin, Zone)
}


class _Pickler(pickle.Pickler):
    """Pickles frozen dataclasses as constructor calls and pytricia trees as item lists."""

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        names = _PLAIN.get(cls)
        if names is not None:
            return cls, tuple(getattr(obj, n) for n in names)
        if cls is PrefixTable:
            return _prefixes, (list(obj.items()),)
        if cls is VisibilityPolicy:
            return _policy, (
                (
                    obj.rules,
                    obj.zone_restrict,
                    obj.device_restrict,
                    obj.zone_sees,
                    _items(obj._v4),
                    _items(obj._v6),
                ),
            )
        return NotImplemented


class _HashingFile:
    """A file that also hashes what is written to it, so the payload is never held whole."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.hash.update(view)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(data)


def write(path: Path, key: bytes, sitemap: SiteMap) -> None:
    """Write the cache file for a validated site map atomically (temporary file, rename)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            head = MAGIC + FORMAT.to_bytes(4, "big") + key
            os.write(fd, head + bytes(_DIGEST))
            out = _HashingFile(fd)
            _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(sitemap)
            os.pwrite(fd, out.hash.digest(), len(head))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def decode(key: bytes, fh: BinaryIO) -> SiteMap | None:
    """Return the site map of a cache file made for ``key``, or None if it is not one.

    The payload is read twice from the page cache rather than held whole: once to check
    its digest, once by the unpickler, which streams it (tens of MB less at the peak).
    """
    head = fh.read(_HEADER)
    if len(head) < _HEADER or not head.startswith(MAGIC):
        return None
    at = len(MAGIC)
    if int.from_bytes(head[at : at + 4], "big") != FORMAT:
        return None
    at += 4
    if head[at : at + _DIGEST] != key:
        return None
    at += _DIGEST
    digest = hashlib.sha256()
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
    if digest.digest() != head[at : at + _DIGEST]:
        return None
    fh.seek(_HEADER)
    # Hundreds of thousands of objects and no cycles: the collector would only slow this.
    enabled = gc.isenabled()
    gc.disable()
    try:
        sitemap = pickle.load(fh)
    except Exception:
        return None
    finally:
        if enabled:
            gc.enable()
    if not isinstance(sitemap, SiteMap):
        return None
    polygons = [z.polygon for z in sitemap.zones.values()]
    if not all(isinstance(z, Zone) for z in sitemap.zones.values()):
        return None
    shapely.prepare(polygons)
    return sitemap


def load(state_dir: Path, key: bytes) -> SiteMap | None:
    """Return the cached site map for ``key``, or None (missing, stale or corrupt)."""
    path = state_dir / FILE_NAME
    try:
        with open(path, "rb", buffering=_CHUNK) as fh:
            st = os.fstat(fh.fileno())
            # Unpickling runs code named in the file: only a file this daemon's user wrote
            # and nobody else could have changed is read (the digest only catches damage).
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                LOG.warning(
                    "site map cache ignored: not owned by this user or writable by others",
                    extra={"path": str(path)},
                )
                return None
            sitemap = decode(key, fh)
    except FileNotFoundError:
        return None
    except OSError as exc:
        LOG.warning("site map cache unreadable", extra={"error": f"{path}: {exc.strerror}"})
        return None
    if sitemap is None:
        LOG.info("site map cache stale or corrupt: rebuilding", extra={"path": str(path)})
    return sitemap


def save(state_dir: Path, key: bytes, sitemap: SiteMap) -> None:
    """Write the cache for ``key``; a failure is logged, never raised (the cache is optional)."""
    path = state_dir / FILE_NAME
    try:
        write(path, key, sitemap)
    except (OSError, pickle.PicklingError) as exc:
        LOG.warning("site map cache not written", extra={"error": f"{path}: {exc}"})

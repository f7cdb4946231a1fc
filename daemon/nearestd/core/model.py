"""Value types shared by the core: devices, zones, placements, capabilities."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from typing import Any, TypeVar

from shapely.geometry.base import BaseGeometry

from nearest_wire import PAPER_CLASSES

DeviceId = str
T = TypeVar("T")


class DeviceKind(StrEnum):
    """What a device does for a user."""

    PRINTER = "printer"
    SCANNER = "scanner"


class DeviceState(StrEnum):
    """Operational state; only some states are served."""

    UNKNOWN = "unknown"
    IDLE = "idle"
    PROCESSING = "processing"
    STOPPED = "stopped"
    UNREACHABLE = "unreachable"


class PlacementMethod(StrEnum):
    """How a device's position was decided, in the contract's order."""

    STATIC = "static"
    PIN = "pin"
    GEO = "geo"
    NOTE = "note"
    LOCATION = "location"
    SUBNET = "subnet"
    FEDERATED = "federated"


_PAPER_RANK = {paper: i for i, paper in enumerate(PAPER_CLASSES)}


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a device can do; a capability it does not state counts as absent."""

    color: bool = False
    duplex: bool = False
    paper_max: str | None = None
    adf: bool = False
    secure: bool = False

    @property
    def paper_rank(self) -> int:
        """Return the PaperMax class index, or -1 when unstated."""
        if self.paper_max is None:
            return -1
        return _PAPER_RANK[self.paper_max]

    def to_wire(self) -> dict[str, Any]:
        """Return the map sent to clients."""
        return {
            "color": self.color,
            "duplex": self.duplex,
            "paper_max": self.paper_max,
            "adf": self.adf,
            "secure": self.secure,
        }


@dataclass(frozen=True, slots=True)
class Supply:
    """One supply a device reports: name, type and level in percent (None when unknown)."""

    name: str
    type: str
    level: int | None

    def to_wire(self) -> dict[str, Any]:
        """Return the map sent to clients."""
        return {"name": self.name, "type": self.type, "level": self.level}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One way to reach a device: a service type and the URI built from it."""

    service: str
    uri: str
    port: int = 0


@dataclass(frozen=True, slots=True)
class Device:
    """A printer or scanner as the daemon knows it, before placement."""

    id: DeviceId
    kind: DeviceKind
    name: str
    uri: str
    make_model: str = ""
    capabilities: Capabilities = Capabilities()
    source: str = "static"
    state: DeviceState = DeviceState.UNKNOWN
    state_reasons: tuple[str, ...] = ()
    accepting_jobs: bool = True
    stale: bool = False
    uuid: str | None = None
    instance: str | None = None
    host: str | None = None
    addresses: tuple[str, ...] = ()
    note: str | None = None
    location_text: str | None = None
    geo: tuple[float, float] | None = None
    endpoints: tuple[Endpoint, ...] = ()
    origin: str | None = None
    is_queue: bool = False
    # Federated devices: where the origin daemon placed them (site, building, level, zone, lon, lat).
    origin_placement: tuple[str, str, int, str | None, float, float] | None = None
    supplies: tuple[Supply, ...] = ()
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @property
    def available(self) -> bool:
        """Return whether the device may be answered as nearest."""
        return self.accepting_jobs and self.state not in _UNAVAILABLE


# A module constant: looking members up on the enum class costs microseconds per device.
_UNAVAILABLE = frozenset((DeviceState.STOPPED, DeviceState.UNREACHABLE))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a device is: site frame coordinates, floor and zone, and why."""

    site: str
    building: str
    level: int
    zone: str | None
    x: float
    y: float
    lon: float
    lat: float
    method: PlacementMethod


@dataclass(frozen=True, slots=True, eq=False)
class Zone:
    """A polygon on one floor of one building whose clients share a location."""

    id: str
    site: str
    building: str
    level: int
    name: str
    aliases: tuple[str, ...]
    subnets: tuple[str, ...]
    polygon: BaseGeometry
    centroid: tuple[float, float]
    representative: tuple[float, float]
    representative_lonlat: tuple[float, float]
    source: str


def compile_constructor(cls: type[T], *names: str) -> Callable[..., T]:
    """Return a function that builds a frozen, slotted dataclass from ``names``' values.

    Every other field takes its default. The result equals ``cls(**dict(zip(names, args)))``
    (tested); it sets each slot through its descriptor, where a frozen dataclass's own
    ``__init__`` calls ``object.__setattr__`` field by field, and takes about half the time:
    that counts for the 100,000s of devices and placements a large site map declares.
    """
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__, which this would skip")
    all_fields = fields(cls)  # type: ignore[arg-type]
    unknown = set(names) - {f.name for f in all_fields}
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"{cls.__name__}: unknown or repeated fields in {names}")
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    lines = [f"def construct({', '.join(names)}):", "    obj = _new(_cls)"]
    for f in all_fields:
        scope[f"_set_{f.name}"] = cls.__dict__[f.name].__set__
        if f.name in names:
            value = f.name
        elif f.default is not MISSING:
            scope[f"_default_{f.name}"] = f.default
            value = f"_default_{f.name}"
        elif f.default_factory is not MISSING:
            scope[f"_factory_{f.name}"] = f.default_factory
            value = f"_factory_{f.name}()"
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has no default and is not in {names}")
        lines.append(f"    _set_{f.name}(obj, {value})")
    lines.append("    return obj")
    exec("\n".join(lines), scope)  # the same technique as dataclasses' own __init__
    built: Callable[..., T] = scope["construct"]
    return built

"""The census of the device table: every count stats, metrics, STATUS and the poller show.

One pass over the table yields a frozen ``Census``; nobody else counts devices. The one
definition of a device's shown state lives here too (``shown_state``), used by the wire
view, the census (``stats``, metrics, STATUS) and the web view's floor plan alike:

- ``stale`` (a flag) marks a device known but not confirmed now: restored from the
  warm-restart snapshot and not yet heard of again, or federated from an origin that went
  silent. It is counted in ``stale`` whatever its state.
- A device's shown state is ``stopped`` or ``unreachable`` when it is (so that nobody
  reads such a device as usable, stale or not), else ``stale`` when it is stale, else its
  state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Iterable
from dataclasses import dataclass

from nearestd.core.devices import Record
from nearestd.core.model import Device, DeviceState

STALE = "stale"
# Supply readings kept per census: the metrics page and ``stats`` show no more than this.
MAX_SUPPLY_READINGS = 2000
MAX_SUPPLIES_PER_DEVICE = 16


def shown_state(device: Device) -> str:
    """Return the state a device is shown with: stopped/unreachable, else stale, else its state."""
    if device.state in (DeviceState.STOPPED, DeviceState.UNREACHABLE):
        return str(device.state)
    return STALE if device.stale else str(device.state)


@dataclass(frozen=True, slots=True)
class Census:
    """Counts of the device table at one moment; every tuple is sorted."""

    taken: float
    total: int
    by_kind_state: tuple[tuple[tuple[str, str], int], ...]
    stale_by_kind: tuple[tuple[str, int], ...]
    unlocated_by_kind: tuple[tuple[str, int], ...]
    by_site_kind: tuple[tuple[tuple[str, str], int], ...]
    polled_by_state: tuple[tuple[str, int], ...]
    # (device id, supply name, level in percent) of polled devices that report levels.
    supplies: tuple[tuple[str, str, int], ...]

    @property
    def stale(self) -> int:
        """Return how many devices are stale."""
        return sum(n for _, n in self.stale_by_kind)

    @property
    def unlocated(self) -> int:
        """Return how many devices no rule could place."""
        return sum(n for _, n in self.unlocated_by_kind)

    @property
    def polled(self) -> int:
        """Return how many devices the poller asks for their state."""
        return sum(n for _, n in self.polled_by_state)

    def in_state(self, state: str) -> int:
        """Return how many devices show ``state``, of every kind."""
        return sum(n for (_, s), n in self.by_kind_state if s == state)

    def status_line(self, zones: int) -> str:
        """Return the one-line summary systemd's STATUS shows."""
        return (
            f"serving {self.total} devices ({self.unlocated} unlocated, {self.stale} stale) "
            f"in {zones} zones"
        )


def census(
    records: Iterable[Record],
    now: float,
    polled: Container[str] = (),
    max_supplies: int = MAX_SUPPLY_READINGS,
) -> Census:
    """Count the records by kind, shown state, staleness, site, and which ``polled`` holds."""
    by_kind_state: Counter[tuple[str, str]] = Counter()
    stale: Counter[str] = Counter()
    unlocated: Counter[str] = Counter()
    by_site: Counter[tuple[str, str]] = Counter()
    polled_states: Counter[str] = Counter()
    supplies: list[tuple[str, str, int]] = []
    total = 0
    for rec in records:
        d = rec.device
        kind = str(d.kind)
        state = shown_state(d)
        total += 1
        by_kind_state[(kind, state)] += 1
        if d.stale:
            stale[kind] += 1
        if rec.placement is None:
            unlocated[kind] += 1
        else:
            by_site[(rec.placement.site, kind)] += 1
        if d.id not in polled:
            continue
        polled_states[state] += 1
        for supply in d.supplies[:MAX_SUPPLIES_PER_DEVICE]:
            if supply.level is not None and len(supplies) < max_supplies:
                supplies.append((d.id, supply.name, supply.level))
    return Census(
        taken=now,
        total=total,
        by_kind_state=tuple(sorted(by_kind_state.items())),
        stale_by_kind=tuple(sorted(stale.items())),
        unlocated_by_kind=tuple(sorted(unlocated.items())),
        by_site_kind=tuple(sorted(by_site.items())),
        polled_by_state=tuple(sorted(polled_states.items())),
        supplies=tuple(sorted(supplies)),
    )

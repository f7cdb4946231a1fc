"""The README's ranking section states the tie-break by state that the code applies."""

from __future__ import annotations

from nearestd.core.devices import state_rank
from nearestd.core.model import Device, DeviceKind, DeviceState
from support import ROOT


def _rank(state: DeviceState, accepting: bool = True) -> int:
    return state_rank(
        Device(
            id="d",
            kind=DeviceKind.PRINTER,
            name="d",
            uri="ipp://x/",
            state=state,
            accepting_jobs=accepting,
        )
    )


def test_the_ranking_section_orders_ties_as_the_index_does() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Ranking", 1)[1].split("\n## ", 1)[0]
    formula = section.index("cost = planar_distance")
    trust = section.index("1. by **trust**")
    state = section.index("2. by **state**")
    centroid = section.index("3. then by planar distance to Z's centroid")
    device_id = section.index("4. then by device id")
    assert formula < trust < state < centroid < device_id
    assert "an `idle` device first" in section
    assert "then a `processing` or `unknown` one" in section
    # The code: idle before processing and unknown (equal), then what is unavailable.
    assert _rank(DeviceState.IDLE) == 0
    assert _rank(DeviceState.PROCESSING) == _rank(DeviceState.UNKNOWN) == 1
    assert _rank(DeviceState.STOPPED) == _rank(DeviceState.UNREACHABLE) == 2
    assert _rank(DeviceState.IDLE, accepting=False) == 2

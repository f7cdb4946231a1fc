"""The ranking's parameters: one frozen value, the config's [ranking] section and the index's key."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Ranking:
    """[ranking]: the cost formula's parameters."""

    # The metadata is what the config reader checks and documents (docs/configuration.md).
    floor_penalty_m: float = field(
        default=20.0,
        metadata={"doc": "Metres added per floor of difference.", "range": (0.0, 1_000_000.0)},
    )
    building_penalty_m: float = field(
        default=100.0,
        metadata={"doc": "Metres added for another building.", "range": (0.0, 1_000_000.0)},
    )
    allow_other_sites: bool = field(
        default=False, metadata={"doc": "Answer with devices of other sites."}
    )

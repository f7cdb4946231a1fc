"""Supply levels are exported per device id, bounded, and never with an address."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nearestd.adapters.metrics import MAX_SUPPLY_SERIES, device_label, supply_family, to_metric
from nearestd.core.devices import Record
from nearestd.core.model import Device, DeviceKind, Supply


def rec(device_id: str, *supplies: Supply) -> Record:
    return Record(
        Device(device_id, DeviceKind.PRINTER, "P", "ipp://10.0.0.1/", supplies=supplies), None, 0.0
    )


def test_supply_levels_by_device_and_supply() -> None:
    fam = supply_family(
        [
            rec(
                "prn-n0-lobby",
                Supply("Black Toner", "toner", 75),
                Supply("Waste", "wasteToner", None),
            ),
            rec("mdns-printer-3f5e2c1a-7b1d-4c8e-9a4f-2b6d8e1f0a11", Supply("Cyan", "toner", 10)),
            rec("prn-10.0.0.5", Supply("Black", "toner", 50)),  # an id holding an address: left out
            rec("scn-x"),
        ]
    )

    class One:
        def collect(self):  # type: ignore[no-untyped-def]
            yield to_metric(fam)

    reg = CollectorRegistry()
    reg.register(One())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    parsed = {
        (s.labels["device"], s.labels["supply"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert parsed == {
        # The name as the device reports it, as stats show it: no underscore substitution.
        ("prn-n0-lobby", "Black Toner"): 75.0,
        ("mdns-printer-3f5e2c1a-7b1d-4c8e-9a4f-2b6d8e1f0a11", "Cyan"): 10.0,
    }


def test_supply_series_are_capped() -> None:
    many = [rec(f"d{i}", *(Supply(f"s{j}", "toner", 5) for j in range(20))) for i in range(500)]
    fam = supply_family(many)
    assert len(fam.samples) == MAX_SUPPLY_SERIES
    assert {s[0][1] for s in fam.samples} <= {f"s{j}" for j in range(16)}


def test_device_label_refuses_addresses() -> None:
    assert device_label("prn-n0-lobby") == "prn-n0-lobby"
    for bad in ("10.1.2.3", "prn-10-1-2-3", "fe80::1", "a b", ""):
        assert device_label(bad) == "other"


def _exposed(fam_records: list[Record]) -> dict[tuple[str, str], float]:
    fam = supply_family(fam_records)

    class One:
        def collect(self):  # type: ignore[no-untyped-def]
            yield to_metric(fam)

    reg = CollectorRegistry()
    reg.register(One())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    return {
        (s.labels["device"], s.labels["supply"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_a_supply_keeps_the_name_the_device_reports_escaped_only_by_the_format() -> None:
    names = ["Black Toner", 'Cyan "XL" cartridge', "Drum \\ unit", "Tóner negro", "Waste-Box 2"]
    got = _exposed([rec("prn-a", *(Supply(n, "toner", 10 + i) for i, n in enumerate(names)))])
    assert got == {("prn-a", n): float(10 + i) for i, n in enumerate(names)}


def test_a_supply_name_that_could_carry_an_address_or_a_hash_is_folded() -> None:
    names = [
        "Toner from 10.20.30.40",
        "fe80::1:2 toner",
        "Toner 0123456789abcdef",
        "line\nbreak",
        "x" * 65,
    ]
    got = _exposed([rec("prn-a", *(Supply(n, "toner", 5) for n in names))])
    assert got == {("prn-a", "other"): 5.0}

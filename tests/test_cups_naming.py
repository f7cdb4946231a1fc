"""Queue names, the managed marker and CUPS messages (strings as CUPS 2.4 prints them)."""

from __future__ import annotations

import pytest

from nearest_client.cups import (
    CupsError,
    DeviceUnusable,
    Queue,
    SchedulerError,
    Target,
    ipp_endpoint,
    parse_lpstat_d,
    parse_lpstat_long,
    parse_lpstat_v,
    queue_name,
    translate,
)
from nearest_wire import DeviceView


def test_plain_ids_keep_their_name() -> None:
    assert queue_name("prn-n0-lobby") == "nearest-prn-n0-lobby"
    assert queue_name("a.b_c") == "nearest-a.b_c"


@pytest.mark.parametrize("device_id", ["Prn-A", "prn a", "prn/a", "prn#a", "prn'a", 'p"a', "é"])
def test_ids_cups_would_refuse_get_a_safe_unique_name(device_id: str) -> None:
    name = queue_name(device_id)
    assert name.startswith("nearest-")
    assert all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
    assert name != queue_name(device_id + "x")


def test_ids_that_differ_only_in_case_get_different_queues() -> None:
    # CUPS names are case-insensitive: "Prn-A" must not land on "prn-a"'s queue.
    assert queue_name("Prn-A").lower() != queue_name("prn-a").lower()


def test_long_ids_are_cut_to_cups_limit_and_stay_distinct() -> None:
    a, b = queue_name("x" * 300), queue_name("x" * 299 + "y")
    assert len(a) <= 127 and len(b) <= 127 and a != b


def test_the_marker_survives_any_device_name() -> None:
    t = Target("prn-1", "Lobby (ground floor) printer", "ipp://10.0.0.1/ipp/print")
    assert t.info == "Lobby ground floor printer (managed by nearest: prn-1)"
    assert Queue("q", t.uri, t.info).managed_id == "prn-1"
    assert Queue("q", t.uri, "Office printer").managed_id is None
    assert Queue("q", t.uri, "Managed by someone (managed by nearest: x").managed_id is None


def test_target_location_from_a_reply() -> None:
    t = Target.from_reply(
        DeviceView.from_wire(
            {
                "id": "p",
                "name": "P",
                "kind": "printer",
                "uri": "ipps://h/ipp",
                "site": "hq",
                "building": "n",
                "level": 0,
                "state": "idle",
            }
        )
    )
    assert t.location == "hq / n / level 0"


@pytest.mark.parametrize(
    ("uri", "endpoint"),
    [
        ("ipp://10.0.0.1/ipp/print", ("10.0.0.1", 631)),
        ("ipps://[2001:db8::1]:8443/ipp/print", ("2001:db8::1", 8443)),
        ("socket://10.0.0.1:9100", None),
        ("lpd://10.0.0.1/queue", None),
        ("https://10.0.0.1/eSCL/", None),
        ("ipp://", None),
        ("ipp://h:notaport/", None),
    ],
)
def test_only_ipp_uris_are_driverless(uri: str, endpoint: tuple[str, int] | None) -> None:
    assert ipp_endpoint(uri) == endpoint


def test_lpstat_parsers() -> None:
    assert parse_lpstat_v(
        "device for nearest-a: ipp://127.0.0.1:1/ipp/print\ndevice for office: ipps://h/x\n"
    ) == {"nearest-a": "ipp://127.0.0.1:1/ipp/print", "office": "ipps://h/x"}
    long = (
        "printer nearest-a is idle.  enabled since Fri Nov 27 09:49:37 2026\n"
        "\tForm mounted:\n\tDescription: A (managed by nearest: a)\n\tAlerts: none\n"
        "\tLocation: hq / north\n"
        "printer office disabled since Fri Nov 27 09:49:37 2026 -\n"
        "\tDescription: Office\n\tLocation: \n"
    )
    assert parse_lpstat_long(long) == {
        "nearest-a": ("A (managed by nearest: a)", "hq / north"),
        "office": ("Office", ""),
    }
    assert parse_lpstat_d("system default destination: nearest-a\n") == "nearest-a"
    assert parse_lpstat_d("system default destination: q/copy2\n") == "q"
    assert parse_lpstat_d("no system default destination\n") is None


@pytest.mark.parametrize(
    ("stderr", "kind", "text"),
    [
        ("lpstat: Scheduler is not running.", SchedulerError, "CUPS is not running"),
        (
            "lpadmin: Unable to connect to server: Bad file descriptor",
            SchedulerError,
            "CUPS is not running",
        ),
        ("lpadmin: Forbidden", SchedulerError, "does not allow this user to manage printers"),
        (
            "lpadmin: IPP Everywhere driver requires an IPP connection.",
            DeviceUnusable,
            "no IPP Everywhere endpoint",
        ),
        ('lpadmin: Bad device-uri scheme "socket".', DeviceUnusable, "no IPP Everywhere"),
        ("lpoptions: Unknown printer or class.", CupsError, "CUPS has no such queue"),
        ("lpadmin: Something new", SchedulerError, "CUPS said: Something new."),
        ("", SchedulerError, "CUPS said: nothing (exit status only)."),
    ],
)
def test_cups_messages_become_sentences(stderr: str, kind: type[CupsError], text: str) -> None:
    err = translate(stderr.split(":")[0] or "lpadmin", stderr, "do it", "/run/cups/cups.sock")
    assert type(err) is kind
    assert str(err).startswith("cannot do it: ")
    assert text in str(err)
    assert str(err).endswith(".")

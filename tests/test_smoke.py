from nearest_client import Client
from support import DaemonProcess, tcp_url


def test_demo_daemon_answers_over_tcp_and_unix(demo_daemon: DaemonProcess) -> None:
    with Client(tcp_url(demo_daemon.config)) as c:
        reply = c.nearest("printer")
    assert reply.where.zone == "n0-lobby"
    assert reply.devices[0].id == "prn-n0-lobby"
    with Client(f"unix://{demo_daemon.config.parent / 'query.sock'}") as c:
        assert c.nearest("scanner").devices[0].id == "scn-n0-mailroom"

"""A private mosquitto broker for tests and benches: loopback only, a free port, no persistence."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# Brokers run in their own session (so a test's kill -9 cannot hit pytest): whatever a
# failing test leaves running is stopped when the interpreter exits.
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    _LIVE.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One mosquitto process on 127.0.0.1; it keeps its port across restarts."""

    def __init__(
        self,
        directory: Path | None = None,
        port: int | None = None,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.dir = Path(directory or tempfile.mkdtemp(prefix="mosquitto-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.log_path = self.dir / "mosquitto.log"
        self.conf = self.dir / "mosquitto.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        lines = [
            f"listener {self.port} 127.0.0.1",
            # Without it, QoS 1 round trips stall on Nagle + delayed ACK (about 40 ms each).
            "set_tcp_nodelay true",
            "persistence false",
            # Root would otherwise switch to the 'mosquitto' user, who cannot read our files.
            "user root",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 10000",
        ]
        if tls:
            # (certfile, keyfile): this listener then speaks TLS only.
            lines += [f"certfile {tls[0]}", f"keyfile {tls[1]}"]
        if users:
            pw = self.dir / "passwd"
            pw.write_text("")
            for name, password in users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(pw), name, password],
                    check=True,
                    capture_output=True,
                )
            pw.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        """Return the mqtt:// (or mqtts://) URL of this broker."""
        scheme = "mqtts" if "certfile" in self.conf.read_text() else "mqtt"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start the broker and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        deadline = time.monotonic() + timeout
        while True:
            self.proc = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            _LIVE.add(self.proc)
            if self._wait_listening(deadline):
                return self
            # The port may still be held by the previous incarnation: try again.
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(5)
            self._forget()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"mosquitto did not start: {self.logs()[-2000:]}")
            time.sleep(0.05)

    def _wait_listening(self, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.01)
        return False

    def kill(self) -> None:
        """SIGKILL the broker: no will is lost, no session survives (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._forget()

    def _forget(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            _LIVE.discard(self.proc)

    def stop(self) -> None:
        """Stop the broker politely."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self._forget()

    def restart(self) -> None:
        """Kill -9 and start again on the same port."""
        self.kill()
        self.start()

    def logs(self) -> str:
        """Return what the broker logged."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """Stop the broker and remove its directory."""
        self.stop()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

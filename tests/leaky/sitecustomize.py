"""Deliberately leaking build for the canary test's negative control (never on a real path).

Imported by Python at start-up when this directory is on PYTHONPATH. The variable
NEAREST_TEST_LEAK picks one leak; each puts the asking client's full address (or an
unkeyed hash of it) somewhere the canary scan must find it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

LEAK = os.environ.get("NEAREST_TEST_LEAK", "")

if LEAK:
    from nearestd import service as _service

    _original = _service.Service.handle_payload
    _log = logging.getLogger("nearestd.leak")

    def _leaky(self: Any, payload: bytes, peer: Any, now: float) -> Any:
        ip = peer.ip
        if ip is not None:
            if LEAK == "stderr":
                print(f"peer {ip}", file=sys.stderr, flush=True)
            elif LEAK == "log-message":
                _log.warning("peer %s", ip)  # the scrubber must catch this one
            elif LEAK == "log-field":
                _log.warning("peer", extra={"uri": ip})  # an exempt field: not scrubbed
            elif LEAK == "unkeyed-hash":
                _log.warning("peer", extra={"pseudonym": hashlib.sha256(ip.encode()).hexdigest()})
            elif LEAK == "state-file":
                state = Path(self.cfg.resolve(self.cfg.daemon.state_dir))
                state.mkdir(parents=True, exist_ok=True)
                with open(state / "clients.txt", "a") as fh:
                    fh.write(ip + "\n")
        return _original(self, payload, peer, now)

    _service.Service.handle_payload = _leaky  # type: ignore[method-assign]

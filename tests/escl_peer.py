"""A small eSCL (AirScan) scanner over HTTP, for driving the real sane-airscan backend.

Run as ``python escl_peer.py PORT``: it serves ``/eSCL/`` on 127.0.0.1 with one platen
(1 x 1 inch, 75 dpi, RGB24, PNG), and answers a scan job with a solid-colour PNG of the size
the job asked for. It prints ``READY`` once it listens. The real peer under test is
sane-airscan; this stands in for the scanner hardware, which a CI machine does not have.
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SCAN = "http://schemas.hp.com/imaging/escl/2011/05/03"
PWG = "http://www.pwg.org/schemas/2010/12/sm"

CAPABILITIES = f"""<?xml version="1.0" encoding="UTF-8"?>
<scan:ScannerCapabilities xmlns:scan="{SCAN}" xmlns:pwg="{PWG}">
  <pwg:Version>2.63</pwg:Version>
  <pwg:MakeAndModel>Nearest Test Scanner</pwg:MakeAndModel>
  <scan:Manufacturer>Nearest</scan:Manufacturer>
  <scan:Platen>
    <scan:PlatenInputCaps>
      <scan:MinWidth>16</scan:MinWidth>
      <scan:MaxWidth>300</scan:MaxWidth>
      <scan:MinHeight>16</scan:MinHeight>
      <scan:MaxHeight>300</scan:MaxHeight>
      <scan:SettingProfiles>
        <scan:SettingProfile>
          <scan:ColorModes><scan:ColorMode>RGB24</scan:ColorMode></scan:ColorModes>
          <scan:DocumentFormats>
            <pwg:DocumentFormat>image/png</pwg:DocumentFormat>
            <scan:DocumentFormatExt>image/png</scan:DocumentFormatExt>
          </scan:DocumentFormats>
          <scan:SupportedResolutions>
            <scan:DiscreteResolutions>
              <scan:DiscreteResolution>
                <scan:XResolution>75</scan:XResolution>
                <scan:YResolution>75</scan:YResolution>
              </scan:DiscreteResolution>
            </scan:DiscreteResolutions>
          </scan:SupportedResolutions>
        </scan:SettingProfile>
      </scan:SettingProfiles>
    </scan:PlatenInputCaps>
  </scan:Platen>
</scan:ScannerCapabilities>
"""

STATUS = f"""<?xml version="1.0" encoding="UTF-8"?>
<scan:ScannerStatus xmlns:scan="{SCAN}" xmlns:pwg="{PWG}">
  <pwg:Version>2.63</pwg:Version>
  <pwg:State>Idle</pwg:State>
</scan:ScannerStatus>
"""


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """Return a solid-colour RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


class Handler(BaseHTTPRequestHandler):
    """eSCL resources: capabilities, status, one job at a time."""

    jobs: dict[str, tuple[int, int]] = {}
    delivered: set[str] = set()

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"escl: {self.command} {self.path}\n")

    def reply(self, code: int, body: bytes = b"", ctype: str = "text/xml", **hdrs: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/eSCL/ScannerCapabilities":
            self.reply(200, CAPABILITIES.encode())
        elif self.path == "/eSCL/ScannerStatus":
            self.reply(200, STATUS.encode())
        elif m := re.fullmatch(r"/eSCL/ScanJobs/(\w+)/NextDocument", self.path):
            job = m.group(1)
            if job not in self.jobs or job in self.delivered:
                self.reply(404)
                return
            self.delivered.add(job)
            self.reply(200, png(*self.jobs[job], (200, 40, 40)), "image/png")
        else:
            self.reply(404)

    def do_POST(self) -> None:
        if self.path != "/eSCL/ScanJobs":
            self.reply(404)
            return
        settings = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()

        def num(tag: str) -> int:
            m = re.search(rf"<\w+:{tag}>(\d+)<", settings)
            return int(m.group(1)) if m else 0

        res = num("XResolution") or 75
        size = (max(1, num("Width") * res // 300), max(1, num("Height") * res // 300))
        job = str(len(self.jobs) + 1)
        self.jobs[job] = size
        host = self.headers.get("Host", "127.0.0.1")
        self.reply(201, Location=f"http://{host}/eSCL/ScanJobs/{job}")

    def do_DELETE(self) -> None:
        self.reply(200)


def main() -> None:
    """Serve until killed."""
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("READY", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

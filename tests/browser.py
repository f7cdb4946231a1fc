"""Headless Chromium for the web-view tests: Debian's chromium driven by Playwright for Python.

Playwright cannot download its own browser here, so it is pointed at /usr/bin/chromium.
Every request the page makes is recorded, so tests can prove none left for another host.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from support import skip_or_fail

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_browser() -> None:
    """Skip (fail under CI) without chromium or Playwright."""
    if shutil.which("chromium") is None:
        skip_or_fail("missing tools: chromium (apt install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("Playwright for Python is not installed (pip install playwright)")


@dataclass
class Browser:
    """A launched browser with one context, and every URL its pages asked for."""

    playwright: Any
    browser: Any
    context: Any
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def page(self) -> Any:
        """Open a page whose requests and dialogs are recorded."""
        page = self.context.new_page()
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        return page

    def foreign(self, origin: str) -> list[str]:
        """Return the requested URLs not on ``origin`` (scheme://host:port)."""
        want = urlsplit(origin)
        return [
            u
            for u in self.requests
            if (urlsplit(u).scheme, urlsplit(u).netloc) != (want.scheme, want.netloc)
        ]


@contextmanager
def chromium(headers: dict[str, str] | None = None) -> Iterator[Browser]:
    """Launch headless Chromium (in the calling thread's network namespace)."""
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30000)
        context = browser.new_context(
            extra_http_headers=headers or {}, viewport={"width": 1280, "height": 900}
        )
        try:
            yield Browser(pw, browser, context)
        finally:
            context.close()
            browser.close()
    finally:
        pw.stop()

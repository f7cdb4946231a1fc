"""Autouse guards for every test, as python-zeroconf has them.

A test fails when it leaves a thread running after its teardown, when an async test
leaves an asyncio task behind, or when its event loop ran one callback for longer than
``SLOW_CALLBACK`` seconds (asyncio debug mode's "Executing ... took" warning): a test
must not block the loop any more than the daemon may.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import pytest
from pytest_asyncio import is_async_test

SLOW_CALLBACK = 0.1
# How long a test's threads may take to end after its teardown.
THREAD_GRACE = 5.0


class _SlowCallbacks(logging.Handler):
    """Collects asyncio debug mode's "Executing <handle> took N seconds" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing "):
            self.seen.append(message)


@pytest.fixture(autouse=True)
def no_leaked_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a thread running after its teardown (python-zeroconf's guard)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for thread in left:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = [t for t in left if t.is_alive()]
    if left:
        pytest.fail(f"{request.node.nodeid} left threads running: {[t.name for t in left]}")


@pytest.fixture(autouse=True)
def guarded_loop(request: pytest.FixtureRequest, no_leaked_threads: None) -> Iterator[None]:
    """Run an async test's loop in debug mode; fail on a task left behind or a blocked loop.

    The loop's runner is set up before this fixture and torn down after it, so the check
    sees what the test and its (later, async) fixtures left once they are torn down.
    """
    runners = [n for n in request.fixturenames if n.endswith("_scoped_runner")]
    if not runners:
        if is_async_test(request.node):  # a pytest-asyncio that names its runner otherwise
            pytest.fail(f"{request.node.nodeid}: the loop guard cannot find the test's loop")
        yield
        return
    loop: asyncio.AbstractEventLoop = request.getfixturevalue(runners[0]).get_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK
    slow = _SlowCallbacks()
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(slow)
    try:
        yield
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    finally:
        asyncio_log.removeHandler(slow)
    problems = []
    if pending:
        problems.append(f"left tasks behind: {sorted(t.get_name() for t in pending)}")
        for task in pending:
            task.cancel()
    if slow.seen:
        problems.append(f"blocked the event loop for more than {SLOW_CALLBACK} s: {slow.seen}")
    if problems:
        pytest.fail(f"{request.node.nodeid} " + "; ".join(problems))

"""The autouse guards catch what they are for: a leaked thread or task, a blocked loop."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
HERE = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from guards import guarded_loop, no_leaked_threads
"""

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""

CASES = """
import asyncio
import threading
import time

import pytest


async def test_clean():
    await asyncio.sleep(0)


def test_sync_clean():
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()


def test_leaks_a_thread():
    stop = threading.Event()
    threading.Thread(target=stop.wait, args=(8,), name="leaky", daemon=True).start()


async def test_leaks_a_task():
    asyncio.create_task(asyncio.sleep(60), name="forgotten")


async def test_blocks_the_loop():
    time.sleep(0.3)


@pytest.fixture
async def server():
    task = asyncio.create_task(asyncio.sleep(60), name="fixture-task")
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def test_an_async_fixture_that_cleans_up(server):
    await asyncio.sleep(0)
"""


def test_guards_fail_leaks_and_blocking_and_pass_clean_tests(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 6, result.stdout.str()
    assert outcomes.get("errors") == 3, result.stdout.str()
    out = result.stdout.str()
    assert "test_leaks_a_thread left threads running: ['leaky']" in out
    assert "test_leaks_a_task left tasks behind: ['forgotten']" in out
    assert "test_blocks_the_loop blocked the event loop for more than 0.1 s" in out

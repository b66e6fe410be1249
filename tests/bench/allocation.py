"""Benchmark: allocation time for 100, 1,000 and 10,000 EVSEs (issue 5, Done-when 6).

Run: /work/venv/bin/python tests/bench/allocation.py [--reference] [--runs N] [--steady-heap]

``--reference`` times the allocator as it was before issue 17 (tests/support/reference_allocator.py) on
the same sites, for a comparison made on the same machine at the same time.

The site: a grid connection with 20 sub-circuits (every circuit tight, so water-filling has to freeze
them one by one), two-EVSE stations with a station limit, a third of the EVs on one phase, mixed
phase rotations and priorities, some underdrawing. Prints the median and worst of several runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from balancing.allocator import Session, SiteLimits, allocate
from balancing.site import SiteConfig

ROTATIONS = ["RST", "STR", "TRS"]


def build(evse_count: int, seed: int = 1) -> tuple[SiteConfig, list[Session]]:
    rng = random.Random(seed)
    station_count = evse_count // 2
    circuits = [
        {"circuit_id": f"C{index}", "max_current_amperes": min(8.0 * station_count / 20 + rng.uniform(0, 50), 9_000.0)}
        for index in range(20)
    ]
    stations = [
        {
            "station_id": f"CS{index:05d}",
            "circuit_id": f"C{index % 20}",
            "phase_rotation": ROTATIONS[index % 3],
            "max_current_amperes": 48.0,
        }
        for index in range(station_count)
    ]
    site = SiteConfig.model_validate(
        {
            "grid": {"max_current_amperes": min(10.0 * station_count, 9_000.0)},
            "circuits": circuits,
            "stations": stations,
        }
    )
    sessions = []
    for index in range(station_count):
        for evse_id in (1, 2):
            measured = rng.uniform(0, 32) if rng.random() < 0.2 else None
            sessions.append(
                Session(
                    station_id=f"CS{index:05d}",
                    evse_id=evse_id,
                    priority=rng.choice([0, 0, 0, 1]),
                    phases_used=rng.choice([1, 3, 3]),
                    measured_current_amperes=measured,
                    underdraw_since_s=None if measured is None else 0.0,
                    waiting_since_s=rng.uniform(0, 100),
                )
            )
    return site, sessions


def steady_heap() -> None:
    """glibc's defaults give the large numpy temporaries (10,000 x 9 arrays) back to the kernel when they
    are freed, so every call faults their pages in again (~3 us a page on this VM); the thresholds raised,
    the heap keeps them. Same as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    for option in (m_trim_threshold, m_mmap_threshold):
        if libc.mallopt(option, 1 << 30) != 1:
            raise SystemExit("mallopt failed (glibc only)")


def main() -> None:
    parser = argparse.ArgumentParser(description="allocation time for 100, 1,000 and 10,000 EVSEs")
    parser.add_argument("--reference", action="store_true", help="time the pre-#17 allocator instead")
    parser.add_argument("--runs", type=int, default=0, help="timed calls per size (default 20; 5 at 10,000)")
    parser.add_argument(
        "--steady-heap",
        action="store_true",
        help="keep freed memory in the process (glibc mallopt): times the work without the page faults of "
        "memory handed back to the kernel between calls and faulted in again",
    )
    args = parser.parse_args()
    if args.steady_heap:
        steady_heap()
    allocator = allocate
    if args.reference:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.support.reference_allocator import allocate as reference

        allocator = reference
    for evse_count in (100, 1_000, 10_000):
        site, sessions = build(evse_count)
        runs = args.runs or (5 if evse_count >= 10_000 else 20)
        allocator(site, SiteLimits(), sessions, 1000.0)  # not timed: compiles the site, warms the caches
        durations = []
        for _ in range(runs):
            started = time.perf_counter()
            allocation = allocator(site, SiteLimits(), sessions, 1000.0)
            durations.append(time.perf_counter() - started)
        quartiles = statistics.quantiles(durations, n=4)
        served = sum(1 for evse in allocation.evses.values() if evse.current_amperes > 0)
        print(
            f"{evse_count:>6} EVSEs: median {statistics.median(durations) * 1000:8.1f} ms, "
            f"worst {max(durations) * 1000:8.1f} ms, "
            f"spread (p25..p75) {quartiles[0] * 1000:.1f}..{quartiles[2] * 1000:.1f} ms "
            f"({served} served, {runs} runs)"
        )


if __name__ == "__main__":
    main()

"""Issue 25, the soak's memory bound: freed heap memory goes back to the OS (worker/memory.py),
and the housekeeping thread does it on its timer, so a burst's peak does not stay resident."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import worker.housekeeping as housekeeping
from worker.config import load_settings
from worker.memory import release_free_memory
from worker.observability import PrometheusHooks
from worker.pipeline import build_pipeline

CHUNK_BYTES = 4096  # under glibc's mmap threshold: served from the heap, like most of a worker's allocations
CHUNKS = 16_384  # 64 MiB in all
KEEP_EVERY = 64  # one chunk in 64 stays alive, so the freed ones sit between live ones, never at the top


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not release_free_memory(), reason="needs glibc")
def test_a_bursts_freed_memory_goes_back_to_the_os() -> None:
    # Given a burst of heap allocations, most of them freed again with live ones in between
    burst = [bytes(CHUNK_BYTES) for _ in range(CHUNKS)]
    kept = burst[::KEEP_EVERY]
    del burst
    held_kib = rss_kib()
    # When the free memory is released
    assert release_free_memory()
    released_kib = held_kib - rss_kib()
    # Then most of what was freed left the process (glibc alone keeps it: the live chunks pin the heap)
    freed_kib = CHUNK_BYTES * (CHUNKS - len(kept)) // 1024
    assert released_kib >= freed_kib // 2, f"RSS fell by {released_kib} KiB after freeing {freed_kib} KiB"


def test_housekeeping_releases_free_memory_on_its_timer(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given housekeeping with a short trim interval (nothing listens on port 1; no partitions assigned)
    settings = load_settings(
        kafka={"bootstrap_servers": "127.0.0.1:1", "instance_id": "unit"},
        model={"path": tiny_bundle},
        metrics={"enabled": False},
    )
    trimmed = threading.Event()
    monkeypatch.setattr(housekeeping, "MEMORY_TRIM_INTERVAL_S", 0.05)
    monkeypatch.setattr(housekeeping, "release_free_memory", lambda: trimmed.set() or True)
    house = housekeeping.Housekeeping(
        settings, build_pipeline(settings).router, PrometheusHooks(CollectorRegistry()), lambda: set()
    )
    # When its thread runs, Then it trims within a few intervals
    house.start()
    try:
        assert trimmed.wait(2.0), "the housekeeping thread never released free memory"
    finally:
        house.stop()

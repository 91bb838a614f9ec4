"""Give freed heap memory back to the operating system, so a worker's resident size follows what
it uses rather than the highest it ever used.

glibc's allocator keeps memory a process has freed and returns it only from the top of a heap.
A burst (the catch-up after a broker freeze or a rebalance: full micro-batches, librdkafka's
fetch and producer buffers) leaves freed chunks in the middle of the heaps, so the resident size
steps up at each fault and never comes down. Measured in the soak (docs/reliability.md): the
untouched worker's Python objects stayed flat (~234,000 pymalloc blocks) and glibc's in-use bytes
came back to their level before a broker freeze, while its free-but-kept bytes rose by 1 MB at the
freeze and stayed. `malloc_trim(0)` hands every whole free page of every arena back (`madvise`),
which costs a few milliseconds; on a C library without it (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; True when the C library could (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

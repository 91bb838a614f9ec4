"""How many CPUs this process may really use: its cgroup's CPU quota (a container's CPU limit),
else its affinity mask; never the node's core count.

In a container `os.cpu_count()` (and, without a CPU manager, the affinity mask) is the node's:
64 inference threads in a pod limited to 2 CPUs spend the quota in a few milliseconds of each
100 ms period and sit throttled for the rest. Both cgroup versions are read: v2's `cpu.max`
("<quota> <period>" or "max <period>") and v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1 is
no limit), along the process's own cgroup path from `/proc/self/cgroup` and its ancestors, the
tightest limit winning, as the kernel applies them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> int:
    """The affinity mask, capped by the CPU quota rounded down (at least 1): a thread beyond the
    quota only gets throttled, and the fraction left over keeps the engine's own thread going."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_limit(proc_cgroup, cgroup_root)
    if quota is not None:
        cores = min(cores, int(quota))
    return max(1, cores)


def cgroup_cpu_limit(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the tightest CPU quota over this process's cgroup allows; None when there is none
    (or it cannot be read: not Linux, no cgroup file system)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and not controllers:  # v2's unified hierarchy
            limits += _v2_limits(cgroup_root, path)
        elif "cpu" in controllers.split(","):  # v1's cpu controller
            limits += _v1_limits(cgroup_root, controllers, path)
    return min(limits, default=None)


def _along(mount: Path, path: str) -> Iterator[Path]:
    """The cgroup's directory, then its ancestors up to the mount. Inside a container without its
    own cgroup namespace the path names the host's view: the mount itself is the container's."""
    parts = PurePosixPath(path).parts[1:]
    for n in range(len(parts), -1, -1):
        directory = mount.joinpath(*parts[:n])
        if directory.is_dir():
            yield directory


def _v2_limits(root: Path, path: str) -> list[float]:
    limits = []
    for directory in _along(root, path):
        try:
            quota, period = (directory / "cpu.max").read_text().split()
            if quota != "max":
                limits.append(int(quota) / int(period))
        except (OSError, ValueError, ZeroDivisionError):
            continue
    return limits


def _v1_limits(root: Path, controllers: str, path: str) -> list[float]:
    mount = next((root / n for n in (controllers, "cpu", "cpu,cpuacct") if (root / n).is_dir()), None)
    if mount is None:
        return []
    limits = []
    for directory in _along(mount, path):
        try:
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            period = int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            limits.append(quota / period)
    return limits

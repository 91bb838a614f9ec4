"""Inference threads from the CPU quota: cgroup v1 and v2 files written in tmp_path, laid out as
a container and a host show them."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import cpus
from worker.cpus import cgroup_cpu_limit, usable_cores


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "sys" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "sys"


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("proc", "files", "cpus_allowed"),
    [
        # v2 in a container with its own cgroup namespace: the mount is the container's cgroup
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        # v2 on a host (or a pod seen from the node): the process's path, the tightest ancestor wins
        (
            "0::/kubepods/pod1/ctr\n",
            {
                "kubepods/cpu.max": "max 100000",
                "kubepods/pod1/cpu.max": "200000 100000",
                "kubepods/pod1/ctr/cpu.max": "max 100000",
            },
            2.0,
        ),
        (
            "0::/kubepods/pod1/ctr\n",
            {"kubepods/pod1/cpu.max": "400000 100000", "kubepods/pod1/ctr/cpu.max": "50000 100000"},
            0.5,
        ),
        # v2 without a cgroup namespace: the host path is not under the container's mount
        ("0::/system.slice/docker-abc.scope\n", {"cpu.max": "300000 100000"}, 3.0),
        # v1 (cgroupfs), the cpu controller mounted with cpuacct
        (
            "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            2.5,
        ),
        (
            "4:cpu,cpuacct:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            None,
        ),
        # v1 mounted as plain `cpu`, the process's own directory present
        (
            "3:cpuacct,cpu:/job\n",
            {"cpu/job/cpu.cfs_quota_us": "100000", "cpu/job/cpu.cfs_period_us": "50000"},
            2.0,
        ),
        # unreadable or absent: no quota
        ("0::/\n", {"cpu.max": "garbage\n"}, None),
        ("0::/\n", {}, None),
        ("not a cgroup line\n", {"cpu.max": "100000 100000"}, None),
    ],
)
def test_quota_is_read_from_cgroup_v1_and_v2_files(
    tmp_path: Path, proc: str, files: dict[str, str], cpus_allowed: float | None
) -> None:
    assert cgroup_cpu_limit(_proc(tmp_path, proc), _tree(tmp_path, files)) == cpus_allowed


def test_no_proc_file_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "missing", tmp_path) is None


@pytest.mark.parametrize(
    ("quota", "affinity", "threads"),
    [("150000 100000", 8, 1), ("max 100000", 6, 6), ("800000 100000", 2, 2), ("20000 100000", 8, 1)],
)
def test_threads_are_the_quota_rounded_down_within_the_affinity_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quota: str, affinity: int, threads: int
) -> None:
    # Given a node whose affinity mask holds `affinity` CPUs and a container CPU limit
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda _pid: set(range(affinity)))
    root = _tree(tmp_path, {"cpu.max": quota})
    assert usable_cores(_proc(tmp_path, "0::/\n"), root) == threads


def test_the_classifier_defaults_to_the_usable_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.tiny_model import build_bundle
    from worker.model import Classifier, load_bundle
    from worker.model import classifier as classifier_module

    monkeypatch.setattr(classifier_module, "usable_cores", lambda: 3)
    bundle = load_bundle(build_bundle(tmp_path / "b"))
    assert Classifier(bundle).threads == 3
    assert Classifier(bundle, threads=5).threads == 5

"""Where the bench's local broker keeps its log (`devkit.bench._broker_dir`): a fresh directory
on a tmpfs with room, removed afterwards; the run's own directory on disk when asked or when no
tmpfs has room."""

from __future__ import annotations

from pathlib import Path

import pytest

from devkit import bench


def test_the_log_goes_to_a_fresh_tmpfs_directory_that_is_removed_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tmpfs = tmp_path / "shm"
    fake_tmpfs.mkdir()
    monkeypatch.setattr(bench, "TMPFS", fake_tmpfs)
    monkeypatch.setattr(bench, "TMPFS_MIN_FREE_BYTES", 0)
    with bench._broker_dir(tmp_path / "run", on_disk=False) as (data_dir, where):
        assert data_dir.parent == fake_tmpfs, "the broker's log is not on the tmpfs"
        assert where == "log on tmpfs"
        (data_dir / "segment").write_bytes(b"x")
    assert not data_dir.exists(), "the tmpfs directory outlived the bench"


def test_on_disk_when_asked_or_when_the_tmpfs_is_missing_or_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with bench._broker_dir(tmp_path, on_disk=True) as (data_dir, where):
        assert (data_dir, where) == (tmp_path / "kafka", "log on disk")
    monkeypatch.setattr(bench, "TMPFS", tmp_path / "no-such-tmpfs")
    with bench._broker_dir(tmp_path, on_disk=False) as (data_dir, where):
        assert (data_dir, where) == (tmp_path / "kafka", "log on disk"), "no tmpfs, yet not on disk"
    monkeypatch.setattr(bench, "TMPFS", tmp_path)
    monkeypatch.setattr(bench, "TMPFS_MIN_FREE_BYTES", 1 << 62)
    with bench._broker_dir(tmp_path, on_disk=False) as (data_dir, where):
        assert where == "log on disk", "a tmpfs without room was used"

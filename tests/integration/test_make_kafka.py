"""`make kafka`: one line once clients can use the broker, and Ctrl-C stops it (and its JVM)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from devkit.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.skipif(shutil.which("java") is None, reason="needs java")]
ROOT = Path(__file__).resolve().parents[2]


def test_make_kafka_prints_ready_then_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "out.txt"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "devkit.apache_kafka", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 120
        while f"kafka ready on 127.0.0.1:{port}" not in out.read_text():
            assert proc.poll() is None, f"exited early with {proc.returncode}: {out.read_text()}"
            assert time.monotonic() < deadline, "no ready line within 120 s"
            time.sleep(0.2)
        # the line means clients can use it: a topic is created at once
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"})
        for f in admin.create_topics([NewTopic("ready-check", 1, 1)]).values():
            f.result(30)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    assert rc == 0
    # the JVM's command line names its server.properties inside the data dir
    jvm = subprocess.run(["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True, check=False)
    assert jvm.stdout == "", "the broker JVM outlived Ctrl-C"
    assert out.read_text().strip() == f"kafka ready on 127.0.0.1:{port}", "exactly one line on stdout"

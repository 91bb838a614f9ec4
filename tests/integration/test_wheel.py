"""What a user installs: the wheel holds the serving package and no dev kit (demo, bench, brokers),
and a worker installed from it alone routes a mixed stream on the real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from devkit.toolkit import read_outputs
from tests.support import scenario
from tests.support.kafka import TopicSet, create_topic, produce

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = ["banking", "travel", "weather"]
DEV_ONLY = ("devkit/", "worker/demo", "worker/bench", "worker/devbroker", "tests/")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return next(out.glob("classify_worker-*.whl"))


def test_wheel_ships_the_worker_and_no_dev_kit(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    dev = [n for n in names if n.startswith(DEV_ONLY)]
    assert dev == [], f"dev-only files in the wheel: {dev}"
    for needed in ("worker/engines/confluent.py", "worker/model/default/model.onnx", "worker/py.typed"):
        assert needed in names, f"{needed} missing from the wheel"


def test_worker_installed_from_the_wheel_routes_on_the_broker(
    wheel: Path, kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    # Given the wheel installed on its own into a directory outside the repository
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run(pip, check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import worker; print(worker.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(site)), f"worker imported from {where}, not from the installed wheel"

    # When that worker runs a bounded job over 300 mixed messages
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, 3)
    messages, expected = scenario.build(300)
    produce(kafka_bootstrap, topics.input, messages)
    worker_env = {
        **env,
        **topics.env(kafka_bootstrap),
        "CW_MODEL__PATH": str(tiny_bundle),
        "CW_LIMITS__MAX_INPUT_BYTES": str(scenario.MAX_INPUT_BYTES),
        "CW_METRICS__PORT": "0",
    }
    run = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--max-messages", "300", "--idle-exit", "60"],
        env=worker_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    # Then every message is routed or dead-lettered exactly once
    received = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=300)
    scenario.check(received, expected, topics.prefix, topics.dlq)

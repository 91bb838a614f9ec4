"""The container image that `make image` built, judged from outside: run with docker or podman
(deploy/image/oci.sh) as a platform would run it, its outputs read back with a read_committed
reader. `make image-test` runs these (CLASSIFY_IMAGE names the image); elsewhere they skip."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit.ports import free_port
from devkit.toolkit import partitions, read_outputs
from tests.support import scenario
from tests.support.kafka import TopicSet, create_topic, produce
from worker.model.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]
OCI = ROOT / "deploy" / "image" / "oci.sh"
IMAGE = os.environ.get("CLASSIFY_IMAGE", "")
CATEGORIES = ["banking", "travel", "weather"]  # the tiny model's (tests/support/tiny_model.py)
#: The flags a platform runs the worker with (the Helm chart: readOnlyRootFilesystem, /tmp an emptyDir).
READ_ONLY = ["--read-only", "--tmpfs", "/tmp"]

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(not IMAGE, reason="run by `make image-test`: it builds the image, CLASSIFY_IMAGE names it"),
]


@pytest.fixture(scope="module")
def engine() -> str:
    """docker or podman, decided once (oci.sh installs podman where neither is there)."""
    return subprocess.run(["bash", str(OCI), "--which"], capture_output=True, text=True, check=True).stdout.strip()


def oci(engine: str, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", str(OCI), *args],
        env={**os.environ, "OCI_ENGINE": engine},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if check and done.returncode != 0:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        pytest.fail(f"`{engine} {' '.join(args[:3])} …` exited {done.returncode}:\n{output}")
    return done


@pytest.fixture(scope="module")
def inspected(engine: str) -> dict[str, Any]:
    info: list[dict[str, Any]] = json.loads(oci(engine, "image", "inspect", IMAGE).stdout)
    return info[0]


def test_image_runs_as_uid_10001_on_a_read_only_root(engine: str, inspected: dict[str, Any]) -> None:
    assert inspected["Config"]["User"] == "10001:10001", inspected["Config"]["User"]
    probe = (
        "import errno, os\n"
        "try:\n    open('/opt/venv/probe', 'w')\n"
        "except OSError as e:\n    print(os.getuid(), os.getgid(), errno.errorcode[e.errno])"
    )
    out = oci(engine, "run", "--rm", "--network", "none", *READ_ONLY, "--entrypoint", "python", IMAGE, "-c", probe)
    assert out.stdout.split() == ["10001", "10001", "EROFS"], out.stdout + out.stderr


def test_classify_on_a_read_only_root_with_the_model_inside(engine: str) -> None:
    # Given the image and no network at all; When two texts are classified with its own model
    texts = {"what is my account balance": "banking", "book a flight to Oslo for Friday": "travel"}
    out = oci(engine, "run", "--rm", "--network", "none", *READ_ONLY, IMAGE, "classify", *texts)
    # Then each comes back routed to its category by the model this repository ships
    routed = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert [r["text"] for r in routed] == list(texts), out.stdout + out.stderr
    assert {r["text"]: r["route"]["category"] for r in routed} == texts, out.stdout
    assert {r["route"]["model"] for r in routed} == {load_bundle().model_id}, "the image ships another model"


@pytest.fixture
def model_dir(tiny_bundle: Path, tmp_path: Path) -> Path:
    """The tiny bundle, readable by uid 10001 (pytest's temporary directories are root's, 0700)."""
    target = tmp_path / "model"
    shutil.copytree(tiny_bundle, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@pytest.fixture
def container(engine: str) -> Iterator[str]:
    name = f"cw-image-test-{uuid.uuid4().hex[:8]}"
    yield name
    logs = oci(engine, "logs", name, check=False)
    print(f"--- {name} (last lines)\n{(logs.stdout + logs.stderr)[-2000:]}")
    oci(engine, "rm", "-f", name, check=False)


def wait_for_topics(bootstrap: str, topics: list[str], container: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if {t for t, _ in partitions(bootstrap, topics)} == set(topics):
            return
        time.sleep(0.5)
    pytest.fail(f"{container} did not create its output topics within {timeout_s:.0f} s: {topics}")


def test_worker_in_the_image_routes_exactly_once_and_is_healthy(
    engine: str, inspected: dict[str, Any], kafka_bootstrap: str, model_dir: Path, container: str
) -> None:
    # Given 300 mixed messages (valid, out of scope, malformed) on the test Kafka
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, 3)
    messages, expected = scenario.build(300)
    produce(kafka_bootstrap, topics.input, messages)
    metrics_port = free_port()
    env = {
        **topics.env(kafka_bootstrap),
        "CW_MODEL__PATH": "/model",
        "CW_LIMITS__MAX_INPUT_BYTES": str(scenario.MAX_INPUT_BYTES),
        "CW_METRICS__PORT": str(metrics_port),
    }
    # When the image runs as a worker (its default command) on the host network, read-only,
    # the model mounted read-only as a platform would mount one
    oci(
        engine,
        "run",
        "--detach",
        "--name",
        container,
        "--network",
        "host",
        *READ_ONLY,
        "--volume",
        f"{model_dir}:/model:ro",
        *[f"--env={k}={v}" for k, v in env.items()],
        IMAGE,
    )

    # Then every message is routed or dead-lettered exactly once (read_committed, from outside)
    outputs = topics.outputs(CATEGORIES)
    wait_for_topics(kafka_bootstrap, outputs, container)  # the worker creates them; a reader needs them
    received = read_outputs(kafka_bootstrap, outputs, expect=300, timeout_s=180)
    scenario.check(received, expected, topics.prefix, topics.dlq)

    # And the image's own HEALTHCHECK command passes in the running container, and fails where
    # no worker answers (so it checks something)
    declared = inspected["Config"].get("Healthcheck") or inspected.get("Healthcheck")  # docker | podman
    assert declared, "the image declares no HEALTHCHECK (podman keeps it only with --format docker)"
    check = declared["Test"]
    assert check[0] == "CMD", f"HEALTHCHECK is not an exec-form CMD: {check}"
    healthy = oci(engine, "exec", container, *check[1:], check=False)
    assert healthy.returncode == 0, f"healthcheck failed on a running worker:\n{healthy.stderr[-2000:]}"
    elsewhere = oci(engine, "exec", "--env", f"CW_METRICS__PORT={free_port()}", container, *check[1:], check=False)
    assert elsewhere.returncode != 0, "healthcheck passed with no worker behind the port"

    # And SIGTERM stops it cleanly (exit 0) within the grace period, as `docker stop` / a pod delete does
    oci(engine, "stop", "--time", "30", container, timeout_s=60)
    state = json.loads(oci(engine, "inspect", container).stdout)[0]["State"]
    assert state["ExitCode"] == 0, f"worker exited {state['ExitCode']} on SIGTERM"


def test_image_size_is_within_the_readme_budget(inspected: dict[str, Any]) -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"image size budget: \*\*(\d+) MB\*\*", readme, re.IGNORECASE)
    assert found, "README.md states no image size budget (`image size budget: **N MB**`)"
    budget_mb = int(found.group(1))
    size_mb = inspected["Size"] / 1e6
    print(f"\nimage {IMAGE}: {size_mb:.0f} MB uncompressed (budget {budget_mb} MB, README.md)")
    assert size_mb <= budget_mb, f"image is {size_mb:.0f} MB, over the README's budget of {budget_mb} MB"

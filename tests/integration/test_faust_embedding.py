"""The Faust engine embedded in someone else's Faust app, on the secured broker of
test_security.py: a refusal (a missing ACL) stops the classifier agent and reaches the app as a
`KafkaAccessError`; the app's own work and its process go on, and the refused batch is not
committed, so nothing is lost once the ACL is back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.toolkit import read_outputs, start_worker
from tests.integration.test_security import CATEGORIES, PRINCIPAL, _acls, _env, _topics, secured  # noqa: F401
from tests.support import scenario
from tests.support.kafka import produce

pytest.importorskip("faust", reason="needs the [faust] extra")
pytestmark = pytest.mark.integration


def test_an_embedding_app_survives_a_refusal_and_gets_the_error(
    secured,  # noqa: F811 - the fixture imported above
    tiny_bundle: Path,
    tmp_path: Path,
) -> None:
    from devkit.security import Acl, grant

    # Given every ACL the worker needs but WRITE on the dead-letter topic, and 200 messages (10 malformed)
    topics = _topics(secured.plain)
    missing = Acl("WRITE", "TOPIC", topics.dlq)
    grant(secured.admin(), PRINCIPAL, [a for a in _acls(topics) if a != missing])
    messages, expected = scenario.build(200)
    produce(secured.plain, topics.input, messages)
    env = {**os.environ, **_env(secured, topics, tiny_bundle), "CW_BATCH__MAX_ITEMS": "20"}

    # When an app embedding the classifier runs
    host = subprocess.run(
        [sys.executable, "-m", "tests.support.faust_host"], env=env, capture_output=True, text=True, timeout=120
    )

    # Then the error reached the app, which went on working and stopped by itself, exit 0
    lines = [json.loads(line) for line in host.stdout.splitlines() if line.startswith("{")]
    assert host.returncode == 0, host.stdout[-2000:] + host.stderr[-3000:]
    report, ending = lines
    assert report["error"] == "KafkaAccessError" and report["same_as_attribute"], report
    assert f"WRITE on topic {topics.dlq}" in report["message"], report
    assert report["ticks_after_error"] == 20 and ending == {"host_exit": 0}

    # And once the ACL is back, a worker routes every id: the refused batch had not been committed
    grant(secured.admin(), PRINCIPAL, [missing])
    log = tmp_path / "restored.log"
    worker = start_worker(_env(secured, topics, tiny_bundle), log, "--engine", "faust", "--idle-exit", "5")
    assert worker.wait(120) == 0, log.read_text()[-3000:]
    received = read_outputs(secured.plain, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq, exactly_once=False)

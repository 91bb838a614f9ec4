"""A broker frozen for 15 s under steady traffic (less than the workers' 30 s call timeout,
more than their 6 s session timeout): a pause every worker must ride out in place. On resume
each consumer finds its session timed out and its partitions lost while its producer still
holds the transaction it opened before the freeze; the engine must abort that transaction and
redo its batches, not end the process (the soak run saw both workers exit 1 with a fatal
`INVALID_TXN_STATE` here; docs/reliability.md). Whether a run meets that race depends on the
broker's order of work on resume (two runs on the engine before the fix passed: both times the
open unit's offset commit was refused first, `Unknown member`, and that abort is safe);
tests/integration/test_abort_after_commit.py reproduces the race itself, every run.

Verdict from outside the workers (tests/chaos/fleet.py): read_committed, each id exactly once;
committed offsets == end offsets; LSO == HW; and no worker exited or was restarted.
Not in `make test` (marker `extended`): `make chaos`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from tests.chaos.fleet import Feed, Fleet, freeze_broker, verdict
from tests.support import scenario
from tests.support.kafka import Broker

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.extended]

PARTITIONS = 6
MESSAGES = 8000
RATE_PER_S = 200.0  # ~40 s of traffic: before, during and after the freeze
FREEZE_S = 15.0


@pytest.mark.timeout(600)
def test_a_15_s_broker_freeze_is_ridden_out_without_an_exit(broker: Broker, tiny_bundle: Path, tmp_path: Path) -> None:
    if broker.kafka is None or broker.kafka.pid is None:
        pytest.skip("needs the local Apache Kafka process to freeze")
    kafka_pid = broker.kafka.pid
    fleet = Fleet(broker.bootstrap, broker.bootstrap, tiny_bundle, tmp_path, PARTITIONS)
    fleet.create_input()
    messages, expected = scenario.build(MESSAGES, malformed_every=50)
    try:
        # Given two workers under steady traffic
        fleet.start("w1", "w2")
        feed = Feed(broker.bootstrap, fleet.topics.input, messages, RATE_PER_S).start()
        fleet.wait_progress(0.25, MESSAGES, timeout_s=180)
        # When the broker is frozen for 15 s, then resumed
        freeze_broker(kafka_pid, FREEZE_S, fleet.note)
        sent = feed.join(240)
        fleet.wait_progress(1.0, MESSAGES, timeout_s=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(kafka_pid, signal.SIGCONT)
        fleet.stop_all()
    # Then every id is routed or dead-lettered exactly once, offsets at the end, no open transaction
    verdict(fleet, expected, sent)
    # And no worker exited: a freeze shorter than the call timeout is a pause, not an outage
    assert not fleet.exits, f"workers exited (rc: count) {dict(fleet.exits)}; events {fleet.events}; logs in {tmp_path}"

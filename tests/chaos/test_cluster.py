"""Exactly-once on a 3-broker KRaft cluster (every topic at replication 3, min.insync.replicas 2)
while the nodes that matter die: `kill -9` the leader of an output partition mid-stream, bring it
back, then `kill -9` the transaction coordinator of a worker's transactional id (the leader of its
`__transaction_state` partition) and bring it back. Which node to kill is read from the cluster's
own metadata at that moment, and the test checks the role really moved to another node (so a
kill that hit nothing cannot pass).

Verdict from outside the workers (tests/chaos/fleet.py): read_committed, each id exactly once;
committed offsets == end offsets; LSO == HW; and no worker died of a signal (`WorkerCrashedError`:
the SIGSEGVs librdkafka's admin client caused on a coordinator move, docs/reliability.md). Not in
`make test` (marker `extended`): `make chaos`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devkit.apache_kafka import KafkaCluster
from tests.chaos.fleet import Feed, Fleet, verdict
from tests.support import scenario

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.extended]

MESSAGES = 4000
RATE_PER_S = 50.0  # ~80 s of traffic: both kills and both restarts land in live traffic
PARTITIONS = 6
#: KRaft fences a silent broker after broker.session.timeout.ms (9 s); its roles move then.
ROLE_MOVE_TIMEOUT_S = 45.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    if shutil.which("java") is None:
        pytest.skip("the cluster test starts three Apache Kafka nodes: it needs java")
    with KafkaCluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def kill_and_restart(cluster: KafkaCluster, fleet: Fleet, role: str, holder: Callable[[], int]) -> None:
    """`kill -9` the node holding `role`, wait until the cluster has moved the role to another
    node, then restart the killed node on its data directory."""
    victim = holder()
    cluster.kill(victim)
    fleet.note(f"kill -9 node {victim} ({role})")
    deadline = time.monotonic() + ROLE_MOVE_TIMEOUT_S
    while True:
        try:
            now = holder()
        except Exception:  # metadata from a node that is still catching up: ask again
            now = victim
        if now not in (victim, -1):
            break
        assert time.monotonic() < deadline, f"{role} did not move off node {victim}; events {fleet.events}"
        time.sleep(0.5)
    fleet.note(f"{role} moved to node {now}")
    cluster.restart(victim)
    fleet.note(f"node {victim} restarted")


@pytest.mark.timeout(900)
def test_killing_partition_leader_and_transaction_coordinator_loses_and_duplicates_nothing(
    cluster: KafkaCluster, tiny_bundle: Path, tmp_path: Path
) -> None:
    fleet = Fleet(cluster.bootstrap, cluster.bootstrap, tiny_bundle, tmp_path, PARTITIONS, replication=3)
    fleet.create_input()
    messages, expected = scenario.build(MESSAGES, malformed_every=50)
    output = fleet.topics.prefix + "banking"
    tid = f"{fleet.topics.group}-w1"  # worker.config: transactional id = group id + instance id
    try:
        # Given two workers on a replicated cluster and a steady stream
        fleet.start("w1", "w2")
        feed = Feed(cluster.bootstrap, fleet.topics.input, messages, RATE_PER_S).start()
        # When the leader of an output partition dies mid-stream, then w1's transaction coordinator
        fleet.wait_progress(0.20, MESSAGES, timeout_s=180)
        kill_and_restart(cluster, fleet, f"leader of {output}[0]", lambda: cluster.leader_of(output, 0))
        fleet.wait_progress(0.50, MESSAGES, timeout_s=180)
        kill_and_restart(cluster, fleet, f"coordinator of {tid}", lambda: cluster.transaction_coordinator(tid))
        sent = feed.join(300)
        fleet.wait_progress(1.0, MESSAGES, timeout_s=300)
    finally:
        fleet.stop_all()
    # Then every id is routed or dead-lettered exactly once
    verdict(fleet, expected, sent)

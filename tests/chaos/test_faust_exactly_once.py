"""Faust's own exactly-once (`processing_guarantee="exactly_once"`, one transactional producer per
input partition), run on trial (`CW_FAUST_EOS_TRIAL=true`: the engine refuses it otherwise), judged by the chaos test's
oracle: two Faust workers share a steady stream, one is `kill -9`ed and restarted three times
mid-stream, then a read_committed reader must find every id exactly once, the group's committed
offsets must equal the input's end offsets, and every output partition's last stable offset its
high watermark.

Not in `make test` (marker `extended`): `make chaos` runs it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from devkit.toolkit import read_outputs
from tests.chaos.fleet import Feed, Fleet, verdict
from tests.support import scenario
from tests.support.kafka import Broker

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.extended]

MESSAGES = 6000
PARTITIONS = 6
#: ~30 s of traffic, well under one Faust worker's capacity: the kills land in live traffic.
RATE_PER_S = 200.0
#: Progress (committed input offsets) at which the workers are killed: w1, w2, then w1 again.
KILLS = [(0.15, "w1"), (0.40, "w2"), (0.65, "w1")]


def _by_partition(fleet: Fleet, ids: set[str]) -> dict[int, int]:
    """How many of `ids` each input partition holds (read back from the input topic)."""
    c = Consumer({"bootstrap.servers": fleet.direct, "group.id": f"{fleet.topics.group}-audit"})
    counts: Counter[int] = Counter()
    try:
        c.assign([TopicPartition(fleet.topics.input, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        seen = 0
        while seen < MESSAGES and (m := c.poll(10)) is not None:
            seen += 1
            if m.error() is None and (m.key() or b"").decode() in ids:
                counts[m.partition()] += 1
    finally:
        c.close()
    return dict(sorted(counts.items()))


@pytest.mark.xfail(
    strict=False,
    reason="Faust's exactly_once lost 3 records (one per partition of a restarted worker) in 1 of 4 runs: "
    "docs/engines.md; the engine refuses CW_DELIVERY=exactly_once",
)
@pytest.mark.timeout(600)
def test_faust_exactly_once_survives_kill_9(broker: Broker, tiny_bundle: Path, tmp_path: Path) -> None:
    if broker.kind == "tansu":
        pytest.skip("the embedded Tansu broker shows aborted records and does not fence zombies: no proof possible")
    # Given two Faust exactly-once workers in one group and a steady stream
    fleet = Fleet(
        broker.bootstrap,
        broker.bootstrap,
        tiny_bundle,
        tmp_path,
        PARTITIONS,
        extra_env={"CW_DELIVERY": "exactly_once", "CW_FAUST_EOS_TRIAL": "true"},
        args=("--engine", "faust"),
    )
    fleet.create_input()
    messages, expected = scenario.build(MESSAGES, malformed_every=50)
    feed = Feed(broker.bootstrap, fleet.topics.input, messages, RATE_PER_S)
    try:
        fleet.start("w1", "w2")
        feed.start()
        # When a worker is killed with SIGKILL (and restarted) three times mid-stream
        for fraction, instance in KILLS:
            fleet.wait_progress(fraction, MESSAGES)
            fleet.kill9(instance)
        sent = feed.join(120)
        fleet.wait_progress(1.0, MESSAGES, timeout_s=240)
    finally:
        fleet.stop_all()

    # Then each id is routed or dead-lettered exactly once (read_committed), all offsets are
    # committed, and no output partition holds an open transaction
    try:
        verdict(fleet, expected, sent)
    except AssertionError:
        received = Counter(
            (r.key or b"").decode() for r in read_outputs(fleet.direct, fleet.outputs, expect=MESSAGES, timeout_s=30)
        )
        lost = set(expected) - set(received)
        duplicated = {k for k, n in received.items() if n > 1}
        print(f"lost by input partition: {_by_partition(fleet, lost)}")
        print(f"duplicated by input partition: {_by_partition(fleet, duplicated)}")
        print(f"worker logs: {sorted(tmp_path.glob('w*.log'))}")
        raise

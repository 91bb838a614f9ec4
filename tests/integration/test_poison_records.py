"""A poison record on a real broker: one that makes the classifier raise something other than
`InferenceError` (here a tokenizer bug) is dead-lettered in its own batch, the records behind it
on its partition are routed exactly once, and the engine neither crashes nor rewinds forever.
Checked from outside, with a read_committed reader."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest

from devkit.toolkit import read_outputs
from tests.support.engine import in_process_engine
from tests.support.kafka import TopicSet, create_topic, produce

pytestmark = pytest.mark.integration
POISON = {7, 8, 63, 119}


def test_a_record_that_breaks_the_tokenizer_is_dead_lettered_and_its_partition_moves_on(
    kafka_bootstrap: str, tiny_bundle: Path
) -> None:
    # Given an engine whose tokenizer raises TypeError on any batch holding the word 'poison'
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, 3)
    engine, _ = in_process_engine(kafka_bootstrap, topics, tiny_bundle)
    real = engine.pipeline.classifier._tok

    class Poisoned:
        def encode_batch(self, texts: list[str]) -> object:
            if any("poison" in t for t in texts):
                raise TypeError("tokenizer bug")
            return real.encode_batch(texts)

    engine.pipeline.classifier._tok = Poisoned()  # type: ignore[assignment]
    # And 120 records over 3 partitions, four of them poison
    messages = [
        (b"k%d" % (i % 7), orjson.dumps({"id": f"m{i}", "text": "poison" if i in POISON else "wire money"}), [])
        for i in range(120)
    ]
    produce(kafka_bootstrap, topics.input, messages)

    # When the engine runs until every record is committed
    engine.run(max_messages=120, idle_exit_s=30)

    # Then each record is out exactly once: the poison ones in the DLQ, the rest routed
    got = read_outputs(kafka_bootstrap, [topics.prefix + "banking", topics.fallback, topics.dlq], expect=120)
    ids = Counter(orjson.loads(o.value or b"{}")["id"] for o in got)
    assert sorted(ids) == sorted(f"m{i}" for i in range(120)) and set(ids.values()) == {1}, ids
    dead = {orjson.loads(o.value or b"{}")["id"]: o.headers["error.reason"] for o in got if o.topic == topics.dlq}
    assert dead == {f"m{i}": b"inference_error" for i in POISON}
    assert {o.topic for o in got if o.topic != topics.dlq} == {topics.prefix + "banking"}

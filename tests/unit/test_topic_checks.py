"""Issue 25, defect 9: the periodic topic check asks about our topics only, never for the
cluster's whole metadata (every replica, every 10 s)."""

from __future__ import annotations

from concurrent.futures import Future

from confluent_kafka import KafkaError, KafkaException, TopicCollection

from worker.topics import missing_topics


class ClusterOfThousands:
    """Knows `a`; `list_topics()` would return every topic of a large cluster."""

    def __init__(self) -> None:
        self.described: list[list[str]] = []

    def list_topics(self, *_a: object, **_kw: object) -> object:
        raise AssertionError("cluster-wide metadata requested")

    def describe_topics(self, topics: TopicCollection, **_kw: object) -> dict[str, Future[object]]:
        names = list(topics.topic_names)
        self.described.append(names)
        out: dict[str, Future[object]] = {}
        for name in names:
            f: Future[object] = Future()
            if name == "a":
                f.set_result(object())
            else:
                f.set_exception(KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "unknown")))
            out[name] = f
        return out


def test_missing_topics_describes_only_the_topics_asked_about() -> None:
    admin = ClusterOfThousands()
    assert missing_topics(admin, ["b", "a", "c", "a"]) == ["b", "c"]  # type: ignore[arg-type]
    assert admin.described == [["a", "b", "c"]]

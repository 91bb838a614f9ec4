"""The one-line causes of Kafka refusals, from librdkafka's own texts (recorded on a secured
Apache Kafka 4.1.2 by tests/integration/test_security.py), and the client log that names the
topic a transaction was refused on."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError

from worker.kafka_errors import ClientLog, Resources, explain

RES = Resources("classify.in", "classify-worker", "classify-worker-pod-0", ("classify.dlq", "routed.a", "routed.b"))
ADDPARTS = 'TxnCoordinator/1: Failed to add partition "%s" [2] to transaction: Broker: Topic authorization failed'


@pytest.mark.parametrize(
    ("code", "text", "side", "expected"),
    [
        (
            KafkaError._AUTHENTICATION,
            "sasl_ssl://b:9093/bootstrap: SASL authentication error: Authentication failed during authentication "
            "due to invalid credentials with SASL mechanism SCRAM-SHA-512",
            "admin",
            "authentication failed: wrong SASL username or password",
        ),
        (
            KafkaError._SSL,
            "sasl_ssl://b:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
            "admin",
            "TLS: the broker's certificate is not trusted (ssl.ca.location)",
        ),
        (
            KafkaError._TRANSPORT,
            "sasl_ssl://b:9092/bootstrap: SSL handshake failed: Disconnected: SSL connection closed by peer: "
            "connecting to a PLAINTEXT broker listener?",
            "admin",
            "TLS is configured but the listener does not speak TLS",
        ),
        (
            KafkaError._AUTHENTICATION,
            "SASL SCRAM-SHA-512 mechanism handshake failed: Broker: Request not valid in current SASL state",
            "admin",
            "the listener does not offer this SASL mechanism",
        ),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, "Fetch failed", "consumer", "missing ACL: READ on topic classify.in "),
        (KafkaError.GROUP_AUTHORIZATION_FAILED, "x", "consumer", "missing ACL: READ on group classify-worker "),
        (
            KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
            "x",
            "producer",
            "missing ACL: WRITE on transactional-id classify-worker-pod-0 ",
        ),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, "x", "admin", "missing ACL: CREATE on the topics to create"),
        (
            KafkaError.TOPIC_AUTHORIZATION_FAILED,
            "x",
            "producer",
            "missing ACL: WRITE on one of the topics classify.dlq, routed.a, routed.b",
        ),
    ],
)
def test_refusals_name_their_cause(code: int, text: str, side: str, expected: str) -> None:
    line = explain(KafkaError(code, text), RES, side)  # type: ignore[arg-type]
    assert line is not None and expected in line, line
    assert text in line, "librdkafka's own words stay in the line, for searching"


@pytest.mark.parametrize(
    "code", [KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT, KafkaError._PARTITION_EOF]
)
def test_errors_that_may_pass_are_not_refusals(code: int) -> None:
    assert explain(KafkaError(code, "Connection refused"), RES, "consumer") is None


def test_the_client_log_names_the_topic_a_transaction_was_refused_on() -> None:
    # Given librdkafka's log lines for a transaction refused on one topic
    client_log = ClientLog()
    client_log.log(logging.ERROR, "%s [%s] %s", "ADDPARTS", "producer-1", ADDPARTS % "routed.a")
    client_log.log(
        logging.ERROR,
        "%s [%s] %s",
        "ADDPARTS",
        "producer-1",
        ADDPARTS.replace("Topic authorization failed", "Operation not attempted") % "classify.dlq",
    )
    # When the transaction then fails with a code that names no ACL
    line = explain(KafkaError(KafkaError._STATE, "Local: Erroneous state"), RES, "producer", client_log.denied_topics)
    # Then the line names the refused topic only
    assert line is not None and "missing ACL: WRITE on topic routed.a " in line, line
    assert "classify.dlq" not in line


def test_the_client_log_forwards_lines_and_spots_a_listener_of_another_protocol(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client_log = ClientLog()
    disconnect = "b:9093/bootstrap: Disconnected: connection closed by peer (after %dms in state APIVERSION_QUERY)"
    with caplog.at_level(logging.INFO, logger="librdkafka"):
        client_log.log(logging.INFO, "%s [%s] %s", "FAIL", "producer-1", disconnect % 3)
    assert [r.getMessage() for r in caplog.records] == ["FAIL [producer-1] " + disconnect % 3]
    assert client_log.protocol_hint is not None and "security.protocol" in client_log.protocol_hint

"""Security on a real broker: a second local Apache Kafka with a SASL_SSL listener (SCRAM-SHA-512,
a CA made for this run) and the StandardAuthorizer. The worker authenticates as an ordinary user
and holds exactly the ACLs docs/security.md lists; the tests' own producer and read_committed
reader use the broker's super-user PLAINTEXT listener, so they judge from outside.

Every outcome is read from outside: the outputs (read_committed), the group's committed offsets,
the CLI's exit code and the line it prints. That a line names the cause is itself the
requirement here, so those lines are asserted on."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from devkit.toolkit import end_offsets, read_outputs, start_worker
from tests.support import scenario
from tests.support.kafka import NEEDS_FAUST, TopicSet, produce, wait_for_log

pytestmark = pytest.mark.integration
CATEGORIES = ["banking", "travel", "weather"]
PARTITIONS = 3
USER = "classify"
PRINCIPAL = f"User:{USER}"
#: unique per run, so finding it anywhere in the output can only be a leak
PASSWORD = f"pw-{uuid.uuid4().hex}"
#: the worker's exit code when the cluster refuses it (worker/cli.py, docs/security.md)
EXIT_ACCESS = 4
#: a refusal is reported within seconds; a silent wait would run into this
REFUSAL_TIMEOUT_S = 45
#: A refused run prints its start-up lines (Faust's: about 40), librdkafka's failures (a line per
#: partition a transaction was refused) and the refusal line; a retry loop would print far more.
REFUSAL_MAX_LINES = 60
#: The Faust engine's batch size in the ACL test: faust.topics warns once per message of the
#: batch whose send was refused, so its output is bounded by this on top of REFUSAL_MAX_LINES.
FAUST_BATCH = 20


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if shutil.which("java") is None:
        pytest.skip("the secured broker is a local Apache Kafka: needs java")
    from devkit.security import SecuredKafka

    with SecuredKafka(tmp_path_factory.mktemp("secured")) as kafka:
        kafka.add_user(USER, PASSWORD)
        yield kafka


def _topics(plain: str) -> TopicSet:
    """Fresh names, every topic created up front by the super user (an operator-owned cluster)."""
    topics = TopicSet.fresh()
    admin = AdminClient({"bootstrap.servers": plain})
    names = [topics.input, *topics.outputs(CATEGORIES)]
    for f in admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names]).values():
        f.result(30)
    return topics


def _acls(topics: TopicSet, auto_create: bool = False) -> list:
    from devkit.security import worker_acls

    # the transactional id is `<group>-<instance>`, so the group name is its prefix
    return worker_acls(topics.input, topics.group, topics.prefix, topics.dlq, topics.group, auto_create)


def _env(secured, topics: TopicSet, bundle: Path, **config: object) -> dict[str, str]:
    client = {**secured.client_config(USER), **config}
    return {
        **topics.env(secured.secure),
        "CW_KAFKA__CONFIG": json.dumps(client),
        "CW_KAFKA__SASL_PASSWORD": PASSWORD,
        "CW_KAFKA__INSTANCE_ID": "s1",
        "CW_MODEL__PATH": str(bundle),
        "CW_LIMITS__MAX_INPUT_BYTES": str(scenario.MAX_INPUT_BYTES),
        "CW_TOPICS__AUTO_CREATE": "false",
        "CW_METRICS__PORT": "0",
    }


def _committed(plain: str, topics: TopicSet) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": plain, "group.id": topics.group})
    try:
        tps = consumer.committed([TopicPartition(topics.input, p) for p in range(PARTITIONS)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()


def _refusal(log: Path) -> str:
    """The CLI's one line on stderr: `classify-worker: Kafka refused the worker: ...`."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("classify-worker: Kafka refused")]
    assert len(lines) == 1, f"expected one refusal line, got {lines}:\n{log.read_text()[-3000:]}"
    return lines[0]


def _run_refused(env: dict[str, str], log: Path, *args: str, max_lines: int = REFUSAL_MAX_LINES) -> tuple[str, float]:
    """Run a worker that must be refused: exit EXIT_ACCESS soon, one line, no traceback, no loop."""
    started = time.monotonic()
    worker = start_worker(env, log, "--idle-exit", "20", *args)
    try:
        code = worker.wait(REFUSAL_TIMEOUT_S + 30)
    finally:
        if worker.poll() is None:
            worker.kill()
    took = time.monotonic() - started
    text = log.read_text()
    assert code == EXIT_ACCESS, f"exit {code}, expected {EXIT_ACCESS}:\n{text[-3000:]}"
    assert took < REFUSAL_TIMEOUT_S, f"refused only after {took:.0f} s"
    assert "Traceback" not in text, text[-3000:]
    assert len(text.splitlines()) < max_lines, f"{len(text.splitlines())} lines: a tight loop?\n{text[-3000:]}"
    assert PASSWORD not in text
    return _refusal(log), took


def test_exactly_the_listed_acls_route_exactly_once_and_the_password_shows_nowhere(
    secured, tiny_bundle: Path, tmp_path: Path
) -> None:
    from devkit.security import acls_of, grant

    # Given a worker principal holding exactly the documented ACLs, and nothing else
    topics = _topics(secured.plain)
    acls = _acls(topics)
    grant(secured.admin(), PRINCIPAL, acls)
    held = acls_of(secured.admin(), PRINCIPAL)
    assert len(held) == len(acls), f"the principal holds more than the listed set: {sorted(held)}"

    # When a worker with DEBUG logs (librdkafka's too) routes 300 messages over SASL_SSL
    env = {**_env(secured, topics, tiny_bundle, debug="security,broker,conf"), "CW_LOG_LEVEL": "DEBUG"}
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        wait_for_log(log, "partitions assigned", timeout_s=60)
        # the metrics server's own port (CW_METRICS__PORT=0), from its start line: no port race
        port = next(
            json.loads(line)["metrics_port"] for line in log.read_text().splitlines() if "worker starting" in line
        )
        messages, expected = scenario.build(300)
        produce(secured.plain, topics.input, messages)
        received = read_outputs(secured.plain, topics.outputs(CATEGORIES), expect=len(expected), quiet_s=0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()

    # Then every id arrived exactly once, offsets are committed to the end
    scenario.check(received, expected, topics.prefix, topics.dlq)
    ends = {p: o for (_t, p), o in end_offsets(secured.plain, [topics.input]).items()}
    assert _committed(secured.plain, topics) == ends
    # And the password is in no log line, no metric, no exception text, no output or DLQ header
    text = log.read_text()
    assert "sasl" in text.lower(), "librdkafka's security debug lines were not captured"
    assert "classify_messages_total" in metrics
    leaks = [
        where
        for where, blob in [("log", text), ("metrics", metrics)]
        + [(f"{o.topic} header {k}", v or b"") for o in received for k, v in o.headers.items()]
        + [(f"{o.topic} value", o.value or b"") for o in received]
        if (PASSWORD.encode() if isinstance(blob, bytes) else PASSWORD) in blob
    ]
    assert leaks == []


def test_each_missing_acl_is_named_nothing_lost_or_doubled_and_restoring_it_resumes(
    secured, tiny_bundle: Path, tmp_path: Path
) -> None:
    from devkit.security import grant

    # Given 300 messages waiting, and a worker principal with the full set
    topics = _topics(secured.plain)
    admin = secured.admin()
    acls = _acls(topics)
    grant(admin, PRINCIPAL, acls)
    messages, expected = scenario.build(300)
    produce(secured.plain, topics.input, messages)
    env = _env(secured, topics, tiny_bundle)
    outputs = topics.outputs(CATEGORIES)

    # When each ACL a worker cannot do without is removed in turn
    # (READ and WRITE imply DESCRIBE, so removing a DESCRIBE alone changes nothing)
    # Then it exits 4 with a line naming the permission and the resource, having committed nothing
    observed = _refused_without_each(secured, topics, [a for a in acls if a.operation != "DESCRIBE"], env, tmp_path)

    # And with auto-create on, an output topic missing and no CREATE: the same, naming CREATE
    for f in admin.delete_topics([topics.fallback]).values():
        f.result(30)
    create_env = {**env, "CW_TOPICS__AUTO_CREATE": "true", "CW_TOPICS__PARTITIONS": str(PARTITIONS)}
    line, took = _run_refused(create_env, tmp_path / "create.log")
    observed["CREATE (auto-create)"] = (line, took)
    assert "missing ACL: CREATE on" in line, line

    # When every ACL is back (CREATE too, as auto-create needs it), one worker drains the topic
    grant(admin, PRINCIPAL, [a for a in _acls(topics, auto_create=True) if a.operation == "CREATE"])
    worker = start_worker(create_env, tmp_path / "restored.log", "--idle-exit", "4")
    assert worker.wait(120) == 0, (tmp_path / "restored.log").read_text()[-3000:]

    # Then every id arrived exactly once and every offset is committed
    received = read_outputs(secured.plain, outputs, expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq)
    ends = {p: o for (_t, p), o in end_offsets(secured.plain, [topics.input]).items()}
    assert _committed(secured.plain, topics) == ends
    for acl, (line, took) in observed.items():
        print(f"without {acl}: exit {EXIT_ACCESS} after {took:.1f} s: {line}")


def _wanted_line(topics: TopicSet, acl: object) -> str:
    """The pattern of the refusal line when `acl` is missing."""
    patterns = {
        "READ on topic": rf"missing ACL: READ on topic {re.escape(topics.input)} ",
        "READ on group": rf"missing ACL: READ on group {re.escape(topics.group)} ",
        "WRITE on topic prefix": rf"missing ACL: WRITE on (topics?|one of the topics) {re.escape(topics.prefix)}\w+",
        f"WRITE on topic {topics.dlq}": rf"missing ACL: WRITE on topic {re.escape(topics.dlq)} ",
        "WRITE on transactional-id": rf"missing ACL: WRITE on transactional-id {re.escape(topics.group)}-s1 ",
    }
    return next(pattern for start, pattern in patterns.items() if str(acl).startswith(start))


def _refused_without_each(
    secured,
    topics: TopicSet,
    acls: list,
    env: dict[str, str],
    tmp_path: Path,
    *args: str,
    committed_nothing: bool = True,
    max_lines: int = REFUSAL_MAX_LINES,
) -> dict[str, tuple[str, float]]:
    """Remove each ACL in turn, run a worker that must exit 4 naming it, restore the ACL.
    `committed_nothing`: no output may be visible afterwards (exactly-once: the transaction was
    aborted). Returns ACL → (the line, seconds to exit)."""
    from devkit.security import grant, revoke

    admin = secured.admin()
    observed = {}
    for i, acl in enumerate(acls):
        revoke(admin, PRINCIPAL, [acl])
        line, took = _run_refused(env, tmp_path / f"without-{i}.log", *args, max_lines=max_lines)
        observed[str(acl)] = (line, took)
        assert re.search(_wanted_line(topics, acl), line), f"{acl}: {line}"
        if committed_nothing:
            assert read_outputs(secured.plain, topics.outputs(CATEGORIES), expect=0, timeout_s=2, quiet_s=0.5) == []
        grant(admin, PRINCIPAL, [acl])
    return observed


def _misconfigurations(secured, tmp_path: Path) -> dict[str, tuple[dict[str, object], str | None, str]]:
    """name → (librdkafka overrides, bootstrap override, what the refusal line must say)."""
    from devkit.security import untrusted_ca

    return {
        "wrong password": ({}, None, "wrong SASL username or password"),
        "untrusted CA": (
            {"ssl.ca.location": str(untrusted_ca(tmp_path))},
            None,
            "the broker's certificate is not trusted (ssl.ca.location)",
        ),
        "SASL_SSL against the PLAINTEXT listener": ({}, secured.plain, "the listener does not speak TLS"),
        "SASL_PLAINTEXT against the PLAINTEXT listener": (
            {"security.protocol": "SASL_PLAINTEXT"},
            secured.plain,
            "the listener does not offer this SASL mechanism",
        ),
    }


ENGINES = [
    pytest.param("confluent", id="confluent"),
    pytest.param("faust", id="faust", marks=NEEDS_FAUST),
]
CASES = [
    "wrong password",
    "untrusted CA",
    "SASL_SSL against the PLAINTEXT listener",
    "SASL_PLAINTEXT against the PLAINTEXT listener",
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES)
def test_bad_credentials_or_mismatched_security_exit_4_with_one_line(
    secured, tiny_bundle: Path, tmp_path: Path, engine: str, case: str
) -> None:
    # Given a worker whose security settings do not match the listener it is pointed at
    overrides, bootstrap, cause = _misconfigurations(secured, tmp_path)[case]
    topics = _topics(secured.plain)
    env = _env(secured, topics, tiny_bundle, **overrides)
    if bootstrap:
        env["CW_KAFKA__BOOTSTRAP_SERVERS"] = bootstrap
    if case == "wrong password":
        env["CW_KAFKA__SASL_PASSWORD"] = "not-" + PASSWORD

    # When it starts, Then it exits 4 within seconds with one line naming the cause
    line, took = _run_refused(env, tmp_path / "worker.log", "--engine", engine)
    assert cause in line, line
    assert ("not-" + PASSWORD) not in (tmp_path / "worker.log").read_text()
    # And nothing was consumed or routed
    assert read_outputs(secured.plain, topics.outputs(CATEGORIES), expect=0, timeout_s=2, quiet_s=0.2) == []
    print(f"{engine}, {case}: exit {EXIT_ACCESS} after {took:.1f} s: {line}")


def test_plaintext_against_the_tls_listener_waits_with_a_slow_logged_hint(
    secured, tiny_bundle: Path, tmp_path: Path
) -> None:
    # Given a worker with no security settings pointed at the SASL_SSL listener: librdkafka sees
    # only closed connections, as during a broker restart, so this is a wait, not an exit
    topics = _topics(secured.plain)
    env = {**_env(secured, topics, tiny_bundle), "CW_KAFKA__CONFIG": "{}"}
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        # When it has tried for 8 s
        time.sleep(8)
        assert worker.poll() is None, log.read_text()[-3000:]
    finally:
        worker.kill()
        worker.wait(10)
    # Then it waited with a backoff, each attempt logged with a hint at the security protocol
    lines = log.read_text().splitlines()
    waits = [json.loads(line) for line in lines if '"waiting for the broker"' in line]
    assert 2 <= len(waits) <= 5, f"{len(waits)} attempts in 8 s:\n" + "\n".join(lines[-20:])
    assert all("security.protocol" in (w.get("hint") or "") for w in waits), waits
    assert [w["retry_in_s"] for w in waits] == [0.5 * 2**i for i in range(len(waits))]
    assert len(lines) < 15, "\n".join(lines)


@NEEDS_FAUST
def test_faust_engine_routes_the_scenario_on_the_secured_listener(secured, tiny_bundle: Path, tmp_path: Path) -> None:
    from devkit.security import grant

    # Given the same least-privilege ACLs, and the shared scenario waiting in the input topic
    topics = _topics(secured.plain)
    grant(secured.admin(), PRINCIPAL, _acls(topics))
    messages, expected = scenario.build(300)
    produce(secured.plain, topics.input, messages)

    # When the Faust engine runs with the same SASL_SSL settings until the stream is idle
    log = tmp_path / "faust.log"
    worker = start_worker(
        {**_env(secured, topics, tiny_bundle), "CW_DELIVERY": "at_least_once"},
        log,
        "--engine",
        "faust",
        "--idle-exit",
        "5",
    )
    assert worker.wait(120) == 0, log.read_text()[-3000:]

    # Then every id arrived (at least once: the Faust engine's guarantee), and no password leaked
    received = read_outputs(secured.plain, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq, exactly_once=False)
    assert PASSWORD not in log.read_text()


@NEEDS_FAUST
def test_faust_engine_names_a_missing_acl_and_loses_nothing(secured, tiny_bundle: Path, tmp_path: Path) -> None:
    from devkit.security import grant

    # Given 300 messages waiting, and the least-privilege set but for one ACL at a time
    topics = _topics(secured.plain)
    acls = _acls(topics)
    grant(secured.admin(), PRINCIPAL, acls)
    messages, expected = scenario.build(300)
    produce(secured.plain, topics.input, messages)
    env = _env(secured, topics, tiny_bundle)
    # (no transactional-id: the Faust engine has no transactions)
    needed = [a for a in acls if a.operation != "DESCRIBE" and a.resource != "TRANSACTIONAL_ID"]

    # When the Faust engine runs without each, Then it exits 4 naming it (outputs sent before a
    # refused one may be visible: the Faust engine is at-least-once, without transactions)
    observed = _refused_without_each(
        secured,
        topics,
        needed,
        {**env, "CW_BATCH__MAX_ITEMS": str(FAUST_BATCH)},
        tmp_path,
        "--engine",
        "faust",
        committed_nothing=False,
        max_lines=REFUSAL_MAX_LINES + FAUST_BATCH,
    )

    # And with every ACL back, every id arrives
    log = tmp_path / "restored.log"
    worker = start_worker(env, log, "--engine", "faust", "--idle-exit", "5")
    assert worker.wait(120) == 0, log.read_text()[-3000:]
    received = read_outputs(secured.plain, topics.outputs(CATEGORIES), expect=len(expected))
    scenario.check(received, expected, topics.prefix, topics.dlq, exactly_once=False)
    for acl, (line, took) in observed.items():
        print(f"faust without {acl}: exit {EXIT_ACCESS} after {took:.1f} s: {line}")


@NEEDS_FAUST
def test_faust_engine_refuses_a_kafka_setting_it_cannot_apply(tiny_bundle: Path, tmp_path: Path) -> None:
    # Given a librdkafka setting aiokafka has no equivalent for
    topics = TopicSet.fresh()
    env = {
        **topics.env("127.0.0.1:9"),
        "CW_MODEL__PATH": str(tiny_bundle),
        "CW_METRICS__PORT": "0",
        "CW_KAFKA__CONFIG": json.dumps({"security.protocol": "SASL_SSL", "ssl.crl.location": "/etc/crl.pem"}),
    }
    # When the Faust engine starts, Then it refuses at once (exit 2), naming the setting
    log = tmp_path / "faust.log"
    worker = start_worker(env, log, "--engine", "faust")
    assert worker.wait(60) == 2, log.read_text()[-3000:]
    assert "the faust engine cannot apply these Kafka settings: ssl.crl.location" in log.read_text()

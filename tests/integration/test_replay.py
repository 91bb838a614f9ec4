"""`classify-worker replay` on a real broker: after a fix, every dead letter is routed once even
when the replayer is killed with SIGKILL mid-run and restarted; `--max-replays` ends a poison
loop. Judged from outside: read_committed readers over the topics, and the CLI's own summary."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from devkit.toolkit import Output, end_offsets, read_outputs, start_cli, start_worker
from tests.support import scenario
from tests.support.kafka import TopicSet, create_topic, produce, run_cli, wait_for_log

pytestmark = pytest.mark.integration
CATEGORIES = ["banking", "travel", "weather"]
PARTITIONS = 3
#: The "bug": an input limit too small for the long messages; the "fix" raises it.
BUGGY_LIMIT, FIXED_LIMIT = 300, 10_000
GAINED = ("error.reason", "error.message", "source.topic", "source.partition", "source.offset", "route.batch")


def _env(topics: TopicSet, bootstrap: str, bundle: Path, limit: int) -> dict[str, str]:
    return {
        **topics.env(bootstrap),
        "CW_MODEL__PATH": str(bundle),
        "CW_LIMITS__MAX_INPUT_BYTES": str(limit),
        "CW_TOPICS__PARTITIONS": str(PARTITIONS),
        "CW_METRICS__PORT": "0",
    }


def _messages(n: int) -> tuple[list[tuple[bytes, bytes, list[tuple[str, bytes]]]], dict[str, str]]:
    """Every third message is long (too large for the buggy limit), every tenth is broken JSON;
    returns the messages and each id's kind: long, broken or short."""
    messages, kinds = [], {}
    for i in range(n):
        ident = f"r{i:05d}"
        text, _ = scenario.VALID[i % len(scenario.VALID)]
        if i % 10 == 1:
            value, kinds[ident] = b'{"text": "unterminated', "broken"
        elif i % 3 == 0:
            value, kinds[ident] = json.dumps({"id": ident, "text": text, "meta": {"pad": "x" * 400}}).encode(), "long"
        else:
            value, kinds[ident] = json.dumps({"id": ident, "text": text}).encode(), "short"
        messages.append((ident.encode(), value, [("trace-id", ident.encode()), ("tenant", b"acme")]))
    return messages, kinds


def _replay(env: dict[str, str], topics: TopicSet, *args: str) -> dict:
    result = run_cli(env, "replay", "--from", topics.dlq, "--to", topics.input, "--json", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _keys(outputs: list[Output]) -> Counter[str]:
    return Counter((o.key or b"").decode() for o in outputs)


def _run_worker(env: dict[str, str], log: Path) -> None:
    worker = start_worker(env, log, "--idle-exit", "4")
    assert worker.wait(120) == 0, log.read_text()[-3000:]


def test_replay_after_a_fix_routes_every_dead_letter_once_despite_kill_9(
    kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path
) -> None:
    # Given a worker with a too-small input limit dead-lettered the long messages (and broken ones)
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, PARTITIONS)
    messages, kinds = _messages(1800)
    produce(kafka_bootstrap, topics.input, messages)
    _run_worker(_env(topics, kafka_bootstrap, tiny_bundle, BUGGY_LIMIT), tmp_path / "buggy.log")
    env = _env(topics, kafka_bootstrap, tiny_bundle, FIXED_LIMIT)
    long_ids = sorted(k for k, kind in kinds.items() if kind == "long")
    n_broken = sum(kind == "broken" for kind in kinds.values())
    input_end = end_offsets(kafka_bootstrap, [topics.input])

    # When a dry run looks first, and a window that ends before the dead letters selects nothing
    dry = _replay(env, topics, "--reason", "too_large", "--dry-run")
    assert (dry["replayed"], dry["not_selected"]) == ({"too_large": len(long_ids)}, {"invalid_json": n_broken})
    assert len(dry["examples"]) == 5 and all(e["reason"] == "too_large" and e["key"] in kinds for e in dry["examples"])
    early = _replay(env, topics, "--reason", "too_large", "--dry-run", "--until", "2000-01-01T00:00:00Z")
    assert early["replayed"] == {} and early["not_selected"] == {}

    # And the replay is killed with SIGKILL mid-run, then run again to the end
    log = tmp_path / "replay.log"
    first = start_cli(env, log, "replay", "--from", topics.dlq, "--to", topics.input, "--reason", "too_large",
                      "--max-rate", "100")  # fmt: skip
    try:
        read_outputs(kafka_bootstrap, [topics.input], expect=100, timeout_s=60, quiet_s=0, start=input_end)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    partial = read_outputs(kafka_bootstrap, [topics.input], expect=len(long_ids), timeout_s=3, start=input_end)
    assert 100 <= len(partial) < len(long_ids), (
        f"kill -9 was not mid-run: {len(partial)} of {len(long_ids)}:\n{log.read_text()[-2000:]}"
    )
    print(f"replay killed after {len(partial)} of {len(long_ids)} committed")
    second = _replay(env, topics, "--reason", "too_large")

    # Then the input holds each dead letter once more, as it was produced, with replay.count 1
    assert second["replayed"] == {"too_large": len(long_ids) - len(partial)}, "the restart resumed elsewhere"
    replayed = read_outputs(kafka_bootstrap, [topics.input], expect=len(long_ids), start=input_end)
    counts = _keys(replayed)
    assert sorted(counts) == long_ids, f"missing {sorted(set(long_ids) - set(counts))[:10]}"
    assert [k for k, n in counts.items() if n > 1] == [], "replayed twice"
    original = {k.decode(): v for k, v, _ in messages}
    for o in replayed:
        ident = (o.key or b"").decode()
        assert o.value == original[ident], f"{ident}: value changed"
        assert (o.headers.get("trace-id"), o.headers.get("tenant"), o.headers.get("replay.count")) == (
            ident.encode(), b"acme", b"1"), f"{ident}: headers {o.headers}"  # fmt: skip
        assert not set(GAINED) & set(o.headers), f"{ident} kept dead-letter headers: {o.headers}"

    # And after the fix, the worker routes every once-dead letter exactly once
    _run_worker(env, tmp_path / "fixed.log")
    outputs = read_outputs(kafka_bootstrap, topics.outputs(CATEGORIES), expect=len(kinds) + len(long_ids))
    by_id: dict[str, list[str]] = defaultdict(list)
    for o in outputs:
        by_id[(o.key or b"").decode()].append(o.topic)
    want = {topics.dlq: {"broken"}, **{topics.prefix + c: {"short", "long"} for c in CATEGORIES}}
    wrong = {}
    for ident, kind in kinds.items():
        routed = [t for t in by_id[ident] if t != topics.dlq]
        dead = by_id[ident].count(topics.dlq)
        ok = (dead, len(routed)) == ({"broken": 1, "long": 1, "short": 0}[kind], 0 if kind == "broken" else 1)
        if not ok or not all(kind in want.get(t, {"short", "long"}) for t in routed):
            wrong[ident] = (kind, by_id[ident])
    assert wrong == {}, f"{len(wrong)} ids misrouted, e.g. {list(wrong.items())[:5]}"


def test_max_replays_stops_a_poison_loop(kafka_bootstrap: str, tiny_bundle: Path, tmp_path: Path) -> None:
    # Given messages that fail every time, dead-lettered by a worker that keeps running
    topics = TopicSet.fresh()
    create_topic(kafka_bootstrap, topics.input, PARTITIONS)
    poison = [f"p{i}" for i in range(5)]
    produce(kafka_bootstrap, topics.input, [(p.encode(), b"{not json", [("trace-id", p.encode())]) for p in poison])
    env = _env(topics, kafka_bootstrap, tiny_bundle, FIXED_LIMIT)
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        wait_for_log(log, "partitions assigned")
        read_outputs(kafka_bootstrap, [topics.dlq], expect=len(poison), quiet_s=0)

        # When replay (--max-replays 2) and the worker go round three times
        summaries = []
        for cycle in range(1, 4):
            summaries.append(_replay(env, topics, "--max-replays", "2"))
            expect = len(poison) * (1 + min(cycle, 2))
            assert len(read_outputs(kafka_bootstrap, [topics.dlq], expect=expect, quiet_s=0.5)) == expect
        time.sleep(1)  # the worker would dead-letter a fourth copy by now if one had been replayed
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)

    # Then each poison message was re-driven twice, then skipped and counted
    assert [s["replayed"] for s in summaries] == [{"invalid_json": 5}, {"invalid_json": 5}, {}]
    assert [s["skipped_max_replays"] for s in summaries] == [{}, {}, {"invalid_json": 5}]
    inputs = read_outputs(kafka_bootstrap, [topics.input], expect=3 * len(poison))
    assert _keys(inputs) == dict.fromkeys(poison, 3)
    dead = read_outputs(kafka_bootstrap, [topics.dlq], expect=3 * len(poison))
    history: dict[str, Counter[bytes | None]] = defaultdict(Counter)
    for o in dead:
        history[(o.key or b"").decode()][o.headers.get("replay.count")] += 1
    assert history == {p: Counter([None, b"1", b"2"]) for p in poison}, "each once: as produced, replayed 1x, 2x"

"""Kafka clients that share no code with librdkafka, reading what the worker wrote: the Java
console consumer from the Apache Kafka jars the tests already run the broker from, kafkajs
(Node) from npm, and aiokafka (pure Python, the Faust engine's client). Each returns every
record it read as a `Read`, bytes exactly as received."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NODE_SRC = Path(__file__).resolve().parent / "node"
NODE_DIR = ROOT / ".tools" / "node"
LOG4J = Path(__file__).resolve().parent / "java" / "log4j2-stderr.yaml"
CONSOLE_CONSUMER = "org.apache.kafka.tools.consumer.ConsoleConsumer"

# The console consumer's separators: control characters no JSON value or test key contains
_FIELD, _RECORD, _HEADER, _NULL = "\x1f", "\x1e", "\x1c", "\x15"


@dataclass(frozen=True)
class Read:
    topic: str | None  # None: the console consumer does not print it
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


def node_modules() -> Path:
    """`npm ci` of tests/support/node into .tools/node, once per lock file (what `make test`'s
    prerequisite does too); returns the node_modules folder."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise RuntimeError("the interop tests need node and npm on PATH")
    lock = (NODE_SRC / "package-lock.json").read_bytes()
    stamp = NODE_DIR / ".installed"
    digest = hashlib.sha256(lock).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return NODE_DIR / "node_modules"
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copy(NODE_SRC / name, NODE_DIR / name)
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"npm ci failed in {NODE_DIR}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    stamp.write_text(digest)
    return NODE_DIR / "node_modules"


def read_with_kafkajs(bootstrap: str, topics: list[str], expect: int, timeout_s: float = 90.0) -> subprocess.Popen[str]:
    """Start kafkajs reading `topics` (group, read_committed); finish with `kafkajs_records`."""
    modules = node_modules()
    opts = {"brokers": bootstrap.split(","), "topics": topics, "expect": expect, "timeoutMs": int(timeout_s * 1000)}
    return subprocess.Popen(
        ["node", str(NODE_SRC / "kafkajs-read.js"), json.dumps(opts)],
        env={**os.environ, "NODE_PATH": str(modules)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kafkajs_records(proc: subprocess.Popen[str], timeout_s: float = 120.0) -> list[Read]:
    out, err = proc.communicate(timeout=timeout_s)
    if proc.returncode != 0:
        raise AssertionError(f"kafkajs exited {proc.returncode}:\n{err[-3000:]}")

    def raw(v: str | None) -> bytes | None:
        return None if v is None else base64.b64decode(v)

    reads = []
    for line in out.splitlines():
        r = json.loads(line)
        headers = tuple((k, raw(v)) for k, vs in r["headers"].items() for v in vs)
        reads.append(Read(r["topic"], raw(r["key"]), raw(r["value"]), headers))
    return reads


def read_with_console_consumer(
    bootstrap: str, include: str, expect: int, idle_s: float = 8.0
) -> subprocess.Popen[bytes]:
    """Start the Java console consumer on the topics matching `include` (group, read_committed),
    for up to `expect + 1` records, stopping after `idle_s` without one: a duplicate beyond the
    expected count would be read too. Finish with `console_records`."""
    from devkit.apache_kafka import ensure_jars

    java = shutil.which("java")
    if java is None:
        raise RuntimeError("the interop tests need java on PATH")
    formatter = {
        "print.key": "true",
        "print.headers": "true",
        "print.timestamp": "false",
        "key.separator": _FIELD,
        "line.separator": _RECORD,
        "headers.separator": _HEADER,
        "null.literal": _NULL,
    }
    cmd = [
        java,
        "-Xmx256m",
        f"-Dlog4j2.configurationFile={LOG4J}",
        "-cp",
        f"{ensure_jars()}/*",
        CONSOLE_CONSUMER,
        *("--bootstrap-server", bootstrap, "--include", include, "--from-beginning"),
        *("--isolation-level", "read_committed", "--max-messages", str(expect + 1)),
        *("--timeout-ms", str(int(idle_s * 1000))),
        *(arg for k, v in formatter.items() for arg in ("--property", f"{k}={v}")),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def console_records(proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> list[Read]:
    out, err = proc.communicate(timeout=timeout_s)
    text = err.decode(errors="replace")
    # it ends on the idle time-out by design; anything else logged at ERROR is a failure
    errors = [line for line in text.splitlines() if " ERROR " in line and "terminating consumer process" not in line]
    assert not errors and proc.returncode == 0, f"console consumer exited {proc.returncode}:\n{text[-3000:]}"
    reads = []
    for record in out.split(_RECORD.encode()):
        if not record:
            continue
        headers_raw, key, value = record.split(_FIELD.encode(), 2)
        reads.append(Read(None, _nullable(key), _nullable(value), _console_headers(headers_raw)))
    return reads


def _nullable(raw: bytes) -> bytes | None:
    return None if raw == _NULL.encode() else raw


def _console_headers(raw: bytes) -> tuple[tuple[str, bytes | None], ...]:
    if raw == b"NO_HEADERS":
        return ()
    pairs = []
    for item in raw.split(_HEADER.encode()):
        key, _, value = item.partition(b":")  # the formatter's fixed key:value separator
        pairs.append((key.decode(), _nullable(value)))
    return tuple(pairs)


def read_with_aiokafka(bootstrap: str, topics: list[str], expect: int, timeout_s: float = 60.0) -> list[Read]:
    """aiokafka in a consumer group, read_committed, until `expect` records and 2 s without more."""
    from aiokafka import AIOKafkaConsumer

    async def read() -> list[Read]:
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap,
            group_id=f"aiokafka-{uuid.uuid4().hex[:8]}",
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        reads: list[Read] = []
        deadline, last = time.monotonic() + timeout_s, time.monotonic()
        try:
            while time.monotonic() < deadline and (len(reads) < expect or time.monotonic() - last < 2.0):
                batches = await consumer.getmany(timeout_ms=200)
                for messages in batches.values():
                    reads += [Read(m.topic, m.key, m.value, tuple(m.headers)) for m in messages]
                    last = time.monotonic()
        finally:
            await consumer.stop()
        return reads

    return asyncio.run(read())

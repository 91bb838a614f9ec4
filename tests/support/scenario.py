"""The mixed stream every engine must route: valid queries per category, out-of-scope ones,
and more than ten kinds of malformed input, each with the outcome the contract demands."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from devkit.toolkit import Output

#: Texts for the tiny model (tests/support/tiny_model.py) and the topic suffix each must reach.
VALID = [
    ("what is my account balance", "banking"),
    ("please wire the rent", "banking"),
    ("book a flight to Oslo", "travel"),
    ("need a hotel room for two", "travel"),
    ("is rain expected", "weather"),
    ("tell me something funny", "fallback"),
    ("flight or transfer first", "fallback"),  # two categories tie: low confidence
]
#: (value, expected dead-letter reason); ids travel in the key so malformed values stay findable.
MALFORMED: list[tuple[bytes | None, str]] = [
    (None, "null_value"),
    (b'{"text": "' + b"x" * 3000 + b'"}', "too_large"),
    (b'{"text": "caf\xe9 balance"}', "encoding"),
    (b'{"text": "unterminated', "invalid_json"),
    (b"", "invalid_json"),
    (b'{"text": "\\ud800 lone surrogate"}', "invalid_json"),
    (b'["balance"]', "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b"42", "not_an_object"),
    (b'{"text": 42}', "schema"),
    (b'{"body": "balance"}', "schema"),
    (b'{"text": "rain", "kind": "image"}', "schema"),
    (b'{"text": "rain", "meta": [1, 2]}', "schema"),
    (b'{"text": "   "}', "empty_text"),
]
MAX_INPUT_BYTES = 2000


@dataclass(frozen=True)
class Expected:
    key: bytes
    topic_suffix: str  # category, "fallback" or "dlq"
    reason: str | None


def sized_inbound(size: int, text: str = "book a flight") -> bytes:
    """A valid inbound JSON value of exactly `size` bytes (the text padded with spaces)."""
    head = b'{"text": "' + text.encode()
    return head + b" " * (size - len(head) - 2) + b'"}'


def build(
    n: int, malformed_every: int = 20
) -> tuple[list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]], dict[str, Expected]]:
    """n messages; every `malformed_every`-th is malformed. Keys are the ids."""
    messages = []
    expected: dict[str, Expected] = {}
    for i in range(n):
        ident = f"m{i:06d}"
        headers = [("trace-id", ident.encode()), ("tenant", b"acme")]
        if i % malformed_every == 0:
            value, reason = MALFORMED[(i // malformed_every) % len(MALFORMED)]
            expected[ident] = Expected(ident.encode(), "dlq", reason)
        else:
            text, suffix = VALID[i % len(VALID)]
            value = json.dumps({"id": ident, "text": text, "meta": {"n": i}}).encode()
            expected[ident] = Expected(ident.encode(), suffix, None)
        messages.append((ident.encode(), value, headers))
    return messages, expected


def check(
    received: list[Output], expected: dict[str, Expected], prefix: str, dlq: str, exactly_once: bool = True
) -> None:
    """Every id exactly once (or at least once) on its expected topic, with key, headers and
    reason intact, and nothing else anywhere. The message names what broke."""
    seen = Counter(r.key.decode() if r.key else "<no key>" for r in received)
    missing = sorted(set(expected) - set(seen))
    strays = sorted(set(seen) - set(expected))
    dups = sorted(k for k, c in seen.items() if c > 1)
    problems = []
    if missing:
        problems.append(f"{len(missing)} lost: {missing[:20]}")
    if strays:
        problems.append(f"{len(strays)} unexpected: {strays[:20]}")
    if dups and exactly_once:
        problems.append(f"{len(dups)} duplicated: {dups[:20]}")
    for r in received:
        ident = r.key.decode() if r.key else ""
        exp = expected.get(ident)
        if exp is None:
            continue
        want_topic = dlq if exp.topic_suffix == "dlq" else prefix + exp.topic_suffix
        if r.topic != want_topic:
            problems.append(f"{ident} on {r.topic}, expected {want_topic}")
        if r.headers.get("trace-id") != ident.encode() or r.headers.get("tenant") != b"acme":
            problems.append(f"{ident} lost its headers: {r.headers}")
        if exp.reason is not None and r.headers.get("error.reason") != exp.reason.encode():
            problems.append(f"{ident} reason {r.headers.get('error.reason')!r}, expected {exp.reason}")
        if exp.reason is None:
            body = json.loads(r.value or b"{}")
            if body.get("id") != ident or "route" not in body:
                problems.append(f"{ident} routed value malformed: {body}")
    assert not problems, "\n".join(problems[:40])

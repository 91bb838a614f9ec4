"""JSON in and out at orjson's speed, with integers of any size kept exact.

orjson reads an integer outside 64 bits as a float (18446744073709551616 becomes
1.8446744073709552e19, its last digits lost) and refuses to write one. Pass-through fields
(`meta`, unknown fields) must reach the routed topic as the producer wrote them, so a text that
may hold such an integer is read again with the standard library, which keeps every digit, and
a body holding one is written by it. Both are rare, so the common path stays on orjson.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

#: 19 digits reach 10^18, below orjson's exact range (-2^63 .. 2^64-1): a text without such a run
#: holds no integer orjson could round. A run inside a string only costs the slower parse.
_LONG_DIGITS = re.compile(r"\d{19}")


def loads(text: str) -> Any:
    """Parse strictly (orjson: no NaN, no lone surrogates, depth <= 1024); integers stay exact.

    Raises `ValueError` (`orjson.JSONDecodeError`) for invalid JSON, for a number beyond a
    double's range (309+ digits), which no JSON reader can be relied on to hold, and for nesting
    deeper than the standard library can read when it must keep a long integer exact."""
    value = orjson.loads(text)
    if _LONG_DIGITS.search(text) is None:
        return value
    try:  # orjson has validated the text: the standard library reads the same value, ints exact
        return json.loads(text)
    except RecursionError as e:
        raise ValueError("JSON nested too deep to keep its long integers exact") from e


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; the standard library writes what orjson cannot (an int beyond 64 bits)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()

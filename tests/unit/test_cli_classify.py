"""`classify-worker classify` as a new user runs it: through the real CLI in a subprocess, with
whatever bytes a shell pipe or argv holds. Every line gets one JSON object, a result or an error,
in order; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _classify(bundle: Path, *args: str | bytes, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "classify", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env={**os.environ, "CW_MODEL__PATH": str(bundle), "CW_LOG_LEVEL": "WARNING", **env},
        timeout=120,
        check=False,
    )


def _lines(result: subprocess.CompletedProcess[bytes]) -> list[dict]:
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")[-3000:]
    return [orjson.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("lang", ["C.UTF-8", "C"])
def test_invalid_utf8_on_stdin_gets_an_error_object_and_the_other_lines_their_results(
    tiny_bundle: Path, lang: str
) -> None:
    # Given the three lines, the middle one not UTF-8, under a UTF-8 and a C locale
    result = _classify(tiny_bundle, stdin=b"hello\n\xff\xfe bad\nbook a flight\n", LC_ALL=lang, LANG=lang)
    # Then one object per line, in order
    first, second, third = _lines(result)
    assert first["id"] == "0" and first["route"]["fallback"] is True
    assert second == {"id": "1", "error": "encoding"}
    assert third["id"] == "2" and third["route"]["category"] == "travel"


def test_invalid_utf8_in_arguments_is_an_error_object(tiny_bundle: Path) -> None:
    first, second = _lines(_classify(tiny_bundle, b"caf\xe9 wire", "my balance"))
    assert first == {"id": "0", "error": "encoding"}
    assert second["route"]["category"] == "banking"


def test_crlf_lines_blank_lines_and_a_missing_final_newline(tiny_bundle: Path) -> None:
    outs = _lines(_classify(tiny_bundle, stdin=b"wire money\r\n\nweather"))
    assert [o.get("error") or o["route"]["category"] for o in outs] == ["banking", "empty_text", "weather"]
    assert outs[0]["text"] == "wire money", "the line ending is not part of the text"


def test_more_lines_than_a_batch_keep_their_ids_and_order(tiny_bundle: Path) -> None:
    # Given more lines than a batch holds
    stdin = b"".join(b"rain %d\n" % i for i in range(700))
    outs = _lines(_classify(tiny_bundle, stdin=stdin, CW_BATCH__MAX_ITEMS="64"))
    assert [o["id"] for o in outs] == [str(i) for i in range(700)]
    assert {o["route"]["category"] for o in outs} == {"weather"}

"""Loopback ports for brokers and metrics servers started by the dev kit and the tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 now (the OS picks it); a race with another process is possible
    but harmless in tests, which fail loudly on a bind error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

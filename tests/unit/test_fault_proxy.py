"""devkit.fault_proxy on real loopback sockets, against a tiny upstream that echoes each Kafka
request frame back: each fault hits only the API keys it names, and does what it says."""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from devkit.fault_proxy import COMMITS, FETCH, Fault, FaultProxy

END_TXN, FETCH_KEY = 26, 1


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    with FaultProxy(("127.0.0.1", server.server_address[1])) as p:
        yield p
    server.shutdown()
    server.server_close()


def frame(api_key: int, body: bytes = b"payload") -> bytes:
    """A request: size, api key, api version, correlation id, body."""
    rest = struct.pack(">hhi", api_key, 0, 7) + body
    return struct.pack(">i", len(rest)) + rest


def connect(p: FaultProxy, timeout_s: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", p.port), timeout=timeout_s)


def roundtrip(s: socket.socket, api_key: int) -> bytes:
    request = frame(api_key)
    s.sendall(request)
    got = b""
    while len(got) < len(request):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_passes_frames_through_and_counts_them(proxy: FaultProxy) -> None:
    with connect(proxy) as s:
        assert roundtrip(s, FETCH_KEY) == frame(FETCH_KEY)
        assert roundtrip(s, END_TXN) == frame(END_TXN)
    assert proxy.stats.requests[FETCH_KEY] == 1 and proxy.stats.requests[END_TXN] == 1


def test_reset_hits_commits_only_and_sends_rst(proxy: FaultProxy) -> None:
    proxy.inject(Fault("reset", COMMITS))
    with connect(proxy) as fetcher:
        assert roundtrip(fetcher, FETCH_KEY) == frame(FETCH_KEY)
    with connect(proxy) as committer, pytest.raises(ConnectionResetError):
        roundtrip(committer, END_TXN)
    assert proxy.stats.applied["reset"] == 1


def test_limit_spares_later_connections(proxy: FaultProxy) -> None:
    proxy.inject(Fault("reset", COMMITS, limit=1))
    with connect(proxy) as first, pytest.raises(ConnectionResetError):
        roundtrip(first, END_TXN)
    with connect(proxy) as second:
        assert roundtrip(second, END_TXN) == frame(END_TXN)


def test_half_open_connection_stays_open_and_silent_even_after_clear(proxy: FaultProxy) -> None:
    proxy.inject(Fault("half_open", FETCH))
    with connect(proxy, timeout_s=0.5) as s:
        s.sendall(frame(FETCH_KEY))
        with pytest.raises(TimeoutError):  # neither an answer nor a close
            s.recv(65536)
        proxy.clear()
        s.sendall(frame(END_TXN))
        with pytest.raises(TimeoutError):
            s.recv(65536)
    with connect(proxy) as fresh:
        assert roundtrip(fresh, FETCH_KEY) == frame(FETCH_KEY)


def test_stall_holds_a_request_until_cleared(proxy: FaultProxy) -> None:
    proxy.inject(Fault("stall", COMMITS))
    with connect(proxy, timeout_s=0.5) as s:
        s.sendall(frame(END_TXN))
        with pytest.raises(TimeoutError):
            s.recv(65536)
        proxy.clear()
        s.settimeout(2.0)
        assert s.recv(65536) == frame(END_TXN)


def test_latency_delays_matching_requests(proxy: FaultProxy) -> None:
    proxy.inject(Fault("latency", FETCH, latency_s=0.3))
    with connect(proxy) as s:
        started = time.perf_counter()
        roundtrip(s, END_TXN)
        unmatched_s = time.perf_counter() - started
        started = time.perf_counter()
        roundtrip(s, FETCH_KEY)
        matched_s = time.perf_counter() - started
    assert matched_s >= 0.3 > unmatched_s

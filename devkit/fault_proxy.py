"""A TCP fault proxy between Kafka clients and one broker, for the fault-injection chaos tests.

It reads the Kafka request framing on the client → broker stream (int32 size, int16 api key,
…), so a fault can hit one kind of request — commits (`AddOffsetsToTxn`, `TxnOffsetCommit`,
`EndTxn`, `OffsetCommit`) or fetches — instead of the whole connection. Four faults, each active
from `inject` until `clear` (or its `limit` of connections is used up):

- `latency`: every matching request is held `latency_s` before it is forwarded;
- `stall`: the first matching request on a connection, and all that follows it on that
  connection, is held until `clear` (a broker that stops answering past the clients' call
  timeout, then answers);
- `reset`: the connection is closed with a TCP RST instead of forwarding the request;
- `half_open`: the request and everything after it on that connection vanish, in both
  directions, and the connection is never closed by the proxy: the peer looks alive and silent
  for ever, and only the client's own timeouts can get it out (a broker host that lost power).

Why not Toxiproxy: it is not among the Go modules this machine can build from, and its toxics act
on whole connections; Kafka multiplexes fetches and commits over a few connections per client, so a
proxy that understands the framing is what targets a commit rather than "some bytes".

The broker must advertise the proxy's address (clients reconnect to what metadata names):
`proxied_kafka` starts a `LocalKafka` with a second listener advertised at the proxy's port,
beside the direct PLAINTEXT listener the test's own producer, reader and admin client use.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from devkit.apache_kafka import LocalKafka
from devkit.ports import free_port

#: Kafka API keys (the protocol guide's numbering) the tests aim at.
FETCH = frozenset({1})
COMMITS = frozenset({8, 25, 26, 28})  # OffsetCommit, AddOffsetsToTxn, EndTxn, TxnOffsetCommit
#: Size + api key + api version + correlation id: enough of a request header to classify it.
HEADER_BYTES = 12
#: Largest request the proxy will frame; the broker's socket.request.max.bytes default.
MAX_REQUEST_BYTES = 100 * 1024 * 1024
CHUNK_BYTES = 64 * 1024

_T = TypeVar("_T")
FaultKind = Literal["latency", "stall", "reset", "half_open"]


@dataclass(frozen=True)
class Fault:
    """One fault: which requests it hits (`apis`; empty: every request) and, for `stall`,
    `reset` and `half_open`, on at most `limit` connections (None: every one until cleared)."""

    kind: FaultKind
    apis: frozenset[int] = frozenset()
    latency_s: float = 0.0
    limit: int | None = None

    def matches(self, api_key: int) -> bool:
        return not self.apis or api_key in self.apis


@dataclass
class _Active:
    fault: Fault
    released: asyncio.Event
    connections_hit: int = 0


@dataclass
class ProxyStats:
    """What the proxy saw and did: requests per API key, and faults applied per kind. A test
    asserts its fault really fired, so it cannot pass by missing its target."""

    requests: Counter[int] = field(default_factory=Counter)
    applied: Counter[str] = field(default_factory=Counter)
    connections: int = 0


class _Pipe:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.c_reader, self.c_writer = client
        self.dark = False  # half-open: nothing more goes anywhere

    async def run(self) -> None:
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.proxy.upstream)
        except OSError:
            self.c_writer.close()
            return
        tasks = [asyncio.create_task(self._requests(u_writer)), asyncio.create_task(self._responses(u_reader))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            # a peer's close or reset ends a direction with an error: expected, and retrieved
            # here so asyncio does not report it as unhandled
            await asyncio.gather(*tasks, return_exceptions=True)
            u_writer.close()
            if not self.dark:
                self.c_writer.close()
            else:  # half-open: the client's socket stays open and unanswered until the client drops it
                with contextlib.suppress(Exception):
                    while await self.c_reader.read(CHUNK_BYTES):
                        pass
                self.c_writer.close()

    async def _requests(self, upstream: asyncio.StreamWriter) -> None:
        while True:
            header = await self.c_reader.readexactly(HEADER_BYTES)
            size, api_key = struct.unpack(">ih", header[:6])
            if not HEADER_BYTES - 4 <= size <= MAX_REQUEST_BYTES:
                raise ConnectionError(f"not a Kafka request (size {size})")
            frame = header + await self.c_reader.readexactly(size + 4 - HEADER_BYTES)
            self.proxy.stats.requests[api_key] += 1
            if not await self._apply_faults(api_key):
                return
            upstream.write(frame)
            await upstream.drain()

    async def _apply_faults(self, api_key: int) -> bool:
        """Act on every active fault matching this request; False ends the connection."""
        for active in list(self.proxy.active):
            f = active.fault
            if not f.matches(api_key) or active.released.is_set():
                continue
            if f.kind == "latency":
                self.proxy.stats.applied["latency"] += 1
                await asyncio.sleep(f.latency_s)
                continue
            if f.limit is not None and active.connections_hit >= f.limit:
                continue
            active.connections_hit += 1
            self.proxy.stats.applied[f.kind] += 1
            if f.kind == "stall":
                await active.released.wait()
            elif f.kind == "reset":
                _abort_with_rst(self.c_writer)
                return False
            else:
                self.dark = True
                return False
        return True

    async def _responses(self, upstream: asyncio.StreamReader) -> None:
        while data := await upstream.read(CHUNK_BYTES):
            self.c_writer.write(data)
            await self.c_writer.drain()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the kernel sends RST, the client reads ECONNRESET."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """`with FaultProxy(("127.0.0.1", broker_port)) as p: p.address` — an asyncio proxy on its
    own thread; `inject`, `clear` and `stats` are called from the test's thread."""

    def __init__(self, upstream: tuple[str, int], port: int | None = None) -> None:
        self.upstream = upstream
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.stats = ProxyStats()
        self.active: list[_Active] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", self.port))
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        await _Pipe(self, (reader, writer)).run()

    def inject(self, fault: Fault) -> None:
        async def add() -> None:
            self.active.append(_Active(fault, asyncio.Event()))

        self._call(add())

    def clear(self) -> None:
        """End every fault: stalled requests go on; half-open connections stay dark (as real
        ones do) and new connections pass."""

        async def release() -> None:
            for a in self.active:
                a.released.set()
            self.active.clear()

        self._call(release())

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def stop(self) -> None:
        if self._server is not None:
            self.clear()
            self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def proxied_kafka(data_dir: Path) -> Iterator[tuple[LocalKafka, FaultProxy]]:
    """A `LocalKafka` whose `PROXIED` listener is advertised at a `FaultProxy` in front of it:
    clients bootstrapped at `proxy.address` keep talking through the proxy; `kafka.bootstrap`
    stays direct (the test's own clients, and the broker itself)."""
    direct, behind = free_port(), free_port()
    with FaultProxy(("127.0.0.1", behind)) as proxy:
        kafka = LocalKafka(
            port=direct,
            data_dir=data_dir,
            listeners={"PROXIED": (behind, "PLAINTEXT")},
            properties={"advertised.listeners": f"PLAINTEXT://127.0.0.1:{direct},PROXIED://{proxy.address}"},
        )
        with kafka:
            yield kafka, proxy

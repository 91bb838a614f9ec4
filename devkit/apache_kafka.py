"""A local Apache Kafka (KRaft, one combined broker + controller node) from Maven Central jars:
the broker of every integration, chaos and bench run on a machine without Docker.

`python -m devkit.apache_kafka [--port 9092]` (what `make kafka` runs) starts one in the
foreground and prints `kafka ready on 127.0.0.1:<port>` once clients can use it; Ctrl-C stops it.

The jars are fetched once with Maven (`devkit/apache-kafka/pom.xml`) into the git-ignored
`.tools/kafka/libs`; the broker is formatted (`kafka.tools.StorageTool format`) and started
(`kafka.Kafka server.properties`) with a small heap, its output going to a file, never to an
unread pipe (a full pipe would stall the broker).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from devkit.ports import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
POM_DIR = HERE / "apache-kafka"
LIBS = Path(os.environ.get("CW_KAFKA_LIBS", REPO / ".tools" / "kafka" / "libs"))
#: A cold JVM formats storage and elects itself controller in 5-15 s on 2 busy cores.
START_TIMEOUT_S = 90.0
#: A clean shutdown writes its checkpoints in a few seconds; after this the broker is killed.
STOP_TIMEOUT_S = 30.0
#: Small heap: a test broker holds a few hundred MB of log at most, and shares 2 cores and the
#: memory with workers, producers and the test runner.
JVM_OPTS = ["-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]


#: The broker, and the console consumer the interop tests read with: a cache without either is fetched again.
REQUIRED_JARS = ("kafka_2.13-*.jar", "kafka-tools-[0-9]*.jar")


class KafkaStartError(RuntimeError):
    """The local broker could not be fetched, formatted or started; the message says which step."""


def ensure_jars() -> Path:
    """Fetch the broker's jars with Maven once; later calls reuse the cache."""
    if LIBS.is_dir() and all(any(LIBS.glob(jar)) for jar in REQUIRED_JARS):
        return LIBS
    if shutil.which("mvn") is None:
        raise KafkaStartError("the local Apache Kafka needs Maven (`mvn`) to fetch its jars once")
    LIBS.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(POM_DIR / "pom.xml"),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={LIBS}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603 - fixed arguments
    if done.returncode != 0:
        raise KafkaStartError(f"mvn could not fetch the Kafka jars:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return LIBS


def kafka_version() -> str:
    jar = next(ensure_jars().glob("kafka_2.13-*.jar"))
    return jar.stem.removeprefix("kafka_2.13-")


def _cluster_id() -> str:
    """The 22-character base64 form of a random UUID, as `kafka-storage random-uuid` prints,
    never starting with "-" (the storage tool would read it as an option: 1 start in 64)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class LocalKafka:
    """`with LocalKafka() as k: k.bootstrap` — formatted and started on enter, stopped on exit.

    `properties` are added to (and win over) the server properties below, and `listeners` adds
    named listeners (name → (port, security protocol)) beside PLAINTEXT, so a test can open a
    SASL_SSL listener on the same broker. `kill()` and `start()` on the same object restart the
    broker on the same data directory and ports (a broker crash)."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        log_file: Path | None = None,
        properties: Mapping[str, str] | None = None,
        listeners: Mapping[str, tuple[int, str]] | None = None,
        jvm_opts: list[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.controller_port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="kafka-"))
        self.log_file = log_file or self.data_dir / "server.log"
        self._extra = dict(properties or {})
        self._listeners = dict(listeners or {})
        self._jvm_opts = jvm_opts or []
        self._proc: subprocess.Popen[bytes] | None = None
        #: a kept data directory from an earlier run is reused, not formatted again
        self._formatted = (self.data_dir / "log" / "meta.properties").exists()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def version(self) -> str:
        return kafka_version()

    def server_properties(self) -> dict[str, str]:
        listeners = {"PLAINTEXT": (self.port, "PLAINTEXT"), **self._listeners}
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listeners": ",".join(
                [f"{n}://127.0.0.1:{p}" for n, (p, _) in listeners.items()]
                + [f"CONTROLLER://127.0.0.1:{self.controller_port}"]
            ),
            "advertised.listeners": ",".join(f"{n}://127.0.0.1:{p}" for n, (p, _) in listeners.items()),
            "listener.security.protocol.map": ",".join(
                [f"{n}:{proto}" for n, (_, proto) in listeners.items()] + ["CONTROLLER:PLAINTEXT"]
            ),
            "log.dirs": str(self.data_dir / "log"),
            # one node: every internal topic at replication 1, and few partitions so the first
            # group or transaction does not wait for 50 coordinator partitions to load
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "6",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "6",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # the worker creates its own topics, as on a cluster where an operator owns them
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            **self._extra,
        }

    def _java(self, main: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise KafkaStartError("the local Apache Kafka needs `java` (17+) on PATH")
        log4j = f"-Dlog4j2.configurationFile={POM_DIR / 'log4j2.yaml'}"
        return [java, *JVM_OPTS, *self._jvm_opts, log4j, "-cp", f"{ensure_jars()}/*", main, *args]

    def _format(self, props_file: Path) -> None:
        cmd = self._java("kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props_file))
        with self.log_file.open("ab") as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)  # noqa: S603
        if done.returncode != 0:
            raise KafkaStartError(f"formatting the broker's storage failed; see {self.log_file}")
        self._formatted = True

    def start(self) -> LocalKafka:
        """Start (or restart on the same data directory) and return once clients can use it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props_file = self.data_dir / "server.properties"
        props_file.write_text("".join(f"{k}={v}\n" for k, v in self.server_properties().items()))
        if not self._formatted:
            self._format(props_file)
        out = self.log_file.open("ab")
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - our own command line
                self._java("kafka.Kafka", str(props_file)), stdout=out, stderr=subprocess.STDOUT
            )
        finally:
            out.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        # log_level 0: "connection refused" while the JVM starts is expected, not worth a line
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-3000:]
                raise KafkaStartError(f"Kafka exited with {self._proc.returncode} while starting:\n{tail}")
            with contextlib.suppress(Exception):
                if admin.list_topics(timeout=2.0).brokers:
                    return
            time.sleep(0.3)
        self.stop()
        raise KafkaStartError(f"Kafka did not answer on {self.bootstrap} within {START_TIMEOUT_S:.0f} s")

    def kill(self) -> None:
        """`kill -9`: a crash, with no checkpoint written; `start()` recovers from the data dir."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(30)
        self._proc = None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)  # a frozen broker cannot act on SIGTERM
            self._proc.terminate()
            try:
                self._proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalKafka:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make kafka", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--data-dir", type=Path, help="keep the log here (default: a temporary directory)")
    parser.add_argument("--fetch-only", action="store_true", help="fetch the jars with Maven, then exit")
    args = parser.parse_args(argv)
    if args.fetch_only:
        try:
            print(f"Apache Kafka {kafka_version()} jars in {ensure_jars()}")
        except KafkaStartError as e:
            print(f"make kafka: {e}", file=sys.stderr)
            return 1
        return 0
    kafka = LocalKafka(port=args.port, data_dir=args.data_dir)
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        kafka.start()
        print(f"kafka ready on {kafka.bootstrap}", flush=True)
        print(f"Apache Kafka {kafka.version}; log in {kafka.log_file}; Ctrl-C stops it", file=sys.stderr, flush=True)
        while not stop:
            if kafka._proc is None or kafka._proc.poll() is not None:
                print(f"kafka exited; see {kafka.log_file}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KafkaStartError as e:
        print(f"make kafka: {e}", file=sys.stderr)
        return 1
    finally:
        kafka.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`classify-worker`: run the worker, classify from the shell, manage topics, train, evaluate.

Logging is configured here and nowhere else.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import orjson
import typer

from worker.config import Settings, load_settings
from worker.errors import ConfigError, DataError, FatalDeliveryError, ModelError, WorkerError

app = typer.Typer(
    help="Streaming classification worker for model routing: Kafka in, ONNX classifier, one topic per category.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("worker")

EXIT_FATAL = 1
EXIT_CONFIG = 2
EXIT_MODEL = 3

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file; CW_* environment variables win over it.")
]


class Engine(StrEnum):
    confluent = "confluent"
    faust = "faust"


def _fail(code: int, message: str) -> NoReturn:
    typer.echo(f"classify-worker: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the expected failures into one clear line and a distinct exit code."""
    try:
        yield
    except ConfigError as e:
        _fail(EXIT_CONFIG, str(e))
    except ModelError as e:
        _fail(EXIT_MODEL, f"model error: {e}")
    except DataError as e:
        _fail(EXIT_CONFIG, f"data error: {e}")
    except FatalDeliveryError as e:
        _fail(EXIT_FATAL, str(e))
    except WorkerError as e:
        _fail(EXIT_FATAL, str(e))


def _settings(config: Path | None, **overrides: object) -> Settings:
    settings = load_settings(config, **overrides)
    from worker.observability import configure_logging

    configure_logging(settings.log_level)
    return settings


@app.command()
def run(
    config: ConfigOpt = None,
    engine: Annotated[Engine, typer.Option(help="confluent (default, exactly-once) or faust.")] = Engine.confluent,
    max_messages: Annotated[int | None, typer.Option(help="Exit 0 after committing this many messages.")] = None,
    idle_exit: Annotated[float | None, typer.Option(help="Exit 0 after this many seconds without messages.")] = None,
) -> None:
    """Consume CW_TOPICS__INPUT, classify in micro-batches, produce to routed.<category> topics."""
    with _errors():
        settings = _settings(config)
        from prometheus_client import CollectorRegistry

        from worker.engines.confluent import ConfluentEngine
        from worker.observability import Health, HookSet, MetricsServer, PrometheusHooks
        from worker.pipeline import build_pipeline
        from worker.topics import ensure_for

        if engine is Engine.faust:
            _fail(EXIT_CONFIG, "the faust engine is not available in this build")
        pipeline = build_pipeline(settings)
        registry = CollectorRegistry()
        health = Health()
        hooks = HookSet([health, PrometheusHooks(registry)])
        hooks.on_model(pipeline.classifier.bundle)
        server = None
        if settings.metrics.enabled:
            server = MetricsServer(settings.metrics.host, settings.metrics.port, registry, health).start()
        worker = ConfluentEngine(settings, pipeline, hooks)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: worker.request_stop())
        if settings.topics.auto_create:
            worker._retry("create topics", lambda: ensure_for(settings, pipeline.router))
        log.info(
            "worker starting",
            extra={
                "model": pipeline.model_id,
                "delivery": settings.delivery,
                "input": settings.topics.input,
                "group": settings.kafka.group_id,
                "metrics_port": server.port if server else None,
            },
        )
        try:
            worker.run(max_messages=max_messages, idle_exit_s=idle_exit)
        finally:
            if server:
                server.stop()
        log.info("worker stopped", extra={"processed": worker.processed})


@app.command()
def classify(
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify; stdin lines when none.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Classify texts locally (no Kafka) and print one routed JSON object per line."""
    with _errors():
        settings = _settings(config)
        from worker.pipeline import build_pipeline
        from worker.records import Record

        pipeline = build_pipeline(settings)
        lines = texts if texts else [line.rstrip("\n") for line in sys.stdin]
        records = [Record(orjson.dumps({"id": str(i), "text": t}), topic="cli", offset=i) for i, t in enumerate(lines)]
        out = sys.stdout.buffer
        for item in pipeline.process(records).outgoing:
            if item.kind == "dead_letter":
                out.write(orjson.dumps({"id": item.source.offset, "error": item.detail}) + b"\n")
            else:
                out.write((item.value or b"") + b"\n")
        out.flush()


@app.command()
def topics(config: ConfigOpt = None) -> None:
    """Create the input, category, fallback and dead-letter topics (idempotent)."""
    with _errors():
        settings = _settings(config)
        from worker.model.bundle import load_bundle
        from worker.routing import Router
        from worker.topics import ensure_for, required_topics

        bundle = load_bundle(settings.model.path)
        router = Router(bundle.routes, bundle.labels, settings)
        created = set(ensure_for(settings, router))
        for name in required_topics(settings, router):
            typer.echo(f"{'created' if name in created else 'exists '}  {name}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""`classify-worker`: run the worker, classify from the shell, manage topics, train, evaluate,
replay dead letters, report on a shadow model.

Logging is configured here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import orjson
import typer

from worker.config import Settings, load_settings
from worker.errors import (
    EXIT_ACCESS,
    EXIT_CONFIG,
    EXIT_FATAL,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    ConfigError,
    DataError,
    FatalDeliveryError,
    KafkaAccessError,
    ModelError,
    WorkerError,
)

if TYPE_CHECKING:
    from worker.observability import Hooks
    from worker.pipeline import Pipeline

app = typer.Typer(
    help="Streaming classification worker for model routing: Kafka in, ONNX classifier, one topic per category.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("worker")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file; CW_* environment variables win over it.")
]


class Split(StrEnum):
    train = "train"
    val = "val"
    test = "test"


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
    except KafkaAccessError as e:
        _fail(EXIT_ACCESS, f"Kafka refused the worker: {e}")
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
        from worker.observability import Health, Hooks, HookSet, MetricsServer, PrometheusHooks
        from worker.pipeline import build_pipeline
        from worker.tracing import configure

        tracing = configure(settings)  # W3C propagation; with OTEL_* variables, span export too
        pipeline = build_pipeline(settings, tracing=tracing)
        registry = CollectorRegistry()
        health = Health()
        hooks = HookSet([health, PrometheusHooks(registry), *([tracing] if isinstance(tracing, Hooks) else [])])
        hooks.on_model(pipeline.classifier.bundle)
        server = None
        if settings.metrics.enabled:
            server = MetricsServer(settings.metrics.host, settings.metrics.port, registry, health).start()
        log.info(
            "worker starting",
            extra={
                "engine": engine.value,
                "model": pipeline.model_id,
                "delivery": settings.delivery
                if engine is Engine.confluent or "delivery" in settings.model_fields_set
                else "at_least_once",
                "input": settings.topics.input,
                "group": settings.kafka.group_id,
                "metrics_port": server.port if server else None,
            },
        )
        try:
            if engine is Engine.faust:
                processed = _run_faust(settings, pipeline, hooks, max_messages, idle_exit)
            else:
                worker = ConfluentEngine(settings, pipeline, hooks)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, lambda *_: worker.request_stop())
                worker.run(max_messages=max_messages, idle_exit_s=idle_exit)
                processed = worker.processed
        finally:
            if server:
                server.stop()
        log.info("worker stopped", extra={"processed": processed})


def _run_faust(
    settings: Settings, pipeline: Pipeline, hooks: Hooks, max_messages: int | None, idle_exit: float | None
) -> int:
    try:
        from worker.engines import faust as faust_engine
    except ImportError as e:
        _fail(EXIT_CONFIG, f"the faust engine needs: pip install 'classify-worker[faust]' ({e})")
    return faust_engine.run(settings, pipeline, hooks, max_messages=max_messages, idle_exit_s=idle_exit)


@app.command()
def classify(
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify; stdin lines when none.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Classify texts locally (no Kafka): one JSON object per line, in order: the routed object,
    or {"id", "error"} with the dead-letter reason (e.g. "encoding" for a line that is not UTF-8)."""
    with _errors():
        settings = _settings(config)
        from worker.pipeline import build_pipeline

        pipeline = build_pipeline(settings, shadow=False)
        numbered = enumerate(texts if texts else _stdin_lines())
        out = sys.stdout.buffer
        # a batch at a time, so a long file streams through in bounded memory
        while batch := list(islice(numbered, settings.batch.max_items)):
            out.writelines(line + b"\n" for line in _classify_lines(pipeline, batch))
            out.flush()


def _stdin_lines() -> Iterator[str]:
    """Stdin's lines without their line ending. Bytes that are not UTF-8 become surrogate escapes
    whatever the locale, so such a line is reported as an `encoding` error on its own."""
    for raw in sys.stdin.buffer:
        yield raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")


def _classify_lines(pipeline: Pipeline, batch: list[tuple[int, str]]) -> list[bytes]:
    """One output line per input line: the pipeline's routed value, or its dead-letter reason."""
    from worker.records import Record

    def error(i: int, reason: str) -> bytes:
        return orjson.dumps({"id": str(i), "error": reason})

    lines: dict[int, bytes] = {}
    records = []
    for i, text in batch:
        try:
            value = orjson.dumps({"id": str(i), "text": text})
        except orjson.JSONEncodeError:  # a surrogate escape: the line (or argument) was not UTF-8
            lines[i] = error(i, "encoding")
            continue
        records.append(Record(value, topic="cli", offset=i))
    for item in pipeline.process(records).outgoing:
        i = item.source.offset
        lines[i] = error(i, item.detail) if item.kind == "dead_letter" else item.value or b""
    return [lines[i] for i, _ in batch]


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


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="CSV (text,label), JSONL ({text,label}) or CLINC150 json.")],
    out: Annotated[Path, typer.Option(help="Bundle directory to write.")],
    base: Annotated[Path | None, typer.Option(help="Base encoder directory (default: all-MiniLM-L6-v2).")] = None,
    epochs: float = 8.0,
    batch_size: int = 32,
    lr: float = 1e-4,
    label_smoothing: float = 0.1,
    fallback_loss_weight: Annotated[float, typer.Option(help="Loss weight of the fallback labels.")] = 1.0,
    seed: int = 13,
    categories: Annotated[Path | None, typer.Option(help="JSON: {label: category} or {category: [labels]}.")] = None,
    fallback_label: Annotated[
        list[str] | None, typer.Option(help="Label(s) routed to fallback (default: oos).")
    ] = None,
    oos_weight: Annotated[
        float, typer.Option(help="Weight of out-of-scope examples when choosing the threshold.")
    ] = 1.0,
    name: Annotated[str | None, typer.Option(help="Model name in route.model (default: the out dir name).")] = None,
    save_torch: Annotated[Path | None, typer.Option(help="Also save the PyTorch checkpoint here.")] = None,
    average: Annotated[
        list[Path] | None,
        typer.Option(help="Instead of fitting, average these --save-torch checkpoints (repeat the option)."),
    ] = None,
    add_train: Annotated[
        list[Path] | None,
        typer.Option(help="CSV/JSONL (text, label) added to training only, e.g. your own out-of-scope queries."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Fallback threshold to use instead of choosing one on validation."),
    ] = None,
    train_on_val: Annotated[
        bool,
        typer.Option(
            help="Train on the validation split too (refit of a chosen recipe; needs --threshold and a test split)."
        ),
    ] = False,
    test: Annotated[
        Path | None,
        typer.Option(help="Test set file; without it a CSV/JSONL --data gives 10% of each label to a test split."),
    ] = None,
    text_column: Annotated[str, typer.Option(help="CSV column / JSONL key of the text (--data, --test).")] = "text",
    label_column: Annotated[str, typer.Option(help="CSV column / JSONL key holding the label.")] = "label",
    selection: Annotated[
        str | None, typer.Option(help="How this recipe was chosen, in words, for the model card.")
    ] = None,
) -> None:
    """Fine-tune, export to ONNX, quantize to int8, check parity, evaluate: a complete bundle. Needs the train extra."""
    with _errors():
        from worker.observability import configure_logging

        configure_logging("WARNING")  # onnxruntime's quantizer logs every tensor at INFO on the root logger
        try:
            from worker.train.build import train_bundle
            from worker.train.data import Columns
            from worker.train.finetune import FitConfig
        except ImportError as e:
            _fail(EXIT_CONFIG, f"training needs the [train] extra: pip install 'classify-worker[train]' ({e})")
        cfg = FitConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            label_smoothing=label_smoothing,
            seed=seed,
            fallback_loss_weight=fallback_loss_weight,
        )
        result = train_bundle(
            data,
            out,
            base=base,
            fit_cfg=cfg,
            categories_file=categories,
            fallback_labels=fallback_label,
            oos_weight=oos_weight,
            name=name,
            save_torch=save_torch,
            average_of=average,
            add_train=add_train,
            threshold=threshold,
            train_on_val=train_on_val,
            test_file=test,
            cols=Columns(text_column, label_column),
            selection=selection,
        )
        _print_metrics(result["test"], title=f"{result['model']} on the test split (never tuned on)")


@app.command("eval")
def evaluate_cmd(
    data: Annotated[Path, typer.Option(help="CSV, JSONL or CLINC150 json; CLINC's test split is used.")],
    model: Annotated[
        Path | None, typer.Option(help="Bundle directory (default: CW_MODEL__PATH or the bundled model).")
    ] = None,
    split: Annotated[
        Split, typer.Option(help="Which split of a CLINC150 json; plain files use all rows.")
    ] = Split.test,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
    text_column: Annotated[str, typer.Option(help="CSV column / JSONL key of the text (--data, --test).")] = "text",
    label_column: Annotated[str, typer.Option(help="CSV column / JSONL key holding the label.")] = "label",
    config: ConfigOpt = None,
) -> None:
    """In-scope accuracy (as deployed and argmax), out-of-scope recall, routing accuracy, macro-F1,
    out-of-scope AUROC and FPR at 95% TPR per score, each with a 95% bootstrap interval; per-route
    P/R; items/s."""
    with _errors():
        settings = _settings(config)
        from worker.model import Classifier, load_bundle
        from worker.routing import Router
        from worker.train import evaluate
        from worker.train.data import Columns, load, read_examples

        cols = Columns(text_column, label_column)
        if data.suffix.lower() == ".json":
            splits = load(data, cols=cols)
            examples = {Split.train: splits.train, Split.val: splits.val, Split.test: splits.test}[split]
        else:
            examples = read_examples(data, cols)
        bundle = load_bundle(model or settings.model.path)
        router = Router(bundle.routes, bundle.labels, settings)
        scored = evaluate.score(Classifier(bundle), router, examples)
        result = evaluate.metrics(scored, router.threshold, router.max_distance)
        result["model"] = bundle.model_id
        result["score"] = bundle.routes.score
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        else:
            _print_metrics(result, title=f"{bundle.model_id} on {data.name} ({split.value})")


@app.command()
def replay(
    source: Annotated[
        str | None, typer.Option("--from", help="Dead-letter topic to read (default: CW_TOPICS__DLQ, classify.dlq).")
    ] = None,
    target: Annotated[
        str | None, typer.Option("--to", help="Topic to re-drive to (default: CW_TOPICS__INPUT, classify.in).")
    ] = None,
    reason: Annotated[
        list[str] | None, typer.Option(help="Only dead letters with this error.reason (repeat the option).")
    ] = None,
    start_offset: Annotated[int | None, typer.Option(min=0, help="Window start offset, every partition.")] = None,
    end_offset: Annotated[
        int | None, typer.Option(min=0, help="Window end offset (exclusive), every partition.")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Window start time: ISO 8601 (UTC if no zone) or epoch ms.")] = None,
    until: Annotated[str | None, typer.Option(help="Window end time (exclusive).")] = None,
    max_replays: Annotated[
        int, typer.Option(min=1, help="Skip (and count) a message already replayed this many times.")
    ] = 3,
    group: Annotated[
        str | None, typer.Option(help="Consumer group and transactional id (default: derived from the selection).")
    ] = None,
    max_rate: Annotated[float | None, typer.Option(min=1, help="At most this many messages per second.")] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Count by reason and show examples; produce and commit nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Re-drive dead letters to the input topic exactly once, without their error.*/source.* headers."""
    with _errors():
        settings = _settings(config)
        from worker.kafka_util import parse_time
        from worker.replay import Replayer, Selection

        selection = Selection(
            source=source or settings.topics.dlq,
            target=target or settings.topics.input,
            reasons=frozenset(reason or ()),
            start_offset=start_offset,
            end_offset=end_offset,
            since_ms=parse_time(since) if since else None,
            until_ms=parse_time(until) if until else None,
            max_replays=max_replays,
        )
        replayer = Replayer(settings, selection, group=group, max_rate=max_rate)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: replayer.request_stop())
        summary = replayer.run(dry_run=dry_run).as_dict()
        if as_json:
            typer.echo(json.dumps(summary))
        else:
            _print_replay(selection.source, selection.target, summary)
    if summary["interrupted"]:
        _fail(EXIT_INTERRUPTED, "replay interrupted before the end of its window; the same command resumes it")


def _print_replay(source: str, target: str, summary: dict[str, Any]) -> None:
    def line(title: str, counts: dict[str, int]) -> str:
        detail = " ".join(f"{k}={v}" for k, v in counts.items())
        return f"{title:<28}{sum(counts.values()):>8}  {detail}".rstrip()

    dry = " (dry run: nothing produced or committed)" if summary["dry_run"] else ""
    typer.echo(f"{source} -> {target}  group {summary['group']}{dry}")
    typer.echo(line("would replay" if summary["dry_run"] else "replayed", summary["replayed"]))
    typer.echo(line("skipped: max replays reached", summary["skipped_max_replays"]))
    typer.echo(line("not selected (--reason)", summary["not_selected"]))
    typer.echo(line("skipped: cannot be sent", summary["skipped_unsendable"]))
    for ex in summary["examples"]:
        typer.echo(
            f"  {ex['partition']}:{ex['offset']} key={ex['key']!r} {ex['reason']}: {ex['message']} "
            f"(from {ex['source']}, {ex['bytes']} bytes, replayed {ex['replay_count']}x)"
        )


@app.command("shadow-report")
def shadow_report(
    topic: Annotated[str | None, typer.Option(help="Shadow topic (default: CW_SHADOW__TOPIC).")] = None,
    since: Annotated[str | None, typer.Option(help="Only records from this time: ISO 8601 or epoch ms.")] = None,
    examples: Annotated[int, typer.Option(min=0, help="Disagreements to show per model pair.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Summarize the shadow topic: disagreement rate, live -> shadow route matrix, examples."""
    with _errors():
        settings = _settings(config)
        from worker.kafka_util import parse_time
        from worker.shadow_report import format_report, read_shadow, summarize

        records = read_shadow(settings, topic or settings.shadow.topic, parse_time(since) if since else None)
        reports = summarize(records, examples)
        if as_json:
            typer.echo(json.dumps([r.as_dict() for r in reports]))
        elif not reports:
            typer.echo("no shadow records")
        else:
            typer.echo("\n\n".join(format_report(r) for r in reports))


def _print_metrics(result: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from worker.train.evaluate import HEADLINE, detection_rows

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2%}"

    summary = Table(title=title)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_column("95% interval", justify="right")
    summary.add_row(
        "examples (in scope / out of scope)", f"{result['examples']} ({result['in_scope']} / {result['out_of_scope']})"
    )
    for key, label in [*HEADLINE, *detection_rows(result)]:
        lo_hi = result["intervals_95"].get(key)
        summary.add_row(label, pct(result[key]), f"{pct(lo_hi[0])} to {pct(lo_hi[1])}" if lo_hi else "")
    summary.add_row("out-of-scope score", result.get("score", "category"))
    summary.add_row("threshold", f"{result['threshold']}")
    if result.get("max_distance") is not None:
        summary.add_row("max distance", f"{result['max_distance']:.4g}")
    summary.add_row("items/s", f"{result['items_per_s']:.0f}")
    routes = Table(title="per route")
    for col in ("route", "precision", "recall", "support"):
        routes.add_column(col, justify="left" if col == "route" else "right")
    for route, r in result["per_route"].items():
        routes.add_row(route, pct(r["precision"]), pct(r["recall"]), str(r["support"]))
    console = Console()
    console.print(summary)
    console.print(routes)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

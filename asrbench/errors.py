"""Errors a user can act on.

Each message is one line that names the input at fault (a file, a directory, a config key)
and says what to do about it. The command line prints `error: <message>` and exits with
status 2, without a traceback; anything else escaping is a bug and keeps its traceback.
"""
from __future__ import annotations


class AsrbenchError(Exception):
    """Base class of user-facing errors; str() is the whole one-line message."""


class CorpusError(AsrbenchError):
    """The corpus on disk is missing, malformed or does not match the configuration."""


class ConfigError(AsrbenchError):
    """A configuration value is missing, out of range or inconsistent with another."""


class CheckpointError(AsrbenchError):
    """A checkpoint is missing, unreadable or was written by an incompatible run."""


class RunFailed(AsrbenchError):
    """Training stopped on a fault (a worker died, hung or diverged); the message names the rank
    and the checkpoint to resume from."""


class OutputError(AsrbenchError):
    """The output directory cannot be written (read-only, full, or not a directory)."""

"""Errors that the CLI turns into exit codes (DESIGN §8).

Library code raises these; only ``cli.py`` maps them to exit codes, so the
library stays usable from Python without ``sys.exit`` surprises.
"""

from __future__ import annotations


class CapcliError(Exception):
    """A runtime failure the user can act on. The CLI prints it on one line and exits 1."""

    exit_code = 1


class ConfigError(CapcliError):
    """A usage or settings error: bad key, wrong type, impossible value, missing file. Exit 2."""

    exit_code = 2


class DataError(CapcliError):
    """Input data that cannot be used: unreadable images, too many bad files, empty splits."""


class CheckpointError(CapcliError):
    """A checkpoint that cannot be written or read: the message names the file and what is wrong."""


class RunLocked(ConfigError):
    """Another capcli process is training into the same run directory. Exit 2."""


class TrainingInterrupted(CapcliError):
    """Ctrl-C during training, after a resumable checkpoint was written. Exit 130."""

    exit_code = 130

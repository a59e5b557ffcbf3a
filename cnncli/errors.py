"""The exception tree the CLI turns into one-line messages (exit code 1, no traceback).

Library modules raise these for *user* errors (bad config, bad file, no network). Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class CnnError(Exception):
    """Base of every user-facing error: its message is shown as is, on one line."""


class ConfigError(CnnError):
    """A config file, a key or a value is wrong; the message names the key path and the value."""


class DataError(CnnError):
    """The data set is missing, damaged, or cannot be downloaded; the message names the file or URL."""


class CheckpointError(CnnError):
    """A checkpoint file is missing, unreadable, or does not fit the model; the message names what."""


class TrainingDiverged(CnnError):
    """The loss became NaN or infinite."""

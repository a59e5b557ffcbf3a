"""The exception tree the CLI turns into one-line messages (exit code 1, no traceback).

Library modules raise these for *user* errors (bad config, bad file, no network). Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import errno as _errno


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


class StorageError(CnnError, OSError):
    """A file or folder cannot be written or used (a full disk, a read-only or special file, a path under a
    file); the message names the path and the OS reason. Also an OSError, carrying `errno` and `strerror`."""

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None) -> None:
        super().__init__(message)
        self.errno, self.strerror = errno, strerror

    def __str__(self) -> str:
        return str(self.args[0])


def os_reason(e: OSError) -> str:
    """The OS's reason for `e`, e.g. 'No space left on device (ENOSPC)'."""
    name = _errno.errorcode.get(e.errno or -1)
    text = e.strerror or str(e)
    return f"{text} ({name})" if name else text

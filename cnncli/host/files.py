"""The two questions every command asks of a path a user or a file names, answered in one place:

- `open_regular(path)`: open for reading, but only a regular file, and never block. A FIFO would block the
  open (no writer) or the read forever, a device never ends (/dev/zero) or has side effects (a tape, a
  terminal). The path is checked before it is opened, opened with O_NONBLOCK (a FIFO swapped in between
  returns at once) and checked again on the open descriptor, which is then made blocking again.
- `check_writable(path)`: may a command write `path`? Only a regular file (which it replaces) or a new path.
  A device, FIFO or socket is refused, so that `--onnx /dev/null` run as root never replaces /dev/null with a
  regular file, and a FIFO never blocks the writer; a folder is refused with a hint to name a file.

Both raise `NotRegularFile` (a `StorageError`, so also an OSError with `strerror` saying what the path is),
whose message names the path. Nothing here prints.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from cnncli.host.errors import StorageError, os_reason

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symbolic link",
}


class NotRegularFile(StorageError):
    """`path` exists but is not a regular file (`kind` says what it is: 'a FIFO (named pipe)', 'a folder', …)."""

    def __init__(self, path: Path | str, kind: str, doing: str = "") -> None:
        self.path, self.kind = Path(path), kind
        reason = f"is {kind}, not a regular file" + (f"; {doing}" if doing else "")
        super().__init__(f"{path}: {reason}", None, reason)


def kind_of(mode: int) -> str:
    """What an `st_mode` is, in words: 'a regular file', 'a FIFO (named pipe)', 'a character device', …"""
    if stat.S_ISREG(mode):
        return "a regular file"
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: Path | str) -> BinaryIO:
    """`path` opened for binary reading if it is a regular file (symlinks followed); never blocks.

    Raises `NotRegularFile` for a folder, FIFO, device or socket (checked before and after the open), and the
    OSError of the open or stat otherwise (FileNotFoundError, PermissionError, ELOOP, …) for the caller to word.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, kind_of(st.st_mode))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, kind_of(mode) + " (it changed while being opened)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class TooLarge(StorageError):
    """A file is larger than its reader accepts (`size` bytes, `limit` at most)."""


def read_regular(path: Path | str, limit: int, what: str = "file") -> bytes:
    """The whole content of the regular file `path`, refused (`TooLarge`) when it holds more than `limit` bytes
    (its size is checked before reading, and at most `limit` + 1 bytes are ever read: a file that grows
    cannot make this read more). Other errors as `open_regular`."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        size = max(size, len(data))
        raise TooLarge(f"{path}: is {_size_text(size)}, more than the {_size_text(limit)} a {what} may be; "
                       "refusing to read it")
    return data


def _size_text(n: int) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.1f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"


def check_writable(path: Path | str) -> Path:
    """`path` if a command may write it: a new path (nothing there, or a dangling symlink) or a regular file.

    Raises `NotRegularFile` for a device, FIFO, socket or folder (symlinks followed: a link to /dev/null is
    refused too), and a `StorageError` naming the path when it cannot be examined (a symlink loop, a path
    under a file, no permission to look)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise StorageError(f"{path}: cannot write: {os_reason(e)}", e.errno, e.strerror) from None
    if stat.S_ISDIR(st.st_mode):
        raise NotRegularFile(path, "a folder", "give the name of a file to write")
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, kind_of(st.st_mode), "refusing to write it (only a regular file or a new path "
                             "is written)")
    return path


def first_special(paths: list[Path]) -> NotRegularFile | None:
    """The first of `paths` that exists but is not a regular file (symlinks followed), as a `NotRegularFile`
    to raise or word; None when each is a regular file or absent. For a set of files a reader needs, so that
    a FIFO among them is named instead of counted as present (or missing)."""
    for p in paths:
        try:
            mode = os.stat(p).st_mode
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            return NotRegularFile(p, kind_of(mode))
    return None

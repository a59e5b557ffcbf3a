"""Write a file so that readers see the old content or the new, never a half-written file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from cnncli.host.errors import StorageError, os_reason
from cnncli.host.files import check_writable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: Path, binary: bool = True) -> Iterator[IO]:
    """Yield a file in `path`'s folder; on success it is flushed, fsynced and renamed over `path`.

    On any exception (Ctrl-C included) the temporary file is removed and `path` is left as it was.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600. An OSError (a full disk,
    a file too large, a read-only folder) becomes a `StorageError` naming `path` and the OS reason.
    The temporary file is `.<name>.<random>.tmp` beside `path` (`stale_temp_files` finds those a kill left).
    Only a regular file or a new path is written: `path` being a device, FIFO, socket or folder is a
    `NotRegularFile` (`cnncli.host.files.check_writable`), before anything is written and again before the rename.
    """
    path = Path(path)
    check_writable(path)  # a device, FIFO or folder is never replaced by the rename below
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _storage_error(path, e) from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        check_writable(path)  # again: a special file may have appeared while the content was written
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise _storage_error(path, e) from None
        raise


TEMP_SUFFIX = ".tmp"


def _storage_error(path: Path, e: OSError) -> StorageError:
    kept = "the file keeps its previous content" if path.exists() else "nothing was written"
    return StorageError(f"{path}: cannot write: {os_reason(e)}; {kept}", e.errno, e.strerror)


def stale_temp_files(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """The temporary files `atomic_write` makes for `folder/<name>` (`.<name>.<random>.tmp`), left behind by a
    process killed during a write. Only call this while no other process may be writing those files."""
    found = []
    for name in names:
        found += [p for p in Path(folder).glob(f".{name}.*{TEMP_SUFFIX}") if p.is_file() and not p.is_symlink()]
    return sorted(found)

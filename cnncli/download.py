"""HTTP download mechanics behind `cnncli.data.ensure_cifar10`: resume, retry, verify, extract, lock.

Everything here is generic (no CIFAR-10 constants) and silent: progress goes through a callback, failures
become `DataError` with a one-line message that names the URL or file.

Layout in the target folder ``dest``, while work is in progress::

    dest/.<archive>.lock             held (fcntl.flock) while downloading/extracting, removed afterwards
    dest/<archive>.part              the download; kept on a dropped connection or Ctrl-C, to be resumed
    dest/.<folder>.extract-XXXXXX/   temporary extraction folder, renamed into place when complete

so a crash leaves either nothing new or a resumable ``.part``, never a half-extracted ``<folder>``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import re
import shutil
import socket
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from cnncli.errors import DataError

try:  # POSIX only; elsewhere the temp+rename steps still keep the cache consistent
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

ProgressFn = Callable[[int, int | None], None]

CHUNK_BYTES = 256 * 1024
USER_AGENT = "cnncli/0.1 (+urllib)"
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
_CONNECT_FAILURES = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN)


class _Transient(Exception):
    """A failure worth retrying (dropped connection, timeout, 5xx); the message is the reason."""


class _Permanent(Exception):
    """A failure retrying will not fix (refused connection, unknown host, 404); the message is the reason."""


def one_line(text: object) -> str:
    """Collapse whitespace so a message stays on one line."""
    return " ".join(str(text).split())


def _os_reason(e: BaseException) -> str:
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host name ({one_line(e.strerror or e)})"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return one_line(e.strerror).lower()
    return one_line(e) or type(e).__name__


def _classify(e: BaseException) -> Exception:
    """Map an exception raised by urllib/http.client/socket to `_Transient` or `_Permanent`."""
    if isinstance(e, urllib.error.HTTPError):
        reason = f"HTTP {e.code} {one_line(e.reason)}"
        return _Transient(reason) if e.code in _TRANSIENT_HTTP or e.code >= 500 else _Permanent(reason)
    if isinstance(e, urllib.error.URLError):
        inner = e.reason
        if isinstance(inner, BaseException):
            return _classify(inner)
        return _Permanent(one_line(inner))
    if isinstance(e, ssl.SSLCertVerificationError):
        return _Permanent(f"TLS certificate check failed ({one_line(e.verify_message or e)})")
    if isinstance(e, socket.gaierror):
        return _Permanent(_os_reason(e))
    if isinstance(e, OSError) and e.errno in _CONNECT_FAILURES:
        return _Permanent(_os_reason(e))
    if isinstance(e, http.client.IncompleteRead):
        return _Transient("connection dropped before the end of the file")
    if isinstance(e, (http.client.HTTPException, OSError)):
        return _Transient(_os_reason(e))
    return _Permanent(one_line(e) or type(e).__name__)


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """``"bytes 100-199/1000"`` -> (100, 1000); ``"bytes 100-199/*"`` -> (100, None); else None."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _attempt(
    url: str, part: Path, *, size: int | None, progress: ProgressFn | None, timeout: float
) -> None:
    """One HTTP request: resume `part` if it has bytes, else start it. Raises `_Transient`/`_Permanent`."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset == size:
        return  # complete from an earlier run (e.g. interrupted during extraction); md5 decides
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            return  # nothing left to send: the partial file is complete (md5 decides)
        raise _classify(e) from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise _classify(e) from e
    except ValueError as e:  # unknown URL type, malformed URL
        raise _Permanent(one_line(e)) from e

    with response:
        status = getattr(response, "status", None) or 200  # file:// URLs have no status
        length = _int_header(response.headers.get("Content-Length"))
        if status == 206 and offset:
            content_range = _parse_content_range(response.headers.get("Content-Range"))
            if content_range is None or content_range[0] != offset:
                part.unlink()  # answer to a different range: start over on the next attempt
                raise _Transient(f"server sent an unexpected range ({response.headers.get('Content-Range')})")
            total = content_range[1] if content_range[1] is not None else (
                offset + length if length is not None else None
            )
            mode = "ab"
        elif status in (200, 206):
            offset, mode = 0, "wb"  # a server that ignores Range answers 200: restart from byte 0
            total = length
        else:
            raise _Permanent(f"unexpected HTTP status {status}")
        if size is not None and total is not None and total != size:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise _Permanent(f"the server offers {total:,} bytes, expected {size:,} (wrong file?)")
        expected_total = total if total is not None else size

        done = offset
        with open(part, mode) as f:
            if progress is not None:
                progress(done, expected_total)
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (http.client.HTTPException, OSError, ValueError) as e:
                    raise _classify(e) from e
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, expected_total)
                if size is not None and done > size:
                    f.close()
                    part.unlink()
                    raise _Permanent(f"the server sent more than the expected {size:,} bytes (wrong file?)")
    if total is not None and done < total:
        raise _Transient(f"connection dropped after {done:,} of {total:,} bytes")


def download(
    url: str,
    part: Path,
    *,
    size: int | None,
    progress: ProgressFn | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    hint: str = "",
) -> None:
    """Download `url` into `part`, resuming what is already there and retrying transient failures.

    Parameters
    ----------
    url : str
        http(s):// (or file://) address.
    part : Path
        The partial file; resumed with ``Range: bytes=<its size>-`` when it exists. A server that answers
        200 instead of 206 makes the download restart from byte 0.
    size : int or None
        Expected total size in bytes (None: unknown). A server announcing another size is refused.
    progress : callable, optional
        ``progress(done_bytes, total_bytes_or_None)``, called as bytes arrive.
    retries : int
        Extra attempts after the first one for transient failures (dropped connection, timeout, HTTP 5xx,
        429); a refused connection, an unknown host or a 4xx fail at once.
    backoff : float
        Seconds before the first retry; doubled each further retry.
    timeout : float
        Socket timeout in seconds for connecting and for each read.
    hint : str
        Appended to the error message (what the user can do instead).

    Raises
    ------
    DataError
        One line naming the URL, the reason and `hint`. `part` is kept (resumable) unless it is known bad.
    """
    attempts = max(0, retries) + 1
    for attempt in range(attempts):
        try:
            _attempt(url, part, size=size, progress=progress, timeout=timeout)
            return
        except _Transient as e:
            if attempt + 1 >= attempts:
                raise DataError(_failure(url, f"{e} (after {attempts} attempts)", hint)) from e
        except _Permanent as e:
            raise DataError(_failure(url, str(e), hint)) from e
        time.sleep(backoff * 2**attempt)


def _failure(url: str, reason: str, hint: str) -> str:
    return one_line(f"cannot download {url}: {reason}" + (f"; {hint}" if hint else ""))


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB blocks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, *, url: str, md5: str | None, size: int | None) -> None:
    """Check size and md5 of the downloaded file; on mismatch delete it and raise `DataError`."""
    actual_size = path.stat().st_size
    problem = None
    if size is not None and actual_size != size:
        problem = f"is {actual_size:,} bytes, expected {size:,}"
    elif md5 is not None:
        actual = file_md5(path)
        if actual.lower() != md5.lower():
            problem = f"has md5 {actual}, expected {md5.lower()}"
    if problem is not None:
        path.unlink()
        raise DataError(
            f"the file downloaded from {url} {problem}: deleted it; the server or mirror serves a "
            "different or damaged file"
        )


def _extract_all(tar: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    # Python without extraction filters (< 3.10.12 / 3.11.4): allow only plain files and folders inside dest
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            raise tarfile.TarError(f"refusing member {member.name!r}")
    tar.extractall(dest)  # noqa: S202 (members checked above)


def extract(archive: Path, dest: Path, folder_name: str, *, is_complete: Callable[[Path], bool]) -> Path:
    """Extract `archive` into a temporary folder in `dest`, then rename its `folder_name` into place.

    Parameters
    ----------
    archive : Path
        A (verified) tar archive, any compression `tarfile` knows.
    dest : Path
        The data folder; receives ``dest/folder_name``.
    folder_name : str
        The top-level folder the archive must contain.
    is_complete : callable
        ``is_complete(folder) -> bool`` checks the extracted folder before it is put in place.

    Returns
    -------
    Path
        ``dest / folder_name``.

    Raises
    ------
    DataError
        Damaged archive, unsafe member (absolute path, ``..``, link out of the folder, device), missing
        `folder_name`, or a `dest/folder_name` that already exists with other content.
    """
    final = dest / folder_name
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.extract-", dir=dest))
    try:
        try:
            with tarfile.open(archive) as tar:
                _extract_all(tar, tmp)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise DataError(f"cannot extract {archive}: {one_line(e)}") from e
        extracted = tmp / folder_name
        if not extracted.is_dir() or not is_complete(extracted):
            raise DataError(f"{archive} does not contain a complete {folder_name}/ folder")
        try:
            os.rename(extracted, final)  # atomic; replaces only an empty folder
        except OSError as e:
            raise DataError(
                f"cannot put the extracted data in place at {final}: {_os_reason(e)}; "
                "delete that folder and run again"
            ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def remove_stale_extractions(dest: Path, folder_name: str) -> None:
    """Delete temporary extraction folders left by a killed process (call only while holding the lock)."""
    for stale in dest.glob(f".{folder_name}.extract-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive `fcntl.flock` on `path` (created if needed, removed on release).

    Removing the file on release is safe because a waiter that then gets the lock checks that `path` still
    names the inode it locked, and otherwise starts over.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the holder removed the file meanwhile: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def fetch_and_extract(
    url: str,
    dest: Path,
    *,
    archive_name: str,
    folder_name: str,
    is_complete: Callable[[Path], bool],
    md5: str | None,
    size: int | None,
    progress: ProgressFn | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    hint: str = "",
) -> Path:
    """Download `url` to ``dest/<archive_name>.part``, verify, extract ``folder_name/`` into `dest`.

    Holds ``dest/.<archive_name>.lock`` throughout, and returns at once (no network) when another process
    put a complete ``dest/folder_name`` in place while this one waited for the lock. The archive is deleted
    after a successful extraction.

    Returns
    -------
    Path
        ``dest / folder_name``.
    """
    final = dest / folder_name
    with contextlib.ExitStack() as stack:
        try:
            dest.mkdir(parents=True, exist_ok=True)
            stack.enter_context(file_lock(dest / f".{archive_name}.lock"))
        except OSError as e:
            raise DataError(
                f"cannot write to the data folder {dest}: {_os_reason(e)}" + (f"; {hint}" if hint else "")
            ) from e
        if final.is_dir() and is_complete(final):
            return final  # another process finished while we waited
        remove_stale_extractions(dest, folder_name)
        part = dest / f"{archive_name}.part"
        download(url, part, size=size, progress=progress, retries=retries, backoff=backoff,
                 timeout=timeout, hint=hint)
        verify(part, url=url, md5=md5, size=size)
        extract(part, dest, folder_name, is_complete=is_complete)
        part.unlink()
        return final

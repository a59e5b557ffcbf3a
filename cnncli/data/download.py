"""HTTP download mechanics behind `cnncli.data.ensure_dataset`: resume, retry, limits, verify, extract, lock.

Everything here is generic (no data-set constants) and silent: progress goes through a callback, failures
become `DataError` with a one-line message that names the URL or file.

Besides the socket timeout (per receive), every download has an overall deadline and a minimum rate
(`Limits`, from the environment: ``CNNCLI_DOWNLOAD_DEADLINE``, ``CNNCLI_DOWNLOAD_MIN_RATE``,
``CNNCLI_DOWNLOAD_RATE_WINDOW``), so a server that trickles cannot keep a download waiting forever; a download
stopped by either keeps its ``.part`` file for the next run to resume.

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
import math
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cnncli.host.errors import ConfigError, DataError
from cnncli.host.files import first_special

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


# ------------------------------------------------------------------------------------------------ limits

ENV_DEADLINE = "CNNCLI_DOWNLOAD_DEADLINE"
ENV_MIN_RATE = "CNNCLI_DOWNLOAD_MIN_RATE"
ENV_RATE_WINDOW = "CNNCLI_DOWNLOAD_RATE_WINDOW"
DEFAULT_DEADLINE = 7200.0  # seconds for everything one `ensure` call downloads
DEFAULT_MIN_RATE = 1024.0  # bytes per second, averaged over each window
DEFAULT_RATE_WINDOW = 30.0  # seconds


@dataclass(frozen=True)
class Limits:
    """How long a download may take as a whole, and how slow it may get.

    The socket timeout alone bounds each receive, so a server that sends a byte every few seconds would keep a
    download alive forever; these two limits end it. Both are checked whenever bytes arrive (and the socket
    timeout bounds the wait for the next ones), so a download stops at most `timeout` seconds after a limit
    is passed.

    Attributes
    ----------
    deadline : float or None
        Seconds for the whole download: every attempt, retry, back-off and mirror of one call (None: no limit).
    min_rate : float
        Bytes per second; a download averaging less over any `rate_window` seconds stops (0: no limit).
    rate_window : float
        Seconds over which the rate is averaged (> 0).
    """

    deadline: float | None = DEFAULT_DEADLINE
    min_rate: float = DEFAULT_MIN_RATE
    rate_window: float = DEFAULT_RATE_WINDOW


def limits_from_env(environ: Mapping[str, str] | None = None) -> Limits:
    """`Limits` from ``CNNCLI_DOWNLOAD_DEADLINE`` (seconds, 0 = none; default 7200),
    ``CNNCLI_DOWNLOAD_MIN_RATE`` (bytes/s, 0 = none; default 1024) and ``CNNCLI_DOWNLOAD_RATE_WINDOW``
    (seconds; default 30). Unset or empty means the default; anything else that is not a number >= 0 (> 0 for
    the window) is a `ConfigError` naming the variable."""
    env = os.environ if environ is None else environ

    def number(name: str, default: float, positive: bool = False) -> float:
        text = env.get(name, "").strip()
        if not text:
            return default
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            kind = "a number of seconds greater than 0" if positive else "a number >= 0 (0 turns the limit off)"
            raise ConfigError(f"{name}={text!r}: expected {kind}")
        return value

    deadline = number(ENV_DEADLINE, DEFAULT_DEADLINE)
    return Limits(
        deadline=deadline or None,
        min_rate=number(ENV_MIN_RATE, DEFAULT_MIN_RATE),
        rate_window=number(ENV_RATE_WINDOW, DEFAULT_RATE_WINDOW, positive=True),
    )


class DownloadLimitError(DataError):
    """A download passed its overall deadline (`limit == "deadline"`) or fell below the minimum rate
    (`limit == "rate"`); the partial file is kept for the next run to resume."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class _LimitHit(Exception):
    """`Limits` stopped the download; `which` is "deadline" or "rate", the message the reason."""

    def __init__(self, which: str, reason: str) -> None:
        super().__init__(reason)
        self.which = which


def _deadline_hit(limits: Limits) -> _LimitHit:
    return _LimitHit(
        "deadline", f"not finished within the overall deadline of {limits.deadline:g} s (set {ENV_DEADLINE} "
        "to allow more, 0 for none)"
    )


def _past(deadline_at: float | None) -> bool:
    return deadline_at is not None and time.monotonic() >= deadline_at


# ---------------------------------------------------------------------------------------------- download


def _attempt(
    url: str,
    part: Path,
    *,
    size: int | None,
    max_size: int | None,
    progress: ProgressFn | None,
    timeout: float,
    limits: Limits,
    deadline_at: float | None,
) -> None:
    """One HTTP request: resume `part` if it has bytes, else start it.

    Raises `_Transient`, `_Permanent` or `_LimitHit`; on any of them the bytes received so far stay in `part`
    (unless they are known to be wrong).
    """
    special = first_special([part])  # a FIFO would block the append, a device swallow the download
    if special is not None:
        raise DataError(f"{special}; the partial download must be a regular file (remove it)")
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset == size:
        return  # complete from an earlier run (e.g. interrupted during extraction); md5 decides
    if (size is not None and offset > size) or (max_size is not None and offset > max_size):
        part.unlink()
        offset = 0
    if _past(deadline_at):
        raise _deadline_hit(limits)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    wait = timeout if deadline_at is None else max(0.01, min(timeout, deadline_at - time.monotonic()))
    try:
        response = urllib.request.urlopen(request, timeout=wait)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            return  # nothing left to send: the partial file is complete (md5 decides)
        raise _classify(e) from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if _past(deadline_at):
            raise _deadline_hit(limits) from e
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
        if max_size is not None and total is not None and total > max_size:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            raise _Permanent(f"the server offers {total:,} bytes, more than the {max_size:,} expected at most")
        expected_total = total if total is not None else size
        limit = size if size is not None else max_size

        # read1 returns as soon as some bytes arrive (read(n) would wait for all n), so the limits are
        # checked while a slow server trickles.
        read = getattr(response, "read1", None) or response.read
        done = offset
        window_start, window_bytes = time.monotonic(), 0
        with open(part, mode) as f:
            if progress is not None:
                progress(done, expected_total)
            while True:
                if _past(deadline_at):
                    raise _deadline_hit(limits)
                try:
                    chunk = read(CHUNK_BYTES)
                except (http.client.HTTPException, OSError, ValueError) as e:
                    if _past(deadline_at):
                        raise _deadline_hit(limits) from e
                    raise _classify(e) from e
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, expected_total)
                if limit is not None and done > limit:
                    f.close()
                    part.unlink()
                    raise _Permanent(f"the server sent more than the expected {limit:,} bytes (wrong file?)")
                window_bytes += len(chunk)
                now = time.monotonic()
                if limits.min_rate and now - window_start >= limits.rate_window:
                    if window_bytes / (now - window_start) < limits.min_rate:
                        raise _LimitHit(
                            "rate",
                            f"slower than the minimum rate: {window_bytes:,} bytes in {now - window_start:.1f} s, "
                            f"below {limits.min_rate:,.0f} bytes/s (set {ENV_MIN_RATE} to change it, 0 for "
                            f"none; averaged over {ENV_RATE_WINDOW} = {limits.rate_window:g} s)",
                        )
                    window_start, window_bytes = now, 0
    if total is not None and done < total:
        raise _Transient(f"connection dropped after {done:,} of {total:,} bytes")


class _Failed(Exception):
    """`_fetch` gave up; the message is the reason, `limit` the `Limits` entry that stopped it (or None)."""

    def __init__(self, reason: str, limit: str | None = None) -> None:
        super().__init__(reason)
        self.limit = limit


def _fetch(
    url: str,
    part: Path,
    *,
    size: int | None,
    max_size: int | None,
    progress: ProgressFn | None,
    retries: int,
    backoff: float,
    timeout: float,
    limits: Limits,
    deadline_at: float | None,
) -> None:
    """`download` without the message formatting: raises `_Failed` with the bare reason."""
    attempts = max(0, retries) + 1
    for attempt in range(attempts):
        try:
            _attempt(url, part, size=size, max_size=max_size, progress=progress, timeout=timeout, limits=limits,
                     deadline_at=deadline_at)
            return
        except _LimitHit as e:
            kept = part.stat().st_size if part.exists() else 0
            raise _Failed(f"{e}; kept the {kept:,} bytes received in {part}: run again to resume", e.which) from e
        except _Transient as e:
            if attempt + 1 >= attempts:
                raise _Failed(f"{e} (after {attempts} attempts)") from e
        except _Permanent as e:
            raise _Failed(str(e)) from e
        pause = backoff * 2**attempt
        if deadline_at is not None:
            pause = max(0.0, min(pause, deadline_at - time.monotonic()))
        time.sleep(pause)


def download(
    url: str,
    part: Path,
    *,
    size: int | None,
    max_size: int | None = None,
    progress: ProgressFn | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    hint: str = "",
    limits: Limits | None = None,
    deadline_at: float | None = None,
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
    max_size : int or None
        When `size` is unknown: the most bytes accepted (a server announcing or sending more is refused).
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
    limits : Limits, optional
        Overall deadline and minimum rate; None reads them from the environment (`limits_from_env`).
    deadline_at : float, optional
        `time.monotonic()` value at which the deadline passes, when a caller shares one deadline between
        several downloads; None starts ``limits.deadline`` now.

    Raises
    ------
    DataError
        One line naming the URL, the reason and `hint`. `part` is kept (resumable) unless it is known bad.
        A `DownloadLimitError` (a DataError) when a limit stopped it, saying which.
    """
    limits = limits_from_env() if limits is None else limits
    if deadline_at is None and limits.deadline is not None:
        deadline_at = time.monotonic() + limits.deadline
    try:
        _fetch(url, part, size=size, max_size=max_size, progress=progress, retries=retries, backoff=backoff,
               timeout=timeout, limits=limits, deadline_at=deadline_at)
    except _Failed as e:
        message = _failure(url, str(e), hint)
        if e.limit is not None:
            raise DownloadLimitError(message, e.limit) from e
        raise DataError(message) from e


def _failure(url: str, reason: str, hint: str) -> str:
    return one_line(f"cannot download {url}: {reason}" + (f"; {hint}" if hint else ""))


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB blocks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _mismatch(path: Path, md5: str | None, size: int | None) -> str | None:
    """What is wrong with a downloaded file's size or md5 (None: nothing)."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"is {actual_size:,} bytes, expected {size:,}"
    if md5 is not None:
        actual = file_md5(path)
        if actual.lower() != md5.lower():
            return f"has md5 {actual}, expected {md5.lower()}"
    return None


def verify(path: Path, *, url: str, md5: str | None, size: int | None) -> None:
    """Check size and md5 of the downloaded file; on mismatch delete it and raise `DataError`."""
    problem = _mismatch(path, md5, size)
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


def _locked_folder(dest: Path, lock_name: str, hint: str) -> contextlib.ExitStack:
    """Create `dest` and hold ``dest/<lock_name>``; an OS failure -> DataError naming `dest`."""
    stack = contextlib.ExitStack()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        stack.enter_context(file_lock(dest / lock_name))
    except OSError as e:
        stack.close()
        raise DataError(
            f"cannot write to the data folder {dest}: {_os_reason(e)}" + (f"; {hint}" if hint else "")
        ) from e
    return stack


def fetch_and_extract(
    url: str,
    dest: Path,
    *,
    archive_name: str,
    folder_name: str,
    is_complete: Callable[[Path], bool],
    md5: str | None,
    size: int | None,
    max_size: int | None = None,
    progress: ProgressFn | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    hint: str = "",
    limits: Limits | None = None,
) -> Path:
    """Download `url` to ``dest/<archive_name>.part``, verify, extract ``folder_name/`` into `dest`.

    Holds ``dest/.<archive_name>.lock`` throughout, and returns at once (no network) when another process
    put a complete ``dest/folder_name`` in place while this one waited for the lock. The archive is deleted
    after a successful extraction. `max_size` and `limits` as in `download`.

    Returns
    -------
    Path
        ``dest / folder_name``.
    """
    final = dest / folder_name
    with _locked_folder(dest, f".{archive_name}.lock", hint):
        if final.is_dir() and is_complete(final):
            return final  # another process finished while we waited
        remove_stale_extractions(dest, folder_name)
        part = dest / f"{archive_name}.part"
        download(url, part, size=size, max_size=max_size, progress=progress, retries=retries, backoff=backoff,
                 timeout=timeout, hint=hint, limits=limits)
        verify(part, url=url, md5=md5, size=size)
        extract(part, dest, folder_name, is_complete=is_complete)
        part.unlink()
        return final


def join_url(base: str, name: str) -> str:
    """``base`` (a folder URL, with or without the trailing slash) + ``name``."""
    return base.rstrip("/") + "/" + name


def fetch_files(
    bases: list[str],
    dest: Path,
    files: Mapping[str, str | None],
    *,
    max_size: int | None,
    progress: ProgressFn | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    hint: str = "",
    limits: Limits | None = None,
) -> Path:
    """Download each of `files` (name -> md5) that ``dest`` lacks, from the first mirror in `bases` that works.

    For each missing file: ``dest/<name>.part`` is downloaded (resumed when present) from ``bases[0]/<name>``,
    then, should that fail or serve a file with the wrong md5, from the next mirror, and so on; a file is
    renamed to ``dest/<name>`` only after its md5 matched, so ``dest`` never holds an unverified file under
    its final name. Files already in ``dest`` were verified when they were put there and are not fetched
    again. One deadline covers every file and mirror; when it passes, no further mirror is tried.
    Holds ``dest.parent/.<dest.name>.lock`` throughout.

    Parameters
    ----------
    bases : list of str
        Mirror folder URLs, tried in order.
    dest : Path
        The data set's folder; created if needed.
    files : mapping
        File name -> expected md5 (None: not checked).
    max_size : int or None
        The most bytes accepted per file.
    progress, retries, backoff, timeout, hint, limits
        As in `download`.

    Returns
    -------
    Path
        `dest`.

    Raises
    ------
    DataError
        One line naming the file, each mirror's reason and `hint`; a `DownloadLimitError` when the deadline
        passed (every `.part` is kept).
    """
    limits = limits_from_env() if limits is None else limits
    deadline_at = None if limits.deadline is None else time.monotonic() + limits.deadline
    with _locked_folder(dest.parent, f".{dest.name}.lock", hint):
        created = not dest.exists()
        try:
            dest.mkdir(exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot write to the data folder {dest}: {_os_reason(e)}") from e
        try:
            _fetch_each(bases, dest, files, max_size=max_size, progress=progress, retries=retries, backoff=backoff,
                        timeout=timeout, hint=hint, limits=limits, deadline_at=deadline_at)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    dest.rmdir()  # only when empty: a failure before the first byte leaves no new folder
            raise
    return dest


def _fetch_each(
    bases: list[str],
    dest: Path,
    files: Mapping[str, str | None],
    *,
    max_size: int | None,
    progress: ProgressFn | None,
    retries: int,
    backoff: float,
    timeout: float,
    hint: str,
    limits: Limits,
    deadline_at: float | None,
) -> None:
    """The loop of `fetch_files` over files and mirrors (the caller holds the lock)."""
    for name, md5 in files.items():
        final = dest / name
        if final.is_file():
            continue
        part = dest / f"{name}.part"
        reasons = []
        for base in bases:
            url = join_url(base, name)
            try:
                _fetch(url, part, size=None, max_size=max_size, progress=progress, retries=retries,
                       backoff=backoff, timeout=timeout, limits=limits, deadline_at=deadline_at)
            except _Failed as e:
                reasons.append(f"{url}: {e}")
                if e.limit == "deadline":
                    raise DownloadLimitError(_files_failure(name, reasons, hint), e.limit) from e
                continue
            problem = _mismatch(part, md5, None)
            if problem is not None:
                part.unlink()
                reasons.append(f"{url}: the file {problem} (deleted it)")
                continue
            os.replace(part, final)
            break
        else:
            raise DataError(_files_failure(name, reasons, hint))


def _files_failure(name: str, reasons: list[str], hint: str) -> str:
    tried = "; ".join(reasons)
    return one_line(f"cannot download {name} ({tried})" + (f"; {hint}" if hint else ""))

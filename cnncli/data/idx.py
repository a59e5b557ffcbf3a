"""IDX files (the MNIST format), gzipped or not, parsed by hand with every size checked before it is used.

Layout (all integers big-endian)::

    bytes 0-1   0x00 0x00                     magic
    byte  2     data type code                0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
                                              0x0E float64
    byte  3     number of dimensions d        1..MAX_DIMS
    4·d bytes   the d sizes, uint32 each
    then        prod(sizes) values, row-major, nothing after them

A file is refused, with a one-line `DataError` naming it, when the magic, the type code or the number of
dimensions is wrong, when the values the header declares would exceed `max_bytes` (checked before anything
is read or allocated, so a gzip bomb or a lying header cannot exhaust memory), when fewer bytes follow than
the header declares, or when anything follows them.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cnncli.host.errors import DataError
from cnncli.host.files import open_regular

TYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_DIMS = 8
GZIP_MAGIC = b"\x1f\x8b"


def _read_exactly(f: BinaryIO, n: int, path: Path, what: str) -> bytearray:
    """Exactly `n` bytes from `f` into a new (writable) buffer; `DataError` when the file ends first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got : min(n, got + (1 << 22))])  # GzipFile decompresses at most what fits
        if not k:
            raise DataError(f"{path}: truncated: {what} needs {n:,} bytes, the file ends after {got:,}")
        got += k
    return buf


def read_idx(
    path: Path,
    *,
    max_bytes: int,
    type_code: int | None = None,
    ndim: int | None = None,
) -> np.ndarray:
    """Read an IDX file (``.gz`` names are decompressed on the fly, never more than the header declares).

    Parameters
    ----------
    path : Path
        The file; gzip-compressed when its name ends in ``.gz``.
    max_bytes : int
        The most bytes of values accepted (the header's sizes are checked against it before reading).
    type_code : int, optional
        Required data type code (e.g. 0x08 for uint8); None accepts any of `TYPE_CODES`.
    ndim : int, optional
        Required number of dimensions; None accepts 1..MAX_DIMS.

    Returns
    -------
    np.ndarray
        Shape = the header's sizes, dtype from the type code in native byte order (uint8 stays uint8).

    Raises
    ------
    DataError
        Missing, unreadable, not gzip (for ``.gz``), damaged gzip stream, wrong magic, type code or number of
        dimensions, sizes above `max_bytes`, truncated, or trailing bytes; the message names `path`.
    """
    path = Path(path)
    compressed = path.name.endswith(".gz")
    try:
        raw = open_regular(path)  # a FIFO or device is refused, never read
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    with raw:
        if compressed and raw.read(2) != GZIP_MAGIC:
            raise DataError(f"{path}: not a gzip file (its name ends in .gz but it does not start with 1f 8b)")
        raw.seek(0)
        f: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw  # type: ignore[assignment]
        try:
            return _parse(f, path, max_bytes=max_bytes, type_code=type_code, ndim=ndim)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            what = "truncated" if isinstance(e, EOFError) else "damaged"
            raise DataError(f"{path}: {what} gzip data ({e})") from e
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from e


def _parse(f: BinaryIO, path: Path, *, max_bytes: int, type_code: int | None, ndim: int | None) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: truncated: {len(head)} bytes, shorter than the 4-byte IDX header")
    if head[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file (magic bytes {head[:2].hex(' ')}, expected 00 00)")
    code, dims = head[2], head[3]
    if code not in TYPE_CODES:
        raise DataError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if type_code is not None and code != type_code:
        raise DataError(
            f"{path}: IDX data type 0x{code:02x} ({TYPE_CODES[code].name}), expected 0x{type_code:02x} "
            f"({TYPE_CODES[type_code].name})"
        )
    if not 1 <= dims <= MAX_DIMS:
        raise DataError(f"{path}: {dims} dimensions in the IDX header (1 to {MAX_DIMS} allowed)")
    if ndim is not None and dims != ndim:
        raise DataError(f"{path}: {dims} dimensions in the IDX header, expected {ndim}")
    shape = struct.unpack(f">{dims}I", bytes(_read_exactly(f, 4 * dims, path, "the IDX header's sizes")))
    dtype = TYPE_CODES[code]
    nbytes = math.prod(shape) * dtype.itemsize  # Python int: no overflow
    if nbytes > max_bytes:
        raise DataError(
            f"{path}: the IDX header declares sizes {list(shape)} ({nbytes:,} bytes), more than the "
            f"{max_bytes:,} bytes allowed"
        )
    body = _read_exactly(f, nbytes, path, f"the values of sizes {list(shape)}")
    if f.read(1):
        raise DataError(f"{path}: bytes after the {nbytes:,} bytes of values that sizes {list(shape)} declare")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


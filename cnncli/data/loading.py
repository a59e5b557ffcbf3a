"""What every data set's loader shares: `Dataset` (the arrays and class names), the restricted unpickler that
rebuilds nothing but NumPy arrays (CIFAR-10 and CIFAR-100 are Python pickles: a tampered file cannot run code),
reading a key from a pickled record, and the checks of labels and class names, each failure a one-line
`DataError` naming the file.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.data.download import one_line
from cnncli.host.errors import DataError
from cnncli.host.files import open_regular


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """The only use of ``_codecs.encode`` in NumPy pickles: bytes stored as a latin-1 str (protocol 2)."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
    return codecs.encode(text, "latin1")


_RECONSTRUCT = _numpy_reconstruct()
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # written by NumPy 1.x (and the originals)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # written by NumPy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves no global except the few NumPy array reconstruction needs."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: refusing to unpickle forbidden global {module}.{name} "
                "(a CIFAR data file holds only arrays and lists; the file may have been tampered with)"
            ) from None


def unpickle(path: Path) -> Any:
    """Load one pickle through `_ArrayOnlyUnpickler`; any failure -> DataError naming `path`."""
    try:
        with open_regular(path) as f:  # a FIFO or device is refused, never read
            return _ArrayOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # a damaged pickle can fail in many ways (EOFError, UnpicklingError, ...)
        detail = one_line(e) or "no detail"
        raise DataError(f"{path} is damaged or not a CIFAR data file ({type(e).__name__}: {detail})") from e


def record_value(record: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):  # Python 2 pickles read with encoding="bytes" have bytes keys
        if k in record:
            return record[k]
    found = ", ".join(sorted(repr(k) for k in record)) or "none"
    raise DataError(f"{path}: missing key {key!r} (keys found: {found})")



@dataclass(frozen=True)
class Dataset:
    """A data set in memory (any of `DATASETS`).

    Attributes
    ----------
    train_x : np.ndarray
        uint8 (N, C, H, W); for CIFAR-10 (N, 3, 32, 32) with N = 50000 (0 if not requested).
    train_y : np.ndarray
        int64 (N,), values in 0..len(classes)-1.
    test_x : np.ndarray
        uint8 (M, C, H, W); CIFAR-10: M = 10000 (0 if not requested or the data set has no test split).
    test_y : np.ndarray
        int64 (M,).
    classes : tuple of str
        The class names, index = label.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]


Cifar10 = Dataset  # the name of this class before there were other data sets



def check_labels(raw: Any, path: Path, key: str, count: int, classes: int) -> np.ndarray:
    """`raw` (a list or array from a data file) as int64 (count,) with values in 0..classes-1."""
    try:
        y = np.asarray(raw)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: {key!r} is not a list of integers ({one_line(e)})") from e
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{path}: {key!r} is {y.shape} {y.dtype}, expected {count} integers")
    if y.shape[0] != count:
        raise DataError(f"{path}: {y.shape[0]} values in {key!r}, expected {count} (one per image)")
    bad = (y < 0) | (y >= classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: {key!r} value {int(y[i])} at index {i} is outside 0..{classes - 1} "
            f"({int(bad.sum())} such labels)"
        )
    return y.astype(np.int64, copy=False)


def check_names(record: dict, key: str, count: int, path: Path) -> tuple[str, ...]:
    """The class names under `key` of a data file's record: `count` non-empty strings (bytes decoded)."""
    names = record_value(record, key, path)
    if not isinstance(names, (list, tuple)) or len(names) != count:
        raise DataError(f"{path}: {key!r} should list {count} names, found {names!r:.80}")
    out = []
    for n in names:
        if isinstance(n, bytes):
            try:
                n = n.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: class name {n!r:.40} in {key!r} is not text") from e
        if not isinstance(n, str) or not n:
            raise DataError(f"{path}: bad class name {n!r:.40} in {key!r}")
        out.append(n)
    return tuple(out)

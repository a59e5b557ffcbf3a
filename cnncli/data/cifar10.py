"""CIFAR-10: where it lives, getting it, and loading it safely.

The data folder holds ``cifar-10-batches-py/`` (as extracted from the official archive)::

    batches.meta                    {b'label_names': [b'airplane', ...], ...}
    data_batch_1 ... data_batch_5   {b'data': uint8 (10000, 3072), b'labels': [int] * 10000, ...}
    test_batch                      same layout

The batch files are Python 2 pickles, read through the restricted unpickler of `cnncli/data/loading.py`, so a
tampered file cannot run code. Reading an existing folder writes nothing anywhere. Nothing here prints;
downloads report through a ``progress(done_bytes, total_bytes)`` callback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cnncli.data import download as _download
from cnncli.data.loading import Dataset, check_labels, check_names, record_value, unpickle
from cnncli.host.errors import DataError
from cnncli.host.files import first_special

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_SIZE = 170_498_071
FOLDER_NAME = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"

META_FILE = "batches.meta"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
REQUIRED_FILES = (META_FILE, *TRAIN_FILES, TEST_FILE)
# the class names in label order, as batches.meta stores them (label_names)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

BATCH_SIZE = 10_000
IMAGE_SHAPE = (3, 32, 32)
IMAGE_VALUES = 3 * 32 * 32
NUM_CLASSES = 10

WAYS_OUT = (
    "use --data-dir pointing at an extracted cifar-10-batches-py folder, "
    "or set CNNCLI_CIFAR10_URL to a reachable mirror"
)



# --------------------------------------------------------------------------------------------- locations


def _holds_batches(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def find_extracted(data_dir: Path) -> Path | None:
    """The extracted folder, if `data_dir` is one or holds one; None otherwise.

    Checks `data_dir` itself, then ``data_dir/cifar-10-batches-py``, for all seven batch files
    (``batches.meta``, ``data_batch_1..5``, ``test_batch``). Only looks; never writes.
    """
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / FOLDER_NAME):
        if _holds_batches(folder):
            return folder
    return None


def _check_not_partial(data_dir: Path) -> None:
    """Refuse to download beside a copy someone damaged (some batch files present, others missing)."""
    for folder in (data_dir, data_dir / FOLDER_NAME):
        special = first_special([folder / name for name in REQUIRED_FILES])
        if special is not None:
            raise DataError(f"{special}; the CIFAR-10 files must be regular files")
        present = [name for name in REQUIRED_FILES if (folder / name).exists()]
        if present:
            missing = [name for name in REQUIRED_FILES if name not in present]
            raise DataError(
                f"{folder} holds an incomplete CIFAR-10 copy (missing {', '.join(missing)}): restore or "
                "delete it, or use --data-dir pointing at a complete cifar-10-batches-py folder"
            )


def ensure_cifar10(
    data_dir: Path,
    url: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    *,
    md5: str | None = CIFAR10_MD5,
    size: int | None = CIFAR10_SIZE,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    limits: _download.Limits | None = None,
) -> Path:
    """Return the extracted CIFAR-10 folder, downloading and extracting it into `data_dir` if needed.

    When `find_extracted(data_dir)` finds the data, this returns it at once: no network, no file written
    (the folder may be a read-only shared copy). Otherwise it downloads `url` to
    ``data_dir/cifar-10-python.tar.gz.part`` (resuming a partial file from an earlier run, retrying
    transient failures), checks size and md5, extracts into a temporary folder in `data_dir` and renames
    ``cifar-10-batches-py/`` into place, all under a lock file so that concurrent runs do not collide.
    If `data_dir` is itself named ``cifar-10-batches-py``, the data goes there (its parent is used).

    Parameters
    ----------
    data_dir : Path
        From `resolve_data_dir`.
    url : str, optional
        Archive address (a mirror); None or "" means the official `CIFAR10_URL`.
    progress : callable, optional
        ``progress(done_bytes, total_bytes_or_None)``, called during a download only.
    md5 : str or None
        Expected md5 of the archive (None skips the check; for tests and trusted mirrors only).
    size : int or None
        Expected archive size in bytes (None: not checked).
    retries, backoff, timeout
        Extra attempts for transient failures, seconds before the first retry (doubling), socket timeout.
    limits : cnncli.data.download.Limits, optional
        Overall deadline and minimum rate; None reads them from the environment.

    Returns
    -------
    Path
        The folder holding ``batches.meta``, ``data_batch_1..5`` and ``test_batch``.

    Raises
    ------
    DataError
        One line naming the URL or file and the reason; for network failures also the ways out
        (``--data-dir`` or ``CNNCLI_CIFAR10_URL``). After a failure the data folder holds nothing new
        but at most a resumable ``.part`` file (a checksum mismatch deletes it).
    """
    data_dir = Path(data_dir)
    found = find_extracted(data_dir)
    if found is not None:
        return found
    _check_not_partial(data_dir)
    dest = data_dir.parent if data_dir.name == FOLDER_NAME else data_dir
    return _download.fetch_and_extract(
        url or CIFAR10_URL,
        dest,
        archive_name=ARCHIVE_NAME,
        folder_name=FOLDER_NAME,
        is_complete=_holds_batches,
        md5=md5,
        size=size,
        progress=progress,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        hint=WAYS_OUT,
        limits=limits,
    )


# ---------------------------------------------------------------------------------------------- loading


def load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file (``data_batch_N`` or ``test_batch``).

    Returns
    -------
    x : np.ndarray
        uint8, shape (10000, 3, 32, 32) (channels R, G, B), a view of the unpickled buffer.
    y : np.ndarray
        int64, shape (10000,), values in 0..9.

    Raises
    ------
    DataError
        Unreadable, truncated or tampered file, or wrong keys, shape, dtype or labels; names the file.
    """
    path = Path(path)
    record = unpickle(path)
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a dict with 'data' and 'labels', found {type(record).__name__}")
    data = record_value(record, "data", path)
    labels = record_value(record, "labels", path)
    want = (BATCH_SIZE, IMAGE_VALUES)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != want:
        got = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {got}, expected a (10000, 3072) uint8 array")
    y = check_labels(labels, path, "labels", BATCH_SIZE, NUM_CLASSES)
    return data.reshape((BATCH_SIZE, *IMAGE_SHAPE)), y


def load_classes(path: Path) -> tuple[str, ...]:
    """Class names from ``batches.meta`` (``label_names``), decoded to str: ('airplane', ..., 'truck')."""
    path = Path(path)
    record = unpickle(path)
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a dict with 'label_names', found {type(record).__name__}")
    return check_names(record, "label_names", NUM_CLASSES, path)


def _load_batches(folder: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate batch files into one preallocated array: one copy per batch, no intermediate list."""
    x = np.empty((len(names) * BATCH_SIZE, *IMAGE_SHAPE), dtype=np.uint8)
    y = np.empty(len(names) * BATCH_SIZE, dtype=np.int64)
    for i, name in enumerate(names):
        bx, by = load_batch(folder / name)
        x[i * BATCH_SIZE : (i + 1) * BATCH_SIZE] = bx
        y[i * BATCH_SIZE : (i + 1) * BATCH_SIZE] = by
        del bx, by  # free the unpickled buffer before reading the next file
    return x, y


def load_cifar10(folder: Path, *, train: bool = True, test: bool = True) -> Dataset:
    """Load the extracted folder (from `ensure_cifar10` / `find_extracted`). Reads only; writes nothing.

    Parameters
    ----------
    folder : Path
        Holds ``batches.meta``, ``data_batch_1..5``, ``test_batch``.
    train, test : bool
        Which parts to read; a part not requested comes back as empty arrays (0, 3, 32, 32) / (0,).

    Returns
    -------
    Dataset
        uint8 images (N, 3, 32, 32) and int64 labels; 50000 train and 10000 test images.

    Raises
    ------
    DataError
        A missing, unreadable, damaged or tampered file; the message names it.
    """
    folder = Path(folder)
    classes = load_classes(folder / META_FILE)
    train_x, train_y = _load_batches(folder, TRAIN_FILES if train else ())
    test_x, test_y = _load_batches(folder, (TEST_FILE,) if test else ())
    return Dataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes)



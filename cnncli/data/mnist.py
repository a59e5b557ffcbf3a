"""MNIST and Fashion-MNIST: four gzipped IDX files each, kept compressed in ``mnist/`` and ``fashion-mnist/`` and
parsed by `cnncli/data/idx.py` with every size checked::

    train-images-idx3-ubyte.gz   uint8 (N, 28, 28)      train-labels-idx1-ubyte.gz   uint8 (N,) in 0..9
    t10k-images-idx3-ubyte.gz    uint8 (M, 28, 28)      t10k-labels-idx1-ubyte.gz    uint8 (M,) in 0..9

Any deviation is a one-line `DataError` naming the file; image counts are bounded, not fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.data import download as _download
from cnncli.data.idx import read_idx
from cnncli.data.loading import Dataset, check_labels
from cnncli.host.errors import DataError
from cnncli.host.files import first_special

ProgressFn = Callable[[int, int | None], None]

# --------------------------------------------------------------------------------- MNIST, Fashion-MNIST

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
MNIST_SIDE = 28
MAX_IDX_IMAGES = 100_000  # per file (the official files hold 60,000 and 10,000)
MAX_GZ_BYTES = 64 * 1024**2  # per downloaded file (the largest official one is about 26 MB)


@dataclass(frozen=True)
class IdxSource:
    """A data set shipped as the four gzipped IDX files of MNIST's layout."""

    title: str  # "MNIST"
    folder: str  # where the four files go in the data folder
    mirrors: tuple[str, ...]  # folder URLs, tried in order
    md5s: tuple[tuple[str, str], ...]  # (file name, md5) for the four files
    classes: tuple[str, ...]
    url_env: str


MNIST = IdxSource(
    title="MNIST",
    folder="mnist",
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    md5s=(
        (TRAIN_IMAGES, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        (TRAIN_LABELS, "d53e105ee54ea40749a09fcbcd1e9432"),
        (TEST_IMAGES, "9fb629c4189551a2d022fa330f9573f3"),
        (TEST_LABELS, "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    classes=tuple(str(d) for d in range(10)),
    url_env="CNNCLI_MNIST_URL",
)
FASHION_MNIST = IdxSource(
    title="Fashion-MNIST",
    folder="fashion-mnist",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    md5s=(
        (TRAIN_IMAGES, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        (TRAIN_LABELS, "25c81989df183df01b3e8a0aad5dffbe"),
        (TEST_IMAGES, "bef4ecab320f06d8554ea6380940ec79"),
        (TEST_LABELS, "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"),
    url_env="CNNCLI_FASHION_MNIST_URL",
)


def find_idx_set(source: IdxSource, data_dir: Path) -> Path | None:
    """`data_dir` or ``data_dir/<folder>`` when it holds the four .gz files; None otherwise. Only looks."""
    for folder in (Path(data_dir), Path(data_dir) / source.folder):
        if all((folder / name).is_file() for name in IDX_FILES):
            return folder
    return None


def ensure_idx_set(
    source: IdxSource,
    data_dir: Path,
    url: str | None = None,
    progress: ProgressFn | None = None,
    *,
    md5s: dict[str, str | None] | None = None,
    **options: Any,
) -> Path:
    """The folder holding `source`'s four files, downloading the missing ones into ``data_dir/<folder>``.

    When `find_idx_set` finds them this returns at once (no network, nothing written). Otherwise each
    missing file is fetched with `cnncli.data.download.fetch_files` from `url` (a mirror folder) or else the
    official mirrors, first that works, resumed and md5-checked, and put in place only once verified.
    `md5s` replaces the official checksums (tests); `options`: retries, backoff, timeout, limits.
    A `data_dir` that itself holds some of the four files but not all is refused.
    """
    data_dir = Path(data_dir)
    found = find_idx_set(source, data_dir)
    if found is not None:
        return found
    hint = (
        f"use --data-dir pointing at a folder holding the four {source.title} .gz files, or set "
        f"{source.url_env} (or data.url) to a reachable mirror folder"
    )
    inside = data_dir.name == source.folder
    for folder in (data_dir, data_dir / source.folder):
        special = first_special([folder / name for name in IDX_FILES])
        if special is not None:
            raise DataError(f"{special}; the four {source.title} files must be regular files")
    present = [name for name in IDX_FILES if (data_dir / name).exists()]
    if present and not inside:
        missing = [name for name in IDX_FILES if name not in present]
        raise DataError(
            f"{data_dir} holds an incomplete {source.title} copy (missing {', '.join(missing)}): restore or "
            f"delete it, or use --data-dir pointing at a complete copy"
        )
    dest = data_dir if inside else data_dir / source.folder
    bases = [url] if url else list(source.mirrors)
    return _download.fetch_files(bases, dest, md5s if md5s is not None else dict(source.md5s),
                                 max_size=MAX_GZ_BYTES, progress=progress, hint=hint, **options)


def load_idx_pair(images: Path, labels: Path, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One split of an MNIST-format data set.

    Returns
    -------
    x : np.ndarray
        uint8 (N, 1, 28, 28); 1 <= N <= MAX_IDX_IMAGES.
    y : np.ndarray
        int64 (N,) in 0..classes-1.

    Raises
    ------
    DataError
        Anything `cnncli.data.idx.read_idx` refuses, images that are not uint8 N×28×28, labels that are not N
        uint8 values, labels out of range; names the file.
    """
    side = MNIST_SIDE
    x = read_idx(images, max_bytes=MAX_IDX_IMAGES * side * side, type_code=0x08, ndim=3)
    if x.shape[1:] != (side, side) or x.shape[0] < 1:
        raise DataError(f"{images}: images of sizes {list(x.shape)}, expected [N, {side}, {side}] with N >= 1")
    y = read_idx(labels, max_bytes=MAX_IDX_IMAGES, type_code=0x08, ndim=1)
    if len(y) != len(x):
        raise DataError(f"{labels}: {len(y):,} labels, but {images.name} holds {len(x):,} images")
    return x.reshape(len(x), 1, side, side), check_labels(y, labels, "labels", len(x), classes)


def load_idx_set(source: IdxSource, folder: Path, *, train: bool = True, test: bool = True) -> Dataset:
    """Load the four files in `folder` (from `ensure_idx_set`). Reads only; a part not requested is empty."""
    folder = Path(folder)
    empty = (np.empty((0, 1, MNIST_SIDE, MNIST_SIDE), np.uint8), np.empty(0, np.int64))
    k = len(source.classes)
    train_x, train_y = load_idx_pair(folder / TRAIN_IMAGES, folder / TRAIN_LABELS, k) if train else empty
    test_x, test_y = load_idx_pair(folder / TEST_IMAGES, folder / TEST_LABELS, k) if test else empty
    return Dataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=source.classes)


def source(name: str) -> IdxSource:
    """The IDX data set a ``data.dataset`` value names: ``mnist`` or ``fashion-mnist``."""
    return MNIST if name == "mnist" else FASHION_MNIST

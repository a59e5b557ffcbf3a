"""CIFAR-100, MNIST and Fashion-MNIST: where each comes from, getting it, and loading it safely.

CIFAR-10 lives in `cnncli.data` (which also holds the entry points `ensure_dataset` / `load_dataset` that
dispatch to this module) and image folders in `cnncli.images`.

CIFAR-100 (python version) extracts from ``cifar-100-python.tar.gz`` to ``cifar-100-python/``::

    meta    {b'fine_label_names': [100 names], b'coarse_label_names': [20 names]}
    train   {b'data': uint8 (50000, 3072), b'fine_labels': [int], b'coarse_labels': [int], ...}
    test    same layout, 10000 images

read through the restricted unpickler of `cnncli.data` (nothing but NumPy arrays can be rebuilt). MNIST and
Fashion-MNIST are four gzipped IDX files each, kept compressed in ``mnist/`` and ``fashion-mnist/`` and parsed
by `cnncli.idx` with every size checked::

    train-images-idx3-ubyte.gz   uint8 (N, 28, 28)      train-labels-idx1-ubyte.gz   uint8 (N,) in 0..9
    t10k-images-idx3-ubyte.gz    uint8 (M, 28, 28)      t10k-labels-idx1-ubyte.gz    uint8 (M,) in 0..9

Every file's structure is checked (keys, dtypes, shapes, counts that agree, labels in range); any deviation
is a one-line `DataError` naming the file. The image counts themselves are not fixed (the official files
have 50,000/10,000 and 60,000/10,000 images), only bounded, so smaller copies in the same format load too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnncli import data as _data
from cnncli import download as _download
from cnncli.errors import DataError
from cnncli.idx import read_idx

ProgressFn = Callable[[int, int | None], None]

# ------------------------------------------------------------------------------------------- CIFAR-100


@dataclass(frozen=True)
class ArchiveSource:
    """A data set shipped as one tar.gz archive holding one folder of files."""

    title: str  # for messages: "CIFAR-100"
    url: str  # the official archive
    md5: str
    size: int | None  # bytes, when known
    max_size: int  # the most bytes a download may bring when `size` is unknown
    archive: str  # file name of the archive
    folder: str  # the folder it extracts to
    required: tuple[str, ...]  # files that folder must hold
    url_env: str  # environment variable naming a mirror


CIFAR100 = ArchiveSource(
    title="CIFAR-100",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    size=None,
    max_size=256 * 1024**2,
    archive="cifar-100-python.tar.gz",
    folder="cifar-100-python",
    required=("meta", "train", "test"),
    url_env="CNNCLI_CIFAR100_URL",
)
CIFAR100_FINE, CIFAR100_COARSE = 100, 20
CIFAR_VALUES = 3 * 32 * 32


def _ways_out(source: ArchiveSource) -> str:
    return (
        f"use --data-dir pointing at an extracted {source.folder} folder, or set {source.url_env} (or "
        "data.url) to a reachable mirror"
    )


def find_archive_set(source: ArchiveSource, data_dir: Path) -> Path | None:
    """`data_dir` or ``data_dir/<folder>`` when it holds every required file; None otherwise. Only looks."""
    for folder in (Path(data_dir), Path(data_dir) / source.folder):
        if all((folder / name).is_file() for name in source.required):
            return folder
    return None


def ensure_archive_set(
    source: ArchiveSource,
    data_dir: Path,
    url: str | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> Path:
    """The extracted folder of `source`, downloaded (resumed, md5-checked) and extracted into `data_dir` if
    needed, exactly as `cnncli.data.ensure_cifar10` does for CIFAR-10 (`options`: md5, size, retries,
    backoff, timeout, limits). A copy in `data_dir` with some required files missing is refused."""
    data_dir = Path(data_dir)
    found = find_archive_set(source, data_dir)
    if found is not None:
        return found
    for folder in (data_dir, data_dir / source.folder):
        present = [name for name in source.required if (folder / name).exists()]
        if present:
            missing = [name for name in source.required if name not in present]
            raise DataError(
                f"{folder} holds an incomplete {source.title} copy (missing {', '.join(missing)}): restore or "
                f"delete it, or use --data-dir pointing at a complete {source.folder} folder"
            )
    dest = data_dir.parent if data_dir.name == source.folder else data_dir
    md5 = options.pop("md5", source.md5)
    size = options.pop("size", source.size)
    required = source.required
    return _download.fetch_and_extract(
        url or source.url,
        dest,
        archive_name=source.archive,
        folder_name=source.folder,
        is_complete=lambda f: all((f / name).is_file() for name in required),
        md5=md5,
        size=size,
        max_size=source.max_size,
        progress=progress,
        hint=_ways_out(source),
        **options,
    )


def _record(path: Path, keys: str) -> dict:
    record = _data._unpickle(path)
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a dict with {keys}, found {type(record).__name__}")
    return record


def load_cifar100_meta(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(100 fine class names, 20 coarse class names) from CIFAR-100's ``meta`` file, decoded to str."""
    path = Path(path)
    record = _record(path, "'fine_label_names' and 'coarse_label_names'")
    return (
        _data.check_names(record, "fine_label_names", CIFAR100_FINE, path),
        _data.check_names(record, "coarse_label_names", CIFAR100_COARSE, path),
    )


def load_cifar100_file(path: Path, max_images: int = 50_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One CIFAR-100 image file (``train`` or ``test``).

    Returns
    -------
    x : np.ndarray
        uint8 (N, 3, 32, 32), channels R, G, B; 1 <= N <= `max_images`.
    fine : np.ndarray
        int64 (N,) in 0..99.
    coarse : np.ndarray
        int64 (N,) in 0..19.

    Raises
    ------
    DataError
        Unreadable, truncated or tampered file, wrong keys, shape or dtype, label counts that disagree with
        the images, labels out of range; names the file.
    """
    path = Path(path)
    record = _record(path, "'data', 'fine_labels' and 'coarse_labels'")
    x = _data._get(record, "data", path)
    if (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != CIFAR_VALUES
            or not 1 <= x.shape[0] <= max_images):
        got = f"{x.shape} {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: 'data' is {got}, expected an (N, 3072) uint8 array with 1 <= N <= {max_images}")
    n = x.shape[0]
    fine = _data.check_labels(_data._get(record, "fine_labels", path), path, "fine_labels", n, CIFAR100_FINE)
    coarse = _data.check_labels(_data._get(record, "coarse_labels", path), path, "coarse_labels", n, CIFAR100_COARSE)
    return x.reshape(n, 3, 32, 32), fine, coarse


def load_cifar100(folder: Path, *, labels: str = "fine", train: bool = True, test: bool = True) -> _data.Dataset:
    """Load an extracted ``cifar-100-python`` folder; `labels` "fine" (100 classes) or "coarse" (20).

    Reads only; a part not requested comes back as empty arrays (0, 3, 32, 32) / (0,).
    """
    if labels not in ("fine", "coarse"):
        raise DataError(f"data.labels = {labels!r}: must be fine or coarse")
    folder = Path(folder)
    fine_names, coarse_names = load_cifar100_meta(folder / "meta")
    use = 1 if labels == "fine" else 2
    parts = []
    for name, wanted in (("train", train), ("test", test)):
        if wanted:
            loaded = load_cifar100_file(folder / name)
            parts.append((loaded[0], loaded[use]))
        else:
            parts.append((np.empty((0, 3, 32, 32), np.uint8), np.empty(0, np.int64)))
    (train_x, train_y), (test_x, test_y) = parts
    classes = fine_names if labels == "fine" else coarse_names
    return _data.Dataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes)


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
    missing file is fetched with `cnncli.download.fetch_files` from `url` (a mirror folder) or else the
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
        Anything `cnncli.idx.read_idx` refuses, images that are not uint8 N×28×28, labels that are not N
        uint8 values, labels out of range; names the file.
    """
    side = MNIST_SIDE
    x = read_idx(images, max_bytes=MAX_IDX_IMAGES * side * side, type_code=0x08, ndim=3)
    if x.shape[1:] != (side, side) or x.shape[0] < 1:
        raise DataError(f"{images}: images of sizes {list(x.shape)}, expected [N, {side}, {side}] with N >= 1")
    y = read_idx(labels, max_bytes=MAX_IDX_IMAGES, type_code=0x08, ndim=1)
    if len(y) != len(x):
        raise DataError(f"{labels}: {len(y):,} labels, but {images.name} holds {len(x):,} images")
    return x.reshape(len(x), 1, side, side), _data.check_labels(y, labels, "labels", len(x), classes)


def load_idx_set(source: IdxSource, folder: Path, *, train: bool = True, test: bool = True) -> _data.Dataset:
    """Load the four files in `folder` (from `ensure_idx_set`). Reads only; a part not requested is empty."""
    folder = Path(folder)
    empty = (np.empty((0, 1, MNIST_SIDE, MNIST_SIDE), np.uint8), np.empty(0, np.int64))
    k = len(source.classes)
    train_x, train_y = load_idx_pair(folder / TRAIN_IMAGES, folder / TRAIN_LABELS, k) if train else empty
    test_x, test_y = load_idx_pair(folder / TEST_IMAGES, folder / TEST_LABELS, k) if test else empty
    return _data.Dataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=source.classes)

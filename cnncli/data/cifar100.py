"""CIFAR-100 (python version): where it comes from, getting it, and loading it safely.

It extracts from ``cifar-100-python.tar.gz`` to ``cifar-100-python/``::

    meta    {b'fine_label_names': [100 names], b'coarse_label_names': [20 names]}
    train   {b'data': uint8 (50000, 3072), b'fine_labels': [int], b'coarse_labels': [int], ...}
    test    same layout, 10000 images

read through the restricted unpickler of `cnncli/data/loading.py` (nothing but NumPy arrays can be rebuilt).
Every file's structure is checked (keys, dtypes, shapes, counts that agree, labels in range); any deviation is a
one-line `DataError` naming the file. The image count is bounded, not fixed, so smaller copies load too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.data import download as _download
from cnncli.data.loading import Dataset, check_labels, check_names, record_value, unpickle
from cnncli.host.errors import DataError
from cnncli.host.files import first_special

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
        special = first_special([folder / name for name in source.required])
        if special is not None:
            raise DataError(f"{special}; the {source.title} files must be regular files")
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
    record = unpickle(path)
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a dict with {keys}, found {type(record).__name__}")
    return record


def load_cifar100_meta(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(100 fine class names, 20 coarse class names) from CIFAR-100's ``meta`` file, decoded to str."""
    path = Path(path)
    record = _record(path, "'fine_label_names' and 'coarse_label_names'")
    return (
        check_names(record, "fine_label_names", CIFAR100_FINE, path),
        check_names(record, "coarse_label_names", CIFAR100_COARSE, path),
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
    x = record_value(record, "data", path)
    if (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != CIFAR_VALUES
            or not 1 <= x.shape[0] <= max_images):
        got = f"{x.shape} {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: 'data' is {got}, expected an (N, 3072) uint8 array with 1 <= N <= {max_images}")
    n = x.shape[0]
    fine = check_labels(record_value(record, "fine_labels", path), path, "fine_labels", n, CIFAR100_FINE)
    coarse = check_labels(record_value(record, "coarse_labels", path), path, "coarse_labels", n, CIFAR100_COARSE)
    return x.reshape(n, 3, 32, 32), fine, coarse


def load_cifar100(folder: Path, *, labels: str = "fine", train: bool = True, test: bool = True) -> Dataset:
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
    return Dataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes)

"""Data sets: where they live, getting them, loading them safely, their shapes, normalisation, splits.

The entry points for every data set (``data.dataset``: cifar10, cifar100, mnist, fashion-mnist, folder) are
`resolve_data_dir`, `ensure_dataset`, `load_dataset` (-> `Dataset`), `dataset_shape`,
`compute_normalization` / `resolve_normalization` and `make_splits`. CIFAR-10 itself is implemented here;
CIFAR-100 and the MNISTs in `cnncli.datasets`, image folders in `cnncli.images`.

For CIFAR-10 the data folder holds ``cifar-10-batches-py/`` (as extracted from the official archive)::

    batches.meta                    {b'label_names': [b'airplane', ...], ...}
    data_batch_1 ... data_batch_5   {b'data': uint8 (10000, 3072), b'labels': [int] * 10000, ...}
    test_batch                      same layout

The batch files are Python 2 pickles. They are read with a restricted unpickler that only lets NumPy
rebuild arrays, so a tampered file cannot run code. Reading an existing folder writes nothing anywhere.
Nothing here prints; downloads report through a ``progress(done_bytes, total_bytes)`` callback.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnncli import download as _download
from cnncli.config import DATASET_NAMES
from cnncli.errors import ConfigError, DataError

if TYPE_CHECKING:
    from cnncli.config import DataConfig

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_SIZE = 170_498_071
FOLDER_NAME = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"

META_FILE = "batches.meta"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
REQUIRED_FILES = (META_FILE, *TRAIN_FILES, TEST_FILE)

BATCH_SIZE = 10_000
IMAGE_SHAPE = (3, 32, 32)
IMAGE_VALUES = 3 * 32 * 32
NUM_CLASSES = 10

WAYS_OUT = (
    "use --data-dir pointing at an extracted cifar-10-batches-py folder, "
    "or set CNNCLI_CIFAR10_URL to a reachable mirror"
)


# --------------------------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cnncli``, or ``~/.cache/cnncli`` when that variable is unset or empty."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cnncli"


def resolve_data_dir(cli_dir: Path | None, config_dir: str | Path | None, dataset: str = "cifar10") -> Path:
    """The data folder, by precedence: `cli_dir` (``--data-dir``) > env ``CNNCLI_DATA`` > `config_dir`
    (``data.dir``) > `default_cache_dir()`.

    The result may be the folder holding ``cifar-10-batches-py/`` (``cifar-100-python/``, ``mnist/``,
    ``fashion-mnist/``) or that folder itself (see `find_extracted`). For ``dataset == "folder"`` the result is
    the image folder: `cli_dir` > `config_dir`, neither ``CNNCLI_DATA`` (a cache of downloads) nor the cache
    applies, and a `ConfigError` says that one is needed. Empty strings count as unset; ``~`` is expanded.
    Nothing is created or checked.
    """
    if dataset == "folder":
        for candidate in (cli_dir, config_dir):
            if candidate is not None and str(candidate) != "":
                return Path(candidate).expanduser()
        raise ConfigError(
            "data.dir: missing; data.dataset folder needs the image folder (one sub-folder per class) as "
            "data.dir in the config or --data-dir"
        )
    env = os.environ.get("CNNCLI_DATA")
    for candidate in (cli_dir, env, config_dir):
        if candidate is not None and str(candidate) != "":
            return Path(candidate).expanduser()
    return default_cache_dir()


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
    limits : cnncli.download.Limits, optional
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


# ------------------------------------------------------------------------------------- safe unpickling


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


def _unpickle(path: Path) -> Any:
    """Load one pickle through `_ArrayOnlyUnpickler`; any failure -> DataError naming `path`."""
    try:
        with open(path, "rb") as f:
            return _ArrayOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # a damaged pickle can fail in many ways (EOFError, UnpicklingError, ...)
        detail = _download.one_line(e) or "no detail"
        raise DataError(f"{path} is damaged or not a CIFAR data file ({type(e).__name__}: {detail})") from e


def _get(record: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):  # Python 2 pickles read with encoding="bytes" have bytes keys
        if k in record:
            return record[k]
    found = ", ".join(sorted(repr(k) for k in record)) or "none"
    raise DataError(f"{path}: missing key {key!r} (keys found: {found})")


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
    record = _unpickle(path)
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a dict with 'data' and 'labels', found {type(record).__name__}")
    data = _get(record, "data", path)
    labels = _get(record, "labels", path)
    want = (BATCH_SIZE, IMAGE_VALUES)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != want:
        got = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {got}, expected a (10000, 3072) uint8 array")
    y = check_labels(labels, path, "labels", BATCH_SIZE, NUM_CLASSES)
    return data.reshape((BATCH_SIZE, *IMAGE_SHAPE)), y


def load_classes(path: Path) -> tuple[str, ...]:
    """Class names from ``batches.meta`` (``label_names``), decoded to str: ('airplane', ..., 'truck')."""
    path = Path(path)
    record = _unpickle(path)
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a dict with 'label_names', found {type(record).__name__}")
    return check_names(record, "label_names", NUM_CLASSES, path)


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


# -------------------------------------------------------------------------------------- every data set

DATASETS = DATASET_NAMES  # the values of data.dataset: cifar10, cifar100, mnist, fashion-mnist, folder
DOWNLOADABLE = DATASETS[:-1]
TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST",
          "folder": "image folder"}
URL_ENV = {"cifar10": "CNNCLI_CIFAR10_URL", "cifar100": "CNNCLI_CIFAR100_URL", "mnist": "CNNCLI_MNIST_URL",
           "fashion-mnist": "CNNCLI_FASHION_MNIST_URL"}
_STATIC_SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "mnist": (1, 28, 28),
                  "fashion-mnist": (1, 28, 28)}


def _known(name: str) -> str:
    if name not in DATASETS:
        raise ConfigError(f"data.dataset: must be one of {', '.join(DATASETS)}, got {name!r}")
    return name


def _idx_source(name: str) -> Any:
    from cnncli import datasets

    return datasets.MNIST if name == "mnist" else datasets.FASHION_MNIST


def dataset_url(data_cfg: DataConfig) -> str | None:
    """The mirror to download from: ``$CNNCLI_<SET>_URL`` (`URL_ENV`) > ``data.url`` > None (official)."""
    env = URL_ENV.get(data_cfg.dataset)
    return (os.environ.get(env) if env else None) or data_cfg.url or None


def download_label(data_cfg: DataConfig) -> str:
    """What a download progress bar is called: the archive's name, or the data set's title."""
    from cnncli import datasets

    return {"cifar10": ARCHIVE_NAME, "cifar100": datasets.CIFAR100.archive}.get(
        data_cfg.dataset, TITLES.get(data_cfg.dataset, data_cfg.dataset)
    )


def image_shape(data_cfg: DataConfig) -> tuple[int, int, int]:
    """One image's shape (C, H, W) in the data set `data_cfg` names, from the config alone (nothing read):
    CIFAR-10/100 (3, 32, 32), MNIST and Fashion-MNIST (1, 28, 28), ``folder`` ``data.image_size``."""
    name = _known(data_cfg.dataset)
    if name == "folder":
        from cnncli import images

        return images.check_image_size(tuple(data_cfg.image_size))
    return _STATIC_SHAPES[name]


def dataset_shape(data_cfg: DataConfig, folder: Path | None = None) -> tuple[tuple[int, int, int], int]:
    """(input shape (C, H, W), number of classes) of the data set `data_cfg` names, without loading it.

    Static for the downloadable sets: CIFAR-10 (3, 32, 32), 10; CIFAR-100 (3, 32, 32), 100 (``data.labels:
    fine``) or 20 (``coarse``); MNIST and Fashion-MNIST (1, 28, 28), 10. For ``folder``: ``data.image_size``
    and the number of class sub-folders of `folder` (default ``data.dir``), which is listed (no image read).

    Raises
    ------
    ConfigError
        Unknown data set, a bad ``data.image_size``, or ``folder`` without a folder.
    DataError
        The folder is missing or has no class sub-folders.
    """
    name = _known(data_cfg.dataset)
    shape = image_shape(data_cfg)
    if name == "folder":
        from cnncli import images

        root = folder if folder is not None else resolve_data_dir(None, data_cfg.dir, dataset="folder")
        return shape, len(images.folder_classes(Path(root)))
    if name == "cifar100":
        from cnncli import datasets

        return shape, datasets.CIFAR100_FINE if data_cfg.labels == "fine" else datasets.CIFAR100_COARSE
    return shape, NUM_CLASSES  # cifar10, mnist, fashion-mnist: 10 classes each


def ensure_dataset(
    data_cfg: DataConfig,
    target_dir: Path,
    progress: Callable[[int, int | None], None] | None = None,
    **options: Any,
) -> Path:
    """The folder `load_dataset` reads, downloading the data set into `target_dir` first if needed.

    `target_dir` comes from ``resolve_data_dir(cli_dir, data_cfg.dir, data_cfg.dataset)``. An existing copy
    is used as is (no network, nothing written). Otherwise CIFAR-10/CIFAR-100 are downloaded and extracted
    (`ensure_cifar10`, `cnncli.datasets.ensure_archive_set`) and the MNISTs' four files fetched
    (`cnncli.datasets.ensure_idx_set`) from `dataset_url(data_cfg)` or the official mirrors: resumed, md5-checked,
    under the download limits of `cnncli.download.limits_from_env`. For ``folder`` nothing is downloaded:
    `target_dir` is checked to be a folder with class sub-folders, and Pillow to be installed.

    Parameters
    ----------
    data_cfg : DataConfig
        ``cfg.data``.
    target_dir : Path
        The data folder.
    progress : callable, optional
        ``progress(done_bytes, total_bytes_or_None)`` during downloads (per file for the MNISTs).
    **options
        Passed to the downloader: retries, backoff, timeout, limits (and md5 / size / md5s in tests).

    Raises
    ------
    DataError
        One line naming the URL or file and what the user can do.
    """
    name = _known(data_cfg.dataset)
    url = dataset_url(data_cfg)
    if name == "cifar10":
        return ensure_cifar10(Path(target_dir), url, progress, **options)
    if name == "folder":
        from cnncli import images

        images.require_pillow()
        images.folder_classes(Path(target_dir))
        return Path(target_dir)
    from cnncli import datasets

    if name == "cifar100":
        return datasets.ensure_archive_set(datasets.CIFAR100, Path(target_dir), url, progress, **options)
    return datasets.ensure_idx_set(_idx_source(name), Path(target_dir), url, progress, **options)


def load_dataset(data_cfg: DataConfig, folder: Path, *, train: bool = True, test: bool = True) -> Dataset:
    """Load the data set `data_cfg` names from `folder` (from `ensure_dataset`). Reads only, executes nothing.

    Parameters
    ----------
    data_cfg : DataConfig
        ``cfg.data``: the data set, ``labels`` (CIFAR-100), ``image_size`` (folder).
    folder : Path
        The extracted / downloaded folder, or the image folder.
    train, test : bool
        Which parts to read; a part not requested comes back as empty arrays (0, C, H, W) / (0,).

    Returns
    -------
    Dataset
        uint8 images (N, C, H, W) with (C, H, W) = `dataset_shape(data_cfg)[0]`, int64 labels, class names.

    Raises
    ------
    DataError
        A missing, unreadable, damaged or tampered file (named), or labels out of range.
    """
    name = _known(data_cfg.dataset)
    folder = Path(folder)
    if name == "cifar10":
        return load_cifar10(folder, train=train, test=test)
    if name == "folder":
        from cnncli import images

        tx, ty, vx, vy, classes = images.load_image_folder(folder, data_cfg.image_size, train=train, test=test)
        return Dataset(train_x=tx, train_y=ty, test_x=vx, test_y=vy, classes=classes)
    from cnncli import datasets

    if name == "cifar100":
        return datasets.load_cifar100(folder, labels=data_cfg.labels, train=train, test=test)
    return datasets.load_idx_set(_idx_source(name), folder, train=train, test=test)


# --------------------------------------------------------------------------------------- normalisation


def compute_normalization(train_x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images on the [0, 1] scale (pixel / 255).

    A 256-bin histogram n(v) per channel is counted in chunks of `chunk` images (no float copy of the
    images); with N pixels, S1 = Σ v·n(v) and S2 = Σ v²·n(v) as exact integers, mean = S1 / (255 N) and
    std = sqrt(N·S2 − S1²) / (255 N): the population standard deviation over every pixel of every image, with
    one rounding each (a constant channel gets exactly 0).

    Parameters
    ----------
    train_x : np.ndarray
        uint8 (N, C, H, W), N >= 1.

    Returns
    -------
    (mean, std) : tuple of C floats each
    """
    if train_x.dtype != np.uint8 or train_x.ndim != 4 or len(train_x) == 0:
        raise DataError(f"normalisation statistics need uint8 images (N, C, H, W), N >= 1; got {train_x.shape} "
                        f"{train_x.dtype}")
    channels = train_x.shape[1]
    counts = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(train_x), chunk):
        block = train_x[start : start + chunk]
        for c in range(channels):
            counts[c] += np.bincount(block[:, c].ravel(), minlength=256)
    means, stds = [], []
    for row in counts.tolist():  # Python ints: N·S2 exceeds int64 for large sets
        n = sum(row)
        s1 = sum(v * k for v, k in enumerate(row))
        s2 = sum(v * v * k for v, k in enumerate(row))
        means.append(s1 / (255 * n))
        stds.append(math.sqrt(n * s2 - s1 * s1) / (255 * n))
    return tuple(means), tuple(stds)


def resolve_normalization(data_cfg: DataConfig, train_x: np.ndarray) -> DataConfig:
    """`data_cfg` unchanged unless ``data.normalize: auto``; then a copy whose ``normalize`` is a
    `NormalizeConfig` with the mean and std of `train_x` (`compute_normalization`), to be stored and reused.

    Raises
    ------
    DataError
        A channel whose training pixels are all equal (std 0: nothing to normalise by).
    """
    if data_cfg.normalize != "auto":
        return data_cfg
    from cnncli.config import NormalizeConfig

    mean, std = compute_normalization(train_x)
    flat = [c for c, s in enumerate(std) if s == 0.0]
    if flat:
        raise DataError(
            f"data.normalize: auto: channel {flat[0]} of the {len(train_x)} training images is constant "
            f"(value {mean[flat[0]] * 255:.0f}), so its std is 0; give data.normalize.mean and std instead"
        )
    return dataclasses.replace(data_cfg, normalize=NormalizeConfig(mean=mean, std=std))


def normalization_for(data_cfg: DataConfig, folder: Path, seed: int) -> Any:
    """The `NormalizeConfig` to use: ``data.normalize`` itself, or for ``auto`` the statistics of the
    training split (`load_dataset` train part, then `make_splits` with ``data.limit``, ``data.val_size`` and
    `seed`, as training does). For commands that get a config that was not resolved by a run."""
    if data_cfg.normalize != "auto":
        return data_cfg.normalize
    ds = load_dataset(data_cfg, folder, train=True, test=False)
    splits = make_splits(ds.train_x, ds.train_y, val_size=data_cfg.val_size, limit=data_cfg.limit, seed=seed)
    return resolve_normalization(data_cfg, splits.train_x).normalize


# ----------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    """Training images and the held-out validation images.

    Attributes
    ----------
    train_x : np.ndarray
        uint8 (N - V, 3, 32, 32).
    train_y : np.ndarray
        int64 (N - V,).
    val_x : np.ndarray
        uint8 (V, 3, 32, 32); (0, 3, 32, 32) when val_size is 0.
    val_y : np.ndarray
        int64 (V,).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray


def make_splits(
    train_x: np.ndarray, train_y: np.ndarray, *, val_size: int, limit: int | None, seed: int
) -> Splits:
    """Apply ``data.limit`` then hold out ``data.val_size`` images for validation.

    Parameters
    ----------
    train_x : np.ndarray
        (N, ...) images; uint8 (N, 3, 32, 32) for CIFAR-10.
    train_y : np.ndarray
        (N,) labels.
    val_size : int
        Images held out, chosen by a permutation seeded with `seed` (0 = no validation set).
    limit : int or None
        Keep only the first `limit` images before splitting (None = all; a limit above N keeps all N).
    seed : int
        Seed of the validation permutation; the same seed gives the same split.

    Returns
    -------
    Splits
        Both parts keep the original order of the images. With ``val_size == 0`` the training arrays are
        views (no copy), otherwise copies.

    Raises
    ------
    DataError
        `limit` below 1, `val_size` negative, or `val_size` not below the number of images left after
        `limit`; the message names ``data.limit`` / ``data.val_size`` and the value.
    """
    if len(train_x) != len(train_y):
        raise DataError(f"{len(train_x)} training images but {len(train_y)} labels")
    n = len(train_x)
    if limit is not None:
        if limit < 1:
            raise DataError(f"data.limit = {limit}: must be at least 1 (or null for all {n} images)")
        n = min(n, int(limit))
    x, y = train_x[:n], train_y[:n]
    if val_size < 0:
        raise DataError(f"data.val_size = {val_size}: must be 0 or more")
    if val_size == 0:
        return Splits(train_x=x, train_y=y, val_x=x[:0], val_y=y[:0])
    if val_size >= n:
        limited = f" after data.limit = {limit}" if limit is not None and limit < len(train_x) else ""
        raise DataError(
            f"data.val_size = {val_size} leaves no training images: only {n} are available{limited}"
        )
    order = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(order[:val_size])
    train_idx = np.sort(order[val_size:])
    return Splits(train_x=x[train_idx], train_y=y[train_idx], val_x=x[val_idx], val_y=y[val_idx])


def check_labels(raw: Any, path: Path, key: str, count: int, classes: int) -> np.ndarray:
    """`raw` (a list or array from a data file) as int64 (count,) with values in 0..classes-1."""
    try:
        y = np.asarray(raw)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: {key!r} is not a list of integers ({_download.one_line(e)})") from e
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
    names = _get(record, key, path)
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

"""Every data set through one door: where its folder is (`resolve_data_dir`), getting it (`ensure_dataset`),
its shape without reading it (`dataset_shape`) and loading it (`load_dataset` -> `Dataset`), dispatching on
``data.dataset`` to `cifar10`, `cifar100`, `mnist` and `images` (an image folder) of this package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnncli.catalogue import TITLES, URL_ENV, image_shape, known
from cnncli.data import cifar10, cifar100, images, mnist
from cnncli.data.loading import Dataset
from cnncli.host.errors import ConfigError

if TYPE_CHECKING:
    from cnncli.config import DataConfig


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


def dataset_url(data_cfg: DataConfig) -> str | None:
    """The mirror to download from: ``$CNNCLI_<SET>_URL`` (`URL_ENV`) > ``data.url`` > None (official)."""
    env = URL_ENV.get(data_cfg.dataset)
    return (os.environ.get(env) if env else None) or data_cfg.url or None


def download_label(data_cfg: DataConfig) -> str:
    """What a download progress bar is called: the archive's name, or the data set's title."""
    return {"cifar10": cifar10.ARCHIVE_NAME, "cifar100": cifar100.CIFAR100.archive}.get(
        data_cfg.dataset, TITLES.get(data_cfg.dataset, data_cfg.dataset)
    )


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
    name = known(data_cfg.dataset)
    shape = image_shape(data_cfg.dataset, data_cfg.image_size)
    if name == "folder":
        root = folder if folder is not None else resolve_data_dir(None, data_cfg.dir, dataset="folder")
        return shape, len(images.folder_classes(Path(root)))
    if name == "cifar100":
            return shape, cifar100.CIFAR100_FINE if data_cfg.labels == "fine" else cifar100.CIFAR100_COARSE
    return shape, cifar10.NUM_CLASSES  # cifar10, mnist, fashion-mnist: 10 classes each


def ensure_dataset(
    data_cfg: DataConfig,
    target_dir: Path,
    progress: Callable[[int, int | None], None] | None = None,
    **options: Any,
) -> Path:
    """The folder `load_dataset` reads, downloading the data set into `target_dir` first if needed.

    `target_dir` comes from ``resolve_data_dir(cli_dir, data_cfg.dir, data_cfg.dataset)``. An existing copy
    is used as is (no network, nothing written). Otherwise CIFAR-10/CIFAR-100 are downloaded and extracted
    (`ensure_cifar10`, `cnncli.data.cifar100.ensure_archive_set`) and the MNISTs' four files fetched
    (`cnncli.data.mnist.ensure_idx_set`) from `dataset_url(data_cfg)` or the official mirrors: resumed, md5-checked,
    under the download limits of `cnncli.data.download.limits_from_env`. For ``folder`` nothing is downloaded:
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
    name = known(data_cfg.dataset)
    url = dataset_url(data_cfg)
    if name == "cifar10":
        return cifar10.ensure_cifar10(Path(target_dir), url, progress, **options)
    if name == "folder":
        images.require_pillow()
        images.folder_classes(Path(target_dir))
        return Path(target_dir)
    if name == "cifar100":
        return cifar100.ensure_archive_set(cifar100.CIFAR100, Path(target_dir), url, progress, **options)
    return mnist.ensure_idx_set(mnist.source(name), Path(target_dir), url, progress, **options)


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
    name = known(data_cfg.dataset)
    folder = Path(folder)
    if name == "cifar10":
        return cifar10.load_cifar10(folder, train=train, test=test)
    if name == "folder":
        tx, ty, vx, vy, classes = images.load_image_folder(folder, data_cfg.image_size, train=train, test=test)
        return Dataset(train_x=tx, train_y=ty, test_x=vx, test_y=vy, classes=classes)
    if name == "cifar100":
        return cifar100.load_cifar100(folder, labels=data_cfg.labels, train=train, test=test)
    return mnist.load_idx_set(mnist.source(name), folder, train=train, test=test)




def builtin_classes(dataset: str) -> tuple[str, ...] | None:
    """The class names of a built-in data set whose names are fixed (cifar10, mnist, fashion-mnist), in label
    order; None for the others (cifar100's names come with its files, a folder set's from its sub-folders)."""
    return {"cifar10": cifar10.CLASSES, "mnist": mnist.MNIST.classes,
            "fashion-mnist": mnist.FASHION_MNIST.classes}.get(dataset)

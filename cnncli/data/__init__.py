"""The data layer: every data set (its folder, download, safe loading), splits and normalisation statistics, and
the preprocessing of a batch. Nothing here prints; nothing here knows about networks.

This package's names are the entry points the rest of cnncli uses; each lives in a module of its own:
`sets` (one door for every data set), `cifar10`, `cifar100`, `mnist`, `images` (image folders), `loading`
(`Dataset`, the restricted unpickler, record checks), `download` (HTTP mechanics), `idx`, `splits`,
`normalize`, `preprocess`.
"""

from cnncli.catalogue import DOWNLOADABLE, TITLES, image_shape
from cnncli.data.cifar10 import ensure_cifar10, find_extracted, load_batch, load_cifar10, load_classes
from cnncli.data.loading import Dataset
from cnncli.data.normalize import compute_normalization, normalization_for, resolve_normalization
from cnncli.data.sets import (
    dataset_shape,
    dataset_url,
    default_cache_dir,
    download_label,
    ensure_dataset,
    load_dataset,
    resolve_data_dir,
)
from cnncli.data.splits import Splits, make_splits

__all__ = [
    "DOWNLOADABLE", "TITLES", "Dataset", "Splits", "compute_normalization", "dataset_shape", "dataset_url",
    "default_cache_dir", "download_label", "ensure_cifar10", "ensure_dataset", "find_extracted", "image_shape",
    "load_batch", "load_cifar10", "load_classes", "load_dataset", "make_splits", "normalization_for",
    "resolve_data_dir", "resolve_normalization",
]

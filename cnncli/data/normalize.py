"""Normalisation statistics: the per-channel mean and std of the training images (``data.normalize: auto``),
computed once and stored in the run's config.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnncli.config import NormalizeConfig
from cnncli.data.sets import load_dataset
from cnncli.data.splits import make_splits
from cnncli.host.errors import DataError

if TYPE_CHECKING:
    from cnncli.config import DataConfig


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



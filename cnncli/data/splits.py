"""The training split: ``data.limit`` applied, then ``data.val_size`` images held out for validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnncli.host.errors import DataError


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

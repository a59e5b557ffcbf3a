"""Augmentation (random crop of the zero-padded image, random horizontal flip) and normalization.

Crops are checked by brute force: every output image must equal one of the (2p+1)² windows of the zero-padded
input, flipped or not. Over a large batch of coordinate-coded images the offset and the flip of each output are
decoded exactly, so the flip frequency and the spread of offsets can be counted.
"""

from __future__ import annotations

import numpy as np
import pytest

from cnncli.config import AugmentConfig, NormalizeConfig
from cnncli.data.preprocess import Normalizer, augment
from cnncli.host.errors import ConfigError


def _matches(out: np.ndarray, img: np.ndarray, p: int) -> list[tuple[int, int, bool]]:
    """All (dy, dx, flipped) with out == window (dy, dx) of the zero-padded img, flipped or not."""
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * p, w + 2 * p), dtype=img.dtype)
    padded[:, p : p + h, p : p + w] = img
    found = []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            window = padded[:, dy : dy + h, dx : dx + w]
            if np.array_equal(out, window):
                found.append((dy, dx, False))
            if np.array_equal(out, window[:, :, ::-1]):
                found.append((dy, dx, True))
    return found


@pytest.mark.parametrize("p", [4, 2])
def test_each_output_is_a_window_of_the_padded_image(p: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(1, 256, size=(8, 3, 32, 32), dtype=np.uint8)  # no zeros: padding is recognisable
    before = x.copy()
    out = augment(x, AugmentConfig(flip=True, crop_padding=p), np.random.default_rng(7))
    assert out.shape == x.shape and out.dtype == np.uint8
    assert np.array_equal(x, before), "the input batch must not be modified"
    for i in range(len(x)):
        found = _matches(out[i], x[i], p)
        assert len(found) == 1, f"image {i}: {found}"  # random pixels: exactly one window fits


def test_crop_and_flip_cover_offsets_and_flip_about_half() -> None:
    """Coordinate-coded images: channel 0 = row + 1, channel 1 = column + 1, so each output reveals its window."""
    p, n = 4, 4000
    rows, cols = np.meshgrid(np.arange(1, 33), np.arange(1, 33), indexing="ij")
    img = np.stack([rows, cols, np.full((32, 32), 200)]).astype(np.uint8)
    x = np.broadcast_to(img, (n, 3, 32, 32)).copy()
    out = augment(x, AugmentConfig(flip=True, crop_padding=p), np.random.default_rng(123))
    # Centre pixel (16, 16) is always inside the image (|offset − p| ≤ 4): its row value is 16 + dy − p + 1.
    dy = out[:, 0, 16, 16].astype(int) - 13
    flipped = out[:, 1, 16, 17].astype(int) - out[:, 1, 16, 16].astype(int) < 0
    # Output column 16 is window column 16 (or 15 when flipped): value = col + dx − p + 1.
    dx = out[:, 1, 16, 16].astype(int) - np.where(flipped, 12, 13)
    assert dy.min() == 0 and dy.max() == 2 * p and dx.min() == 0 and dx.max() == 2 * p
    # Every one of the 81 offsets occurs (expected ~49 times each out of 4000).
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) == (2 * p + 1) ** 2
    # Flips: about half (σ of the fraction ≈ 0.008).
    assert 0.45 < flipped.mean() < 0.55
    # And every image equals exactly the decoded window (vectorised brute-force check).
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ii = np.arange(32)
    expect = padded[np.arange(n)[:, None, None, None], np.arange(3)[None, :, None, None],
                    (dy[:, None, None, None] + ii[None, None, :, None]),
                    (dx[:, None, None, None] + ii[None, None, None, :])]
    expect[flipped] = expect[flipped][..., ::-1]
    assert np.array_equal(out, expect)


def test_flip_only_and_crop_only() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(1, 256, size=(200, 3, 8, 8), dtype=np.uint8)
    out = augment(x, AugmentConfig(flip=True, crop_padding=0), np.random.default_rng(0))
    same = np.all(out == x, axis=(1, 2, 3))
    mirrored = np.all(out == x[..., ::-1], axis=(1, 2, 3))
    assert np.all(same ^ mirrored)
    assert 0.3 < mirrored.mean() < 0.7
    out = augment(x, AugmentConfig(flip=False, crop_padding=1), np.random.default_rng(0))
    for i in range(10):
        assert all(not f for _, _, f in _matches(out[i], x[i], 1)) and _matches(out[i], x[i], 1)
    assert not np.array_equal(out, x)  # some crop moved something


def test_no_augmentation_is_an_unchanged_copy() -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(5, 3, 32, 32), dtype=np.uint8)
    out = augment(x, AugmentConfig(flip=False, crop_padding=0), np.random.default_rng(0))
    assert np.array_equal(out, x)
    assert out is not x and not np.shares_memory(out, x)


def test_same_rng_state_same_batch() -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(16, 3, 32, 32), dtype=np.uint8)
    cfg = AugmentConfig()
    a = augment(x, cfg, np.random.default_rng([0, 1, 2]))
    b = augment(x, cfg, np.random.default_rng([0, 1, 2]))
    c = augment(x, cfg, np.random.default_rng([0, 1, 3]))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_normalizer_matches_hand_formula() -> None:
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    norm = Normalizer(NormalizeConfig(mean=mean, std=std), 3)
    x = np.random.default_rng(0).integers(0, 256, size=(4, 3, 5, 6), dtype=np.uint8)
    got = norm(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    expect = np.empty(x.shape, dtype=np.float64)
    for c in range(3):
        expect[:, c] = (x[:, c] / 255.0 - mean[c]) / std[c]
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)
    # A few values by hand: pixel 0 in channel 0 -> −0.1/0.5 = −0.2; 255 in channel 2 -> 0.7/0.2 = 3.5
    corners = norm(np.array([[[[0]], [[255]], [[255]]]], dtype=np.uint8))
    np.testing.assert_allclose(corners.ravel(), [-0.2, 3.2, 3.5], rtol=1e-6)


def test_normalizer_wrong_channel_count() -> None:
    with pytest.raises(ConfigError, match="data.normalize"):
        Normalizer(NormalizeConfig(mean=(0.5, 0.5), std=(0.5, 0.5)), 3)

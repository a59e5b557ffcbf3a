"""Per-batch image preparation: augmentation on uint8 images and normalization to float32.

Images stay uint8 (N, 3, 32, 32) in memory; each batch is augmented and converted on its way to the model.
Everything is vectorised over the batch.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnncli.config import AugmentConfig, NormalizeConfig

FLIP_STREAM = 2**40  # the alternating flips' key [seed, FLIP_STREAM]: no epoch number reaches it


def alternating_flips(seed: int, epoch: int, n: int) -> np.ndarray:
    """Which of n training images (by their index in the training split) are flipped in `epoch` (0-based)
    under flip_mode: alternate: a random half, drawn once from the seed, in the even epochs, the other images
    in the odd ones. (n,) bool."""
    first = np.random.default_rng([seed, FLIP_STREAM]).random(n) < 0.5
    return first if epoch % 2 == 0 else ~first


def augment(x: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator, flips: np.ndarray | None = None
            ) -> np.ndarray:
    """Random crop (after padding by crop_padding with zeros, or with the image mirrored at its border for
    pad_mode: reflect) and horizontal flip: a coin per image, or the given `flips` (B,) bool (alternating flips).

    x (B, C, H, W) uint8 -> (B, C, H, W) uint8, a new array. Draws, in this order: crop offsets (B, 2), then
    flip coins (B,) (none when `flips` is given), so a given rng state always gives the same batch.
    """
    b, _, h, w = x.shape
    p = cfg.crop_padding
    if p:
        mode = "reflect" if cfg.pad_mode == "reflect" else "constant"
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode=mode)
        offsets = rng.integers(0, 2 * p + 1, size=(b, 2))
        windows = sliding_window_view(padded, (h, w), axis=(2, 3))  # (B, C, 2p+1, 2p+1, H, W), a view
        x = windows[np.arange(b), :, offsets[:, 0], offsets[:, 1]]  # (B, C, H, W)
    else:
        x = x.copy()
    if cfg.flip:
        flip = flips if flips is not None else rng.random(b) < 0.5
        x[flip] = x[flip, :, :, ::-1]
    return x


class Normalizer:
    """uint8 pixels -> float32 (x/255 − mean) / std per channel: x · scale + shift, one fused pass."""

    def __init__(self, cfg: NormalizeConfig, channels: int) -> None:
        mean = np.asarray(cfg.mean, dtype=np.float64)
        std = np.asarray(cfg.std, dtype=np.float64)
        if mean.shape != (channels,) or std.shape != (channels,):
            from cnncli.host.errors import ConfigError

            raise ConfigError(
                f"data.normalize: mean and std need {channels} values (one per input channel), "
                f"got {len(mean)} and {len(std)}"
            )
        self.scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(1, channels, 1, 1)
        self.shift = (-mean / std).astype(np.float32).reshape(1, channels, 1, 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (B, C, H, W) uint8 -> (B, C, H, W) float32."""
        out = x.astype(np.float32)
        out *= self.scale
        out += self.shift
        return out

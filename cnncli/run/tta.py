"""Test-time augmentation: the logits of a few transformed views of each image, averaged (airbench's scheme).

Levels (`train.tta`, `cnn eval --tta`, `cnn predict --tta`):

- none: z(x);
- mirror: ½·z(x) + ½·z(x⃖), x⃖ the image mirrored left to right;
- mirror-translate: ½·m(x) + ¼·m(x shifted by (+1, +1)) + ¼·m(x shifted by (−1, −1)), m the mirror average and
  a shift the image reflect-padded by one pixel and cut back to its size one pixel off-centre (6 views).

The views are of the normalised input (N, C, H, W); reflect padding commutes with the per-channel
normalisation, so it does not matter which comes first. Logits, not probabilities, are averaged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TTA_LEVELS = ("none", "mirror", "mirror-translate")


def shifted(x: np.ndarray, di: int, dj: int) -> np.ndarray:
    """x (N, C, H, W) moved by (di, dj) ∈ {−1, 0, 1}² pixels (content towards larger indices for +1), the
    uncovered border filled by reflection: out[…, i, j] = x[…, mirror(i − di), mirror(j − dj)]."""
    h, w = x.shape[2:]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    return padded[:, :, 1 - di : 1 - di + h, 1 - dj : 1 - dj + w]


def tta_logits(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, level: str) -> np.ndarray:
    """The averaged logits (N, K) of `level`'s views of x (N, C, H, W); `predict` maps a batch to its logits."""
    if level not in TTA_LEVELS:
        raise ValueError(f"test-time augmentation must be one of {', '.join(TTA_LEVELS)}, got {level!r}")
    if level == "none":
        return predict(x)

    def mirrored(v: np.ndarray) -> np.ndarray:
        return 0.5 * predict(v) + 0.5 * predict(np.ascontiguousarray(v[..., ::-1]))

    z = mirrored(x)
    if level == "mirror":
        return z
    plus = mirrored(np.ascontiguousarray(shifted(x, 1, 1)))
    minus = mirrored(np.ascontiguousarray(shifted(x, -1, -1)))
    return 0.5 * z + 0.25 * plus + 0.25 * minus

"""Data-dependent initialisation: a conv layer's weights set from training images before the first step.

A conv with `whiten: N` (N > 0) starts as a whitening filter bank (docs/derivations.md#whitening-initialisation):
with the K×K×C_in patches p of the layer's inputs for the first N training images (every window at stride 1,
no padding), the second-moment matrix Σ = (1/M) Σ_m p_m p_mᵀ (d × d, d = C_in·K·K) and its eigenpairs
(λ_i, v_i) in decreasing order, filter i is v_i / √(λ_i + ε) and filter d + i its negative. The layer's
outputs for such patches then have second moments λ_i / (λ_i + ε) ≈ 1 and no correlation between filters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnncli.nn.layer import Layer
from cnncli.nn.layers import Conv2D

CHUNK = 500  # images per pass: Σ is summed chunk by chunk (5,000 images' 2×2 patches in float64 would be 460 MB)


def patch_matrix(x: np.ndarray, k: int) -> np.ndarray:
    """x (N, C, H, W) -> the patches (N·(H−K+1)·(W−K+1), C·K·K), each row ordered (c', u, v) like W[c] flattened."""
    win = sliding_window_view(x, (k, k), axis=(2, 3))  # (N, C, H', W', K, K)
    n, c, ho, wo = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k)


def second_moment(chunks: Iterator[np.ndarray], k: int) -> np.ndarray:
    """Σ = (1/M) Σ_m p_m p_mᵀ over every K×K patch p_m of every chunk (N_j, C, H, W), in float64."""
    total, count = None, 0
    for x in chunks:
        p = patch_matrix(np.asarray(x, dtype=np.float64), k)
        part = p.T @ p
        total = part if total is None else total + part
        count += p.shape[0]
    if total is None or count == 0:
        raise ValueError("no images to compute the whitening from")
    return total / count


def whitening_weights(sigma: np.ndarray, c_in: int, k: int, eps: float) -> np.ndarray:
    """W (2d, C_in, K, K) from the patch second moments Σ (d × d): filter i = v_i / √(λ_i + ε) for the
    eigenpairs in decreasing order of λ, filter d + i = −filter i."""
    lam, vec = np.linalg.eigh(sigma)  # ascending
    lam, vec = lam[::-1], vec[:, ::-1]
    filters = (vec / np.sqrt(lam + eps)).T.reshape(-1, c_in, k, k)
    return np.concatenate([filters, -filters])


def whitened_layers(layers: list[Layer]) -> list[int]:
    """Indices of the layers that ask for a whitening init."""
    return [i for i, layer in enumerate(layers) if isinstance(layer, Conv2D) and getattr(layer, "whiten", 0) > 0]


def initialise_from_data(layers: list[Layer], images: Callable[[int, int], np.ndarray]) -> list[str]:
    """Set the weights of every conv with `whiten: N` from the first N training images; returns their names.

    `images(start, stop)` gives the normalised training images [start, stop) (N_j, C, H, W). A layer deeper in
    the network gets its own inputs: the images through the layers before it, in evaluation mode (running
    statistics untouched), restoring every layer's mode afterwards."""
    done = []
    for i in whitened_layers(layers):
        conv = layers[i]
        assert isinstance(conv, Conv2D)
        n = conv.whiten

        def chunks(n: int = n, before: list[Layer] = layers[:i]) -> Iterator[np.ndarray]:
            modes = [layer.training for layer in before]
            try:
                for layer in before:
                    layer.train(False)
                for start in range(0, n, CHUNK):
                    x = images(start, min(n, start + CHUNK))
                    for layer in before:
                        x = layer.forward(x)
                    yield x
            finally:
                for layer, mode in zip(before, modes, strict=True):
                    layer.train(mode)

        sigma = second_moment(chunks(), conv.kernel_size)
        w = whitening_weights(sigma, conv.in_channels, conv.kernel_size, conv.whiten_eps)
        conv.params["W"][...] = w.astype(conv.params["W"].dtype)
        done.append(conv.name)
    return done

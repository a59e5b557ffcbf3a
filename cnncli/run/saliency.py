"""δX, the gradient of the loss with respect to the input, taken back to the pixels: saliency maps (`cnn saliency`).

The network is run on its per-layer reference path (each layer's own `forward` / `backward`, cnncli/nn/layers.py)
in evaluation mode (batch-norm's running statistics, no dropout), so δX is the article's last equation
computed by the same code `cnn trace` and `cnn gradcheck` check. The network's input X is the normalised
image; the pixels U ∈ [0, 1] reach it through X = (U − μ) / σ per channel, so by the chain rule
(docs/derivations.md#input-gradient-and-pixels)

    δU[c, x, y] = ∂L/∂U[c, x, y] = δX[c, x, y] / σ_c.

L is the article's loss for one image, −log p_t, with t the class asked about (the predicted one unless told):
δz = p − onehot(t). Each image's gradient is its own (in evaluation mode the images of a batch do not meet).

Maps (one image, (H, W)):
- saliency: max_c |δU[c]| (Simonyan et al. 2014): how much a small change of that pixel changes L;
- SmoothGrad (Smilkov et al. 2017): the mean of δU over `samples` copies of U with Gaussian noise of
  standard deviation `noise` (pixel units, the noisy copies are not clipped to [0, 1]), then max_c |·|;
- gradient × input: Σ_c U[c] · (−δU[c]), signed: > 0 where the pixel's value pushes the class's log-probability
  up (the first-order change of log p_t from a black image at that pixel).

Library code: returns arrays, never prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cnncli.config import NormalizeConfig
from cnncli.host.errors import ConfigError
from cnncli.nn.layers import softmax
from cnncli.nn.model import Sequential

BATCH = 100  # images per per-layer pass (bounds the memory the backward caches hold)


@dataclass(frozen=True)
class PixelScale:
    """The normalisation X = (U − μ) / σ per channel, U the pixels in [0, 1]; mean, std (C,) float64."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, normalize: NormalizeConfig, channels: int) -> PixelScale:
        mean = np.asarray(normalize.mean, dtype=np.float64)
        std = np.asarray(normalize.std, dtype=np.float64)
        if mean.shape != (channels,) or std.shape != (channels,):
            raise ConfigError(f"data.normalize: mean and std need {channels} values (one per input channel), "
                              f"got {mean.size} and {std.size}")
        return cls(mean, std)

    def to_input(self, u: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Pixels U (N, C, H, W) in [0, 1] -> the network's input X = (U − μ)/σ, as `dtype`."""
        c = (1, -1, 1, 1)
        return ((np.asarray(u, dtype=np.float64) - self.mean.reshape(c)) / self.std.reshape(c)).astype(dtype)

    def to_pixels_grad(self, dx: np.ndarray) -> np.ndarray:
        """δX (N, C, H, W) -> δU = δX / σ per channel (float64)."""
        return np.asarray(dx, dtype=np.float64) / self.std.reshape(1, -1, 1, 1)


@dataclass(frozen=True)
class InputGradient:
    """One pass over N images: loss L_n = −log p_n[t_n] (N,), probabilities p (N, K), and δU = ∂L_n/∂U_n
    (N, C, H, W) on the pixel scale (float64)."""

    loss: np.ndarray
    p: np.ndarray
    grad: np.ndarray


def input_gradient(model: Sequential, scale: PixelScale, u: np.ndarray, target: np.ndarray,
                   batch: int = BATCH, on_batch: Callable[[int], None] | None = None) -> InputGradient:
    """∂L/∂U of each image, L = −log softmax(z)[target], through the model's own backward in evaluation mode.

    u (N, C, H, W) pixels (float, normally in [0, 1]); target (N,) class indices; `on_batch(k)` after each
    batch of k images (progress). The model's parameter gradients are overwritten (a by-product of its
    backward); its mode and `needs_input_grad` are restored.
    """
    u = np.asarray(u, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    n = len(u)
    k = int(model.output_shape[0])
    if target.shape != (n,) or (n and not (0 <= target.min() and target.max() < k)):
        raise ConfigError(f"target classes must be {n} indices in 0..{k - 1}")
    dtype = model.dtype
    losses, probs, grads = np.empty(n), np.empty((n, k)), np.empty(u.shape)
    first = model.layers[0].needs_input_grad
    model.set_input_grad(True)
    try:
        with model.evaluating():
            for a in range(0, n, batch):
                b = min(n, a + batch)
                z = np.asarray(model.forward(scale.to_input(u[a:b], dtype)), dtype=np.float64)
                p = softmax(z)
                rows = np.arange(b - a)
                losses[a:b] = -np.log(np.maximum(p[rows, target[a:b]], np.finfo(np.float64).tiny))
                dz = p.copy()
                dz[rows, target[a:b]] -= 1.0  # δz = p − y for each image's own loss (no 1/N: one loss per image)
                dx = model.backward(dz.astype(dtype))
                assert dx is not None  # set_input_grad(True): the first layer computes δX
                grads[a:b] = scale.to_pixels_grad(dx)
                probs[a:b] = p
                if on_batch is not None:
                    on_batch(b - a)
    finally:
        model.layers[0].needs_input_grad = first
    return InputGradient(losses, probs, grads)


def predict_proba(model: Sequential, scale: PixelScale, u: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """Pixels U (N, C, H, W) -> p (N, K), per-layer forward in evaluation mode (the same path as the gradient)."""
    u = np.asarray(u)
    with model.evaluating():
        parts = [softmax(np.asarray(model.forward(scale.to_input(u[a:a + batch], model.dtype)), dtype=np.float64))
                 for a in range(0, len(u), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, int(model.output_shape[0])))


@dataclass(frozen=True)
class Saliency:
    """Saliency of N images for classes `target` (N,).

    pixels (N, C, H, W) in [0, 1]; p (N, K); loss (N,) = −log p[target]; grad (N, C, H, W) = δU;
    smooth (N, C, H, W) the SmoothGrad mean of δU over `samples` noisy copies (None when samples = 0).
    """

    pixels: np.ndarray
    target: np.ndarray
    p: np.ndarray
    loss: np.ndarray
    grad: np.ndarray
    smooth: np.ndarray | None
    samples: int
    noise: float

    @property
    def heat(self) -> np.ndarray:
        """max_c |δU| (N, H, W)."""
        return np.abs(self.grad).max(axis=1)

    @property
    def smooth_heat(self) -> np.ndarray | None:
        """max_c |mean of δU over the noisy copies| (N, H, W), or None."""
        return None if self.smooth is None else np.abs(self.smooth).max(axis=1)

    @property
    def grad_x_input(self) -> np.ndarray:
        """Σ_c U[c] · (−δU[c]) (N, H, W): signed, > 0 where the pixel supports the class."""
        return -(self.pixels * self.grad).sum(axis=1)


def saliency(model: Sequential, scale: PixelScale, pixels: np.ndarray, target: np.ndarray | None = None,
             samples: int = 0, noise: float = 0.15, seed: int = 0) -> Saliency:
    """δU and the maps of `Saliency` for pixels (N, C, H, W) in [0, 1]; target (N,) classes, default the
    predicted ones. SmoothGrad when samples > 0: noise ~ N(0, noise²) per pixel, from default_rng(seed)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if target is None:
        target = predict_proba(model, scale, pixels).argmax(axis=1)
    target = np.asarray(target, dtype=np.int64)
    g = input_gradient(model, scale, pixels, target)
    smooth = None
    if samples > 0:
        if not noise >= 0:
            raise ConfigError(f"--noise: must be at least 0, got {noise}")
        rng = np.random.default_rng(seed)
        total = np.zeros(pixels.shape)
        for _ in range(samples):
            noisy = pixels + rng.normal(0.0, noise, size=pixels.shape)
            total += input_gradient(model, scale, noisy, target).grad
        smooth = total / samples
    return Saliency(pixels, target, g.p, g.loss, g.grad, smooth, int(samples), float(noise))

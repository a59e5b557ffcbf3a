"""Pictures of what the gradients do (the optional `viz` extra): saliency grids, adversarial examples,
gradient flow over a run's epochs, a layer's filters and feature maps.

Same rules as cnncli/run/plot.py: matplotlib imported lazily through `cnncli.run.plot.require_matplotlib`, the Agg
canvas, every PNG written atomically; each picture titled in the notation of docs/derivations.md, with units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnncli.run.plot import _new_figure, _save, mosaic

if TYPE_CHECKING:  # pragma: no cover
    from cnncli.run.attack import AttackResult
    from cnncli.run.gradflow import FlowRecord
    from cnncli.run.saliency import Saliency


def _rgb(u: np.ndarray) -> np.ndarray:
    """Pixels (C, H, W) in [0, 1] -> an imshow array (H, W, 3) or (H, W) for one channel, clipped to [0, 1]."""
    return np.clip(np.moveaxis(u, 0, -1).squeeze(-1) if u.shape[0] == 1 else np.moveaxis(u, 0, -1), 0, 1)


def _show_pixels(ax: Any, u: np.ndarray, title: str) -> None:
    ax.imshow(_rgb(u), cmap="gray" if u.shape[0] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def saliency_png(s: Saliency, names: Sequence[str], classes: Sequence[str], labels: Sequence[int | None],
                 path: Path, title: str = "") -> Path:
    """One row per image: U; max_c |δU| as a heat map; the heat map over the image; SmoothGrad (when computed);
    gradient × input Σ_c U(−δU) (red: supports the class, blue: against it). Each map has its own colour scale."""
    n = len(s.pixels)
    cols = 4 + (s.smooth is not None)
    fig = _new_figure((2.55 * cols + 0.6, 2.6 * n + 0.9), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    heat, smooth, gxi = s.heat, s.smooth_heat, s.grad_x_input
    for i in range(n):
        t = int(s.target[i])
        pred = int(np.argmax(s.p[i]))
        truth = f"true {classes[labels[i]]}\n" if labels[i] is not None else ""
        _show_pixels(axes[i, 0], s.pixels[i], f"U: {_short(names[i])}\n{truth}pred. {classes[pred]} "
                     f"(p = {s.p[i, pred]:.2f})")
        row = [("inferno", heat[i], f"max_c |δU|, t = {classes[t]}\nL = −log p_t = {s.loss[i]:.3g}", False)]
        if smooth is not None:
            row.append(("inferno", smooth[i], f"SmoothGrad: max_c |mean δU|\n{s.samples} samples, σ = {s.noise:g}",
                        False))
        row.append(("RdBu_r", gxi[i], "gradient × input\nΣ_c U ⊙ (−δU)", True))
        c = 1
        for cmap, m, text, signed in row[:1]:
            _heat(axes[i, c], m, cmap, text, signed)
            c += 1
        ax = axes[i, c]
        grey = s.pixels[i].mean(axis=0)
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.imshow(heat[i] / (heat[i].max() or 1.0), cmap="inferno", alpha=0.6, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("max_c |δU| over U (grey)\nscaled to its maximum", fontsize=8)
        c += 1
        for cmap, m, text, signed in row[1:]:
            _heat(axes[i, c], m, cmap, text, signed)
            c += 1
    fig.suptitle(title or "Saliency δU = ∂L/∂U = δX/σ (pixels U ∈ [0, 1]; evaluation mode)", fontsize=10)
    return _save(fig, path)


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def _heat(ax: Any, m: np.ndarray, cmap: str, title: str, signed: bool) -> None:
    if signed:
        lim = float(np.abs(m).max()) or 1.0
        im = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
        label = "nats per pixel unit"
    else:
        im = ax.imshow(m, cmap=cmap, vmin=0, vmax=float(m.max()) or 1.0, interpolation="nearest")
        label = "|∂L/∂U| (nats per pixel unit)"
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    cb = ax.figure.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
    cb.ax.tick_params(labelsize=6)
    cb.set_label(label, fontsize=6)


def attack_png(clean: np.ndarray, p_clean: np.ndarray, result: AttackResult, picks: Sequence[int], labels: np.ndarray,
               classes: Sequence[str], path: Path, title: str = "") -> Path:
    """One row per picked image: U (clean) with its prediction, the perturbation Δ = U_adv − U magnified to
    fill the grey scale (0.5 + Δ/2ε; mid-grey = unchanged), U_adv with its prediction."""
    n = len(picks)
    fig = _new_figure((8.4, 2.5 * n + 0.9), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    eps = result.eps or 1.0
    for r, i in enumerate(picks):
        y = int(labels[i])
        pc, pa = int(np.argmax(p_clean[i])), int(np.argmax(result.p[i]))
        _show_pixels(axes[r, 0], clean[i], f"U: true {classes[y]}\npredicted {classes[pc]} (p = {p_clean[i, pc]:.2f})")
        delta = result.adv[i] - clean[i]
        _show_pixels(axes[r, 1], 0.5 + delta / (2 * eps),
                     f"Δ = U_adv − U, ×{1 / (2 * eps):.0f} + ½\n‖Δ‖∞ = {np.abs(delta).max() * 255:.2f}/255")
        mark = "✓" if pa == y else "✗"
        _show_pixels(axes[r, 2], result.adv[i], f"U_adv: predicted {classes[pa]} (p = {result.p[i, pa]:.2f}) {mark}\n"
                     f"p_true {p_clean[i, y]:.2f} → {result.p[i, y]:.2f}")
    fig.suptitle(title or f"{result.method}, ε = {result.eps * 255:g}/255", fontsize=10)
    return _save(fig, path)


def gradflow_png(records: Sequence[FlowRecord], path: Path, title: str = "") -> Path:
    """Four panels over the epochs: ‖∂L/∂θ‖ per parameter tensor (log scale), ‖Δθ‖/‖θ‖ per tensor (log scale,
    1e-3 marked), the fraction of dead units per ReLU output, and the per-step training loss."""
    fig = _new_figure((14, 8.2), layout="constrained")
    (ax_g, ax_u), (ax_d, ax_l) = fig.subplots(2, 2)
    epochs = np.array([r.epoch for r in records])
    names = list(dict.fromkeys(k for r in records for k in r.params))
    marker = "o" if len(records) <= 30 else None
    for j, name in enumerate(names):
        colour = plt_colour(j, len(names))
        g = [r.params[name]["grad_norm"] if name in r.params else math.nan for r in records]
        u = [r.params[name]["update_ratio"] if name in r.params else math.nan for r in records]
        ax_g.plot(epochs, g, marker=marker, ms=3, color=colour, label=name)
        ax_u.plot(epochs, u, marker=marker, ms=3, color=colour, label=name)
    ax_g.set_yscale("log")
    ax_g.set_title("gradient flow: ‖∂L/∂θ‖ per parameter tensor (epoch mean over steps)", fontsize=10)
    ax_g.set_ylabel("‖δθ‖₂ (L2 norm)")
    ax_u.set_yscale("log")
    ax_u.axhline(1e-3, color="grey", ls=":", lw=1)
    ax_u.set_title("update / weight: ‖Δθ‖/‖θ‖ per step (epoch mean of sampled steps; colours as left; ⋯ 1e-3)",
                   fontsize=10)
    ax_u.set_ylabel("ratio")
    relus = list(dict.fromkeys(k for r in records for k in r.dead))
    for j, name in enumerate(relus):
        d = [100 * r.dead[name]["fraction"] if name in r.dead else math.nan for r in records]
        units = next(r.dead[name]["units"] for r in records if name in r.dead)
        ax_d.plot(epochs, d, marker=marker, ms=3, color=plt_colour(j, len(relus)), label=f"{name} ({units} units)")
    ax_d.set_title("dead units: never > 0 on any training image of the epoch", fontsize=10)
    ax_d.set_ylabel("dead units (%)")
    ax_d.set_ylim(bottom=-2, top=max(10.0, ax_d.get_ylim()[1]))
    steps = [(s, loss) for r in records for s, loss in r.loss_steps]
    if steps:
        s_arr, l_arr = np.array(steps).T
        ax_l.plot(s_arr, l_arr, lw=0.8, color="tab:red", marker="." if len(steps) < 200 else None, ms=3)
        per_epoch = max(1, records[-1].steps_per_epoch)
        for e in epochs[:-1]:
            ax_l.axvline(e * per_epoch, color="grey", lw=0.5, ls=":")
    ax_l.set_title("training loss L of single steps (a bounded sample per epoch; ⋯ epoch ends)", fontsize=10)
    ax_l.set_xlabel("optimizer step")
    ax_l.set_ylabel("cross-entropy L (nats)")
    for ax in (ax_g, ax_u, ax_d):
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (ax_g, ax_u, ax_d, ax_l):
        ax.grid(alpha=0.3)
    for ax in (ax_g, ax_d):
        if ax.lines:
            ax.legend(fontsize=7, ncol=2 if len(ax.lines) > 8 else 1)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plt_colour(j: int, n: int) -> Any:
    import matplotlib

    return matplotlib.colormaps["tab10" if n <= 10 else "tab20"](j % 20)


def layer_png(weights: np.ndarray | None, w_tex: str, maps: np.ndarray, map_tex: str, image: np.ndarray,
              layer: str, path: Path, title: str = "", strongest: np.ndarray | None = None) -> Path:
    """A conv layer's filters W[c, c′, u, v] and its feature maps for one image.

    First layer on RGB: each filter as a colour patch, rescaled to its own range. Deeper: for each output
    channel c the kernel of the input channel c′ with the largest ‖W[c, c′]‖ (its strongest input), on one
    diverging scale. Feature maps: every channel, one scale. `strongest` (C_out,) the chosen c′ per filter."""
    cols = 8
    blocks = 1 + (weights is not None)
    fm_rows = math.ceil(maps.shape[0] / cols)
    w_rows = math.ceil(weights.shape[0] / cols) if weights is not None else 0
    fig = _new_figure((14, 1.6 + 0.8 * max(fm_rows, w_rows, 3)), layout="constrained")
    gs = fig.add_gridspec(1, blocks + 1, width_ratios=[0.45] + [1] * blocks)
    ax = fig.add_subplot(gs[:, 0])
    _show_pixels(ax, image, "U (the image)")
    col = 1
    import matplotlib

    cm = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
    if weights is not None:
        ax = fig.add_subplot(gs[:, col])
        col += 1
        if weights.shape[1] == 3 and strongest is None:
            lo = weights.min(axis=(1, 2, 3), keepdims=True)
            span = weights.max(axis=(1, 2, 3), keepdims=True) - lo
            rgb = np.moveaxis((weights - lo) / np.where(span > 0, span, 1), 1, -1)
            ax.imshow(mosaic(rgb, cols=cols, fill=1.0), interpolation="nearest")
            how = "as RGB, each rescaled to its own range"
        else:
            assert strongest is not None
            k = weights[np.arange(weights.shape[0]), strongest]  # (C_out, K, K)
            lim = float(np.abs(k).max()) or 1.0
            im = ax.imshow(mosaic(k, cols=cols), cmap=cm, vmin=-lim, vmax=lim, interpolation="nearest")
            fig.colorbar(im, ax=ax, shrink=0.6, label="weight")
            how = "per filter c its strongest input channel c′ = argmax ‖W[c, c′]‖"
        ax.set_axis_off()
        ax.set_title(f"${w_tex}$ of {layer}: {weights.shape[0]} filters {'×'.join(map(str, weights.shape[1:]))}\n"
                     f"{how}", fontsize=9)
    ax = fig.add_subplot(gs[:, col])
    vm = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    lo, hi = float(maps.min()), float(maps.max())
    im = ax.imshow(mosaic(maps, cols=cols), cmap=vm, vmin=lo, vmax=hi if hi > lo else lo + 1,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.6, label="activation")
    ax.set_axis_off()
    ax.set_title(f"${map_tex}$ of {layer}: {'×'.join(map(str, maps.shape))} (channel c at row c // 8, column c % 8)",
                 fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)

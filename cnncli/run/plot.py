"""Pictures (the optional `viz` extra, matplotlib): learning curves, confusion matrix, a trace's tensors.

matplotlib is imported lazily, inside the functions, and only through its object-oriented API with the Agg
canvas (no pyplot, no global backend switch, no display needed). Without it, `require_matplotlib` raises
`VizUnavailable`, one line saying what to install. Reading `metrics.csv` needs no matplotlib.

Every writer saves atomically (temp file + rename, `cnncli.host.atomic.atomic_write`) and returns the path.
"""

from __future__ import annotations

import csv
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnncli.host.atomic import atomic_write
from cnncli.host.errors import CnnError, StorageError, os_reason
from cnncli.host.files import read_regular

if TYPE_CHECKING:  # pragma: no cover
    from cnncli.nn.trace import Trace

INSTALL_HINT = "matplotlib is not installed; pictures need the viz extra: pip install 'cnncli[viz]'"
DPI = 110


class VizUnavailable(CnnError):
    """matplotlib is missing: the message says what to install."""


class RunFolderError(CnnError):
    """A run folder or its metrics.csv is missing or unreadable; the message names the file."""


def require_matplotlib() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg) classes of matplotlib; VizUnavailable (one line) when it is not installed."""
    try:
        import matplotlib  # noqa: F401  (imported first: a stub or a missing package fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise VizUnavailable(INSTALL_HINT) from None
    return Figure, FigureCanvasAgg


def _new_figure(figsize: tuple[float, float], **kwargs: Any) -> Any:
    figure_cls, canvas_cls = require_matplotlib()
    fig = figure_cls(figsize=figsize, dpi=DPI, **kwargs)
    canvas_cls(fig)  # the Agg canvas renders the PNG
    return fig


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=DPI)
    except StorageError:  # names the path and the reason already (a device or FIFO refused, a full disk)
        raise
    except OSError as e:
        raise CnnError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


# --------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metrics:
    """metrics.csv as arrays, one entry per epoch; NaN where a value is absent (no validation set)."""

    epoch: np.ndarray  # (E,) int
    train_loss: np.ndarray  # (E,)
    train_acc: np.ndarray  # (E,) in [0, 1]
    val_loss: np.ndarray  # (E,)
    val_acc: np.ndarray  # (E,)
    lr: np.ndarray  # (E,) the learning rate of each epoch's last step

    @property
    def has_validation(self) -> bool:
        return bool(np.isfinite(self.val_acc).any())


MAX_METRICS_BYTES = 16 * 1024**2  # one line of about 150 bytes per epoch: 100,000 epochs fit many times over
REQUIRED_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def read_metrics(run_dir: Path) -> Metrics:
    """Read `run_dir/metrics.csv` (written by `cnn train`); RunFolderError names the folder or file and the fault."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunFolderError(f"{run_dir}: run folder not found")
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: not a folder (give the run folder that cnn train wrote)")
    path = run_dir / "metrics.csv"
    try:
        text = read_regular(path, MAX_METRICS_BYTES, "metrics.csv").decode("utf-8")
    except FileNotFoundError:
        raise RunFolderError(f"{path}: not found (cnn train writes it after every epoch)") from None
    except StorageError as e:  # a FIFO, device or folder (NotRegularFile); larger than MAX_METRICS_BYTES (TooLarge)
        raise RunFolderError(str(e)) from None
    except OSError as e:
        raise RunFolderError(f"{path}: cannot read: {os_reason(e)}") from None
    except UnicodeDecodeError as e:
        raise RunFolderError(f"{path}: not UTF-8 text (byte {e.start}); not a metrics file") from None
    reader = csv.DictReader(text.splitlines())
    try:
        return _parse_metrics(reader, path)
    except csv.Error as e:  # a field beyond csv's limit (128 KiB), a NUL byte: damage, said in one line
        raise RunFolderError(f"{path}: line {reader.line_num + 1}: not a metrics file ({e})") from None


def _parse_metrics(reader: csv.DictReader, path: Path) -> Metrics:
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise RunFolderError(f"{path}: not a metrics file, missing column(s) {', '.join(missing)}")
    cols: dict[str, list[float]] = {c: [] for c in REQUIRED_COLUMNS}
    for row in reader:
        line = reader.line_num
        for c in REQUIRED_COLUMNS:
            raw = (row.get(c) or "").strip()
            if not raw and c.startswith("val_"):
                cols[c].append(math.nan)
                continue
            try:
                value = float(raw)
            except ValueError:
                raise RunFolderError(f"{path}: line {line}: {c} is {raw!r}, not a number") from None
            if not math.isfinite(value):
                raise RunFolderError(f"{path}: line {line}: {c} is {raw!r}, not a finite number")
            cols[c].append(value)
    if not cols["epoch"]:
        raise RunFolderError(f"{path}: no epochs recorded yet")
    return Metrics(
        epoch=np.array(cols["epoch"], dtype=np.int64),
        **{c: np.array(cols[c], dtype=np.float64) for c in REQUIRED_COLUMNS if c != "epoch"},
    )


# --------------------------------------------------------------------------------------------- figures


def learning_curves_png(metrics: Metrics, path: Path, title: str = "") -> Path:
    """Three panels against the epoch: loss and accuracy (train, and validation when present), learning rate."""
    fig = _new_figure((13, 3.8), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    e = metrics.epoch
    marker = "o" if len(e) <= 30 else None
    ax_loss.plot(e, metrics.train_loss, marker=marker, label="train")
    ax_acc.plot(e, 100 * metrics.train_acc, marker=marker, label="train")
    if metrics.has_validation:
        ax_loss.plot(e, metrics.val_loss, marker=marker, label="validation")
        ax_acc.plot(e, 100 * metrics.val_acc, marker=marker, label="validation")
        best = int(np.nanargmax(metrics.val_acc))
        ax_acc.annotate(f"best {100 * metrics.val_acc[best]:.1f}%", (e[best], 100 * metrics.val_acc[best]),
                        textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax_lr.plot(e, metrics.lr, marker=marker, color="tab:green")
    for ax, name in ((ax_loss, "cross-entropy loss"), (ax_acc, "accuracy (%)"), (ax_lr, "learning rate")):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.margins(y=0.15)
    ax_loss.legend()
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def confusion_png(confusion: np.ndarray, classes: tuple[str, ...], path: Path, title: str = "") -> Path:
    """The confusion matrix (K, K) of counts, rows the true class, columns the prediction; names on both axes."""
    k = len(classes)
    fig = _new_figure((7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    totals = confusion.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(totals > 0, confusion / np.maximum(totals, 1), 0.0)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for t in range(k):
        for p in range(k):
            ax.text(p, t, str(int(confusion[t, p])), ha="center", va="center", fontsize=8,
                    color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    acc = float(np.trace(confusion)) / max(int(confusion.sum()), 1)
    ax.set_title(f"{title + ' — ' if title else ''}accuracy {100 * acc:.2f}% ({int(confusion.sum()):,} images)")
    return _save(fig, path)


def mosaic(maps: np.ndarray, cols: int = 8, gap: int = 1, fill: float = np.nan) -> np.ndarray:
    """Tile maps (C, H, W[, 3]) into one image, `cols` per row, `gap` pixels of `fill` between them.

    -> (rows·(H+gap)−gap, cols·(W+gap)−gap[, 3]) with rows = ⌈C / cols⌉; channel c at row c // cols, column c % cols.
    """
    c, h, w = maps.shape[:3]
    cols = max(1, min(cols, c))
    rows = math.ceil(c / cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, *maps.shape[3:]), fill, dtype=np.float64)
    for i in range(c):
        r, q = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = maps[i]
    return out


def _channel_grid(ax: Any, maps: np.ndarray, title: str, diverging: bool, cols: int = 8) -> None:
    """Draw maps (C, H, W) as one mosaic of its C channels, one colour scale for all, with a colour bar."""
    if diverging:
        lim = float(np.abs(maps).max()) or 1.0
        cmap, lo, hi = "RdBu_r", -lim, lim
    else:
        lo, hi = float(maps.min()), float(maps.max())
        cmap, hi = "viridis", (hi if hi > lo else lo + 1)
    import matplotlib

    cm = matplotlib.colormaps[cmap].with_extremes(bad="white")
    im = ax.imshow(mosaic(maps, cols), cmap=cm, vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(im, ax=ax, shrink=0.8, pad=0.02)


MAX_TRACE_MAPS = 6  # feature-map tensors drawn in full; a network with more gets one per conv block
MAX_TRACE_BLOCKS = 4  # conv blocks drawn for a deeper network (first, last, evenly spread between)
MAX_TRACE_CHANNELS = 32  # channels drawn per tensor (the strongest on this image when there are more)


def trace_selection(trace: Trace) -> tuple[list[Any], str]:
    """The feature-map steps `trace_png` draws, and a sentence saying how they were chosen.

    Up to MAX_TRACE_MAPS 3-D forward tensors: all of them (the seed network: S¹, A¹, P¹). More (cifar-deep
    has 15): one per conv block — the last image tensor before the next conv or the flatten (P¹, A², P³, P⁴),
    the block's output — and of those at most MAX_TRACE_BLOCKS, the first and the last always."""
    maps = [s for s in trace.forward if s.value.ndim == 3 and s.key != "X"]
    if len(maps) <= MAX_TRACE_MAPS:
        return maps, "every feature map of the network"
    blocks: list[list[Any]] = []
    for s in maps:
        if s.key.startswith("S") and s.key[1:].isdigit() or not blocks:
            blocks.append([])
        blocks[-1].append(s)
    outs = [b[-1] for b in blocks]
    if len(outs) > MAX_TRACE_BLOCKS:
        idx = sorted({round(i * (len(outs) - 1) / (MAX_TRACE_BLOCKS - 1)) for i in range(MAX_TRACE_BLOCKS)})
        outs = [outs[i] for i in idx]
    names = ", ".join(s.symbol.text for s in outs)
    return outs, (f"{len(maps)} feature maps: drawn is each conv block's output ({names}), "
                  f"≤ {MAX_TRACE_CHANNELS} channels each, the largest ‖·‖ on this image")


def _strongest(value: np.ndarray, k: int) -> np.ndarray:
    """Indices (sorted) of the k channels of value (C, H, W) with the largest L2 norm; all when C ≤ k."""
    c = value.shape[0]
    if c <= k:
        return np.arange(c)
    norms = np.sqrt((value.reshape(c, -1) ** 2).sum(axis=1))
    return np.sort(np.argsort(-norms, kind="stable")[:k])


def _filters(ax: Any, w: np.ndarray, tex: str, gradient: bool) -> None:
    """Conv filters W (C_out, C_in, K, K): RGB patches for 3 input channels, else the mean over input channels.
    A gradient is drawn on one symmetric scale for all filters (grey = 0), weights each on their own range."""
    ax.set_axis_off()
    if w.shape[1] == 3:
        if gradient:
            lim = float(np.abs(w).max()) or 1.0
            rgb = np.moveaxis(0.5 + w / (2 * lim), 1, -1)
            how = f"as RGB, grey = 0, full colour = ±{lim:.2g}"
        else:
            lo = w.min(axis=(1, 2, 3), keepdims=True)
            span = w.max(axis=(1, 2, 3), keepdims=True) - lo
            rgb = np.moveaxis((w - lo) / np.where(span > 0, span, 1), 1, -1)  # (C_out, K, K, 3)
            how = "each rescaled to its own range, as RGB"
        ax.imshow(mosaic(rgb, cols=8, fill=1.0), interpolation="nearest")
    else:
        lim = float(np.abs(w).max()) or 1.0
        ax.imshow(mosaic(w.mean(axis=1), cols=8), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        how = "mean over input channels"
    ax.set_title(f"${tex}$: {w.shape[0]} filters {'×'.join(map(str, w.shape[1:]))} ({how})", fontsize=10)


def trace_png(trace: Trace, path: Path, title: str = "") -> Path:
    """The input image X, the first conv layer's filters W¹ and their gradient δW¹, the input gradient δX as a
    saliency map, the probabilities p (true class marked), then feature maps beside their gradients.

    Feature maps are 3-D tensors of the forward pass, chosen by `trace_selection`, each drawn as a mosaic of its
    channels (8 per row, viridis, one scale per tensor) beside δ of it (red/blue, 0 white).
    """
    maps, how_chosen = trace_selection(trace)
    picks = [_strongest(s.value, MAX_TRACE_CHANNELS) for s in maps]
    grads = {s.key: s for s in trace.backward}
    filters = next((s for s in trace.parameters if s.value.ndim == 4), None)
    d_filters = grads.get("d" + filters.key) if filters is not None else None
    # inches: three top rows, then each mosaic (8 channels per row, ~6 in wide) plus its title
    heights = [2.4, 2.4, 2.2] + [0.6 + 6.0 * math.ceil(len(c) / 8) * s.shape[1] / (8 * s.shape[2])
                                 for s, c in zip(maps, picks, strict=True)]
    fig = _new_figure((14, 0.5 + sum(heights)), layout="constrained")
    axes = fig.subplots(len(heights), 2, height_ratios=heights, squeeze=False,
                        gridspec_kw={"width_ratios": [1, 1]})

    ax = axes[0, 0]
    x = trace["X"].value
    if trace.image is not None and trace.image.ndim == 3 and trace.image.shape[0] in (1, 3):
        ax.imshow(np.moveaxis(trace.image, 0, -1).squeeze(), interpolation="nearest",
                  cmap="gray" if trace.image.shape[0] == 1 else None)
        what = "raw pixels"
    else:
        lo, hi = float(x.min()), float(x.max())
        ax.imshow(np.moveaxis((x - lo) / (hi - lo or 1), 0, -1).squeeze(), interpolation="nearest")
        what = "normalised, rescaled"
    ax.set_axis_off()
    pred = trace.top[0][1]
    ax.set_title(f"X ({what}) · true: {trace.classes[trace.label]}, predicted: {pred}", fontsize=10)
    if filters is not None:
        _filters(axes[0, 1], filters.value, filters.symbol.tex, gradient=False)
    else:
        axes[0, 1].set_axis_off()

    ax = axes[1, 0]
    if "dX" in trace:
        dx = trace["dX"].value
        sal = np.abs(dx).max(axis=0) if dx.ndim == 3 else np.abs(dx)
        im = ax.imshow(sal, cmap="inferno", vmin=0, vmax=float(sal.max()) or 1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02, label="|∂L/∂X| (nats per unit of X)")
        ax.set_title(r"saliency $\max_c |\delta X[c]|$ (δX: the input's gradient)", fontsize=10)
    ax.set_axis_off()
    if d_filters is not None:
        _filters(axes[1, 1], d_filters.value, d_filters.symbol.tex, gradient=True)
    else:
        axes[1, 1].set_axis_off()

    ax = axes[2, 0]
    p = trace["p"].value
    k = len(p)
    colours = ["tab:green" if c == trace.label else "tab:grey" for c in range(k)]
    ax.bar(range(k), p, color=colours)
    ax.set_xticks(range(k), trace.classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    best = int(np.argmax(p))
    ax.annotate(f"{p[best]:.2f}", (best, p[best]), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8)
    ax.set_title(f"p = softmax(z) (green: the true class, {trace.classes[trace.label]}, "
                 f"p = {p[trace.label]:.3f}); L = −log p_true = {trace.loss:.3g}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[2, 1]
    ax.set_axis_off()
    ax.text(0, 0.5, "\n".join(textwrap.wrap(f"Feature maps below: {how_chosen}.", 70)), fontsize=9, va="center",
            transform=ax.transAxes)

    for row, (s, chans) in enumerate(zip(maps, picks, strict=True), start=3):
        shape = "×".join(map(str, s.shape))
        sub = "" if len(chans) == s.shape[0] else f", channels shown: {len(chans)} strongest"
        _channel_grid(axes[row, 0], s.value[chans], f"${s.symbol.tex}$  {shape}{sub}  ({s.citation})",
                      diverging=False)
        g = grads.get("d" + s.key)
        if g is not None:
            _channel_grid(axes[row, 1], g.value[chans], f"${g.symbol.tex}$  {shape}  ({g.citation})", diverging=True)
        else:
            axes[row, 1].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, path)


# ------------------------------------------------------------------------------------ several runs


@dataclass(frozen=True)
class CurveBand:
    """One group's curve over epochs: mean and sample standard deviation over its runs (seeds)."""

    epoch: np.ndarray  # (E,) epochs that at least one run reached
    mean: np.ndarray  # (E,)
    std: np.ndarray  # (E,) 0 where a single run has the epoch
    count: np.ndarray  # (E,) runs that reached each epoch


def band(curves: list[tuple[np.ndarray, np.ndarray]]) -> CurveBand:
    """Pool (epochs (E_i,), values (E_i,)) of several runs per epoch; NaN values (no validation) are left out."""
    per: dict[int, list[float]] = {}
    for epochs, values in curves:
        for e, v in zip(epochs.tolist(), values.tolist(), strict=True):
            if math.isfinite(v):
                per.setdefault(int(e), []).append(float(v))
    es = sorted(per)
    vals = [np.array(per[e]) for e in es]
    return CurveBand(
        epoch=np.array(es, dtype=np.int64),
        mean=np.array([v.mean() for v in vals]),
        std=np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]),
        count=np.array([len(v) for v in vals], dtype=np.int64),
    )


def compare_curves_png(groups: list[tuple[str, list[Metrics]]], path: Path, title: str = "") -> Path:
    """Overlay the learning curves of groups of runs (label, the runs' metrics): per group the mean over its
    runs (seeds) as a line and mean ± one sample standard deviation as a band. Panels: validation accuracy,
    validation loss and training loss against the epoch (training accuracy instead when no run validated)."""
    has_val = any(m.has_validation for _, ms in groups for m in ms)
    panels = [("val_acc", "validation accuracy (%)", 100.0), ("val_loss", "validation loss", 1.0)] if has_val else \
        [("train_acc", "training accuracy (%)", 100.0)]
    panels.append(("train_loss", "training loss", 1.0))
    fig = _new_figure((4.6 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, (label, ms) in enumerate(groups):
        colour = f"C{i % 10}"
        for ax, (column, _, scale) in zip(axes, panels, strict=True):
            b = band([(m.epoch, getattr(m, column)) for m in ms])
            if not len(b.epoch):
                continue
            n = int(b.count.max())
            ax.plot(b.epoch, scale * b.mean, color=colour, marker="o" if len(b.epoch) <= 30 else None, ms=3,
                    label=f"{label} ({n} run{'s' if n > 1 else ''})")
            if n > 1:
                ax.fill_between(b.epoch, scale * (b.mean - b.std), scale * (b.mean + b.std), color=colour, alpha=0.2,
                                linewidth=0)
    for ax, (_, name, _) in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "mean ± sample std over seeds")
    return _save(fig, path)

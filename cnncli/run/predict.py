"""Classify arrays and image files with a checkpoint: the library behind `cnn predict` and `cnncli.load`.

A `Classifier` is a checkpoint's network (evaluation mode) with what it needs to take raw images: its input
shape, the normalisation it was trained with (``data.normalize`` of the stored config) and the class names
(stored by `cnn train`; for a checkpoint without them, a built-in data set's names when its config names
one (cifar10, mnist, fashion-mnist), else class indices "0", "1", …). Image files are decoded by
`cnncli.data.images.decode_image` (EXIF orientation, grey or RGB as the network takes, scaled to cover the input
and centre-cropped), so a PNG of a data set image gives exactly the pixels the data loader gives.
No output here: `classify_files` yields results, the CLI renders them.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnncli import engine
from cnncli.config import NormalizeConfig
from cnncli.data.preprocess import Normalizer
from cnncli.host.errors import CheckpointError, CnnError, DataError, os_reason
from cnncli.nn.layers import softmax
from cnncli.nn.model import Sequential
from cnncli.run.checkpoint import open_checkpoint
from cnncli.run.tta import tta_logits


@dataclass(frozen=True)
class Prediction:
    """The `k` most probable classes of one image file, most probable first."""

    file: str
    top: tuple[tuple[str, float], ...]  # (class name, probability)

    def to_dict(self) -> dict[str, Any]:
        """``{"file": …, "top": [{"class": "cat", "p": 0.71}, …]}``; p is the float32 probability, written with
        the fewest digits that give it back exactly."""
        return {"file": self.file, "top": [{"class": c, "p": float(str(np.float32(p)))} for c, p in self.top]}


@dataclass(frozen=True)
class Failure:
    """An input that gave no prediction: a file that does not decode, a pattern that matches nothing."""

    file: str
    message: str  # one line that names the file


class Classifier:
    """A trained network that classifies images.

    Attributes
    ----------
    model : Sequential
        The network, run in evaluation mode (batch-norm's running statistics, no dropout).
    input_shape : (C, H, W)
        One image's shape.
    classes : tuple of str
        The class names, index = class (K of them).
    normalize : NormalizeConfig
        Per-channel mean and std on the [0, 1] pixel scale, applied for you.
    batch_size : int
        Images per forward pass (the checkpoint's ``train.eval_batch_size``).
    tta : str
        Test-time augmentation, "none", "mirror" or "mirror-translate" (the checkpoint's ``train.tta``).
    """

    def __init__(
        self,
        model: Sequential,
        normalize: NormalizeConfig,
        classes: Sequence[str] = (),
        batch_size: int = 1000,
        source: str = "model",
    ) -> None:
        k = model.output_shape[0]
        if classes and len(classes) != k:
            raise CheckpointError(f"{source}: stores {len(classes)} class names but the network gives {k} outputs")
        self.model = model
        self.input_shape: tuple[int, ...] = tuple(model.input_shape)
        self.classes: tuple[str, ...] = tuple(classes) if classes else tuple(str(i) for i in range(k))
        self.normalize = normalize
        self.batch_size = int(batch_size)
        self.source = source
        self.tta = "none"  # test-time augmentation (cnncli/run/tta.py); a checkpoint's train.tta by default
        self._normalizer = Normalizer(normalize, self.input_shape[0])
        std = np.asarray(normalize.std, dtype=np.float64)
        channels = (1, self.input_shape[0], 1, 1)
        self._float_scale = (1.0 / std).astype(np.float32).reshape(channels)
        self._float_shift = (-np.asarray(normalize.mean, dtype=np.float64) / std).astype(np.float32).reshape(channels)

    @classmethod
    def from_checkpoint(cls, path: Path | str) -> Classifier:
        """The network of a `.npz` checkpoint with its weights; CheckpointError names the file and what is wrong.
        A checkpoint that uses layers of your own needs their file registered first
        (`cnncli.nn.registry.load_layer_file`, what ``--layers`` does)."""
        path = Path(path)
        ckpt, model = open_checkpoint(path)
        cfg = ckpt.config
        if not isinstance(cfg.data.normalize, NormalizeConfig):
            raise CheckpointError(
                f"{path}: data.normalize is {cfg.data.normalize!r}, not resolved to a mean and std; a checkpoint "
                "written by cnn train stores them"
            )
        classes = ckpt.classes
        if not classes:  # weights saved without names: a built-in data set's names are known
            from cnncli.data.sets import builtin_classes

            named = builtin_classes(cfg.data.dataset)
            classes = named if named and len(named) == model.output_shape[0] else ()
        classifier = cls(model.eval(), cfg.data.normalize, classes, cfg.train.eval_batch_size, str(path))
        classifier.tta = cfg.train.tta
        return classifier

    # ---- arrays -------------------------------------------------------------------------------------------
    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Images -> the network's float32 input (N, C, H, W), normalised.

        x: uint8 (N, C, H, W) pixels 0..255, or float (N, C, H, W) pixels in [0, 1]; DataError for another
        shape, dtype or range.
        """
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(
                f"images of shape {tuple(x.shape)}: the network takes (N, {', '.join(map(str, self.input_shape))}) "
                "(N images of (C, H, W))"
            )
        if x.dtype == np.uint8:
            return self._normalizer(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise DataError(f"images of dtype {x.dtype}: expected uint8 pixels (0..255) or floats in [0, 1]")
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise DataError(
                f"float images must hold pixels in [0, 1], got values in [{np.nanmin(x):g}, {np.nanmax(x):g}]"
                + ("; divide 0..255 pixels by 255 or pass them as uint8" if np.nanmax(x) > 1 else "")
            )
        out = x.astype(np.float32)
        out *= self._float_scale
        out += self._float_shift
        return out

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Images (see `prepare`) (N, C, H, W) -> class scores z (N, K) float32, in batches of `batch_size`."""
        inputs = self.prepare(x)
        k = len(self.classes)
        if not len(inputs):
            return np.zeros((0, k), dtype=np.float32)
        parts = [tta_logits(lambda v: engine.predict(self.model, v), inputs[i : i + self.batch_size], self.tta)
                 for i in range(0, len(inputs), self.batch_size)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Images (N, C, H, W) -> class probabilities p = softmax(z) (N, K) float32; each row sums to 1."""
        return softmax(self.logits(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Images (N, C, H, W) -> the most probable class of each, int64 (N,) (index into `classes`)."""
        return self.logits(x).argmax(axis=1)

    def top(self, proba: np.ndarray, k: int) -> list[tuple[tuple[str, float], ...]]:
        """p (N, K) -> for each row the `k` most probable (class name, p), most probable first (ties: lower
        class index first)."""
        k = max(1, min(int(k), proba.shape[1]))
        order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        return [tuple((self.classes[j], float(row[j])) for j in idx) for row, idx in zip(proba, order, strict=True)]

    # ---- files ------------------------------------------------------------------------------------------------
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) image files are decoded to; CnnError when the network's channels are neither 1 nor 3."""
        c, h, w = self.input_shape
        if c not in (1, 3):
            raise CnnError(f"{self.source}: the network takes {c}-channel images; image files give 1 (grey) or 3 (RGB)")
        return c, h, w

    def classify_files(self, files: Iterable[Path | Failure], k: int = 5) -> Iterator[Prediction | Failure]:
        """Each input (from `image_inputs`) -> its `Prediction` (the top `k` classes) or a `Failure`, in order.

        Images are decoded and classified `batch_size` at a time; a file that does not decode is a `Failure`
        naming it, and the others go on. `ImagesUnavailable` (Pillow missing) is raised before anything else.
        """
        from cnncli.data.images import decode_image, require_pillow

        require_pillow()
        shape = self.image_shape()
        batch: list[tuple[str, np.ndarray]] = []

        def flush() -> Iterator[Prediction]:
            if batch:
                proba = self.predict_proba(np.stack([x for _, x in batch]))
                yield from (Prediction(name, top) for (name, _), top in zip(batch, self.top(proba, k), strict=True))
                batch.clear()

        for item in files:
            if isinstance(item, Failure):
                yield from flush()
                yield item
                continue
            try:
                pixels = decode_image(item, shape)
            except DataError as e:
                yield from flush()
                yield Failure(str(item), str(e))
                continue
            batch.append((str(item), pixels))
            if len(batch) >= self.batch_size:
                yield from flush()
        yield from flush()

    def predict_files(self, paths: Sequence[str | Path], top_k: int = 5) -> list[Prediction | Failure]:
        """Image files, folders or glob patterns (`image_inputs`) -> one `Prediction` (the `top_k` classes) or
        `Failure` each, in order."""
        return list(self.classify_files(image_inputs(paths), top_k))


def image_inputs(args: Sequence[str | Path]) -> list[Path | Failure]:
    """The image files the command-line arguments name, in order, each file once.

    An existing file is taken as is (its content decides whether it is an image; a FIFO or device is a
    `Failure` when it is decoded, never read); a folder gives its PNG/JPEG files (by suffix, sub-folders
    included, symlinked sub-folders and hidden ones skipped, sorted); an argument that does not exist but holds
    a wildcard (``*``, ``?``, ``[``) is a glob pattern (``**`` spans folders without following symlinked ones, so
    a symlink loop is never walked round), its matches taken the same way. A path or pattern that names
    nothing, a folder without images or one that cannot be listed is a `Failure`, and the other arguments
    are still taken.
    """
    from cnncli.data.images import _image_files

    found: list[Path | Failure] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.realpath(path)  # one file reached through two links (or a link loop) is classified once
        if key not in seen:
            seen.add(key)
            found.append(path)

    def take(path: Path) -> bool:
        if path.is_dir():
            files = _image_files(path)
            for f in files:
                add(f)
            return bool(files)
        add(path)
        return True

    for raw in args:
        arg = str(raw)
        path = Path(arg)
        try:
            if path.exists() or path.is_symlink():
                if not take(path):
                    found.append(Failure(arg, f"{arg}: no PNG or JPEG files in this folder"))
            elif any(c in arg for c in "*?["):
                took = [take(Path(m)) for m in safe_glob(arg)]
                if not any(took):
                    found.append(Failure(arg, f"{arg}: no image file matches this pattern"))
            else:
                found.append(Failure(arg, f"{arg}: no such file or folder"))
        except CnnError as e:  # a folder that cannot be listed: this argument fails, the others go on
            found.append(Failure(arg, str(e)))
        except OSError as e:
            found.append(Failure(arg, f"{arg}: {os_reason(e)}"))
    return found


def safe_glob(pattern: str) -> list[str]:
    """The sorted paths `pattern` matches, as ``glob.glob(pattern, recursive=True)`` gives them, except that
    ``**`` never descends into a symlinked folder (Python's glob does: through a symlink loop it finds
    exponentially many paths) and skips hidden folders. Components without ``**`` match as glob matches them
    (a name starting with '.' only by a pattern starting with '.')."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return sorted(glob.glob(pattern))
    i = parts.index("**")
    prefix, rest = os.sep.join(parts[:i]), tuple(parts[i:])
    bases = [prefix] if prefix and not glob.has_magic(prefix) else sorted(glob.glob(prefix)) if prefix else [""]
    if pattern.startswith(os.sep) and not prefix:
        bases = [os.sep]
    found: set[str] = set()
    dotted = any(p.startswith(".") for p in rest)  # only a component naming a hidden entry looks into them
    for base in bases:
        top = base or os.curdir
        if not os.path.isdir(top):
            continue
        if base and _glob_match(rest, ()):  # 'dir/**' names dir/ itself too, as glob says
            found.add(os.path.join(base, ""))
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if dotted or not d.startswith("."))
            rel = os.path.relpath(dirpath, top)
            rel_parts = () if rel == os.curdir else tuple(rel.split(os.sep))
            for name in [*dirnames, *filenames]:
                if _glob_match(rest, (*rel_parts, name)):
                    found.add(os.path.join(base, *rel_parts, name) if base else os.path.join(*rel_parts, name))
    return sorted(found)


def _glob_match(pat: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether path components `parts` match pattern components `pat` (``**``: any number of components)."""
    memo: dict[tuple[int, int], bool] = {}

    def match(i: int, j: int) -> bool:
        if (i, j) not in memo:
            if i == len(pat):
                memo[i, j] = j == len(parts)
            elif pat[i] == "**":  # zero or more components, none of them hidden
                ends = [j]
                while ends[-1] < len(parts) and not parts[ends[-1]].startswith("."):
                    ends.append(ends[-1] + 1)
                memo[i, j] = any(match(i + 1, k) for k in ends)
            else:
                name = parts[j] if j < len(parts) else None
                memo[i, j] = (name is not None and (not name.startswith(".") or pat[i].startswith("."))
                              and fnmatch.fnmatchcase(name, pat[i]) and match(i + 1, j + 1))
        return memo[i, j]

    return match(0, 0)

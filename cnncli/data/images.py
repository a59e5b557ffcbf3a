"""Image files: decoding PNG/JPEG into the uint8 (C, H, W) arrays the models take, and `folder` data sets.

Needs Pillow, an optional extra (``pip install 'cnncli[images]'``); without it every function here raises
`ImagesUnavailable` (one line saying how to install it).

Decoding (`decode_image`, shared by the `folder` data set and by anything that classifies image files):
only PNG and JPEG are opened (the content decides, not the name); the EXIF orientation is applied; the
image is converted to 1 channel (``L``) or 3 (``RGB``; an alpha channel is dropped; 16-bit grey keeps its
high byte); when its size differs from the target it is scaled so that it covers the target and
centre-cropped (bilinear, antialiased, as `PIL.ImageOps.fit` does). An image already at the target size
keeps its exact pixels.

A `folder` data set is a directory with one sub-folder per class, like torchvision's ``ImageFolder``::

    DIR/train/<class>/**/*.png|jpg|jpeg     training images (validation comes out of these: data.val_size)
    DIR/test/<class>/**/*.png|jpg|jpeg      optional test images; every class here must exist in train/
or, when DIR has no ``train/`` sub-folder::

    DIR/<class>/**/*.png|jpg|jpeg           training images only; no test split

Class names are the sorted sub-folder names of the training folder (label = index in that order); inside a
class, files are taken in sorted path order, sub-folders included. Hidden files and folders (names starting
with ".") and files of other types (by suffix) are ignored. A PNG/JPEG-named file that cannot be decoded is
refused, not skipped: the error names it, so that a data set never silently loses images.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cnncli.catalogue import MAX_PIXELS, check_image_size
from cnncli.host.errors import CnnError, DataError, os_reason
from cnncli.host.files import NotRegularFile, open_regular

INSTALL_HINT = "reading PNG/JPEG images needs Pillow: pip install 'cnncli[images]'"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("PNG", "JPEG")
MAX_DATASET_BYTES = 4 * 1024**3  # decoded folder data set (N·C·H·W uint8), checked before decoding any image


class ImagesUnavailable(CnnError):
    """Pillow is not installed (the message says how to install it)."""


def require_pillow() -> tuple[Any, Any]:
    """(PIL.Image, PIL.ImageOps); `ImagesUnavailable` (one line) when Pillow is not installed."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImagesUnavailable(INSTALL_HINT) from None
    return Image, ImageOps


def decode_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Decode one PNG or JPEG file into the model's input layout.

    Parameters
    ----------
    path : Path
        The image file (its content decides the format; only PNG and JPEG are accepted).
    shape : (C, H, W)
        Target channels (1 or 3), height and width.

    Returns
    -------
    np.ndarray
        uint8 (C, H, W): EXIF orientation applied, converted to grey or RGB, scaled to cover H×W and
        centre-cropped (unchanged pixels when the image already is W×H).

    Raises
    ------
    DataError
        Not a PNG/JPEG, damaged or truncated, more than `MAX_PIXELS` pixels, or unreadable; names `path`.
    ImagesUnavailable
        Pillow is not installed.
    """
    image_mod, ops = require_pillow()
    c, h, w = check_image_size(shape, key="the target image shape")
    path = Path(path)
    try:
        raw = open_regular(path)  # a FIFO or device is refused here, never read (it would block or never end)
    except NotRegularFile as e:
        raise DataError(str(e)) from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {os_reason(e)}") from None
    try:
        with raw, warnings.catch_warnings():
            warnings.simplefilter("error", image_mod.DecompressionBombWarning)
            with image_mod.open(raw, formats=list(FORMATS)) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    raise DataError(f"{path}: {width}×{height} pixels, more than the {MAX_PIXELS:,} accepted")
                img.load()
                img = ops.exif_transpose(img)
                if img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit grey: keep the high byte
                    wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
                    img = image_mod.fromarray(wide.astype(np.uint8))  # (Pillow's convert would clip at 255)
                img = img.convert("L" if c == 1 else "RGB")
                if img.size != (w, h):
                    img = ops.fit(img, (w, h), method=image_mod.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except image_mod.UnidentifiedImageError:
        raise DataError(f"{path}: not a PNG or JPEG image (or damaged beyond recognition)") from None
    except PermissionError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, image_mod.DecompressionBombWarning,
            image_mod.DecompressionBombError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: cannot decode the image ({detail})") from None
    if c == 1:
        return pixels[None]  # (1, H, W)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)


# ------------------------------------------------------------------------------------ folder data sets


def _visible(name: str) -> bool:
    return not name.startswith(".")


def split_roots(root: Path) -> tuple[Path, Path | None]:
    """(training folder, test folder or None) of a `folder` data set at `root` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        what = "not a folder" if root.exists() else "no such folder"
        raise DataError(f"{root}: {what} (data.dataset folder needs a folder of class sub-folders)")
    train = root / "train"
    if train.is_dir():
        test = root / "test"
        return train, (test if test.is_dir() else None)
    return root, None


def _class_dirs(folder: Path) -> list[str]:
    """The visible sub-folders of `folder` (a symlink to a folder counts); a visible symlink that loops or
    points nowhere is a `DataError` naming it (it was meant as a class, and would silently lose its images)."""
    try:
        entries = sorted((e for e in os.scandir(folder) if _visible(e.name)), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list {folder}: {e.strerror or e}") from e
    names = []
    for e in entries:
        try:
            if e.is_dir():
                names.append(e.name)
            elif e.is_symlink() and not os.path.exists(e.path):
                raise DataError(f"{e.path}: a symbolic link to nothing ({os.readlink(e.path)!r} does not exist); "
                                "remove it or point it at a class folder")
        except OSError as err:  # ELOOP, EACCES: name the entry, not the whole folder
            raise DataError(f"{e.path}: cannot use this class entry: {os_reason(err)}") from None
    return names


def folder_classes(root: Path) -> tuple[str, ...]:
    """The class names of the `folder` data set at `root`: the sorted sub-folder names of its training folder."""
    train, _ = split_roots(root)
    classes = _class_dirs(train)
    if not classes:
        raise DataError(
            f"{train}: no class sub-folders (expected one sub-folder of PNG/JPEG images per class, "
            "e.g. cat/ and dog/)"
        )
    return tuple(classes)


def _image_files(folder: Path) -> list[Path]:
    """PNG/JPEG files under `folder` (recursively, no symlinked folders), in sorted path order."""
    def refuse(e: OSError) -> None:
        raise DataError(f"cannot list {e.filename or folder}: {e.strerror or e}")

    found = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=refuse, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        for name in sorted(filenames):
            if _visible(name) and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def list_split(folder: Path, classes: tuple[str, ...], *, require_all: bool) -> list[tuple[Path, int]]:
    """(file, label) of every image of one split; `require_all`: each class must have at least one image.

    A class sub-folder in `folder` that is not in `classes` is a `DataError` naming it.
    """
    present = _class_dirs(folder)
    unknown = [name for name in present if name not in classes]
    if unknown:
        raise DataError(
            f"{folder}: class folder {unknown[0]!r} is not one of the training classes ({', '.join(classes)})"
        )
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        if name not in present:
            if require_all:
                raise DataError(f"{folder / name}: no such class folder")
            continue
        files = _image_files(folder / name)
        if not files and require_all:
            raise DataError(f"{folder / name}: no PNG or JPEG files in this class folder")
        items.extend((f, label) for f in files)
    return items


def _decode_all(items: list[tuple[Path, int]], shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((len(items), *shape), dtype=np.uint8)
    y = np.empty(len(items), dtype=np.int64)
    for i, (path, label) in enumerate(items):
        x[i] = decode_image(path, shape)
        y[i] = label
    return x, y


def load_image_folder(
    root: Path, image_size: tuple[int, ...], *, train: bool = True, test: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Decode a `folder` data set (layout in the module docstring).

    Parameters
    ----------
    root : Path
        The folder (``data.dir``).
    image_size : (C, H, W)
        ``data.image_size``: what every image becomes (`decode_image`).
    train, test : bool
        Which parts to decode; a part not requested (or a missing ``test/``) comes back empty.

    Returns
    -------
    train_x, train_y, test_x, test_y, classes
        uint8 (N, C, H, W), int64 (N,), uint8 (M, C, H, W), int64 (M,), the class names.

    Raises
    ------
    DataError
        Missing folder, no class folders, an empty class folder, a test class unknown to train/, a file
        that does not decode (named), or a decoded size above `MAX_DATASET_BYTES` (before decoding).
    """
    shape = check_image_size(tuple(image_size))
    require_pillow()
    train_root, test_root = split_roots(root)
    classes = folder_classes(root)
    train_items = list_split(train_root, classes, require_all=True) if train else []
    test_items = list_split(test_root, classes, require_all=False) if test and test_root is not None else []
    need = (len(train_items) + len(test_items)) * int(np.prod(shape))
    if need > MAX_DATASET_BYTES:
        raise DataError(
            f"{root}: {len(train_items) + len(test_items):,} images of {list(shape)} would take "
            f"{need / 1024**3:.1f} GiB decoded, more than the {MAX_DATASET_BYTES / 1024**3:.0f} GiB allowed; "
            "use fewer images or a smaller data.image_size"
        )
    train_x, train_y = _decode_all(train_items, shape)
    test_x, test_y = _decode_all(test_items, shape)
    return train_x, train_y, test_x, test_y, classes

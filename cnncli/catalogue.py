"""The catalogue of data sets: the values of ``data.dataset`` and what is known of each without reading a file
(title, image shape, the largest training split, the mirror variable, the class names of the built-in sets).
Config validation and the data loaders both read it; it imports nothing of cnncli but the errors.
"""

from __future__ import annotations

from cnncli.host.errors import ConfigError

DATASET_NAMES = ("cifar10", "cifar100", "mnist", "fashion-mnist", "folder")  # the values of data.dataset
DOWNLOADABLE = DATASET_NAMES[:-1]
TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST",
          "folder": "image folder"}
URL_ENV = {"cifar10": "CNNCLI_CIFAR10_URL", "cifar100": "CNNCLI_CIFAR100_URL", "mnist": "CNNCLI_MNIST_URL",
           "fashion-mnist": "CNNCLI_FASHION_MNIST_URL"}
STATIC_SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "mnist": (1, 28, 28),
                 "fashion-mnist": (1, 28, 28)}
# The largest training split each downloadable set has (the step-memory check caps a batch by it).
LARGEST_SPLIT = {"cifar10": 50_000, "cifar100": 50_000, "mnist": 60_000, "fashion-mnist": 60_000}
MAX_PIXELS = 64 * 1024 * 1024  # per image of an image folder, from its header, before decoding (a 67-megapixel photo)


def known(name: str) -> str:
    """`name` if it is a value of ``data.dataset``; ConfigError naming the key otherwise."""
    if name not in DATASET_NAMES:
        raise ConfigError(f"data.dataset: must be one of {', '.join(DATASET_NAMES)}, got {name!r}")
    return name


def check_image_size(shape: tuple[int, ...], key: str = "data.image_size") -> tuple[int, int, int]:
    """`shape` as (C, H, W) with C 1 or 3 and H·W at most `MAX_PIXELS`; `ConfigError` naming `key` otherwise."""
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ConfigError(f"{key} = {list(shape)}: expected [channels, height, width], each at least 1")
    c, h, w = (int(s) for s in shape)
    if c not in (1, 3):
        raise ConfigError(f"{key} = {list(shape)}: channels must be 1 (grey) or 3 (RGB), got {c}")
    if h * w > MAX_PIXELS:
        raise ConfigError(f"{key} = {list(shape)}: {h * w:,} pixels per image, more than {MAX_PIXELS:,}")
    return c, h, w


def image_shape(dataset: str, image_size: tuple[int, ...] | list[int] = ()) -> tuple[int, int, int]:
    """One image's shape (C, H, W) in `dataset`, from the config alone (nothing read): CIFAR-10/100 (3, 32, 32),
    MNIST and Fashion-MNIST (1, 28, 28), ``folder`` its ``data.image_size`` (checked)."""
    name = known(dataset)
    if name == "folder":
        return check_image_size(tuple(image_size))
    return STATIC_SHAPES[name]

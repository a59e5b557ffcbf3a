"""Shared fixtures. Tests that need the real CIFAR-10 find it through CNNCLI_DATA or ../shared/data.

The engine's automatic micro-batch calibration (cnncli/engine/calibrate.py) is off for the suite (and the processes it
starts): it would add a measurement to every training test and write a cache into the home folder.
tests/engine/test_calibrate.py turns it on with a cache in a temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["CNNCLI_TUNE"] = "0"

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _real_cifar_dir() -> Path | None:
    candidates = []
    if os.environ.get("CNNCLI_DATA"):
        candidates.append(Path(os.environ["CNNCLI_DATA"]).expanduser().resolve())
    candidates.append(ROOT.parent / "shared" / "data")
    for c in candidates:
        for folder in (c, c / "cifar-10-batches-py"):
            if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
                return folder
    return None


@pytest.fixture(scope="session")
def real_cifar_dir() -> Path:
    """The extracted real `cifar-10-batches-py` folder (read-only); skips only where none exists."""
    folder = _real_cifar_dir()
    if folder is None:
        pytest.skip("real CIFAR-10 not found: set CNNCLI_DATA or place it at ../shared/data")
    return folder


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Layer types registered by a test (a --layers file, a class defined in the test) vanish after it, so no
    test sees another's layers (`pytestmark = pytest.mark.usefixtures("clean_registry")` in a module)."""
    from cnncli.nn import registry

    saved = (dict(registry.LAYER_TYPES), dict(registry._SOURCES), dict(registry._LOADED))
    yield
    for table, old in zip((registry.LAYER_TYPES, registry._SOURCES, registry._LOADED), saved, strict=True):
        table.clear()
        table.update(old)

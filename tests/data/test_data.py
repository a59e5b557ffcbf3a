"""Data layer: data-dir resolution, the safe loader (real and built copies), damaged files, splits."""

from __future__ import annotations

import os
import pickle
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from helpers import closed_port_url

from cnncli import data
from cnncli.host.errors import DataError

# The official class order (from the CIFAR-10 web page), not taken from the code under test.
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCH_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
ALL_FILES = ("batches.meta", *BATCH_FILES)


# ------------------------------------------------------------------------------------------- builders


@pytest.fixture(autouse=True)
def _free_tmp_space(tmp_path: Path):
    """Several tests write 30-46 MB batch files: do not keep them around after the test."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)



def write_batch(path: Path, x: np.ndarray, labels: object, *, extra: dict | None = None) -> None:
    """A batch file in the official layout: protocol-2 pickle of a dict with bytes keys."""
    n = len(x) if hasattr(x, "__len__") else 0
    record = {
        b"batch_label": b"built batch",
        b"labels": labels,
        b"data": x,
        b"filenames": [b"img_%05d.png" % i for i in range(n)],
    }
    record.update(extra or {})
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=2)


def write_meta(path: Path, names: object = None) -> None:
    names = [n.encode() for n in CLASS_NAMES] if names is None else names
    with open(path, "wb") as f:
        pickle.dump({b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}, f, protocol=2)


def batch_source(i: int) -> tuple[np.ndarray, list[int]]:
    """Deterministic random content of built batch `i`: (10000, 3072) uint8 and 10000 labels."""
    rng = np.random.default_rng(1000 + i)
    return rng.integers(0, 256, (10000, 3072), dtype=np.uint8), rng.integers(0, 10, 10000).tolist()


def valid_batch(path: Path, i: int = 0) -> Path:
    x, y = batch_source(i)
    write_batch(path, x, y)
    return path


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory: pytest.TempPathFactory):
    """A complete full-size CIFAR-10 folder with random content (removed after the module)."""
    root = tmp_path_factory.mktemp("built")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    write_meta(folder / "batches.meta")
    for i, name in enumerate(BATCH_FILES):
        valid_batch(folder / name, i)
    yield folder
    shutil.rmtree(root, ignore_errors=True)


def listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())


# ---------------------------------------------------------------------------------------- built copy


def test_load_built_copy_matches_the_files(built_dir: Path) -> None:
    d = data.load_cifar10(built_dir)
    assert d.train_x.shape == (50000, 3, 32, 32) and d.train_x.dtype == np.uint8
    assert d.train_y.shape == (50000,) and d.train_y.dtype == np.int64
    assert d.test_x.shape == (10000, 3, 32, 32) and d.test_x.dtype == np.uint8
    assert d.test_y.shape == (10000,) and d.test_y.dtype == np.int64
    assert d.classes == CLASS_NAMES and all(type(c) is str for c in d.classes)
    for i in range(5):
        x, y = batch_source(i)
        assert np.array_equal(d.train_x[i * 10000 : (i + 1) * 10000].reshape(10000, 3072), x)
        assert np.array_equal(d.train_y[i * 10000 : (i + 1) * 10000], y)
    x, y = batch_source(5)
    assert np.array_equal(d.test_x.reshape(10000, 3072), x)
    assert np.array_equal(d.test_y, y)
    assert d.train_x.flags.c_contiguous and d.test_x.flags.c_contiguous


def test_load_batch_is_channel_first(built_dir: Path) -> None:
    """Row layout of the files: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32."""
    x, y = data.load_batch(built_dir / "data_batch_2")
    src, labels = batch_source(1)
    assert x.shape == (10000, 3, 32, 32) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.tolist() == labels
    for k, c, r, col in [(0, 0, 0, 0), (7, 1, 2, 3), (9999, 2, 31, 30)]:
        assert x[k, c, r, col] == src[k, c * 1024 + r * 32 + col]


@pytest.mark.parametrize(("train", "test"), [(True, False), (False, True), (False, False)])
def test_parts_not_requested_are_empty(built_dir: Path, train: bool, test: bool) -> None:
    d = data.load_cifar10(built_dir, train=train, test=test)
    assert d.train_x.shape == ((50000 if train else 0), 3, 32, 32) and d.train_x.dtype == np.uint8
    assert d.train_y.shape == ((50000 if train else 0),) and d.train_y.dtype == np.int64
    assert d.test_x.shape == ((10000 if test else 0), 3, 32, 32) and d.test_x.dtype == np.uint8
    assert d.test_y.shape == ((10000 if test else 0),) and d.test_y.dtype == np.int64
    assert d.classes == CLASS_NAMES


def test_numpy1_pickles_load(tmp_path: Path) -> None:
    """Files written by NumPy 1.x (like the originals) name numpy.core.multiarray._reconstruct."""
    path = valid_batch(tmp_path / "b")
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    x, y = data.load_batch(path)
    src, labels = batch_source(0)
    assert np.array_equal(x.reshape(10000, 3072), src) and y.tolist() == labels


# ----------------------------------------------------------------------------------------- real copy


def test_real_counts_and_classes(real_cifar_dir: Path) -> None:
    d = data.load_cifar10(real_cifar_dir)
    assert d.train_x.shape == (50000, 3, 32, 32) and d.train_x.dtype == np.uint8
    assert d.test_x.shape == (10000, 3, 32, 32) and d.test_x.dtype == np.uint8
    assert d.train_y.dtype == np.int64 and d.test_y.dtype == np.int64
    assert np.bincount(d.train_y, minlength=10).tolist() == [5000] * 10
    assert np.bincount(d.test_y, minlength=10).tolist() == [1000] * 10
    assert d.classes == CLASS_NAMES


def test_real_pixel_statistics(real_cifar_dir: Path) -> None:
    """The well-known per-channel mean and std of the training pixels on [0, 1]."""
    x = data.load_cifar10(real_cifar_dir, test=False).train_x
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(3):  # exact, via a histogram, without a float copy of the images
        counts = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        m = (counts * values).sum() / counts.sum()
        mean.append(m)
        std.append(np.sqrt((counts * (values - m) ** 2).sum() / counts.sum()))
    np.testing.assert_allclose(mean, [0.491400, 0.482158, 0.446531], atol=1e-5)
    np.testing.assert_allclose(std, [0.247032, 0.243485, 0.261588], atol=1e-5)


def test_real_first_labels_and_pixels(real_cifar_dir: Path) -> None:
    """Spot values of the official files (first training image is a frog, label 6)."""
    x, y = data.load_batch(real_cifar_dir / "data_batch_1")
    assert y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert x[0, :, 0, 0].tolist() == [59, 62, 63]


def test_real_loading_writes_nothing(real_cifar_dir: Path) -> None:
    parent = real_cifar_dir.parent
    before = (listing(real_cifar_dir), listing(parent))
    data.load_cifar10(real_cifar_dir)
    for d in (real_cifar_dir, parent):
        # an existing copy is used as is: no network (closed port), no lock file, no temp file
        assert data.ensure_cifar10(d, url=closed_port_url()) == real_cifar_dir
    assert (listing(real_cifar_dir), listing(parent)) == before


def test_real_load_time_and_memory(real_cifar_dir: Path) -> None:
    """< 3 s, and no needless copies: traced peak close to the 184 MB the result itself needs."""
    data.load_cifar10(real_cifar_dir, train=False)  # warm the page cache for the test file
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        d = data.load_cifar10(real_cifar_dir)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    result = d.train_x.nbytes + d.test_x.nbytes + d.train_y.nbytes + d.test_y.nbytes
    assert elapsed < 3.0
    assert peak < result + 100e6, f"peak {peak / 1e6:.0f} MB for a {result / 1e6:.0f} MB result"


# -------------------------------------------------------------------------------------- damaged copies


def test_truncated_file(tmp_path: Path) -> None:
    path = valid_batch(tmp_path / "data_batch_1")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_1"):
        data.load_batch(path)


def test_empty_and_garbage_files(tmp_path: Path) -> None:
    empty = tmp_path / "data_batch_1"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="data_batch_1"):
        data.load_batch(empty)
    garbage = tmp_path / "data_batch_2"
    garbage.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataError, match="data_batch_2"):
        data.load_batch(garbage)


@pytest.mark.parametrize(
    ("x", "needle"),
    [
        (np.zeros((10000, 3071), np.uint8), r"\(10000, 3071\)"),
        (np.zeros((9999, 3072), np.uint8), r"\(9999, 3072\)"),
        (np.zeros((10000, 3072), np.float32), "float32"),
        ([1, 2, 3], "list"),
    ],
)
def test_wrong_data(tmp_path: Path, x: object, needle: str) -> None:
    path = tmp_path / "data_batch_3"
    write_batch(path, x, [0] * 10000)
    with pytest.raises(DataError, match=needle) as e:
        data.load_batch(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        ([0] * 9999 + [10], "value 10 at index 9999"),
        ([-1] + [0] * 9999, "value -1 at index 0"),
        ([0] * 9999, "9999 values in 'labels', expected 10000"),
        ([0.5] * 10000, "float"),
        ([b"cat"] * 10000, "labels"),
    ],
)
def test_wrong_labels(tmp_path: Path, labels: list, needle: str) -> None:
    path = tmp_path / "test_batch"
    write_batch(path, np.zeros((10000, 3072), np.uint8), labels)
    with pytest.raises(DataError, match=needle) as e:
        data.load_batch(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("key", [b"data", b"labels"])
def test_missing_key(tmp_path: Path, key: bytes) -> None:
    path = valid_batch(tmp_path / "data_batch_4")
    with open(path, "rb") as f:
        record = pickle.load(f, encoding="bytes")
    del record[key]
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=2)
    with pytest.raises(DataError, match=f"missing key '{key.decode()}'") as e:
        data.load_batch(path)
    assert str(path) in str(e.value)


def test_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_5"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DataError, match="found list"):
        data.load_batch(path)


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("how", ["os.system", "exec", "nested"])
def test_pickle_that_runs_code_is_refused(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "data_batch_1"
    if how == "os.system":
        payload: object = _RunsShell(f"touch {marker}")
    elif how == "exec":
        payload = _Evals(marker)
    else:  # hidden after a valid array, inside the labels
        x, _ = batch_source(0)
        payload = {b"data": x, b"labels": [0] * 9999 + [_RunsShell(f"touch {marker}")]}
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match="forbidden global") as e:
        data.load_batch(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_codecs_encode_only_for_latin1(tmp_path: Path) -> None:
    path = valid_batch(tmp_path / "data_batch_1")
    raw = path.read_bytes()
    assert raw.count(b"X\x06\x00\x00\x00latin1") == 1  # the encoding argument, stored once then memoised
    path.write_bytes(raw.replace(b"X\x06\x00\x00\x00latin1", b"X\x06\x00\x00\x00rot_13"))
    with pytest.raises(DataError, match="rot_13") as e:
        data.load_batch(path)
    assert str(path) in str(e.value)


def test_bad_meta(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_meta(folder / "batches.meta", names=[b"cat", b"dog"])
    with pytest.raises(DataError, match="batches.meta"):
        data.load_cifar10(folder, train=False, test=False)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"num_vis": 3072}, f, protocol=2)
    with pytest.raises(DataError, match="missing key 'label_names'"):
        data.load_cifar10(folder, train=False, test=False)


def test_missing_file_named(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_meta(folder / "batches.meta")
    with pytest.raises(DataError, match="test_batch"):
        data.load_cifar10(folder, train=False)


# ---------------------------------------------------------------------------------- locations


def _fake_extracted(folder: Path, files: tuple[str, ...] = ALL_FILES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_bytes(b"")
    return folder


def test_find_extracted_accepts_both_forms(tmp_path: Path) -> None:
    inner = _fake_extracted(tmp_path / "cifar-10-batches-py")
    assert data.find_extracted(tmp_path) == inner
    assert data.find_extracted(inner) == inner
    bare = _fake_extracted(tmp_path / "elsewhere")  # a copy in a folder with another name
    assert data.find_extracted(bare) == bare


def test_find_extracted_needs_every_file(tmp_path: Path) -> None:
    assert data.find_extracted(tmp_path) is None
    assert data.find_extracted(tmp_path / "does-not-exist") is None
    for missing in ALL_FILES:
        folder = _fake_extracted(tmp_path / missing / "cifar-10-batches-py", tuple(set(ALL_FILES) - {missing}))
        assert data.find_extracted(folder.parent) is None
        assert data.find_extracted(folder) is None
    assert not (tmp_path / "does-not-exist").exists()


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli, env, cfg, xdg = (tmp_path / n for n in ("cli", "env", "cfg", "xdg"))
    monkeypatch.setenv("CNNCLI_DATA", str(env))
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    assert data.resolve_data_dir(cli, str(cfg)) == cli
    assert data.resolve_data_dir(None, str(cfg)) == env
    monkeypatch.setenv("CNNCLI_DATA", "")  # empty counts as unset
    assert data.resolve_data_dir(None, str(cfg)) == cfg
    assert data.resolve_data_dir(None, cfg) == cfg
    monkeypatch.delenv("CNNCLI_DATA")
    assert data.resolve_data_dir(None, cfg) == cfg
    assert data.resolve_data_dir(None, None) == xdg / "cnncli"
    assert data.resolve_data_dir(None, "") == xdg / "cnncli"
    assert not any(p.exists() for p in (cli, env, cfg, xdg))  # resolving creates nothing


def test_resolve_data_dir_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CNNCLI_DATA", raising=False)
    assert data.resolve_data_dir(None, "~/cifar") == tmp_path / "cifar"
    monkeypatch.setenv("CNNCLI_DATA", "~/from-env")
    assert data.resolve_data_dir(None, "~/cifar") == tmp_path / "from-env"


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "cnncli"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "cnncli"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "cnncli"


def test_ensure_uses_existing_copy_without_network_or_writes(tmp_path: Path) -> None:
    inner = _fake_extracted(tmp_path / "cifar-10-batches-py")
    before = (listing(tmp_path), listing(inner))
    calls: list[tuple[int, int | None]] = []
    for d in (tmp_path, inner):
        assert data.ensure_cifar10(d, url=closed_port_url(), progress=lambda *a: calls.append(a)) == inner
    assert calls == []
    assert (listing(tmp_path), listing(inner)) == before


def test_ensure_refuses_incomplete_copy(tmp_path: Path) -> None:
    inner = _fake_extracted(tmp_path / "cifar-10-batches-py", ALL_FILES[:-1])
    before = listing(tmp_path)
    with pytest.raises(DataError, match="missing test_batch") as e:
        data.ensure_cifar10(tmp_path, url=closed_port_url())
    assert str(inner) in str(e.value)
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------------------------- splits


def _numbered(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images whose first two pixels encode their index; label = index % 10."""
    x = np.zeros((n, 3, 32, 32), np.uint8)
    idx = np.arange(n)
    x[:, 0, 0, 0] = idx % 256
    x[:, 0, 0, 1] = idx // 256
    return x, (idx % 10).astype(np.int64)


def _ids(x: np.ndarray) -> np.ndarray:
    return x[:, 0, 0, 0].astype(np.int64) + 256 * x[:, 0, 0, 1].astype(np.int64)


def test_limit_applies_before_validation_split() -> None:
    x, y = _numbered(5000)
    s = data.make_splits(x, y, val_size=500, limit=3000, seed=0)
    assert s.train_x.shape == (2500, 3, 32, 32) and s.val_x.shape == (500, 3, 32, 32)
    assert s.train_y.shape == (2500,) and s.val_y.shape == (500,)
    train_ids, val_ids = _ids(s.train_x), _ids(s.val_x)
    assert set(train_ids).isdisjoint(val_ids)
    assert sorted([*train_ids, *val_ids]) == list(range(3000))  # exactly the first 3000 images
    assert np.array_equal(s.train_y, train_ids % 10) and np.array_equal(s.val_y, val_ids % 10)
    assert s.train_x.dtype == np.uint8 and s.train_y.dtype == np.int64


def test_validation_split_is_seeded() -> None:
    x, y = _numbered(2000)
    a = data.make_splits(x, y, val_size=300, limit=None, seed=1)
    b = data.make_splits(x, y, val_size=300, limit=None, seed=1)
    c = data.make_splits(x, y, val_size=300, limit=None, seed=2)
    assert np.array_equal(_ids(a.val_x), _ids(b.val_x))
    assert not np.array_equal(_ids(a.val_x), _ids(c.val_x))
    ids = _ids(a.val_x)
    assert ids.max() > 1700 and ids.min() < 300  # drawn from the whole set, not its head or tail


def test_no_validation() -> None:
    x, y = _numbered(1000)
    s = data.make_splits(x, y, val_size=0, limit=None, seed=0)
    assert np.array_equal(s.train_x, x) and np.array_equal(s.train_y, y)
    assert s.val_x.shape == (0, 3, 32, 32) and s.val_x.dtype == np.uint8
    assert s.val_y.shape == (0,) and s.val_y.dtype == np.int64
    s = data.make_splits(x, y, val_size=0, limit=10, seed=0)
    assert _ids(s.train_x).tolist() == list(range(10))
    s = data.make_splits(x, y, val_size=0, limit=5000, seed=0)  # a limit above N keeps all
    assert len(s.train_x) == 1000


@pytest.mark.parametrize(("val_size", "limit"), [(1000, None), (1500, None), (100, 100), (200, 100)])
def test_val_size_too_large(val_size: int, limit: int | None) -> None:
    x, y = _numbered(1000)
    with pytest.raises(DataError, match=rf"data\.val_size = {val_size}\b"):
        data.make_splits(x, y, val_size=val_size, limit=limit, seed=0)


def test_bad_limit_and_negative_val_size() -> None:
    x, y = _numbered(100)
    with pytest.raises(DataError, match=r"data\.limit = 0"):
        data.make_splits(x, y, val_size=0, limit=0, seed=0)
    with pytest.raises(DataError, match=r"data\.val_size = -1"):
        data.make_splits(x, y, val_size=-1, limit=None, seed=0)

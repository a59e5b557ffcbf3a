"""`cnn predict` and `cnncli.run.predict.Classifier`: image files give exactly what `cnn eval` computes.

The images are real CIFAR-10 test images written as PNG files into tmp_path (PNG is lossless, so the decoded
pixels are the data loader's), classified by a checkpoint of a short real training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clihelp import ok, one_line_error
from conftest import CONFIGS
from typer.testing import CliRunner

from cnncli import data, engine
from cnncli.cli.app import app
from cnncli.config import load_config
from cnncli.data.preprocess import Normalizer
from cnncli.host.errors import DataError
from cnncli.nn.layers import softmax_cross_entropy
from cnncli.run.checkpoint import load_checkpoint, open_checkpoint, save_checkpoint
from cnncli.run.evaluate import evaluate
from cnncli.run.predict import Classifier, Failure, Prediction, image_inputs
from cnncli.run.train import train

Image = pytest.importorskip("PIL.Image")
runner = CliRunner()
N_PNG = 300


def _cnn() -> str:
    exe = Path(sys.executable).parent / "cnn"
    assert exe.exists(), "the cnn console script is not installed"
    return str(exe)


@pytest.fixture(scope="module")
def test_images(real_cifar_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first N_PNG real test images (uint8 (N, 3, 32, 32)) and labels, from the data loader."""
    ds = data.load_cifar10(real_cifar_dir, train=False)
    return ds.test_x[:N_PNG], ds.test_y[:N_PNG]


@pytest.fixture(scope="module")
def pngs(test_images: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("png")
    for i, img in enumerate(test_images[0]):
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def checkpoint(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.npz of one real epoch of the seed network on 500 images (its probabilities are far from uniform)."""
    run = tmp_path_factory.mktemp("predict") / "run"
    cfg = load_config(CONFIGS / "seed.yaml", ["data.limit=500", "data.val_size=100", "train.epochs=1",
                                              "train.eval_batch_size=128"])
    train(cfg, run, real_cifar_dir)
    return run / "best.npz"


def _eval_path_probabilities(checkpoint: Path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """What `cnn eval` computes for x: the stored normalisation, the engine's logits in eval batches, and the
    softmax of softmax_cross_entropy (the function eval's loss comes from). x uint8 (N, C, H, W) -> p (N, K)."""
    ckpt, model = open_checkpoint(checkpoint)
    normalizer = Normalizer(ckpt.config.data.normalize, model.input_shape[0])
    b = ckpt.config.train.eval_batch_size
    parts = [softmax_cross_entropy(engine.predict(model, normalizer(x[i : i + b])), y[i : i + b])[2]
             for i in range(0, len(x), b)]
    return np.concatenate(parts)


def test_predict_json_on_png_files_equals_the_eval_path(checkpoint: Path, pngs: Path,
                                                        test_images: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = test_images
    proc = subprocess.run([_cnn(), "predict", str(checkpoint), str(pngs), "--json", "--top-k", "10"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == N_PNG
    records = [json.loads(line) for line in lines]
    assert [Path(r["file"]).name for r in records] == [f"{i:04d}.png" for i in range(N_PNG)]

    classes = load_checkpoint(checkpoint).classes
    ref = _eval_path_probabilities(checkpoint, x, y)
    got = np.zeros_like(ref)
    for i, r in enumerate(records):
        names = [t["class"] for t in r["top"]]
        assert sorted(names) == sorted(classes)
        for t in r["top"]:
            got[i, classes.index(t["class"])] = t["p"]
        # ranked by probability, as the eval path ranks them (float32 ties aside)
        ps = [t["p"] for t in r["top"]]
        assert ps == sorted(ps, reverse=True)
    assert np.array_equal(got.argmax(axis=1), ref.argmax(axis=1))
    diff = np.abs(got - ref).max()
    print(f"max |Δp| predict vs eval path: {diff:.2e}")
    assert diff <= 1e-6, diff  # float32 rounding (p ≤ 1, ulp(1) = 1.2e-7; two softmax formulas)
    assert ref.max() > 0.5 and ref.min() < 0.01  # a trained network: the comparison is not of uniform rows

    # and the accuracy that follows from the printed classes is `cnn eval`'s on these images
    ckpt, model = open_checkpoint(checkpoint)
    res = evaluate(model, x, y, Normalizer(ckpt.config.data.normalize, 3), 128, classes)
    top1 = np.array([classes.index(r["top"][0]["class"]) for r in records])
    assert float(np.mean(top1 == y)) == res.accuracy


def test_broken_files_are_one_line_each_and_the_others_printed(checkpoint: Path, pngs: Path,
                                                               tmp_path: Path) -> None:
    good = [pngs / "0000.png", pngs / "0001.png", pngs / "0002.png"]
    text = tmp_path / "notes.png"
    text.write_text("not an image", encoding="utf-8")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[0].read_bytes()[:120])
    missing = tmp_path / "gone.jpg"
    args = [good[0], text, good[1], truncated, missing, good[2]]
    proc = subprocess.run([_cnn(), "predict", str(checkpoint), *map(str, args), "--json", "-k", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == 3, proc.stderr
    for line, path in zip(errors, (text, truncated, missing), strict=True):
        assert line.startswith("error: ") and str(path) in line, line
    assert "not a PNG or JPEG" in errors[0] and "cannot decode" in errors[1] and "no such file" in errors[2]
    printed = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in printed] == [str(p) for p in good]
    assert all(len(r["top"]) == 2 for r in printed)


def test_text_output_default_top_k_and_classes_from_the_checkpoint(checkpoint: Path, pngs: Path) -> None:
    out = ok(runner.invoke(app, ["predict", str(checkpoint), str(pngs / "0003.png")]))
    line, = out.splitlines()
    assert line.startswith(f"{pngs / '0003.png'}: ")
    shown = line.split(": ", 1)[1].split("  ")
    assert len(shown) == 5 and all(s.endswith("%") for s in shown)  # default --top-k 5
    assert {s.rsplit(" ", 1)[0] for s in shown} <= set(load_checkpoint(checkpoint).classes)
    many = json.loads(ok(runner.invoke(app, ["predict", str(checkpoint), str(pngs / "0003.png"), "--json",
                                             "--top-k", "50"])))
    assert len(many["top"]) == 10  # at most every class


def test_checkpoint_without_class_names_uses_indices(checkpoint: Path, tmp_path: Path, pngs: Path,
                                                     real_cifar_dir: Path,
                                                     test_images: tuple[np.ndarray, np.ndarray]) -> None:
    from dataclasses import replace

    ckpt, model = open_checkpoint(checkpoint)
    # no classes entry, a config naming CIFAR-10: the names CIFAR-10's own batches.meta holds
    bare = save_checkpoint(tmp_path / "bare.npz", model, ckpt.config)
    clf = Classifier.from_checkpoint(bare)
    assert clf.classes == data.load_classes(real_cifar_dir / "batches.meta")
    line = ok(runner.invoke(app, ["predict", str(bare), str(pngs / "0003.png"), "--top-k", "10"])).strip()
    assert {s.rsplit(" ", 1)[0] for s in line.split(": ", 1)[1].split("  ")} == set(clf.classes)
    # a data set without fixed names (cifar100's come with its files): the class indices
    other = replace(ckpt.config, data=replace(ckpt.config.data, dataset="cifar100"))
    bare = save_checkpoint(tmp_path / "bare100.npz", model, other)
    clf = Classifier.from_checkpoint(bare)
    assert clf.classes == tuple(str(i) for i in range(10))
    x = test_images[0][:5]
    assert np.array_equal(clf.predict(x), Classifier.from_checkpoint(checkpoint).predict(x))
    wrong = save_checkpoint(tmp_path / "wrong.npz", model, ckpt.config, classes=("cat", "dog", "cow"))
    err = one_line_error(runner.invoke(app, ["predict", str(wrong), str(tmp_path)]))
    assert f"{wrong}: stores 3 class names but the network gives 10 outputs" in err


def test_pillow_missing_is_one_line(checkpoint: Path, pngs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now fails as if not installed
    err = one_line_error(runner.invoke(app, ["predict", str(checkpoint), str(pngs / "0000.png")]))
    assert "pip install 'cnncli[images]'" in err


def test_classifier_on_arrays(checkpoint: Path, test_images: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = test_images
    clf = Classifier.from_checkpoint(checkpoint)
    assert clf.input_shape == (3, 32, 32) and len(clf.classes) == 10
    p = clf.predict_proba(x)
    assert p.dtype == np.float32 and p.shape == (N_PNG, 10)
    assert np.abs(p - _eval_path_probabilities(checkpoint, x, y)).max() <= 1e-6
    assert np.array_equal(clf.predict(x), p.argmax(axis=1))
    # floats in [0, 1] are the same images
    assert np.abs(clf.predict_proba(x / 255.0) - p).max() <= 1e-5
    assert clf.logits(x[:0]).shape == (0, 10)
    for bad, needle in [(x[0], r"images of shape \(3, 32, 32\): the network takes \(N, 3, 32, 32\)"),
                        (x[:, :1], r"\(300, 1, 32, 32\)"),
                        (x.astype(np.float32), r"float images must hold pixels in \[0, 1\], got values in \[0, 255\]"
                                               r"; divide 0\.\.255 pixels by 255"),
                        (x.astype(np.int32), "dtype int32")]:
        with pytest.raises(DataError, match=needle):
            clf.predict_proba(bad)


def test_files_of_other_sizes_and_channels_are_fitted(checkpoint: Path, tmp_path: Path,
                                                      test_images: tuple[np.ndarray, np.ndarray]) -> None:
    from cnncli.data.images import decode_image

    clf = Classifier.from_checkpoint(checkpoint)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.kron(test_images[0][4].transpose(1, 2, 0), np.ones((3, 2, 1), np.uint8))).save(big)  # 96×64
    grey = tmp_path / "grey.png"
    Image.fromarray(test_images[0][5, 0]).save(grey)  # one channel: converted to RGB
    results = clf.predict_files([big, grey], top_k=1)
    assert all(isinstance(r, Prediction) for r in results)
    for r, path in zip(results, (big, grey), strict=True):
        pixels = decode_image(path, (3, 32, 32))
        assert r.top[0][0] == clf.classes[int(clf.predict(pixels[None])[0])]


def test_image_inputs_folders_globs_and_misses(tmp_path: Path) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    for name in ("a/2.png", "a/1.JPG", "a/sub/3.jpeg", "a/notes.txt", "a/.hidden.png", "x.png"):
        (tmp_path / name).write_bytes(b"")
    got = image_inputs([str(tmp_path / "a"), str(tmp_path / "**" / "*.png"), str(tmp_path / "x.png"),
                        str(tmp_path / "empty"), str(tmp_path / "none*.png"), str(tmp_path / "nope.png")])
    files = [str(g.relative_to(tmp_path)) for g in got if isinstance(g, Path)]
    assert files == ["a/1.JPG", "a/2.png", "a/sub/3.jpeg", "x.png"]  # each once, in order; hidden skipped
    fails = [g for g in got if isinstance(g, Failure)]
    assert [f.message for f in fails] == [
        f"{tmp_path / 'empty'}: no PNG or JPEG files in this folder",
        f"{tmp_path / 'none*.png'}: no image file matches this pattern",
        f"{tmp_path / 'nope.png'}: no such file or folder",
    ]

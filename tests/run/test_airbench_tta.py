"""Test-time augmentation (issue 26): the views against naive index arithmetic, the weights against a hand-written
average, and the three places that use it — `cnn eval --tta`, the final test of `cnn train` (with and without),
and `cnn predict --tta` / `Classifier.tta`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clihelp import one_line_error
from clihelp import stdout_of as _stdout
from typer.testing import CliRunner

from cnncli import engine
from cnncli.cli.app import app
from cnncli.config import load_config
from cnncli.run.train import train
from cnncli.run.tta import shifted, tta_logits

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_shifted_views_are_the_reflect_padded_image_one_pixel_off_centre() -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 6))

    def mirror(k: int, size: int) -> int:
        return -k if k < 0 else (2 * (size - 1) - k if k >= size else k)

    for di, dj in ((1, 1), (-1, -1), (1, -1)):
        view = shifted(x, di, dj)
        for n, c, i, j in np.ndindex(*x.shape):
            assert view[n, c, i, j] == x[n, c, mirror(i - di, 5), mirror(j - dj, 6)]


def test_tta_weights_are_a_half_on_the_unshifted_pair_and_a_quarter_on_each_shifted_pair() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3 * 5 * 5))

    def predict(v: np.ndarray) -> np.ndarray:  # any function of the whole image: a linear map
        return v.reshape(len(v), -1) @ w.T

    x = rng.standard_normal((2, 3, 5, 5))
    flip = x[..., ::-1]
    views = [(x, 0.25), (flip, 0.25), (shifted(x, 1, 1), 0.125), (shifted(x, 1, 1)[..., ::-1], 0.125),
             (shifted(x, -1, -1), 0.125), (shifted(x, -1, -1)[..., ::-1], 0.125)]
    want = sum(wt * predict(np.ascontiguousarray(v)) for v, wt in views)
    np.testing.assert_allclose(tta_logits(predict, x, "mirror-translate"), want, rtol=1e-12)
    np.testing.assert_allclose(tta_logits(predict, x, "mirror"), 0.5 * predict(x) + 0.5 * predict(flip), rtol=1e-12)
    np.testing.assert_array_equal(tta_logits(predict, x, "none"), predict(x))
    with pytest.raises(ValueError, match="must be one of none, mirror, mirror-translate"):
        tta_logits(predict, x, "flip")


@pytest.fixture(scope="module")
def run(real_cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tta") / "run"
    cfg = load_config(ROOT / "configs" / "seed.yaml", ["data.limit=600", "data.val_size=100", "train.epochs=1",
                                                       "train.tta=mirror-translate"])
    return train(cfg, out, real_cifar_dir)


def test_train_reports_the_test_with_and_without_tta(run) -> None:
    assert run.test is not None and run.test_plain is not None
    assert run.test.n == run.test_plain.n == 10000
    assert run.test.loss != run.test_plain.loss  # different logits: the views were used


def test_eval_tta_option_and_the_checkpoint_default(run, real_cifar_dir: Path) -> None:
    ckpt = str(run.best_path)
    base = ["eval", ckpt, "--data-dir", str(real_cifar_dir), "--json"]
    by_default = json.loads(_stdout(runner.invoke(app, base)))
    assert by_default["tta"] == "mirror-translate" and by_default["accuracy"] == run.test.accuracy
    none = json.loads(_stdout(runner.invoke(app, [*base, "--tta", "none"])))
    assert none["tta"] == "none" and none["accuracy"] == run.test_plain.accuracy
    mirror = json.loads(_stdout(runner.invoke(app, [*base, "--tta", "mirror"])))
    assert mirror["loss"] not in (none["loss"], by_default["loss"])
    message = one_line_error(runner.invoke(app, [*base[:-1], "--tta", "sideways"]))
    assert "--tta: must be one of none, mirror, mirror-translate, got 'sideways'" in message


def test_classifier_uses_the_checkpoint_tta_and_can_turn_it_off(run, real_cifar_dir: Path) -> None:
    from cnncli.data import load_dataset
    from cnncli.run.predict import Classifier

    clf = Classifier.from_checkpoint(run.best_path)
    assert clf.tta == "mirror-translate"
    x = load_dataset(clf_config(run).data, real_cifar_dir).test_x[:50]
    with_tta = clf.logits(x)
    clf.tta = "none"
    plain = clf.logits(x)
    want = tta_logits(lambda v: engine.predict(clf.model, v), clf.prepare(x), "mirror-translate")
    np.testing.assert_allclose(with_tta, want, rtol=1e-6)
    assert not np.allclose(with_tta, plain)


def clf_config(run):
    from cnncli.run.checkpoint import load_checkpoint

    return load_checkpoint(run.best_path).config


def test_predict_cli_tta_changes_the_probabilities_and_refuses_a_wrong_level(run, real_cifar_dir: Path,
                                                                              tmp_path: Path) -> None:
    from PIL import Image

    from cnncli.data import load_dataset

    img = load_dataset(clf_config(run).data, real_cifar_dir).test_x[3]
    png = tmp_path / "one.png"
    Image.fromarray(img.transpose(1, 2, 0)).save(png)
    args = ["predict", str(run.best_path), str(png), "--json", "--top-k", "10"]
    default = json.loads(_stdout(runner.invoke(app, args)))
    plain = json.loads(_stdout(runner.invoke(app, [*args, "--tta", "none"])))
    p_default = {t["class"]: t["p"] for t in default["top"]}
    p_plain = {t["class"]: t["p"] for t in plain["top"]}
    assert p_default != p_plain
    message = one_line_error(runner.invoke(app, [*args, "--tta", "upside-down"]))
    assert "--tta: must be one of" in message

"""`cnn saliency` and `cnn attack` on the command line: the numbers they print are the library's (whose math
tests/run/test_saliency.py checks against finite differences), the pictures are PNGs, bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from clihelp import ok
from clihelp import one_line_error as _one_line_error
from typer.testing import CliRunner

from cnncli import data
from cnncli.cli.app import app
from cnncli.config import load_config
from cnncli.nn.model import build_model
from cnncli.run.checkpoint import save_checkpoint
from cnncli.run.saliency import PixelScale, saliency

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(SEED)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "w.npz", build_model(cfg.model, seed=cfg.seed), cfg,
                           classes=CLASSES)


def test_cli_saliency_json_is_the_library_on_those_images(ckpt: Path, real_cifar_dir: Path) -> None:
    out = ok(runner.invoke(app, ["saliency", str(ckpt), "--index", "3", "--index", "0", "--class", "ship",
                                 "--samples", "2", "--no-png", "--json", "--data-dir", str(real_cifar_dir)]))
    doc = json.loads(out)
    assert [r["image"] for r in doc["images"]] == ["test[3]", "test[0]"]
    ds = data.load_cifar10(real_cifar_dir, train=False, test=True)
    cfg = load_config(SEED)
    model = build_model(cfg.model, seed=cfg.seed).astype(np.float64)
    s = saliency(model, PixelScale.of(cfg.data.normalize, 3), ds.test_x[[3, 0]] / 255.0, np.array([8, 8]))
    for i, r in enumerate(doc["images"]):
        assert r["target"] == "ship" and r["label"] == int(ds.test_y[[3, 0]][i])
        np.testing.assert_allclose(np.array(r["saliency"]), s.heat[i], rtol=1e-6, atol=1e-12)
        assert r["loss"] == pytest.approx(float(s.loss[i]), rel=1e-9)
        assert np.array(r["smoothgrad"]).shape == (32, 32)
    assert doc["png"] is None


def test_cli_saliency_png(ckpt: Path, real_cifar_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    out = ok(runner.invoke(app, ["saliency", str(ckpt), "-i", "1", "-i", "2", "--png", str(png), "--data-dir",
                                 str(real_cifar_dir)]))
    assert "test[1]" in out and "test[2]" in out and str(png) in out
    blob = png.read_bytes()
    assert blob.startswith(PNG_SIGNATURE) and len(blob) > 20_000


def test_cli_saliency_of_image_files(ckpt: Path, real_cifar_dir: Path, tmp_path: Path) -> None:
    pil = pytest.importorskip("PIL.Image")
    ds = data.load_cifar10(real_cifar_dir, train=False, test=True)
    pil.fromarray(np.moveaxis(ds.test_x[5], 0, -1)).save(tmp_path / "a.png")
    doc = json.loads(ok(runner.invoke(app, ["saliency", str(ckpt), str(tmp_path), "--no-png", "--json"])))
    (row,) = doc["images"]
    assert row["image"].endswith("a.png") and row["label"] is None
    split = json.loads(ok(runner.invoke(app, ["saliency", str(ckpt), "-i", "5", "--no-png", "--json", "--data-dir",
                                              str(real_cifar_dir)])))["images"][0]
    assert row["saliency"] == split["saliency"]  # the PNG holds the same pixels: the same map


@pytest.mark.parametrize(("args", "needles"), [
    (["--class", "unicorn"], ["--class", "unicorn", "airplane"]),
    (["--index", "10000"], ["--index", "0..9999"]),
    (["--index", "0", "nofile.png"], ["IMAGE", "--index"]),
])
def test_cli_saliency_bad_input(ckpt: Path, real_cifar_dir: Path, args: list[str], needles: list[str]) -> None:
    err = _one_line_error(runner.invoke(app, ["saliency", str(ckpt), "--no-png", "--data-dir", str(real_cifar_dir),
                                              *args]))
    assert all(n in err for n in needles), err


def test_cli_saliency_without_matplotlib(ckpt: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    err = _one_line_error(runner.invoke(app, ["saliency", str(ckpt), "--png", str(tmp_path / "s.png")]))
    assert "pip install 'cnncli[viz]'" in err and not (tmp_path / "s.png").exists()


def test_cli_attack_table(ckpt: Path, real_cifar_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "a.png"
    doc = json.loads(ok(runner.invoke(app, ["attack", str(ckpt), "--eps", "0,2/255,8/255", "--steps", "1,3", "-n",
                                            "40", "--png", str(png), "--json", "--data-dir", str(real_cifar_dir)])))
    assert doc["images"] == 40
    methods = [(a["method"], round(a["eps_255"], 9)) for a in doc["attacks"]]
    assert methods == [("FGSM", 0), ("FGSM", 2), ("FGSM", 8), ("PGD-3", 0), ("PGD-3", 2), ("PGD-3", 8)]
    acc = [a["accuracy"] for a in doc["attacks"]]
    assert acc[0] == acc[3] == doc["clean_accuracy"]
    assert acc[2] < acc[0] and acc[5] <= acc[2] + 0.05  # the attack works; PGD at least about as strong
    assert png.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(("args", "needles"), [
    (["--eps", "2/0"], ["--eps", "2/0"]),
    (["--eps", "3"], ["--eps", "outside [0, 1]"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", "ten"], ["--steps", "ten"]),
])
def test_cli_attack_bad_input(ckpt: Path, args: list[str], needles: list[str]) -> None:
    err = _one_line_error(runner.invoke(app, ["attack", str(ckpt), "--no-png", *args]))
    assert all(n in err for n in needles), err


# ------------------------------------------------------------------------------------- trace picture, cnn show


def test_trace_picture_chooses_one_map_per_conv_block_for_a_deep_network(real_cifar_dir: Path) -> None:
    from cnncli.data.preprocess import Normalizer
    from cnncli.nn.trace import trace
    from cnncli.run.plot import MAX_TRACE_CHANNELS, _strongest, trace_selection

    ds = data.load_cifar10(real_cifar_dir, train=False, test=True)
    chosen = {}
    for name in ("seed", "cifar-deep"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        x = Normalizer(cfg.data.normalize, 3)(ds.test_x[:1])[0]
        t = trace(build_model(cfg.model, seed=cfg.seed), x, int(ds.test_y[0]), ds.classes, checks=0)
        chosen[name] = [s.symbol.text for s in trace_selection(t)[0]]
        if name == "cifar-deep":
            p4 = t["P4"].value
            keep = _strongest(p4, MAX_TRACE_CHANNELS)
            norms = np.linalg.norm(p4.reshape(len(p4), -1), axis=1)
            assert len(keep) == 32 and norms[keep].min() >= np.delete(norms, keep).max()
    assert chosen["seed"] == ["S¹", "A¹", "P¹"]  # a small network: every map
    assert chosen["cifar-deep"] == ["P¹", "A²", "P³", "P⁴"]  # each conv block's output


def test_cli_show_draws_a_layer(ckpt: Path, real_cifar_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "l.png"
    out = ok(runner.invoke(app, ["show", str(ckpt), "--layer", "P1", "-i", "2", "--png", str(png), "--data-dir",
                                 str(real_cifar_dir)]))
    assert "P¹ 16×16×16" in out and png.read_bytes().startswith(PNG_SIGNATURE)
    out = ok(runner.invoke(app, ["show", str(ckpt), "--layer", "conv1", "--png", str(png), "--data-dir",
                                 str(real_cifar_dir)]))
    assert "16 filters and S¹ 16×32×32" in out
    err = _one_line_error(runner.invoke(app, ["show", str(ckpt), "--layer", "fc1", "--png", str(png), "--data-dir",
                                              str(real_cifar_dir)]))
    assert "vector of 10 values" in err and "conv1/S1" in err
    err = _one_line_error(runner.invoke(app, ["show", str(ckpt), "--layer", "conv9", "--png", str(png)]))
    assert "conv9" in err and "conv1/S1" in err


@pytest.mark.parametrize("command", [["saliency"], ["attack"], ["show", "--layer", "conv1"]])
def test_cli_png_to_a_fifo_is_refused_before_the_work(ckpt: Path, tmp_path: Path, command: list[str]) -> None:
    import os

    pytest.importorskip("matplotlib")
    fifo = tmp_path / "p.png"
    os.mkfifo(fifo)
    err = _one_line_error(runner.invoke(app, [command[0], str(ckpt), *command[1:], "--png", str(fifo),
                                              "--data-dir", str(tmp_path / "nodata")]))
    assert "--png" in err and str(fifo) in err and "FIFO" in err  # before any data is looked for


def test_cli_attack_reports_progress_over_the_image_gradients(ckpt: Path, real_cifar_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """30 images, FGSM and PGD-2 at one ε > 0 (ε = 0 takes no gradient): 30 · (1 + 2) = 90 image gradients."""
    from clihelp import stderr_of

    monkeypatch.setenv("CNNCLI_PROGRESS_SECONDS", "0")
    result = runner.invoke(app, ["attack", str(ckpt), "--eps", "0,2/255", "--steps", "1,2", "-n", "30", "--no-png",
                                 "--data-dir", str(real_cifar_dir)])
    ok(result)
    lines = [ln for ln in stderr_of(result).splitlines() if ln.startswith("attack:")]
    assert [ln.split(" of ")[0] for ln in lines] == ["attack: 30", "attack: 60"]  # the last (90) is the table
    assert all("of 90 image gradients" in ln for ln in lines)

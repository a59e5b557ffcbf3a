"""`cnn export CHECKPOINT --onnx FILE`: the exported graph, run by onnxruntime on raw pixels, gives the logits
of the network's own prediction path (`cnn eval`'s) for every layer type, with the normalisation folded in."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from clihelp import ok, one_line_error
from conftest import CONFIGS, ROOT
from typer.testing import CliRunner

from cnncli import data
from cnncli.cli.app import app
from cnncli.config import Config, build_config, load_config
from cnncli.nn.layers import Flatten, Linear, ReLU, softmax
from cnncli.nn.model import Sequential, build_model
from cnncli.run.checkpoint import save_checkpoint
from cnncli.run.onnx_export import OPSET, ExportError, check_exportable
from cnncli.run.predict import Classifier

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
runner = CliRunner()
N_REAL = 1000


def _randomise(model: Sequential, seed: int) -> None:
    """Biases, batch-norm γ and β, and running statistics away from their initial 0/1, so that every export
    rule's use of them is seen (He-initialised weights stay)."""
    rng = np.random.default_rng(seed)
    params = model.named_params()
    for k, v in params.items():
        if k.endswith((".b", ".beta")):
            v[...] = rng.normal(0.0, 0.1, v.shape)
        elif k.endswith(".gamma"):
            v[...] = rng.uniform(0.5, 1.5, v.shape)
    for k, v in model.named_buffers().items():
        v[...] = rng.normal(0.0, 0.2, v.shape) if k.endswith("running_mean") else rng.uniform(0.3, 2.0, v.shape)


def _checkpoint(cfg: Config, path: Path, seed: int = 0) -> Path:
    model = build_model(cfg.model, seed=seed)
    _randomise(model, seed + 1)
    return save_checkpoint(path, model, cfg, classes=tuple(f"class {i}" for i in range(model.output_shape[0])))


def _export(checkpoint: Path, out: Path, *extra: str) -> Path:
    ok(runner.invoke(app, ["export", str(checkpoint), "--onnx", str(out), *extra]))
    return out


def _run_onnx(path: Path, pixels01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, proba = session.run(["logits", "probabilities"], {"pixels": pixels01.astype(np.float32)})
    return logits, proba


def _check_model_file(path: Path, k: int) -> None:
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]
    assert {n.domain for n in proto.graph.node} == {""}  # standard operators only
    assert [i.name for i in proto.graph.input] == ["pixels"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == [f"class {i}" for i in range(k)]


@pytest.fixture(scope="module")
def real_images(real_cifar_dir: Path) -> np.ndarray:
    """The first 1,000 real CIFAR-10 test images, uint8 (1000, 3, 32, 32)."""
    return data.load_cifar10(real_cifar_dir, train=False).test_x[:N_REAL]


@pytest.mark.parametrize("name", ["seed", "seed-diagram", "cifar-deep"])
def test_shipped_configs_agree_with_the_eval_path_on_real_images(name: str, real_images: np.ndarray,
                                                                  tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    # He-normal weights: cifar-deep's own U(±1/√fan_in) start, with random batch-norm statistics and no training,
    # gives logits so small that every image gets the same class; the export is tested on a network that answers
    he = [f"model.layers[{i}].init=he" for i, layer in enumerate(cfg.model.layers) if hasattr(layer, "init")]
    cfg = load_config(CONFIGS / f"{name}.yaml", he)
    ckpt = _checkpoint(cfg, tmp_path / "w.npz", seed=3)
    path = _export(ckpt, tmp_path / "out" / f"{name}.onnx")
    _check_model_file(path, 10)
    z_ref = Classifier.from_checkpoint(ckpt).logits(real_images)  # model.predict, eval mode, as cnn eval
    z, p = _run_onnx(path, real_images / 255.0)
    scale = max(1.0, float(np.abs(z_ref).max()))
    diff = float(np.abs(z - z_ref).max())
    print(f"{name}: max |Δlogit| {diff:.2e}, max |z| {np.abs(z_ref).max():.2f}, relative {diff / scale:.2e}")
    assert diff <= 1e-4 * scale
    assert np.abs(p - softmax(z)).max() <= 1e-6  # the probabilities output: softmax of its logits
    assert len(np.unique(z_ref.argmax(axis=1))) > 1  # the images give different answers: not a constant network


# Every built-in layer type, in every variant the export rules distinguish.
EVERY_LAYER = [
    {"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1},                       # bias
    {"type": "batchnorm", "eps": 1.0e-3},                                                        # images
    {"type": "leakyrelu", "slope": 0.2},
    {"type": "residual", "projection": True, "layers": [                                        # 1×1 stride-2 shortcut
        {"type": "conv", "out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1, "bias": False},
        {"type": "batchnorm"},
        {"type": "tanh"},
        {"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1},
    ]},
    {"type": "avgpool", "kernel_size": 3, "stride": 1, "padding": 1},                           # zeros counted
    {"type": "sigmoid"},
    {"type": "residual", "layers": [{"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1},
                                    {"type": "relu"},
                                    {"type": "residual", "layers": [{"type": "relu"}]}]},      # nested, identity
    {"type": "maxpool", "kernel_size": 3, "stride": 2},                                          # overlapping, 7->3
    {"type": "dropout", "p": 0.3},
    {"type": "conv", "out_channels": 5, "kernel_size": 2, "stride": 1, "bias": False},          # 3->2
    {"type": "relu"},
    {"type": "flatten"},                                                                         # 5·2·2 = 20
    {"type": "linear", "out_features": 16},
    {"type": "batchnorm"},                                                                       # vectors
    {"type": "tanh"},
    {"type": "residual", "layers": [{"type": "linear", "out_features": 16, "bias": False}, {"type": "leakyrelu"}]},
    {"type": "dropout"},
    {"type": "linear", "out_features": 7, "bias": False},
]
GLOBAL_POOL = [
    {"type": "conv", "out_channels": 4, "kernel_size": 5, "stride": 2, "padding": 2},
    {"type": "relu"},
    {"type": "avgpool", "kernel_size": 2},
    {"type": "globalavgpool"},
    {"type": "linear", "out_features": 3},
]


@pytest.mark.parametrize(("layers", "shape"), [(EVERY_LAYER, [3, 13, 13]), (GLOBAL_POOL, [1, 11, 9])],
                         ids=["every-layer", "globalavgpool"])
def test_every_layer_type_on_random_inputs(layers: list, shape: list, tmp_path: Path) -> None:
    c = shape[0]
    cfg = build_config({"model": {"input_shape": shape, "layers": layers},
                        "data": {"normalize": {"mean": [0.3, 0.5, 0.6][:c], "std": [0.2, 0.25, 0.3][:c]}}})
    ckpt = _checkpoint(cfg, tmp_path / "mix.npz", seed=5)
    path = _export(ckpt, tmp_path / "mix.onnx")
    k = layers[-1]["out_features"]
    _check_model_file(path, k)
    x = np.random.default_rng(9).integers(0, 256, size=(64, *shape), dtype=np.uint8)
    clf = Classifier.from_checkpoint(ckpt)
    z_ref = clf.logits(x)
    z, _ = _run_onnx(path, x / 255.0)
    diff = float(np.abs(z - z_ref).max())
    print(f"{'every layer' if layers is EVERY_LAYER else 'globalavgpool'}: max |Δlogit| {diff:.2e}, "
          f"max |z| {np.abs(z_ref).max():.2f}")
    assert diff <= 1e-4 * max(1.0, float(np.abs(z_ref).max()))
    # the reference itself is the per-layer path's too (the engine and forward() agree), in evaluation mode
    scale = max(1.0, float(np.abs(z_ref).max()))
    assert np.abs(clf.model.eval().forward(clf.prepare(x)) - z_ref).max() <= 1e-4 * scale
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    expected = {"Conv", "Relu", "Sub", "Div", "Softmax"} | ({"BatchNormalization", "LeakyRelu", "Tanh", "Sigmoid",
                                                               "AveragePool", "MaxPool", "Add", "Flatten", "Gemm"}
                                                              if layers is EVERY_LAYER else
                                                              {"GlobalAveragePool", "AveragePool", "Gemm"})
    assert expected <= ops


@pytest.mark.usefixtures("clean_registry")  # its --layers file must not stay registered for later tests
def test_layer_without_export_rule_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    layers_file = ROOT / "docs" / "examples" / "my_layers.py"
    cfg_path = ROOT / "docs" / "examples" / "my-layers.yaml"
    ok(runner.invoke(app, ["summary", "--config", str(cfg_path), "--layers", str(layers_file)]))  # registers them
    cfg = load_config(cfg_path)
    model = build_model(cfg.model)
    ckpt = save_checkpoint(tmp_path / "mine.npz", model, cfg)
    target = tmp_path / "mine.onnx"
    target.write_bytes(b"the previous export")
    err = one_line_error(runner.invoke(app, ["export", str(ckpt), "--onnx", str(target), "--layers",
                                             str(layers_file)]))
    first = next(i for i, layer in enumerate(model.layers) if layer.kind in ("swish", "prelu"))
    assert f"model.layers[{first}] (" in err and f"layer type {model.layers[first].kind!r}" in err
    assert "no ONNX export rule" in err
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.npz", "mine.onnx"]  # no temporary file left

    class MyReLU(ReLU):  # a subclass may compute something else: no rule by inheritance
        type_name = "myrelu"

    with pytest.raises(ExportError, match=r"model\.layers\[1\] \(myrelu\): layer type 'myrelu' \(MyReLU\)"):
        check_exportable(Sequential([Flatten(), MyReLU(), Linear(12, 2)], (3, 2, 2)))


def test_onnx_missing_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(CONFIGS / "seed.yaml")
    ckpt = _checkpoint(cfg, tmp_path / "w.npz")
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails as if not installed
    err = one_line_error(runner.invoke(app, ["export", str(ckpt), "--onnx", str(tmp_path / "m.onnx")]))
    assert "pip install 'cnncli[onnx]'" in err
    assert not (tmp_path / "m.onnx").exists()

"""The open layer set: one declaration per layer type, the generic engine stage, buffers and modes, user layer
files (`--layers`), average pooling as the new built-in type, and the generated key reference.

Oracles are independent: average pooling is checked against a loop straight from the sum in
docs/derivations.md#average-pooling; gradients against finite differences; the engine against the per-layer
reference path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from clihelp import ok, one_line_error, stdout_of
from typer.testing import CliRunner

from cnncli import Layer, LayerOptions, engine, option
from cnncli.cli.app import app
from cnncli.config import build_config
from cnncli.engine import engine_for
from cnncli.host.errors import ConfigError
from cnncli.nn import registry
from cnncli.nn.gradcheck import gradcheck
from cnncli.nn.layers import AvgPool2D, ReLU
from cnncli.nn.model import build_model
from cnncli.run.checkpoint import load_checkpoint, save_checkpoint
from cnncli.run.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
MY_LAYERS = EXAMPLES / "my_layers.py"
MY_CONFIG = EXAMPLES / "my-layers.yaml"
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("clean_registry")  # layer types a test registers vanish after it


def _model(input_shape: list[int], layers: list[dict], seed: int = 0, dtype: type = np.float64):
    cfg = build_config({"seed": seed, "model": {"input_shape": input_shape, "layers": layers}})
    return build_model(cfg.model, seed=seed, dtype=dtype)


# --------------------------------------------------------------------------------------- average pooling


def _avgpool_naive(x: np.ndarray, k: int, s: int, p: int) -> np.ndarray:
    """P[n,c,i,j] = (1/K²) Σ_{u,v} Xpad[n, c, s·i + u, s·j + v], padding zeros counted, as the docs write it."""
    n, c, h, w = x.shape
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out = np.zeros((n, c, ho, wo))
    for b in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    total = 0.0
                    for u in range(k):
                        for v in range(k):
                            r, q = s * i + u - p, s * j + v - p
                            if 0 <= r < h and 0 <= q < w:
                                total += x[b, ch, r, q]
                    out[b, ch, i, j] = total / (k * k)
    return out


def _avgpool_naive_backward(dout: np.ndarray, x_shape: tuple, k: int, s: int, p: int) -> np.ndarray:
    """δX[n,c,r,q] = Σ over windows (i, j) that hold (r, q) of δP[n,c,i,j] / K²."""
    dx = np.zeros(x_shape)
    n, c, ho, wo = dout.shape
    for b in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    for u in range(k):
                        for v in range(k):
                            r, q = s * i + u - p, s * j + v - p
                            if 0 <= r < x_shape[2] and 0 <= q < x_shape[3]:
                                dx[b, ch, r, q] += dout[b, ch, i, j] / (k * k)
    return dx


@pytest.mark.parametrize("k,s,p,h,w", [(2, 2, 0, 6, 6), (3, 1, 1, 5, 7), (3, 2, 1, 7, 6), (2, 3, 1, 8, 5)])
def test_avgpool_forward_and_backward_equal_the_naive_sums(k: int, s: int, p: int, h: int, w: int) -> None:
    rng = np.random.default_rng(k * 100 + s * 10 + p)
    x = rng.standard_normal((2, 3, h, w))
    layer = AvgPool2D(k, s, p)
    out = layer.forward(x)
    np.testing.assert_allclose(out, _avgpool_naive(x, k, s, p), rtol=1e-12, atol=1e-14)
    assert out.shape[1:] == layer.output_shape(x.shape[1:])
    dout = rng.standard_normal(out.shape)
    np.testing.assert_allclose(layer.backward(dout), _avgpool_naive_backward(dout, x.shape, k, s, p),
                               rtol=1e-12, atol=1e-14)


def test_avgpool_of_a_hand_worked_example() -> None:
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    out = AvgPool2D(2).forward(x)
    np.testing.assert_array_equal(out[0, 0], [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4],
                                              [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]])


AVG_NET = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, {"type": "relu"},
           {"type": "avgpool", "kernel_size": 3, "stride": 2, "padding": 1}, {"type": "flatten"},
           {"type": "linear", "out_features": 5}]


def test_avgpool_network_passes_gradcheck_to_1e_7() -> None:
    results = gradcheck(_model([2, 8, 8], AVG_NET), batch=3, max_entries=40)
    assert {r.name for r in results} == {"conv1.W", "conv1.b", "fc1.W", "fc1.b", "X"}
    assert max(r.max_rel_error for r in results) <= 1e-7


def test_avgpool_config_errors_name_the_layer() -> None:
    with pytest.raises(ConfigError, match=r"model\.layers\[0\] \(avgpool\): padding 2 is more than half"):
        _model([1, 8, 8], [{"type": "avgpool", "kernel_size": 2, "padding": 2}, {"type": "flatten"},
                           {"type": "linear"}])
    with pytest.raises(ConfigError, match=r"model\.layers\[0\]\.kernel_sise: unknown key; did you mean"):
        _model([1, 8, 8], [{"type": "avgpool", "kernel_sise": 2}])


# ------------------------------------------------------------------------- the engine runs every layer


class DoubledReLU(ReLU):
    """A ReLU subclass whose backward differs from ReLU's: the engine must run its own backward."""

    type_name = "relu2x"

    def forward(self, x):
        return 2 * super().forward(x)

    def backward(self, dout):
        return 2 * super().backward(dout)


class CenterBatch(Layer):
    """y = x − mean over the batch of x: couples the examples, so micro-batches would change the result."""

    type_name = "center"

    def couples_batch(self) -> bool:
        return self.training

    def forward(self, x):
        return x - x.mean(axis=0, keepdims=True) if self.training else x

    def backward(self, dout):
        return dout - dout.mean(axis=0, keepdims=True)


@dataclass(frozen=True)
class _ScaleOptions(LayerOptions):
    init: float = option(1.0, gt=0, help="initial scale")


class Scale(Layer):
    """y = a[c] · x with one parameter per channel and a buffer counting forward passes (buffers test)."""

    type_name = "scale"
    Options = _ScaleOptions
    decay = ()

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.init = init

    def build(self, input_shape, rng, dtype):
        self.params = {"a": np.full(input_shape[0], self.init, dtype=dtype)}
        self.grads = {"a": np.zeros(input_shape[0], dtype=dtype)}
        self.buffers = {"calls": np.zeros(1, dtype=dtype)}

    def _a(self, ndim):
        return self.params["a"].reshape(1, -1, *([1] * (ndim - 2)))

    def forward(self, x):
        self._x = x
        return self._a(x.ndim) * x

    def backward(self, dout):
        axes = tuple(i for i in range(dout.ndim) if i != 1)
        self.grads["a"] = (dout * self._x).sum(axis=axes)
        return self._a(dout.ndim) * dout


def _register_test_layers() -> None:
    for cls in (DoubledReLU, CenterBatch, Scale):
        registry.register_layer(cls, "tests/nn/test_layer_api.py")


BUILDING_BLOCKS = [
    [{"type": "conv", "out_channels": 3, "kernel_size": 3, "padding": 1}],
    [{"type": "relu"}],
    [{"type": "relu2x"}],
    [{"type": "maxpool", "kernel_size": 2}],
    [{"type": "avgpool", "kernel_size": 2}],
    [{"type": "avgpool", "kernel_size": 3, "stride": 1, "padding": 1}],
    [{"type": "scale", "init": 0.7}],
    [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, {"type": "relu"},
     {"type": "maxpool", "kernel_size": 2}],
]


def _random_net(rng: np.random.Generator, center: bool) -> list[dict]:
    layers: list[dict] = []
    size = 16
    for _ in range(int(rng.integers(2, 5))):
        block = BUILDING_BLOCKS[int(rng.integers(len(BUILDING_BLOCKS)))]
        if any(b["type"] in ("maxpool", "avgpool") and b.get("stride", b["kernel_size"]) > 1 for b in block):
            if size < 4:
                continue
            size //= 2
        layers += block
    if center:
        layers.insert(int(rng.integers(0, len(layers) + 1)), {"type": "center"})
    tail = [{"type": "flatten"}, {"type": "scale"}, {"type": "relu"}, {"type": "linear", "out_features": 6}]
    return layers + tail[: 1 + int(rng.integers(0, 3))] + tail[3:]


@pytest.mark.parametrize("case", range(12))
def test_engine_equals_the_reference_on_random_mixes_of_fused_and_generic_layers(case: int) -> None:
    _register_test_layers()
    rng = np.random.default_rng(case)
    layers = _random_net(rng, center=case % 3 == 0)
    x = rng.standard_normal((70, 2, 16, 16))  # 70 images: three micro-batches of the engine
    y = rng.integers(0, 6, 70)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 2e-4)):
        ref, fast = _model([2, 16, 16], layers, seed=case, dtype=dtype), _model([2, 16, 16], layers, seed=case,
                                                                                  dtype=dtype)
        loss_r, z_r = ref.loss_and_grads(x.astype(dtype), y)
        loss_f, z_f = engine.loss_and_grads(fast, x.astype(dtype), y)
        assert loss_f == pytest.approx(loss_r, rel=tol), layers
        np.testing.assert_allclose(z_f, z_r, rtol=tol, atol=tol)
        gr, gf = ref.named_grads(), fast.named_grads()
        assert gr.keys() == gf.keys()
        for k in gr:
            scale = float(np.abs(gr[k]).max()) or 1.0
            np.testing.assert_allclose(gf[k], gr[k], rtol=tol, atol=tol * scale, err_msg=f"{k} of {layers}")
        z_fast, z_ref = engine.predict(fast, x.astype(dtype)), ref.predict(x.astype(dtype))
        np.testing.assert_allclose(z_fast, z_ref, rtol=tol, atol=tol)


def test_a_subclass_of_a_fused_layer_runs_its_own_backward_in_the_engine() -> None:
    _register_test_layers()
    layers = [{"type": "conv", "out_channels": 3, "kernel_size": 3}, {"type": "relu2x"}, {"type": "flatten"},
              {"type": "linear", "out_features": 4}]
    plain = [dict(d, type="relu") if d["type"] == "relu2x" else d for d in layers]
    x = np.random.default_rng(1).standard_normal((8, 1, 6, 6))
    y = np.arange(8) % 4
    doubled, reference, normal = _model([1, 6, 6], layers), _model([1, 6, 6], layers), _model([1, 6, 6], plain)
    reference.loss_and_grads(x, y)
    for m in (doubled, normal):
        engine.loss_and_grads(m, x, y)
    assert [type(s).__name__ for s in engine_for(doubled).stages][1] == "_LayerStage"
    for k, g in reference.named_grads().items():  # the engine ran DoubledReLU's own forward and backward...
        np.testing.assert_allclose(doubled.named_grads()[k], g, rtol=1e-10, atol=1e-12)
    # ...which is not what a fused ReLU would have computed
    assert not np.allclose(doubled.named_grads()["conv1.W"], normal.named_grads()["conv1.W"])


def test_a_batch_coupling_layer_makes_the_engine_run_the_whole_batch() -> None:
    _register_test_layers()
    model = _model([1, 6, 6], [{"type": "center"}, {"type": "flatten"}, {"type": "linear", "out_features": 3}])
    eng = engine_for(model)
    assert eng.whole_batch() and eng.worker_count(200) == 1
    model.eval()
    assert not eng.whole_batch() and eng.worker_count(200, train=False) > 0


# ------------------------------------------------------------------------------------ buffers and modes


def test_buffers_are_saved_loaded_not_optimized_and_not_decayed(tmp_path: Path) -> None:
    _register_test_layers()
    layers = [{"type": "scale", "name": "s1"}, {"type": "flatten"}, {"type": "linear", "out_features": 3}]
    cfg = build_config({"model": {"input_shape": [2, 3, 3], "layers": layers}})
    model = build_model(cfg.model)
    assert set(model.named_buffers()) == {"s1.calls"}
    assert model.decayed() == {"fc1.W"}  # Scale says decay = (): its 'a' is not decayed
    model.named_buffers()["s1.calls"][...] = 7
    params = model.named_params()
    opt = make_optimizer(params, cfg.train.optimizer, model.decayed())
    engine.loss_and_grads(model, np.ones((4, 2, 3, 3), np.float32), np.array([0, 1, 2, 0]))
    opt.step(params, model.named_grads(), 0.1)
    assert model.named_buffers()["s1.calls"][0] == 7  # the optimizer never touches a buffer
    path = save_checkpoint(tmp_path / "c.npz", model, cfg)
    with np.load(path, allow_pickle=False) as npz:
        assert "s1.calls" in npz.files and float(npz["s1.calls"][0]) == 7
    again = build_model(cfg.model, seed=5)
    from cnncli.run.checkpoint import apply_params

    apply_params(load_checkpoint(path), again, path)
    assert float(again.named_buffers()["s1.calls"][0]) == 7
    np.testing.assert_array_equal(again.named_params()["s1.a"], model.named_params()["s1.a"])


def test_modes_reach_every_layer_and_predict_uses_evaluation_mode() -> None:
    _register_test_layers()
    model = _model([1, 4, 4], [{"type": "center"}, {"type": "flatten"}, {"type": "linear", "out_features": 2}])
    x = np.random.default_rng(0).standard_normal((5, 1, 4, 4)) + 3.0
    assert model.training
    z_eval = engine.predict(model, x)  # evaluation mode: CenterBatch is the identity there
    assert model.training, "predict restores the mode"
    model.eval()
    np.testing.assert_allclose(z_eval, model.forward(x), rtol=1e-12)
    model.train()
    assert not np.allclose(z_eval, model.forward(x))


# ------------------------------------------------------------------------------------ user layer files


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_the_documented_example_passes_gradcheck() -> None:
    out = ok(runner.invoke(app, ["gradcheck", "--config", str(MY_CONFIG), "--layers", str(MY_LAYERS),
                                 "--batch", "2", "--max-entries", "25"]))
    for name in ("conv1.W", "conv2.W", "prelu1.a", "fc1.W", "X"):
        assert name in out
    assert "all gradients pass" in out


def test_a_sign_flipped_backward_fails_gradcheck_naming_the_tensor(tmp_path: Path) -> None:
    text = MY_LAYERS.read_text(encoding="utf-8")
    wrong = text.replace('self.grads["a"] = (dout * x * ~m).sum(axis=axes)',
                         'self.grads["a"] = -(dout * x * ~m).sum(axis=axes)')
    assert wrong != text
    broken = _write(tmp_path, "broken_layers.py", wrong)
    result = runner.invoke(app, ["gradcheck", "--config", str(MY_CONFIG), "--layers", str(broken),
                                 "--batch", "2", "--max-entries", "10", "--json"])
    assert result.exit_code == 1
    import json

    tensors = {t["name"]: t for t in json.loads(stdout_of(result))["tensors"]}
    assert not tensors["prelu1.a"]["passed"]
    assert tensors["conv2.W"]["passed"] and tensors["fc1.W"]["passed"]  # the rest is still right


def test_layer_file_errors_are_one_line(tmp_path: Path) -> None:
    args = ["summary", "--config", str(MY_CONFIG), "--layers"]
    err = one_line_error(runner.invoke(app, [*args, str(tmp_path / "nope.py")]))
    assert "nope.py" in err and "not found" in err
    empty = _write(tmp_path, "empty_layers.py", "X = 1\n")
    assert "defines no layer" in one_line_error(runner.invoke(app, [*args, str(empty)]))
    clash = _write(tmp_path, "clash.py", "from cnncli import Layer\n\nclass Mine(Layer):\n    type_name = 'conv'\n")
    err = one_line_error(runner.invoke(app, [*args, str(clash)]))
    assert "'conv'" in err and "built-in" in err
    bad = _write(tmp_path, "bad_syntax.py", "def f(:\n")
    assert "invalid Python at line 1" in one_line_error(runner.invoke(app, [*args, str(bad)]))
    # without the file, the config's user types are unknown, and the message says how to bring them
    err = one_line_error(runner.invoke(app, ["summary", "--config", str(MY_CONFIG)]))
    assert "unknown layer type \"swish\"" in err and "--layers" in err


def test_an_exception_in_the_users_own_forward_keeps_its_traceback(tmp_path: Path) -> None:
    text = MY_LAYERS.read_text(encoding="utf-8")
    crashing = text.replace("        self._x = x\n        self._sig",
                            "        raise RuntimeError('my bug')\n        self._sig")
    assert crashing != text
    path = _write(tmp_path, "crashing.py", crashing)
    cnn = Path(sys.executable).parent / "cnn"
    proc = subprocess.run([str(cnn), "gradcheck", "--config", str(MY_CONFIG), "--layers", str(path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "crashing.py" in proc.stderr and "my bug" in proc.stderr


def test_user_layers_train_an_epoch_and_eval_needs_the_same_file(real_cifar_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--layers", str(MY_LAYERS), "--data-dir", str(real_cifar_dir)]
    out = ok(runner.invoke(app, ["train", "--config", str(MY_CONFIG), "--out", str(run), "--epochs", "1",
                                 "--set", "data.limit=1500", "--set", "data.val_size=300", *common]))
    assert "test accuracy" in out
    ckpt = load_checkpoint(run / "best.npz")
    assert "prelu1.a" in ckpt.params
    registry.LAYER_TYPES.pop("swish")
    registry.LAYER_TYPES.pop("prelu")
    registry._LOADED.clear()
    err = one_line_error(runner.invoke(app, ["eval", str(run / "best.npz"), "--data-dir", str(real_cifar_dir)]))
    assert "best.npz" in err and "swish" in err and "--layers" in err
    res = ok(runner.invoke(app, ["eval", str(run / "best.npz"), "--json", *common]))
    assert '"accuracy"' in res


# --------------------------------------------------------------------------------------- declarations


def test_option_bounds_and_keys_come_from_the_declaration() -> None:
    _register_test_layers()
    with pytest.raises(ConfigError, match=r"model\.layers\[0\]\.init: must be greater than 0, got -1"):
        build_config({"model": {"layers": [{"type": "scale", "init": -1}]}})
    with pytest.raises(ConfigError, match=r"did you mean 'model\.layers\[0\]\.init'"):
        build_config({"model": {"layers": [{"type": "scale", "inti": 2}]}})


def test_readme_key_reference_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert registry.layer_reference() in readme, "regenerate the table: python -c 'from cnncli.nn.registry import " \
        "layer_reference; print(layer_reference())'"


def test_every_builtin_layer_cites_a_section_that_exists() -> None:
    docs = (ROOT / "docs" / "derivations.md").read_text(encoding="utf-8")
    anchors = {line[3:].strip().lower().replace(" ", "-") for line in docs.splitlines() if line.startswith("## ")}
    for name, cls in registry.LAYER_TYPES.items():
        assert cls.doc in anchors, f"{name}: docs/derivations.md has no section #{cls.doc}"

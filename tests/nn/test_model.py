"""The model built from a config (`cnncli/nn/model.py`): inferred shapes, default names, seeded He-normal init,
summary totals.

Shapes, parameter counts and multiply-adds are derived here from the textbook formulas, walking the raw YAML
layer list with our own code: H' = (H + 2·pad − K) // stride + 1; conv params C_out·C_in·K² + C_out and
multiply-adds C_out·H'·W'·C_in·K²; linear params in·out + out and multiply-adds in·out.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnncli.config import build_config, load_config
from cnncli.host.errors import ConfigError
from cnncli.nn.model import Sequential, build_model

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
DIAGRAM = ROOT / "configs" / "seed-diagram.yaml"


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _reference(input_shape: list[int], layers: list[dict]) -> list[dict]:
    """Per layer: name (None for parameter-free layers), param shapes, output shape, #params, multiply-adds."""
    shape = tuple(input_shape)
    n_conv = n_fc = 0
    rows = []
    for spec in layers:
        kind = spec["type"]
        row: dict = {"name": None, "params": {}, "macs": 0}
        if kind == "conv":
            n_conv += 1
            c, h, w = shape
            k, s, p = spec.get("kernel_size", 3), spec.get("stride", 1), spec.get("padding", 0)
            c_out = spec.get("out_channels", 16)
            ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            row["name"] = spec.get("name") or f"conv{n_conv}"
            row["params"] = {"W": (c_out, c, k, k), "b": (c_out,)}
            row["macs"] = c_out * ho * wo * c * k * k
            shape = (c_out, ho, wo)
        elif kind == "maxpool":
            c, h, w = shape
            k = spec.get("kernel_size", 2)
            s = spec.get("stride") or k
            shape = (c, (h - k) // s + 1, (w - k) // s + 1)
        elif kind == "flatten":
            shape = (math.prod(shape),)
        elif kind == "linear":
            n_fc += 1
            (n_in,) = shape
            n_out = spec.get("out_features", 10)
            row["name"] = spec.get("name") or f"fc{n_fc}"
            row["params"] = {"W": (n_out, n_in), "b": (n_out,)}
            row["macs"] = n_in * n_out
            shape = (n_out,)
        row["out"] = shape
        row["n_params"] = sum(math.prod(s) for s in row["params"].values())
        rows.append(row)
    return rows


def _expected_params(rows: list[dict]) -> dict[str, tuple[int, ...]]:
    return {f"{r['name']}.{k}": shp for r in rows if r["name"] for k, shp in r["params"].items()}


def _model(layers: list[dict], input_shape: list[int] | None = None, seed: int = 0, **kw) -> Sequential:
    raw = {"model": {"layers": layers}}
    if input_shape is not None:
        raw["model"]["input_shape"] = input_shape
    return build_model(build_config(raw).model, seed=seed, **kw)


# ------------------------------------------------------------------------------------------------ shapes


def test_seed_config_shapes() -> None:
    params = build_model(load_config(SEED).model, seed=0).named_params()
    assert {k: v.shape for k, v in params.items()} == {
        "conv1.W": (16, 3, 3, 3),
        "conv1.b": (16,),
        "fc1.W": (10, 4096),
        "fc1.b": (10,),
    }


def test_diagram_config_shapes() -> None:
    params = build_model(load_config(DIAGRAM).model, seed=0).named_params()
    assert params["conv1.W"].shape == (16, 3, 3, 3)
    assert params["conv2.W"].shape == (32, 16, 3, 3)
    assert params["conv2.b"].shape == (32,)
    assert params["fc1.W"].shape == (10, 8192)
    assert list(params) == ["conv1.W", "conv1.b", "conv2.W", "conv2.b", "fc1.W", "fc1.b"]


MODELS = {
    "seed": (_raw(SEED)["model"]["input_shape"], _raw(SEED)["model"]["layers"]),
    "diagram": (_raw(DIAGRAM)["model"]["input_shape"], _raw(DIAGRAM)["model"]["layers"]),
    "strided": (
        [3, 17, 13],
        [
            {"type": "conv", "out_channels": 5, "kernel_size": 5, "stride": 2, "padding": 2},
            {"type": "relu"},
            {"type": "maxpool", "kernel_size": 3, "stride": 1},
            {"type": "conv", "out_channels": 7, "kernel_size": 2, "stride": 3},
            {"type": "relu"},
            {"type": "flatten"},
            {"type": "linear", "out_features": 12},
            {"type": "relu"},
            {"type": "linear", "out_features": 4},
        ],
    ),
    "grey_non_square": (
        [1, 9, 20],
        [
            {"type": "conv", "out_channels": 2, "kernel_size": 3},
            {"type": "maxpool", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "out_features": 3},
        ],
    ),
}


@pytest.mark.parametrize("which", list(MODELS))
def test_every_shape_is_inferred_from_the_input_shape(which: str) -> None:
    input_shape, layers = MODELS[which]
    ref = _reference(input_shape, layers)
    model = _model(layers, input_shape)
    assert {k: v.shape for k, v in model.named_params().items()} == _expected_params(ref)
    assert model.input_shape == tuple(input_shape)
    assert model.output_shape == ref[-1]["out"]
    x = np.random.default_rng(1).standard_normal((2, *input_shape)).astype(np.float32)
    assert model.forward(x).shape == (2, *ref[-1]["out"])


@pytest.mark.parametrize("which", list(MODELS))
def test_summary_rows_and_totals_match_the_formulas(which: str) -> None:
    input_shape, layers = MODELS[which]
    ref = _reference(input_shape, layers)
    rows = _model(layers, input_shape).summary()
    assert len(rows) == len(layers)
    for i, (row, r, spec) in enumerate(zip(rows, ref, layers, strict=True)):
        assert row.index == i
        assert tuple(row.output_shape) == r["out"]
        assert row.params == r["n_params"]
        assert row.macs == r["macs"]
        assert row.name == (r["name"] or spec["type"])
    assert sum(r.params for r in rows) == sum(r["n_params"] for r in ref)
    assert sum(r.macs for r in rows) == sum(r["macs"] for r in ref)


def test_seed_summary_totals_by_hand() -> None:
    rows = build_model(load_config(SEED).model).summary()
    # conv1: 16·3·3·3 weights + 16 biases; fc1: 10·(16·16·16) weights + 10 biases
    assert sum(r.params for r in rows) == 16 * 27 + 16 + 10 * 4096 + 10
    # conv1 (pad 1 keeps 32×32): 16·32·32·3·9 multiply-adds; fc1: 4096·10
    assert sum(r.macs for r in rows) == 16 * 32 * 32 * 27 + 4096 * 10


def test_diagram_summary_totals_by_hand() -> None:
    rows = build_model(load_config(DIAGRAM).model).summary()
    conv1_p, conv2_p, fc1_p = 16 * 27 + 16, 32 * 16 * 9 + 32, 10 * 8192 + 10
    conv1_m, conv2_m, fc1_m = 16 * 32 * 32 * 27, 32 * 16 * 16 * 16 * 9, 8192 * 10
    assert sum(r.params for r in rows) == conv1_p + conv2_p + fc1_p
    assert sum(r.macs for r in rows) == conv1_m + conv2_m + fc1_m


def test_summary_param_counts_equal_the_arrays() -> None:
    model = build_model(load_config(DIAGRAM).model)
    assert sum(r.params for r in model.summary()) == sum(v.size for v in model.named_params().values())


# ------------------------------------------------------------------------------------------------- names


def test_default_names_count_convs_and_linears_separately() -> None:
    layers = [
        {"type": "conv", "out_channels": 4},
        {"type": "relu"},
        {"type": "conv", "out_channels": 4},
        {"type": "maxpool"},
        {"type": "conv", "out_channels": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 6},
        {"type": "relu"},
        {"type": "linear", "out_features": 3},
    ]
    model = _model(layers, [3, 12, 12])
    names = [n.rsplit(".", 1)[0] for n in model.named_params()]
    assert list(dict.fromkeys(names)) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    summary_names = [r.name for r in model.summary()]
    assert summary_names[0] == "conv1" and summary_names[2] == "conv2" and summary_names[-1] == "fc2"


def test_explicit_names_are_kept() -> None:
    layers = [
        {"type": "conv", "name": "stem", "out_channels": 4},
        {"type": "conv", "out_channels": 4},
        {"type": "flatten"},
        {"type": "linear", "name": "head"},
    ]
    model = _model(layers, [3, 8, 8])
    assert list(model.named_params()) == ["stem.W", "stem.b", "conv2.W", "conv2.b", "head.W", "head.b"]


def test_duplicate_names_are_a_config_error() -> None:
    layers = [
        {"type": "conv", "name": "conv2", "out_channels": 4},
        {"type": "conv", "out_channels": 4},  # defaults to conv2 too
        {"type": "flatten"},
        {"type": "linear"},
    ]
    with pytest.raises(ConfigError) as info:
        _model(layers, [3, 8, 8])
    assert "model.layers[1]" in str(info.value)
    assert "conv2" in str(info.value)


# ---------------------------------------------------------------------------------------------- init


def test_same_seed_gives_identical_weights() -> None:
    cfg = load_config(DIAGRAM)
    a, b = build_model(cfg.model, seed=3).named_params(), build_model(cfg.model, seed=3).named_params()
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_different_seeds_give_different_weights() -> None:
    cfg = load_config(DIAGRAM)
    a, b = build_model(cfg.model, seed=0).named_params(), build_model(cfg.model, seed=1).named_params()
    for k in ("conv1.W", "conv2.W", "fc1.W"):
        assert not np.array_equal(a[k], b[k]), k


def test_layers_get_different_weights_from_one_seed() -> None:
    # two identical conv layers must not be initialised with the same draw
    layers = [{"type": "conv", "out_channels": 3, "padding": 1}] * 2 + [{"type": "flatten"}, {"type": "linear"}]
    p = _model(layers, [3, 6, 6]).named_params()
    assert not np.array_equal(p["conv1.W"], p["conv2.W"])


def _std_bounds(n: int, target: float, z: float = 5.0) -> tuple[float, float]:
    # The sample std of n normal draws has standard error ≈ σ / sqrt(2n).
    se = target / math.sqrt(2 * n)
    return target - z * se, target + z * se


def test_seed_conv1_weights_are_he_normal() -> None:
    w = build_model(load_config(SEED).model, seed=0).named_params()["conv1.W"].astype(np.float64)
    target = math.sqrt(2 / (3 * 3 * 3))  # fan-in C_in·K² = 27
    lo, hi = _std_bounds(w.size, target)
    assert lo < w.std() < hi
    assert abs(w.mean()) < 5 * target / math.sqrt(w.size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_he_normal_scale_on_big_layers(seed: int) -> None:
    # conv1 has fan-in 3·3·3 = 27 (as in the seed config) but 512 filters: 13,824 draws
    layers = [{"type": "conv", "out_channels": 512, "kernel_size": 3}, {"type": "flatten"}, {"type": "linear"}]
    p = _model(layers, [3, 4, 4], seed=seed, dtype=np.float64).named_params()
    w = p["conv1.W"]
    lo, hi = _std_bounds(w.size, math.sqrt(2 / 27))
    assert lo < w.std() < hi
    assert abs(w.mean()) < 5 * math.sqrt(2 / 27) / math.sqrt(w.size)
    # fc1 sees 512·2·2 = 2048 features: std sqrt(2/2048) over 20,480 draws
    f = p["fc1.W"]
    lo, hi = _std_bounds(f.size, math.sqrt(2 / 2048))
    assert lo < f.std() < hi
    # roughly normal: about 68.3% of draws within one std of 0
    inside = np.mean(np.abs(w) < math.sqrt(2 / 27))
    assert abs(inside - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / w.size)


def test_dtype_option() -> None:
    cfg = load_config(SEED)
    assert all(v.dtype == np.float32 for v in build_model(cfg.model).named_params().values())
    m64 = build_model(cfg.model, dtype=np.float64)
    assert all(v.dtype == np.float64 for v in m64.named_params().values())
    assert m64.dtype == np.float64


def test_load_params_copies_weights_between_models() -> None:
    cfg = load_config(SEED)
    a, b = build_model(cfg.model, seed=0), build_model(cfg.model, seed=1)
    b.load_params(a.named_params())
    for k, v in a.named_params().items():
        np.testing.assert_array_equal(b.named_params()[k], v)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(a.forward(x), b.forward(x))


# ---------------------------------------------------------------------------------------- config errors


def test_empty_conv_output_names_the_layer_and_the_shapes() -> None:
    with pytest.raises(ConfigError) as info:
        _model([{"type": "conv", "kernel_size": 5}, {"type": "flatten"}, {"type": "linear"}], [3, 4, 4])
    msg = str(info.value)
    assert "model.layers[0]" in msg
    assert "conv1" in msg
    assert "3×4×4" in msg or "3x4x4" in msg or "(3, 4, 4)" in msg
    assert "empty" in msg


def test_empty_pool_output_names_the_layer() -> None:
    layers = [{"type": "conv", "out_channels": 2}, {"type": "maxpool", "kernel_size": 3}, {"type": "flatten"},
              {"type": "linear"}]
    with pytest.raises(ConfigError) as info:
        _model(layers, [1, 4, 4])  # conv 3×3 -> 2×2×2; a 3×3 pool does not fit
    msg = str(info.value)
    assert "model.layers[1]" in msg
    assert "2×2×2" in msg or "2x2x2" in msg or "(2, 2, 2)" in msg


def test_linear_before_flatten_names_the_layer_and_says_flatten() -> None:
    with pytest.raises(ConfigError) as info:
        _model([{"type": "conv", "out_channels": 2}, {"type": "linear"}], [3, 8, 8])
    msg = str(info.value)
    assert "model.layers[1]" in msg
    assert "fc1" in msg
    assert "flatten" in msg


def test_conv_after_flatten_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        _model([{"type": "flatten"}, {"type": "conv"}, {"type": "linear"}], [3, 8, 8])
    assert "model.layers[1]" in str(info.value)


def test_network_must_end_flat() -> None:
    with pytest.raises(ConfigError) as info:
        _model([{"type": "conv", "out_channels": 2}, {"type": "relu"}], [3, 8, 8])
    assert "model.layers" in str(info.value)

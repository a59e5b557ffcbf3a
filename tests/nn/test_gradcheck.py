"""The finite-difference gradient checker (`cnncli/nn/gradcheck.py`) and `cnn gradcheck`.

The shipped configs must pass everywhere; deliberately broken backward passes (monkeypatched) must be
reported as failures of exactly the affected tensors, with the relative error one can derive by hand:
scaling an analytic gradient a by 1.01 gives |1.01a − a| / (|1.01a| + |a|) = 0.01 / 2.01.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from clihelp import stdout_of as _stdout
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.config import build_config, load_config
from cnncli.nn import layers
from cnncli.nn.diagnose import rel_error
from cnncli.nn.gradcheck import TensorCheck, gradcheck
from cnncli.nn.model import Sequential, build_model

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
DIAGRAM = ROOT / "configs" / "seed-diagram.yaml"
TOL = 1e-6
SCALED_ERROR = 0.01 / 2.01  # rel_error(1.01·a, a) for any a ≠ 0

runner = CliRunner()


def _seed_model() -> Sequential:
    return build_model(load_config(SEED).model, seed=0)


def _by_name(results: list[TensorCheck]) -> dict[str, TensorCheck]:
    return {r.name: r for r in results}


# ------------------------------------------------------------------------------------------- rel_error


@pytest.mark.parametrize(
    ("a", "n", "expected"),
    [
        (1.0, 1.0, 0.0),
        (1.0, 3.0, 2.0 / 4.0),
        (-2.0, 2.0, 4.0 / 4.0),
        (0.0, 0.0, 0.0),  # the 1e-8 floor avoids 0/0
        (1e-9, -1e-9, 2e-9 / 1e-8),  # |a|+|n| = 2e-9 is below the floor
        (3e-8, 1e-8, 2e-8 / 4e-8),
        (1.01, 1.0, 0.01 / 2.01),
        (-5.0, -4.0, 1.0 / 9.0),
        (0.0, 0.5, 1.0),
    ],
)
def test_rel_error_hand_values(a: float, n: float, expected: float) -> None:
    assert float(rel_error(a, n)) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_rel_error_is_elementwise_and_symmetric() -> None:
    a = np.array([[1.0, 0.0], [2.0, -1.0]])
    n = np.array([[3.0, 0.0], [2.0, 1.0]])
    expected = np.array([[2 / 4, 0.0], [0.0, 2 / 2]])
    np.testing.assert_allclose(rel_error(a, n), expected, rtol=1e-15)
    np.testing.assert_allclose(rel_error(n, a), expected, rtol=1e-15)
    assert rel_error(a, n).shape == (2, 2)


# --------------------------------------------------------------------------------- the shipped configs


def test_seed_config_passes_everywhere_through_the_cli_json() -> None:
    """One full default run of `cnn gradcheck --json` on configs/seed.yaml."""
    result = runner.invoke(app, ["gradcheck", "--config", str(SEED), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(_stdout(result))
    assert isinstance(payload, dict)
    assert payload["passed"] is True
    params = _seed_model().named_params()
    tensors = {t["name"]: t for t in payload["tensors"]}
    assert set(tensors) == set(params) | {"X"}
    for name, t in tensors.items():
        assert t["max_rel_error"] <= TOL, (name, t)
        assert t["passed"] is True
        expected_shape = params[name].shape if name != "X" else (payload["batch"], 3, 32, 32)
        assert tuple(t["shape"]) == expected_shape
        assert t["size"] == math.prod(expected_shape)
        assert t["checked"] == min(t["size"], 200)


def test_diagram_config_passes_everywhere() -> None:
    """One full default run of the library checker on configs/seed-diagram.yaml."""
    model = build_model(load_config(DIAGRAM).model, seed=0)
    params = {k: v.shape for k, v in model.named_params().items()}
    results = gradcheck(model)
    by = _by_name(results)
    assert set(by) == set(params) | {"X"}
    assert "conv2.W" in by
    for r in results:
        assert r.max_rel_error <= TOL, r
        assert r.passed
        assert r.checked == min(r.size, 200)
        assert r.sampled == (r.size > 200)
    assert by["X"].shape == (4, 3, 32, 32)
    assert all(by[k].shape == shp for k, shp in params.items())


def test_small_model_with_strides_padding_and_overlapping_pools_passes_on_every_entry() -> None:
    raw = {
        "model": {
            "input_shape": [2, 9, 8],
            "layers": [
                {"type": "conv", "out_channels": 3, "kernel_size": 3, "stride": 2, "padding": 1},
                {"type": "relu"},
                {"type": "maxpool", "kernel_size": 2, "stride": 1},  # overlapping windows
                {"type": "conv", "out_channels": 4, "kernel_size": 2},
                {"type": "relu"},
                {"type": "flatten"},
                {"type": "linear", "out_features": 5},
                {"type": "relu"},
                {"type": "linear", "out_features": 3},
            ],
        }
    }
    model = build_model(build_config(raw).model, seed=4)
    results = gradcheck(model, batch=3, max_entries=10**6, seed=4)
    assert {r.name for r in results} == set(model.named_params()) | {"X"}
    for r in results:
        assert not r.sampled and r.checked == r.size
        assert r.max_rel_error <= TOL, r


def test_a_model_without_kinks_reports_none() -> None:
    raw = {"model": {"input_shape": [2, 3, 3], "layers": [{"type": "flatten"}, {"type": "linear", "out_features": 4}]}}
    results = gradcheck(build_model(build_config(raw).model), batch=2)
    assert all(r.kinks == 0 and r.passed for r in results)


# ------------------------------------------------------------------------------------------ parameters


def test_sampling_batch_and_explicit_inputs() -> None:
    model = _seed_model()
    x = np.random.default_rng(9).standard_normal((2, 3, 32, 32))
    x_before = x.copy()
    y = np.array([3, 7])
    results = _by_name(gradcheck(model, x=x, y=y, max_entries=30))
    np.testing.assert_array_equal(x, x_before)  # the caller's batch is not perturbed
    assert results["X"].shape == (2, 3, 32, 32)
    assert results["conv1.W"].checked == 30 and results["conv1.W"].sampled
    assert results["conv1.b"].checked == 16 and not results["conv1.b"].sampled
    assert results["fc1.b"].checked == 10
    for r in results.values():
        assert len(r.worst_index) == len(r.shape)
        assert all(0 <= i < s for i, s in zip(r.worst_index, r.shape, strict=True))
        assert r.passed
    assert model.dtype == np.float64  # the check runs in float64


def test_batch_size_sets_the_shape_of_x() -> None:
    results = _by_name(gradcheck(_seed_model(), batch=3, max_entries=5))
    assert results["X"].shape == (3, 3, 32, 32)
    assert results["X"].size == 3 * 3 * 32 * 32


def test_same_seed_same_report() -> None:
    a = gradcheck(_seed_model(), max_entries=20, seed=5)
    b = gradcheck(_seed_model(), max_entries=20, seed=5)
    assert a == b


# ------------------------------------------------------------------------------------- fault injection


def _scale_param_grads(monkeypatch: pytest.MonkeyPatch, cls: type, factor: float = 1.01) -> None:
    original = cls.backward

    def broken(self, dout):
        dx = original(self, dout)
        self.grads = {k: v * factor for k, v in self.grads.items()}
        return dx

    monkeypatch.setattr(cls, "backward", broken)


def test_broken_linear_backward_fails_the_linear_tensors_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _scale_param_grads(monkeypatch, layers.Linear)
    by = _by_name(gradcheck(_seed_model(), max_entries=30))
    for name in ("fc1.W", "fc1.b"):
        assert not by[name].passed
        assert by[name].max_rel_error == pytest.approx(SCALED_ERROR, rel=1e-5)
    for name in ("conv1.W", "conv1.b", "X"):
        assert by[name].passed and by[name].max_rel_error <= TOL


def test_broken_conv_backward_fails_the_conv_tensors_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _scale_param_grads(monkeypatch, layers.Conv2D)
    by = _by_name(gradcheck(_seed_model(), max_entries=30))
    for name in ("conv1.W", "conv1.b"):
        assert not by[name].passed
        assert by[name].max_rel_error == pytest.approx(SCALED_ERROR, rel=1e-5)
    for name in ("fc1.W", "fc1.b", "X"):
        assert by[name].passed


def test_broken_input_gradient_fails_x_only(monkeypatch: pytest.MonkeyPatch) -> None:
    original = layers.Conv2D.backward

    def broken(self, dout):
        dx = original(self, dout)
        return None if dx is None else dx * 1.01

    monkeypatch.setattr(layers.Conv2D, "backward", broken)
    by = _by_name(gradcheck(_seed_model(), max_entries=30))
    assert not by["X"].passed
    assert by["X"].max_rel_error == pytest.approx(SCALED_ERROR, rel=1e-5)
    assert all(by[k].passed for k in ("conv1.W", "conv1.b", "fc1.W", "fc1.b"))


def test_relu_backward_ignoring_its_mask_fails_everything_below_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers.ReLU, "backward", lambda self, dout: dout)
    by = _by_name(gradcheck(_seed_model(), max_entries=30))
    for name in ("conv1.W", "conv1.b", "X"):
        assert not by[name].passed, by[name]
        assert by[name].max_rel_error > 1e-3
    for name in ("fc1.W", "fc1.b"):  # above the ReLU: unaffected
        assert by[name].passed


def test_maxpool_backward_routing_to_the_wrong_entry_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    original = layers.MaxPool2D.backward

    def broken(self, dout):
        saved = self._argmax
        self._argmax = np.zeros_like(saved)  # always the window's top-left entry
        try:
            return original(self, dout)
        finally:
            self._argmax = saved

    monkeypatch.setattr(layers.MaxPool2D, "backward", broken)
    by = _by_name(gradcheck(_seed_model(), max_entries=30))
    assert not by["conv1.b"].passed
    assert not by["X"].passed


def test_tolerance_decides_pass_or_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    _scale_param_grads(monkeypatch, layers.Linear)
    loose = _by_name(gradcheck(_seed_model(), max_entries=10, tol=1e-2))
    tight = _by_name(gradcheck(_seed_model(), max_entries=10, tol=1e-3))
    assert loose["fc1.W"].passed  # 0.01/2.01 ≈ 0.005 <= 0.01
    assert not tight["fc1.W"].passed  # 0.005 > 0.001


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_prints_a_table_and_exits_0() -> None:
    result = runner.invoke(app, ["gradcheck", "--config", str(SEED), "--max-entries", "30"])
    assert result.exit_code == 0, result.output
    out = _stdout(result)
    rows = {}
    for name in ("conv1.W", "conv1.b", "fc1.W", "fc1.b", "X"):
        lines = [line for line in out.splitlines() if f" {name} " in line and line.startswith("│")]  # table rows
        assert len(lines) == 1, (name, out)
        rows[name] = lines[0]
        assert "pass" in lines[0].lower()
    assert "16×3×3×3" in rows["conv1.W"] or "16x3x3x3" in rows["conv1.W"]
    assert "FAIL" not in out


def test_cli_json_is_one_object_with_per_tensor_errors() -> None:
    result = runner.invoke(app, ["gradcheck", "--config", str(SEED), "--json", "--max-entries", "20", "--batch", "2"])
    assert result.exit_code == 0, result.output
    payload = json.loads(_stdout(result))  # the whole stdout is one JSON document
    assert payload["passed"] is True
    assert payload["batch"] == 2
    names = [t["name"] for t in payload["tensors"]]
    assert sorted(names) == sorted(["conv1.W", "conv1.b", "fc1.W", "fc1.b", "X"])
    for t in payload["tensors"]:
        assert isinstance(t["max_rel_error"], float)
        assert 0 <= t["max_rel_error"] <= TOL
        assert t["checked"] == min(t["size"], 20)


def test_cli_reports_a_broken_backward_and_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    _scale_param_grads(monkeypatch, layers.Linear)
    result = runner.invoke(app, ["gradcheck", "--config", str(SEED), "--max-entries", "30"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    out = _stdout(result)
    fc_lines = [line for line in out.splitlines() if " fc1.W " in line]
    assert len(fc_lines) == 1 and "FAIL" in fc_lines[0]

    result = runner.invoke(app, ["gradcheck", "--config", str(SEED), "--max-entries", "30", "--json"])
    assert result.exit_code == 1
    payload = json.loads(_stdout(result))
    assert payload["passed"] is False
    tensors = {t["name"]: t for t in payload["tensors"]}
    assert tensors["fc1.W"]["passed"] is False
    assert tensors["fc1.W"]["max_rel_error"] == pytest.approx(SCALED_ERROR, rel=1e-5)
    assert tensors["conv1.W"]["passed"] is True

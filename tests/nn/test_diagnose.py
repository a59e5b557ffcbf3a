"""The diagnosis of a failing gradient (cnncli/nn/diagnose.py) on hand-made analytic/numeric pairs, and the layer
contract (cnncli/nn/contracts.py) on small layers: each case is built so that its answer is known by construction
(a numeric gradient, then the analytic one made from it by the bug)."""

from __future__ import annotations

import numpy as np
import pytest

from cnncli.nn import contracts
from cnncli.nn.diagnose import diagnose, diagnose_shape, fd_noise, is_special, layer_errors, move_off, rel_error
from cnncli.nn.layers import Linear, Tanh

RNG = np.random.default_rng(5)
N_VALUES = RNG.standard_normal(40) + np.sign(RNG.standard_normal(40)) * 0.1
INDEX = [(i // 8, i % 8) for i in range(40)]
SIZES = {"N": 4, "C": 5, "H": 8, "W": 8}


def _kind(a: np.ndarray) -> object:
    return diagnose(a, N_VALUES, INDEX, (5, 8), 1e-6, SIZES, ("c", "col"))


def test_agreeing_is_ok_and_a_flipped_sign_is_named() -> None:
    assert _kind(N_VALUES * (1 + 1e-9)).kind == "ok"
    d = _kind(-N_VALUES)
    assert d.kind == "sign-flipped" and d.factor == -1.0


@pytest.mark.parametrize("factor, words", [
    (1 / 256, "1/256 × numeric on every checked entry (256 = N·H·W = 4·8·8: a mean where a sum belongs"),
    (1 / 4, "1/4 × numeric on every checked entry (4 = N: a mean where a sum belongs"),
    (4.0, "4 × numeric on every checked entry (4 = N: a missing average"),
    (2.0, "2 × numeric"),
    (0.37, "0.37 × numeric"),
])
def test_a_constant_factor_is_named_from_the_layer_sizes(factor: float, words: str) -> None:
    d = _kind(N_VALUES * factor)
    assert d.kind == "constant-factor" and d.factor == pytest.approx(factor)
    assert words in d.text


def test_zero_unused_and_zero_on_both_sides() -> None:
    assert _kind(np.zeros(40)).kind == "zero"
    d = diagnose(N_VALUES, np.zeros(40), INDEX, (5, 8), 1e-6)
    assert d.kind == "not-used"
    d = diagnose(np.zeros(40), np.zeros(40), INDEX, (5, 8), 1e-6)
    assert d.kind == "zero-both-sides" and d.text.startswith("not checked") and "--layer" in d.advice


def test_a_few_wrong_entries_are_located_with_what_they_share() -> None:
    a = N_VALUES.copy()
    bad = [i for i, (_, col) in enumerate(INDEX) if col == 7]  # the last column: an off-by-one
    a[bad] += 1.0
    d = _kind(a)
    assert d.kind == "few-entries" and {w[1] for w in d.where} == {7} and len(d.where) == 5
    assert "axis 1 (col) = 7 (its last, of 8)" in d.text


def test_wrong_throughout() -> None:
    assert _kind(N_VALUES + RNG.standard_normal(40)).kind == "wrong"


def test_wrong_shape_names_the_extra_axis_and_tries_the_sum() -> None:
    numeric = RNG.standard_normal(6)
    per_example = RNG.standard_normal((3, 6))
    per_example[0] += numeric - per_example.sum(axis=0)  # its sum over the batch is the right gradient
    d = diagnose_shape(per_example, numeric, [(i,) for i in range(6)], (6,), 1e-6, batch=3)
    assert d.kind == "wrong-shape" and "axis 0 of size 3 is extra (the batch N" in d.text
    assert "summed over axis 0 it matches" in d.text
    d = diagnose_shape(RNG.standard_normal((6, 4)), RNG.standard_normal(24), [(i // 4, i % 4) for i in range(24)],
                       (4, 6), 1e-6, batch=3)
    assert "transposed" in d.text


def test_special_values_and_moving_off_them() -> None:
    assert is_special(np.ones(4)) == 1.0 and is_special(np.zeros(3)) == 0.0
    assert is_special(np.array([1.0])) == 1.0 and is_special(np.array([0.7])) is None
    assert is_special(np.full(5, 0.25)) == 0.25 and is_special(np.arange(3.0)) is None
    moved = move_off(np.ones(100), np.random.default_rng(0))
    assert is_special(moved) is None and 0.5 <= moved.min() and moved.max() <= 1.5


def test_layer_errors_find_a_wrong_backward_of_a_builtin_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = Linear(6, 3, rng=np.random.default_rng(0), dtype=np.float64)
    x = np.random.default_rng(1).standard_normal((2, 6))
    errors = layer_errors(layer, x, np.random.default_rng(2))
    assert max(errors.values()) < 1e-8 and set(errors) == {"δx", "grads['W']", "grads['b']"}
    original = Linear.backward

    def half_db(self: Linear, dout: np.ndarray) -> np.ndarray:
        dx = original(self, dout)
        self.grads["b"] = self.grads["b"] / 2
        return dx

    monkeypatch.setattr(Linear, "backward", half_db)
    errors = layer_errors(layer, x, np.random.default_rng(2))
    assert errors["grads['b']"] > 0.1 and errors["δx"] < 1e-8 and errors["grads['W']"] < 1e-8


# ------------------------------------------------------------------------------------------- contracts


def test_builtin_layers_are_checked_only_under_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Tanh, "backward", lambda self, dout: None)  # a missing return
    x = np.random.default_rng(0).standard_normal((2, 3))
    layer = Tanh()
    contracts.forward(layer, x)
    assert contracts.backward(layer, x) is None  # built-in, flag unset: not checked
    monkeypatch.setenv(contracts.ENV, "all")
    layer = Tanh()
    contracts.forward(layer, x)
    with pytest.raises(contracts.LayerContractError, match=r"tanh \(Tanh\): backward returned None; expected δx of "
                       r"shape \(2, 3\)"):
        contracts.backward(layer, x)


def test_a_checked_layer_is_checked_once_and_off_turns_checking_off(monkeypatch: pytest.MonkeyPatch) -> None:
    class Doubler(Tanh):
        type_name = ""
        calls = 0

        def output_shape(self, input_shape):  # the contract asks for it: counts the checks
            Doubler.calls += 1
            return tuple(input_shape)

    x = np.ones((2, 3))
    layer = Doubler()
    for _ in range(3):
        contracts.forward(layer, x)
    assert Doubler.calls == 1
    monkeypatch.setenv(contracts.ENV, "off")
    contracts.forward(Doubler(), x)
    assert Doubler.calls == 1


def test_non_finite_output_for_a_finite_input_is_named() -> None:
    class Blows(Tanh):
        type_name = ""

        def forward(self, x):
            return np.log(x - 10.0)

    with np.errstate(invalid="ignore"), pytest.raises(contracts.LayerContractError,
                                                      match=r"forward returned 6 non-finite values \(nan\) of 6"):
        contracts.forward(Blows(), np.ones((2, 3)))


def test_the_check_layers_flag_checks_cnnclis_own_layers_in_a_command(monkeypatch: pytest.MonkeyPatch,
                                                                     real_cifar_dir) -> None:
    from clihelp import one_line_error
    from typer.testing import CliRunner

    from cnncli.cli.app import app

    monkeypatch.delenv(contracts.ENV, raising=False)  # restored after the test (the flag sets it)
    monkeypatch.setattr(Tanh, "forward", lambda self, x: np.tanh(x)[:, :-1])  # one feature short
    args = ["trace", "--set", "model.layers=[{type: flatten}, {type: tanh}, {type: linear, out_features: 10}]",
            "--data-dir", str(real_cifar_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and not isinstance(result.exception, SystemExit)  # unchecked: a crash
    line = one_line_error(CliRunner().invoke(app, ["--check-layers", *args]))
    assert "layer tanh (Tanh): forward returned shape (1, 3071), but output_shape(3072,) says (3072,)" in line


def test_an_entry_zero_on_both_sides_agrees_but_a_missed_gradient_does_not() -> None:
    """1e-14 against 3e-14 is five-point rounding residue (CS231n's formula reads it as 1.0 through its 1e-8
    floor); 1e-14 against 1e-6 is a gradient the backward missed."""
    idx = [(i,) for i in range(6)]
    a = np.array([0.5, -0.25, 1e-14, 2.0, 0.125, 1.0])
    n = np.array([0.5, -0.25, 3e-14, 2.0, 0.125, 1.0])
    assert diagnose(a, n, idx, (6,), 1e-7).kind == "ok"
    assert rel_error(1e-14, 3e-14) > 1e-7  # the plain formula alone would fail it
    missed = n.copy()
    missed[2] = 1e-6
    d = diagnose(a, missed, idx, (6,), 1e-7)
    assert d.kind == "few-entries" and d.where == ((2,),)


def test_a_gap_within_the_finite_differences_rounding_agrees() -> None:
    """An input gradient of 5e-8 read 1.3e-13 off by the five-point difference (an airbench-shaped network, L ≈ 1.6,
    ε = 5e-4): CS231n's formula gives 1.3e-6 > 1e-7, but the gap is below the difference's rounding, fd_noise, a
    figure derived by hand here: 8 · 2⁻⁵² · L · (18/12) / ε."""
    noise = fd_noise(1.6, 5e-4)
    assert noise == pytest.approx(8 * 2.0**-52 * 1.6 * 1.5 / 5e-4, rel=1e-12)
    idx = [(i,) for i in range(4)]
    a = np.array([-5.073942673909117e-08, 0.3, -0.7, 0.02])
    n = np.array([-5.073956070115552e-08, 0.3, -0.7, 0.02])
    assert diagnose(a, n, idx, (4,), 1e-7).kind != "ok"  # judged without the noise: a false alarm
    assert diagnose(a, n, idx, (4,), 1e-7, noise=noise).kind == "ok"
    wrong = a * np.array([1.0, 1.0, 1.0, 1.001])  # a real error of 2e-5 stays one
    assert diagnose(wrong, n, idx, (4,), 1e-7, noise=noise).kind == "few-entries"

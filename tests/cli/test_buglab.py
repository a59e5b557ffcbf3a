"""The bug table of issue #23: realistic bugs in user layers (tests/buglab.py), each run through `cnn gradcheck`,
`cnn gradcheck --layer` and `cnn train`. Every one must be caught by at least one of them and named (layer,
tensor, kind), and none may end in a traceback from inside cnncli.

The oracle is the bug itself: each row knows what was broken (the tensor, the kind: a sign, a factor of
1/(N·H·W), an extra batch axis, ...), so the diagnosis is compared against what was put in, not against the
checker's own output. The correct files pass every command (the same assertions fail there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from buglab import BUGS, config, source
from clihelp import one_line_error, stdout_of
from typer.testing import CliRunner

from cnncli.cli.app import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("clean_registry")  # layer types a test registers vanish after it


def _files(tmp_path: Path, bug: str | None, kind: str, train: bool = False) -> tuple[Path, Path]:
    layer_file = tmp_path / f"{kind}_{bug or 'ok'}.py"
    layer_file.write_text(source(bug, kind))
    cfg = tmp_path / f"{kind}{'-train' if train else ''}.yaml"
    data = "data: {limit: 300, val_size: 100}\n" if train else ""
    cfg.write_text(config(kind, (3, 32, 32) if train else (3, 8, 8), data))
    return layer_file, cfg


def _no_traceback(result: Any) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def gradcheck(tmp_path: Path, bug: str | None, kind: str, *extra: str) -> tuple[int, Any]:
    layer_file, cfg = _files(tmp_path, bug, kind)
    result = runner.invoke(app, ["gradcheck", "-c", str(cfg), "--layers", str(layer_file), "--json", "-q", *extra])
    _no_traceback(result)
    if result.exit_code == 1 and not stdout_of(result).strip():
        return 1, one_line_error(result)
    return result.exit_code, json.loads(stdout_of(result))


def layer_check(tmp_path: Path, bug: str | None, kind: str) -> tuple[int, Any]:
    return gradcheck(tmp_path, bug, kind, "--layer", f"{kind}1")


def _tensor(report: dict, name: str) -> dict:
    return next(t for t in report["tensors"] if t["name"] == name)


def _first_failure(report: dict, name: str) -> dict:
    return next(t for t in report["tensors"] if t["name"] == name and not t["passed"])


KIND = {bug: row[0] for bug, row in BUGS.items()}
CONTRACT = {  # bugs the contract names on the first call, the same line in every command
    "accumulate": "backward writes into grads['beta'] in place",
    "dx-shape": "backward returned δx of shape (4, 256); expected (4, 4, 8, 8)",
    "forward-shape": "forward returned shape (4, 4, 7, 8), but output_shape(4, 8, 8) says (4, 8, 8)",
    "none": "backward returned None; expected δx of shape (4, 4, 8, 8)",
    "no-super": "__init__ did not call super().__init__()",
}


def test_the_correct_layers_pass_everything(tmp_path: Path) -> None:
    for kind in ("swishb", "myconv"):
        code, report = gradcheck(tmp_path, None, kind)
        assert code == 0 and report["passed"] and not report["not_checked"], report
        assert report["layer_at_fault"] is None
        code, report = layer_check(tmp_path, None, kind)
        assert code == 0 and report["passed"]
        # several shapes (batch 1 and 3, odd sizes), both modes
        cases = {(tuple(t["case"]["shape"]), t["case"]["batch"], t["case"]["mode"]) for t in report["tensors"]}
        assert {c[1] for c in cases} == {1, 3} and {c[2] for c in cases} == {"train", "eval"}
        assert any(s[1] % 2 for s, _, _ in cases)


@pytest.mark.parametrize("bug", sorted(CONTRACT))
def test_contract_bugs_are_one_line_in_gradcheck_and_layer_check(tmp_path: Path, bug: str) -> None:
    code, line = gradcheck(tmp_path, bug, KIND[bug])
    assert code == 1 and isinstance(line, str)
    assert "layer swishb" in line and "SwishB from swishb_" in line, line
    assert CONTRACT[bug] in line, line
    code, line2 = layer_check(tmp_path, bug, KIND[bug])
    assert code == 1 and isinstance(line2, str) and "layer swishb" in line2 and CONTRACT[bug].split(" (")[0] in line2


def test_sign(tmp_path: Path) -> None:
    code, report = gradcheck(tmp_path, "sign", "swishb")
    assert code == 1
    beta = _tensor(report, "swishb1.beta")
    assert beta["status"] == "fail" and beta["diagnosis"]["kind"] == "sign-flipped"
    assert beta["diagnosis"]["factor"] == -1.0
    w = beta["worst"][0]
    assert w["analytic"] == pytest.approx(-w["numeric"], rel=1e-6)
    assert report["layer_at_fault"]["name"] == "swishb1" and report["layer_at_fault"]["wrong"] == ["grads['beta']"]
    for other in ("conv1.W", "conv1.b", "fc1.W", "X"):  # δx of the layer is right: nothing else fails
        assert _tensor(report, other)["passed"]
    code, report = layer_check(tmp_path, "sign", "swishb")
    assert code == 1 and _first_failure(report, "beta")["diagnosis"]["kind"] == "sign-flipped"


def test_factor_names_a_mean_where_a_sum_belongs(tmp_path: Path) -> None:
    code, report = gradcheck(tmp_path, "factor", "swishb")
    beta = _tensor(report, "swishb1.beta")["diagnosis"]
    # the mean over (N, H, W) = (4, 8, 8) of the batch: 1/256
    assert beta["kind"] == "constant-factor" and beta["factor"] == pytest.approx(1 / 256, rel=1e-6)
    assert "1/256" in beta["text"] and "N·H·W" in beta["text"] and "a mean where a sum belongs" in beta["text"]
    code, report = layer_check(tmp_path, "factor", "swishb")
    first = _first_failure(report, "beta")
    n, (_, h, w) = first["case"]["batch"], first["case"]["shape"]
    assert first["diagnosis"]["factor"] == pytest.approx(1 / (n * h * w), rel=1e-6)


def test_missing_batch_sum_names_the_extra_axis(tmp_path: Path) -> None:
    code, report = gradcheck(tmp_path, "batch-sum", "swishb")
    beta = _tensor(report, "swishb1.beta")["diagnosis"]
    assert beta["kind"] == "wrong-shape"
    assert "axis 0 of size 4 is extra (the batch N: a missing sum over the batch)" in beta["text"]
    assert "summed over axis 0 it matches the finite differences" in beta["text"]
    code, report = layer_check(tmp_path, "batch-sum", "swishb")
    assert _first_failure(report, "beta")["diagnosis"]["kind"] == "wrong-shape"


@pytest.mark.parametrize("bug", ["never-set", "wrong-key"])
def test_a_gradient_never_set(tmp_path: Path, bug: str) -> None:
    code, report = gradcheck(tmp_path, bug, "swishb")
    beta = _tensor(report, "swishb1.beta")
    assert code == 1 and beta["diagnosis"]["kind"] == "grad-never-set"
    assert "never set grads['beta']" in beta["diagnosis"]["text"]
    assert ("grads['b'] instead" in beta["diagnosis"]["text"]) == (bug == "wrong-key")
    code, report = layer_check(tmp_path, bug, "swishb")
    assert _first_failure(report, "beta")["diagnosis"]["kind"] == "grad-never-set"


def test_special_value_beta_left_out_of_dx(tmp_path: Path) -> None:
    # With β kept at its initial 1 the bug is invisible: reported "not checked", not "pass".
    code, report = gradcheck(tmp_path, "special-value", "swishb", "--initial-params")
    assert code == 0 and "swishb1.beta" in report["not_checked"]
    assert _tensor(report, "swishb1.beta")["diagnosis"]["kind"] == "special-value"
    # By default gradcheck draws β at random around 1: the bug shows, and the layer at fault is named.
    code, report = gradcheck(tmp_path, "special-value", "swishb")
    assert code == 1 and {"name": "swishb1.beta", "value": 1.0} in report["moved_off_special_values"]
    assert report["layer_at_fault"]["name"] == "swishb1" and report["layer_at_fault"]["wrong"] == ["δx"]
    assert _tensor(report, "conv1.W")["inherited_from"] == "swishb1"
    assert _tensor(report, "swishb1.beta")["passed"]
    code, report = layer_check(tmp_path, "special-value", "swishb")
    assert code == 1 and not _first_failure(report, "δx")["passed"]


def test_zero_bias(tmp_path: Path) -> None:
    code, report = gradcheck(tmp_path, "zero-bias", "myconv")
    b = _tensor(report, "myconv1.b")
    assert b["status"] == "not checked" and b["diagnosis"]["kind"] == "zero-both-sides"
    assert "--layer" in b["diagnosis"]["advice"]
    code, report = layer_check(tmp_path, "zero-bias", "myconv")
    assert code == 1 and _first_failure(report, "b")["diagnosis"]["kind"] == "unused"
    assert all(t["passed"] for t in report["tensors"] if t["name"] != "b")


def test_conv_indexing_bug_says_where(tmp_path: Path) -> None:
    code, report = gradcheck(tmp_path, "conv-index", "myconv")
    x = _tensor(report, "X")
    assert code == 1 and x["diagnosis"]["kind"] == "few-entries"
    # the loop skips the last output row i = 7: with K = 3, pad 1 the input rows 6 and 7 lose a term
    assert {w[2] for w in x["diagnosis"]["where"]} == {6, 7}
    assert "axis 2 (row) in 6…7" in x["diagnosis"]["text"]
    assert report["layer_at_fault"]["name"] == "myconv1" and report["layer_at_fault"]["wrong"] == ["δx"]
    code, report = layer_check(tmp_path, "conv-index", "myconv")
    first = _first_failure(report, "δx")
    assert first["diagnosis"]["kind"] == "few-entries"
    h = first["case"]["shape"][1]
    assert {w[2] for w in first["diagnosis"]["where"]} <= {h - 2, h - 1}


TRAIN_CAUGHT = {
    "batch-sum": "backward set grads['beta'] of shape (",
    "never-set": "backward never set grads['beta']",
    "wrong-key": "set grads['b'], which is not a parameter, and never set grads['beta']",
    "accumulate": CONTRACT["accumulate"],
    "dx-shape": "backward returned δx of shape (25, 4096); expected (25, 4, 32, 32)",  # a micro-batch of 25
    "forward-shape": "forward returned shape (25, 4, 31, 32), but output_shape(4, 32, 32) says (4, 32, 32)",
    "none": "backward returned None; expected δx of shape (25, 4, 32, 32)",
    "no-super": CONTRACT["no-super"],
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_train_names_contract_bugs_and_never_shows_a_traceback(tmp_path: Path, real_cifar_dir: Path,
                                                              bug: str) -> None:
    layer_file, cfg = _files(tmp_path, bug, KIND[bug], train=True)
    result = runner.invoke(app, ["train", "-c", str(cfg), "--layers", str(layer_file), "--data-dir",
                                 str(real_cifar_dir), "--out", str(tmp_path / "run"), "-q"])
    _no_traceback(result)
    if bug in TRAIN_CAUGHT:
        line = one_line_error(result)
        assert TRAIN_CAUGHT[bug] in line and "(SwishB from swishb_" in line, line
        assert "missing sum over the batch" in line or bug != "batch-sum"
    else:  # numerically wrong but well-formed: training runs (gradcheck and --layer catch these)
        assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------ cnn trace


def _trace(tmp_path: Path, bug: str | None, real_cifar_dir: Path) -> tuple[int, dict]:
    from cnncli.run.lab import isolated_registry

    layer_file, cfg = _files(tmp_path, bug, "swishb", train=True)
    with isolated_registry():  # each run its own file defining the type
        result = runner.invoke(app, ["trace", "-c", str(cfg), "--layers", str(layer_file), "--data-dir",
                                     str(real_cifar_dir), "--json", "--save", str(tmp_path / "t.npz")])
    _no_traceback(result)
    assert stdout_of(result).strip(), result.output
    return result.exit_code, json.loads(stdout_of(result))


def test_trace_prints_checks_and_saves_a_user_layers_parameter_gradient(tmp_path: Path,
                                                                         real_cifar_dir: Path) -> None:
    import numpy as np

    code, report = _trace(tmp_path, None, real_cifar_dir)
    steps = {s["key"]: s for s in report["steps"]}
    assert code == 0 and steps["dbeta_swishb1"]["check"]["passed"]
    assert steps["dbeta_swishb1"]["shape"] == [4] and steps["swishb1"]["section"] == "§?swishb swishb1"
    saved = np.load(tmp_path / "t.npz", allow_pickle=False)
    assert {"beta_swishb1", "dbeta_swishb1", "swishb1", "dswishb1"} <= set(saved.files)
    # the saved δβ is the gradient: Σ over positions of δy · x² σ'(βx) at β = 1, from the saved tensors
    x, dy = saved["S1"], saved["dswishb1"]
    sig = 1 / (1 + np.exp(-x))
    assert np.allclose(saved["dbeta_swishb1"], (dy * x * x * sig * (1 - sig)).sum(axis=(1, 2)), rtol=1e-10)
    # a sign flipped in δβ is caught by the trace's own finite differences
    code, report = _trace(tmp_path, "sign", real_cifar_dir)
    steps = {s["key"]: s for s in report["steps"]}
    assert code == 1 and not steps["dbeta_swishb1"]["check"]["passed"]


def test_a_user_layer_inside_a_residual_block_keeps_the_contract(tmp_path: Path) -> None:
    layer_file = tmp_path / "swishb_none.py"
    layer_file.write_text(source("none"))
    cfg = tmp_path / "res.yaml"
    cfg.write_text("model:\n  input_shape: [3, 6, 6]\n  layers:\n"
                   "    - {type: residual, layers: [{type: conv, out_channels: 3, kernel_size: 3, padding: 1},"
                   " {type: swishb}]}\n    - {type: flatten}\n    - {type: linear, out_features: 10}\n")
    result = runner.invoke(app, ["gradcheck", "-c", str(cfg), "--layers", str(layer_file), "-q"])
    line = one_line_error(result)
    assert "layer swishb1 (SwishB from swishb_none.py): backward returned None" in line

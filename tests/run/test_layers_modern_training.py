"""The new layers in the commands: `cnn trace` (the docs' quantities, every gradient checked, vanishing δ made
visible), `cnn summary` (parameters, buffers and multiply-adds), one-line config errors from the CLI, and a
training run with dropout stopped mid-epoch and resumed bit-identically (real CIFAR-10, a small slice).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from clihelp import ok, one_line_error
from helpers import StopAt, assert_same_training_state
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.config import build_config, load_config
from cnncli.nn.model import Sequential, build_model
from cnncli.nn.trace import trace
from cnncli.run.checkpoint import load_checkpoint
from cnncli.run.train import TrainingInterrupted, train

runner = CliRunner()

NET = [  # every new layer, on 3×8×8 inputs
    {"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False},
    {"type": "batchnorm"}, {"type": "relu"},
    {"type": "residual", "layers": [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1},
                                    {"type": "batchnorm"}, {"type": "leakyrelu", "slope": 0.1}]},
    {"type": "residual", "projection": True, "layers": [
        {"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1, "stride": 2}, {"type": "tanh"}]},
    {"type": "dropout", "p": 0.4}, {"type": "avgpool", "kernel_size": 2}, {"type": "globalavgpool"},
    {"type": "sigmoid"}, {"type": "linear", "out_features": 10},
]


def _write(tmp_path: Path, layers: list[dict], name: str = "net.yaml", size: int = 8) -> Path:
    raw = {"model": {"input_shape": [3, size, size], "layers": layers}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _numbers(text: str) -> list[float]:
    return [float(v.replace(",", "")) for v in re.findall(r"-?\d[\d,]*\.?\d*(?:e-?\d+)?", text)]


def _step_facts(t, text: str) -> str:
    return " ".join(next(s for s in t.steps if s.symbol.text == text).facts)


# ------------------------------------------------------------------------------------------------ trace


def test_trace_walks_every_new_layer_in_the_docs_notation_and_every_check_passes() -> None:
    model = build_model(build_config({"model": {"input_shape": [3, 8, 8], "layers": NET}}).model)
    bn = model.layers[1]
    bn.buffers["running_mean"][...] = [-1.0, 0.5, 2.0, 0.0]
    bn.buffers["running_var"][...] = [0.5, 1.0, 4.0, 2.0]
    x = np.random.default_rng(0).standard_normal((3, 8, 8))
    t = trace(model, x, 3, checks=3)
    assert t.passed, [(s.key, s.check.max_rel_error) for s, _ in t.checks]
    forward = [s.symbol.text for s in t.forward]
    assert forward[:4] == ["X", "S¹", "Y¹", "A¹"] and "g" in forward
    # batch-norm: μ, σ² (the running statistics in evaluation mode), x̂, γ, β; its parameters checked too
    facts = _step_facts(t, "Y¹")
    assert "μ -1 … 2" in facts and "σ² 0.5 … 4" in facts and "x̂ = (S¹ − μ)/√(σ² + ε)" in facts
    assert "γ x̂ + β" in facts
    assert {"γ¹", "β¹"} <= {s.symbol.text for s in t.parameters}
    assert {"δγ¹", "δβ¹"} <= {s.symbol.text for s, _ in t.checks}
    xhat = (t["S1"].value - bn.buffers["running_mean"][:, None, None]) / np.sqrt(
        bn.buffers["running_var"][:, None, None] + 1e-5)
    got = re.search(r"positions mean ([-\d.e]+), variance ([-\d.e]+)", facts)
    assert got.groups() == (f"{xhat.mean(axis=(1, 2)).mean():.3g}", f"{xhat.var(axis=(1, 2)).mean():.3g}")
    # residual: δ(input) = shortcut path + F path, the shortcut path of an identity block is δ(output) itself
    res = model.layers[3]
    into, out = "δA¹", "δ" + t.layer_names[3].output.text
    facts = _step_facts(t, into)
    assert f"{into} = {out} (shortcut) + Fᵀ {out} (through F)" in facts
    short_norm = float(re.search(r"‖shortcut‖ = ([\d.e-]+)", facts).group(1))
    f_norm = float(re.search(r"‖F path‖ = ([\d.e-]+)", facts).group(1))
    d_out = t["d" + t.layer_names[3].output.key].value
    assert short_norm == pytest.approx(float(np.linalg.norm(d_out)), rel=1e-2)
    assert f_norm == pytest.approx(float(np.linalg.norm(t["dA1"].value - d_out)), rel=1e-2)
    assert res.paths is not None
    assert "Projᵀ" in _step_facts(t, "δ" + t.layer_names[3].output.text)  # the projection block's input
    # sigmoid: how much δ shrank, ‖δ(in)‖/‖δ(out)‖, and at most ¼
    sig_in, sig_out = t.layer_names[7].output, t.layer_names[8].output
    facts = _step_facts(t, sig_in.grad().text)
    ratio = float(re.search(r"= ([\d.e-]+), the gradient shrinks", facts).group(1))
    want = np.linalg.norm(t[sig_in.grad().key].value) / np.linalg.norm(t[sig_out.grad().key].value)
    assert ratio == pytest.approx(want, rel=1e-2) and ratio <= 0.25
    assert "evaluation mode" in _step_facts(t, t.layer_names[5].output.text)  # dropout is the identity


def test_trace_makes_vanishing_gradients_visible_layer_by_layer() -> None:
    """Four linear → sigmoid layers: each sigmoid's fact reports a δ shrink factor ≤ ¼ (y(1 − y) ≤ ¼)."""
    layers = [{"type": "flatten"}]
    for _ in range(4):
        layers += [{"type": "linear", "out_features": 12}, {"type": "sigmoid"}]
    layers.append({"type": "linear", "out_features": 10})
    model = build_model(build_config({"model": {"input_shape": [3, 4, 4], "layers": layers}}).model)
    t = trace(model, np.random.default_rng(1).standard_normal((3, 4, 4)), 0, checks=2)
    assert t.passed
    names = [n.output.text for n in t.layer_names]
    assert names[1:9] == ["z¹", "a¹", "z²", "a²", "z³", "a³", "z⁴", "a⁴"]
    ratios = []
    for m in range(1, 5):
        facts = _step_facts(t, f"δz{'¹²³⁴'[m - 1]}")
        ratios.append(float(re.search(r"= ([\d.e-]+), the gradient shrinks", facts).group(1)))
    assert all(r <= 0.25 for r in ratios), ratios
    norms = [float(np.linalg.norm(t[f"dz{m}"].value)) for m in range(1, 5)]
    assert norms[0] < norms[-1], "δ is smaller in the earlier layers"


def test_cnn_trace_renders_a_config_of_the_new_layers(tmp_path: Path, real_cifar_dir: Path) -> None:
    cfg = _write(tmp_path, NET, size=32)
    assert load_config(cfg).model.layers[3].type == "residual"
    result = runner.invoke(app, ["trace", "--config", str(cfg), "--data-dir", str(real_cifar_dir), "--checks", "2"],
                           env={"COLUMNS": "200"})
    out = ok(result)
    for text in ("Y¹", "δγ¹", "δβ¹", "(shortcut)", "the gradient shrinks", "all pass"):
        assert text in out, text


# ---------------------------------------------------------------------------------------------- summary


def test_summary_lists_parameters_buffers_and_multiply_adds_of_the_new_layers(tmp_path: Path) -> None:
    layers = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1, "bias": False},
              {"type": "batchnorm"}, {"type": "relu"},
              {"type": "residual", "layers": [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1},
                                              {"type": "batchnorm"}]},
              {"type": "dropout"}, {"type": "globalavgpool"}, {"type": "linear", "out_features": 10}]
    out = ok(runner.invoke(app, ["summary", "--config", str(_write(tmp_path, layers))], env={"COLUMNS": "200"}))
    lines = out.splitlines()
    assert any("buffers" in line and "parameters" in line for line in lines)
    # by hand: conv 4·3·9 = 108; bn 8 params + 8 buffers; block: conv 4·4·9 + 4 = 148 and bn 8 (+ 8 buffers),
    # multiply-adds 4·8·8·4·9 + 4·8·8 = 9,472; globalavgpool 4·8·8 = 256 adds; linear 4·10 + 10 = 50
    res = next(line for line in lines if "res1" in line)
    assert {156.0, 8.0, 9472.0} <= set(_numbers(res))
    assert "residual" in res and "dropout" in out and "globalavgpool" in out
    total = next(line for line in lines if "total" in line)
    assert {108.0 + 8 + 156 + 50, 16.0} <= set(_numbers(total))


def test_bad_configs_are_one_line_errors_from_the_cli(tmp_path: Path) -> None:
    cases = [
        ([{"type": "residual", "layers": [{"type": "conv", "out_channels": 6, "kernel_size": 1}]},
          {"type": "flatten"}, {"type": "linear"}], ["model.layers[0] (res1)", "3×8×8", "6×8×8"]),
        ([{"type": "dropout", "p": 1.5}, {"type": "flatten"}, {"type": "linear"}],
         ["model.layers[0].p", "less than 1"]),
        ([{"type": "flatten"}, {"type": "globalavgpool"}, {"type": "linear"}],
         ["model.layers[1] (globalavgpool)", "image input", "(192,)"]),
    ]
    for i, (layers, parts) in enumerate(cases):
        err = one_line_error(runner.invoke(app, ["summary", "--config", str(_write(tmp_path, layers, f"b{i}.yaml"))]))
        for part in parts:
            assert part in err, (part, err)


# ----------------------------------------------------------------------------------------------- resume


def test_a_run_with_dropout_resumed_mid_epoch_is_bit_identical(real_cifar_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    layers = [{"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1}, {"type": "relu"},
              {"type": "maxpool", "kernel_size": 4}, {"type": "dropout", "p": 0.5}, {"type": "flatten"},
              {"type": "linear", "out_features": 10}]
    raw = {"seed": 3, "model": {"input_shape": [3, 32, 32], "layers": layers},
           "data": {"limit": 900, "val_size": 100},
           "train": {"epochs": 2, "batch_size": 100, "optimizer": {"type": "sgd", "lr": 0.05}}}
    cfg = build_config(raw, name="dropout")
    keys: list[tuple[int, int, int]] = []
    original = Sequential.set_step

    def recording(self, seed: int, epoch: int, batch: int) -> None:
        keys.append((seed, epoch, batch))
        original(self, seed, epoch, batch)

    monkeypatch.setattr(Sequential, "set_step", recording)
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(cfg, whole, real_cifar_dir)
    assert keys == [(3, e, b) for e in range(2) for b in range(8)], "one key per step, before it"
    keys.clear()
    with pytest.raises(TrainingInterrupted):
        train(cfg, split, real_cifar_dir, callbacks=StopAt((1, 3)))
    ck = load_checkpoint(split / "last.npz")
    keys.clear()
    train(ck.config, split, real_cifar_dir, resume=ck, resume_path=split / "last.npz")
    assert keys[0] == (3, 0, 3), "the resumed run continues with the masks of batch 4 of epoch 1"
    assert_same_training_state(whole / "last.npz", split / "last.npz")

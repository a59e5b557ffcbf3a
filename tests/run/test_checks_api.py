"""`cnncli.run.checks` (docs/python-api.md#checking-gradients): the documented example runs as written (no data
set needed), and each call's answer agrees with an independent computation."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
from conftest import ROOT

from cnncli import Layer
from cnncli.run import checks

DOC = ROOT / "docs" / "python-api.md"


def test_the_documented_checks_example_runs() -> None:
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```$", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)
              if "from cnncli.run import checks" in b]
    assert len(blocks) == 1
    proc = subprocess.run([sys.executable, "-c", blocks[0]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "'X': 'pass'" in proc.stdout and re.search(r"trace of image 0: L = \d+\.\d{4}", proc.stdout)


def test_forward_backward_matches_finite_differences_of_its_own_loss() -> None:
    net = checks.network({"model": {"input_shape": [2, 4, 4], "layers": [
        {"type": "conv", "out_channels": 3, "kernel_size": 3}, {"type": "tanh"}, {"type": "flatten"},
        {"type": "linear", "out_features": 4}]}}, seed=1)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((3, 2, 4, 4)), np.array([0, 3, 1])
    step = checks.forward_backward(net, x, y)
    # central differences of the returned loss, computed here from the logits' definition (independent path)
    w = net.named_params()["fc1.W"]
    for idx in [(0, 0), (2, 5), (3, 11)]:
        old = w[idx]
        losses = []
        for h in (1e-6, -1e-6):
            w[idx] = old + h
            z = checks.forward_backward(net, x, y).logits
            zs = z - z.max(axis=1, keepdims=True)
            losses.append(float(np.mean(np.log(np.exp(zs).sum(axis=1)) - zs[np.arange(3), y])))
        w[idx] = old
        assert abs((losses[0] - losses[1]) / 2e-6 - step.grads["fc1.W"][idx]) < 1e-7


def test_check_layer_of_an_instance_catches_a_wrong_backward() -> None:
    class HalfCube(Layer):
        def forward(self, x):
            self.x = x
            return x**3

        def backward(self, dout):
            return 1.5 * self.x**2 * dout  # a factor ½ short

    report = checks.check_layer(HalfCube(), input_shape=(4,))
    first = next(r for r in report.results if not r.passed)
    assert first.diagnosis.kind == "constant-factor" and abs(first.diagnosis.factor - 0.5) < 1e-9

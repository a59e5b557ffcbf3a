"""Realistic bugs in user layers, each a small edit of a correct layer file (the table of issue #23).

`SWISHB` is a Swish with one learnable β per channel (y = x·σ(βx)); `MYCONV` a convolution of the user's own
(the built-in's forward kept, a backward written with loops over the kernel offsets, as a student writes it).
`BUGS[name] = (file, old, new)`: the bug is `new` put in place of `old` in that file.
"""

from __future__ import annotations

SWISHB = '''
import numpy as np
from cnncli import Layer


class SwishB(Layer):
    """y = x · σ(β x), one learnable β per channel (axis 1); β starts at 1."""

    type_name = "swishb"
    decay = ()

    def build(self, input_shape, rng, dtype):
        self.params = {"beta": np.ones(input_shape[0], dtype=dtype)}
        self.grads = {"beta": np.zeros(input_shape[0], dtype=dtype)}

    def _b(self, nd):
        return self.params["beta"].reshape(1, -1, *([1] * (nd - 2)))

    def forward(self, x):
        self._x = x
        self._s = 1.0 / (1.0 + np.exp(-self._b(x.ndim) * x))
        return x * self._s

    def backward(self, dout):
        x, s, b = self._x, self._s, self._b(self._x.ndim)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        self.grads["beta"] = (dout * x * x * s * (1 - s)).sum(axis=axes)
        return dout * (s + b * x * s * (1 - s))
'''

# A convolution's backward written by hand, one kernel offset (u, v) at a time: MyConv's below, and the correct
# solution of the lab tests (tests/cli/test_lab.py, where the input is self.x).
CONV_BACKWARD_BODY = '''        x, w = self._x, self.params["W"]
        k, s, p = self.kernel_size, self.stride, self.padding
        n, c_out, ho, wo = dout.shape
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        dxp = np.zeros_like(xp)
        dw = np.zeros_like(w)
        for u in range(k):
            for v in range(k):
                win = xp[:, :, u:u + s * ho:s, v:v + s * wo:s]
                dw[:, :, u, v] = np.einsum("nchw,nkhw->ck", dout, win)
        for i in range(ho):
            for u in range(k):
                for v in range(k):
                    dxp[:, :, s * i + u, v:v + s * wo:s] += np.einsum("nch,ck->nkh", dout[:, :, i], w[:, :, u, v])
        self.grads["W"] = dw
        if "b" in self.params:
            self.grads["b"] = dout.sum(axis=(0, 2, 3))
        return dxp[:, :, p:p + x.shape[2], p:p + x.shape[3]]
'''

MYCONV = '''
import numpy as np
from cnncli.nn.layers import Conv2D


class MyConv(Conv2D):
    """The built-in convolution's forward; the backward written by hand, one kernel offset (u, v) at a time."""

    type_name = "myconv"

    def forward(self, x):
        self._x = x
        return super().forward(x)

    def backward(self, dout):
''' + CONV_BACKWARD_BODY

SW_GRAD = '        self.grads["beta"] = (dout * x * x * s * (1 - s)).sum(axis=axes)\n'
SW_RETURN = "        return dout * (s + b * x * s * (1 - s))\n"

# name -> (file, old, new, what it is)
BUGS: dict[str, tuple[str, str, str, str]] = {
    "sign": ("swishb", SW_GRAD, SW_GRAD.replace("= (", "= -("), "δβ with its sign flipped"),
    "factor": ("swishb", SW_GRAD, SW_GRAD.replace(".sum(", ".mean("), "δβ a mean where a sum belongs"),
    "batch-sum": ("swishb", SW_GRAD, SW_GRAD.replace("axis=axes", "axis=(2, 3)"), "δβ not summed over the batch"),
    "never-set": ("swishb", SW_GRAD, "", "δβ never set"),
    "wrong-key": ("swishb", SW_GRAD, SW_GRAD.replace('"beta"', '"b"'), "δβ stored under a wrong key"),
    "accumulate": ("swishb", SW_GRAD, SW_GRAD.replace("] = (", "] += ("), "δβ added (+=) instead of set"),
    "dx-shape": ("swishb", SW_RETURN, SW_RETURN.replace(
        "return dout * (s + b * x * s * (1 - s))", "return (dout * (s + b * x * s * (1 - s))).reshape(len(x), -1)"),
                 "δx returned flattened"),
    "forward-shape": ("swishb", "        return x * self._s\n", "        return (x * self._s)[:, :, 1:]\n",
                      "forward drops a row (≠ output_shape)"),
    "none": ("swishb", SW_RETURN, SW_RETURN.replace("return ", "dx = "), "backward returns None"),
    "no-super": ("swishb", "    def build(self, input_shape, rng, dtype):\n",
                 "    def __init__(self):\n        self.ready = True\n\n"
                 "    def build(self, input_shape, rng, dtype):\n",
                 "__init__ without super().__init__()"),
    "special-value": ("swishb", SW_RETURN, SW_RETURN.replace("b * x", "x"), "β left out of δx (passes at β = 1)"),
    "zero-bias": ("myconv", "        return super().forward(x)\n",
                  "        cols, ho, wo = self._im2col(x)\n"
                  "        out = self.params['W'].reshape(self.out_channels, -1) @ cols\n"
                  "        return out.reshape(self.out_channels, len(x), ho, wo).transpose(1, 0, 2, 3)\n",
                  "conv never adds its bias (δb: zeros)"),
    "conv-index": ("myconv", "        for i in range(ho):\n", "        for i in range(ho - 1):\n",
                   "conv δX loop skips the last output row"),
}
SOURCES = {"swishb": SWISHB, "myconv": MYCONV}


def zero_bias_backward(src: str) -> str:
    """The zero-bias bug also reports δb = 0 (what a student whose forward ignores b writes)."""
    return src.replace('self.grads["b"] = dout.sum(axis=(0, 2, 3))',
                       'self.grads["b"] = np.zeros_like(self.params["b"])')


def source(bug: str | None, kind: str = "swishb") -> str:
    """The layer file with `bug` put in (None: the correct file of `kind`)."""
    if bug is None:
        return SOURCES[kind]
    kind, old, new, _ = BUGS[bug]
    src = SOURCES[kind]
    assert old in src, bug
    src = src.replace(old, new)
    return zero_bias_backward(src) if bug == "zero-bias" else src


def config(kind: str, input_shape: tuple[int, int, int] = (3, 8, 8), data: str = "") -> str:
    """A small network using the layer: conv → swishb → pool → linear, or myconv → relu → pool → linear."""
    first = ("{type: conv, name: conv1, out_channels: 4, kernel_size: 3, padding: 1}\n    - {type: swishb}"
             if kind == "swishb" else
             "{type: myconv, name: myconv1, out_channels: 4, kernel_size: 3, padding: 1}\n    - {type: relu}")
    return (f"seed: 0\n{data}model:\n  input_shape: {list(input_shape)}\n  layers:\n    - {first}\n"
            "    - {type: maxpool, kernel_size: 2}\n    - {type: flatten}\n"
            "    - {type: linear, name: fc1, out_features: 10}\ntrain: {epochs: 1, batch_size: 50}\n")

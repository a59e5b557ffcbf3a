"""`cnn trace` and `cnncli/nn/trace.py`: one real CIFAR-10 image through the article's equations.

What is checked, and against what:
- the names follow the article (S¹, A¹, P¹, h, z; W_fc, b_fc) and generalise per layer (conv2 -> S², A²);
- every traced tensor equals the model's own `Sequential.forward` / `backward` on the same normalised image
  (z, p, L, each parameter gradient, δX), and — independently of `cnncli/nn/layers.py` — the article's formulas
  written out here with NumPy (§Forward 2–7, §Backprop 1–6);
- δA¹ has exactly one non-zero per pooling window whose δP¹ is non-zero, at the window's arg-max (counted
  here from the tensors);
- every finite-difference check passes on both shipped configs; the `.npz` round trip (allow_pickle=False);
- the CLI: every quantity printed in the article's order with the article's shapes; one-line errors, exit 1.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from clihelp import one_line_error as _one_line_error
from clihelp import stdout_of as _stdout
from typer.testing import CliRunner

from cnncli import data
from cnncli.cli.app import app
from cnncli.config import build_config, load_config
from cnncli.data.preprocess import Normalizer
from cnncli.nn.layers import softmax_cross_entropy
from cnncli.nn.model import build_model
from cnncli.nn.trace import Trace, loss_change, name_tensors, trace
from cnncli.run.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
DIAGRAM = ROOT / "configs" / "seed-diagram.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FORWARD_SEED = ["X", "S¹", "A¹", "P¹", "h", "z", "p", "L"]
BACKWARD_SEED = ["δz", "δb_fc", "δW_fc", "δh", "δP¹", "δA¹", "δS¹", "δb¹", "δW¹", "δX"]
FORWARD_DIAGRAM = ["X", "S¹", "A¹", "P¹", "S²", "A²", "h", "z", "p", "L"]
BACKWARD_DIAGRAM = ["δz", "δb_fc", "δW_fc", "δh", "δA²", "δS²", "δb²", "δW²", "δP¹", "δA¹", "δS¹", "δb¹", "δW¹", "δX"]
SEED_SHAPES = {
    "X": (3, 32, 32), "S1": (16, 32, 32), "A1": (16, 32, 32), "P1": (16, 16, 16), "h": (4096,), "z": (10,),
    "p": (10,), "L": (), "y": (10,), "label": (), "classes": (10,), "image": (3, 32, 32),
    "W1": (16, 3, 3, 3), "b1": (16,), "W_fc": (10, 4096), "b_fc": (10,),
    "dz": (10,), "db_fc": (10,), "dW_fc": (10, 4096), "dh": (4096,), "dP1": (16, 16, 16), "dA1": (16, 32, 32),
    "dS1": (16, 32, 32), "db1": (16,), "dW1": (16, 3, 3, 3), "dX": (3, 32, 32),
}  # fmt: skip
# the model's parameter names -> the trace's gradient keys
GRAD_KEYS = {"conv1.W": "dW1", "conv1.b": "db1", "conv2.W": "dW2", "conv2.b": "db2", "fc1.W": "dW_fc",
             "fc1.b": "db_fc"}  # fmt: skip

runner = CliRunner()


@pytest.fixture(scope="module")
def test_set(real_cifar_dir: Path) -> data.Cifar10:
    return data.load_cifar10(real_cifar_dir, train=False, test=True)


def _image(cfg, ds: data.Cifar10, index: int) -> tuple[np.ndarray, int]:
    """The normalised image (C, H, W) float32, as the CLI prepares it, and its label."""
    x = Normalizer(cfg.data.normalize, 3)(ds.test_x[index : index + 1])[0]
    return x, int(ds.test_y[index])


def _trace(config: Path, ds: data.Cifar10, index: int = 0) -> Trace:
    cfg = load_config(config)
    x, label = _image(cfg, ds, index)
    return trace(build_model(cfg.model, seed=cfg.seed), x, label, ds.classes, image=ds.test_x[index])


@pytest.fixture(scope="module")
def seed_trace(test_set: data.Cifar10) -> Trace:
    return _trace(SEED, test_set)


@pytest.fixture(scope="module")
def diagram_trace(test_set: data.Cifar10) -> Trace:
    return _trace(DIAGRAM, test_set, index=7)


# ------------------------------------------------------------------------------------------------ names


def test_names_follow_the_article() -> None:
    seed = name_tensors(build_model(load_config(SEED).model))
    assert [n.output.key for n in seed] == ["S1", "A1", "P1", "h", "z"]
    assert [n.output.text for n in seed] == ["S¹", "A¹", "P¹", "h", "z"]
    assert [sorted(p.key for p in n.params.values()) for n in seed] == [["W1", "b1"], [], [], [], ["W_fc", "b_fc"]]
    diagram = name_tensors(build_model(load_config(DIAGRAM).model))
    assert [n.output.key for n in diagram] == ["S1", "A1", "P1", "S2", "A2", "h", "z"]
    assert sorted(diagram[3].params[k].key for k in ("W", "b")) == ["W2", "b2"]


def test_names_of_other_layouts_stay_unique() -> None:
    """Two linear layers: hidden z¹/a¹ and W_<name>; keys never collide, all ASCII."""
    raw = {
        "model": {
            "input_shape": [3, 32, 32],
            "layers": [
                {"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1},
                {"type": "relu"}, {"type": "maxpool"}, {"type": "maxpool"}, {"type": "flatten"},
                {"type": "linear", "out_features": 8}, {"type": "relu"}, {"type": "linear", "out_features": 10},
            ],
        }
    }  # fmt: skip
    cfg = build_config(raw)
    names = name_tensors(build_model(cfg.model))
    keys = [n.output.key for n in names] + [p.key for n in names for p in n.params.values()]
    assert [n.output.key for n in names] == ["S1", "A1", "P1", "maxpool3", "h", "z1", "a1", "z"]
    assert {"W_fc1", "b_fc1", "W_fc2", "b_fc2"} <= set(keys)
    assert len(keys) == len(set(keys)) and all(k.isascii() for k in keys)


# ----------------------------------------------------------------------------------- same as the model


@pytest.mark.parametrize("config", [SEED, DIAGRAM], ids=["seed", "diagram"])
def test_trace_equals_the_models_own_passes(config: Path, test_set: data.Cifar10) -> None:
    cfg = load_config(config)
    x, label = _image(cfg, test_set, 3)
    t = trace(build_model(cfg.model, seed=cfg.seed), x, label, test_set.classes)

    model = build_model(cfg.model, seed=cfg.seed).astype(np.float64)
    model.set_input_grad(True)
    x64 = x[None].astype(np.float64)
    z = model.forward(x64)
    loss, dz, p = softmax_cross_entropy(z, np.array([label]))
    dx = model.backward(dz)
    close = {"rtol": 1e-10, "atol": 1e-13}
    np.testing.assert_allclose(t["X"].value, x64[0], **close)
    np.testing.assert_allclose(t["z"].value, z[0], **close)
    np.testing.assert_allclose(t["p"].value, p[0], **close)
    np.testing.assert_allclose(t["L"].value, loss, **close)
    np.testing.assert_allclose(t["dz"].value, dz[0], **close)
    np.testing.assert_allclose(t["dX"].value, dx[0], **close)
    grads = model.named_grads()
    assert set(grads) <= set(GRAD_KEYS)
    for name, g in grads.items():
        np.testing.assert_allclose(t[GRAD_KEYS[name]].value, g, **close, err_msg=name)
    for name, v in model.named_params().items():
        np.testing.assert_array_equal(t[GRAD_KEYS[name][1:]].value, v, err_msg=name)
    # and the float32 training model gives the same logits to float32 rounding
    z32 = build_model(cfg.model, seed=cfg.seed).forward(x[None])
    np.testing.assert_allclose(t["z"].value, z32[0], rtol=1e-4, atol=1e-4)


def test_trace_follows_the_article_equations(seed_trace: Trace) -> None:
    """The article's formulas, written out here independently of cnncli/nn/layers.py (seed config, image 0)."""
    t = seed_trace
    X, W1, b1, Wfc, bfc = (t[k].value for k in ("X", "W1", "b1", "W_fc", "b_fc"))
    y = np.eye(10)[t.label]
    # §Forward 2: S[c,i,j] = Σ_{c',u,v} W[c,c',u,v] X[c', i+u-1, j+v-1] + b[c]  (zero padding 1)
    Xp = np.pad(X, ((0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(Xp, (3, 3), axis=(1, 2))  # (3, 32, 32, 3, 3)
    S1 = np.einsum("dcuv,cijuv->dij", W1, patches) + b1[:, None, None]
    A1 = np.maximum(0, S1)  # §3
    P1 = A1.reshape(16, 16, 2, 16, 2).max(axis=(2, 4))  # §4
    h = P1.reshape(-1)  # §5, k = c·256 + i·16 + j
    z = Wfc @ h + bfc  # §6
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()  # §7
    L = -np.log(p[t.label])
    dz = p - y  # §Backprop 1
    db_fc, dW_fc, dh = dz, np.outer(dz, h), Wfc.T @ dz  # §2
    dP1 = dh.reshape(16, 16, 16)  # §3
    dA1 = np.zeros_like(A1)  # §4: to the arg-max of each window (the first one on a tie)
    for c in range(16):
        for pp in range(16):
            for q in range(16):
                win = A1[c, 2 * pp : 2 * pp + 2, 2 * q : 2 * q + 2]
                u, v = divmod(int(np.argmax(win)), 2)
                dA1[c, 2 * pp + u, 2 * q + v] = dP1[c, pp, q]
    dS1 = dA1 * (S1 > 0)  # §5
    db1 = dS1.sum(axis=(1, 2))  # §6
    dW1 = np.einsum("dij,cijuv->dcuv", dS1, patches)
    dXp = np.zeros_like(Xp)  # δX[c',x,y] = Σ_{c,u,v} W[c,c',u,v] δS[c, x-u+1, y-v+1]
    for u in range(3):
        for v in range(3):
            dXp[:, u : u + 32, v : v + 32] += np.einsum("dc,dij->cij", W1[:, :, u, v], dS1)
    dX = dXp[:, 1:-1, 1:-1]
    expected = {"S1": S1, "A1": A1, "P1": P1, "h": h, "z": z, "p": p, "L": L, "dz": dz, "db_fc": db_fc,
                "dW_fc": dW_fc, "dh": dh, "dP1": dP1, "dA1": dA1, "dS1": dS1, "db1": db1, "dW1": dW1, "dX": dX}
    for key, want in expected.items():
        np.testing.assert_allclose(t[key].value, want, rtol=1e-9, atol=1e-12, err_msg=key)


def test_dA1_has_one_nonzero_per_pooling_window(seed_trace: Trace, diagram_trace: Trace) -> None:
    for t in (seed_trace, diagram_trace):
        dA1, dP1, A1 = t["dA1"].value, t["dP1"].value, t["A1"].value
        live_windows = int(np.count_nonzero(dP1))
        assert np.count_nonzero(dA1) == live_windows > 0
        # each 2×2 window of δA¹ holds at most one non-zero, δP¹ of that window, where A¹ is largest
        win_d = dA1.reshape(16, 16, 2, 16, 2).transpose(0, 1, 3, 2, 4).reshape(16, 16, 16, 4)
        win_a = A1.reshape(16, 16, 2, 16, 2).transpose(0, 1, 3, 2, 4).reshape(16, 16, 16, 4)
        assert (np.count_nonzero(win_d, axis=-1) <= 1).all()
        np.testing.assert_array_equal(win_d.sum(axis=-1), dP1)
        at = np.take_along_axis(win_a, np.argmax(win_d != 0, axis=-1)[..., None], axis=-1)[..., 0]
        np.testing.assert_array_equal(at[dP1 != 0], win_a.max(axis=-1)[dP1 != 0])
        # the trace says so, with these numbers
        fact = " ".join(t["dA1"].facts)
        assert f"{live_windows:,} of {dA1.size:,} non-zero" in fact and "one per 2×2 pooling window" in fact
        zeros = int((t["A1"].value == 0).sum())
        assert f"{zeros:,} of 16,384 zeros" in " ".join(t["A1"].facts)


def test_top_classes_and_true_label(seed_trace: Trace, test_set: data.Cifar10) -> None:
    t = seed_trace
    p = t["p"].value
    assert [c for c, _, _ in t.top] == list(np.argsort(-p, kind="stable"))
    assert t.top[0][1] == test_set.classes[int(np.argmax(p))]
    assert t.label == int(test_set.test_y[0])
    assert f"true label: {test_set.classes[t.label]}" in " ".join(t["p"].facts)
    assert float(t["L"].value) == pytest.approx(-np.log(p[t.label]), rel=1e-12)


@pytest.mark.parametrize("which", ["seed", "diagram"])
def test_every_gradient_passes_its_finite_difference_check(which: str, request: pytest.FixtureRequest) -> None:
    t: Trace = request.getfixturevalue(f"{which}_trace")
    backward = BACKWARD_SEED if which == "seed" else BACKWARD_DIAGRAM
    assert [s.symbol.text for s in t.backward] == backward
    for step in t.backward:
        assert step.check is not None, step.key
        assert len(step.check.errors) == 5
        assert step.check.passed, (step.key, step.check.errors)
    assert t.passed and t.max_rel_error < 1e-8


def test_finite_differences_keep_tiny_gradients(test_set: data.Cifar10) -> None:
    """A badly wrong, confident prediction (L ≫ 1, most p ≈ 1e-30): the checks still pass."""
    cfg = load_config(SEED)
    model = build_model(cfg.model, seed=cfg.seed)
    for layer in model.layers:
        if layer.kind == "linear":
            layer.params["W"] *= 20
    x, label = _image(cfg, test_set, 0)
    t = trace(model, x, label, test_set.classes)
    assert t.loss > 10
    assert t.passed, [(s.key, c.max_rel_error) for s, c in t.checks]


def test_loss_change_is_the_exact_difference() -> None:
    rng = np.random.default_rng(1)
    z0 = rng.standard_normal(10)
    z1 = z0 + 1e-3 * rng.standard_normal(10)

    def nll(z: np.ndarray) -> float:
        return float(np.log(np.exp(z).sum()) - z[3])

    assert loss_change(z0, z1, 3) == pytest.approx(nll(z1) - nll(z0), rel=1e-9)
    assert loss_change(z0, z0, 3) == 0.0


# ------------------------------------------------------------------------------------------------- CLI


def _rows(stdout: str, symbols: list[str]) -> list[int]:
    """Line numbers of each quantity's row: '  <symbol>  §<n> …'."""
    lines = stdout.splitlines()
    found = []
    for sym in symbols:
        hits = [i for i, line in enumerate(lines) if re.match(rf"^\s+{re.escape(sym)}\s+§[a-z]", line)]
        assert hits, f"no row for {sym}:\n{stdout}"
        found.append(hits[0])
    return found


def test_cli_trace_seed(real_cifar_dir: Path, seed_trace: Trace, tmp_path: Path) -> None:
    save = tmp_path / "trace.npz"
    result = runner.invoke(app, ["trace", "--config", str(SEED), "--data-dir", str(real_cifar_dir),
                                 "--save", str(save)])
    assert result.exit_code == 0, result.output
    out = _stdout(result)
    rows = _rows(out, FORWARD_SEED + BACKWARD_SEED)
    assert rows == sorted(rows), "in the article's order"
    lines = out.splitlines()
    for sym, shape in [("S¹", "16×32×32"), ("P¹", "16×16×16"), ("h", "4096"), ("z", "10"), ("δA¹", "16×32×32"),
                       ("δW¹", "16×3×3×3"), ("δW_fc", "10×4096"), ("δX", "3×32×32")]:
        row = lines[_rows(out, [sym])[0]]
        assert re.search(rf"\s{shape}\s", row), row
    for sym in BACKWARD_SEED:
        assert "✓" in lines[_rows(out, [sym])[0]], sym
    assert "FAIL" not in out and "all pass" in out
    assert "one per 2×2 pooling window" in out and "zeros (" in out
    assert f"true label: {seed_trace.classes[seed_trace.label]}" in out

    # the .npz round trip: plain arrays, the article's keys, per-image shapes, the trace's numbers
    with np.load(save, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert {k: v.shape for k, v in arrays.items()} == SEED_SHAPES
    for key, value in seed_trace.arrays().items():
        np.testing.assert_array_equal(arrays[key], value, err_msg=key)
    assert arrays["y"][int(arrays["label"])] == 1 and arrays["y"].sum() == 1
    assert arrays["classes"][int(arrays["label"])] == seed_trace.classes[seed_trace.label]
    assert arrays["image"].dtype == np.uint8


def test_cli_trace_diagram_walks_the_extra_layer(real_cifar_dir: Path) -> None:
    result = runner.invoke(app, ["trace", "--config", str(DIAGRAM), "--data-dir", str(real_cifar_dir),
                                 "--index", "7"])
    assert result.exit_code == 0, result.output
    out = _stdout(result)
    rows = _rows(out, FORWARD_DIAGRAM + BACKWARD_DIAGRAM)
    assert rows == sorted(rows)
    lines = out.splitlines()
    assert re.search(r"\s32×16×16\s", lines[_rows(out, ["S²"])[0]])
    assert "§convolution conv2" in lines[_rows(out, ["δP¹"])[0]], "δP¹ comes out of conv2's backward pass"
    assert "FAIL" not in out and "all pass" in out and "test image 7" in out


def test_cli_trace_of_a_checkpoint(real_cifar_dir: Path, tmp_path: Path, seed_trace: Trace) -> None:
    """A checkpoint with the config's initial weights traces to the same numbers as --config."""
    cfg = load_config(SEED)
    ckpt = save_checkpoint(tmp_path / "w.npz", build_model(cfg.model, seed=cfg.seed), cfg)
    save = tmp_path / "t.npz"
    result = runner.invoke(app, ["trace", str(ckpt), "--data-dir", str(real_cifar_dir), "--save", str(save)])
    assert result.exit_code == 0, result.output
    assert "checkpoint weights" in _stdout(result)
    with np.load(save, allow_pickle=False) as npz:
        np.testing.assert_allclose(npz["dW1"], seed_trace["dW1"].value, rtol=1e-12)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--index", "10000"], ["--index", "0..9999", "10000"]),
        (["--index", "-1"], ["--index", "0..9999"]),
        (["--split", "train", "--index", "45000"], ["--index", "0..44999", "train"]),  # 5,000 held out for val
        (["--split", "bogus"], ["--split", "test, train or val", "bogus"]),
    ],
)
def test_cli_trace_bad_index_or_split(args: list[str], needles: list[str], real_cifar_dir: Path) -> None:
    result = runner.invoke(app, ["trace", "--data-dir", str(real_cifar_dir), *args])
    err = _one_line_error(result)
    for n in needles:
        assert n in err, err


def test_cli_trace_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    err = _one_line_error(runner.invoke(app, ["trace", str(missing)]))
    assert str(missing) in err and "not found" in err


def test_cli_trace_checkpoint_and_config_exclude_each_other(tmp_path: Path) -> None:
    err = _one_line_error(runner.invoke(app, ["trace", str(tmp_path / "x.npz"), "--config", str(SEED)]))
    assert "CHECKPOINT" in err and "--config" in err


def test_cli_trace_png(real_cifar_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "trace.png"
    result = runner.invoke(app, ["trace", "--data-dir", str(real_cifar_dir), "--png", str(png)])
    assert result.exit_code == 0, result.output
    blob = png.read_bytes()
    assert blob.startswith(PNG_SIGNATURE) and blob[12:16] == b"IHDR"
    width, height = int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")
    assert width > 800 and height > 800 and len(blob) > 50_000


def test_cli_trace_png_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No matplotlib: one line saying what to install, before any work (no data needed, nothing written)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "trace.png"
    err = _one_line_error(runner.invoke(app, ["trace", "--png", str(png), "--data-dir", str(tmp_path / "nodata")]))
    assert "matplotlib" in err and "pip install 'cnncli[viz]'" in err
    assert not png.exists()


def test_a_layer_without_a_doc_section_is_cited_by_its_docstring_not_a_dead_anchor() -> None:
    from cnncli.nn.layer import Layer
    from cnncli.nn.layers import ReLU
    from cnncli.nn.trace import DOCS, Step, _section

    class Mine(Layer):
        type_name = "mylayer"

    mine, relu = Mine(), ReLU()
    mine.name = "sq1"
    fake = type("S", (), {"phase": "forward"})()
    fake.section = _section(mine, 0)
    text = Step.citation.fget(fake)  # type: ignore[attr-defined]
    assert DOCS + "#" not in text and "'mylayer'" in text and "docstring" in text
    assert Step.section_label.fget(fake) == "§?mylayer sq1"  # type: ignore[attr-defined]  # no docstring: the key
    fake.section = _section(relu, 0)
    assert Step.section_label.fget(fake) == "§relu"  # type: ignore[attr-defined]
    fake.section = _section(relu, 0)
    assert Step.citation.fget(fake).startswith(f"{DOCS}#relu")  # type: ignore[attr-defined]
    Mine.doc = "docs/mine.md#squaring"
    fake.section = _section(mine, 0)
    assert Step.citation.fget(fake).startswith("docs/mine.md#squaring (forward, sq1)")  # type: ignore[attr-defined]


def test_the_section_column_of_a_users_layer_quotes_its_docstring(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnncli.nn import registry
    from cnncli.nn.layer import Layer
    from cnncli.nn.trace import Step, _section

    class Cubed(Layer):
        """y = x³, element-wise, nothing learned; a layer of the tests."""

        type_name = "cubedtest"

    monkeypatch.setitem(registry.LAYER_TYPES, "cubedtest", Cubed)  # registered for this test only
    cube = Cubed()
    cube.name = "cube1"
    fake = type("S", (), {"phase": "forward"})()
    fake.section = _section(cube, 0)
    assert Step.section_label.fget(fake) == "«y = x³, element-wise, nothing l…» cube1"  # 31 characters, then …  # type: ignore[attr-defined]

"""`cnn bench` and `cnncli.bench.timing`: it runs, reports every figure, and the profile adds up. Never timings."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clihelp import one_line_error
from clihelp import stdout_of as _stdout
from typer.testing import CliRunner

from cnncli import engine
from cnncli.bench.timing import run_bench
from cnncli.cli.app import app
from cnncli.config import load_config
from cnncli.engine import engine_for
from cnncli.host.blas import blas_info, blas_threads

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
DIAGRAM = ROOT / "configs" / "seed-diagram.yaml"
SMALL = ["--steps", "2", "--repeats", "2", "--batch", "16", "--eval-batch", "40"]

runner = CliRunner()


def _positive(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.mark.parametrize("config", [SEED, DIAGRAM])
def test_json_has_every_figure_and_shares_that_add_up(config: Path) -> None:
    result = runner.invoke(app, ["bench", "--config", str(config), "--json", *SMALL])
    assert result.exit_code == 0, result.output
    d = json.loads(_stdout(result))
    for key in ("train_images_per_s", "eval_images_per_s", "train_ms_per_step", "eval_ms_per_batch"):
        assert _positive(d[key]), key
    assert d["batch"] == 16 and d["eval_batch"] == 40 and d["steps"] == 2 and d["repeats"] == 2
    assert d["engine"] == "fused" and d["threads"] >= 1
    assert len(d["train_runs_ms"]) == 2 and all(_positive(v) for v in d["train_runs_ms"])
    # images/s and ms per step describe the same median
    assert d["train_images_per_s"] == pytest.approx(16 / (d["train_ms_per_step"] / 1000))
    layers = d["layers"]
    names = [row["name"] for row in layers]
    assert any(n.startswith("conv1") for n in names) and any("fc1" in n for n in names)
    assert "optimizer update" in names
    shares = [row["forward_share"] + row["backward_share"] for row in layers]
    assert all(0 <= s <= 1 for s in shares)
    assert sum(shares) == pytest.approx(1.0, abs=1e-6)
    assert set(d["blas"]) >= {"library", "config", "threads", "controllable"}
    assert d["system"]["numpy"] == np.__version__


def test_default_batches_come_from_the_config() -> None:
    cfg = load_config(SEED)
    res = run_bench(cfg, "seed", steps=1, repeats=1, warmup=1)
    assert res.batch == cfg.train.batch_size == 128
    assert res.eval_batch == cfg.train.eval_batch_size == 1000
    assert _positive(res.train_images_per_s) and _positive(res.eval_images_per_s)


def test_reference_path_and_thread_option() -> None:
    cfg = load_config(DIAGRAM)
    ref = run_bench(cfg, "diagram", batch=8, eval_batch=8, steps=1, repeats=1, warmup=1, reference=True)
    assert ref.engine == "per-layer" and ref.threads == 1
    assert _positive(ref.train_images_per_s)
    assert sum(r.forward_share + r.backward_share for r in ref.layers) == pytest.approx(1.0, abs=1e-6)
    assert [r.name for r in ref.layers][:2] == ["conv1", "relu"]
    one = run_bench(cfg, "diagram", batch=64, eval_batch=8, steps=1, repeats=1, warmup=1, threads=1)
    assert one.threads == 1


def test_table_output_names_the_figures() -> None:
    result = runner.invoke(app, ["bench", "--config", str(SEED), *SMALL])
    assert result.exit_code == 0, result.output
    text = _stdout(result)
    for needle in ("train step", "inference", "images/s", "conv1", "fc1", "BLAS", "matrix products: ", "GFLOP/s"):
        assert needle in text, needle


def test_missing_config_is_a_one_line_error() -> None:
    result = runner.invoke(app, ["bench", "--config", "no/such.yaml", "--json"])
    assert result.exit_code == 1
    assert "config file not found" in result.output


def test_blas_thread_limit_is_restored() -> None:
    info = blas_info()
    assert isinstance(info["controllable"], bool)
    if not info["controllable"]:
        pytest.skip("no OpenBLAS thread control in this numpy")
    before = info["threads"]
    with blas_threads(1):
        assert blas_info()["threads"] == 1
    assert blas_info()["threads"] == before


# ---------------------------------------------------------------- side by side with PyTorch (cnncli.bench.torchbench)
# torch is never a dependency: these skip only where it is not importable (`make bench-torch` installs it).


def _torch() -> Any:
    return pytest.importorskip("torch")


@pytest.mark.parametrize("config", [SEED, DIAGRAM])
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_torch_network_computes_cnncli_logits(config: Path, memory_format: str) -> None:
    _torch()
    from cnncli.bench.torchbench import build_torch_net, set_format, torch_logits
    from cnncli.nn.model import build_model

    cfg = load_config(config)
    model = build_model(cfg.model, seed=3)
    tnet = build_torch_net(cfg, model)
    set_format(tnet, memory_format)
    x = np.random.default_rng(1).standard_normal((6, 3, 32, 32)).astype(np.float32)
    zt = torch_logits(tnet, x, memory_format)
    for z in (model.forward(x), engine.predict(model, x)):  # the per-layer reference and the fused engine
        scale = float(np.max(np.abs(z)))
        assert scale > 0.1
        assert float(np.max(np.abs(zt - z))) <= 1e-5 * scale


def test_torch_sgd_step_moves_the_weights_as_cnncli_does() -> None:
    """Three steps of forward, mean cross-entropy, backward and Nesterov SGD with weight decay on weights only:
    with a large decay, decaying the biases too (or a different momentum rule) would move them visibly apart."""
    torch = _torch()
    from cnncli.bench.torchbench import build_torch_net, make_torch_optimizer
    from cnncli.nn.model import build_model
    from cnncli.run.optim import make_optimizer

    cfg = load_config(DIAGRAM, ["train.optimizer.lr=0.05", "train.optimizer.weight_decay=0.5"])
    model = build_model(cfg.model, seed=0)
    tnet = build_torch_net(cfg, model)
    start = {k: v.copy() for k, v in model.named_params().items()}
    params = model.named_params()
    opt = make_optimizer(params, cfg.train.optimizer)
    topt = make_torch_optimizer(tnet, cfg.train.optimizer)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((12, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, size=12)
        engine.loss_and_grads(model, x, y)
        opt.step(params, model.named_grads(), cfg.train.optimizer.lr)
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tnet.net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        topt.step()
    theirs = tnet.numpy_params()
    for name, theta in model.named_params().items():
        moved, moved_t = theta - start[name], theirs[name] - start[name]
        assert float(np.max(np.abs(moved))) > 0, name
        assert float(np.max(np.abs(moved_t - moved))) <= 1e-3 * float(np.max(np.abs(moved))), name


def test_against_torch_json_has_three_engines_and_their_ratios() -> None:
    torch = _torch()
    result = runner.invoke(app, ["bench", "--config", str(DIAGRAM), "--against", "torch", "--json",
                                 "--steps", "1", "--repeats", "1", "--batch", "16", "--eval-batch", "40"])
    assert result.exit_code == 0, result.output
    d = json.loads(_stdout(result))
    engines = {e["name"]: e for e in d["engines"]}
    assert list(engines) == ["cnncli", "torch", "torch channels_last"]
    for e in engines.values():
        assert _positive(e["train_images_per_s"]) and _positive(e["eval_images_per_s"])
        assert len(e["train_runs_ms"]) == 1 and len(e["eval_runs_ms"]) == 1
        assert e["train_images_per_s"] == pytest.approx(16 / (e["train_ms_per_step"] / 1000))
    ours = engines["cnncli"]
    best_train = max(engines["torch"]["train_images_per_s"], engines["torch channels_last"]["train_images_per_s"])
    best_eval = max(engines["torch"]["eval_images_per_s"], engines["torch channels_last"]["eval_images_per_s"])
    r = d["ratios"]
    assert r["train"] == pytest.approx(ours["train_images_per_s"] / best_train)
    assert r["inference"] == pytest.approx(ours["eval_images_per_s"] / best_eval)
    assert engines[r["train_vs"]]["train_images_per_s"] == best_train
    assert engines[r["inference_vs"]]["eval_images_per_s"] == best_eval
    ((t_ours,), (t_nchw,), (t_cl,)) = (engines[k]["train_runs_ms"] for k in engines)
    assert r["train_per_round"] == [pytest.approx(min(t_nchw, t_cl) / t_ours)]
    assert r["train_round_median"] == pytest.approx(min(t_nchw, t_cl) / t_ours)
    assert len(r["inference_per_round"]) == 1 and _positive(r["inference_round_median"])
    assert d["batch"] == 16 and d["eval_batch"] == 40 and d["rounds"] == 1 and d["steps"] == 1
    assert d["threads"] >= 1 and d["cnncli_engine"] == "fused"
    assert set(d["logits_rel_diff"]) == {"contiguous", "channels_last"}
    assert all(0 <= v < 1e-5 for v in d["logits_rel_diff"].values())
    (busy,) = d["other_cpus_per_round"]
    assert busy is None or 0 <= busy <= 64
    m = d["machine"]
    assert m["torch"] == torch.__version__ and m["numpy"] == np.__version__ and m["cpu_model"]
    assert m["logical_cpus"] >= m["usable_cpus"] >= 1


def test_against_torch_table_names_engines_ratios_and_machine() -> None:
    torch = _torch()
    before = torch.get_num_threads()
    result = runner.invoke(app, ["bench", "--config", str(SEED), "--against", "torch", "--threads", "1",
                                 "--steps", "1", "--repeats", "1", "--batch", "8", "--eval-batch", "8"])
    assert result.exit_code == 0, result.output
    text = _stdout(result)
    for needle in ("cnncli", "torch channels_last", "cnncli / best PyTorch", "per-round", "machine:",
                   "numpy", f"torch {torch.__version__}", "threads 1 / 1"):
        assert needle in text, needle
    assert ("other processes kept" in text) == Path("/proc/stat").is_file()
    assert torch.get_num_threads() == before  # the run restores PyTorch's thread count


def test_against_torch_tunes_when_asked_and_says_which_micro_batches(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """--tune is not ignored beside --against: the sizes are measured now, stored, and printed with why."""
    _torch()
    monkeypatch.setenv("CNNCLI_TUNE", "1")
    monkeypatch.setenv("CNNCLI_CACHE", str(tmp_path))
    args = ["bench", "--config", str(SEED), "--against", "torch", "--steps", "1", "--repeats", "1",
            "--batch", "16", "--eval-batch", "40"]
    result = runner.invoke(app, [*args, "--tune", "--json"])
    assert result.exit_code == 0, result.output
    t = json.loads(_stdout(result))["tuning"]
    assert t["source"] == "measured" and t["train_ms"] and t["eval_ms"]
    assert (tmp_path / "tune.json").is_file()
    result = runner.invoke(app, args)  # the cached sizes now
    assert result.exit_code == 0, result.output
    text = _stdout(result)
    assert "micro-batches: training" in text and "measured on this machine" in text


def test_without_torch_the_command_prints_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from clihelp import one_line_error

    from cnncli.cli.bench import torch_script

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    result = runner.invoke(app, ["bench", "--config", str(SEED), "--against", "torch"])
    err = one_line_error(result)
    assert "pip install torch==2.13.0" in err and "PyTorch" in err
    result = runner.invoke(torch_script, ["train", "--config", str(SEED)])
    assert "pip install torch==2.13.0" in one_line_error(result)


def test_a_layer_type_without_a_torch_builder_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _torch()
    from clihelp import one_line_error

    from cnncli.bench import torchbench

    monkeypatch.delitem(torchbench.TORCH_LAYERS, "maxpool")
    result = runner.invoke(app, ["bench", "--config", str(SEED), "--against", "torch", *SMALL])
    err = one_line_error(result)
    assert "model.layers[2]" in err and "'maxpool'" in err


def test_torch_script_follows_cnn_train_recipe(tmp_path: Path, real_cifar_dir: Path) -> None:
    """Same split, initial weights, order, augmentation and schedule: one short epoch on a slice of the real
    data gives cnn train's losses to float32 drift, and the same split sizes."""
    _torch()
    import yaml

    from cnncli.cli.bench import torch_script
    from cnncli.run.train import train

    raw = yaml.safe_load(SEED.read_text())
    raw["data"].update(limit=768, val_size=256)
    raw["train"].update(epochs=1, eval_batch_size=500)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    ours = train(load_config(cfg_path), tmp_path / "run", real_cifar_dir)
    result = runner.invoke(torch_script, ["train", "--config", str(cfg_path), "--data-dir", str(real_cifar_dir),
                                          "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(_stdout(result))
    assert (d["n_train"], d["n_val"], d["n_test"]) == (512, 256, 10000)
    (ep,) = d["history"]
    (m,) = ours.history
    assert ep["lr"] == pytest.approx(m.lr)
    assert ep["train_loss"] == pytest.approx(m.train_loss, rel=1e-3)
    assert ep["val_loss"] == pytest.approx(m.val_loss, rel=1e-3)
    assert abs(ep["val_acc"] - m.val_acc) <= 2 / 256
    assert abs(d["test_acc"] - ours.test.accuracy) <= 0.002


def test_the_profile_says_how_much_of_each_stage_is_inside_matrix_products() -> None:
    from cnncli.config import build_config
    from cnncli.nn.model import build_model

    layers = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, {"type": "relu"},
              {"type": "maxpool", "kernel_size": 2}, {"type": "maxpool", "kernel_size": 2}, {"type": "flatten"},
              {"type": "linear", "out_features": 3}]
    model = build_model(build_config({"model": {"input_shape": [3, 8, 8], "layers": layers}}).model)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 3, 8, 8)).astype(np.float32), rng.integers(0, 3, 16)
    eng = engine_for(model)
    timed = {label: f + b for label, f, b in eng.profile(x, y)}
    mm = eng.matmul_seconds
    conv, pool, fc = (s.label for s in eng.stages)
    assert 0 < sum(mm[conv]) <= timed[conv] and 0 < sum(mm[fc]) <= timed[fc]
    assert sum(mm[pool]) == 0  # a pool stage has no product
    engine.loss_and_grads(model, x, y)  # outside the profile nothing is timed
    assert eng.matmul_seconds == mm


def test_the_profile_never_holds_its_workspace_beside_the_workers_ones() -> None:
    """With a batch-norm the one-thread profile takes the whole batch in one micro-batch: a workspace as large
    as the two workers' together. It lets theirs go first and its own after, so its peak stays near one set
    (airbench94 at 1,024 images reached 14.7 GB holding both)."""
    import tracemalloc

    from cnncli.config import build_config
    from cnncli.nn.model import build_model

    layers = [{"type": "conv", "out_channels": 16, "kernel_size": 3, "padding": 1, "bias": False},
              {"type": "batchnorm"}, {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "out_features": 3}]
    model = build_model(build_config({"model": {"input_shape": [3, 16, 16], "layers": layers}}).model)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 3, 16, 16)).astype(np.float32), rng.integers(0, 3, 64)
    eng = engine_for(model)
    eng.threads = 2
    tracemalloc.start()
    try:
        engine.loss_and_grads(model, x, y)  # the two workers' workspaces (32 images each)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        eng.profile(x, y)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.4 * held, (peak, held)
    assert after < 0.5 * held, (after, held)
    loss, _ = engine.loss_and_grads(model, x, y)  # and the workers build theirs again
    assert np.isfinite(loss)


def test_the_profile_counts_the_floating_point_work_of_every_product() -> None:
    """2·m·k·n per product, against a count by hand from the layer shapes: conv1 8→4 (3×3, pad 1) on 8×8 with
    a 2×2 pool after it (columns: all 64 pixels, window offset first), conv2 4→6 on 4×4 with its bias as one
    more column row (4·9 + 1), its δX a correlation (4 × 6·9 per pixel), the linear 96 → 3."""
    from cnncli.bench.timing import _profile, product_floor
    from cnncli.config import build_config
    from cnncli.nn.model import build_model

    layers = [{"type": "conv", "out_channels": 4, "kernel_size": 3, "padding": 1}, {"type": "relu"},
              {"type": "maxpool", "kernel_size": 2},
              {"type": "conv", "out_channels": 6, "kernel_size": 3, "padding": 1}, {"type": "relu"},
              {"type": "flatten"}, {"type": "linear", "out_features": 3}]
    model = build_model(build_config({"model": {"input_shape": [8, 8, 8], "layers": layers}}).model)
    n = 12
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, 8, 8, 8)).astype(np.float32), rng.integers(0, 3, n)
    eng = engine_for(model)
    eng.train_micro_batch = 5  # three micro-batches (5, 5, 2): the count is over all of them
    eng.profile(x, y)
    conv1, conv2, fc = (s.label for s in eng.stages)
    fl = eng.matmul_flops
    assert fl[conv1] == (2 * 4 * 72 * 64 * n, 2 * 4 * 72 * 64 * n)  # S; δW (no δX: the first layer)
    assert fl[conv2] == (2 * 6 * 37 * 16 * n, 2 * 6 * 37 * 16 * n + 2 * 4 * 54 * 16 * n)  # S + b; [δW | δb], δX
    assert fl[fc] == (2 * 3 * 96 * n, 2 * 3 * 96 * n + 2 * 96 * 3 * n)
    shares = _profile(model, x, y, lambda: None, passes=2)
    floor = product_floor(shares, threads=2)
    assert floor is not None
    total = sum(sum(v) for v in fl.values())
    assert floor["gflop"] == pytest.approx(total / 1e9)
    assert 0 < floor["ms"] < floor["step_ms"] and floor["floor_ms"] == pytest.approx(floor["ms"] / 2)


def test_kernel_candidates_follow_the_cpu_flags(tmp_path: Path) -> None:
    from cnncli.bench.timing import cpu_flags, kernel_candidates

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "sse2", "avx", "avx2", "fma"}  # the first CPU's line
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert kernel_candidates(frozenset({"avx2", "fma"})) == ["", "Haswell"]
    assert kernel_candidates(frozenset({"avx2"})) == [""]  # Haswell's kernels need FMA too
    avx512 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"})
    assert kernel_candidates(avx512) == ["", "Haswell", "SkylakeX"]
    assert kernel_candidates(frozenset()) == [""]


def test_blas_kernels_runs_each_candidate_in_a_process_with_those_kernels() -> None:
    """Each row's process must report the kernels it was asked for (the variable reached OpenBLAS before it
    loaded), the unset row what this process runs."""
    from cnncli.bench.timing import kernel_candidates

    info = blas_info()
    if not (info["config"] or "").lower().startswith("openblas"):
        pytest.skip(f"OPENBLAS_CORETYPE only concerns OpenBLAS; this numpy uses {info['config']!r}")
    args = ["bench", "--blas-kernels", "--config", str(SEED), "--steps", "1", "--repeats", "2", "--batch-size", "16",
            "--eval-batch-size", "16", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in _stdout(result).splitlines() if line.strip()]
    assert [r["kernel"] for r in rows] == kernel_candidates()
    assert rows[0]["arch"] == info["config"]
    for r in rows[1:]:
        assert r["arch"].split()[-1] == r["kernel"], r
    for r in rows:
        assert len(r["train_runs"]) == len(r["eval_runs"]) == 2 and r["train_images_per_s"] > 0


def test_blas_kernels_errors_are_one_line() -> None:
    from cnncli.bench.timing import compare_blas_kernels
    from cnncli.host.errors import CnnError

    err = one_line_error(runner.invoke(app, ["bench", "--blas-kernels", "--against", "torch"]))
    assert "--blas-kernels" in err and "--against" in err
    err = one_line_error(runner.invoke(app, ["bench", "--blas-kernels", "--config", "no/such.yaml"]))
    assert "config file not found" in err
    with pytest.raises(CnnError, match="OPENBLAS_CORETYPE=Haswell failed .exit 1.: .*no/such.yaml"):
        compare_blas_kernels(["--config", "no/such.yaml"], rounds=1, candidates=["Haswell"])


def test_torch_script_follows_the_airbench_recipe(tmp_path: Path, real_cifar_dir: Path) -> None:
    """The whole airbench94 recipe on a slice, narrowed: whitening init, a frozen conv and a bias frozen after
    epoch 1, 64× learning rate on the batch-norm biases, decoupled decay, label smoothing, the piecewise schedule
    over train.steps, alternating flips and reflect crops, the lookahead, and the test with and without
    test-time augmentation. PyTorch's SGD and cross-entropy (label_smoothing) are an independent implementation
    of cnncli's optimizer and loss: after nine steps both networks hold the same weights to float32 drift, far
    closer than any piece left out of either side would leave them."""
    _torch()
    from cnncli.bench.torchbench import train_torch
    from cnncli.cli.bench import torch_script
    from cnncli.nn.model import build_model
    from cnncli.run.checkpoint import load_checkpoint
    from cnncli.run.train import train

    narrow = [f"model.layers[{i}].out_channels={c}" for i, c in ((2, 8), (6, 8), (9, 16), (13, 16), (16, 16),
                                                                   (20, 16))]
    sets = [*narrow, "data.limit=600", "train.batch_size=100", "train.steps=9", "model.layers[0].whiten=200",
            "train.lookahead.every=2", "train.eval_batch_size=1000", "train.param_groups[1].trains_until=1"]
    cfg = load_config("airbench94", sets)
    ours = train(cfg, tmp_path / "run", real_cifar_dir)
    theirs = train_torch(cfg, real_cifar_dir)
    assert (theirs.n_train, theirs.n_val, theirs.n_test, theirs.tta) == (600, 0, 10000, "mirror-translate")
    assert [e.epoch for e in theirs.history] == [m.epoch for m in ours.history] == [1, 2]
    for e, m in zip(theirs.history, ours.history, strict=True):
        assert e.lr == pytest.approx(m.lr)
        assert e.train_loss == pytest.approx(m.train_loss, rel=2e-3)
    start = build_model(cfg.model, seed=cfg.seed).named_params()
    trained = load_checkpoint(tmp_path / "run" / "last.npz").params
    assert theirs.params.keys() == start.keys()
    for name in start:
        w = trained[name]
        # whiten.W: set from the data, then frozen; both must hold the same whitening
        moved = float(np.abs(w - start[name]).max()) if name != "whiten.W" else 5e-4 * float(np.abs(w).max())
        assert moved > 0, name
        assert float(np.abs(theirs.params[name] - w).max()) <= 0.02 * moved, name
    assert ours.test is not None and ours.test_plain is not None
    assert theirs.test_loss == pytest.approx(ours.test.loss, rel=2e-3)
    assert theirs.test_plain_loss == pytest.approx(ours.test_plain.loss, rel=2e-3)
    # nine steps leave the network near chance, its logits close together: a few argmaxes flip with rounding
    assert abs(theirs.test_acc - ours.test.accuracy) <= 0.01
    assert abs(theirs.test_plain_acc - ours.test_plain.accuracy) <= 0.01
    # the command line: --set reaches the config, both tests are printed
    result = runner.invoke(torch_script, ["train", "--config", "airbench94", "--data-dir", str(real_cifar_dir),
                                          *(a for s in [*sets, "train.steps=3"] for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    text = _stdout(result)
    assert "airbench94 in PyTorch" in text and "3 steps" in text and "epoch 1: train loss" in text
    assert "with test-time augmentation mirror-translate: loss" in text and "without test-time augmentation" in text

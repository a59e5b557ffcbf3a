"""Sizes before memory: absurd channels, features, kernels, input shapes and batches are refused before anything
large is allocated, with the estimate and the limit in one line; also for a checkpoint whose stored config describes
such a network. The limit is pinned with $CNNCLI_MEMORY_LIMIT so the messages do not depend on the machine; the
estimate itself is held to what a real step allocates (tracemalloc)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from clihelp import ok, one_line_error
from typer.testing import CliRunner

from cnncli import engine
from cnncli.cli.app import app
from cnncli.config import build_config, load_config
from cnncli.host.limits import LIMIT_ENV, memory_limit, parse_size
from cnncli.nn.model import build_model
from cnncli.run.checkpoint import save_checkpoint
from cnncli.run.memory import estimate_step
from cnncli.run.optim import make_optimizer

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
runner = CliRunner()


def _config(tmp_path: Path, layers: list, input_shape: list | None = None, **top: object) -> Path:
    raw = {"model": {"layers": layers, **({"input_shape": input_shape} if input_shape else {})}, **top}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


HEAD = [{"type": "flatten"}, {"type": "linear", "out_features": 10}]


@pytest.mark.parametrize(("layers", "input_shape", "expected"), [
    ([{"type": "conv", "out_channels": 10**9}, *HEAD], None,
     "model.layers[0] (conv1): out_channels 1,000,000,000 × 3 input channels × kernel_size 3² (+ bias) = "
     "28,000,000,000 parameters need an estimated 417.2 GiB just to create"),
    ([{"type": "flatten"}, {"type": "linear", "out_features": 10**7}, {"type": "linear"}], None,
     "model.layers[1] (fc1): out_features 10,000,000 × 3,072 inputs (+ bias) = 30,730,000,000 parameters"),
    ([{"type": "conv", "out_channels": 16, "kernel_size": 20001, "padding": 10000}, *HEAD], None,
     "model.layers[0] (conv1): out_channels 16 × 3 input channels × kernel_size 20,001² (+ bias)"),
    ([{"type": "conv", "out_channels": 16}, *HEAD], [10**8, 8, 8],
     "model.layers[0] (conv1): out_channels 16 × 100,000,000 input channels × kernel_size 3²"),
], ids=["channels", "features", "kernel", "input-channels"])
def test_absurd_layer_sizes_are_refused_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          layers: list, input_shape: list | None,
                                                          expected: str) -> None:
    monkeypatch.setenv(LIMIT_ENV, "8GiB")
    cfg = _config(tmp_path, layers, input_shape)
    tracemalloc.start()
    try:
        result = runner.invoke(app, ["summary", "--config", str(cfg)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = one_line_error(result)
    assert expected in err and err.endswith("the limit is 8.0 GiB ($CNNCLI_MEMORY_LIMIT)"), err
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated before refusing"


def test_huge_input_shape_is_refused_by_train_before_the_data_loads(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIMIT_ENV, "8GiB")
    cfg = _config(tmp_path, [{"type": "conv", "out_channels": 16, "padding": 1}, {"type": "relu"},
                             {"type": "globalavgpool"}, {"type": "linear"}], [3, 100_000, 100_000])
    result = runner.invoke(app, ["train", "--config", str(cfg), "--data-dir", str(tmp_path / "no-data"),
                                 "--out", str(tmp_path / "run")])
    err = one_line_error(result)
    # the data folder does not even exist: the size check came first
    assert "model.layers[0] (conv1): one training step needs an estimated" in err
    assert "for a single example (largest: model.layers[0] (conv1), output 16×100000×100000" in err
    assert not (tmp_path / "run").exists()


def test_an_input_larger_than_every_layer_is_named_as_the_input_shape(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIMIT_ENV, "1GiB")
    cfg = _config(tmp_path, [{"type": "maxpool", "kernel_size": 40_000}, *HEAD], [3, 40_000, 40_000])
    err = one_line_error(runner.invoke(app, ["train", "--config", str(cfg), "--out", str(tmp_path / "run")]))
    assert err.startswith("error: model.input_shape: one training step needs an estimated"), err
    assert "largest: model.input_shape [3, 40000, 40000]" in err


def test_a_batch_too_large_names_the_batch_size_and_how_many_fit(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # batch-norm in training couples the examples: the whole batch goes through the network at once
    layers = [{"type": "conv", "out_channels": 16, "padding": 1, "bias": False}, {"type": "batchnorm"},
              {"type": "relu"}, *HEAD]
    monkeypatch.setenv(LIMIT_ENV, "2GiB")
    cfg = _config(tmp_path, layers, None, data={"limit": 1_000_000}, train={"batch_size": 1_000_000})
    err = one_line_error(runner.invoke(app, ["train", "--config", str(cfg), "--out", str(tmp_path / "run")]))
    assert err.startswith("error: train.batch_size: 1,000,000 (at most 50,000 images at once): one training step "
                          "needs an estimated"), err
    fits = int(err.rsplit("at most about ", 1)[1].split()[0].replace(",", ""))
    model = build_model(load_config(cfg).model)
    limit = parse_size("2GiB")
    assert estimate_step(model, fits).total <= limit < estimate_step(model, fits + 1).total
    assert 1_000 < fits < 50_000


def test_gradcheck_bench_and_eval_batches_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIMIT_ENV, "1GiB")
    err = one_line_error(runner.invoke(app, ["gradcheck", "--config", str(SEED), "--batch", "10000000"]))
    assert err.startswith("error: --batch: 10,000,000: gradcheck (float64, the whole batch) needs an estimated")
    err = one_line_error(runner.invoke(app, ["bench", "--config", str(SEED), "--eval-batch-size", "10000000"]))
    assert err.startswith("error: --eval-batch-size: 10,000,000: one inference batch needs an estimated")
    cfg = load_config(SEED)
    ckpt = save_checkpoint(tmp_path / "w.npz", build_model(cfg.model), cfg)
    monkeypatch.setenv(LIMIT_ENV, "64MiB")
    err = one_line_error(runner.invoke(app, ["eval", str(ckpt), "--data-dir", str(tmp_path / "none"),
                                             "--eval-batch-size", "50000"]))
    assert err.startswith("error: --eval-batch-size: 50,000: one evaluation batch needs an estimated"), err
    assert "the limit is 64.0 MiB ($CNNCLI_MEMORY_LIMIT)" in err


def test_a_checkpoint_describing_an_absurd_network_is_refused_before_its_arrays(tmp_path: Path) -> None:
    cfg = load_config(SEED)
    good = save_checkpoint(tmp_path / "good.npz", build_model(cfg.model), cfg)
    with np.load(good, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    raw = json.loads(str(arrays["config"]))
    raw["model"]["layers"][0]["out_channels"] = 10**9
    arrays["config"] = np.array(json.dumps(raw))
    bad = tmp_path / "absurd.npz"
    np.savez(bad, **arrays)
    for argv in (["eval", str(bad)], ["train", "--resume", str(bad)]):
        err = one_line_error(runner.invoke(app, argv))
        assert err.startswith(f"error: {bad}: stored config: model.layers[0] (conv1): out_channels 1,000,000,000"), err
        assert "GiB just to create" in err


def test_the_limit_comes_from_the_environment_or_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_size("8GiB") == 8 * 2**30 and parse_size("1.5 MB") == 1_500_000 and parse_size("4096") == 4096
    assert parse_size("off") is None and parse_size("0") is None
    with pytest.raises(ValueError):
        parse_size("lots")
    cfg = _config(tmp_path, [{"type": "conv", "out_channels": 64}, *HEAD])  # 578,314 parameters: about 9 MiB
    monkeypatch.setenv(LIMIT_ENV, "1MiB")
    assert "the limit is 1.0 MiB" in one_line_error(runner.invoke(app, ["summary", "--config", str(cfg)]))
    monkeypatch.setenv(LIMIT_ENV, "0")  # no check
    ok(runner.invoke(app, ["summary", "--config", str(cfg)]))
    monkeypatch.setenv(LIMIT_ENV, "lots")
    err = one_line_error(runner.invoke(app, ["summary", "--config", str(cfg)]))
    assert f"${LIMIT_ENV}: expected a size such as 8GiB" in err and "'lots'" in err
    monkeypatch.delenv(LIMIT_ENV)
    limit = memory_limit()
    assert limit.bytes is not None and limit.bytes > 0
    assert any(word in limit.source for word in ("MemAvailable", "cgroup", "physical"))


@pytest.mark.parametrize("layers", [
    None,  # the seed network: micro-batches per engine worker
    [{"type": "conv", "out_channels": 16, "padding": 1, "bias": False}, {"type": "batchnorm"}, {"type": "relu"},
     {"type": "maxpool"}, *HEAD],  # batch-norm: the whole batch at once
], ids=["seed", "batchnorm"])
def test_the_estimate_is_close_to_what_a_training_step_allocates(layers: list | None) -> None:
    cfg = load_config(SEED) if layers is None else build_config({"model": {"layers": layers}})
    batch = 96
    tracemalloc.start()
    try:
        model = build_model(cfg.model)
        optimizer = make_optimizer(model.named_params(), cfg.train.optimizer, model.decayed())
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        for _ in range(2):
            engine.loss_and_grads(model, x, y)
            optimizer.step(model.named_params(), model.named_grads(), 0.01)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = estimate_step(model, batch).total
    assert 0.4 < peak / estimate < 2.5, (peak, estimate)

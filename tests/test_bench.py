"""`cnn bench` and `cnncli.bench`: it runs, reports every figure, and the profile adds up. Never timings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from clihelp import stdout_of as _stdout
from typer.testing import CliRunner

from cnncli.bench import run_bench
from cnncli.cli import app
from cnncli.config import load_config
from cnncli.engine import blas_info, blas_threads

ROOT = Path(__file__).resolve().parent.parent
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
    for needle in ("train step", "inference", "images/s", "conv1", "fc1", "BLAS"):
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

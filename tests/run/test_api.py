"""The Python API (`cnncli.fit`, `cnncli.load`, `Classifier`): docs/python-api.md's code runs as written, and
`fit` treats its config and overrides as `cnn train` treats a config and --set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

import cnncli
from cnncli.host.errors import ConfigError

DOC = ROOT / "docs" / "python-api.md"


def _blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_documented_example_runs(real_cifar_dir: Path, tmp_path: Path) -> None:
    blocks = _blocks()
    assert len(blocks) >= 2
    script = tmp_path / "example.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    env = {**os.environ, "CNNCLI_DATA": str(real_cifar_dir)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^test accuracy \d+\.\d% after 1 epoch\(s\)$", proc.stdout, flags=re.M), proc.stdout
    assert "first.png (('" in proc.stdout and "no-such-photo.jpg: no such file" in proc.stdout
    run = tmp_path / "runs" / "api-example"
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    # the dict config and the keyword overrides both reached the run, and the shape came from the data set
    assert cfg["data"]["limit"] == 2000 and cfg["train"]["epochs"] == 1 and cfg["train"]["batch_size"] == 100
    assert cfg["train"]["optimizer"]["type"] == "sgd" and cfg["model"]["input_shape"] == [3, 32, 32]


def test_fit_refuses_an_earlier_run_and_bad_keys_before_any_work(tmp_path: Path) -> None:
    layers = [{"type": "flatten"}, {"type": "linear"}]
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"run: holds an earlier run \(best\.npz\).*--overwrite"):
        cnncli.fit({"model": {"layers": layers}}, out=run)
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key; did you mean 'train\.epochs'\?"):
        cnncli.fit({"model": {"layers": layers}}, out=tmp_path / "new", train={"epoch": 1})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"layers": layers}, "train": {"optimizer": {"type": "adam"}}}),
                      encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.optimizer\.lr: must be greater than 0"):
        cnncli.fit(config, out=tmp_path / "new", train={"optimizer": {"lr": 0}})  # merged, not replaced: type stays
    assert not (tmp_path / "new").exists()


def test_import_cnncli_stays_light_and_train_stays_the_module() -> None:
    code = ("import sys, cnncli; light = 'cnncli.run.train' not in sys.modules; "
            "import cnncli.run.train as t; from cnncli import fit, load, Classifier; "
            "print(light, t.__name__, fit.__module__, load.__module__, Classifier.__module__, 'fit' in dir(cnncli))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == [
        "True", "cnncli.run.train", "cnncli.run.api", "cnncli.run.api", "cnncli.run.predict", "True"
    ]

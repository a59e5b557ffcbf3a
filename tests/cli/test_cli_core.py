"""`cnn summary` and `cnn gradcheck` through Typer's CliRunner: bad configs give one red line naming the
problem, exit code 1 and no traceback; `cnn summary` names every layer and the totals.

Totals are recomputed here from the formulas (conv: C_out·H'·W'·C_in·K² multiply-adds and
C_out·C_in·K² + C_out parameters; linear: in·out multiply-adds and in·out + out parameters).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from clihelp import stderr_of as _stderr
from clihelp import stdout_of as _stdout
from typer.testing import CliRunner

from cnncli.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "configs" / "seed.yaml"
DIAGRAM = ROOT / "configs" / "seed-diagram.yaml"
COMMANDS = ["summary", "gradcheck"]

runner = CliRunner()


def _seed_raw() -> dict:
    return yaml.safe_load(SEED.read_text(encoding="utf-8"))


def _write(tmp_path: Path, raw: object, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _fail(command: str, config: Path) -> str:
    """Run `cnn <command> --config <config>`, check the user-error contract, return the message."""
    result = runner.invoke(app, [command, "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = _stderr(result).strip()
    assert err, "the error goes to stderr"
    assert "\n" not in err, f"one line expected: {err!r}"
    assert err.lower().startswith("error")
    return err


# ---------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_config_file(command: str, tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist.yaml"
    msg = _fail(command, path)
    assert str(path) in msg
    assert "not found" in msg


@pytest.mark.parametrize("command", COMMANDS)
def test_config_path_is_a_directory(command: str, tmp_path: Path) -> None:
    folder = tmp_path / "configs.d"
    folder.mkdir()
    msg = _fail(command, folder)
    assert str(folder) in msg


@pytest.mark.parametrize("command", COMMANDS)
def test_invalid_yaml_names_file_and_line(command: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    lines = SEED.read_text(encoding="utf-8").splitlines()
    # break one flow mapping: drop its closing brace on the first conv layer line
    bad = next(i for i, line in enumerate(lines) if "type: conv" in line)
    lines[bad] = lines[bad].rstrip().removesuffix("}") + ": :"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    msg = _fail(command, path)
    assert str(path) in msg
    assert "yaml" in msg.lower()
    # PyYAML detects the problem on that line or on the next one, where the mapping should have ended
    found = [int(n) for n in re.findall(r"line (\d+)", msg)]
    assert found and found[0] in (bad + 1, bad + 2), msg


@pytest.mark.parametrize("command", COMMANDS)
def test_invalid_yaml_tab_indent_names_the_exact_line(command: str, tmp_path: Path) -> None:
    path = tmp_path / "tabs.yaml"
    path.write_text("seed: 0\nmodel:\n  input_shape: [3, 32, 32]\n\tlayers: []\n", encoding="utf-8")
    msg = _fail(command, path)
    assert re.search(r"line 4\b", msg), msg


# ----------------------------------------------------------------------------------------- bad content


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_layer_type(command: str, tmp_path: Path) -> None:
    raw = _seed_raw()
    raw["model"]["layers"][0]["type"] = "conv3d"
    msg = _fail(command, _write(tmp_path, raw))
    assert "model.layers[0]" in msg
    assert "conv3d" in msg
    assert re.search(r"did you mean\W+conv\b", msg), msg


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_key_with_suggestion(command: str, tmp_path: Path) -> None:
    raw = _seed_raw()
    layer = raw["model"]["layers"][2]
    layer["kernal_size"] = layer.pop("kernel_size")
    path = _write(tmp_path, raw)
    msg = _fail(command, path)
    assert str(path) in msg
    assert "model.layers[2].kernal_size" in msg
    assert re.search(r"did you mean\W+(model\.layers\[2\]\.)?kernel_size\b", msg), msg


@pytest.mark.parametrize("command", COMMANDS)
def test_non_positive_size(command: str, tmp_path: Path) -> None:
    raw = _seed_raw()
    raw["model"]["layers"][0]["out_channels"] = 0
    msg = _fail(command, _write(tmp_path, raw))
    assert "model.layers[0].out_channels" in msg
    assert re.search(r"(?<![\d.])0(?![\d.])", msg.split("model.layers[0].out_channels", 1)[1]), msg


@pytest.mark.parametrize("command", COMMANDS)
def test_layer_with_empty_output(command: str, tmp_path: Path) -> None:
    raw = {
        "model": {
            "input_shape": [3, 4, 4],
            "layers": [
                {"type": "conv", "out_channels": 8, "kernel_size": 5, "padding": 0},
                {"type": "flatten"},
                {"type": "linear"},
            ],
        }
    }
    msg = _fail(command, _write(tmp_path, raw))
    assert "model.layers[0]" in msg
    assert "conv1" in msg
    assert re.search(r"3\s*[×x]\s*4\s*[×x]\s*4", msg), msg  # the input that is too small
    # (4 − 5) // 1 + 1 = 0 rows and columns
    assert re.search(r"8\s*[×x]\s*0\s*[×x]\s*0", msg) or "empty" in msg, msg


@pytest.mark.parametrize("command", COMMANDS)
def test_linear_before_flatten(command: str, tmp_path: Path) -> None:
    raw = _seed_raw()
    raw["model"]["layers"] = [layer for layer in raw["model"]["layers"] if layer["type"] != "flatten"]
    index = next(i for i, layer in enumerate(raw["model"]["layers"]) if layer["type"] == "linear")
    msg = _fail(command, _write(tmp_path, raw))
    assert f"model.layers[{index}]" in msg
    assert "fc1" in msg
    assert "flatten" in msg


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("key", "value", "shown"), [("kernel_size", "3", '"3"'), ("stride", 1.5, "1.5")])
def test_wrong_types(command: str, key: str, value: object, shown: str, tmp_path: Path) -> None:
    raw = _seed_raw()
    raw["model"]["layers"][0][key] = value
    msg = _fail(command, _write(tmp_path, raw))
    assert f"model.layers[0].{key}" in msg
    assert shown in msg


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_layers(command: str, tmp_path: Path) -> None:
    msg = _fail(command, _write(tmp_path, {"seed": 0, "model": {"input_shape": [3, 32, 32]}}))
    assert "model.layers" in msg


@pytest.mark.parametrize("command", COMMANDS)
def test_empty_file(command: str, tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert f"{path}: is empty, not a config" in _fail(command, path)


def test_error_is_a_single_line_even_when_long(tmp_path: Path) -> None:
    raw = _seed_raw()
    raw["model"]["layers"][0]["type"] = "a_really_long_unknown_layer_type_name_" * 4
    msg = _fail("summary", _write(tmp_path, raw, "x" * 60 + ".yaml"))
    assert len(msg) > 120  # longer than the console width, still one line


# ------------------------------------------------------------------------------------------- summary


def _expected_rows(path: Path) -> tuple[list[tuple[str, int, int]], int, int]:
    """(name, params, macs) per layer from the formulas, and the totals."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]
    shape = tuple(raw["input_shape"])
    rows = []
    n_conv = n_fc = 0
    for spec in raw["layers"]:
        kind = spec["type"]
        if kind == "conv":
            n_conv += 1
            c, h, w = shape
            k, s, p, co = spec["kernel_size"], spec.get("stride", 1), spec.get("padding", 0), spec["out_channels"]
            ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            rows.append((spec.get("name", f"conv{n_conv}"), co * c * k * k + co, co * ho * wo * c * k * k))
            shape = (co, ho, wo)
        elif kind == "maxpool":
            c, h, w = shape
            k = spec["kernel_size"]
            s = spec.get("stride", k)
            shape = (c, (h - k) // s + 1, (w - k) // s + 1)
            rows.append(("maxpool", 0, 0))
        elif kind == "flatten":
            shape = (shape[0] * shape[1] * shape[2],)
            rows.append(("flatten", 0, 0))
        elif kind == "linear":
            n_fc += 1
            n_in, n_out = shape[0], spec["out_features"]
            rows.append((spec.get("name", f"fc{n_fc}"), n_in * n_out + n_out, n_in * n_out))
            shape = (n_out,)
        else:
            rows.append((kind, 0, 0))
    return rows, sum(r[1] for r in rows), sum(r[2] for r in rows)


def _numbers(line: str) -> list[int]:
    return [int(m.replace(",", "").replace("_", "")) for m in re.findall(r"\d[\d,_]*", line)]


@pytest.mark.parametrize("path", [SEED, DIAGRAM], ids=lambda p: p.name)
def test_summary_names_each_layer_and_the_totals(path: Path) -> None:
    result = runner.invoke(app, ["summary", "--config", str(path)])
    assert result.exit_code == 0, result.output
    out = _stdout(result)
    rows, total_params, total_macs = _expected_rows(path)
    lines = out.splitlines()
    for name, params, macs in rows:
        matching = [line for line in lines if re.search(rf"\b{re.escape(name)}\b", line)]
        assert matching, (name, out)
        if params:  # the layer's own row carries its parameter count and multiply-adds
            assert any(params in _numbers(line) and macs in _numbers(line) for line in matching), (name, out)
    total_lines = [line for line in lines if "total" in line.lower()]
    assert total_lines, out
    assert any(total_params in _numbers(line) and total_macs in _numbers(line) for line in total_lines), out


def test_summary_of_the_seed_config_by_hand() -> None:
    result = runner.invoke(app, ["summary", "--config", str(SEED)])
    assert result.exit_code == 0
    total = next(line for line in _stdout(result).splitlines() if "total" in line.lower())
    # params: conv1 16·27 + 16 = 448, fc1 4096·10 + 10 = 40,970; multiply-adds: 16·32·32·27 + 4096·10
    assert 448 + 40970 in _numbers(total)
    assert 442368 + 40960 in _numbers(total)


def test_summary_reflects_the_config_file(tmp_path: Path) -> None:
    raw = _seed_raw()
    raw["model"]["layers"][0]["out_channels"] = 8
    raw["model"]["layers"][0]["name"] = "stem"
    path = _write(tmp_path, raw, "narrow.yaml")
    result = runner.invoke(app, ["summary", "--config", str(path)])
    assert result.exit_code == 0, result.output
    _, total_params, total_macs = _expected_rows(path)
    out = _stdout(result)
    assert re.search(r"\bstem\b", out)
    assert not re.search(r"\bconv1\b", out)
    total = next(line for line in out.splitlines() if "total" in line.lower())
    assert total_params in _numbers(total) and total_macs in _numbers(total)


def test_summary_uses_the_default_config_from_the_project_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = runner.invoke(app, ["summary"])
    assert result.exit_code == 0, result.output
    assert "conv1" in _stdout(result) and "fc1" in _stdout(result)


def test_help_lists_the_core_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("summary", "gradcheck"):
        assert command in result.output

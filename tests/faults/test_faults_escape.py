"""Nothing from a file or a name reaches the terminal raw: class names (a checkpoint's `classes`, an image
folder's sub-folder names), file names and per-file errors go through one escaping function
(`cnncli.cli.text.one_line`, with `safe` for Rich markup and `json_text` for --json).

Hostile text: ESC[2J (clear screen), a colour code, a bell, a newline, a carriage return, a C1 CSI (U+009B),
a right-to-left override (U+202E) and Rich markup ('[red]'). Before the fix `cnn predict` and `cnn eval`
printed them as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clihelp import stderr_of, stdout_of
from faultkit import png, tiny_checkpoint, within
from typer.testing import CliRunner

from cnncli.cli.app import app

pytest.importorskip("PIL.Image")
runner = CliRunner()
HOSTILE = ["clear\x1b[2J", "red\x1b[31m", "bell\x07", "two\nlines", "back\rspace", "csi\x9b1m", "rtl\u202egnp",
           "[red]markup", "tab\tx", "plain"]
RAW = ("\x1b", "\x07", "\r", "\x9b", "\u202e", "\t")  # none of these may reach the terminal


@pytest.fixture(autouse=True)
def _no_hang(request: pytest.FixtureRequest):
    with within(60, request.node.name):
        yield


def _clean(text: str) -> None:
    for c in RAW:
        assert c not in text, f"{c!r} reached the terminal: {text!r}"


def test_predict_escapes_class_names_from_the_checkpoint(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "c.npz", classes=tuple(HOSTILE))
    image = png(tmp_path / "a.png")
    result = runner.invoke(app, ["predict", str(ckpt), str(image), "--top-k", "10"])
    assert result.exit_code == 0, result.output
    out = stdout_of(result)
    _clean(out)
    assert len(out.splitlines()) == 1  # one line per image: no newline from a name
    for shown in ["clear\\x1b[2J", "bell\\x07", "two\\nlines", "csi\\x9b1m", "rtl\\u202egnp", "[red]markup",
                  "tab\\tx"]:
        assert shown in out
    # --json: valid JSON that gives the names back exactly, with nothing raw on the line
    result = runner.invoke(app, ["predict", str(ckpt), str(image), "--top-k", "10", "--json"])
    line = stdout_of(result)
    _clean(line)
    assert "\\u009b" in line and "\\u202e" in line
    assert {t["class"] for t in json.loads(line)["top"]} == set(HOSTILE)


def test_predict_escapes_file_names_and_per_file_errors(tmp_path: Path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "c.npz", classes=tuple(f"c{i}" for i in range(10)))
    good = png(tmp_path / "good\x1b[2J.png")
    bad = tmp_path / "bad\nname\x07.png"
    bad.write_bytes(b"not an image")
    result = runner.invoke(app, ["predict", str(ckpt), str(good), str(bad), str(tmp_path / "gone\x1b]0;t\x07")])
    assert result.exit_code == 1
    out, err = stdout_of(result), stderr_of(result)
    _clean(out + err)
    assert out.splitlines()[0].startswith(f"{tmp_path}/good\\x1b[2J.png: ")
    assert err.splitlines() == [
        f"error: {tmp_path}/bad\\nname\\x07.png: not a PNG or JPEG image (or damaged beyond recognition)",
        f"error: {tmp_path}/gone\\x1b]0;t\\x07: no such file or folder",
    ]


def _hostile_folder_set(root: Path, names: list[str]) -> Path:
    for split in ("train", "test"):
        for i, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            png(root / split / name / "0.png", value=20 * i)
    return root


def test_eval_escapes_class_names_from_an_image_folder(tmp_path: Path) -> None:
    from dataclasses import replace

    from cnncli.run.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    names = [n for n in HOSTILE if "\n" not in n and "\r" not in n] + ["nl\nx"]  # folder names may hold '\n'
    root = _hostile_folder_set(tmp_path / "set", names)
    seed = tiny_checkpoint(tmp_path / "seed.npz")
    ckpt = load_checkpoint(seed)
    cfg = replace(ckpt.config, data=replace(ckpt.config.data, dataset="folder", dir=str(root), val_size=0))
    path = save_checkpoint(tmp_path / "folder.npz", model_from_checkpoint(ckpt, seed), cfg)
    result = runner.invoke(app, ["eval", str(path), "--data-dir", str(root)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    out = stdout_of(result)
    _clean(out)
    assert "clear\\x1b[2J" in out and "nl\\nx" in out and "[red]markup" in out
    assert not [line for line in out.splitlines() if line.strip() == "x"]  # 'nl\nx' did not break a line


def test_the_escaping_function_itself() -> None:
    from cnncli.cli.text import json_text, one_line, safe

    assert one_line("a\x1b[2Jb\nc\x07\x9b\u202e\u2028é漢") == "a\\x1b[2Jb\\nc\\x07\\x9b\\u202e\\u2028é漢"
    assert safe("[red]x\x1b") == "\\[red]x\\x1b"
    text = json_text({"k": "\x1b\x9b\u2028\U000e0001é"})
    assert text == '{"k": "\\u001b\\u009b\\u2028\\udb40\\udc01é"}'
    assert json.loads(text) == {"k": "\x1b\x9b\u2028\U000e0001é"}

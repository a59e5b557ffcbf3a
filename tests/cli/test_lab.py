"""`cnn lab new` / `cnn lab check`: the teacher's kit run end to end — a conv lab written, then graded as
handed in (not written), solved, and solved wrongly in two ways (δb a mean where a sum belongs; δX's loop
skipping the last output row). The solution's backward is the loop over kernel offsets of
docs/derivations.md#convolution, written independently of cnncli's im2col backward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from buglab import CONV_BACKWARD_BODY
from clihelp import ok, one_line_error, stdout_of
from typer.testing import CliRunner

from cnncli.cli.app import app
from cnncli.run.lab import KINDS

runner = CliRunner()

STUB = '        raise NotImplementedError("LabConv2D.backward: not written yet")\n'
SOLUTION = CONV_BACKWARD_BODY.replace("self._x", "self.x")  # the lab's layer keeps its input as self.x
WRONG_MEAN = SOLUTION.replace("dout.sum(axis=(0, 2, 3))", "dout.mean(axis=(0, 2, 3))")
WRONG_ROW = SOLUTION.replace("for i in range(ho):", "for i in range(ho - 1):")


pytestmark = pytest.mark.usefixtures("clean_registry")  # layer types a test registers vanish after it


def _lab(tmp_path: Path) -> Path:
    folder = tmp_path / "lab-conv"
    text = ok(runner.invoke(app, ["lab", "new", "conv", "--out", str(folder)]))
    assert "conv_layer.py" in text
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "conv_layer.py", "lab.yaml"]
    return folder


def _student(folder: Path, name: str, body: str) -> Path:
    src = (folder / "conv_layer.py").read_text()
    assert STUB in src
    path = folder / f"{name}.py"
    path.write_text(src.replace(STUB, body))
    return path


def _grade(path: Path) -> dict:
    result = runner.invoke(app, ["lab", "check", str(path), "--json"])
    assert "Traceback" not in result.output
    return json.loads(stdout_of(result))["grades"][0]


def _items(g: dict) -> dict[str, dict]:
    return {i["name"]: i for i in g["items"]}


def test_the_lab_end_to_end(tmp_path: Path) -> None:
    folder = _lab(tmp_path)
    # as handed out: the forward is given and passes; nothing else does
    stub = _grade(folder / "conv_layer.py")
    items = _items(stub)
    assert items["forward = cnncli's conv"]["passed"] and stub["score"] == 1 and stub["max_score"] == 7
    assert "not written yet (line" in items["δx alone"]["detail"]
    # the solution: full marks
    good = _grade(_student(folder, "alice", SOLUTION))
    assert good["score"] == good["max_score"] == 7 and good["passed"], good
    # δb averaged: only grads['b'] and the whole network fail, and the factor is named
    mean = _items(_grade(_student(folder, "bob", WRONG_MEAN)))
    assert not mean["grads['b'] alone"]["passed"] and "a mean where a sum belongs" in mean["grads['b'] alone"]["detail"]
    assert mean["δx alone"]["passed"] and mean["grads['W'] alone"]["passed"]
    assert not mean["whole-network gradcheck"]["passed"] and "conv1.b fail" in mean["whole-network gradcheck"]["detail"]
    # δX's loop one row short: δx fails at a few entries, said where
    row = _items(_grade(_student(folder, "carol", WRONG_ROW)))
    assert not row["δx alone"]["passed"] and "indexing bug" in row["δx alone"]["detail"]
    assert row["grads['W'] alone"]["passed"] and row["grads['b'] alone"]["passed"]
    assert "layer at fault: conv1" in row["whole-network gradcheck"]["detail"]
    # a whole class in one command: a score table, exit 1 since not everyone has full marks
    result = runner.invoke(app, ["lab", "check", *(str(folder / f"{n}.py") for n in ("alice", "bob", "carol"))])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "7 / 7" in stdout_of(result) and "scores" in stdout_of(result)
    # the lab's own files work with the commands the README names
    ok(runner.invoke(app, ["gradcheck", "--layer", "labconv", "-c", str(folder / "lab.yaml"), "--layers",
                           str(folder / "alice.py")]))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_lab_stub_loads_and_its_network_builds(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / kind
    ok(runner.invoke(app, ["lab", "new", kind, "--out", str(folder)]))
    g = _grade(folder / f"{kind}_layer.py")
    assert _items(g)[f"forward = cnncli's {kind}"]["passed"]
    assert g["score"] == 1  # only the given forward


def test_lab_errors_are_one_line(tmp_path: Path) -> None:
    assert "not one of conv" in one_line_error(runner.invoke(app, ["lab", "new", "nope", "--out", str(tmp_path)]))
    assert "not a layer in cnncli" in one_line_error(runner.invoke(app, ["lab", "new", "softmax-ce"]))
    _lab(tmp_path)
    err = one_line_error(runner.invoke(app, ["lab", "new", "conv", "--out", str(tmp_path / "lab-conv")]))
    assert "already exists" in err

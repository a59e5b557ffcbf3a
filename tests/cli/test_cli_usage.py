"""The `cnn` console script's own usage errors are one line too (exit 2), and it has -h and --version.

Through the real console script in a subprocess: CliRunner bypasses `cnncli.cli.app.main`, where this lives.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cnncli import __version__

CNN = str(Path(sys.executable).parent / "cnn")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CNN, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,option", [
    (("train", "--epochs", "0"), "--epochs"),
    (("train", "--epochs", "abc"), "--epochs"),
    (("train", "--seed", "-1"), "--seed"),
    (("bench", "--batch", "four"), "--batch"),
    (("gradcheck", "--no-such-option"), "--no-such-option"),
])
def test_bad_option_values_give_one_line_naming_the_option(args: tuple[str, ...], option: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and err.startswith("error:") and option in err, err
    assert "╭" not in err and "Traceback" not in err
    assert f"cnn {args[0]} --help" in err


def test_version_and_short_help() -> None:
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"cnn (cnncli) {__version__}"
    proc = _run("eval", "-h")
    assert proc.returncode == 0 and "Usage: cnn eval" in proc.stdout


def test_user_errors_keep_exit_code_1(tmp_path: Path) -> None:
    proc = _run("summary", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"error: {tmp_path / 'missing.yaml'}: config file not found")
    assert "\n" not in proc.stderr.strip()

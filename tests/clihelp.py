"""Helpers shared by the CLI tests: read CliRunner's streams and check the one-line user-error contract."""

from __future__ import annotations

from typing import Any


def stderr_of(result: Any) -> str:
    try:
        return result.stderr
    except ValueError:  # older Click mixes the streams
        return result.output


def stdout_of(result: Any) -> str:
    try:
        return result.stdout
    except ValueError:
        return result.output


def one_line_error(result: Any) -> str:
    """The user-error contract of the CLI: exit 1, one line on stderr starting 'error:', no traceback."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = stderr_of(result).strip()
    assert "Traceback" not in result.output and "Traceback" not in err
    assert err.startswith("error:"), err
    assert "\n" not in err, f"one line expected: {err!r}"
    return err


def ok(result: Any) -> str:
    """Exit 0; returns stdout."""
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return stdout_of(result)

"""The `cnn` command line: parse, call the library, render. The only module that talks to the terminal."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from cnncli.errors import CnnError

app = typer.Typer(
    name="cnn",
    help="Train convolutional networks on CIFAR-10 in pure NumPy, every pass written by hand.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a CnnError into one red line on stderr and exit code 1; real bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CnnError as e:
            err.print(f"[red]error:[/red] {e}", soft_wrap=True, markup=True, emoji=False)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder holding cifar-10-batches-py/ (or that folder itself). "
        "Default: $CNNCLI_DATA, data.dir in the config, then $XDG_CACHE_HOME/cnncli.",
    ),
]


@app.command()
@user_errors
def download(data_dir: DataDirOpt = None) -> None:
    """Download, verify and extract CIFAR-10 (nothing happens when it is already there)."""
    from cnncli import data
    from cnncli.progress import byte_progress

    target = data.resolve_data_dir(data_dir, None)
    with byte_progress("cifar-10-python.tar.gz") as update:
        folder = data.ensure_cifar10(target, url=os.environ.get("CNNCLI_CIFAR10_URL"), progress=update)
    err.print(f"CIFAR-10 ready in {folder}")

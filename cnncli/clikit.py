"""What every `cnn` command shares: the two consoles, the one-line user-error wrapper, common options.

The import graph runs one way: `cnncli/cli.py` (the Typer app) imports the command modules
(`cli_train`, `cli_bench`, `cli_viz`, …), and they import this module; none of them imports `cli.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from cnncli.errors import CnnError


def _console(stderr: bool = False) -> Console:
    """Rich console; wider than Rich's 80 columns when writing to a file or pipe, so tables keep their names."""
    probe = Console(stderr=stderr)
    return Console(stderr=stderr, highlight=False, width=None if probe.is_terminal else 120)


out = _console()
err = _console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a CnnError into one red line on stderr and exit code 1; real bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CnnError as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True, emoji=False)
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

CONFIG_DEFAULT = Path("configs/seed.yaml")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config describing the network.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
LayersOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--layers",
        help="A Python file of your own layer classes (subclasses of cnncli.Layer) that the config uses; "
        "repeatable. It runs as your code: only name files you trust.",
    ),
]


def load_layers(paths: list[Path] | None) -> None:
    """Register the layer types of every `--layers` file (nothing when none is given)."""
    if paths:
        from cnncli.registry import load_layer_file

        for p in paths:
            load_layer_file(p)


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def prepare_data(data_dir: Path | None, cfg: Any) -> Path:
    """Resolve the data dir (--data-dir > $CNNCLI_DATA > data.dir > cache; folder: --data-dir > data.dir) and
    download the config's data set if needed (mirror: $CNNCLI_<SET>_URL > data.url)."""
    from cnncli import data
    from cnncli.progress import byte_progress

    target = data.resolve_data_dir(data_dir, cfg.data.dir, cfg.data.dataset)
    with byte_progress(data.download_label(cfg.data)) as update:
        return data.ensure_dataset(cfg.data, target, update)

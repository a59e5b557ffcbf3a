"""What every `cnn` command shares: the two consoles, the one-line user-error wrapper, common options.

The import graph runs one way: `cnncli/cli/app.py` (the Typer app) imports the command modules
(`cli_train`, `cli_bench`, `cli_viz`, …), and they import this module; none of them imports `cli.py`.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from cnncli.cli.text import json_text, safe
from cnncli.host.errors import CnnError


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
            err.print(f"[red]error:[/red] {safe(e)}", soft_wrap=True, emoji=False)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- one vocabulary
# The options several commands share, spelled once. Metavars say what to give (no <list[str]> type labels);
# flags show none. An old spelling stays accepted, hidden from --help, with `renamed` on the command.

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        metavar="DIR",
        help="Folder holding cifar-10-batches-py/ (or that folder itself). "
        "Default: $CNNCLI_DATA, data.dir in the config, then $XDG_CACHE_HOME/cnncli.",
    ),
]

def complete_config(incomplete: str) -> list[str]:
    """Shell completion of --config: the built-in names that start with what is typed (else the shell's files)."""
    from cnncli.config import builtin_configs

    return [name for name in builtin_configs() if name.startswith(incomplete)]


CONFIG_DEFAULT = Path("seed")
ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", metavar="NAME|PATH", autocompletion=complete_config,
                 help="A built-in config's name (cnn config list) or a YAML file describing the network."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE",
                 help="Override a config key: --set train.optimizer.lr=0.05 (YAML value; repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print the result as JSON, one object per line.")]
LayersOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--layers",
        metavar="FILE",
        help="A Python file of your own layer classes (subclasses of cnncli.Layer) that the config uses; "
        "repeatable. It runs as your code: only name files you trust.",
    ),
]
TtaOpt = Annotated[
    str | None,
    typer.Option("--tta", metavar="LEVEL", help="Test-time augmentation: none, mirror (2 views) or mirror-translate "
                 "(6 views, airbench's); default: the checkpoint's train.tta."),
]


def check_tta(level: str | None) -> str | None:
    """--tta's value, or ConfigError in one line when it is not a level of cnncli/run/tta.py."""
    from cnncli.run.tta import TTA_LEVELS

    if level is not None and level not in TTA_LEVELS:
        from cnncli.host.errors import ConfigError

        shown = level if len(level) <= 40 else level[:40] + "…"
        raise ConfigError(f"--tta: must be one of {', '.join(TTA_LEVELS)}, got {shown!r}")
    return level


SeedOpt = Annotated[int | None, typer.Option("--seed", min=0, metavar="N", help="Seed (default: the config's seed).")]
BatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", min=1, metavar="N", help="Training batch. Default: train.batch_size.")
]
EvalBatchSizeOpt = Annotated[
    int | None,
    typer.Option("--eval-batch-size", min=1, metavar="N", help="Images per inference pass. Default: "
                 "train.eval_batch_size."),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, metavar="N", help="Engine worker threads. Default: $CNNCLI_THREADS, else the "
                 "usable CPUs."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="No progress; only errors and the final "
                                        "line.")]
SPLITS = ("test", "train", "val")
SplitOpt = Annotated[
    str, typer.Option("--split", metavar="test|train|val", autocompletion=lambda incomplete: [
        s for s in SPLITS if s.startswith(incomplete)], help="Which images: the test set, or the training or "
                      "validation part of the training set as the config splits it (data.val_size, data.limit).")
]


def check_split(split: str) -> str:
    """`--split` as eval, trace, … accept it; ConfigError naming the option otherwise."""
    from cnncli.host.errors import ConfigError

    if split not in SPLITS:
        raise ConfigError(f"--split: must be test, train or val, got {split!r}")
    return split


def renamed(old_to_new: dict[str, str]) -> Callable[[F], F]:
    """Keep accepting a command's old option spellings ({'--batch': '--batch-size'}), hidden from its --help."""
    table = {k.lstrip("-"): v.lstrip("-") for k, v in old_to_new.items()}

    def mark(fn: F) -> F:
        fn.cnn_renamed = table  # type: ignore[attr-defined]
        return fn

    return mark


def _no_type_labels(params: list[Any]) -> list[Any]:
    """Typer's help prints a type label beside every parameter (<bool> beside a flag, <path> beside an argument
    already named by its metavar): none here."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
        elif getattr(p, "param_type_name", "") == "argument":
            p.display_type_rich = lambda ctx: None  # the metavar (CHECKPOINT, DIR, …) names it
    return params


class CnnCommand(TyperCommand):
    """Every `cnn` command: flags show no type label in --help, and `renamed` spellings are accepted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        table = getattr(self.callback, "cnn_renamed", None)
        if table:
            self.context_settings = {**self.context_settings, "token_normalize_func": lambda t: table.get(t, t)}

    def get_params(self, ctx: Any) -> list[Any]:
        return _no_type_labels(super().get_params(ctx))


class CnnGroup(TyperGroup):
    """A `cnn` command group (the app, `cnn sweep`, `cnn config`), shown as CnnCommand shows commands."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _no_type_labels(super().get_params(ctx))


def use_cnn_classes(app: typer.Typer) -> None:
    """Make every command registered on `app` and its sub-apps a CnnCommand (groups set `cls=CnnGroup`)."""
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = CnnCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            use_cnn_classes(group.typer_instance)


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def print_json(obj: Any) -> None:
    """One JSON object on one line of stdout (NaN and infinities as null), for `--json`."""
    sys.stdout.write(json_text(_plain(obj)) + "\n")
    sys.stdout.flush()


def load_layers(paths: list[Path] | None) -> None:
    """Register the layer types of every `--layers` file (nothing when none is given)."""
    if paths:
        from cnncli.nn.registry import load_layer_file

        for p in paths:
            load_layer_file(p)


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def prepare_data(data_dir: Path | None, cfg: Any, quiet: bool = False) -> Path:
    """Resolve the data dir (--data-dir > $CNNCLI_DATA > data.dir > cache; folder: --data-dir > data.dir) and
    download the config's data set if needed (mirror: $CNNCLI_<SET>_URL > data.url); `quiet`: no progress."""
    from cnncli import data
    from cnncli.cli.progress import byte_progress

    target = data.resolve_data_dir(data_dir, cfg.data.dir, cfg.data.dataset)
    if quiet:
        return data.ensure_dataset(cfg.data, target, lambda done, total: None)
    with byte_progress(data.download_label(cfg.data)) as update:
        return data.ensure_dataset(cfg.data, target, update)


def check_output(path: Path | None, option: str) -> None:
    """Before the work: `path`, a file the command will write (`option` names where it came from), must be a
    regular file or a new path (`cnncli.host.files.check_writable`), never a device, FIFO or folder."""
    if path is not None:
        from cnncli.host.errors import StorageError
        from cnncli.host.files import check_writable

        try:
            check_writable(path)
        except StorageError as e:
            raise StorageError(f"{option} {e}", e.errno, e.strerror) from None


def run_data_dir(data_dir: Path | None, run_dir: Path) -> Path | None:
    """`--data-dir` when given; otherwise the data folder the run in `run_dir` recorded in its run.json (said
    on stderr), so that plotting or evaluating a run reads what it was trained on instead of downloading."""
    if data_dir is not None:
        return data_dir
    from cnncli.run.runs import recorded_data_dir

    found = recorded_data_dir(run_dir)
    if found is not None:
        err.print(f"note: reading the data the run used, {safe(found)} (from its run.json; --data-dir to change)",
                  soft_wrap=True, highlight=False)
    return found


def split_images(cfg: Any, folder: Path, split: str) -> tuple[Any, Any, list[str]]:
    """The images and labels of `--split` (test, or the train / val part of the training set as the config
    splits it) and the class names: x uint8 (N, C, H, W), y int (N,). ConfigError when the split is empty."""
    from cnncli import data
    from cnncli.host.errors import ConfigError

    ds = data.load_dataset(cfg.data, folder, train=split != "test", test=split == "test")
    if split == "test":
        if not len(ds.test_x):
            raise ConfigError(f"--split test: {folder} has no test images (a folder data set needs a test/ folder)")
        return ds.test_x, ds.test_y, ds.classes
    s = data.make_splits(ds.train_x, ds.train_y, val_size=cfg.data.val_size, limit=cfg.data.limit, seed=cfg.seed)
    x, y = (s.val_x, s.val_y) if split == "val" else (s.train_x, s.train_y)
    if not len(x):
        raise ConfigError(f"--split {split}: empty for this config (data.val_size is {cfg.data.val_size})")
    return x, y, ds.classes

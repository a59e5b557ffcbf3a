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


CONFIG_DEFAULT = Path("configs/seed.yaml")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config describing the network.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


@app.command()
@user_errors
def gradcheck(
    config: ConfigOpt = CONFIG_DEFAULT,
    batch: Annotated[int, typer.Option(min=1, help="Images in the random batch.")] = 4,
    eps: Annotated[float, typer.Option(min=1e-12, help="Finite-difference step ε.")] = 1e-3,
    tol: Annotated[float, typer.Option(min=0.0, help="Largest relative error that passes.")] = 1e-6,
    seed: Annotated[int, typer.Option(help="Seed of the weights, the batch and the sampled entries.")] = 0,
    max_entries: Annotated[
        int, typer.Option(min=1, help="Tensors larger than this are checked on a random subset this size.")
    ] = 200,
    json_out: JsonOpt = False,
) -> None:
    """Compare every analytic gradient (each parameter and the input X) with finite differences, in float64."""
    import json
    import time

    from rich.table import Table

    from cnncli.config import load_config
    from cnncli.gradcheck import gradcheck as run_gradcheck
    from cnncli.model import build_model

    cfg = load_config(config)
    model = build_model(cfg.model, seed=seed)
    start = time.perf_counter()
    results = run_gradcheck(model, batch=batch, eps=eps, tol=tol, seed=seed, max_entries=max_entries)
    seconds = time.perf_counter() - start
    ok = all(r.passed for r in results)
    if json_out:
        payload = {
            "config": str(config),
            "batch": batch,
            "eps": eps,
            "tol": tol,
            "seed": seed,
            "passed": ok,
            "seconds": round(seconds, 3),
            "tensors": [
                {
                    "name": r.name,
                    "shape": list(r.shape),
                    "size": r.size,
                    "checked": r.checked,
                    "sampled": r.sampled,
                    "kinks": r.kinks,
                    "max_rel_error": r.max_rel_error,
                    "worst_index": list(r.worst_index),
                    "passed": r.passed,
                }
                for r in results
            ],
        }
        out.print_json(json.dumps(payload))
    else:
        table = Table(title=f"gradcheck {config} — float64, batch {batch}, ε={eps:g}, tol={tol:g}")
        table.add_column("tensor")
        table.add_column("shape")
        table.add_column("entries checked", justify="right")
        table.add_column("near a kink", justify="right")
        table.add_column("max rel. error", justify="right")
        table.add_column("result")
        for r in results:
            checked = f"{r.checked} of {r.size} (random)" if r.sampled else f"all {r.size}"
            verdict = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
            table.add_row(r.name, _shape(r.shape), checked, str(r.kinks), f"{r.max_rel_error:.2e}", verdict)
        out.print(table)
        out.print(
            "Relative error |a−n| / max(1e-8, |a|+|n|), worst entry; n from a 5-point centred difference. "
            "Steps that cross a ReLU/max-pool kink are evaluated on the unperturbed pass's piece."
        )
        verdict = "[green]all gradients pass[/green]" if ok else "[red]some gradients FAIL[/red]"
        out.print(f"{verdict} ({seconds:.1f} s)")
    if not ok:
        raise typer.Exit(code=1)


@app.command()
@user_errors
def summary(config: ConfigOpt = CONFIG_DEFAULT) -> None:
    """Each layer with its output shape, parameter count and multiply-adds per image."""
    from rich.table import Table

    from cnncli.config import load_config
    from cnncli.model import build_model

    cfg = load_config(config)
    model = build_model(cfg.model, seed=cfg.seed)
    table = Table(title=f"{config} — input {_shape(model.input_shape)}")
    table.add_column("#", justify="right")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("output shape")
    table.add_column("parameters", justify="right")
    table.add_column("multiply-adds", justify="right")
    rows = model.summary()
    for r in rows:
        table.add_row(str(r.index), r.name, r.description, _shape(r.output_shape), f"{r.params:,}", f"{r.macs:,}")
    table.add_section()
    total_p, total_m = sum(r.params for r in rows), sum(r.macs for r in rows)
    table.add_row("", "total", "", "", f"{total_p:,}", f"{total_m:,}")
    out.print(table)

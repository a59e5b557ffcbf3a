"""The `cnn` command line: the Typer app and its commands. Commands live in `cli_train`, `cli_bench`,
`cli_viz` and `cli_sweep` (parse, call the library, render); the import graph runs one way, from here to them to
`cnncli/clikit.py`. The CLI modules are the only ones that talk to the terminal."""

from __future__ import annotations

import typer

from cnncli import cli_bench, cli_sweep, cli_train, cli_viz

app = typer.Typer(
    name="cnn",
    help="Train convolutional networks on CIFAR-10 in pure NumPy, every pass written by hand.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command()(cli_train.download)
app.command()(cli_train.gradcheck)
app.command()(cli_train.summary)
app.command()(cli_train.train)
app.command(name="eval")(cli_train.eval_)
app.command()(cli_bench.bench)
app.command(help=cli_viz.TRACE_HELP)(cli_viz.trace)
app.command()(cli_viz.plot)
app.add_typer(cli_sweep.sweep_app, name="sweep")
app.command()(cli_sweep.runs)

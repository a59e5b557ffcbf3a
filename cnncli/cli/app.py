"""The `cnn` command line: the Typer app and its commands. Commands live beside it in `train`, `bench`, `viz`,
`sweep`, `predict`, `config`, `lab` and `gradients` of this package (parse, call the library, render); the
import graph runs one way, from here to them to `cnncli/cli/kit.py`. The CLI modules are the only ones that
talk to the terminal."""

from __future__ import annotations

import typer

from cnncli.cli import bench as cli_bench
from cnncli.cli import config as cli_config
from cnncli.cli import gradients as cli_gradients
from cnncli.cli import lab as cli_lab
from cnncli.cli import predict as cli_predict
from cnncli.cli import sweep as cli_sweep
from cnncli.cli import train as cli_train
from cnncli.cli import viz as cli_viz
from cnncli.cli.kit import CnnGroup, use_cnn_classes

app = typer.Typer(
    name="cnn",
    cls=CnnGroup,
    help="Train convolutional networks on CIFAR-10 in pure NumPy, every pass written by hand.",
    no_args_is_help=True,
    add_completion=True,  # cnn --install-completion (bash, zsh, fish, PowerShell), cnn --show-completion
    pretty_exceptions_enable=False,
)

app.command()(cli_train.download)
app.command()(cli_lab.gradcheck)
app.command()(cli_train.summary)
app.command()(cli_train.train)
app.command(name="eval")(cli_train.eval_)
app.command()(cli_bench.bench)
app.command(help=cli_viz.TRACE_HELP)(cli_viz.trace)
app.command()(cli_viz.plot)
app.command()(cli_gradients.saliency)
app.command()(cli_gradients.attack)
app.command()(cli_gradients.show)
app.add_typer(cli_sweep.sweep_app, name="sweep")
app.command()(cli_sweep.runs)
app.command()(cli_predict.predict)
app.command()(cli_predict.export)
app.add_typer(cli_config.config_app, name="config")
app.add_typer(cli_lab.lab_app, name="lab")

app.info.context_settings = {"help_option_names": ["-h", "--help"]}
use_cnn_classes(app)  # after every registration: one look and the old option spellings for every command


def _version(value: bool) -> None:
    if value:
        from cnncli.host.version import __version__

        typer.echo(f"cnn (cnncli) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    check_layers: bool = typer.Option(False, "--check-layers", help="Check the layer contract of every layer that "
                                      "runs through its own methods, cnncli's too (your own layers are always "
                                      "checked on their first call). The same as $CNNCLI_CHECK_LAYERS=all."),
) -> None:
    """Train convolutional networks on CIFAR-10 in pure NumPy, every pass written by hand."""
    if check_layers:
        import os

        from cnncli.nn.contracts import ENV

        os.environ[ENV] = "all"


# Click's own usage errors (a bad option value, an unknown option) as one line, like every other error.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """The `cnn` console script: the app, with Click's usage errors printed as one line (exit 2)."""
    import sys

    from cnncli.cli.kit import err
    from cnncli.host import signals

    signals.console_script()  # a command leaving because of a signal exits quietly on further ones
    try:
        # every command: SIGTERM stops it as Ctrl-C does (exit 143), and repeated signals never interrupt the
        # unwinding; `cnn train` turns the first one inside its loop into a saved, resumable stop
        with signals.stop_signals():
            code = app(standalone_mode=False)
    except _CLICK_ERROR as e:  # type: ignore[misc]
        ctx = getattr(e, "ctx", None)
        where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        err.print(f"[red]error:[/red] {e.format_message()}{where}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Abort:  # Ctrl-C outside a command's own handling (Click turns KeyboardInterrupt into Abort)
        code = signals.exit_code(signals.last_signal())
        signals.exit_now(code)
    code = code if isinstance(code, int) else 0
    if signals.last_signal() is not None:  # stopped by a signal: nothing may run (or be interrupted) at shutdown
        if code == 130:  # Typer's code for any KeyboardInterrupt: say which signal it was
            code = signals.exit_code(signals.last_signal())
        signals.exit_now(code)
    sys.exit(code)

"""The command line (`cnn`): parse, call, render. The only part of cnncli that imports Typer and Rich or prints;
`main` holds the app, one module per group of commands, `kit` the options and helpers they share."""

from cnncli.cli.app import main

__all__ = ["main"]

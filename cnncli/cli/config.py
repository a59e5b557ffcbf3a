"""`cnn config list` (the built-in configs) and `cnn config show NAME|PATH` (a config resolved: every key with
its value, defaults filled in, as YAML to copy and edit). Registered on the app in cnncli/cli/app.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnncli.cli.kit import (
    CnnGroup,
    JsonOpt,
    LayersOpt,
    SetOpt,
    load_layers,
    out,
    print_json,
    user_errors,
)
from cnncli.cli.text import one_line, safe

config_app = typer.Typer(
    cls=CnnGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="The built-in configs (cnn config list) and any config resolved, defaults filled in (cnn config show).",
)


def _description(path: Path) -> str:
    """The first sentence of a config file's leading comment: its lines up to the first that ends with ':'."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[:3]
    except (OSError, UnicodeDecodeError):
        return ""
    words = []
    for line in lines:
        if not line.startswith("#"):
            break
        words.append(line.lstrip("#").strip())
        if line.rstrip().endswith((":", ".")):
            break
    return " ".join(words).rstrip(":.")


@config_app.command("list")
@user_errors
def list_configs(json_out: JsonOpt = False) -> None:
    """The built-in configs: give a name to any --config (cnn summary --config seed-diagram)."""
    from rich.table import Table

    from cnncli.config import builtin_configs, load_config

    rows = []
    for name, path in builtin_configs().items():
        cfg = load_config(path)
        rows.append({"name": name, "dataset": cfg.data.dataset, "layers": len(cfg.model.layers),
                     "epochs": cfg.train.epochs, "description": _description(path), "path": str(path)})
    if json_out:
        for row in rows:
            print_json(row)
        return
    table = Table(title="built-in configs (--config NAME; cnn config show NAME prints one)")
    for col in ("name", "data set", "layers", "epochs", "description"):
        table.add_column(col, justify="right" if col in ("layers", "epochs") else "left")
    for r in rows:
        table.add_row(r["name"], r["dataset"], str(r["layers"]), str(r["epochs"]), safe(r["description"]))
    out.print(table)


@config_app.command("show")
@user_errors
def show(
    config: Annotated[str, typer.Argument(metavar="NAME|PATH", help="A built-in config's name (cnn config list) "
                                          "or a YAML file.")],
    set_: SetOpt = None,
    layers: LayersOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Print a config resolved, every key with its value and the defaults filled in: YAML to save as a file,
    edit and pass to --config. The --set overrides are applied first."""
    from cnncli.config import config_to_dict, config_to_yaml, load_config, resolve_config

    load_layers(layers)
    path = resolve_config(config)
    cfg = load_config(path, list(set_ or []))
    if json_out:
        d = config_to_dict(cfg)
        d.pop("name")
        print_json(d)
        return
    text = config_to_yaml(cfg)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("name:"))  # the file's stem names it
    overrides = "".join(f" --set {s}" for s in set_ or [])
    what = one_line(" ".join(f"{config}{overrides} ({path})".split()))  # one comment line, whatever names hold
    header = (f"# {what}, resolved: every key with its value, defaults filled in.\n"
              "# Save it as my.yaml, edit it, and train it with: cnn train --config my.yaml\n")
    out.print(header + text, markup=False, highlight=False, soft_wrap=True, emoji=False)

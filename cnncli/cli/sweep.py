r"""`cnn sweep` (run a study on Optuna; `cnn sweep show` for its table) and `cnn runs` (the run folders under a
folder). Sweeps need the sweep extra: pip install 'cnncli\[sweep]'."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cnncli.cli.kit import (
    CnnGroup,
    DataDirOpt,
    JsonOpt,
    LayersOpt,
    err,
    load_layers,
    out,
    prepare_data,
    print_json,
    user_errors,
)
from cnncli.cli.text import safe


class _RunByDefault(CnnGroup):
    """`cnn sweep CONFIG …` means `cnn sweep run CONFIG …`; `cnn sweep show …` is the other command."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


sweep_app = typer.Typer(
    cls=_RunByDefault,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Run many trainings of one config over a search space, on Optuna: cnn sweep CONFIG --grid KEY=V1,V2 "
    "(or --sample KEY=loguniform:LOW:HIGH --trials N); cnn sweep show NAME|DIR for the table.",
)

StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", help="Any Optuna storage URL (postgresql://user@host/db, sqlite:///file.db) or a "
                 "journal file path; several machines running the same command with one URL share the study. "
                 "Default: the journal file study.journal in the sweep folder.", metavar="URL|FILE"),
]


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _metric_text(metric: str, v: Any) -> str:
    if v is None:
        return "—"
    return _pct(v) if metric.endswith("_acc") else f"{v:.4f}"


def _value_text(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _folder(path: str | None, base: Path | None) -> str:
    if not path:
        return "—"
    if base is not None:
        try:
            return str(Path(path).relative_to(Path(base).resolve()))
        except ValueError:
            pass
    return path


@sweep_app.command("run")
@user_errors
def sweep(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="The config every trial starts from: a built-in "
                                           "name (cnn config list) or a YAML file.")],
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", metavar="KEY=V1,V2", help="A grid dimension, the key path of --set and its values: "
                     "--grid train.optimizer.lr=0.003,0.01,0.03 (repeatable; every combination runs)."),
    ] = None,
    sample: Annotated[
        list[str] | None,
        typer.Option("--sample", help="A sampled key: KEY=loguniform:LOW:HIGH, uniform:LOW:HIGH, int:LOW:HIGH or "
                     "choice:A,B,C (repeatable; with --trials).", metavar="KEY=KIND:…"),
    ] = None,
    trials: Annotated[
        int | None,
        typer.Option("--trials", min=1, help="Points to sample (--sample), or at most this many grid trials. "
                     "It counts the whole study: re-running adds only what is missing.", metavar="N"),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, metavar="K", help="Run each point with this many seeds "
                                       "(config seed, +1, …); a grid dimension 'seed'.")] = 1,
    metric: Annotated[str, typer.Option("--metric", help="val_acc, val_loss, train_acc or train_loss; a trial "
                                        "scores its best epoch.", metavar="NAME")] = "val_acc",
    mode: Annotated[str | None, typer.Option("--mode", help="max or min. Default: max for accuracies, min for "
                                             "losses.", metavar="max|min")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Override a config key for every trial (repeatable)."),
    ] = None,
    data_dir: DataDirOpt = None,
    layers: LayersOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="The sweep folder (trial-NNNN run folders, sweep.json, the journal). "
                                  "Default: runs/NAME.", metavar="DIR")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="The study's name. Default: the --out folder's name, else "
                                 "<config>-sweep-<hash of the search space>, so the same command continues.",
                                 metavar="NAME")
    ] = None,
    storage: StorageOpt = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Worker processes on this machine.", metavar="W")
    ] = 1,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Engine threads per worker. Default: the CPUs shared "
                                 "out (one each when workers = CPUs).", metavar="N")
    ] = None,
    prune: Annotated[
        str | None, typer.Option("--prune", help="median or asha: stop unpromising trials early, from their "
                                 "per-epoch metric (off by default: a grid's results then never depend on timing).",
                                 metavar="median|asha")
    ] = None,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="TensorBoard event files in every trial, and its hyper-parameters "
                           "for the HParams view (tensorboard --logdir SWEEP_FOLDER).")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="At the end, the table of trials as one JSON object (progress lines go to "
                           "stderr).")
    ] = False,
) -> None:
    """Run a sweep (also: cnn sweep CONFIG …). Every trial is an ordinary run folder under the sweep folder.

    Ctrl-C or SIGTERM stops cleanly: running trials save a resumable last.npz, and the same command continues
    the study (finished trials are not repeated; a cut-off trial resumes from its last.npz on the machine that
    holds it, else reruns). At the end: the table of trials, best first."""
    from cnncli.host.errors import ConfigError
    from cnncli.run import sweep as sw

    sw.require_optuna()
    if prune is not None and prune not in sw.PRUNERS:
        raise ConfigError(f"--prune: must be median or asha, got {prune!r}")
    if tensorboard:
        from cnncli.run.tb import require_writer

        require_writer()
    load_layers(layers)
    spec, base = sw.build_spec(config, list(set_ or []), list(grid or []), list(sample or []), seeds, metric, mode,
                               layers, tensorboard)
    target = sw.target_trials(spec, trials)
    name = name or (out_dir.name if out_dir else sw.default_name(spec))
    if out_dir is None:  # the name makes the folder under runs/: it must stay a folder name there
        from cnncli.host.names import RUN_NAME, check_name

        check_name(name, "--name", RUN_NAME)
    sweep_dir = out_dir or Path("runs") / name
    study = sw.prepare(spec, sweep_dir, name, storage)
    todo = sw.pending(study, target)
    where = "journal " + str(sweep_dir / sw.JOURNAL_FILE) if storage is None else sw.masked_url(storage)
    say = err if json_out else out  # --json keeps stdout for the one JSON object
    say.print(f"[bold]sweep {safe(name)}[/bold]: {safe(spec.describe())}", soft_wrap=True)
    say.print(f"folder {safe(str(sweep_dir))}, study in {safe(where)}; {target} trials in all, {todo} to run",
              soft_wrap=True)
    outcome = None
    if todo:
        try:
            folder = prepare_data(data_dir, base)
        except KeyboardInterrupt:
            err.print("[yellow]aborted[/yellow] before any trial started")
            raise typer.Exit(code=128 + signal.SIGINT) from None
        n_workers = min(workers, todo)
        n_threads = threads or sw.threads_per_worker(n_workers)
        say.print(f"{n_workers} worker process(es), {n_threads} engine thread(s) each")
        outcome = sw.run_sweep(sweep_dir, spec, name, storage, folder, target, n_workers, n_threads, prune,
                               lambda ev: _render_event(ev, spec.metric, say))
    else:
        say.print("nothing left to run: the study already holds every trial")
    _show_table(study, spec, sweep_dir, json_out=json_out)
    if outcome is not None:
        peaks = ", ".join(f"{p:.0f} MiB" for p in outcome.peaks_mb) or "unknown"  # ru_maxrss KiB / 1024
        say.print(f"{outcome.ran} trial(s) ran in {outcome.seconds:.1f} s wall time; peak memory per worker: {peaks}")
        for e in outcome.errors:
            err.print(f"[red]error:[/red] {safe(e)}", soft_wrap=True)
        if outcome.interrupted:
            err.print("[yellow]stopped[/yellow]: run the same command again to continue the study (cut-off trials "
                      "resume from their last.npz)", soft_wrap=True)
            raise typer.Exit(code=128 + (outcome.signal or signal.SIGINT))
        if outcome.errors:
            raise typer.Exit(code=1)


def _render_event(ev: dict[str, Any], metric: str, out: Any = out) -> None:
    kind = ev.get("event")
    if kind == "start":
        params = " ".join(f"{k}={_value_text(v)}" for k, v in ev["params"].items())
        resumed = " (resuming its last.npz)" if ev.get("resumed") else ""
        out.print(f"trial {ev['trial']} started: {safe(params)} seed={ev['seed']}{resumed}", soft_wrap=True)
    elif kind == "epoch":
        out.print(f"trial {ev['trial']} epoch {ev['epoch']}: {metric} {_metric_text(metric, ev.get('value'))}")
    elif kind == "end":
        state = ev["state"]
        if state in ("finished", "pruned"):
            what = f"{metric} {_metric_text(metric, ev.get('value'))} (epoch {ev.get('best_epoch')})"
            test = f", test {_pct(ev['test_acc'])}" if ev.get("test_acc") is not None else ""
            out.print(f"trial {ev['trial']} {state}: {what}{test}, {ev['seconds']:.1f} s")
        elif state == "interrupted":
            out.print(f"trial {ev['trial']} [yellow]interrupted[/yellow]: resumable from "
                      f"{safe(ev['run_dir'])}/last.npz", soft_wrap=True)
        else:
            out.print(f"trial {ev['trial']} [red]{state}[/red]: {safe(str(ev.get('error')))}", soft_wrap=True)
    elif kind == "stopping":
        if ev["count"] == 1:
            err.print("[yellow]stopping[/yellow]: running trials save a resumable checkpoint after their current "
                      "step (Ctrl-C again aborts them, a third time kills the workers)")
        elif ev["count"] == 2:
            err.print("[yellow]aborting[/yellow] the running trials")


def _show_table(study: Any, spec: Any, sweep_dir: Path | None, json_out: bool) -> None:
    from cnncli.run import sweep as sw
    from cnncli.run.runs import short_key

    rows = sw.trial_rows(study, spec)
    maximize = study.direction.name == "MAXIMIZE"
    metric = spec.metric if spec is not None else "value"
    best = sw.best_row(rows)
    points = sw.point_summaries(rows, maximize)
    if json_out:
        payload = {"study": study.study_name, "metric": metric, "mode": "max" if maximize else "min",
                   "trials": [r.to_json() for r in rows], "best": best.to_json() if best else None,
                   "points": [p.__dict__ for p in points]}
        print_json(payload)
        return
    keys = sorted({k for r in rows for k in r.params}) if spec is None else [k for k in spec.keys() if k != "seed"]
    table = Table(title=f"study {study.study_name}: {len(rows)} trials, best {metric} first")
    table.add_column("trial", justify="right")
    table.add_column("state")
    for k in keys:
        table.add_column(short_key(k, keys), justify="right")
    table.add_column("seed", justify="right")
    table.add_column(metric, justify="right")
    table.add_column("best epoch", justify="right")
    table.add_column("test acc", justify="right")
    table.add_column("time", justify="right")
    table.add_column("folder")
    for r in rows:
        state = r.state if r.state in ("finished", "running", "waiting") else f"[yellow]{r.state}[/yellow]"
        table.add_row(
            str(r.number), state, *(_value_text(r.params.get(k, "—")) for k in keys), str(r.seed),
            _metric_text(metric, r.value), "—" if r.best_epoch is None else str(r.best_epoch), _pct(r.test_acc),
            "—" if r.seconds is None else f"{r.seconds:.1f} s", safe(_folder(r.run_dir, sweep_dir)),
            style="bold" if best is not None and r.number == best.number else None,
        )
    out.print(table)
    if points and any(p.n > 1 for p in points):
        agg = Table(title=f"{metric} over seeds (mean ± sample std)")
        for k in keys:
            agg.add_column(short_key(k, keys), justify="right")
        agg.add_column("seeds", justify="right")
        agg.add_column(metric, justify="right")
        agg.add_column("test acc (mean)", justify="right")
        for p in points:
            pm = (f"{100 * p.mean:.2f} ± {100 * p.std:.2f}%" if metric.endswith("_acc")
                  else f"{p.mean:.4f} ± {p.std:.4f}")
            agg.add_row(*(_value_text(p.params.get(k, "—")) for k in keys), str(p.n), pm, _pct(p.test_mean))
        out.print(agg)
    if best is not None:
        params = " ".join(f"{k}={_value_text(v)}" for k, v in best.params.items())
        out.print(f"best trial {best.number}: {safe(params)} seed={best.seed}, {metric} "
                  f"{_metric_text(metric, best.value)} at epoch {best.best_epoch}, test accuracy {_pct(best.test_acc)}",
                  soft_wrap=True)
        out.print(f"best run folder: {safe(str(best.run_dir))}", soft_wrap=True)


@sweep_app.command("show")
@user_errors
def show(
    target: Annotated[str, typer.Argument(metavar="NAME|DIR", help="The sweep folder, a sweep's name under runs/, "
                                          "or a study name in --storage.")],
    storage: StorageOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The table of a sweep's trials, best first by its metric, and the best trial's run folder."""
    from cnncli.run import sweep as sw

    sw.require_optuna()
    place = sw.locate(target, storage)
    st = sw.open_storage(place.storage_url, place.sweep_dir or Path("."))
    study = sw.open_study(st, place.name, None, create=False)
    spec = place.spec
    if spec is None and isinstance(study.user_attrs.get("cnncli_spec"), dict):
        spec = sw.SweepSpec.from_json(study.user_attrs["cnncli_spec"])
    _show_table(study, spec, place.sweep_dir, json_out)


@user_errors
def runs(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Where to look, recursively (a sweep folder too).")]
    = Path("runs"),
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per run, one per line.")] = False,
) -> None:
    """The run folders under DIR: config, overrides, epochs, best validation and test accuracy, time, state."""
    from cnncli.run.runs import list_runs

    found = list_runs(folder)
    if json_out:
        for r in found:
            print_json(r.to_json(folder))
        return
    if not found:
        out.print(f"no run folders under {safe(str(folder))}")
        return
    table = Table(title=f"{len(found)} run(s) under {folder}")
    for col, right in (("run", False), ("config", False), ("overrides", False), ("epochs", True),
                       ("best val acc", True), ("test acc", True), ("time", True), ("state", False)):
        table.add_column(col, justify="right" if right else "left", overflow="fold")
    for r in found:
        epochs = f"{r.epochs_done}/{r.epochs}" if r.epochs else str(r.epochs_done)
        if r.stopped_early:
            epochs += " (early stop)"
        best = "—" if r.best_val_acc is None else f"{_pct(r.best_val_acc)} (ep {r.best_epoch})"
        colour = {"finished": "green", "failed": "red", "interrupted": "yellow", "pruned": "yellow"}.get(r.state)
        state = f"[{colour}]{r.state}[/{colour}]" if colour else r.state
        table.add_row(safe(_folder(str(r.path.resolve()), folder)), safe(r.config), safe(" ".join(r.overrides)),
                      epochs, best, _pct(r.test_acc), f"{r.seconds:.1f} s", state)
    out.print(table)

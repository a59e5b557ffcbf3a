"""The `cnn` commands that check and describe a network and train and evaluate it: download, gradcheck,
summary, train, eval. Each parses its options, calls the library and renders the result."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from cnncli.cli.kit import (
    CONFIG_DEFAULT,
    BatchSizeOpt,
    ConfigOpt,
    DataDirOpt,
    EvalBatchSizeOpt,
    JsonOpt,
    LayersOpt,
    QuietOpt,
    SetOpt,
    SplitOpt,
    ThreadsOpt,
    TtaOpt,
    check_split,
    check_tta,
    complete_config,
    err,
    load_layers,
    out,
    prepare_data,
    print_json,
    renamed,
    run_data_dir,
    shape_text,
    user_errors,
)
from cnncli.cli.text import safe


@user_errors
def download(
    data_dir: DataDirOpt = None,
    dataset: Annotated[
        str, typer.Option(metavar="NAME", help="cifar10, cifar100, mnist or fashion-mnist.")
    ] = "cifar10",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download, verify and extract a data set (nothing happens when it is already there).

    Mirrors: $CNNCLI_CIFAR10_URL, $CNNCLI_CIFAR100_URL (archives), $CNNCLI_MNIST_URL, $CNNCLI_FASHION_MNIST_URL.

    Overall deadline: $CNNCLI_DOWNLOAD_DEADLINE seconds (default 7200, 0 = none).

    Minimum rate: $CNNCLI_DOWNLOAD_MIN_RATE bytes/s (default 1024, 0 = none) over $CNNCLI_DOWNLOAD_RATE_WINDOW s (30).

    A download stopped by a limit keeps its .part file; the next run resumes it."""
    from cnncli import data
    from cnncli.cli.progress import byte_progress
    from cnncli.config import DataConfig
    from cnncli.host.errors import ConfigError

    if dataset not in data.DOWNLOADABLE:
        raise ConfigError(f"--dataset: must be one of {', '.join(data.DOWNLOADABLE)}, got {dataset!r}")
    data_cfg = DataConfig(dataset=dataset)
    target = data.resolve_data_dir(data_dir, None)
    if quiet:
        folder = data.ensure_dataset(data_cfg, target, lambda done, total: None)
    else:
        with byte_progress(data.download_label(data_cfg)) as update:
            folder = data.ensure_dataset(data_cfg, target, update)
    if json_out:
        print_json({"dataset": dataset, "folder": str(folder)})
    else:
        err.print(f"{data.TITLES[dataset]} ready in {safe(str(folder))}", soft_wrap=True)


@user_errors
def summary(config: ConfigOpt = CONFIG_DEFAULT, set_: SetOpt = None, json_out: JsonOpt = False,
            layers: LayersOpt = None) -> None:
    """Each layer with its output shape, parameters, buffers and multiply-adds per image."""
    from rich.table import Table

    from cnncli.config import load_config
    from cnncli.nn.model import build_model

    load_layers(layers)
    cfg = load_config(config, list(set_ or []))
    model = build_model(cfg.model, seed=cfg.seed)
    rows = model.summary()
    if json_out:
        print_json({
            "config": str(config), "input_shape": list(model.input_shape),
            "layers": [{"index": r.index, "name": r.name, "type": r.description, "output_shape": list(r.output_shape),
                        "params": r.params, "buffers": r.buffers, "macs": r.macs} for r in rows],
            "params": sum(r.params for r in rows), "buffers": sum(r.buffers for r in rows),
            "macs": sum(r.macs for r in rows),
        })  # fmt: skip
        return
    table = Table(title=f"{config} — input {shape_text(model.input_shape)}")
    table.add_column("#", justify="right")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("output shape")
    table.add_column("parameters", justify="right")
    table.add_column("buffers", justify="right")
    table.add_column("multiply-adds", justify="right")
    for r in rows:
        table.add_row(str(r.index), r.name, r.description, shape_text(r.output_shape), f"{r.params:,}",
                      f"{r.buffers:,}", f"{r.macs:,}")
    table.add_section()
    total_p, total_b, total_m = sum(r.params for r in rows), sum(r.buffers for r in rows), sum(r.macs for r in rows)
    table.add_row("", "total", "", "", f"{total_p:,}", f"{total_b:,}", f"{total_m:,}")
    out.print(table)


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """A one-line chart of `values` (e.g. validation accuracy per epoch)."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = hi - lo
    return "".join(SPARK[0 if span == 0 else min(int((v - lo) / span * 7 + 0.5), 7)] for v in values)


@user_errors
def train(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", metavar="NAME|PATH", autocompletion=complete_config,
                     help="The run's config: a built-in name (cnn config list) or a YAML file."),
    ] = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", metavar="DIR", help="Run folder. Default: runs/<config name>-<timestamp>.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", metavar="CHECKPOINT", help="Continue a run from its last.npz (bit-for-bit)."),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option("--init", metavar="CHECKPOINT", help="Start from these weights (any checkpoint with the same "
                     "shapes)."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, metavar="N", help="Total epochs (also when resuming).")] = None,
    batch_size: BatchSizeOpt = None,
    seed: Annotated[
        int | None, typer.Option(min=0, metavar="N", help="Seed of weights, split, order and augmentation.")
    ] = None,
    threads: ThreadsOpt = None,
    layers: LayersOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the earlier run in --out (otherwise refused).")
    ] = False,
    tensorboard: Annotated[
        bool,
        typer.Option("--tensorboard", help="Write TensorBoard event files into the run folder (train.tensorboard; "
                     "needs the tensorboard extra)."),
    ] = False,
    quiet: QuietOpt = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the final summary as one JSON object (progress goes to stderr).")
    ] = False,
) -> None:
    """Train on CIFAR-10; leaves config.yaml, metrics.csv, run.json, last.npz and best.npz in the run folder.

    Ctrl-C or SIGTERM: the running step finishes, a resumable checkpoint is saved, the command that resumes is
    printed; exit 130 (Ctrl-C) or 143 (SIGTERM). A second signal stops at once, keeping the last checkpoint."""
    from cnncli.host.signals import exit_code, last_signal, signal_name, stop_signals

    with stop_signals():  # from the start: a SIGTERM while the data loads stops as cleanly as Ctrl-C
        try:
            _train(config, set_, data_dir, out_dir, resume, init, epochs, batch_size, seed, threads, layers, overwrite,
                   tensorboard, quiet, json_out)
        except KeyboardInterrupt:
            signum = last_signal()
            err.print(f"[yellow]aborted by {signal_name(signum)}[/yellow] before a resumable checkpoint was saved "
                      "(a run folder keeps the checkpoint of its last completed epoch)", soft_wrap=True)
            raise typer.Exit(code=exit_code(signum)) from None


def _train(config: Path | None, set_: list[str] | None, data_dir: Path | None, out_dir: Path | None,
           resume: Path | None, init: Path | None, epochs: int | None, batch_size: int | None, seed: int | None,
           threads: int | None, layers: list[Path] | None, overwrite: bool, tensorboard: bool, quiet: bool,
           json_out: bool) -> None:
    import os
    import sys

    from cnncli.cli.progress import TrainProgress
    from cnncli.config import config_to_yaml
    from cnncli.host.signals import exit_code
    from cnncli.run.train import Callbacks, TrainingInterrupted, plan_run, run_plan

    load_layers(layers)
    overrides = list(set_ or [])
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if batch_size is not None:
        overrides.append(f"train.batch_size={batch_size}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    if tensorboard:
        overrides.append("train.tensorboard=true")
    if threads is not None:
        os.environ["CNNCLI_THREADS"] = str(threads)  # the engine reads it when it sizes its worker pool
    plan = plan_run(config, overrides, out_dir=out_dir, resume=resume, init=init, overwrite=overwrite)
    for note in plan.notes:
        err.print(f"[yellow]note:[/yellow] {safe(note)}", soft_wrap=True)
    cfg = plan.cfg
    if plan.resume is not None:
        _refuse_nothing_to_do(plan, resume, epochs)
    if cfg.train.tensorboard:
        from cnncli.run.tb import require_writer

        require_writer()
    folder = prepare_data(data_dir, cfg, quiet=quiet)
    if not quiet and not json_out:
        out.print("[bold]resolved config[/bold]")
        out.print(config_to_yaml(cfg).rstrip(), markup=False, soft_wrap=True)
    # --json keeps stdout for the one JSON line: the progress goes to stderr; --quiet shows none
    progress = Callbacks() if quiet else TrainProgress(stream=sys.stderr if json_out else None)
    close = getattr(progress, "close", lambda: None)
    # A diverging run overflows before its loss turns NaN; train() reports that in one line, so NumPy's
    # overflow warnings (raised in the engine's worker threads too) would only be noise.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"cnncli\.")
    try:
        result = run_plan(plan, folder, callbacks=progress, overrides=overrides)
    except TrainingInterrupted as e:
        close()
        err.print(f"[yellow]{safe(str(e))}[/yellow]", soft_wrap=True)
        command = f"cnn train --resume {e.path}" + (f" --data-dir {data_dir}" if data_dir else "")
        command += "".join(f" --layers {p}" for p in layers or [])
        err.print(f"resume with:  {safe(command)}", soft_wrap=True)
        raise typer.Exit(code=exit_code(e.signum)) from None
    finally:
        close()

    # the hint must work as printed: the data the run used (resolved, not a download) and its layer files
    extra = f" --data-dir {folder}" + "".join(f" --layers {p}" for p in layers or [])
    if json_out:
        print_json(_train_summary_json(result, f"cnn eval {result.best_path}{extra}"))
    elif quiet:
        out.print(_train_summary_line(result, extra), soft_wrap=True, markup=False, highlight=False)
    else:
        _print_train_summary(result, extra)


def _refuse_nothing_to_do(plan: Any, resume: Path | None, epochs: int | None) -> None:
    """--resume of a run that already has the epochs asked for would train nothing and rewrite its files for
    nothing: ConfigError saying so and how to extend it (before anything is written)."""
    from cnncli.host.errors import ConfigError
    from cnncli.run.train import evaluation_pending

    state = plan.resume.state if isinstance(plan.resume.state, dict) else {}
    done = state.get("epoch")
    total = plan.cfg.train.epochs
    if not isinstance(done, int) or isinstance(done, bool) or done < total:
        return
    if done == total and evaluation_pending(plan.run_dir):  # stopped during the test evaluation: run it now
        return
    asked = f"--epochs {epochs} is the total, not a number to add" if epochs is not None else \
        f"its config asks for {total}"
    raise ConfigError(f"{resume}: the run already has {done} epoch(s) and {asked}: nothing to train; to extend it, "
                      f"give a larger total: cnn train --resume {resume} --epochs {done + 1} (one more)")


def _train_summary_json(result: Any, eval_command: str) -> dict[str, Any]:
    from dataclasses import asdict

    h = result.history
    return {
        "run_dir": str(result.run_dir), "best_checkpoint": str(result.best_path),
        "last_checkpoint": str(result.last_path), "epochs": len(h), "best_epoch": result.best_epoch,
        "best_val_acc": result.best_val_acc, "test_acc": result.test.accuracy if result.test else None,
        "test_loss": result.test.loss if result.test else None,
        "final_train_loss": h[-1].train_loss if h else None, "final_train_acc": h[-1].train_acc if h else None,
        "stopped_early": result.stopped_early, "seconds": round(result.seconds, 3),
        "history": [asdict(m) for m in h], "eval_command": eval_command,
    }  # fmt: skip


def _train_summary_line(result: Any, extra: str) -> str:
    """--quiet's one line: what the run reached, where it is, how to evaluate it."""
    parts = []
    if result.test is not None:
        parts.append(f"test accuracy {100 * result.test.accuracy:.2f}%")
    if result.best_val_acc is not None:
        parts.append(f"best validation accuracy {100 * result.best_val_acc:.2f}% (epoch {result.best_epoch})")
    parts.append(f"{len(result.history)} epoch(s) in {result.seconds:.1f} s")
    return f"{', '.join(parts)}; run folder {result.run_dir}; evaluate with: cnn eval {result.best_path}{extra}"


def _print_train_summary(result: Any, extra: str = "") -> None:
    from rich.table import Table

    h = result.history
    table = Table(title="summary", show_header=False)
    table.add_column("what")
    table.add_column("value")
    if result.best_val_acc is not None:
        table.add_row("best validation accuracy", f"{100 * result.best_val_acc:.2f}% (epoch {result.best_epoch})")
        table.add_row("validation accuracy per epoch", sparkline([m.val_acc for m in h if m.val_acc is not None]))
    if h:
        table.add_row("final train loss / accuracy", f"{h[-1].train_loss:.4f} / {100 * h[-1].train_acc:.2f}%")
    if result.test is not None:
        plain = getattr(result, "test_plain", None)
        with_tta = " with test-time augmentation" if plain is not None else ""
        table.add_row(f"test accuracy (best checkpoint){with_tta}", f"[bold]{100 * result.test.accuracy:.2f}%[/bold]")
        table.add_row("test loss", f"{result.test.loss:.4f}")
        if plain is not None:
            table.add_row("test accuracy without it", f"{100 * plain.accuracy:.2f}%")
    table.add_row("wall time", f"{result.seconds:.1f} s")
    table.add_row("run folder", str(result.run_dir))
    table.add_row("checkpoints", f"{result.best_path.name} (best), {result.last_path.name} (last)")
    out.print(table)
    out.print(f"evaluate with:  cnn eval {result.best_path}{extra}", soft_wrap=True)


@renamed({"--batch-size": "--eval-batch-size"})
@user_errors
def eval_(
    checkpoint: Annotated[
        Path, typer.Argument(metavar="CHECKPOINT", help="A .npz checkpoint (best.npz, last.npz, or exported weights).")
    ],
    data_dir: DataDirOpt = None,
    split: SplitOpt = "test",
    eval_batch_size: EvalBatchSizeOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    layers: LayersOpt = None,
    tta: TtaOpt = None,
) -> None:
    """Loss, accuracy, per-class accuracy and confusion matrix of a checkpoint (with test-time augmentation when
    --tta or the checkpoint's train.tta asks for it)."""
    import os

    from rich.table import Table

    from cnncli.cli.kit import split_images
    from cnncli.data.preprocess import Normalizer
    from cnncli.run.checkpoint import open_checkpoint
    from cnncli.run.evaluate import evaluate
    from cnncli.run.memory import batch_cap, check_step

    check_split(split)
    check_tta(tta)
    if threads is not None:
        os.environ["CNNCLI_THREADS"] = str(threads)
    load_layers(layers)
    ckpt, model = open_checkpoint(checkpoint)
    cfg = ckpt.config
    asked = eval_batch_size or cfg.train.eval_batch_size
    check_step(model, min(asked, batch_cap(cfg.data) or asked), "--eval-batch-size" if eval_batch_size else
               f"{checkpoint}: train.eval_batch_size", "one evaluation batch", asked=asked, train=False)
    folder = prepare_data(run_data_dir(data_dir, checkpoint.parent), cfg, quiet=json_out)
    x, y, classes = split_images(cfg, folder, split)
    from cnncli import data

    normalizer = Normalizer(data.normalization_for(cfg.data, folder, cfg.seed), model.input_shape[0])
    level = tta or cfg.train.tta
    res = evaluate(model, x, y, normalizer, eval_batch_size or cfg.train.eval_batch_size, classes, level)
    if json_out:
        print_json({"checkpoint": str(checkpoint), "split": split, "tta": level, **res.to_dict()})
        return
    views = "" if level == "none" else f", test-time augmentation {level}"
    out.print(
        f"[bold]{safe(str(checkpoint))}[/bold] on the {split} split ({res.n:,} images{views}): "
        f"accuracy [bold]{100 * res.accuracy:.2f}%[/bold], loss {res.loss:.4f}"
    )
    per = Table(title="per-class accuracy")
    per.add_column("class")
    per.add_column("accuracy", justify="right")
    per.add_column("images", justify="right")
    for name, acc, n in zip(res.classes, res.per_class, res.confusion.sum(axis=1), strict=True):
        per.add_row(safe(name), "—" if n == 0 else f"{100 * acc:.1f}%", f"{n:,}")
    out.print(per)
    out.print(confusion_table(res.confusion, res.classes, out.width))


def confusion_table(confusion: Any, classes: list[str], width: int) -> Any:
    """The confusion matrix as a table with the class names in full as column headings; when they do not fit
    `width`, the columns are numbered and each row names its number (never names cut short)."""
    from rich.cells import cell_len
    from rich.table import Table

    cells = [max(len(str(v)) for v in confusion[:, j]) for j in range(len(classes))]
    label = max(cell_len(n) for n in classes)
    full = label + 4 + sum(max(cell_len(n), c) + 3 for n, c in zip(classes, cells, strict=True))
    numbered = full > width
    title = "confusion matrix (rows: true class, columns: predicted" + (", numbered as the rows)" if numbered else ")")
    conf = Table(title=title)
    conf.add_column("")
    for j, name in enumerate(classes):
        conf.add_column(str(j) if numbered else safe(name), justify="right", no_wrap=True)
    for i, name in enumerate(classes):
        row = [
            f"[bold green]{v}[/bold green]" if i == j else (str(v) if v else "[dim]0[/dim]")
            for j, v in enumerate(confusion[i])
        ]
        conf.add_row(f"{i} {safe(name)}" if numbered else safe(name), *row)
    return conf

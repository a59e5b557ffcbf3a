"""The `cnn` commands that check and describe a network and train and evaluate it: download, gradcheck,
summary, train, eval. Each parses its options, calls the library and renders the result."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from cnncli.clikit import (
    CONFIG_DEFAULT,
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    LayersOpt,
    err,
    load_layers,
    out,
    prepare_data,
    shape_text,
    user_errors,
)


@user_errors
def download(
    data_dir: DataDirOpt = None,
    dataset: Annotated[str, typer.Option(help="cifar10, cifar100, mnist or fashion-mnist.")] = "cifar10",
) -> None:
    """Download, verify and extract a data set (nothing happens when it is already there).

    Mirrors: $CNNCLI_CIFAR10_URL, $CNNCLI_CIFAR100_URL (archives), $CNNCLI_MNIST_URL, $CNNCLI_FASHION_MNIST_URL.

    Overall deadline: $CNNCLI_DOWNLOAD_DEADLINE seconds (default 7200, 0 = none).

    Minimum rate: $CNNCLI_DOWNLOAD_MIN_RATE bytes/s (default 1024, 0 = none) over $CNNCLI_DOWNLOAD_RATE_WINDOW s (30).

    A download stopped by a limit keeps its .part file; the next run resumes it."""
    from cnncli import data
    from cnncli.config import DataConfig
    from cnncli.errors import ConfigError
    from cnncli.progress import byte_progress

    if dataset not in data.DOWNLOADABLE:
        raise ConfigError(f"--dataset: must be one of {', '.join(data.DOWNLOADABLE)}, got {dataset!r}")
    data_cfg = DataConfig(dataset=dataset)
    target = data.resolve_data_dir(data_dir, None)
    with byte_progress(data.download_label(data_cfg)) as update:
        folder = data.ensure_dataset(data_cfg, target, update)
    err.print(f"{data.TITLES[dataset]} ready in {escape(str(folder))}", soft_wrap=True)


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
    layers: LayersOpt = None,
) -> None:
    """Compare every analytic gradient (each parameter and the input X) with finite differences, in float64."""
    import json
    import time

    from rich.table import Table

    from cnncli.config import load_config
    from cnncli.gradcheck import gradcheck as run_gradcheck
    from cnncli.memory import check_step
    from cnncli.model import build_model

    load_layers(layers)
    cfg = load_config(config)
    model = build_model(cfg.model, seed=seed)
    check_step(model, batch, "--batch", "gradcheck (float64, the whole batch)", itemsize=8, engine=False,
               optimizer_buffers=0)
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
            table.add_row(r.name, shape_text(r.shape), checked, str(r.kinks), f"{r.max_rel_error:.2e}", verdict)
        out.print(table)
        out.print(
            "Relative error |a−n| / max(1e-8, |a|+|n|), worst entry; n from a 5-point centred difference. "
            "'near a kink': checked entries whose ±ε or ±2ε step would flip a ReLU mask, a pool's arg-max or another "
            "discrete choice; they are still checked, on the unperturbed pass's piece (docs/derivations.md"
            "#finite-difference-checks), so they never fail for that reason."
        )
        verdict = "[green]all gradients pass[/green]" if ok else "[red]some gradients FAIL[/red]"
        out.print(f"{verdict} ({seconds:.1f} s)")
    if not ok:
        raise typer.Exit(code=1)


@user_errors
def summary(config: ConfigOpt = CONFIG_DEFAULT, layers: LayersOpt = None) -> None:
    """Each layer with its output shape, parameters, buffers and multiply-adds per image."""
    from rich.table import Table

    from cnncli.config import load_config
    from cnncli.model import build_model

    load_layers(layers)
    cfg = load_config(config)
    model = build_model(cfg.model, seed=cfg.seed)
    table = Table(title=f"{config} — input {shape_text(model.input_shape)}")
    table.add_column("#", justify="right")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("output shape")
    table.add_column("parameters", justify="right")
    table.add_column("buffers", justify="right")
    table.add_column("multiply-adds", justify="right")
    rows = model.summary()
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
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config of the run.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: --set train.optimizer.lr=0.05 (repeatable)."),
    ] = None,
    data_dir: DataDirOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run folder. Default: runs/<config name>-<timestamp>.")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue a run from its last.npz (bit-for-bit).")
    ] = None,
    init: Annotated[
        Path | None, typer.Option("--init", help="Start from these weights (any checkpoint with the same shapes).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Total epochs (also when resuming).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of weights, split, order and augmentation.")] = None,
    layers: LayersOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the earlier run in --out (otherwise refused).")
    ] = False,
    tensorboard: Annotated[
        bool,
        typer.Option("--tensorboard", help="Write TensorBoard event files into the run folder (train.tensorboard; "
                     "needs the tensorboard extra)."),
    ] = False,
) -> None:
    """Train on CIFAR-10; leaves config.yaml, metrics.csv, run.json, last.npz and best.npz in the run folder.

    Ctrl-C or SIGTERM: the running step finishes, a resumable checkpoint is saved, the command that resumes is
    printed; exit 130 (Ctrl-C) or 143 (SIGTERM). A second signal stops at once, keeping the last checkpoint."""
    from cnncli.signals import exit_code, last_signal, signal_name, stop_signals

    with stop_signals():  # from the start: a SIGTERM while the data loads stops as cleanly as Ctrl-C
        try:
            _train(config, set_, data_dir, out_dir, resume, init, epochs, seed, layers, overwrite, tensorboard)
        except KeyboardInterrupt:
            signum = last_signal()
            err.print(f"[yellow]aborted by {signal_name(signum)}[/yellow] before a resumable checkpoint was saved "
                      "(a run folder keeps the checkpoint of its last completed epoch)", soft_wrap=True)
            raise typer.Exit(code=exit_code(signum)) from None


def _train(config: Path | None, set_: list[str] | None, data_dir: Path | None, out_dir: Path | None,
           resume: Path | None, init: Path | None, epochs: int | None, seed: int | None, layers: list[Path] | None,
           overwrite: bool, tensorboard: bool) -> None:
    from cnncli.config import config_to_yaml
    from cnncli.progress import TrainProgress
    from cnncli.signals import exit_code
    from cnncli.train import TrainingInterrupted, plan_run, run_plan

    load_layers(layers)
    overrides = list(set_ or [])
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    if tensorboard:
        overrides.append("train.tensorboard=true")
    plan = plan_run(config, overrides, out_dir=out_dir, resume=resume, init=init, overwrite=overwrite)
    for note in plan.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    cfg = plan.cfg
    if cfg.train.tensorboard:
        from cnncli.tb import require_writer

        require_writer()
    folder = prepare_data(data_dir, cfg)
    out.print("[bold]resolved config[/bold]")
    out.print(config_to_yaml(cfg).rstrip(), markup=False, soft_wrap=True)
    progress = TrainProgress()
    # A diverging run overflows before its loss turns NaN; train() reports that in one line, so NumPy's
    # overflow warnings (raised in the engine's worker threads too) would only be noise.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"cnncli\.")
    try:
        result = run_plan(plan, folder, callbacks=progress, overrides=overrides)
    except TrainingInterrupted as e:
        progress.close()
        err.print(f"[yellow]{escape(str(e))}[/yellow]", soft_wrap=True)
        command = f"cnn train --resume {e.path}" + (f" --data-dir {data_dir}" if data_dir else "")
        command += "".join(f" --layers {p}" for p in layers or [])
        err.print(f"resume with:  {escape(command)}", soft_wrap=True)
        raise typer.Exit(code=exit_code(e.signum)) from None
    finally:
        progress.close()

    # the hint must work as printed: the data the run used (resolved, not a download) and its layer files
    extra = f" --data-dir {folder}" + "".join(f" --layers {p}" for p in layers or [])
    _print_train_summary(result, extra)


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
        table.add_row("test accuracy (best checkpoint)", f"[bold]{100 * result.test.accuracy:.2f}%[/bold]")
        table.add_row("test loss", f"{result.test.loss:.4f}")
    table.add_row("wall time", f"{result.seconds:.1f} s")
    table.add_row("run folder", str(result.run_dir))
    table.add_row("checkpoints", f"{result.best_path.name} (best), {result.last_path.name} (last)")
    out.print(table)
    out.print(f"evaluate with:  cnn eval {result.best_path}{extra}", soft_wrap=True)


@user_errors
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="A .npz checkpoint (best.npz, last.npz, or exported weights).")],
    data_dir: DataDirOpt = None,
    split: Annotated[str, typer.Option(help="test, train or val (val/train as split by the stored config).")] = "test",
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per forward pass.")] = None,
    json_out: JsonOpt = False,
    layers: LayersOpt = None,
) -> None:
    """Loss, accuracy, per-class accuracy and confusion matrix of a checkpoint."""
    import json

    from rich.table import Table

    from cnncli import data
    from cnncli.checkpoint import load_checkpoint
    from cnncli.errors import ConfigError
    from cnncli.evaluate import evaluate
    from cnncli.memory import batch_cap, check_step
    from cnncli.preprocess import Normalizer
    from cnncli.train import model_from_checkpoint

    if split not in ("test", "train", "val"):
        raise ConfigError(f"--split: must be test, train or val, got {split!r}")
    load_layers(layers)
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    model = model_from_checkpoint(ckpt, checkpoint)
    asked = batch_size or cfg.train.eval_batch_size
    check_step(model, min(asked, batch_cap(cfg.data) or asked), "--batch-size" if batch_size else
               f"{checkpoint}: train.eval_batch_size", "one evaluation batch", asked=asked, train=False)
    folder = prepare_data(data_dir, cfg)
    ds = data.load_dataset(cfg.data, folder, train=split != "test", test=split == "test")
    if split == "test":
        x, y = ds.test_x, ds.test_y
        if not len(x):
            raise ConfigError(f"--split test: {folder} has no test images (a folder data set needs a test/ folder)")
    else:
        s = data.make_splits(ds.train_x, ds.train_y, val_size=cfg.data.val_size, limit=cfg.data.limit, seed=cfg.seed)
        x, y = (s.val_x, s.val_y) if split == "val" else (s.train_x, s.train_y)
        if not len(x):
            raise ConfigError(f"--split {split}: empty for this checkpoint (data.val_size is {cfg.data.val_size})")
    normalizer = Normalizer(data.normalization_for(cfg.data, folder, cfg.seed), model.input_shape[0])
    res = evaluate(model, x, y, normalizer, batch_size or cfg.train.eval_batch_size, ds.classes)
    if json_out:
        out.print_json(json.dumps({"checkpoint": str(checkpoint), "split": split, **res.to_dict()}))
        return
    out.print(
        f"[bold]{checkpoint}[/bold] on the {split} split ({res.n:,} images): "
        f"accuracy [bold]{100 * res.accuracy:.2f}%[/bold], loss {res.loss:.4f}"
    )
    per = Table(title="per-class accuracy")
    per.add_column("class")
    per.add_column("accuracy", justify="right")
    per.add_column("images", justify="right")
    for name, acc, n in zip(res.classes, res.per_class, res.confusion.sum(axis=1), strict=True):
        per.add_row(name, "—" if n == 0 else f"{100 * acc:.1f}%", f"{n:,}")
    out.print(per)
    conf = Table(title="confusion matrix (rows: true class, columns: predicted)")
    conf.add_column("")
    for name in res.classes:
        conf.add_column(name[:5], justify="right")
    for i, name in enumerate(res.classes):
        cells = [
            f"[bold green]{v}[/bold green]" if i == j else (str(v) if v else "[dim]0[/dim]")
            for j, v in enumerate(res.confusion[i])
        ]
        conf.add_row(name, *cells)
    out.print(conf)



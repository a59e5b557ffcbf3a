"""`cnn trace` and `cnn plot` (registered on the app in cnncli/cli/app.py):
one image through the article's equations, and
pictures of a run. Pictures need the optional viz extra (matplotlib), imported only when asked for."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.cells import cell_len

from cnncli.cli.kit import (
    CONFIG_DEFAULT,
    DataDirOpt,
    JsonOpt,
    LayersOpt,
    SetOpt,
    SplitOpt,
    check_output,
    check_split,
    complete_config,
    load_layers,
    out,
    prepare_data,
    print_json,
    run_data_dir,
    shape_text,
    split_images,
    user_errors,
)
from cnncli.cli.text import safe

TRACE_HELP = "\n\n".join([
    "Walk one CIFAR-10 image through the forward pass and backpropagation in the notation of docs/derivations.md "
    "(the design article's): X, S¹, A¹, P¹, h, z, p, L, then δz = p − y, δb_fc, δW_fc, δh, δP¹, δA¹, "
    "δS¹, δb¹, δW¹, δX. Deeper configs are walked layer by layer (conv k gives Sᵏ, the ReLU after it Aᵏ, a pool "
    "after that Pᵏ).",
    "For each tensor: the section of docs/derivations.md that derives it, its shape (per image: the batch axis "
    "is dropped), min / max / mean "
    "and what it tells. Each gradient is checked on a few entries against a five-point finite difference "
    "(float64, CS231n relative error); exit code 1 if a check fails.",
    "The weights are a checkpoint's, or a config's fresh initialisation (--config, default: the built-in seed). "
    "The image is normalised with the config's data.normalize; --split val and train are the parts of the "
    "training set as the config splits it.",
    "--save FILE.npz keys (load with np.load(..., allow_pickle=False)): forward X, S1, A1, P1 (S2, A2, … for "
    "deeper configs), h, z, p, L (0-d), y (one-hot); gradients 'd' + key: dz, db_fc, dW_fc, dh, dP1, dA1, dS1, "
    "db1, dW1, dX; parameters W1, b1, W_fc, b_fc (several linear layers: W_<name>, b_<name>); also label (0-d "
    "int), classes (names) and image (raw uint8 pixels). Shapes are per image, without the batch axis: "
    "S1 16×32×32, P1 16×16×16, h 4096, z 10.",
])


def _num(v: float) -> str:
    return f"{v:.4g}"


def _sci(v: float) -> str:
    """1e-06 -> 1e-6."""
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")


@user_errors
def trace(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(metavar="CHECKPOINT", help="A .npz checkpoint (best.npz, last.npz). Default: fresh weights."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", metavar="NAME|PATH", autocompletion=complete_config,
                     help="Fresh weights of this config (a built-in name or a YAML file), from its seed. "
                     "Default: seed."),
    ] = None,
    set_: SetOpt = None,
    index: Annotated[int, typer.Option("--index", "-i", metavar="I", help="Which image of the split (0-based).")] = 0,
    split: SplitOpt = "test",
    save: Annotated[
        Path | None, typer.Option("--save", metavar="FILE", help="Write every tensor to this .npz (keys: see above).")
    ] = None,
    png: Annotated[
        Path | None,
        typer.Option("--png", metavar="FILE",
                     help="Draw X, the conv1 filters, feature maps and their gradients (needs matplotlib)."),
    ] = None,
    checks: Annotated[int, typer.Option("--checks", min=0, metavar="N", help="Entries of each gradient to check.")] = 5,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
    layers: LayersOpt = None,
) -> None:
    """See TRACE_HELP (the command's help)."""

    from cnncli import data
    from cnncli.config import load_config
    from cnncli.data.preprocess import Normalizer
    from cnncli.host.errors import ConfigError
    from cnncli.nn.model import build_model
    from cnncli.nn.trace import pick_image
    from cnncli.nn.trace import trace as run_trace
    from cnncli.run.checkpoint import open_checkpoint

    load_layers(layers)
    check_split(split)
    check_output(save, "--save")
    check_output(png, "--png")
    if checkpoint is not None and config is not None:
        raise ConfigError("give a CHECKPOINT or --config, not both (a checkpoint holds its own config)")
    if checkpoint is not None and set_:
        raise ConfigError("--set changes a config: it goes with --config, not with a CHECKPOINT (which holds its own)")
    if png is not None:
        from cnncli.run.plot import require_matplotlib

        require_matplotlib()  # fail before the work, not after
    if checkpoint is not None:
        ckpt, model = open_checkpoint(checkpoint)
        cfg = ckpt.config
        source = f"{checkpoint} (checkpoint weights)"
    else:
        config = config or CONFIG_DEFAULT
        cfg = load_config(config, list(set_ or []))
        model = build_model(cfg.model, seed=cfg.seed)
        source = f"{config} (fresh weights, seed {cfg.seed})"

    folder = prepare_data(data_dir, cfg, quiet=json_out)
    xs, ys, classes = split_images(cfg, folder, split)
    image, label = pick_image(xs, ys, index, split)
    if tuple(image.shape) != tuple(model.input_shape):
        raise ConfigError(f"model.input_shape: {list(model.input_shape)} does not match the images {list(image.shape)}")
    x = Normalizer(data.normalization_for(cfg.data, folder, cfg.seed), model.input_shape[0])(image[None])[0]
    t = run_trace(model, x, label, classes, checks=checks, image=image)
    if json_out:
        _save_trace_files(t, save, png, source, split, index, quiet=True)
        print_json(_trace_json(t, source, split, index, classes, label))
        if checks > 0 and not t.passed:
            raise typer.Exit(code=1)
        return
    ds_classes = classes

    out.print(
        f"[bold]trace[/bold] {safe(source)} · {split} image {index}: [bold]{safe(ds_classes[label])}[/bold] · "
        "float64, shapes per image (batch axis dropped)",
        soft_wrap=True,
    )
    _print_steps("Forward pass", t.forward, with_checks=False)
    _print_steps("Backpropagation  δ = ∂L/∂(·)", t.backward, with_checks=checks > 0)
    pred, pred_name, pred_p = t.top[0]
    p_true = t["p"].value[label]
    verdict = "[green]right[/green]" if pred == label else "[red]wrong[/red]"
    out.print(
        f"\nprediction {safe(pred_name)} (p = {pred_p:.3f}), {verdict}; true label {safe(ds_classes[label])} "
        f"(p = {p_true:.3f}); L = −log p_true = {t.loss:.4f}"
    )
    if checks > 0:
        worst_step, worst = max(t.checks, key=lambda sc: sc[1].max_rel_error)
        n = sum(len(c.errors) for _, c in t.checks)
        status = "[green]all pass[/green]" if t.passed else "[red]some FAIL[/red]"
        out.print(
            f"finite differences: {n} entries of {len(t.checks)} gradients, {status} "
            f"(worst rel. error {worst.max_rel_error:.1e} in {worst_step.symbol.text}; tol {_sci(t.tol)}, "
            f"ε = {_sci(t.eps)}, 5-point, evaluated on the unperturbed pass's ReLU/max-pool piece)",
            soft_wrap=True,
        )
    _save_trace_files(t, save, png, source, split, index, quiet=False)
    if checks > 0 and not t.passed:
        raise typer.Exit(code=1)


def _save_trace_files(t: Any, save: Path | None, png: Path | None, source: str, split: str, index: int,
                      quiet: bool) -> None:
    """--save (every tensor, .npz) and --png (pictures); says what it wrote unless `quiet` (--json)."""
    import numpy as np

    from cnncli.host.atomic import atomic_write
    from cnncli.host.errors import CnnError

    if save is not None:
        arrays = t.arrays()
        try:
            with atomic_write(save) as f:
                np.savez(f, **arrays)
        except OSError as e:
            raise CnnError(f"--save {save}: cannot write ({e.strerror or e})") from None
        if not quiet:
            out.print(f"saved {len(arrays)} arrays to {safe(str(save))}: {safe(' '.join(arrays))}", soft_wrap=True)
    if png is not None:
        from cnncli.run.plot import trace_png

        trace_png(t, png, title=f"{source} · {split} image {index}")
        if not quiet:
            out.print(f"wrote {safe(str(png))}")


def _trace_json(t: Any, source: str, split: str, index: int, classes: list[str], label: int) -> dict[str, Any]:
    """One object: the image, the prediction, and per tensor its statistics, facts and finite-difference check."""

    def step(s: Any) -> dict[str, Any]:
        mn, mx, mean = s.stats
        d: dict[str, Any] = {"symbol": s.symbol.text, "key": s.key, "phase": s.phase, "section": s.section,
                             "shape": list(s.shape), "min": mn, "max": mx, "mean": mean, "facts": list(s.facts)}
        if s.check is not None:
            c = s.check
            d["check"] = {"entries": len(c.errors), "max_rel_error": c.max_rel_error, "kinks": c.kinks,
                          "passed": c.passed}
        return d

    pred, pred_name, pred_p = t.top[0]
    return {
        "source": source, "split": split, "index": index, "label": label, "class": classes[label],
        "prediction": pred, "predicted_class": pred_name, "p_predicted": pred_p,
        "p_true": float(t["p"].value[label]), "loss": t.loss, "passed": t.passed, "eps": t.eps, "tol": t.tol,
        "steps": [step(s) for s in t.forward + t.backward],
    }  # fmt: skip


def _print_steps(title: str, steps: list[Any], with_checks: bool) -> None:
    """One line per tensor (symbol, section, shape, min, max, mean, finite differences), its facts below it."""
    rows = []
    for s in steps:
        mn, mx, mean = s.stats
        scalar = s.value.ndim == 0
        fd = ""
        if s.check is not None and with_checks:
            c = s.check
            mark = "[green]✓[/green]" if c.passed else "[red]✗ FAIL[/red]"
            kinks = f" [dim]({c.kinks} near a kink)[/dim]" if c.kinks else ""
            fd = f"{mark} {c.max_rel_error:.1e} [dim]({len(c.errors)})[/dim]{kinks}"
        rows.append((s.symbol.text, safe(s.section_label), shape_text(s.shape) if s.shape else "scalar",
                     "" if scalar else _num(mn), "" if scalar else _num(mx), _num(mean), fd, "; ".join(s.facts)))
    w = [max(cell_len(r[i]) for r in rows + [("", "docs/derivations.md", "shape", "min", "max", "mean/value", "", "")])
         for i in range(6)]

    def pad(text: str, width: int, right: bool = False) -> str:
        fill = " " * (width - cell_len(text))
        return fill + text if right else text + fill

    def line(cells: tuple[str, ...], bold: bool = True) -> str:
        sym = safe(pad(cells[0], w[0]))
        nums = "  ".join(pad(c, w[i], right=True) for i, c in enumerate(cells[2:6], start=2))
        return f"  {'[bold]' + sym + '[/bold]' if bold else sym}  {safe(pad(cells[1], w[1]))}  {nums}"

    head = ("", "docs/derivations.md", "shape", "min", "max", "mean/value")
    fd_head = "  finite differences: max rel. error (entries)" if with_checks else ""
    out.print(f"\n[bold underline]{safe(title)}[/bold underline]")
    out.print(f"[dim]{line(head, bold=False)}{fd_head}[/dim]", soft_wrap=True)
    indent = 2 + w[0] + 2
    for r in rows:
        out.print(line(r) + (f"  {r[6]}" if r[6] else ""), soft_wrap=True)
        for text in textwrap.wrap(r[7], width=max(40, out.width - indent)):
            out.print(" " * indent + f"[dim]{safe(text)}[/dim]", soft_wrap=True)


@user_errors
def plot(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN…", help="Run folders written by cnn train, or folders holding several (a sweep)."),
    ],
    out_dir: Annotated[
        Path | None, typer.Option("--out", metavar="DIR", help="Where the PNGs go. Default: RUN (one folder), else "
                                  "here.")
    ] = None,
    confusion: Annotated[
        bool,
        typer.Option("--confusion/--no-confusion", help="One run: also evaluate best.npz on the test set (needs the "
                     "data)."),
    ] = True,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
    layers: LayersOpt = None,
) -> None:
    r"""Pictures of runs (needs the viz extra: pip install 'cnncli\[viz]'). One run folder: its learning curves
    (learning_curves.png), gradient flow per parameter tensor, update / weight ratios, dead ReLU units and the
    per-step loss (gradflow.png, from gradflow.json) and the test-set confusion matrix of best.npz
    (confusion.png). Several, or a sweep
    folder: compare.png overlays their curves, runs that differ only in the seed drawn as mean ± spread."""
    from cnncli.run.plot import read_metrics, require_matplotlib
    from cnncli.run.runs import find_runs

    single = len(run_dirs) == 1 and (not run_dirs[0].is_dir() or (run_dirs[0] / "metrics.csv").exists()
                                     or not find_runs(run_dirs[0]))
    if single:
        load_layers(layers)
        _plot_one(run_dirs[0], out_dir, confusion, data_dir, json_out)
        return
    from cnncli.run.plot import RunFolderError, compare_curves_png
    from cnncli.run.runs import group_runs, summarize_run

    folders: list[Path] = []
    for d in run_dirs:
        found = find_runs(d)
        if not found:
            read_metrics(d)  # names what is wrong with it
        folders.extend(f for f in found if f not in folders)
    summaries, metrics = [], {}
    for f in folders:
        try:
            metrics[f] = read_metrics(f)
        except RunFolderError:
            continue  # a run that has no finished epoch yet
        summaries.append(summarize_run(f))
    if not summaries:
        read_metrics(folders[0])
    require_matplotlib()
    groups = [(label, [metrics[r.path] for r in rs]) for label, rs in group_runs(summaries)]
    target = out_dir or (run_dirs[0] if len(run_dirs) == 1 else Path("."))
    title = f"{run_dirs[0].resolve().name}: " if len(run_dirs) == 1 else ""
    heading = f"{title}{len(summaries)} runs in {len(groups)} groups, mean ± sample std over seeds"
    path = compare_curves_png(groups, target / "compare.png", title=heading)
    skipped = len(folders) - len(summaries)
    if json_out:
        print_json({"wrote": [str(path)], "runs": len(summaries), "groups": len(groups), "skipped": skipped})
        return
    note = f" ({skipped} run(s) without a finished epoch left out)" if skipped else ""
    out.print(f"wrote {safe(str(path))}: {len(summaries)} runs in {len(groups)} groups{note}")


def _plot_one(run_dir: Path, out_dir: Path | None, confusion: bool, data_dir: Path | None, json_out: bool) -> None:
    from cnncli import data
    from cnncli.data.preprocess import Normalizer
    from cnncli.run.checkpoint import open_checkpoint
    from cnncli.run.evaluate import evaluate
    from cnncli.run.plot import confusion_png, learning_curves_png, read_metrics, require_matplotlib

    metrics = read_metrics(run_dir)
    require_matplotlib()
    target = out_dir or run_dir
    name = run_dir.resolve().name
    written = [learning_curves_png(metrics, target / "learning_curves.png", title=name)]
    if (run_dir / "gradflow.json").exists():  # written by cnn train unless train.gradflow is false
        from cnncli.run.gradflow import read_flow
        from cnncli.run.plot_gradients import gradflow_png

        written.append(gradflow_png(read_flow(run_dir), target / "gradflow.png",
                                    title=f"{name}: gradient flow, update sizes and dead ReLUs (gradflow.json)"))
    result: dict[str, Any] = {}
    if confusion:
        best = run_dir / "best.npz"
        ckpt, model = open_checkpoint(best)
        cfg = ckpt.config
        folder = prepare_data(run_data_dir(data_dir, run_dir), cfg, quiet=json_out)
        ds = data.load_dataset(cfg.data, folder, train=False, test=True)
        normalizer = Normalizer(data.normalization_for(cfg.data, folder, cfg.seed), model.input_shape[0])
        res = evaluate(model, ds.test_x, ds.test_y, normalizer, cfg.train.eval_batch_size, ds.classes)
        written.append(confusion_png(res.confusion, res.classes, target / "confusion.png",
                                     title=f"{name}/best.npz on the test set"))
        result = {"test_acc": res.accuracy, "test_loss": res.loss}
        if not json_out:
            out.print(f"best.npz on the test set: accuracy {100 * res.accuracy:.2f}%, loss {res.loss:.4f}")
    if json_out:
        print_json({"wrote": [str(p) for p in written], **result})
        return
    for p in written:
        out.print(f"wrote {safe(str(p))}")

"""`cnn gradcheck` (the whole network, or one layer alone with --layer) and `cnn lab` (a teacher's kit): parse,
call cnncli/nn/gradcheck.py, cnncli/nn/layercheck.py and cnncli/run/lab.py, render the diagnoses."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from cnncli.cli.kit import (
    CONFIG_DEFAULT,
    CnnGroup,
    ConfigOpt,
    JsonOpt,
    LayersOpt,
    QuietOpt,
    SetOpt,
    err,
    load_layers,
    out,
    print_json,
    renamed,
    shape_text,
    user_errors,
)
from cnncli.cli.text import safe

LayerOpt = Annotated[
    str | None,
    typer.Option("--layer", metavar="NAME|TYPE", help="Check one layer alone: a layer of the config by name "
                 "(conv1, swish1) or a type with options ('conv out_channels=4 kernel_size=3'); random inputs, "
                 "upstream gradients and parameters, several shapes, training and evaluation mode."),
]


def _e(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.3e}"


def tensor_json(r: Any) -> dict[str, Any]:
    """One tensor's result with stable keys (what an autograder reads)."""
    from cnncli.nn.diagnose import _num

    return {
        "name": r.name,
        "layer": r.layer,
        "shape": list(r.shape),
        "size": r.size,
        "checked": r.checked,
        "sampled": r.sampled,
        "kinks": r.kinks,
        "max_rel_error": _num(r.max_rel_error),
        "worst_index": list(r.worst_index),
        "passed": r.passed,
        "status": r.status,
        "diagnosis": r.diagnosis.as_dict() if r.diagnosis is not None else None,
        "worst": [e.as_dict() for e in r.worst],
        "inherited_from": r.inherited or None,
    }


def render_diagnoses(results: list[Any], faults: list[Any], tol: float, prefix: str = "") -> None:
    """Below a table: each tensor that is not a plain pass, with its diagnosis and worst entries; then the
    layer at fault."""
    for r in results:
        if r.status == "pass" or r.diagnosis is None:
            continue
        colour = "red" if r.status == "fail" else "yellow"
        status = "FAIL" if r.status == "fail" else r.status
        text = r.diagnosis.text.removeprefix("not checked: ")
        out.print(f"[{colour}]{safe(prefix + r.name)} {status}[/{colour}]: {safe(text)}", soft_wrap=True)
        if r.status == "fail":
            for e in r.worst:
                out.print(f"    at {e.index}: analytic {_e(e.analytic)}, numeric {_e(e.numeric)}, rel. error "
                          f"{_e(e.rel_error)}", soft_wrap=True, highlight=False)
        if r.inherited:
            out.print(f"    (below the layer at fault, {safe(r.inherited)}: its error flows down into this tensor)",
                      soft_wrap=True)
        if r.diagnosis.advice:
            out.print(f"    what to do: {safe(r.diagnosis.advice)}", soft_wrap=True)
    if faults and not all(r.passed for r in results):
        top = faults[0]
        wrong = ", ".join(f"{k} rel. error {_e(v)}" for k, v in top.errors.items() if not v <= tol)
        right = [k for k, v in top.errors.items() if v <= tol]
        agree = f" ({', '.join(right)} {'agrees' if len(right) == 1 else 'agree'})" if right else ""
        out.print(
            f"[red]layer at fault:[/red] {safe(top.name)} ({safe(top.cls)}, layer {top.index}) — walking backward "
            f"from the output, the first layer whose own backward disagrees with finite differences of its own "
            f"forward: {safe(wrong)}" + safe(agree)
            + (f". Fix {safe(top.name)}.backward first; the failing tensors below it "
               f"({safe(', '.join(r.name for r in results if r.inherited))}) follow from it."
               if any(r.inherited for r in results) else "."),
            soft_wrap=True,
        )
        for other in faults[1:]:
            out.print(f"    also disagrees with its own forward: {safe(other.name)} ({safe(other.cls)}, layer "
                      f"{other.index})", soft_wrap=True)


def _results_table(title: str, results: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("tensor")
    table.add_column("shape")
    table.add_column("entries checked", justify="right")
    table.add_column("near a kink", justify="right")
    table.add_column("max rel. error", justify="right")
    table.add_column("result")
    for r in results:
        checked = f"{r.checked} of {r.size} (random)" if r.sampled else f"all {r.size}"
        verdict = {"pass": "[green]pass[/green]", "fail": "[red]FAIL[/red]"}.get(r.status,
                                                                                "[yellow]not checked[/yellow]")
        error = f"{r.max_rel_error:.2e}" if math.isfinite(r.max_rel_error) else "—"
        table.add_row(safe(r.name), shape_text(r.shape), checked, str(r.kinks), error, verdict)
    return table


@renamed({"--batch": "--batch-size"})
@user_errors
def gradcheck(
    config: ConfigOpt = CONFIG_DEFAULT,
    set_: SetOpt = None,
    batch: Annotated[int, typer.Option("--batch-size", min=1, metavar="N", help="Images in the random batch.")] = 4,
    eps: Annotated[float, typer.Option(min=1e-12, metavar="E", help="Finite-difference step ε.")] = 1e-3,
    tol: Annotated[float, typer.Option(min=0.0, metavar="T", help="Largest relative error that passes.")] = 1e-6,
    seed: Annotated[int, typer.Option(min=0, metavar="N", help="Seed of the weights, the batch and the sampled "
                                      "entries.")] = 0,
    max_entries: Annotated[
        int, typer.Option(min=1, metavar="N", help="Tensors larger than this are checked on a random subset this size.")
    ] = 200,
    initial_params: Annotated[bool, typer.Option(
        "--initial-params", help="Keep parameters that sit on a special value (all entries equal, or a lone 0 or "
        "±1) instead of drawing them at random around it; they are then reported 'not checked'.")] = False,
    layer: LayerOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    layers: LayersOpt = None,
) -> None:
    """Compare every analytic gradient (each parameter and the input X) with finite differences, in float64, and
    say what is wrong with a failing one (sign, factor, shape, never set, a few entries) and which layer is at
    fault. --layer NAME checks one layer alone."""
    import time

    from cnncli.cli.progress import count_progress
    from cnncli.config import load_config
    from cnncli.nn.gradcheck import gradcheck_report
    from cnncli.nn.model import build_model
    from cnncli.run.memory import check_step

    load_layers(layers)
    if layer is not None:
        return _layer_check(config, set_, layer, seed, eps, tol, json_out)
    cfg = load_config(config, list(set_ or []))
    model = build_model(cfg.model, seed=seed)
    check_step(model, batch, "--batch", "gradcheck (float64, the whole batch)", itemsize=8, engine=False,
               optimizer_buffers=0)
    start = time.perf_counter()
    with count_progress("gradcheck: finite differences", "entries", quiet=quiet) as progress:
        report = gradcheck_report(model, batch=batch, eps=eps, tol=tol, seed=seed, max_entries=max_entries,
                                  progress=progress, initial_params=initial_params)
    seconds = time.perf_counter() - start
    results = report.tensors
    ok = report.passed
    not_checked = [r.name for r in results if r.status == "not checked"]
    if json_out:
        at_fault = report.at_fault
        print_json({
            "config": str(config),
            "batch": batch,
            "eps": eps,
            "tol": tol,
            "seed": seed,
            "passed": ok,
            "not_checked": not_checked,
            "seconds": round(seconds, 3),
            "layer_at_fault": at_fault.as_dict(tol) if at_fault is not None else None,
            "faults": [f.as_dict(tol) for f in report.faults],
            "moved_off_special_values": [{"name": n, "value": v} for n, v in report.moved],
            "tensors": [tensor_json(r) for r in results],
        })
    else:
        out.print(_results_table(f"gradcheck {safe(str(config))} — float64, batch {batch}, ε={eps:g}, tol={tol:g}",
                                 results))
        out.print(
            "Relative error |a−n| / max(1e-8, |a|+|n|), worst entry; n from a 5-point centred difference. "
            "'near a kink': checked entries whose ±ε or ±2ε step would flip a ReLU mask, a pool's arg-max or another "
            "discrete choice; they are still checked, on the unperturbed pass's piece (docs/derivations.md"
            "#finite-difference-checks), so they never fail for that reason."
        )
        if report.moved:
            names = ", ".join(f"{n} (all {v:g})" for n, v in report.moved)
            out.print(f"Drawn at random around their value, since a special value can hide a bug "
                      f"(--initial-params keeps them): {safe(names)}", soft_wrap=True)
        render_diagnoses(results, report.faults, tol)
        verdict = "[green]all gradients pass[/green]" if ok else "[red]some gradients FAIL[/red]"
        extra = f"; {len(not_checked)} not checked: {safe(', '.join(not_checked))}" if not_checked else ""
        out.print(f"{verdict}{extra} ({seconds:.1f} s)", soft_wrap=True)
    if not ok:
        raise typer.Exit(code=1)
    return None


def layer_result_json(r: Any) -> dict[str, Any]:
    from cnncli.nn.diagnose import _num

    return {"case": {"shape": list(r.case.shape), "batch": r.case.batch,
                     "mode": "train" if r.case.training else "eval"},
            "name": r.name, "shape": list(r.shape), "checked": r.checked, "max_rel_error": _num(r.max_rel_error),
            "passed": r.passed, "status": "pass" if r.passed else "fail", "diagnosis": r.diagnosis.as_dict(),
            "worst": [e.as_dict() for e in r.worst]}


def render_layer_report(report: Any, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for col in ("input (N×shape) mode", "tensor", "entries", "max rel. error", "result"):
        table.add_column(col, justify="right" if col in ("entries", "max rel. error") else "left")
    for r in report.results:
        verdict = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
        table.add_row(r.case.text(), safe(r.name), str(r.checked), _e(r.max_rel_error), verdict)
    out.print(table)
    for r in report.first_failures():
        out.print(f"[red]{safe(r.name)} FAIL[/red] (first at {r.case.text()}): {safe(r.diagnosis.text)}",
                  soft_wrap=True)
        for e in r.worst:
            out.print(f"    at {e.index}: analytic {_e(e.analytic)}, numeric {_e(e.numeric)}, rel. error "
                      f"{_e(e.rel_error)}", soft_wrap=True, highlight=False)


def _layer_check(config: Path, set_: list[str] | None, spec: str, seed: int, eps: float, tol: float,
                 json_out: bool) -> None:
    """`cnn gradcheck --layer SPEC`: one layer alone (cnncli/nn/layercheck.py)."""
    from cnncli.config import load_config
    from cnncli.nn.layercheck import check_layer
    from cnncli.run.lab import resolve

    cfg = load_config(config, list(set_ or [])) if len(spec.split()) == 1 else None
    make, shapes, what = resolve(spec, cfg)
    report = check_layer(make, shapes, seed=seed, eps=eps, tol=tol)
    if json_out:
        print_json({"layer": report.layer, "spec": spec, "seed": seed, "eps": eps, "tol": tol,
                    "passed": report.passed, "tensors": [layer_result_json(r) for r in report.results]})
    else:
        render_layer_report(report, f"gradcheck --layer {safe(report.layer)}: {safe(what)} — alone, random "
                            f"input, upstream gradient and parameters (seed {seed}), float64, tol={tol:g}")
        verdict = "[green]the layer's backward agrees with its forward[/green]" if report.passed else \
            "[red]the layer's backward disagrees with its forward[/red]"
        out.print(verdict)
    if not report.passed:
        raise typer.Exit(code=1)


lab_app = typer.Typer(
    cls=CnnGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="A backpropagation lab: write one for students (cnn lab new TYPE) and grade what they hand in "
    "(cnn lab check FILE …).",
)


@lab_app.command("new")
@user_errors
def lab_new(
    kind: Annotated[str, typer.Argument(metavar="TYPE", help="conv, maxpool, avgpool, linear, batchnorm, relu, "
                                        "leakyrelu, tanh or sigmoid.")],
    out_dir: Annotated[Path | None, typer.Option("--out", metavar="DIR", help="Folder to write (default: "
                                                 "lab-TYPE).")] = None,
) -> None:
    """Write a lab: TYPE_layer.py (the forward given, the backward to write), lab.yaml and README.md."""
    from cnncli.run.lab import new_lab

    folder = out_dir if out_dir is not None else Path(f"lab-{kind}")
    files = new_lab(kind, folder)
    for f in files:
        out.print(f"wrote {safe(str(f))}", soft_wrap=True, highlight=False)
    out.print(f"Students write the backward in {safe(files[0].name)}; grade with: cnn lab check "
              f"{safe(str(files[0]))}", soft_wrap=True, highlight=False)


@lab_app.command("check")
@user_errors
def lab_check(
    files: Annotated[list[Path], typer.Argument(metavar="FILE", help="Layer files made from `cnn lab new` (one "
                                                "per student).")],
    seed: Annotated[int, typer.Option(min=0, metavar="N", help="Seed of the random inputs and parameters.")] = 0,
    tol: Annotated[float, typer.Option(min=0.0, metavar="T", help="Largest relative error that passes.")] = 1e-6,
    json_out: JsonOpt = False,
) -> None:
    """Grade lab files: the forward against cnncli's layer, the layer contract, the backward of the layer alone
    (δx and each parameter's gradient) and the whole network's gradcheck; a score table per file."""
    from rich.table import Table

    from cnncli.host.errors import CnnError
    from cnncli.run.lab import grade

    grades, errors = [], []
    for f in files:
        try:
            grades.append(grade(f, seed=seed, tol=tol))
        except CnnError as e:
            if len(files) == 1:
                raise
            errors.append((f, str(e)))
    if json_out:
        print_json({"seed": seed, "tol": tol, "grades": [g.as_dict() for g in grades],
                    "errors": [{"file": str(f), "error": e} for f, e in errors]})
    else:
        for g in grades:
            table = Table(title=f"lab check {safe(g.file)} — {safe(g.layer)} against cnncli's "
                          f"{safe(g.reference)}: {g.score:g} / {g.max_score:g}")
            table.add_column("item")
            table.add_column("points", justify="right")
            table.add_column("result")
            table.add_column("what was found", overflow="fold")
            for i in g.items:
                verdict = "[green]pass[/green]" if i.passed else "[red]FAIL[/red]"
                table.add_row(safe(i.name), f"{i.points:g} / {i.max_points:g}", verdict, safe(i.detail))
            out.print(table)
        for f, e in errors:
            out.print(f"[red]{safe(str(f))}[/red]: {safe(e)}", soft_wrap=True)
        if len(files) > 1:
            summary = Table(title="scores")
            summary.add_column("file")
            summary.add_column("score", justify="right")
            for g in grades:
                summary.add_row(safe(g.file), f"{g.score:g} / {g.max_score:g}")
            for f, _ in errors:
                summary.add_row(safe(str(f)), "not graded")
            out.print(summary)
    if errors or any(g.score < g.max_score for g in grades):
        raise typer.Exit(code=1)


__all__ = ["gradcheck", "err", "lab_app"]

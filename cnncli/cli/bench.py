"""`cnn bench`: training-step and inference throughput of a config's network (registered in cnncli/cli/app.py),
alone or side by side with PyTorch (`--against torch`); and `torch_script`, the command line of
`python -m cnncli.cli.torchbench train` (the same training recipe in PyTorch, for whole-process timings)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cnncli.cli.kit import (
    CONFIG_DEFAULT,
    BatchSizeOpt,
    CnnCommand,
    CnnGroup,
    ConfigOpt,
    DataDirOpt,
    EvalBatchSizeOpt,
    JsonOpt,
    LayersOpt,
    SetOpt,
    ThreadsOpt,
    load_layers,
    out,
    prepare_data,
    print_json,
    renamed,
    user_errors,
)
from cnncli.cli.text import safe
from cnncli.host.errors import CnnError

if TYPE_CHECKING:
    from cnncli.bench.torchbench import TorchBenchResult
    from cnncli.run.train import EpochMetrics


class Against(str, Enum):
    torch = "torch"


def _check_sizes(cfg: Any, batch: int | None, eval_batch: int | None, reference: bool) -> None:
    """Refuse batches (random data, not capped by a data set) that would not fit, before allocating them."""
    from cnncli.nn.model import build_model
    from cnncli.run.memory import check_step

    model = build_model(cfg.model, seed=0)
    engine = not reference
    check_step(model, batch or cfg.train.batch_size, "--batch-size" if batch else "train.batch_size",
               "one training step", engine=engine)
    check_step(model, eval_batch or cfg.train.eval_batch_size, "--eval-batch-size" if eval_batch else
               "train.eval_batch_size", "one inference batch", train=False, engine=engine)


@renamed({"--batch": "--batch-size", "--eval-batch": "--eval-batch-size"})
@user_errors
def bench(
    config: ConfigOpt = CONFIG_DEFAULT,
    set_: SetOpt = None,
    batch: BatchSizeOpt = None,
    eval_batch: EvalBatchSizeOpt = None,
    steps: Annotated[
        int, typer.Option(min=1, metavar="N", help="Timed training steps per repeat (inference: a quarter).")
    ] = 20,
    repeats: Annotated[int, typer.Option(min=1, metavar="N", help="Repeats; the median is reported.")] = 5,
    threads: ThreadsOpt = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="Time the per-layer reference path instead of the fused engine.")
    ] = False,
    against: Annotated[
        Against | None,
        typer.Option(
            "--against",
            metavar="torch",
            help="Time the same network and step in PyTorch (CPU, NCHW and channels_last) in the same run, "
            "interleaved rounds (--repeats), and print the ratios. Needs torch installed (never a dependency).",
        ),
    ] = None,
    retune: Annotated[
        bool, typer.Option("--tune", help="Measure the engine's micro-batch sizes for this machine and network "
                           "again (cached; cnn train uses them) before timing.")
    ] = False,
    blas_kernels: Annotated[
        bool, typer.Option("--blas-kernels", help="Time the network with each OpenBLAS kernel set this CPU can "
                           "run (OpenBLAS's own pick, then $OPENBLAS_CORETYPE = Haswell, SkylakeX), a "
                           "process each, interleaved rounds (--repeats), and say which is fastest here.")
    ] = False,
    json_out: JsonOpt = False,
    layers: LayersOpt = None,
) -> None:
    """Images per second of a training step (forward, loss, backward, update) and of inference, on random data."""
    from rich.table import Table

    from cnncli.bench.timing import product_floor, run_bench
    from cnncli.config import load_config

    load_layers(layers)
    if blas_kernels:
        if against is not None or reference:
            raise CnnError("--blas-kernels times the fused engine alone: drop --against / --reference")
        cfg = load_config(config, list(set_ or []))  # a bad config fails here, once, not in every process
        _check_sizes(cfg, batch, eval_batch, reference)
        args = ["--config", str(config), "--steps", str(steps), "--repeats", "1"]
        args += [a for kv in (set_ or []) for a in ("--set", kv)]
        args += [a for path in (layers or []) for a in ("--layers", str(path))]
        for flag, value in (("--batch-size", batch), ("--eval-batch-size", eval_batch), ("--threads", threads)):
            if value is not None:
                args += [flag, str(value)]
        from cnncli.bench.timing import compare_blas_kernels

        timings = compare_blas_kernels(args, rounds=repeats)
        if json_out:
            for t in timings:
                print_json(t.to_dict())
        else:
            _render_kernels(str(config), timings, repeats)
        return
    if against is not None:
        from cnncli.bench.torchbench import import_torch, run_against_torch

        import_torch()  # before reading anything: without torch, the one-line install hint
        cfg = load_config(config, list(set_ or []))
        _check_sizes(cfg, batch, eval_batch, reference)
        tres = run_against_torch(cfg, str(config), batch=batch, eval_batch=eval_batch, steps=steps, rounds=repeats,
                                 threads=threads, reference=reference, retune=retune)
        if json_out:
            print_json(tres.to_dict())
        else:
            _render_against(tres)
        return
    cfg = load_config(config, list(set_ or []))
    _check_sizes(cfg, batch, eval_batch, reference)
    res = run_bench(cfg, str(config), batch=batch, eval_batch=eval_batch, steps=steps, repeats=repeats,
                    threads=threads, reference=reference, retune=retune)
    if json_out:
        print_json(res.to_dict())
        return
    blas = res.blas
    lib = Path(blas["library"]).name if blas["library"] else "not found"
    out.print(f"[bold]{config}[/bold] — {res.engine} engine, float32, worker threads: {res.threads} (train), "
              f"{res.eval_threads} (inference)")
    table = Table(title="throughput (median of repeats)")
    table.add_column("pass")
    table.add_column("batch", justify="right")
    table.add_column("ms per call", justify="right")
    table.add_column("images/s", justify="right")
    table.add_column("spread (ms)", justify="right")
    for name, n, ms, ips, runs in (
        ("train step", res.batch, res.train_ms_per_step, res.train_images_per_s, res.train_runs_ms),
        ("inference", res.eval_batch, res.eval_ms_per_batch, res.eval_images_per_s, res.eval_runs_ms),
    ):
        table.add_row(name, str(n), f"{ms:.2f}", f"[bold]{ips:,.0f}[/bold]", f"{min(runs):.2f}–{max(runs):.2f}")
    out.print(table)
    _render_tuning(res.tuning)
    shares = Table(title="share of a training step (profiled on one thread)")
    shares.add_column("layers")
    shares.add_column("forward", justify="right")
    shares.add_column("backward", justify="right")
    shares.add_column("ms (fwd + bwd)", justify="right")
    shares.add_column("in matrix products", justify="right")
    for row in res.layers:
        mm = f"{100 * row.matmul_share:.0f}%" if row.matmul_share is not None and row.matmul_share > 0 else ""
        shares.add_row(row.name, f"{100 * row.forward_share:.1f}%", f"{100 * row.backward_share:.1f}%",
                       f"{row.forward_ms + row.backward_ms:.2f}", mm)
    out.print(shares)
    floor = product_floor(res.layers, res.threads)
    if floor is not None and floor["ms"] > 0:
        out.print(f"matrix products: {floor['ms']:.2f} of {floor['step_ms']:.2f} ms per step on one thread, "
                  f"{floor['gflop']:.2f} GFLOP at {floor['gflops']:.0f} GFLOP/s; at that rate on each of "
                  f"{res.threads} worker(s) no step takes less than {floor['floor_ms']:.2f} ms, whatever else is cut",
                  soft_wrap=True)
    threads_txt = f"{blas['threads']} thread(s) by default" if blas["threads"] is not None else "thread count unknown"
    limit = "limited to 1 per worker" if blas["controllable"] else "cannot be limited: 1 worker"
    out.print(f"BLAS: {lib} ({blas['config'] or 'no build string'}); {threads_txt}, {limit}")
    env = ", ".join(f"{k}={v}" for k, v in res.system["env"].items()) or "none set"
    out.print(f"numpy {res.system['numpy']}, {res.system['usable_cpus']} usable CPU(s); environment: {env}")


def _render_kernels(config: str, timings: list[Any], rounds: int) -> None:
    from rich.table import Table

    from cnncli.bench.timing import KERNEL_ENV

    base = timings[0]
    table = Table(title=f"{config}: OpenBLAS kernels, one process each, median of {rounds} interleaved round(s)")
    for col in (KERNEL_ENV, "BLAS runs", "train images/s", "inference images/s", "vs own pick (train, inference)"):
        table.add_column(col, justify="left" if col in (KERNEL_ENV, "BLAS runs") else "right", no_wrap=True)
    for t in timings:
        name = t.kernel or "unset (own pick)"
        table.add_row(name, t.arch.split()[-1], f"{t.train_images_per_s:,.0f}", f"{t.eval_images_per_s:,.0f}",
                      f"{t.train_images_per_s / base.train_images_per_s:.2f}×, "
                      f"{t.eval_images_per_s / base.eval_images_per_s:.2f}×")
    out.print(table)
    best = max(timings, key=lambda t: t.train_images_per_s)
    if best is base or best.train_images_per_s < 1.05 * base.train_images_per_s:
        out.print(f"OpenBLAS's own pick ({base.arch}) is as fast as any here (within 5 %): nothing to set.")
    else:
        out.print(f"fastest here for training: {KERNEL_ENV}={best.kernel} "
                  f"({best.train_images_per_s / base.train_images_per_s:.2f}× OpenBLAS's own pick). To use it: "
                  f"export {KERNEL_ENV}={best.kernel} before cnn train (read when numpy loads; a run resumes "
                  "bit-identically only with the kernels it was trained with).", soft_wrap=True)


def _render_against(res: TorchBenchResult) -> None:
    import statistics

    from rich.table import Table

    m = res.machine
    out.print(f"[bold]{res.config}[/bold] — cnncli ({res.cnncli_engine} engine) against PyTorch {m['torch']}, "
              f"float32, batch {res.batch} (train) / {res.eval_batch} (inference), threads {res.threads} / "
              f"{res.eval_threads}", soft_wrap=True)
    table = Table(title=f"throughput: median of {res.rounds} interleaved round(s) of {res.steps} step(s)")
    table.add_column("engine", no_wrap=True)
    table.add_column("train images/s", justify="right")
    table.add_column("ms per step", justify="right")
    table.add_column("spread (ms)", justify="right")
    table.add_column("inference images/s", justify="right")
    table.add_column("ms per batch", justify="right")
    table.add_column("spread (ms)", justify="right")
    for e in res.engines:
        table.add_row(e.name, f"[bold]{e.train_images_per_s:,.0f}[/bold]", f"{e.train_ms_per_step:.2f}",
                      f"{min(e.train_runs_ms):.2f}–{max(e.train_runs_ms):.2f}",
                      f"[bold]{e.eval_images_per_s:,.0f}[/bold]", f"{e.eval_ms_per_batch:.2f}",
                      f"{min(e.eval_runs_ms):.2f}–{max(e.eval_runs_ms):.2f}")
    out.print(table)
    r = res.ratios
    out.print(f"cnncli / best PyTorch: train [bold]{r['train']:.2f}×[/bold] (vs {r['train_vs']}), "
              f"inference [bold]{r['inference']:.2f}×[/bold] (vs {r['inference_vs']}); median of the per-round "
              f"ratios: train {r['train_round_median']:.2f}×, inference {r['inference_round_median']:.2f}×",
              soft_wrap=True)
    busy = [v for v in res.other_cpus_per_round if v is not None]
    if busy:
        note = ("" if max(busy) < 0.25 else " — [yellow]the machine was busy: PyTorch's OpenMP threads slow down far "
                "more than cnncli's when the cores are shared; rerun on an idle machine[/yellow]")
        out.print(f"other processes kept {statistics.mean(busy):.2f} CPU(s) busy on average during the rounds "
                  f"(most in one round: {max(busy):.2f}){note}", soft_wrap=True)
    diffs = ", ".join(f"{fmt} {d:.1e}" for fmt, d in res.logits_rel_diff.items())
    out.print(f"same function: max |Δlogits| / max |logits| before timing: {diffs}")
    caps = ", ".join(str(v) for v in (m["torch_blas"], "mkldnn" if m["torch_mkldnn"] else None,
                                       m["torch_cpu_capability"]) if v)
    out.print(f"machine: {m['cpu_model']}, {m['logical_cpus']} logical CPU(s), {m['usable_cpus']} usable; "
              f"Python {m['python']}; numpy {m['numpy']} ({m['numpy_blas'] or 'BLAS unknown'}); "
              f"torch {m['torch']} ({caps or 'BLAS unknown'})", soft_wrap=True)
    _render_tuning(res.tuning)


torch_script = typer.Typer(
    cls=CnnGroup,
    help="PyTorch twin of `cnn train` (same network, weights, data order, augmentation, schedule), to time "
    "both as whole processes. Needs torch installed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@torch_script.callback()
def _torch_script_main() -> None:
    """Keep `train` a subcommand even though it is the only one."""


@torch_script.command("train", cls=CnnCommand)
@user_errors
def torch_train(
    config: ConfigOpt = CONFIG_DEFAULT,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Epochs (train.epochs); the schedule spans them.")
    ] = None,
    memory_format: Annotated[
        str, typer.Option("--memory-format", metavar="FORMAT",
                          help="PyTorch memory format: contiguous (NCHW) or channels_last.")
    ] = "contiguous",
    threads: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Threads. Default: cnncli's worker count for a training "
                                 "batch.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Train the config's network in PyTorch with `cnn train`'s recipe; print each epoch, the test accuracy."""
    from cnncli.bench.torchbench import FORMATS, TorchBenchError, import_torch, train_torch
    from cnncli.config import load_config

    torch = import_torch()
    if memory_format not in FORMATS:
        raise TorchBenchError(f"--memory-format: must be one of {', '.join(FORMATS)}, got {memory_format!r}")
    cfg = load_config(config, [*(set_ or []), *([f"train.epochs={epochs}"] if epochs is not None else [])])
    folder = prepare_data(data_dir, cfg)

    def show(m: EpochMetrics) -> None:
        if json_out:
            return
        val = f"val loss {m.val_loss:.4f}, val acc {m.val_acc:.2%}; " if m.val_acc is not None else ""
        total = "" if cfg.train.steps else f"/{cfg.train.epochs}"  # train.steps: the epochs follow from the data
        out.print(f"epoch {m.epoch}{total}: train loss {m.train_loss:.4f}, train acc {m.train_acc:.2%}; "
                  f"{val}lr {m.lr:.4g}; {m.seconds:.2f} s ({m.images_per_s:,.0f} images/s)")

    if not json_out:
        length = f"{cfg.train.steps} steps" if cfg.train.steps else f"{cfg.train.epochs} epoch(s)"
        out.print(f"[bold]{safe(config)}[/bold] in PyTorch {torch.__version__} ({memory_format}), {length}")
    res = train_torch(cfg, folder, memory_format=memory_format, threads=threads, on_epoch=show)
    if json_out:
        print_json(res.to_dict())
        return
    if res.test_acc is not None:
        tta = f" with test-time augmentation {res.tta}" if res.tta != "none" else ""
        out.print(f"test (best epoch {res.best_epoch}){tta}: loss {res.test_loss:.4f}, accuracy {res.test_acc:.2%}")
    if res.test_plain_acc is not None:
        out.print(f"test without test-time augmentation: loss {res.test_plain_loss:.4f}, "
                  f"accuracy {res.test_plain_acc:.2%}")
    out.print(f"{res.n_train} train / {res.n_val} val / {res.n_test} test images; {res.threads} thread(s); "
              f"total {res.seconds:.2f} s")


def _render_tuning(t: dict) -> None:
    """The micro-batch sizes used, where they come from, and the candidates' times when just measured."""
    if not t:
        return
    origin = {"measured": "measured now", "cache": f"measured on this machine {t.get('when', '')}".rstrip(),
              "default": "built-in", "run": "a run's"}.get(t["source"], t["source"])
    out.print(f"micro-batches: training {t['train_micro_batch']}, inference {t['eval_micro_batch']} ({origin}): "
              f"{t['why']}")
    if t["source"] == "cache":
        out.print("  (cnn bench --tune measures them again)")
    if t["source"] == "measured" and (t["train_ms"] or t["eval_ms"]):
        from rich.table import Table

        cand = Table(title="micro-batch calibration (median of interleaved rounds)")
        cand.add_column("size", justify="right")
        cand.add_column("ms per training step", justify="right")
        cand.add_column("ms per 1,000 inferences", justify="right")
        sizes = sorted({int(k) for k in (*t["train_ms"], *t["eval_ms"])})
        for c in sizes:
            tr, ev = t["train_ms"].get(str(c)), t["eval_ms"].get(str(c))
            mark_t = " *" if c == t["train_micro_batch"] and tr is not None else ""
            mark_e = " *" if c == t["eval_micro_batch"] and ev is not None else ""
            cand.add_row(str(c), f"{tr:.2f}{mark_t}" if tr is not None else "–",
                         f"{ev:.2f}{mark_e}" if ev is not None else "–")
        out.print(cand)

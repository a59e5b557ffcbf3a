"""`cnn bench`: training-step and inference throughput of a config's network (registered in cnncli/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnncli.clikit import CONFIG_DEFAULT, ConfigOpt, JsonOpt, LayersOpt, load_layers, out, user_errors


@user_errors
def bench(
    config: ConfigOpt = CONFIG_DEFAULT,
    batch: Annotated[int | None, typer.Option(min=1, help="Training batch. Default: train.batch_size.")] = None,
    eval_batch: Annotated[
        int | None, typer.Option("--eval-batch", min=1, help="Inference batch. Default: train.eval_batch_size.")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed training steps per repeat (inference: a quarter).")] = 20,
    repeats: Annotated[int, typer.Option(min=1, help="Repeats; the median is reported.")] = 5,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Worker threads. Default: $CNNCLI_THREADS, else the usable CPUs.")
    ] = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="Time the per-layer reference path instead of the fused engine.")
    ] = False,
    json_out: JsonOpt = False,
    layers: LayersOpt = None,
) -> None:
    """Images per second of a training step (forward, loss, backward, update) and of inference, on random data."""
    import json

    from rich.table import Table

    from cnncli.bench import run_bench
    from cnncli.config import load_config

    load_layers(layers)
    cfg = load_config(config)
    res = run_bench(cfg, str(config), batch=batch, eval_batch=eval_batch, steps=steps, repeats=repeats,
                    threads=threads, reference=reference)
    if json_out:
        out.print_json(json.dumps(res.to_dict()))
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
    shares = Table(title="share of a training step (profiled on one thread)")
    shares.add_column("layers")
    shares.add_column("forward", justify="right")
    shares.add_column("backward", justify="right")
    shares.add_column("ms (fwd + bwd)", justify="right")
    for row in res.layers:
        shares.add_row(row.name, f"{100 * row.forward_share:.1f}%", f"{100 * row.backward_share:.1f}%",
                       f"{row.forward_ms + row.backward_ms:.2f}")
    out.print(shares)
    threads_txt = f"{blas['threads']} thread(s) by default" if blas["threads"] is not None else "thread count unknown"
    limit = "limited to 1 per worker" if blas["controllable"] else "cannot be limited: 1 worker"
    out.print(f"BLAS: {lib} ({blas['config'] or 'no build string'}); {threads_txt}, {limit}")
    env = ", ".join(f"{k}={v}" for k, v in res.system["env"].items()) or "none set"
    out.print(f"numpy {res.system['numpy']}, {res.system['usable_cpus']} usable CPU(s); environment: {env}")

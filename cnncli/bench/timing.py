"""`cnn bench`: how fast one training step and one inference pass run, on random data of the config's shape.

A training step is what `cnncli/run/train.py` does per batch: `engine.loss_and_grads` (forward, softmax
cross-entropy, backward) and the optimizer update `make_optimizer(...).step(params, grads, lr)`. Inference
is `engine.predict` on an evaluation batch. Each is timed after a warm-up, as the median over repeats of
the mean time per call; the per-layer shares come from one extra, instrumented pass on a single thread.

No output here: `cnncli/cli/bench.py` renders a `BenchResult`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnncli import engine
from cnncli.config import Config
from cnncli.engine import calibrate, engine_for
from cnncli.engine.calibrate import Tuning
from cnncli.host.blas import blas_info
from cnncli.nn.model import Sequential, build_model
from cnncli.run.optim import make_optimizer

ENV_VARS = ("CNNCLI_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
            "OPENBLAS_L2_SIZE")  # fmt: skip


@dataclass(frozen=True)
class LayerShare:
    """One row of the profile: a stage of fused layers (or the loss, the gradient sum, the update)."""

    name: str
    forward_share: float  # fraction of the profiled step's time
    backward_share: float
    forward_ms: float  # per step, on one thread
    backward_ms: float
    matmul_share: float | None = None  # fraction of this row's time inside matrix products (fused engine)
    matmul_ms: float | None = None  # per step, on one thread: the time inside matrix products (fused engine)
    matmul_gflop: float | None = None  # per step: their floating-point operations (2·m·k·n each), in 10⁹


@dataclass
class BenchResult:
    config: str
    engine: str  # "fused" (engine.loss_and_grads / predict) or "per-layer" (Sequential's own, the reference)
    batch: int
    eval_batch: int
    steps: int
    repeats: int
    threads: int  # worker threads of the training step (1 for the per-layer path)
    eval_threads: int  # worker threads of the inference pass
    train_ms_per_step: float
    train_images_per_s: float
    eval_ms_per_batch: float
    eval_images_per_s: float
    train_runs_ms: list[float]  # each repeat's mean time per step
    eval_runs_ms: list[float]
    layers: list[LayerShare]
    blas: dict[str, Any]
    system: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)  # the micro-batch sizes used (calibrate.Tuning)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def eval_calls(steps: int) -> int:
    """Inference calls per repeat for `steps` training steps per repeat: a quarter, at least one."""
    return max(1, -(-steps // 4))


def _median_ms(fn: Callable[[], object], calls: int, repeats: int) -> tuple[float, list[float]]:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append(1000 * (time.perf_counter() - start) / calls)
    return statistics.median(runs), runs


def _profile(model: Sequential, x: np.ndarray, y: np.ndarray, step: Callable[[], None], passes: int,
             reference: bool = False) -> list[LayerShare]:
    """Shares of one training step: the engine's stages timed on one thread, the loss (forward column), the
    sum of the micro-batch gradients and the optimizer update (backward column); they add up to 1."""
    rows: dict[str, list[float]] = {}
    matmul: dict[str, float] = {}
    flops: dict[str, float] = {}
    update = 0.0
    for _ in range(passes):
        if not reference:
            eng = engine_for(model)
            timed = eng.profile(x, y)
            for name, (f_mm, b_mm) in eng.matmul_seconds.items():
                matmul[name] = matmul.get(name, 0.0) + f_mm + b_mm
            for name, (f_fl, b_fl) in eng.matmul_flops.items():
                flops[name] = flops.get(name, 0.0) + f_fl + b_fl
        else:
            timed = _profile_layers(model, x, y)
        for name, f, b in timed:
            acc = rows.setdefault(name, [0.0, 0.0])
            acc[0] += f
            acc[1] += b
        start = time.perf_counter()
        step()
        update += time.perf_counter() - start
    rows["optimizer update"] = [0.0, update]
    total = sum(f + b for f, b in rows.values()) or 1.0
    return [
        LayerShare(name, f / total, b / total, 1000 * f / passes, 1000 * b / passes,
                   matmul[name] / (f + b) if name in matmul and f + b > 0 else None,
                   1000 * matmul[name] / passes if name in matmul else None,
                   flops[name] / passes / 1e9 if name in flops else None)
        for name, (f, b) in rows.items()
    ]


def product_floor(layers: list[LayerShare], threads: int) -> dict[str, float] | None:
    """What the matrix products alone cost a training step, from the one-thread profile: {'ms': their time
    per step on one thread, 'step_ms': the whole profiled step's, 'gflop': their work, 'gflops': the rate
    they ran at, 'floor_ms': ms / threads, the step time no change outside the products can go below while
    the products run at that rate on every worker}. None on the per-layer path (nothing counted)."""
    counted = [r for r in layers if r.matmul_ms is not None]
    if not counted:
        return None
    ms = sum(r.matmul_ms or 0.0 for r in counted)
    gflop = sum(r.matmul_gflop or 0.0 for r in counted)
    step_ms = sum(r.forward_ms + r.backward_ms for r in layers)
    return {"ms": ms, "step_ms": step_ms, "gflop": gflop, "gflops": gflop / (ms / 1000) if ms > 0 else 0.0,
            "floor_ms": ms / max(threads, 1)}


def _profile_layers(model: Sequential, x: np.ndarray, y: np.ndarray) -> list[tuple[str, float, float]]:
    """The per-layer path timed layer by layer (its forward, loss, backward)."""
    from cnncli.nn.layers import softmax_cross_entropy

    clock = time.perf_counter
    times = []
    a = x
    for layer in model.layers:
        t0 = clock()
        a = layer.forward(a)
        times.append([clock() - t0, 0.0])
    t0 = clock()
    _, d, _ = softmax_cross_entropy(a, y)
    loss_s = clock() - t0
    for i in reversed(range(len(model.layers))):
        t0 = clock()
        d = model.layers[i].backward(d)
        times[i][1] = clock() - t0
    names = [layer.name or layer.kind for layer in model.layers]
    return [(n, f, b) for n, (f, b) in zip(names, times, strict=True)] + [("softmax cross-entropy", loss_s, 0.0)]


def system_info(threads: int) -> dict[str, Any]:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return {
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": cpus,
        "engine_threads": threads,
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


@dataclass
class BenchCase:
    """A network and its random data, ready to time: what `run_bench` (and `cnncli.bench.torchbench`) call.

    x (batch, *input_shape) float32 and y (batch,) int64 feed the training step; xe (eval_batch,
    *input_shape) float32 feeds inference.
    """

    model: Sequential
    x: np.ndarray
    y: np.ndarray
    xe: np.ndarray
    lr: float
    threads: int  # worker threads of the training step
    eval_threads: int  # worker threads of the inference pass
    train_step: Callable[[], None]  # loss_and_grads + optimizer step
    update: Callable[[], None]  # the optimizer step alone
    infer: Callable[[], None]  # predict on xe
    tuning: Tuning | None = None
    reference: bool = False  # the per-layer reference path instead of the engine

    def tuning_dict(self) -> dict[str, Any]:
        """The micro-batch sizes used, as the results carry them ({} on the per-layer path)."""
        return self.tuning.to_dict() if self.tuning is not None else {}


def prepare_case(
    cfg: Config,
    batch: int,
    eval_batch: int,
    threads: int | None = None,
    reference: bool = False,
    seed: int = 0,
    retune: bool = False,
) -> BenchCase:
    """Build `cfg`'s network (weights from `seed`), random inputs and labels, and the timed calls; the engine's
    micro-batch sizes as `cnn train` would use them (`calibrate.for_model`; measured again with `retune`)."""
    model = build_model(cfg.model, seed=seed)
    eng = engine_for(model)
    eng.threads = threads
    if reference:
        tuning = calibrate.default("the per-layer reference path has no micro-batches")
    else:
        tuning = calibrate.for_model(model, batch, eval_batch, retune=retune)
    used_threads = 1 if reference else eng.worker_count(batch)
    eval_threads = 1 if reference else eng.worker_count(eval_batch, train=False)
    rng = np.random.default_rng(seed)
    n_classes = model.output_shape[0]
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, n_classes, size=batch)
    xe = rng.standard_normal((eval_batch, *model.input_shape)).astype(np.float32)
    params = model.named_params()
    optimizer = make_optimizer(params, cfg.train.optimizer, model.decayed())
    lr = cfg.train.optimizer.lr

    def train_step() -> None:
        if reference:
            model.loss_and_grads(x, y)
        else:
            engine.loss_and_grads(model, x, y)
        optimizer.step(params, model.named_grads(), lr)

    def update() -> None:
        optimizer.step(params, model.named_grads(), lr)

    def infer() -> None:
        if reference:
            model.predict(xe)
        else:
            engine.predict(model, xe)

    return BenchCase(model, x, y, xe, lr, used_threads, eval_threads, train_step, update, infer, tuning, reference)


def run_bench(
    cfg: Config,
    config_name: str,
    batch: int | None = None,
    eval_batch: int | None = None,
    steps: int = 20,
    repeats: int = 5,
    warmup: int = 3,
    threads: int | None = None,
    reference: bool = False,
    seed: int = 0,
    retune: bool = False,
) -> BenchResult:
    """Time `steps` training steps (batch `batch`, default train.batch_size) and ⌈steps/4⌉ inference passes
    (batch `eval_batch`, default train.eval_batch_size), `repeats` times each after `warmup` calls; medians.

    `reference` times the per-layer path (`Sequential.loss_and_grads`) instead of the fused engine.
    """
    batch = batch or cfg.train.batch_size
    eval_batch = eval_batch or cfg.train.eval_batch_size
    case = prepare_case(cfg, batch, eval_batch, threads=threads, reference=reference, seed=seed, retune=retune)
    for _ in range(warmup):
        case.train_step()
        case.infer()
    train_ms, train_runs = _median_ms(case.train_step, steps, repeats)
    eval_ms, eval_runs = _median_ms(case.infer, eval_calls(steps), repeats)
    layers = _profile(case.model, case.x, case.y, case.update, passes=max(2, min(steps, 10)), reference=case.reference)
    blas = blas_info()
    return BenchResult(
        config=config_name,
        engine="per-layer" if reference else "fused",
        batch=batch,
        eval_batch=eval_batch,
        steps=steps,
        repeats=repeats,
        threads=case.threads,
        eval_threads=case.eval_threads,
        train_ms_per_step=train_ms,
        train_images_per_s=batch / (train_ms / 1000),
        eval_ms_per_batch=eval_ms,
        eval_images_per_s=eval_batch / (eval_ms / 1000),
        train_runs_ms=train_runs,
        eval_runs_ms=eval_runs,
        layers=layers,
        blas=blas,
        system=system_info(case.threads),
        tuning=case.tuning_dict(),
    )


# ---- which OpenBLAS kernels --------------------------------------------------------------------------------
# The OpenBLAS in numpy's wheels carries kernels for many processors and picks one at start-up
# ($OPENBLAS_CORETYPE overrides the pick, read only when the library loads). Its pick is not always the
# fastest for the engine's narrow products: on a Zen 4 machine (AVX-512) it takes the SkylakeX kernels, and
# the AVX2 Haswell kernels ran the diagram network 1.14× faster in training there. Each candidate needs
# these CPU instructions (from /proc/cpuinfo); one the CPU lacks would stop the process.
BLAS_KERNELS: dict[str, frozenset[str]] = {
    "Haswell": frozenset({"avx2", "fma"}),  # (OpenBLAS's "Zen" runs these same kernels)
    "SkylakeX": frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"}),
}
KERNEL_ENV = "OPENBLAS_CORETYPE"


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of this machine's first CPU (empty where /proc/cpuinfo is not readable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def kernel_candidates(flags: frozenset[str] | None = None) -> list[str]:
    """'' (OpenBLAS's own pick) and every kernel set of BLAS_KERNELS this CPU can run."""
    flags = cpu_flags() if flags is None else flags
    return [""] + [name for name, need in BLAS_KERNELS.items() if need <= flags]


@dataclass
class KernelTiming:
    """One candidate's figures: `kernel` '' for OpenBLAS's own pick; `arch` what the BLAS said it runs."""

    kernel: str
    arch: str
    train_runs: list[float]  # images/s of each round
    eval_runs: list[float]

    @property
    def train_images_per_s(self) -> float:
        return statistics.median(self.train_runs)

    @property
    def eval_images_per_s(self) -> float:
        return statistics.median(self.eval_runs)

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "arch": self.arch, "train_images_per_s": self.train_images_per_s,
                "eval_images_per_s": self.eval_images_per_s, "train_runs": self.train_runs,
                "eval_runs": self.eval_runs}


def compare_blas_kernels(bench_args: list[str], rounds: int, candidates: list[str] | None = None,
                         timeout: float = 1800.0) -> list[KernelTiming]:
    """Time `cnn bench BENCH_ARGS --json` once per candidate kernel set and round, each in a process of its
    own with $OPENBLAS_CORETYPE set (or unset for OpenBLAS's own pick), the candidates' order reversed every
    other round; images/s medians per candidate. A process that fails raises CnnError naming the kernel."""
    import json
    import subprocess
    import sys

    from cnncli.host.errors import CnnError

    names = kernel_candidates() if candidates is None else candidates
    found: dict[str, KernelTiming] = {}
    for r in range(rounds):
        for name in names if r % 2 == 0 else list(reversed(names)):
            env = {k: v for k, v in os.environ.items() if k != KERNEL_ENV}
            if name:
                env[KERNEL_ENV] = name
            cmd = [sys.executable, "-c", "from cnncli.cli.app import main; main()", "bench", *bench_args, "--json"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
            label = f"{KERNEL_ENV}={name}" if name else "OpenBLAS's own kernels"
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise CnnError(f"cnn bench with {label} failed (exit {proc.returncode}): {last}")
            res = json.loads(proc.stdout.strip().splitlines()[0])
            t = found.setdefault(name, KernelTiming(name, str(res["blas"].get("config") or "unknown"), [], []))
            t.train_runs.append(float(res["train_images_per_s"]))
            t.eval_runs.append(float(res["eval_images_per_s"]))
    return [found[n] for n in names]

"""The same network, loss, SGD step and training recipe in PyTorch (CPU), to time cnncli against it.

`cnn bench --against torch` (`run_against_torch`) times cnncli's training step and inference side by side
with PyTorch's, in both of PyTorch's memory formats (contiguous NCHW and channels_last), in interleaved
rounds, medians. `python -m cnncli.cli.torchbench train --config C` (`train_torch`) trains the network with
`cnn train`'s recipe, so the two can be timed as whole processes.

"The same" means: the network is built from the config's layer list by `TORCH_LAYERS` (a table from layer
type to a builder) with cnncli's initial weights copied in, so both compute the same logits to float32
rounding (`tests/bench/test_bench.py` checks it, and every bench run reports the largest difference); the loss is
the mean softmax cross-entropy; the optimizer follows the config with weight decay on weights ('*.W') only,
as `cnncli/run/optim.py` does; batches, learning rate and thread count are cnncli's.

PyTorch is never a dependency: without it `import_torch` raises `TorchMissing`, one line saying how to
install it. No output here: `cnncli/cli/bench.py` renders the results.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cnncli import engine
from cnncli.bench.timing import BenchCase, eval_calls, prepare_case
from cnncli.config import AdamConfig, Config, OptimizerConfig, SGDConfig
from cnncli.data.preprocess import Normalizer, alternating_flips, augment
from cnncli.engine import engine_for
from cnncli.host.blas import blas_info
from cnncli.host.errors import CnnError, ConfigError, TrainingDiverged
from cnncli.nn.datainit import initialise_from_data
from cnncli.nn.layer import Layer
from cnncli.nn.model import Sequential, build_model
from cnncli.run import paramgroups
from cnncli.run.lookahead import Lookahead
from cnncli.run.optim import check_schedule, decay_coefficient, learning_rate
from cnncli.run.paramgroups import ParamRules
from cnncli.run.train import EpochMetrics, run_length
from cnncli.run.tta import tta_logits

TORCH_VERSION = "2.13.0"  # the version the project's figures were measured with (`make bench-torch` installs it)
INSTALL_HINT = (
    f"PyTorch is not installed in this environment: install it with `pip install torch=={TORCH_VERSION}` "
    "(or run `make bench-torch`, which does)"
)
FORMATS = ("contiguous", "channels_last")
ENGINE_NAMES = {"contiguous": "torch", "channels_last": "torch channels_last"}

Shape = tuple[int, ...]


class TorchBenchError(CnnError):
    """The PyTorch side cannot be built (a layer type it has no equivalent for, a shape that does not fit)."""


class TorchMissing(TorchBenchError):
    """PyTorch is not importable; the message says how to install it."""

    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


def import_torch() -> ModuleType:
    """The `torch` module, or TorchMissing (one line: how to install it)."""
    try:
        import torch
    except ImportError:
        raise TorchMissing() from None
    return torch


# ------------------------------------------------------------------------------------------ the network


@dataclass(frozen=True)
class TorchLayer:
    """A config layer's PyTorch module, and where its parameters go: cnncli's parameter key ('W') -> the
    module's parameter (a dotted path for nested modules: 'weight', 'block.0.weight')."""

    module: Any  # torch.nn.Module
    params: dict[str, str] = field(default_factory=dict)


# A builder gets the layer's options (its config entry), its input shape per example ((C, H, W) or (F,)) and
# the torch module, and returns the equivalent `TorchLayer`.
Builder = Callable[[Any, Shape, ModuleType], TorchLayer]


def _conv(spec: Any, shape: Shape, torch: ModuleType) -> TorchLayer:
    # cnncli's conv is a cross-correlation with W (C_out, C_in, K, K): exactly nn.Conv2d's layout.
    conv = torch.nn.Conv2d(shape[0], spec.out_channels, spec.kernel_size, stride=spec.stride, padding=spec.padding,
                           bias=spec.bias)
    return TorchLayer(conv, {"W": "weight", "b": "bias"} if spec.bias else {"W": "weight"})


def _relu(spec: Any, shape: Shape, torch: ModuleType) -> TorchLayer:
    return TorchLayer(torch.nn.ReLU())


def _maxpool(spec: Any, shape: Shape, torch: ModuleType) -> TorchLayer:
    # Both drop the rows and columns no window covers (PyTorch's ceil_mode=False).
    return TorchLayer(torch.nn.MaxPool2d(spec.kernel_size, stride=spec.stride or spec.kernel_size))


def _flatten(spec: Any, shape: Shape, torch: ModuleType) -> TorchLayer:
    # C order over (C, H, W), as cnncli's Flatten; on a channels_last tensor it still flattens logical NCHW.
    return TorchLayer(torch.nn.Flatten())


def _linear(spec: Any, shape: Shape, torch: ModuleType) -> TorchLayer:
    # W (out, in), as nn.Linear's weight.
    lin = torch.nn.Linear(shape[0], spec.out_features, bias=spec.bias)
    return TorchLayer(lin, {"W": "weight", "b": "bias"} if spec.bias else {"W": "weight"})


def _avgpool(spec: Any, shape: Shape, torch: ModuleType) -> TorchLayer:
    # zeros of the padding count in the divisor, as cnncli's AvgPool2D (count_include_pad=True)
    return TorchLayer(torch.nn.AvgPool2d(spec.kernel_size, stride=spec.stride or spec.kernel_size,
                                         padding=spec.padding, count_include_pad=True))


def _batchnorm(spec: Any, shape: Shape, torch: ModuleType) -> TorchLayer:
    # γ, β are weight, bias; PyTorch's momentum and ε have cnncli's meaning (running statistics start 0 and 1)
    cls = torch.nn.BatchNorm2d if len(shape) == 3 else torch.nn.BatchNorm1d
    bn = cls(shape[0], eps=spec.eps, momentum=spec.momentum)
    if not spec.scale:  # γ fixed at 1: PyTorch's weight stays 1 and gets no gradient (airbench's way)
        bn.weight.requires_grad_(False)
        return TorchLayer(bn, {"beta": "bias"})
    return TorchLayer(bn, {"gamma": "weight", "beta": "bias"})


def _gelu(spec: Any, shape: Shape, torch: ModuleType) -> TorchLayer:
    return TorchLayer(torch.nn.GELU())  # the exact erf form (approximate="none"), as cnncli's


def _multiply(spec: Any, shape: Shape, torch: ModuleType) -> TorchLayer:
    class Multiply(torch.nn.Module):  # y = α·x; PyTorch has no module for a fixed factor
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x: Any) -> Any:
            return x * self.factor

    return TorchLayer(Multiply(spec.factor))


TORCH_LAYERS: dict[str, Builder] = {
    "avgpool": _avgpool,
    "batchnorm": _batchnorm,
    "conv": _conv,
    "relu": _relu,
    "maxpool": _maxpool,
    "flatten": _flatten,
    "linear": _linear,
    "gelu": _gelu,
    "multiply": _multiply,
}


@dataclass
class TorchNet:
    """The PyTorch network of a config: `net` (an nn.Sequential) and its parameters under cnncli's names."""

    net: Any
    params: dict[str, Any]  # 'conv1.W' -> the torch Parameter it maps to, in cnncli's order
    decayed: frozenset[str] = frozenset()  # cnncli's weight-decayed names (`Sequential.decayed`)

    def copy_from(self, model: Sequential) -> None:
        """Copy cnncli's current parameters into the PyTorch ones (same shapes, float32)."""
        torch = import_torch()
        source = model.named_params()
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(np.ascontiguousarray(source[name], dtype=np.float32)))

    def _batchnorms(self, model: Sequential) -> list[tuple[Layer, Any]]:
        """cnncli's batch-norm layers paired, in order, with the PyTorch modules built for them."""
        torch = import_torch()
        ours = [layer for layer in model.layers if layer.type_name == "batchnorm"]
        theirs = [m for m in self.net if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        return list(zip(ours, theirs, strict=True))

    def copy_buffers_from(self, model: Sequential) -> None:
        """Copy cnncli's buffers (batch-norm running statistics) into the matching PyTorch modules, in order,
        so evaluation-mode outputs compare the same function even after both have trained a few steps."""
        torch = import_torch()
        with torch.no_grad():
            for layer, module in self._batchnorms(model):
                module.running_mean.copy_(torch.from_numpy(layer.buffers["running_mean"].astype(np.float32)))
                module.running_var.copy_(torch.from_numpy(layer.buffers["running_var"].astype(np.float32)))

    def live_arrays(self, model: Sequential) -> dict[str, np.ndarray]:
        """The PyTorch parameters and batch-norm running statistics under cnncli's names ('bn1.running_mean'),
        as NumPy views of the tensors' memory (writing into one changes the network): what cnncli's
        `Lookahead` averages."""
        live = {name: p.detach().numpy() for name, p in self.params.items()}
        for layer, module in self._batchnorms(model):
            live[f"{layer.name}.running_mean"] = module.running_mean.numpy()
            live[f"{layer.name}.running_var"] = module.running_var.numpy()
        return live

    def numpy_params(self) -> dict[str, np.ndarray]:
        """The current PyTorch parameters as float32 arrays under cnncli's names (copies)."""
        return {name: p.detach().numpy().copy() for name, p in self.params.items()}


def build_torch_net(cfg: Config, model: Sequential) -> TorchNet:
    """The PyTorch equivalent of `model` (built from `cfg.model`), holding a copy of `model`'s parameters.

    Raises TorchBenchError naming the layer (`model.layers[i]`) whose type `TORCH_LAYERS` cannot map.
    """
    torch = import_torch()
    specs = cfg.model.layers
    if len(specs) != len(model.layers):
        raise TorchBenchError(
            f"model.layers: {len(specs)} layers in the config but {len(model.layers)} in the built network; "
            "cnncli.bench.torchbench maps one config layer to one layer"
        )
    shape: Shape = tuple(cfg.model.input_shape)
    modules, params = [], {}
    expected = model.named_params()
    for i, (spec, layer) in enumerate(zip(specs, model.layers, strict=True)):
        builder = TORCH_LAYERS.get(spec.type)
        if builder is None:
            raise TorchBenchError(
                f"model.layers[{i}]: layer type {spec.type!r} has no PyTorch equivalent in cnncli.bench.torchbench "
                f"(it maps {', '.join(TORCH_LAYERS)})"
            )
        built = builder(spec, shape, torch)
        for key, path in built.params.items():
            name = f"{layer.name}.{key}"
            p = built.module.get_parameter(path)
            if name not in expected or tuple(p.shape) != expected[name].shape:
                have = tuple(expected[name].shape) if name in expected else "nothing"
                raise TorchBenchError(
                    f"model.layers[{i}] ({spec.type}): PyTorch parameter {path} {tuple(p.shape)} does not match "
                    f"cnncli's {name} ({have})"
                )
            params[name] = p
        with torch.no_grad():
            shape = tuple(built.module(torch.zeros((1, *shape))).shape[1:])
        modules.append(built.module)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise TorchBenchError(f"model.layers: cnncli parameters {', '.join(missing)} have no PyTorch counterpart")
    tnet = TorchNet(torch.nn.Sequential(*modules), {k: params[k] for k in expected}, frozenset(model.decayed()))
    tnet.copy_from(model)
    return tnet


def make_torch_optimizer(tnet: TorchNet, cfg: OptimizerConfig, rules: ParamRules | None = None) -> Any:
    """cnncli's optimizer in PyTorch: SGD (momentum, Nesterov) or Adam, a parameter group per (lr_scale, decay) pair.

    Each group's weight decay is cnncli's coefficient (`cnncli.run.optim.decay_coefficient`: λ on the decayed
    parameters, λ/(lr·lr_scale) when decoupled, 0 on the rest), added to the gradient as cnncli adds it;
    its `lr_scale` (train.param_groups, `rules`; 1 without) multiplies the step's learning rate
    (`set_learning_rate`). Frozen parameters are left out of a step by `set_trainable`."""
    torch = import_torch()
    if rules is None:
        rules = paramgroups.resolve(list(tnet.params), tnet.decayed, ())
    by_rule: dict[tuple[float, float], list[Any]] = {}  # parameters with the same scale and decay share a group
    for name, p in tnet.params.items():
        scale = rules.lr_scale.get(name, 1.0)
        by_rule.setdefault((scale, decay_coefficient(cfg, name in rules.decay, scale)), []).append(p)
    groups = [{"params": ps, "lr_scale": scale, "lr": cfg.lr * scale, "weight_decay": wd}
              for (scale, wd), ps in by_rule.items()]
    if isinstance(cfg, SGDConfig):
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    assert isinstance(cfg, AdamConfig)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def set_learning_rate(opt: Any, lr: float) -> None:
    """The step's learning rate `lr` (the schedule's), times each group's lr_scale."""
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]


def set_trainable(tnet: TorchNet, frozen: frozenset[str]) -> None:
    """Parameters in `frozen` get no gradient, so PyTorch's optimizer skips them (no step, momentum kept), as
    cnncli's does; the others train."""
    for name, p in tnet.params.items():
        p.requires_grad_(name not in frozen)


def to_format(x: Any, memory_format: str) -> Any:
    """A (N, C, H, W) tensor in `memory_format` ('contiguous' or 'channels_last'; flat inputs stay as they are)."""
    torch = import_torch()
    if memory_format == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def set_format(tnet: TorchNet, memory_format: str) -> None:
    """Put the network's 4-d weights in `memory_format` (channels_last changes their strides, not values)."""
    if memory_format not in FORMATS:
        raise TorchBenchError(f"memory format: must be one of {', '.join(FORMATS)}, got {memory_format!r}")
    if memory_format == "channels_last":
        torch = import_torch()
        tnet.net.to(memory_format=torch.channels_last)


def torch_logits(tnet: TorchNet, x: np.ndarray, memory_format: str = "contiguous") -> np.ndarray:
    """Inference: x (N, *input_shape) float32 -> logits (N, classes) float32."""
    torch = import_torch()
    tnet.net.eval()
    with torch.inference_mode():
        return tnet.net(to_format(torch.from_numpy(x), memory_format)).numpy().copy()


def logits_difference(model: Sequential, tnet: TorchNet, x: np.ndarray, memory_format: str) -> float:
    """max |z_torch − z_cnncli| / max |z_cnncli| over x (N, *input_shape): ~1e-7 when they agree."""
    tnet.copy_buffers_from(model)
    z = engine.predict(model, x)
    zt = torch_logits(tnet, x, memory_format)
    return float(np.max(np.abs(zt - z)) / max(float(np.max(np.abs(z))), 1e-30))


# ------------------------------------------------------------------------------------------- the bench


@dataclass
class EngineTiming:
    """One engine's medians over the rounds (and each round's mean time per call)."""

    name: str  # "cnncli", "torch" (contiguous NCHW), "torch channels_last"
    train_ms_per_step: float
    train_images_per_s: float
    eval_ms_per_batch: float
    eval_images_per_s: float
    train_runs_ms: list[float]
    eval_runs_ms: list[float]


@dataclass
class TorchBenchResult:
    config: str
    cnncli_engine: str  # "fused" or "per-layer"
    batch: int
    eval_batch: int
    steps: int  # timed training steps per engine per round (inference: a quarter, at least one)
    rounds: int
    warmup: int
    threads: int  # cnncli's worker threads for the training step = torch.set_num_threads while training
    eval_threads: int  # the same for inference
    engines: list[EngineTiming]
    # train / inference: cnncli's median images/s over the best PyTorch format's (train_vs / inference_vs);
    # *_per_round: each round's cnncli speed over the faster PyTorch format of that round; *_round_median
    ratios: dict[str, Any]
    logits_rel_diff: dict[str, float]  # memory format -> max |Δz| / max |z| before timing
    # CPUs kept busy by other processes during each round (None where /proc/stat is missing): PyTorch's
    # OpenMP threads lose far more than cnncli's workers when they share the cores, so only rounds near 0 count
    other_cpus_per_round: list[float | None]
    machine: dict[str, Any]
    tuning: dict[str, Any] = field(default_factory=dict)  # cnncli's micro-batch sizes (calibrate.Tuning)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo ('model name'), else what `platform` says, else 'unknown'."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, logical and usable CPUs, Python, numpy and its BLAS, torch and its BLAS/CPU capability."""
    torch = import_torch()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    built = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", built)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    nb = blas_info()
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": nb["numpy_build"] or (Path(nb["library"]).name if nb["library"] else None),
        "numpy_blas_config": nb["config"],
        "torch": torch.__version__,
        "torch_blas": blas.group(1) if blas else None,
        "torch_mkldnn": bool(torch.backends.mkldnn.is_available()),
        "torch_cpu_capability": capability,
    }


@dataclass
class _Contender:
    name: str
    train: Callable[[], None]
    infer: Callable[[], None]
    train_threads: Callable[[], None]  # set the thread count before its training calls
    eval_threads: Callable[[], None]
    train_runs: list[float] = field(default_factory=list)
    eval_runs: list[float] = field(default_factory=list)


def _torch_contender(cfg: Config, case: BenchCase, memory_format: str) -> tuple[_Contender, float]:
    """PyTorch's timed calls in `memory_format`, and how far its logits are from cnncli's before any step."""
    torch = import_torch()
    f = torch.nn.functional
    tnet = build_torch_net(cfg, case.model)
    set_format(tnet, memory_format)
    diff = logits_difference(case.model, tnet, case.x[:64], memory_format)
    opt = make_torch_optimizer(tnet, cfg.train.optimizer)
    x, y, xe = torch.from_numpy(case.x), torch.from_numpy(case.y.astype(np.int64)), torch.from_numpy(case.xe)
    net = tnet.net

    # Both engines get NCHW float32 arrays; the conversion to channels_last is part of PyTorch's call, as
    # cnncli's conversion to its own layout is part of its call.
    def train() -> None:
        net.train()
        opt.zero_grad(set_to_none=True)
        f.cross_entropy(net(to_format(x, memory_format)), y).backward()
        opt.step()

    def infer() -> None:
        net.eval()
        with torch.inference_mode():
            net(to_format(xe, memory_format))

    contender = _Contender(ENGINE_NAMES[memory_format], train, infer, lambda: torch.set_num_threads(case.threads),
                           lambda: torch.set_num_threads(case.eval_threads))
    return contender, diff


def _cpu_sample() -> tuple[float, float, float] | None:
    """(CPU seconds busy on the whole machine, of this process, wall clock) from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: busy is everything but idle and iowait
    values = [int(v) for v in fields[1:9]]
    busy = sum(values) - values[3] - values[4]
    own = os.times()
    return busy / tick, own.user + own.system, time.perf_counter()


def _other_cpus(a: tuple[float, float, float] | None, b: tuple[float, float, float] | None) -> float | None:
    """CPUs that other processes (and the hypervisor's steal) kept busy on average between two samples."""
    if a is None or b is None or b[2] <= a[2]:
        return None
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]))


def _timed(fn: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1000 * (time.perf_counter() - start) / calls


def run_against_torch(
    cfg: Config,
    config_name: str,
    batch: int | None = None,
    eval_batch: int | None = None,
    steps: int = 20,
    rounds: int = 5,
    warmup: int = 3,
    threads: int | None = None,
    reference: bool = False,
    seed: int = 0,
    retune: bool = False,
) -> TorchBenchResult:
    """Time cnncli, PyTorch NCHW and PyTorch channels_last on the same network, data and step.

    Each engine starts from cnncli's initial weights (seed `seed`) and its own optimizer state. After
    `warmup` calls each, every round times, for each engine in turn, `steps` training steps (batch `batch`,
    default train.batch_size), then for each engine ⌈steps/4⌉ inference passes (batch `eval_batch`, default
    train.eval_batch_size); the result is the median over `rounds` rounds of each round's mean time per call.
    PyTorch's thread count is cnncli's worker count for the same pass (restored afterwards).
    """
    torch = import_torch()
    batch = batch or cfg.train.batch_size
    eval_batch = eval_batch or cfg.train.eval_batch_size
    case = prepare_case(cfg, batch, eval_batch, threads=threads, reference=reference, seed=seed, retune=retune)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(case.eval_threads)
        contenders = [_Contender("cnncli", case.train_step, case.infer, lambda: None, lambda: None)]
        diffs = {}
        for fmt in FORMATS:
            contender, diffs[fmt] = _torch_contender(cfg, case, fmt)
            contenders.append(contender)
        for c in contenders:
            c.train_threads()
            for _ in range(warmup):
                c.train()
            c.eval_threads()
            for _ in range(warmup):
                c.infer()
        n_eval = eval_calls(steps)
        other: list[float | None] = []
        for _ in range(rounds):
            sample = _cpu_sample()
            for c in contenders:
                c.train_threads()
                c.train_runs.append(_timed(c.train, steps))
            for c in contenders:
                c.eval_threads()
                c.eval_runs.append(_timed(c.infer, n_eval))
            other.append(_other_cpus(sample, _cpu_sample()))
    finally:
        torch.set_num_threads(before)

    engines = []
    for c in contenders:
        train_ms, eval_ms = statistics.median(c.train_runs), statistics.median(c.eval_runs)
        engines.append(EngineTiming(c.name, train_ms, batch / (train_ms / 1000), eval_ms, eval_batch / (eval_ms / 1000),
                                    c.train_runs, c.eval_runs))
    ours, theirs = engines[0], engines[1:]
    best_train = max(theirs, key=lambda e: e.train_images_per_s)
    best_eval = max(theirs, key=lambda e: e.eval_images_per_s)
    # Also per round (the engines of one round share the machine's state; a busy spell then cancels out).
    per_round_train = [min(e.train_runs_ms[r] for e in theirs) / ours.train_runs_ms[r] for r in range(rounds)]
    per_round_eval = [min(e.eval_runs_ms[r] for e in theirs) / ours.eval_runs_ms[r] for r in range(rounds)]
    ratios = {
        "train": ours.train_images_per_s / best_train.train_images_per_s,
        "inference": ours.eval_images_per_s / best_eval.eval_images_per_s,
        "train_vs": best_train.name,
        "inference_vs": best_eval.name,
        "train_per_round": per_round_train,
        "inference_per_round": per_round_eval,
        "train_round_median": statistics.median(per_round_train),
        "inference_round_median": statistics.median(per_round_eval),
    }
    return TorchBenchResult(
        config=config_name,
        cnncli_engine="per-layer" if reference else "fused",
        batch=batch,
        eval_batch=eval_batch,
        steps=steps,
        rounds=rounds,
        warmup=warmup,
        threads=case.threads,
        eval_threads=case.eval_threads,
        engines=engines,
        ratios=ratios,
        logits_rel_diff=diffs,
        other_cpus_per_round=other,
        machine=machine_info(),
        tuning=case.tuning_dict(),
    )


# ---------------------------------------------------------------------------------- the training script


@dataclass
class TorchTrainResult:
    config: str
    memory_format: str
    threads: int
    n_train: int
    n_val: int
    n_test: int
    history: list[EpochMetrics]
    best_epoch: int
    test_loss: float | None
    test_acc: float | None
    seconds: float  # from loading the data to the end of the test
    torch: str
    tta: str = "none"  # test-time augmentation of test_loss, test_acc (train.tta)
    test_plain_loss: float | None = None  # without it, when tta is not none
    test_plain_acc: float | None = None
    params: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the trained weights, cnncli's names

    def to_dict(self) -> dict[str, Any]:
        """Every figure (not the weights)."""
        return {k: v for k, v in asdict(replace(self, params={})).items() if k != "params"}


def _evaluate(tnet: TorchNet, x: np.ndarray, y: np.ndarray, normalizer: Normalizer, batch_size: int,
              memory_format: str, tta: str = "none") -> tuple[float, float]:
    """x (N, C, H, W) uint8, y (N,) -> (mean cross-entropy, accuracy), in batches of `batch_size`; with
    test-time augmentation `tta` (cnncli/run/tta.py) those of the averaged logits, as `cnn eval` computes them."""
    torch = import_torch()
    tnet.net.eval()
    total, correct = 0.0, 0

    def logits(v: np.ndarray) -> np.ndarray:
        return tnet.net(to_format(torch.from_numpy(np.ascontiguousarray(v)), memory_format)).numpy()

    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            z = torch.from_numpy(tta_logits(logits, normalizer(x[start : start + batch_size]), tta))
            yb = torch.from_numpy(y[start : start + batch_size].astype(np.int64))
            total += float(torch.nn.functional.cross_entropy(z, yb, reduction="sum"))
            correct += int((z.argmax(dim=1) == yb).sum())
    n = max(len(x), 1)
    return total / n, correct / n


def train_torch(
    cfg: Config,
    data_folder: Path,
    memory_format: str = "contiguous",
    threads: int | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> TorchTrainResult:
    """Train `cfg`'s network in PyTorch with `cnn train`'s recipe, on the data set in `data_folder`.

    The same as `cnncli.run.train.train`: the split of `make_splits` and the normalization (`auto` resolved
    from the training split), cnncli's initial weights (seed cfg.seed) with a conv's `whiten` init set from the
    same images, the data order `default_rng([seed, epoch])`, the augmentation `augment(..., default_rng([seed,
    epoch, batch]))` with alternating flips, the run's length (train.steps, drop_last), the learning rate of
    `learning_rate` per step, label smoothing, train.param_groups (lr_scale, decay, frozen windows), weight decay
    as cnncli applies it (L2 or decoupled), the lookahead of weights and running statistics (cnncli's own
    `Lookahead`, on views of the PyTorch tensors), validation after each epoch, the test of the best epoch's
    weights (best validation accuracy; the last epoch without validation) with train.tta and, when that is
    not none, without. Not done: checkpoint files and the progress display. Threads: cnncli's worker count for
    a training batch, or `threads`.
    """
    from cnncli import data as data_mod

    torch = import_torch()
    f = torch.nn.functional
    t_start = time.perf_counter()
    tc = cfg.train
    check_schedule(tc.schedule)
    dataset = data_mod.load_dataset(cfg.data, data_folder)
    splits = data_mod.make_splits(
        dataset.train_x, dataset.train_y, val_size=cfg.data.val_size, limit=cfg.data.limit, seed=cfg.seed
    )
    cfg = replace(cfg, data=data_mod.resolve_normalization(cfg.data, splits.train_x))
    model = build_model(cfg.model, seed=cfg.seed)
    if model.input_shape != tuple(dataset.train_x.shape[1:]):
        raise ConfigError(f"model.input_shape: {list(model.input_shape)} does not match the images "
                          f"{list(dataset.train_x.shape[1:])} of {cfg.data.dataset}")
    if model.output_shape != (len(dataset.classes),):
        raise ConfigError(f"model.layers: the last layer gives {model.output_shape[0]} outputs but "
                          f"{cfg.data.dataset} has {len(dataset.classes)} classes")
    eng = engine_for(model)
    eng.threads = threads
    n_threads = eng.worker_count(tc.batch_size)
    normalizer = Normalizer(cfg.data.normalize, model.input_shape[0])
    initialise_from_data(model.layers, lambda a, b: normalizer(splits.train_x[a:b]))
    tnet = build_torch_net(cfg, model)
    set_format(tnet, memory_format)
    rules = paramgroups.resolve(list(tnet.params), model.decayed(), tc.param_groups)
    opt = make_torch_optimizer(tnet, tc.optimizer, rules)

    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        n_train = len(splits.train_x)
        steps, epochs, total_steps = run_length(tc, n_train)
        lookahead = Lookahead(tnet.live_arrays(model), tc.lookahead, total_steps) if tc.lookahead else None
        aug = cfg.data.augment
        history: list[EpochMetrics] = []
        best: dict[str, Any] | None = None
        best_acc: float | None = None
        best_epoch = 0
        step = 0
        for epoch in range(epochs):
            steps_now = min(steps, total_steps - epoch * steps)  # train.steps may end the last epoch early
            t_epoch = time.perf_counter()
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n_train)
            flips = alternating_flips(cfg.seed, epoch, n_train) if aug.flip and aug.flip_mode == "alternate" else None
            loss_sum, correct, seen = 0.0, 0, 0
            lr = learning_rate(tc.optimizer.lr, tc.schedule, step, steps, epochs, (), total_steps)
            set_trainable(tnet, rules.frozen_at(epoch))
            tnet.net.train()
            for b in range(steps_now):
                idx = order[b * tc.batch_size : (b + 1) * tc.batch_size]
                xb = augment(splits.train_x[idx], aug, np.random.default_rng([cfg.seed, epoch, b]),
                             None if flips is None else flips[idx])
                yb = torch.from_numpy(splits.train_y[idx].astype(np.int64))
                lr = learning_rate(tc.optimizer.lr, tc.schedule, step, steps, epochs, (), total_steps)
                set_learning_rate(opt, lr)
                opt.zero_grad(set_to_none=True)
                z = tnet.net(to_format(torch.from_numpy(normalizer(xb)), memory_format))
                loss = f.cross_entropy(z, yb, label_smoothing=tc.label_smoothing)
                loss.backward()
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingDiverged(f"the loss became {value} at epoch {epoch + 1}, batch {b + 1} "
                                           f"(learning rate {lr:.4g}); lower train.optimizer.lr")
                opt.step()
                step += 1
                if lookahead is not None:
                    lookahead.after_step(step)
                loss_sum += value * len(idx)
                correct += int((z.detach().argmax(dim=1) == yb).sum())
                seen += len(idx)
            train_seconds = time.perf_counter() - t_epoch
            val_loss = val_acc = None
            if len(splits.val_x):
                val_loss, val_acc = _evaluate(tnet, splits.val_x, splits.val_y, normalizer, tc.eval_batch_size,
                                              memory_format)
            metrics = EpochMetrics(epoch + 1, loss_sum / seen, correct / seen, val_loss, val_acc, lr,
                                   time.perf_counter() - t_epoch, seen / max(train_seconds, 1e-9))
            history.append(metrics)
            if val_acc is None or best_acc is None or val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch + 1
                best = {k: v.detach().clone() for k, v in tnet.net.state_dict().items()}
            if on_epoch is not None:
                on_epoch(metrics)
        test_loss = test_acc = plain_loss = plain_acc = None
        if len(dataset.test_x) and best is not None:
            tnet.net.load_state_dict(best)
            test_loss, test_acc = _evaluate(tnet, dataset.test_x, dataset.test_y, normalizer, tc.eval_batch_size,
                                            memory_format, tc.tta)
            if tc.tta != "none":
                plain_loss, plain_acc = _evaluate(tnet, dataset.test_x, dataset.test_y, normalizer,
                                                  tc.eval_batch_size, memory_format)
    finally:
        torch.set_num_threads(before)
    return TorchTrainResult(
        config=cfg.name,
        memory_format=memory_format,
        threads=n_threads,
        n_train=n_train,
        n_val=len(splits.val_x),
        n_test=len(dataset.test_x),
        history=history,
        best_epoch=best_epoch,
        test_loss=test_loss,
        test_acc=test_acc,
        seconds=time.perf_counter() - t_start,
        torch=torch.__version__,
        tta=tc.tta,
        test_plain_loss=plain_loss,
        test_plain_acc=plain_acc,
        params=tnet.numpy_params(),
    )

"""The fused execution engine: the same functions as the per-layer path of `cnncli/nn/layers.py`, several
times faster (see the notes below). `cnncli.engine.loss_and_grads(model, x, y)` and `predict(model, x)` run it;
`tests/engine/test_speed_equivalence.py` holds it to the per-layer reference.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from cnncli.host.blas import blas_threads, worker_threads
from cnncli.nn import contracts
from cnncli.nn.layer import Layer, Shape
from cnncli.nn.layers import BatchNorm, Conv2D, Flatten, Linear, MaxPool2D, ReLU
from cnncli.nn.layers_extra import GELU
from cnncli.nn.special import normal_cdf_and_density

# ==========================================================================================================
# The fused execution engine.
#
# The same network as the per-layer path, computed differently (`tests/engine/test_speed_equivalence.py` checks
# that loss, logits and every gradient agree to float32 rounding):
#
# * tensors are batch-minor inside: images (C, H, W, N), vectors (D, N), the example index last. Each conv
#   is then a few matrix products per micro-batch whose im2col copies are long contiguous runs (a row of
#   the output for every image at once), and a flatten is only a different view: (C·H·W, N);
# * conv → ReLU → max-pool is one stage. Max-pooling commutes with the per-channel bias and with the
#   monotone ReLU, max_{u,v} ReLU(S + b) = ReLU(max_{u,v} S + b), so the pool runs on S = W ⋆ X and the bias
#   and ReLU on the K_p² times smaller pooled map. With non-overlapping windows the im2col columns are
#   ordered by window offset, so the pool is a pairwise `np.maximum` of contiguous slices;
# * arg-max routing keeps MaxPool2D's rule (a tie goes to the first offset in row-major order), with boolean
#   masks. The engine compares S where MaxPool2D compares ReLU(S + b): exact ties stay ties and ReLU zeros
#   carry no gradient either way, so only near-ties that the rounding of S + b would merge can route apart,
#   as with any change in the order of a sum;
# * element-wise work runs on contiguous arrays, then one copy writes the next stage's input buffer (a
#   flatten is only a different view of it);
# * a conv's product runs in blocks of a few output rows (`_conv_blocks`): each block's im2col columns are
#   copied and multiplied while they are in the L2 cache. δX of a stride-1 conv is a correlation of the
#   zero-padded δS with the kernel rotated by 180° (docs/derivations.md#convolution), the same blocked
#   product, so no column-to-image additions. A conv with few input channels that a max-pool follows (the
#   first conv on RGB) multiplies each pool window's whole input patch by the kernel placed at every window
#   offset: one wider, deeper product instead of K_p² narrow ones, and fewer copies. In evaluation a
#   batch-norm right after a conv is folded into its weights;
# * a batch is cut into micro-batches (sizes measured per machine and network by `cnncli/engine/calibrate.py`; 32 to
#   train and 20 to infer without) shared by worker threads, BLAS limited to one thread meanwhile (NumPy
#   releases the GIL inside its kernels). Each micro-batch's gradients go to a slot of their own and the
#   slots are summed in order, so the result does not depend on the number of threads and is bit-identical
#   from run to run. Every buffer belongs to one worker and is reused from step to step.
# ==========================================================================================================

TRAIN_MICRO_BATCH = 32
EVAL_MICRO_BATCH = 20


# While `Engine.profile` runs (one thread): [seconds spent inside the engine's matrix products, their
# floating-point operations (2·m·k·n each)].
_MATMUL_CLOCK: list[float] | None = None


def _matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """np.matmul(a, b, out=out), timed and counted into _MATMUL_CLOCK when profiling."""
    clock = _MATMUL_CLOCK
    if clock is None:
        return np.matmul(a, b, out=out)
    t0 = time.perf_counter()
    r = np.matmul(a, b, out=out)
    clock[0] += time.perf_counter() - t0
    clock[1] += 2.0 * out.size * a.shape[-1]
    return r


_LOCK = threading.Lock()


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least `workers` threads (the calling thread is one more worker)."""
    global _POOL, _POOL_SIZE
    with _LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            if _POOL is not None:
                _POOL.shutdown(wait=True)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnncli-engine")
            _POOL_SIZE = workers
        return _POOL


def _layout(shape: Shape, n: int) -> tuple[int, ...]:
    """The engine's array shape for n examples of `shape`: batch-minor, (*shape, N)."""
    return (*shape, n)


def _as(a: np.ndarray, n: int, shape: Shape) -> np.ndarray:
    """An array in the engine's layout seen as n examples of `shape`, (*shape, N): `a` itself when it has that
    shape, else a view of it (a flatten between stages; `a` is then contiguous).

    Flatten's C order, k = c·H·W + i·W + j (docs/derivations.md#flatten), makes (C, H, W, N) and (C·H·W, N) the
    same memory, so a conv stage writes straight into the next linear layer's input and reads δh from its
    gradient."""
    want = _layout(shape, n)
    if a.shape == want:
        return a
    assert a.flags.c_contiguous, "a flatten's view needs a contiguous buffer"
    return a.reshape(want)


def _rows(a: np.ndarray, n: int, shape: Shape) -> np.ndarray:
    """Rows (N, F) (the logits, δz) seen in the engine's layout (*shape, N): a transposed view, never a copy."""
    v = a.T.reshape(_layout(shape, n))
    assert np.shares_memory(v, a)
    return v


def _pool_windows(a: np.ndarray, k: int, s: int, ho: int, wo: int) -> list[np.ndarray]:
    """The K² strided views a[:, s·p + u, s·q + v, :], offsets (u, v) in row-major order; a (C, H, W, N) ->
    each (C, H', W', N)."""
    return [a[:, u : u + s * (ho - 1) + 1 : s, v : v + s * (wo - 1) + 1 : s] for u in range(k) for v in range(k)]


def _pool_forward(windows: list[np.ndarray], out: np.ndarray, masks: np.ndarray | None) -> None:
    """out = the element-wise max of the windows, pairwise (docs/derivations.md#max-pooling);
    masks[q] = 1(window q = max) for q < Q − 1 (the backward pass routes to the first of them that holds)."""
    if len(windows) == 1:
        np.copyto(out, windows[0])
    else:
        np.maximum(windows[0], windows[1], out=out)
        for w in windows[2:]:
            np.maximum(out, w, out=out)
    if masks is not None:
        for q in range(len(windows) - 1):
            np.equal(windows[q], out, out=masks[q])


def _route_to_argmax(delta: np.ndarray, masks: np.ndarray, dwin: list[np.ndarray], overlap: bool,
                     peel: np.ndarray | None) -> None:
    """δ of each window to its first arg-max (docs/derivations.md#max-pooling), ties to the first offset as MaxPool2D.

    Offset q takes δ where masks[q] holds and no earlier offset took it: take = δ · masks[q], δ −= take
    (exact: δ − δ = 0); the last offset gets what is left. Disjoint windows write their slot (`dwin[q]`,
    `delta` is already the last one); overlapping windows add into a zeroed δA through `peel`.
    """
    for q in range(len(dwin) - 1):
        take = peel if overlap else dwin[q]
        np.multiply(delta, masks[q], out=take)
        if overlap:
            dwin[q] += take
        np.subtract(delta, take, out=delta)
    if overlap:
        dwin[-1] += delta


# The fused GELU works through its arrays this many elements at a time, so that Φ's dozen element-wise passes
# run on blocks that stay in the cache instead of streaming whole activations through memory (measured here, one
# thread: 11.8 M values in 35–38 ms in slabs of 32–128 K, 78 ms whole).
GELU_BLOCK = 1 << 16


def _slabs(shape: Shape, limit: int) -> list[tuple[int | slice, ...]]:
    """Index tuples covering an array of `shape` ((C, H, W, N) or (D, N)) in slabs of about `limit` elements
    or fewer, each a plain strided view even of a padded array: several whole channels when a channel is
    smaller than `limit` (small inference micro-batches: one call per channel would cost more than the
    arithmetic), else a few whole rows [c, h] of one channel; for (D, N) a few rows [d]."""
    if len(shape) == 2:
        step = max(1, limit // max(shape[1], 1))
        return [(slice(d, d + step),) for d in range(0, shape[0], step)]
    channel = int(np.prod(shape[1:]))
    if channel <= limit:
        step = limit // max(channel, 1)
        return [(slice(c, c + step),) for c in range(0, shape[0], step)]
    row = int(np.prod(shape[2:]))
    step = max(1, limit // max(row, 1))
    return [(c, slice(h, h + step)) for c in range(shape[0]) for h in range(0, shape[1], step)]


def _gelu(x: np.ndarray, out: np.ndarray, deriv: np.ndarray | None) -> None:
    """out = x·Φ(x), docs/derivations.md#gelu, and when training deriv = Φ(x) + x·φ(x), the factor the backward
    multiplies δout by (one array kept instead of x, Φ and φ). x, out (which may be x, or a strided view such
    as the inside of the next conv's padded input) and deriv (contiguous) have one shape; computed in
    `GELU_BLOCK`-sized slabs by `normal_cdf_and_density`, the per-layer GELU's own arithmetic."""
    for at in _slabs(x.shape, GELU_BLOCK):
        xs = x[at]
        cdf, pdf = normal_cdf_and_density(xs)
        if deriv is not None:
            d = deriv[at]
            np.multiply(xs, pdf, out=d)
            d += cdf
        np.multiply(xs, cdf, out=out[at])


@dataclass(eq=False, slots=True)
class _Block:
    """One block of a convolution product, a few consecutive output rows of every image of the micro-batch:
    im2col copies `src` (a strided view of the padded input) into `cols`, then each (columns, output) pair is
    one product `W_mat @ columns -> output`, 2-D views into `cols` and S whose row strides BLAS takes as they
    are."""

    src: np.ndarray
    cols: np.ndarray
    products: list[tuple[np.ndarray, np.ndarray]]
    grads: list[np.ndarray]  # training: the δS part of each product's output, for δW (else empty)


@dataclass(eq=False, slots=True)
class _Buffers:
    """One stage's arrays for one worker and one micro-batch size N (None: not used by this stage or mode).

    `inp` is where the previous stage writes this stage's input; `out` is the next stage's `inp` (or rows
    of the logits), in this stage's output layout. Images are batch-minor (C, H, W, N) throughout.
    """

    inp: np.ndarray
    out: np.ndarray | None = None
    # linear
    x: np.ndarray | None = None  # h (N, in), the same array as inp
    # element-wise and backward scratch, shared by several stages
    relu_mask: np.ndarray | None = None  # 1(out > 0)
    gelu_d: np.ndarray | None = None  # a fused GELU's Φ(x) + x·φ(x), its input's derivative factor (out's shape)
    delta: np.ndarray | None = None  # δ after the ReLU mask, before pooling / the product
    dx: np.ndarray | None = None  # δ of the stage's input, in its layout
    # max-pool
    windows: list[np.ndarray] | None = None  # the K² window views of the pooled map
    masks: np.ndarray | None = None  # (K² − 1, C, H', W', N) bool: window q holds the max
    dwin: list[np.ndarray] | None = None  # the K² window views of the δ being routed into
    peel: np.ndarray | None = None  # scratch for overlapping windows
    # convolution
    xp: np.ndarray | None = None  # zero-padded input (C, H + 2p, W + 2p, N); inp is its inside
    s2: np.ndarray | None = None  # S = W @ cols (C_out, M)
    post: np.ndarray | None = None  # pooled S, then + b (the ReLU writes `out` from it) (C_out, H_p, W_p, N)
    ds2: np.ndarray | None = None  # δS (C_out, M)
    blocks: list[_Block] | None = None  # the forward product, a few output rows at a time (`_conv_blocks`)
    s_windows: list[np.ndarray] | None = None  # the pool windows over S (`windows` pools y with batch-norm)
    ds_pad: np.ndarray | None = None  # δS with K − 1 − p rows and columns of zeros around, (C_out, H'+…, W'+…, N)
    dx_blocks: list[_Block] | None = None  # δX as a correlation of ds_pad with the rotated kernel, in blocks
    dcols2: np.ndarray | None = None  # Wᵀ @ δS in column order (C·K·K, M)
    dw_tmp: np.ndarray | None = None  # δW (δW_pat) or δWᵀ summed over the blocks, and one block's share
    dw_wide: np.ndarray | None = None  # δ of W_pat (C_out·Q, C·R·R) or of [W_mat | b] (C_out, C·K·K + 1)
    dcols: np.ndarray | None = None  # the same in the columns' shape
    dxp: np.ndarray | None = None  # δ of the padded input (C, H + 2p, W + 2p, N)
    # batch-norm
    y: np.ndarray | None = None  # a conv stage's batch-normalised S (then ReLU), (C_out, M), columns as S
    dy: np.ndarray | None = None  # δ of y (C_out, M)
    ds_windows: list[np.ndarray] | None = None  # the window views of δS (a conv stage with batch-norm)
    xc: np.ndarray | None = None  # x − μ, contiguous, the input's layout (x̂ is xc · inv_std)
    xc_windows: list[np.ndarray] | None = None  # the pool windows over xc (a conv stage with batch-norm)
    inv_std: np.ndarray | None = None  # 1/√(σ² + ε) of this pass (C,), float64
    reduce: Callable[[np.ndarray], np.ndarray] | None = None  # Σ over the workers' partials (float64)
    worker: int = 0  # which worker owns these buffers
    # generic layer
    layer: Layer | None = None  # this worker's own copy of the layer (its caches are its own)
    staging: np.ndarray | None = None  # the first stage's: the micro-batch's rows before the transposing copy


# A conv block's im2col columns, about this many bytes, stay in the L2 cache between their copy and their
# product (these machines: 512 KiB per core); at least one output row, at most this many output columns.
CONV_BLOCK_BYTES = 2 << 20
CONV_BLOCK_COLUMNS = 8192
# ... but each product gets at least this many columns (narrower ones run far below BLAS's peak), and
# products with fewer rows than CONV_BLOCK_MIN_ROWS are not blocked at all: they run fastest whole.
CONV_MIN_COLUMNS = 1024
CONV_BLOCK_MIN_ROWS = 64
# A conv whose columns have fewer rows than this (C·K·K; the first conv on RGB: 27) and whose output windows
# tile a max-pool runs one product per pool window (`_ConvStage._patch_weights`): measured here, a
# 64 × 48 product ran at 46 GFLOP/s where the 16 × 27 one ran at 27, so the 16/9 more multiply-adds (zeros)
# cost no time, and the copies gather 48 rows per pooled pixel instead of 4 · 27 = 108.
CONV_PATCH_ROWS = 64
CONV_BLOCK_ROWS = 0  # > 0: this many output rows per block whatever the rules above say (tests, experiments)


def _block_rows(n: int, rows: int, row_bytes: int, columns: int, product_columns: int) -> int:
    """Output rows per block of a convolution product with `rows` matrix rows over n output rows: one output
    row's columns (every image) take `row_bytes` bytes in `columns` columns, `product_columns` of them in
    each of the block's products."""
    if CONV_BLOCK_ROWS > 0:
        return min(n, CONV_BLOCK_ROWS)
    if rows < CONV_BLOCK_MIN_ROWS:
        return n
    g = min(CONV_BLOCK_BYTES // max(row_bytes, 1), CONV_BLOCK_COLUMNS // max(columns, 1))
    return max(1, min(n, max(g, -(-CONV_MIN_COLUMNS // max(product_columns, 1)))))


def _conv_blocks(src: np.ndarray, out: np.ndarray, axis: int, dtype: np.dtype,
                 grad: np.ndarray | None = None, ones: bool = False) -> list[_Block]:
    """The blocks of one convolution product W_mat @ cols -> out (C_out, Q·H'·W'·N), a few output rows at a time.

    `src` (C, K, K, *window offsets, H', *rest): the strided view im2col copies, its output-row axis at `axis`;
    `out`'s columns run (window offset, row, rest), as S's. The rest, (W', N), is one contiguous run of the
    source for each (c, u, v, offset, row): the copies are long. Blocks of one size share one buffer of
    columns: no column matrix of the whole micro-batch is kept (`_weight_grad` copies them again). `grad`
    (out's shape, δS) gives each product its part of δS for δW. `ones`: every block's columns get one more
    row, all ones, after the C·K·K copied ones (the bias as a column of the weights: `_ConvStage._bias_row`).
    """
    n = src.shape[axis]
    copied = int(np.prod(src.shape[:3]))
    rows = copied + ones
    offsets = int(np.prod(src.shape[3:axis]))
    per = int(np.prod(src.shape[axis + 1 :]))
    g = _block_rows(n, rows, rows * offsets * per * np.dtype(dtype).itemsize, offsets * per, per)
    c_out = out.shape[0]
    out3 = out.reshape(c_out, offsets, -1)
    spare: dict[int, np.ndarray] = {}
    blocks = []
    for a in range(0, n, g):
        b = min(a + g, n)
        idx = (slice(None),) * axis + (slice(a, b),)
        if b - a not in spare:
            spare[b - a] = np.empty((rows, offsets * (b - a) * per), dtype=dtype)
            spare[b - a][copied:] = 1
        dst = spare[b - a][:copied].reshape(src.shape[:axis] + (b - a,) + src.shape[axis + 1 :])
        c3 = spare[b - a].reshape(rows, offsets, (b - a) * per)
        if b - a == n:  # one block: the whole product at once (its columns are contiguous)
            products = [(c3.reshape(rows, -1), out)]
            grads = [grad] if grad is not None else []
        else:
            products = [(c3[:, o], out3[:, o, a * per : b * per]) for o in range(offsets)]
            g3 = grad.reshape(c_out, offsets, -1) if grad is not None else None
            grads = [g3[:, o, a * per : b * per] for o in range(offsets)] if g3 is not None else []
        blocks.append(_Block(src[idx], dst, products, grads))
    return blocks


def _weight_grad(blocks: list[_Block], gw2: np.ndarray, tmp: np.ndarray) -> None:
    """gw2 = Σ over the blocks' products of δS_part @ columnsᵀ (docs/derivations.md#convolution: δW = δS colsᵀ,
    its sum over columns cut into the blocks' ranges). Last block first: its columns are still in their
    buffer from the forward pass; every other block's are copied again (a cache-sized copy instead of a
    column matrix of the whole micro-batch written out and read back).

    `tmp` (2, *gw2.shape): the sum and one block's share. Or (2, *gw2.shape[::-1]): each product computed
    transposed, δWᵀ_part = columns @ δS_partᵀ, and the sum transposed into gw2 once at the end. BLAS runs
    that form of the same product 1.2–1.6× faster here when the columns have over a hundred rows
    (32 × 3072 × 145: 59 against 37 GFLOP/s; 64 × 1024 × 577: 75 against 61), slightly slower on the
    patch products (64 × 4096 × 48: 36 against 38): `_ConvStage.buffers` chooses."""
    acc, part = tmp[0], tmp[1]
    flip = acc.shape != gw2.shape
    first = True
    for i, blk in enumerate(reversed(blocks)):
        if i:
            np.copyto(blk.cols, blk.src)
        for (cols, _), ds in zip(blk.products, blk.grads, strict=True):
            a, b = (cols, ds.T) if flip else (ds, cols.T)
            if first:
                _matmul(a, b, out=acc)
                first = False
            else:
                _matmul(a, b, out=part)
                acc += part
    np.copyto(gw2, acc.T if flip else acc)


def _convolve(blocks: list[_Block], w2: np.ndarray) -> None:
    """out = w2 @ cols, block by block: im2col of the block, then its products while the columns are in cache."""
    for blk in blocks:
        np.copyto(blk.cols, blk.src)
        for cols, out in blk.products:
            _matmul(w2, cols, out=out)


class _Stage:
    """A fused run of layers: `_ConvStage`, `_PoolStage`, `_LinearStage` or `_ReluStage`."""

    layers: tuple[Layer, ...]
    in_shape: Shape
    out_shape: Shape
    relu: bool = False
    gelu: bool = False  # the stage ends in a GELU (conv and batch-norm stages; never with relu)
    need_dx: bool = True  # False when no earlier stage has parameters

    @property
    def label(self) -> str:
        names = [layer.name or layer.kind for layer in self.layers]
        return " → ".join(names)

    @property
    def param_layer(self) -> Layer | None:
        return None

    @property
    def param_layers(self) -> tuple[Layer, ...]:
        """The layers whose gradients this stage computes (their keys are distinct: one flat grads dict)."""
        return (self.param_layer,) if self.param_layer is not None else ()

    def grads_of(self, slot: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """This stage's gradient arrays in a slot, keyed as the layers' params."""
        return {k: v for layer in self.param_layers for k, v in slot[layer.name].items()}

    def buffers(self, n: int, dtype: np.dtype, train: bool) -> _Buffers:
        raise NotImplementedError

    def forward(self, buf: _Buffers, train: bool) -> None:
        raise NotImplementedError

    def backward(self, buf: _Buffers, dout: np.ndarray, grads: dict[str, np.ndarray]) -> np.ndarray | None:
        """δout (this stage's output layout) -> δ of its input (its input layout), or None when not needed;
        writes the parameter gradients of this micro-batch into `grads`."""
        raise NotImplementedError

    def _activate(self, pre: np.ndarray, out: np.ndarray, buf: _Buffers, train: bool) -> None:
        """out = the stage's activation of `pre`, its last pre-activation array: ReLU, GELU (keeping its
        derivative factor when training) or none."""
        if self.relu:
            np.maximum(pre, 0, out=out)
        elif self.gelu:
            _gelu(pre, out, buf.gelu_d if train else None)
        else:
            np.copyto(out, pre)

    def _relu_grad(self, buf: _Buffers, dout: np.ndarray, into: np.ndarray) -> None:
        """into = δout · 1(out > 0), docs/derivations.md#relu (out > 0 exactly where the ReLU's input is);
        δout · (Φ + x·φ) after a GELU (docs/derivations.md#gelu); or δout."""
        if self.gelu:
            assert buf.gelu_d is not None
            np.multiply(dout, buf.gelu_d, out=into)
        elif self.relu:
            np.greater(buf.out, 0, out=buf.relu_mask)
            np.multiply(dout, buf.relu_mask, out=into)
        else:
            np.copyto(into, dout)


class _ConvStage(_Stage):
    """Conv2D, optionally with ReLU and one MaxPool2D after it (either order), as one stage; or Conv2D,
    BatchNorm, then ReLUs and one MaxPool2D (either order: max-pooling commutes with the monotone ReLU).

    Forward (docs/derivations.md#convolution, #max-pooling): S = W (C_out, C·K·K) @ cols (C·K·K, M), one
    product over the micro-batch's im2col columns; with a pool P = max over each window of S, then
    out = ReLU(P + b); without, ReLU(S + b). Backward (#relu, #max-pooling, #convolution):
    δ = δout · 1(out > 0), δb = Σ δ, δS = δ routed to each window's first arg-max, δW = δS @ colsᵀ,
    δX = δS padded by K − 1 − p, correlated with the rotated kernel (stride 1, p ≤ K − 1), else the kernel
    offsets of δcols = Wᵀ @ δS added back onto the padded input.

    Column order: with non-overlapping pool windows (pool stride ≥ pool kernel) the columns run
    (a, b, p, q, n) for conv output pixel (s_p·p + a, s_p·q + b): window offset (a, b) is one contiguous slice
    of S, and pixels no window covers are never computed. Otherwise (i, j, n), the pool reading strided views.
    Every element-wise step works on contiguous arrays; the result is copied once into the next stage's input.

    With a batch-norm (docs/derivations.md#batch-normalisation; arithmetic in `_BatchNormCore`): its
    statistics are over every pixel of S, so the pool cannot run first (and γ may be negative): S (+ b) →
    y = BN(S) → ReLU → pool, all on S's columns; the columns are ordered by window offset only when the pool
    windows tile S exactly. Backward: δ routed to each window's arg-max of y, times 1(y > 0), through the
    batch-norm into δS, then δW and δX as above.
    """

    def __init__(self, conv: Conv2D, pool: MaxPool2D | None, relu: bool, layers: tuple[Layer, ...],
                 in_shape: Shape, bn: BatchNorm | None = None, gelu: bool = False) -> None:
        self.conv, self.pool, self.relu, self.layers, self.in_shape = conv, pool, relu, layers, in_shape
        self.gelu = gelu
        _, self.ho, self.wo = conv.output_shape(in_shape)
        self.blocked = pool is not None and pool.stride >= pool.kernel_size
        self.bn = bn
        self.core = _BatchNormCore(bn, (conv.out_channels, self.ho, self.wo)) if bn is not None else None
        if bn is not None and pool is not None:  # every pixel of S counts in the statistics
            kp = pool.kernel_size
            self.blocked = pool.stride == kp and self.ho % kp == 0 and self.wo % kp == 0
        # Without a pool or batch-norm after it, the bias joins the product as one more column of W against a
        # row of ones (`_bias_row`): S + b comes out of the product, δb out of δW's, two passes fewer.
        self.bias_row = pool is None and bn is None and conv.params.get("b") is not None
        # A conv with few columns rows (the first conv on RGB: 27) whose windows tile a pool: one product per
        # pool window, from (K_p + K − 1)² patches (`_patch_weights`): fewer column copies, a fuller product.
        k = conv.kernel_size
        self.patch = (self.blocked and conv.stride == 1 and conv.padding <= k - 1
                      and in_shape[0] * k * k < CONV_PATCH_ROWS)
        if self.patch:
            assert pool is not None
            kp, r = pool.kernel_size, pool.kernel_size + k - 1
            # W_pat seen as (C_out, K_p, K_p, C, R, R); W sits at these places, one per window offset (a, b)
            self.patch_shape = (conv.out_channels, kp, kp, in_shape[0], r, r)
            self.patch_at = [(slice(None), a, b, slice(None), slice(a, a + k), slice(b, b + k))
                             for a in range(kp) for b in range(kp)]
        conv_out = (conv.out_channels, self.ho, self.wo)
        self.out_shape = pool.output_shape(conv_out) if pool is not None else conv_out

    @property
    def param_layer(self) -> Layer:
        return self.conv

    @property
    def param_layers(self) -> tuple[Layer, ...]:
        return (self.conv,) if self.bn is None else (self.conv, self.bn)

    def buffers(self, n: int, dtype: np.dtype, train: bool) -> _Buffers:
        buf = self._conv_buffers(n, dtype, train)
        if self.bn is None:
            return buf
        c_out, ph, pw = self.out_shape
        assert buf.s2 is not None
        buf.y = np.empty_like(buf.s2)
        buf.windows = self._windows(buf.y, n)  # training: pool y; evaluation: the folded S (s_windows)
        if train:
            buf.xc, buf.dy = np.empty_like(buf.s2), np.empty_like(buf.s2)
            buf.xc_windows = self._windows(buf.xc, n) if self.pool is not None else None
            if self.pool is None:  # with a pool, the ReLU's mask is the pooled map's (`_backward_bn`)
                buf.relu_mask = np.empty(buf.s2.shape, dtype=bool) if self.relu else None
            buf.dwin = self._windows(buf.dy, n)
            buf.ds_windows = self._windows(buf.ds2, n)
            if self.pool is not None and not self.blocked:
                buf.delta = np.empty((c_out, ph, pw, n), dtype=dtype)
                buf.peel = np.empty_like(buf.delta)
        return buf

    def _conv_buffers(self, n: int, dtype: np.dtype, train: bool) -> _Buffers:
        conv, pool = self.conv, self.pool
        c, h, w = self.in_shape
        k, s, p = conv.kernel_size, conv.stride, conv.padding
        c_out, ph, pw = self.out_shape
        hp, wp = h + 2 * p, w + 2 * p
        xp = np.zeros((c, hp, wp, n), dtype=dtype)  # the zero border is the padding; only the inside is written
        sc, sh, sw, sn = xp.strides
        qp = pool.kernel_size**2 if self.patch else 1  # window offsets per pool window
        if self.patch:
            assert pool is not None
            r, sp = self.patch_shape[-1], pool.stride
            # cols[c', r, t, i, j, n] = Xpad[c', s_p·i + r, s_p·j + t, n]: each pool window's whole input patch
            shape, strides = (c, r, r, ph, pw, n), (sc, sh, sw, sp * sh, sp * sw, sn)
        elif self.blocked:
            assert pool is not None
            kp, sp = pool.kernel_size, pool.stride
            shape: Shape = (c, k, k, kp, kp, ph, pw, n)
            strides: Shape = (sc, sh, sw, s * sh, s * sw, s * sp * sh, s * sp * sw, sn)
        else:
            shape, strides = (c, k, k, self.ho, self.wo, n), (sc, sh, sw, s * sh, s * sw, sn)
        # cols[c', u, v, (a, b,) i, j, n] = Xpad[c', s·i + u, s·j + v, n]: a read-only strided view
        src = as_strided(xp, shape, strides, writeable=False)
        m = int(np.prod(shape[3:])) * qp
        s2 = np.empty((c_out, m), dtype=dtype)  # S (C_out, M); with patches (C_out·Q, M/Q) is the product's
        ds2 = np.empty_like(s2) if train else None  # δS (C_out, M), columns as S
        buf = _Buffers(
            xp=xp,
            inp=xp[:, p : p + h, p : p + w],  # (C, H, W, N)
            s2=s2,
            ds2=ds2,
            blocks=_conv_blocks(src, s2.reshape(c_out * qp, -1), len(shape) - 3, dtype,
                                ds2.reshape(c_out * qp, -1) if ds2 is not None else None, ones=self.bias_row),
            windows=self._windows(s2, n),
            # contiguous (C_out, H', W', N): P (or S), then + b; ReLU(post) is written to `out`
            post=np.empty((c_out, ph, pw, n), dtype=dtype) if pool is not None else s2.reshape(c_out, ph, pw, n),
        )
        buf.s_windows = buf.windows
        if not train:
            return buf
        nq = len(buf.windows)
        buf.masks = np.empty((max(nq - 1, 0), c_out, ph, pw, n), dtype=bool)
        buf.relu_mask = np.empty((c_out, ph, pw, n), dtype=bool)
        buf.gelu_d = np.empty((c_out, ph, pw, n), dtype=dtype) if self.gelu else None
        rows = int(np.prod(shape[:3])) + self.bias_row  # C·K·K (patches: C·R·R), [+ the row of ones]
        if self.patch or self.bias_row:  # δ of _patch_weights, or of [W_mat | b]
            buf.dw_wide = np.empty((c_out * qp, rows), dtype=dtype)
        buf.dw_tmp = np.empty((2, c_out * qp, rows) if self.patch else (2, rows, c_out * qp), dtype=dtype)
        buf.dwin = buf.ds_windows = self._windows(buf.ds2, n)
        buf.peel = None
        if pool is None:
            buf.delta = buf.ds2.reshape(c_out, ph, pw, n)
        elif self.blocked:
            buf.delta = buf.dwin[-1]  # δ lands in the last offset's slot; route_to_argmax peels the rest off it
        else:
            buf.delta = np.empty((c_out, ph, pw, n), dtype=dtype)
            buf.peel = np.empty_like(buf.delta)
        if self.need_dx and s == 1 and p <= k - 1:
            # δX as a correlation (docs/derivations.md#convolution, "In the engine"): δS with q = K − 1 − p
            # rows and columns of zeros around it, correlated with the rotated kernel like a forward pass.
            # Its columns [c, u, v, x, (y, n)] = δS~[c, x + u, y + v, n]: one contiguous run of W·N per row.
            q = k - 1 - p
            buf.ds_pad = np.zeros((c_out, self.ho + 2 * q, self.wo + 2 * q, n), dtype=dtype)
            buf.dx = np.empty((c, h, w, n), dtype=dtype)
            qc, qh, qw, qn = buf.ds_pad.strides
            src_dx = as_strided(buf.ds_pad, (c_out, k, k, h, w * n), (qc, qh, qw, qh, qn), writeable=False)
            buf.dx_blocks = _conv_blocks(src_dx, buf.dx.reshape(c, -1), 3, dtype)
        elif self.need_dx:
            buf.dcols2 = np.empty((c * k * k, s2.shape[1]), dtype=dtype)
            buf.dcols = buf.dcols2.reshape(shape)
            buf.dxp = np.empty_like(xp)
            buf.dx = buf.dxp[:, p : p + h, p : p + w]
        return buf

    def _windows(self, s2: np.ndarray, n: int) -> list[np.ndarray]:
        """The pool windows over S (C_out, M), each (C_out, H_p, W_p, N); [] without a pool."""
        c_out, ph, pw = self.out_shape
        if self.pool is None:
            return []
        if self.blocked:
            q = self.pool.kernel_size**2
            s3 = s2.reshape(c_out, q, -1)  # (C_out, Q, N·H_p·W_p)
            return [s3[:, i].reshape(c_out, ph, pw, n) for i in range(q)]
        s4 = s2.reshape(c_out, self.ho, self.wo, n)
        return _pool_windows(s4, self.pool.kernel_size, self.pool.stride, ph, pw)

    def forward(self, buf: _Buffers, train: bool) -> None:
        w, b = self.conv.params["W"], self.conv.params.get("b")
        w2 = w.reshape(w.shape[0], -1)  # (C_out, C·K·K)
        if self.bn is not None and not train and not self.bn.training:
            w2, b = self._folded(w2, b)
        elif self.core is not None:
            _convolve(buf.blocks, self._patch_weights(w2))  # S = W_mat @ cols
            self._forward_bn(buf, b, train)
            return
        if self.bias_row:  # S + b = [W_mat | b] @ [cols; 1]
            assert b is not None
            _convolve(buf.blocks, np.concatenate([w2, b[:, None]], axis=1))
            b = None
        else:
            _convolve(buf.blocks, self._patch_weights(w2))  # S = W_mat @ cols (or the folded y)
        if self.pool is not None:
            _pool_forward(buf.s_windows, buf.post, buf.masks if train else None)
        post = buf.post
        if b is not None:
            post += b[:, None, None, None]
        # the activation writes the next stage's input; post keeps P + b (the ReLU backward's mask: > 0)
        self._activate(post, buf.out, buf, train)

    def _patch_weights(self, w2: np.ndarray) -> np.ndarray:
        """W_mat (C_out, C·K·K), or with patches W_pat (C_out·Q, C·R·R), R = K_p + K − 1: row (c, a, b) holds
        W[c] placed at offset (a, b) of an R × R patch, zeros elsewhere, so that W_pat @ patch columns gives S
        at pixel (s_p·i + a, s_p·j + b) for every window offset (a, b) of the pool, in S's column order
        (docs/derivations.md#convolution, "In the engine")."""
        if not self.patch:
            return w2
        wp = np.zeros(self.patch_shape, dtype=w2.dtype)
        w4 = w2.reshape(self.conv.params["W"].shape)
        for at in self.patch_at:
            wp[at] = w4
        c_out, kp, _, c, r, _ = self.patch_shape
        return wp.reshape(c_out * kp * kp, c * r * r)

    def _fold_patch(self, dwp: np.ndarray, gw: np.ndarray) -> None:
        """δW from the patch weights' gradient: δW[c, c', u, v] = Σ_{a,b} δW_pat[(c, a, b), (c', a + u, b + v)]
        (the entries of W_pat that hold W[c, c', u, v]); the zeros' gradients are dropped."""
        d6 = dwp.reshape(self.patch_shape)
        np.copyto(gw, d6[self.patch_at[0]])
        for at in self.patch_at[1:]:
            gw += d6[at]

    def _folded(self, w2: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation-mode batch-norm folded into the convolution: y = a·(W_mat @ cols + b − mean) + β with
        a = γ/√(var + ε) is (a·W_mat) @ cols + (β + a·(b − mean)), running statistics; then the stage is a
        plain conv → ReLU → pool (docs/derivations.md#convolution, "In the engine")."""
        bn = self.bn
        assert bn is not None
        a = bn.gamma().astype(np.float64) / np.sqrt(bn.buffers["running_var"].astype(np.float64) + bn.eps)
        shift = bn.params["beta"] - bn.buffers["running_mean"] * a + (b * a if b is not None else 0.0)
        return (w2 * a[:, None]).astype(w2.dtype), shift.astype(w2.dtype)

    def _forward_bn(self, buf: _Buffers, b: np.ndarray | None, train: bool) -> None:
        """S (+ b) -> y = γ·x̂ + β -> pool -> ReLU -> the next stage's input. The ReLU runs on the pooled map
        (max-pooling commutes with the monotone ReLU): a K_p² times smaller pass, written straight to `out`."""
        assert self.core is not None and buf.y is not None and buf.out is not None
        if b is not None:
            buf.s2 += b[:, None]
        src, a, c = self.core.affine(buf.s2, buf, train)
        y = buf.y.reshape(buf.out.shape) if self.pool is None else buf.post
        if self.pool is not None and buf.xc_windows is not None and bool(np.all(a > 0)):
            # y = src·a + c rises with src in every channel (a > 0; rounding is monotone too), so the max of y
            # over a window is the max of src put through the affine map: pool src, then map the K_p² times
            # smaller pooled array; y itself is never written. (a ≤ 0 somewhere: y first, as below.)
            _pool_forward(buf.xc_windows, buf.post, buf.masks if train else None)
            self.core.apply(buf.post, a, c, buf.post)
        else:
            self.core.apply(src, a, c, buf.y)
            if self.pool is not None:
                _pool_forward(buf.windows, buf.post, buf.masks if train else None)
        self._activate(y, buf.out, buf, train)

    def _backward_bn(self, buf: _Buffers, dout: np.ndarray, grads: dict[str, np.ndarray]) -> None:
        """δout -> δy (times 1(y > 0), routed to the pool's arg-max) -> δS (buf.ds2) through the batch-norm.

        With a pool the ReLU's mask is taken on the pooled map P: a window's arg-max holds y = P, so
        1(y > 0) there is 1(P > 0), and every other pixel gets no δ at all."""
        assert self.core is not None and buf.dy is not None and buf.y is not None
        dy = buf.dy
        if self.pool is None:
            if self.gelu:
                assert buf.gelu_d is not None
                np.multiply(dout, buf.gelu_d, out=dy.reshape(dout.shape))
            elif self.relu:
                np.greater(buf.y, 0, out=buf.relu_mask)  # 1(y > 0)
                np.multiply(dout, buf.relu_mask.reshape(dout.shape), out=dy.reshape(dout.shape))
            else:
                np.copyto(dy.reshape(dout.shape), dout)
        else:
            into = buf.dwin[-1] if self.blocked else buf.delta  # blocked: routed from the last offset's slot
            if self.gelu:
                assert buf.gelu_d is not None
                np.multiply(dout, buf.gelu_d, out=into)
            elif self.relu:
                np.greater(buf.post, 0, out=buf.relu_mask)  # 1(P > 0), P = the pooled y before the ReLU
                np.multiply(dout, buf.relu_mask, out=into)
            else:
                np.copyto(into, dout)
            if not self.blocked:
                dy.fill(0)
            _route_to_argmax(into, buf.masks, buf.dwin, not self.blocked, buf.peel)
        self.core.backward(dy, buf.ds2, buf, grads)
        if "b" in grads:
            np.sum(buf.ds2, axis=1, out=grads["b"])  # δb[c] = Σ δS[c, ·]

    def backward(self, buf: _Buffers, dout: np.ndarray, grads: dict[str, np.ndarray]) -> np.ndarray | None:
        w = self.conv.params["W"]
        if self.core is not None:
            self._backward_bn(buf, dout, grads)
            return self._weights_and_input(buf, w, grads)
        delta = buf.delta
        if self.gelu:
            assert buf.gelu_d is not None
            np.multiply(dout, buf.gelu_d, out=delta)  # δ = δout · (Φ + x·φ) at x = P + b
        elif self.relu:
            np.greater(buf.post, 0, out=buf.relu_mask)  # 1(out > 0) = 1(P + b > 0), docs/derivations.md#relu
            np.multiply(dout, buf.relu_mask, out=delta)
        else:
            np.copyto(delta, dout)
        if "b" in grads and not self.bias_row:
            np.sum(delta, axis=(1, 2, 3), out=grads["b"])  # δb[c] = Σ_{i,j,n} δS[c,i,j,n]
        if self.pool is not None:
            if not self.blocked:
                buf.ds2.fill(0)
            _route_to_argmax(delta, buf.masks, buf.dwin, not self.blocked, buf.peel)
        return self._weights_and_input(buf, w, grads)

    def _weights_and_input(self, buf: _Buffers, w: np.ndarray, grads: dict[str, np.ndarray]) -> np.ndarray | None:
        """δW and δX from δS (buf.ds2)."""
        gw = grads["W"]
        if self.patch:  # δW_pat = δS (C_out·Q, M/Q) @ patch colsᵀ, then summed back onto W's entries
            _weight_grad(buf.blocks, buf.dw_wide, buf.dw_tmp)
            self._fold_patch(buf.dw_wide, gw)
        elif self.bias_row:  # [δW | δb] = δS @ [cols; 1]ᵀ: δb[c] = Σ δS[c, ·], the last column
            _weight_grad(buf.blocks, buf.dw_wide, buf.dw_tmp)
            np.copyto(gw.reshape(gw.shape[0], -1), buf.dw_wide[:, :-1])
            np.copyto(grads["b"], buf.dw_wide[:, -1])
        else:
            _weight_grad(buf.blocks, gw.reshape(gw.shape[0], -1), buf.dw_tmp)  # δW = δS (C_out, M) @ colsᵀ
        if not self.need_dx:
            return None
        # δX[n,c',x,y] = Σ_{c,u,v} W[c,c',u,v] · δS[n,c,i,j] over s·i+u−pad = x, s·j+v−pad = y
        # (docs/derivations.md#convolution)
        if buf.dx_blocks is not None:
            self._dx_correlate(buf, w)
        else:
            self._dx_scatter(buf, w.reshape(w.shape[0], -1).T)
        return buf.dx

    def _dx_correlate(self, buf: _Buffers, w: np.ndarray) -> None:
        """Stride 1: δX = δS, padded by q = K − 1 − p, correlated with W'[c', c, u, v] = W[c, c', K−1−u, K−1−v]
        (the kernel rotated by 180°, in and out channels swapped): the same blocked product as the forward
        pass, written straight into δX; no column-to-image additions."""
        c_out, ph, pw = self.out_shape
        q = self.conv.kernel_size - 1 - self.conv.padding
        pad = buf.ds_pad
        assert pad is not None and buf.dx_blocks is not None
        if self.blocked:
            assert self.pool is not None
            kp, sp = self.pool.kernel_size, self.pool.stride
            for o, d in enumerate(buf.ds_windows):  # window offset (a, b) holds conv pixels (sp·i + a, sp·j + b)
                a, bb = divmod(o, kp)
                r0, c0 = q + a, q + bb
                np.copyto(pad[:, r0 : r0 + sp * (ph - 1) + 1 : sp, c0 : c0 + sp * (pw - 1) + 1 : sp], d)
        else:
            np.copyto(pad[:, q : q + self.ho, q : q + self.wo], buf.ds2.reshape(c_out, self.ho, self.wo, -1))
        w_rot = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(w.shape[1], -1)
        _convolve(buf.dx_blocks, w_rot)  # (C, C_out·K·K) @ columns of the padded δS

    def _dx_scatter(self, buf: _Buffers, w_t: np.ndarray) -> None:
        """Any stride: δcols in the column layout, each kernel (and window) offset one strided add."""
        _matmul(w_t, buf.ds2, out=buf.dcols2)  # (C·K·K, M)
        buf.dxp.fill(0)
        k, s = self.conv.kernel_size, self.conv.stride
        if self.blocked:
            assert self.pool is not None
            kp, step = self.pool.kernel_size, s * self.pool.stride
            _, ho, wo = self.out_shape
            offsets = [(u, v, a, bb) for u in range(k) for v in range(k) for a in range(kp) for bb in range(kp)]
            starts = [(u + s * a, v + s * bb) for u, v, a, bb in offsets]
        else:
            step, ho, wo = s, self.ho, self.wo
            offsets = [(u, v) for u in range(k) for v in range(k)]
            starts = offsets
        for off, (r0, c0) in zip(offsets, starts, strict=True):
            buf.dxp[:, r0 : r0 + step * (ho - 1) + 1 : step, c0 : c0 + step * (wo - 1) + 1 : step] += (
                buf.dcols[(slice(None), *off)]
            )


class _PoolStage(_Stage):
    """A MaxPool2D that no conv precedes (then optionally ReLU): strided window views of its input."""

    def __init__(self, pool: MaxPool2D, relu: bool, layers: tuple[Layer, ...], in_shape: Shape) -> None:
        self.pool, self.relu, self.layers, self.in_shape = pool, relu, layers, in_shape
        self.out_shape = pool.output_shape(in_shape)

    def buffers(self, n: int, dtype: np.dtype, train: bool) -> _Buffers:
        c, h, w = self.in_shape
        _, ph, pw = self.out_shape
        k, s = self.pool.kernel_size, self.pool.stride
        x = np.empty((c, h, w, n), dtype=dtype)
        buf = _Buffers(inp=x, windows=_pool_windows(x, k, s, ph, pw))
        if train:
            buf.masks = np.empty((k * k - 1, c, ph, pw, n), dtype=bool)
            buf.relu_mask = np.empty((c, ph, pw, n), dtype=bool)
            buf.delta = np.empty((c, ph, pw, n), dtype=dtype)
            buf.peel = np.empty_like(buf.delta)
            if self.need_dx:
                buf.dx = np.empty_like(x)
                buf.dwin = _pool_windows(buf.dx, k, s, ph, pw)
        return buf

    def forward(self, buf: _Buffers, train: bool) -> None:
        _pool_forward(buf.windows, buf.out, buf.masks if train else None)
        if self.relu:
            np.maximum(buf.out, 0, out=buf.out)

    def backward(self, buf: _Buffers, dout: np.ndarray, grads: dict[str, np.ndarray]) -> np.ndarray | None:
        if not self.need_dx:
            return None
        self._relu_grad(buf, dout, buf.delta)
        buf.dx.fill(0)
        _route_to_argmax(buf.delta, buf.masks, buf.dwin, True, buf.peel)
        return buf.dx


class _LinearStage(_Stage):
    """Linear, optionally with ReLU, on batch-minor vectors: zᵀ = W @ hᵀ + b, and its backward
    (docs/derivations.md#linear, transposed: hᵀ is (in, N), zᵀ (out, N))."""

    def __init__(self, linear: Linear, relu: bool, layers: tuple[Layer, ...], in_shape: Shape) -> None:
        self.linear, self.relu, self.layers, self.in_shape = linear, relu, layers, in_shape
        self.out_shape = (linear.out_features,)

    @property
    def param_layer(self) -> Layer:
        return self.linear

    def buffers(self, n: int, dtype: np.dtype, train: bool) -> _Buffers:
        x = np.empty((self.linear.in_features, n), dtype=dtype)
        buf = _Buffers(inp=x, x=x)
        if train:
            buf.relu_mask = np.empty((self.linear.out_features, n), dtype=bool)
            buf.delta = np.empty((self.linear.out_features, n), dtype=dtype)
            buf.dw_tmp = np.empty((self.linear.in_features, self.linear.out_features), dtype=dtype)  # δWᵀ
            if self.need_dx:
                buf.dx = np.empty_like(x)
        return buf

    def forward(self, buf: _Buffers, train: bool) -> None:
        w, b = self.linear.params["W"], self.linear.params.get("b")
        out = buf.out
        assert out is not None
        if out.flags.c_contiguous:
            _matmul(w, buf.x, out=out)  # zᵀ (out, N) = W (out, in) @ hᵀ (in, N)
        else:  # the logits' rows, seen transposed: z (N, out) = h (N, in) @ Wᵀ
            _matmul(buf.x.T, w.T, out=out.T)
        if b is not None:
            out += b[:, None]
        if self.relu:
            np.maximum(out, 0, out=out)

    def backward(self, buf: _Buffers, dout: np.ndarray, grads: dict[str, np.ndarray]) -> np.ndarray | None:
        delta = dout
        if self.relu:
            self._relu_grad(buf, dout, buf.delta)
            delta = buf.delta
        if "b" in grads:
            np.sum(delta, axis=1, out=grads["b"])  # δb[i] = Σ_n δz[n,i]
        # δW[i,k] = Σ_n δz[n,i] · h[n,k], computed transposed (hᵀ @ δzᵀ, then one small transposing copy): BLAS
        # runs that form of this short-inner-dimension product 1.5–2× faster here (10 × 64 × 8192: 0.34 ms
        # against 0.54 ms, copy included)
        _matmul(buf.x, delta.T, out=buf.dw_tmp)
        np.copyto(grads["W"], buf.dw_tmp.T)
        if not self.need_dx:
            return None
        return _matmul(self.linear.params["W"].T, delta, out=buf.dx)  # δhᵀ[k,n] = Σ_i W[i,k] · δz[n,i]


class _ReluStage(_Stage):
    """A ReLU with nothing before it to fuse with (the network's first layers)."""

    def __init__(self, layers: tuple[Layer, ...], in_shape: Shape) -> None:
        self.relu, self.layers, self.in_shape, self.out_shape = True, layers, in_shape, in_shape

    def buffers(self, n: int, dtype: np.dtype, train: bool) -> _Buffers:
        shape = _layout(self.in_shape, n)
        x = np.empty(shape, dtype=dtype)
        buf = _Buffers(inp=x)
        if train and self.need_dx:
            buf.relu_mask = np.empty(shape, dtype=bool)
            buf.dx = np.empty_like(x)
        return buf

    def forward(self, buf: _Buffers, train: bool) -> None:
        np.maximum(buf.inp, 0, out=buf.out)

    def backward(self, buf: _Buffers, dout: np.ndarray, grads: dict[str, np.ndarray]) -> np.ndarray | None:
        if not self.need_dx:
            return None
        self._relu_grad(buf, dout, buf.dx)
        return buf.dx


class _BatchNormCore:
    """Batch-norm's arithmetic on the engine's arrays, for `_BatchNormStage` and for a conv stage that takes
    the batch-norm after its product (docs/derivations.md#batch-normalisation).

    Arrays are channels-first, batch-minor (C, …): images (C, H, W, N), the conv's S (C, M), vectors (D, N).
    Training mode: the statistics are the whole batch's although each worker holds only its micro-batch, so
    the per-channel sums Σx, Σ(x − μ)² (forward) and Σδy, Σδy·x̂ (backward) are partial sums that
    `buf.reduce` adds up across the workers (in worker order, in float64) before anyone goes on:
    μ = Σx / M, σ² = Σ(x − μ)² / M over the batch's M values per channel, x̂ = (x − μ)/√(σ² + ε),
    y = γ·x̂ + β; δx = γ/√(σ² + ε) · (δy − Σδy / M − x̂ · Σ(δy·x̂) / M), the three paths through x̂, μ and σ²
    as in `BatchNorm.backward`. Worker 0 moves the running statistics, once per pass. δγ = Σ δy·x̂ and
    δβ = Σ δy of the micro-batch go to its gradient slot (the slots add up to the batch's). Evaluation mode:
    the running statistics instead, nothing shared between workers.
    """

    def __init__(self, bn: BatchNorm, shape: Shape) -> None:
        self.bn, self.shape = bn, tuple(shape)  # shape: one example's
        self.values = 0  # M: values per channel in the whole batch of the current pass (set by `start`)

    def start(self, n: int) -> None:
        """Before a pass over a batch of n examples: M, and `BatchNorm.check_batch`'s refusal."""
        self.bn.check_batch(n, self.shape)
        self.values = n * int(np.prod(self.shape[1:]))

    def _col(self, v: np.ndarray, ndim: int) -> np.ndarray:
        """A per-channel vector (C,) shaped to broadcast over an array of ndim dimensions."""
        return v.reshape((-1,) + (1,) * (ndim - 1))

    def _sums(self, a: np.ndarray) -> np.ndarray:
        """Per-channel sums (C,) of a contiguous array (pairwise along each channel's values)."""
        return a.reshape(a.shape[0], -1).sum(axis=1)

    def _dots(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per-channel Σ a·b (C,) of two contiguous arrays of one shape: a batch of C dot products in BLAS (one
        read of each, no product array written; measured 0.17 against 0.61 ms for a multiply and a sum)."""
        c = a.shape[0]
        return np.matmul(a.reshape(c, 1, -1), b.reshape(c, -1, 1)).reshape(c)

    def affine(self, x: np.ndarray, buf: _Buffers, train: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(src, a, c) with y = γ·x̂ + β = src·a + c per channel, for x (contiguous): src is x − μ (written to
        buf.xc, with 1/√(σ² + ε) in buf.inv_std, when training), a = γ/√(σ² + ε); x̂ = (x − μ)·inv_std is never
        written out. Training mode: μ and σ² of the whole batch (shared between the workers)."""
        bn, dtype = self.bn, x.dtype
        gamma, beta = bn.gamma(), bn.params["beta"]
        if bn.training:
            assert buf.reduce is not None and buf.xc is not None
            m = self.values
            mu = buf.reduce(self._sums(x)) / m
            xc = buf.xc
            np.subtract(x, self._col(mu.astype(dtype), x.ndim), out=xc)
            var = buf.reduce(self._dots(xc, xc)) / m  # Σ(x − μ)² / M
            inv_std = 1.0 / np.sqrt(var + bn.eps)
            buf.inv_std = inv_std
            if buf.worker == 0:
                rm, rv, mom = bn.buffers["running_mean"], bn.buffers["running_var"], bn.momentum
                rm *= 1 - mom
                rm += (mom * mu).astype(rm.dtype)
                rv *= 1 - mom
                rv += (mom * var * m / (m - 1)).astype(rv.dtype)
            return xc, (gamma * inv_std).astype(dtype), beta
        inv_std = 1.0 / np.sqrt(bn.buffers["running_var"].astype(np.float64) + bn.eps)
        mean = bn.buffers["running_mean"].astype(dtype)
        scale = (gamma * inv_std).astype(dtype)
        if train:  # keep x − mean for the backward of an evaluation-mode pass
            assert buf.xc is not None
            np.subtract(x, self._col(mean, x.ndim), out=buf.xc)
            buf.inv_std = inv_std
            return buf.xc, scale, beta
        return x, scale, beta - mean * scale

    def apply(self, src: np.ndarray, a: np.ndarray, c: np.ndarray, out: np.ndarray) -> None:
        """out = src·a + c per channel (two passes)."""
        np.multiply(src, self._col(a, src.ndim), out=out)
        out += self._col(c, out.ndim)

    def forward(self, x: np.ndarray, out: np.ndarray, buf: _Buffers, train: bool) -> None:
        """out = γ·x̂ + β for x (contiguous) (`affine`, then `apply`)."""
        self.apply(*self.affine(x, buf, train), out)

    def backward(self, dy: np.ndarray, dx: np.ndarray | None, buf: _Buffers, grads: dict[str, np.ndarray]) -> None:
        """δy (contiguous) -> δx (written into dx, unless None); δγ, δβ of this micro-batch into grads.
        With x̂ = (x − μ)·inv_std: Σ δy·x̂ = inv_std · Σ δy·(x − μ), and x̂ · k = (x − μ) · (inv_std · k)."""
        bn, xc, inv_std = self.bn, buf.xc, buf.inv_std
        assert xc is not None and inv_std is not None
        sum_dy = self._sums(dy)
        sum_dyx = self._dots(dy, xc) * inv_std  # Σ δy·x̂
        if "gamma" in grads:  # a batch-norm with γ fixed at 1 (scale: false) has none
            np.copyto(grads["gamma"], sum_dyx, casting="unsafe")  # δγ = Σ δy·x̂ (this micro-batch's share)
        np.copyto(grads["beta"], sum_dy, casting="unsafe")  # δβ = Σ δy
        if dx is None:
            return
        dtype, nd = dy.dtype, dy.ndim
        scale = self._col((bn.gamma() * inv_std).astype(dtype), nd)
        if bn.training:
            assert buf.reduce is not None
            c, m = len(sum_dy), self.values
            both = buf.reduce(np.concatenate([sum_dy, sum_dyx]).astype(np.float64)) / m
            np.multiply(xc, self._col((inv_std * both[c:]).astype(dtype), nd), out=dx)  # x̂ · Σ(δy·x̂)/M
            np.subtract(dy, dx, out=dx)
            dx -= self._col(both[:c].astype(dtype), nd)  # − Σδy / M
            dx *= scale
        else:
            np.multiply(dy, scale, out=dx)


class _BatchNormStage(_Stage):
    """A BatchNorm (with the ReLUs after it) that no conv precedes directly, on the engine's layout: images
    (C, H, W, N), vectors (D, N); its arithmetic is `_BatchNormCore`'s."""

    def __init__(self, bn: BatchNorm, relu: bool, layers: tuple[Layer, ...], in_shape: Shape,
                 gelu: bool = False) -> None:
        self.bn, self.relu, self.layers, self.in_shape, self.out_shape = bn, relu, layers, in_shape, in_shape
        self.gelu = gelu
        self.core = _BatchNormCore(bn, in_shape)

    @property
    def param_layer(self) -> Layer:
        return self.bn

    def buffers(self, n: int, dtype: np.dtype, train: bool) -> _Buffers:
        shape = _layout(self.in_shape, n)
        buf = _Buffers(inp=np.empty(shape, dtype=dtype))
        if train:
            buf.xc = np.empty(shape, dtype=dtype)
            buf.delta = np.empty(shape, dtype=dtype)
            buf.relu_mask = np.empty(shape, dtype=bool) if self.relu else None
            buf.gelu_d = np.empty(shape, dtype=dtype) if self.gelu else None
            buf.dx = np.empty(shape, dtype=dtype) if self.need_dx else None
        return buf

    def forward(self, buf: _Buffers, train: bool) -> None:
        assert buf.out is not None
        self.core.forward(buf.inp, buf.out, buf, train)
        if self.relu:
            np.maximum(buf.out, 0, out=buf.out)
        elif self.gelu:  # in place, slab by slab: each slab's x is read before its y is written
            _gelu(buf.out, buf.out, buf.gelu_d if train else None)

    def backward(self, buf: _Buffers, dout: np.ndarray, grads: dict[str, np.ndarray]) -> np.ndarray | None:
        assert buf.delta is not None
        self._relu_grad(buf, dout, buf.delta)  # δy = δout · 1(out > 0), or · (Φ + y·φ) after a GELU
        self.core.backward(buf.delta, buf.dx if self.need_dx else None, buf, grads)
        return buf.dx if self.need_dx else None


def _to_examples(a: np.ndarray) -> np.ndarray:
    """The engine's layout (*shape, N) to the layers' (N, *shape), a view."""
    return np.moveaxis(a, -1, 0)


class _LayerStage(_Stage):
    """Any layer, run by its own `forward` / `backward` inside the micro-batches.

    Each worker (and micro-batch size) has its own shallow copy of the layer: the copy shares the live
    `params` and `buffers` dicts and has its own caches and `grads`, so workers never see each other's state.
    """

    def __init__(self, layer: Layer, in_shape: Shape) -> None:
        self.layer, self.layers, self.in_shape = layer, (layer,), tuple(in_shape)
        self.out_shape = tuple(layer.output_shape(in_shape))

    @property
    def param_layer(self) -> Layer | None:
        return self.layer if self.layer.params else None

    def buffers(self, n: int, dtype: np.dtype, train: bool) -> _Buffers:
        clone = copy.copy(self.layer)
        clone.grads = {}
        return _Buffers(inp=np.empty(_layout(self.in_shape, n), dtype=dtype), layer=clone)

    def forward(self, buf: _Buffers, train: bool) -> None:
        layer = buf.layer
        assert layer is not None and buf.out is not None
        layer.training = self.layer.training
        layer.needs_input_grad = self.need_dx
        y = contracts.forward(layer, _to_examples(buf.inp))  # checked on a user layer's first call
        np.copyto(_to_examples(buf.out), y, casting="unsafe")

    def backward(self, buf: _Buffers, dout: np.ndarray, grads: dict[str, np.ndarray]) -> np.ndarray | None:
        layer = buf.layer
        assert layer is not None
        d = contracts.backward(layer, _to_examples(dout))
        for k, g in grads.items():
            np.copyto(g, layer.grads[k], casting="unsafe")
        if not self.need_dx or d is None:
            return None
        return np.ascontiguousarray(np.moveaxis(d, 0, -1))  # (N, *shape) -> (*shape, N)


# Layer classes with a fused stage. Exact classes: a subclass (a user's own ReLU, say) may compute
# something else, so it runs through its own forward/backward in a `_LayerStage`.
_FUSED = (Conv2D, MaxPool2D, Linear, ReLU, Flatten)  # and GELU, inside a conv or batch-norm stage

# Every option of each layer type the engine computes itself (the `_FUSED` types and BatchNorm), all honoured by
# its stages (`init` only sets the starting weights, which the engine reads as they are). A fused type that gains
# an option must be taught here and in its stage, or leave `_FUSED` (its layers then run their own forward and
# backward in a `_LayerStage`): tests/engine/test_speed_equivalence.py fails until the two lists agree.
HANDLED_OPTIONS: dict[type[Layer], frozenset[str]] = {
    # dirac, whiten, whiten_eps: starting weights too (whiten's are set from the data before training)
    Conv2D: frozenset({"out_channels", "kernel_size", "stride", "padding", "bias", "init", "dirac", "whiten",
                       "whiten_eps"}),
    MaxPool2D: frozenset({"kernel_size", "stride"}),
    Linear: frozenset({"out_features", "bias", "init"}),
    ReLU: frozenset(),
    Flatten: frozenset(),
    BatchNorm: frozenset({"momentum", "eps", "scale"}),  # scale: false -> γ = `bn.gamma()`, ones, no δγ
    GELU: frozenset(),  # after a conv or a batch-norm (`_plan`); elsewhere it runs its own forward/backward
}


def _fused(layer: Layer) -> bool:
    return type(layer) in _FUSED


def _plan(layers: list[Layer], input_shape: Shape) -> list[_Stage]:
    """Group the layers into stages: a conv takes the ReLUs and the one max-pool after it (or, instead of
    ReLUs, a GELU, which ends the stage), a pool or a linear layer the ReLUs after it; a ReLU after a
    flatten joins the fused stage before the flatten (ReLU acts element-wise, so it commutes with the
    reshape); a flatten is only a change of view between stages.
    A batch-norm takes the ReLUs after it, or one GELU. Every other layer is a `_LayerStage` of its own."""
    stages: list[_Stage] = []
    shape = tuple(input_shape)
    i = 0
    while i < len(layers):
        layer, group = layers[i], [layers[i]]
        i += 1
        if type(layer) is Flatten:
            shape = layer.output_shape(shape)
            if stages:
                stages[-1].layers = (*stages[-1].layers, layer)
            continue
        if type(layer) is BatchNorm:
            while i < len(layers) and type(layers[i]) is ReLU:
                group.append(layers[i])
                i += 1
            gelu = len(group) == 1 and i < len(layers) and type(layers[i]) is GELU
            if gelu:
                group.append(layers[i])
                i += 1
            stage: _Stage = _BatchNormStage(layer, len(group) > 1 and not gelu, tuple(group), shape, gelu)
        elif not _fused(layer):
            stage = _LayerStage(layer, shape)
        else:
            relu, pool, bn, gelu = False, None, None, False
            if type(layer) is Conv2D and i < len(layers) and type(layers[i]) is BatchNorm:
                bn = layers[i]  # a batch-norm right after a conv joins it
                group.append(bn)
                i += 1
            while i < len(layers):  # the ReLUs (and, after a conv, one max-pool) that join this layer
                nxt = layers[i]
                if type(nxt) is ReLU:
                    relu = True
                elif type(layer) is Conv2D and pool is None and type(nxt) is MaxPool2D:
                    pool = nxt
                elif type(layer) is Conv2D and not relu and type(nxt) is GELU:
                    gelu = True  # ends the stage: a max-pool after it does not commute with it
                    group.append(nxt)
                    i += 1
                    break
                else:
                    break
                group.append(nxt)
                i += 1
            if type(layer) is Conv2D:
                stage = _ConvStage(layer, pool, relu, tuple(group), shape, bn, gelu)  # type: ignore[arg-type]
            elif type(layer) is MaxPool2D:
                stage = _PoolStage(layer, relu, tuple(group), shape)  # type: ignore[arg-type]
            elif type(layer) is Linear:
                stage = _LinearStage(layer, relu, tuple(group), shape)  # type: ignore[arg-type]
            elif stages and not isinstance(stages[-1], _LayerStage):
                # a ReLU with only flattens between it and a fused stage: join that stage
                stages[-1].relu = True
                stages[-1].layers = (*stages[-1].layers, *group)
                continue
            else:
                stage = _ReluStage(tuple(group), shape)
        stage.need_dx = any(s.param_layer is not None for s in stages)
        stages.append(stage)
        shape = stage.out_shape
    return stages


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of ⌈n / size⌉ micro-batches of near-equal size (they differ by at most one image)."""
    count = max(1, -(-n // size))
    base, extra = divmod(n, count)
    bounds, start = [], 0
    for j in range(count):
        stop = start + base + (j < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _softmax_xent(z: np.ndarray, y: np.ndarray, total: int, smoothing: float = 0.0) -> tuple[float, np.ndarray]:
    """Σ_n −Σ_k q[n,k] log p[n,k] over the micro-batch, and δz = (p − q) / total, the whole batch's N, with
    q = onehot(y), or (1 − ε)·onehot(y) + ε/K with label smoothing ε (docs/derivations.md#softmax-and-cross-entropy,
    #label-smoothing; the same operations as `softmax_cross_entropy`)."""
    shifted = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))  # (N,)
    rows = np.arange(z.shape[0])
    nll = log_norm - shifted[rows, y]
    if smoothing:
        nll = (1.0 - smoothing) * nll + smoothing * (log_norm - shifted.mean(axis=1))
    loss_sum = float(np.sum(nll, dtype=np.float64))
    dz = np.exp(shifted - log_norm[:, None])
    if smoothing:
        dz -= smoothing / z.shape[1]
    dz[rows, y] -= 1.0 - smoothing
    dz /= total
    return loss_sum, dz


class _Reducer:
    """Per-channel sums across the workers of one pass (batch-norm's statistics): each worker hands in its
    partial sum and gets the total, added in worker order in float64, so the bits do not depend on which
    worker arrives first. Two barriers per call: everyone has handed in; everyone has read."""

    def __init__(self, workers: int) -> None:
        self.parts: list[np.ndarray | None] = [None] * workers
        self.barrier = threading.Barrier(workers) if workers > 1 else None

    def part(self, t: int) -> Callable[[np.ndarray], np.ndarray]:
        def reduce(a: np.ndarray) -> np.ndarray:
            if self.barrier is None:
                return a.astype(np.float64)
            self.parts[t] = a
            self.barrier.wait()
            total = np.array(self.parts[0], dtype=np.float64)
            for p in self.parts[1:]:
                total += p
            self.barrier.wait()
            return total

        return reduce

    def abort(self) -> None:
        if self.barrier is not None:
            self.barrier.abort()


class Engine:
    """The fused, micro-batched, multi-threaded execution of a `Sequential`'s layers (see above).

    Reads the layers' parameters live at every call (the optimizer updates them in place; `astype` may
    replace them) and writes new gradient arrays into the layers' `grads`, as the per-layer path does.
    One call at a time: the buffers are shared between calls (the worker threads are the engine's own).
    """

    def __init__(self, layers: list[Layer], input_shape: Shape) -> None:
        self.layers = list(layers)
        self.key = (tuple(map(id, layers)), tuple(input_shape))  # what `cnncli.engine.engine_for` checks
        self.input_shape = tuple(input_shape)
        self.stages = _plan(self.layers, self.input_shape)
        self.threads: int | None = None
        self.train_micro_batch = TRAIN_MICRO_BATCH
        self.eval_micro_batch = EVAL_MICRO_BATCH
        self._dtype: np.dtype | None = None
        self._workspaces: dict[tuple[bool, int, int], list[_Buffers]] = {}
        self._slots: list[dict[str, dict[str, np.ndarray]]] = []
        self.matmul_seconds: dict[str, tuple[float, float]] = {}  # filled by `profile`
        self.matmul_flops: dict[str, tuple[float, float]] = {}
        self._fired: dict[tuple[int, int], np.ndarray] | None = None  # `watch_relus`: (worker, stage) -> max

    # ---- buffers ------------------------------------------------------------------------------------
    def _param_layers(self) -> list[Layer]:
        return [layer for s in self.stages for layer in s.param_layers]

    def _check_dtype(self) -> np.dtype:
        params = [v for layer in self._param_layers() for v in layer.params.values()]
        dtype = params[0].dtype if params else np.dtype(np.float32)
        if self._dtype is None or dtype != self._dtype:  # (np.dtype(None) is float64)
            self._dtype, self._workspaces, self._slots = dtype, {}, []
        return dtype

    def _workspace(self, train: bool, n: int, worker: int) -> list[_Buffers]:
        key = (train, n, worker)
        ws = self._workspaces.get(key)
        if ws is None:
            assert self._dtype is not None
            ws = [stage.buffers(n, self._dtype, train) for stage in self.stages]
            for buf in ws:
                buf.worker = worker
            for stage, buf, nxt in zip(self.stages, ws, ws[1:], strict=False):
                buf.out = _as(nxt.inp, n, stage.out_shape)
            self._workspaces[key] = ws
        return ws

    def _grad_slots(self, count: int) -> list[dict[str, dict[str, np.ndarray]]]:
        while len(self._slots) < count:
            self._slots.append(
                {layer.name: {k: np.empty_like(v) for k, v in layer.params.items()} for layer in self._param_layers()}
            )
        return self._slots[:count]

    def _workers(self, chunks: int) -> int:
        return max(1, min(self.threads or worker_threads(), chunks))

    def whole_batch(self) -> bool:
        """True when a layer couples the examples of a batch in its current mode and the engine cannot
        share the coupling between workers (dropout in training, a batch-norm inside a residual block, a
        user's layer): the batch then runs as one micro-batch on the calling thread. A batch-norm stage of
        its own does not count: its workers add up their partial sums (`_BatchNormStage`)."""
        shared = {id(c.bn) for c in self._bn_cores()}
        return any(layer.couples_batch() for layer in self.layers if id(layer) not in shared)

    def synced(self) -> bool:
        """True when a batch-norm stage uses batch statistics: one micro-batch per worker, all in flight."""
        return any(c.bn.training for c in self._bn_cores())

    def _micro_batch(self, n: int, train: bool) -> int:
        if self.whole_batch():
            return max(n, 1)
        if self.synced():
            return max(1, -(-n // (self.threads or worker_threads())))
        return self.train_micro_batch if train else self.eval_micro_batch

    def worker_count(self, n: int, train: bool = True) -> int:
        """How many worker threads a batch of n images uses (at most one per micro-batch)."""
        return self._workers(len(_chunks(n, self._micro_batch(n, train))))

    def _run(self, jobs: list[Callable[[int], None]], reducer: _Reducer | None = None) -> None:
        """Run jobs[t](t) for every worker t (0 on the calling thread, the rest on the pool), with BLAS
        limited to one thread throughout, so each product is computed the same way whatever the thread count
        (measured on this project's 2-core machine, loaded, the deep batch-norm config's whole-batch step
        took 2,980 ms with BLAS on 2 threads and 721 ms on 1). A job that fails breaks the reducer's barrier,
        so the others stop too; the first real error is raised (not a worker's BrokenBarrierError)."""

        def guarded(t: int) -> None:
            try:
                jobs[t](t)
            except BaseException:
                if reducer is not None:
                    reducer.abort()
                raise

        with blas_threads(1):
            if len(jobs) == 1:
                jobs[0](0)
                return
            pool = _worker_pool(len(jobs) - 1)
            futures = [pool.submit(guarded, t) for t in range(1, len(jobs))]
            errors: list[BaseException] = []
            try:
                guarded(0)
            except BaseException as e:
                errors.append(e)
            wait(futures)  # never leave a worker writing into the buffers, even on an exception
            errors += [e for e in (f.exception() for f in futures) if e is not None]
            if errors:
                raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])

    def _reducer(self, total: int, workers: int) -> _Reducer | None:
        """For a pass where batch-norm uses batch statistics: M for each such stage, and the reducer."""
        cores = self._bn_cores()
        for core in cores:
            core.start(total)
        return _Reducer(workers) if any(c.bn.training for c in cores) else None

    def _bn_cores(self) -> list[_BatchNormCore]:
        return [s.core for s in self.stages if getattr(s, "core", None) is not None]

    def _bind(self, ws: list[_Buffers], reducer: _Reducer | None, t: int) -> None:
        reduce = reducer.part(t) if reducer is not None else None
        for buf in ws:
            buf.reduce = reduce

    def _load(self, ws: list[_Buffers], x: np.ndarray) -> None:
        """Copy a micro-batch x (N, *input_shape) into the first stage's input, in its layout (*shape, N).

        Through `staging` (N, F + pad): read straight from x, the transposing copy would step through memory
        by one example's F values at a time, and with F·4 bytes a multiple of 4 KiB (3·32·32 floats) each step
        lands in the same cache set; the padded rows do not (measured: 0.19 against 0.85 ms per 64 images)."""
        buf = ws[0]
        n, f = x.shape[0], int(np.prod(x.shape[1:]))
        if buf.staging is None:
            pad = 16 if ((f + 16) * buf.inp.itemsize) % 4096 else 32
            buf.staging = np.empty((n, f + pad), dtype=buf.inp.dtype)
        rows = buf.staging[:, :f]
        np.copyto(rows, x.reshape(n, f), casting="unsafe")
        np.copyto(buf.inp, rows.T.reshape(buf.inp.shape))  # (F, N) -> (*shape, N), a view of the staged rows

    def _assign(self, chunks: list[tuple[int, int]], train: bool, workers: int) -> list[list[int]]:
        """Micro-batch j goes to worker j mod workers; their buffers are made here, before any thread runs."""
        mine = [[j for j in range(len(chunks)) if j % workers == t] for t in range(workers)]
        for t, js in enumerate(mine):
            for j in js:
                self._workspace(train, chunks[j][1] - chunks[j][0], t)
        return mine

    # ---- ReLU activity (read by cnncli/run/gradflow.py) -----------------------------------------------
    def watch_relus(self, on: bool = True) -> None:
        """From now on (on) or no longer, training passes keep, for every stage that ends in a ReLU, the largest
        value each output unit took (a unit: a channel of an image tensor, a feature of a vector): one max
        reduction of the ReLU's output per micro-batch, nothing the results depend on."""
        self._fired = {} if on else None

    def relu_activity(self) -> list[tuple[Layer, np.ndarray]]:
        """[(the ReLU layer, max over the watched passes of each output unit (C,) or (D,))] for each stage with a
        ReLU that ran since the last call (a unit never > 0 there is dead), in stage order; then starts afresh."""
        if self._fired is None:
            return []
        found: list[tuple[Layer, np.ndarray]] = []
        for i, stage in enumerate(self.stages):
            parts = [m for (_, j), m in self._fired.items() if j == i]
            if parts:
                relu = next((layer for layer in reversed(stage.layers) if type(layer) is ReLU), stage.layers[-1])
                found.append((relu, np.maximum.reduce(parts)))
        self._fired = {}
        return found

    def _note_relu(self, t: int, i: int, out: np.ndarray) -> None:
        """Worker t's stage i wrote its ReLU output `out` (*shape, N): keep each unit's running max."""
        assert self._fired is not None
        m = out.max(axis=tuple(range(1, out.ndim)))
        prev = self._fired.get((t, i))
        self._fired[(t, i)] = m if prev is None else np.maximum(prev, m, out=prev)

    # ---- passes -----------------------------------------------------------------------------------
    def predict(self, x: np.ndarray) -> np.ndarray:
        """X (N, *input_shape) -> logits z (N, classes), in micro-batches of `eval_micro_batch` images."""
        x = np.asarray(x)
        dtype = self._check_dtype()
        out_shape = self.stages[-1].out_shape
        logits = np.empty((len(x), int(np.prod(out_shape))), dtype=dtype)
        if not len(x):
            return logits
        chunks = _chunks(len(x), self._micro_batch(len(x), False))
        workers = self._workers(len(chunks))
        mine = self._assign(chunks, False, workers)
        reducer = self._reducer(len(x), workers)

        def job(t: int) -> None:
            for j in mine[t]:
                a, b = chunks[j]
                ws = self._workspace(False, b - a, t)
                self._bind(ws, reducer, t)
                ws[-1].out = _rows(logits[a:b], b - a, out_shape)
                self._load(ws, x[a:b])
                for stage, buf in zip(self.stages, ws, strict=True):
                    stage.forward(buf, False)

        self._run([job] * workers, reducer)
        return logits

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray, smoothing: float = 0.0) -> tuple[float, np.ndarray]:
        """x (N, *input_shape), y (N,) -> (mean cross-entropy, logits (N, classes)); fills the layers' grads.
        `smoothing`: label smoothing ε of the cross-entropy's target (0: the one-hot label).

        Micro-batch j's gradients (δz scaled by the whole batch's 1/N) land in slot j; the slots are summed
        in the order j = 0, 1, …, whichever worker computed them.
        """
        return self._train(x, y, None, smoothing)

    def profile(self, x: np.ndarray, y: np.ndarray) -> list[tuple[str, float, float]]:
        """One training pass on the calling thread alone, timed: [(stage label, forward s, backward s), …,
        ('softmax cross-entropy', s, 0), ('gradient sum', 0, s)]; fills the grads as `loss_and_grads`.
        `self.matmul_seconds[label]` is then the (forward, backward) seconds of each stage spent inside
        matrix products, `self.matmul_flops[label]` their (forward, backward) floating-point operations."""
        global _MATMUL_CLOCK
        rows = len(self.stages) + 2
        timings = np.zeros((rows, 6))
        threads, self.threads = self.threads, 1
        _MATMUL_CLOCK = [0.0, 0.0]
        # One thread takes the whole batch (a batch-norm's statistics need it in one micro-batch): a workspace
        # as large as all the workers' together. The others are let go first and this one after, so the
        # profile never holds two (airbench94 at 1,024 images: 14.7 GB peak with both, see the #26 note).
        self._workspaces.clear()
        try:
            self._train(x, y, timings)
        finally:
            self.threads, _MATMUL_CLOCK = threads, None
            self._workspaces.clear()
        labels = [s.label for s in self.stages] + ["softmax cross-entropy", "gradient sum"]
        self.matmul_seconds = {label: (float(t[2]), float(t[3])) for label, t in zip(labels, timings, strict=True)}
        self.matmul_flops = {label: (float(t[4]), float(t[5])) for label, t in zip(labels, timings, strict=True)}
        return [(label, float(t[0]), float(t[1])) for label, t in zip(labels, timings, strict=True)]

    def _train(self, x: np.ndarray, y: np.ndarray, timings: np.ndarray | None, smoothing: float = 0.0
               ) -> tuple[float, np.ndarray]:
        x, y = np.asarray(x), np.asarray(y)
        dtype = self._check_dtype()
        total = len(x)
        if total == 0:
            raise ValueError("loss_and_grads: empty batch")
        chunks = _chunks(total, self._micro_batch(total, True))
        workers = self._workers(len(chunks))
        slots = self._grad_slots(len(chunks))
        out_shape = self.stages[-1].out_shape
        logits = np.empty((total, int(np.prod(out_shape))), dtype=dtype)
        losses = [0.0] * len(chunks)
        mine = self._assign(chunks, True, workers)
        reducer = self._reducer(total, workers)
        clock = time.perf_counter
        n_stages = len(self.stages)
        watch = self._fired is not None

        def job(t: int) -> None:
            for j in mine[t]:
                a, b = chunks[j]
                ws = self._workspace(True, b - a, t)
                self._bind(ws, reducer, t)
                ws[-1].out = _rows(logits[a:b], b - a, out_shape)
                self._load(ws, x[a:b])
                mm = _MATMUL_CLOCK
                for i, (stage, buf) in enumerate(zip(self.stages, ws, strict=True)):
                    t0 = clock() if timings is not None else 0.0
                    m0, f0 = (mm[0], mm[1]) if mm is not None else (0.0, 0.0)
                    stage.forward(buf, True)
                    if watch and stage.relu and i + 1 < n_stages:
                        self._note_relu(t, i, buf.out)
                    if timings is not None:
                        timings[i, 0] += clock() - t0
                        if mm is not None:
                            timings[i, 2] += mm[0] - m0
                            timings[i, 4] += mm[1] - f0
                t0 = clock() if timings is not None else 0.0
                losses[j], dz = _softmax_xent(logits[a:b], y[a:b], total, smoothing)
                if timings is not None:
                    timings[n_stages, 0] += clock() - t0
                d: np.ndarray | None = dz
                for i in reversed(range(n_stages)):
                    if d is None:  # no stage before this one has parameters
                        break
                    stage = self.stages[i]
                    t0 = clock() if timings is not None else 0.0
                    m0, f0 = (mm[0], mm[1]) if mm is not None else (0.0, 0.0)
                    dout = _rows(d, b - a, stage.out_shape) if d is dz else _as(d, b - a, stage.out_shape)
                    d = stage.backward(ws[i], dout, stage.grads_of(slots[j]))
                    if timings is not None:
                        timings[i, 1] += clock() - t0
                        if mm is not None:
                            timings[i, 3] += mm[0] - m0
                            timings[i, 5] += mm[1] - f0

        self._run([job] * workers, reducer)
        t0 = clock()
        for layer in self._param_layers():
            for k in layer.params:
                g = slots[0][layer.name][k].copy()
                for slot in slots[1:]:
                    g += slot[layer.name][k]
                layer.grads[k] = g
        if timings is not None:
            timings[n_stages + 1, 1] += clock() - t0
        return float(sum(losses) / total), logits

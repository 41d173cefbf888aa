"""Fused block tail: y = LayerNorm(dropout(x) + residual) over the last dimension, in Triton.

What it fuses. ELECTRA/BERT end every attention and feed-forward block with
``LayerNorm(dropout(dense(h)) + residual)``. Unfused that is three passes over (M, N) activations
plus a stored dropout mask; here the forward is one pass (read x and residual, write y and two
fp32 numbers per row) and the backward is one pass plus a tiny reduction for dW/dB.

Design.
- Rows are normalised in fp32 whatever the input dtype (fp32/fp16/bf16, mixed allowed: y and dx
  take x's dtype, dresidual the residual's, dW/dB the parameters'). Forward saves mean and rstd
  per row (fp32) when a backward can follow; without autograd (no_grad, inference_mode, no input
  requiring grad) it runs a variant that stores neither, outside the autograd Function.
- Dropout draws its keep-mask in-kernel from Philox4x32-10 keyed by the seed: element (row, col)
  takes a 16-bit draw, half ``col % 2`` (the low half first) of word ``(col % 8) // 2`` of the call
  on counter (col // 8, row lo 32 bits, row hi 32 bits, 0), so one Philox evaluation serves eight
  columns and the mask depends only on (seed, row, col), never on block sizes. Keep iff the draw
  >= round(p * 2**16) (as the attention kernels' dropout). The backward recomputes the mask; it is
  never stored. ``dropout_mask`` returns the same mask for tests. (16-bit draws halve the Philox
  work of 32-bit ones, the likely bound of the forward at N = 768 on an H100, where the 1024-wide
  block draws for 1024 columns: 2590 GB/s with dropout + residual against 2866 without, 2026-11-23.)
- The seed is an int64 (1,) tensor on x's device (fastelectra.rng) that the kernels load: no
  ``.item()``, no host sync, and a CUDA-graph replay uses the fresh seed drawn in the graph.
- Pre-norm sum s = dropout(x) + residual: recomputed in the backward instead of saved. For
  memory-bound work both cost the same traffic over forward + backward (saving s adds a write
  in forward and replaces two reads by one in backward), but recomputing keeps the forward (the
  whole cost at inference) at its minimum of one read per input and one write, and allocates no
  extra activation: x and residual are kept alive instead of s.
- dW/dB without atomics: the backward runs a fixed number of programs (about one resident wave), each
  loops over a contiguous chunk of rows accumulating dy * xhat and dy in fp32 registers, writes
  one row of partial sums of each; one launch of ``_sum_partials_kernel`` finishes both (a grid of
  narrow column blocks x {dW, dB}) and writes them in the parameters' dtype. Torch's generic sum
  over the ~1000 partial rows took ~9 us per call on an H100 (Small profile: 106 fp32 reductions,
  0.98 ms of a 17.7 ms step), two calls per layer norm.
- Without dropout dx == dresidual, so the backward writes one tensor and returns it for both
  (a second copy is written only when the residual has another dtype).
- Wrapped as torch.library custom ops (forward, backward) with fake implementations and
  ``register_autograd``, so ``torch.compile(fullgraph=True)`` traces through them.

Limits: 1 <= N <= 8192 (one row fits in one block); rows are made contiguous.

References: Triton tutorial 05 (layer norm), Apex/flash-attention fused dropout-add-LN
(``dropout_add_layer_norm``), Salmon et al. 2011 (Philox, "Parallel random numbers: as easy as
1, 2, 3").
"""
import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..autograd import eager_function, needs_grad, use_eager
from ..ops import _check_dropout_p, _check_eps
from ..rng import check_seed_tensor, seed_tensor
from .launch import launch

__all__ = ["fused_layer_norm", "dropout_mask", "MAX_N"]

MAX_N = 8192            # largest hidden size: one row must fit in one block
MIN_BLOCK_N = 16        # smallest block: a Philox call makes the draws of 8 columns (BLOCK_N % 8 == 0)
MAX_ROWS = 64           # cap on rows per program for tiny N
# Block shapes, checked against ptxas register counts for sm_90 (bf16, N = 256 .. 8192: no spills).
FWD_TILE = 2048         # elements per forward program (several rows when N is small); H100 sweep
                        # at N = 768 (2026-11-23): 2048 -> 2867 GB/s, 4096 -> 2477, 1024 -> 2701
FWD_TILE_NARROW = 1024  # the same for rows of at most NARROW_N columns; H100 sweep at N = 256
NARROW_N = 256          # (2026-11-24): 1024 -> 2695 GB/s, 2048 -> 2649 (torch.compile 2692)
FWD_ELEMS_PER_THREAD = 16   # two 16-byte bf16 vectors per thread and tensor
BWD_TILE = 1024         # elements per backward loop step (about 3x more values live than forward)
BWD_ELEMS_PER_THREAD = 8    # ~60 registers at N = 768: eight 4-warp programs resident per SM
MAX_WARPS = 16
BWD_WARPS_PER_SM = 32   # backward programs = SMs * (32 // num_warps), about one resident wave
# Backward loop steps per program at least (fewer partial rows of dW/dB for stage 2), unless that leaves
# fewer programs than SMs. 1: off. The column sums' H100 sweep (kernels/linear.py) found their time
# following their partial rows; the backward of ELECTRA-Small's rows (16384 x 256: 4 steps per
# program; x 64: 1 step) writes ~1056 of them. bench_layernorm --sweep times the alternatives.
BWD_MIN_STEPS = 1
DRAW_RANGE = 2**16      # dropout draws are uniform 16-bit integers, two per Philox word
PARTIAL_BLOCK_N = 16    # stage 2 of a column reduction: columns per program, narrow for many programs
PARTIAL_TILE = 4096     # stage 2: partial sums per program and loop step (32 fp32 per thread at 4 warps)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _keep_mask(
    seed,                   # scalar int64: Philox key
    rows,                   # [BLOCK_M, 1] int64: row index of each tile row
    threshold,              # scalar int: keep iff draw >= threshold = round(p * 2**16)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Dropout keep-mask [BLOCK_M, BLOCK_N] for columns 0..BLOCK_N-1 of ``rows`` (BLOCK_N >= 8)."""
    rows = rows.to(tl.int64)
    groups = tl.arange(0, BLOCK_N // 8)[None, :]                      # column // 8
    zero = tl.zeros([BLOCK_M, BLOCK_N // 8], dtype=tl.uint32)
    c0 = groups.to(tl.uint32) + zero
    c1 = (rows & 0xFFFFFFFF).to(tl.uint32) + zero                     # row, low 32 bits
    c2 = (rows >> 32).to(tl.uint32) + zero                            # row, high 32 bits
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero)                # Philox4x32-10
    # the 16-bit draws: join(join(w0, w2), join(w1, w3)) is [.., g, a, b] = word 2a + b, so with the
    # halves as the minor axis [BLOCK_M, BLOCK_N // 8, 2, 2, 2] -> [BLOCK_M, BLOCK_N]: column
    # 8g + j takes half j % 2 (low first) of word j // 2 of group g
    lo = tl.join(tl.join(r0 & 0xFFFF, r2 & 0xFFFF), tl.join(r1 & 0xFFFF, r3 & 0xFFFF))
    hi = tl.join(tl.join(r0 >> 16, r2 >> 16), tl.join(r1 >> 16, r3 >> 16))
    draws = tl.reshape(tl.join(lo, hi), [BLOCK_M, BLOCK_N])
    return draws >= threshold.to(tl.uint32)


@triton.jit(do_not_specialize=["threshold"])
def _layer_norm_fwd_kernel(
    X,                      # (M, N) input to dropout, contiguous
    Res,                    # (M, N) residual (unused unless HAS_RESIDUAL)
    W,                      # (N,) weight (unused unless HAS_WEIGHT)
    B,                      # (N,) bias (unused unless HAS_BIAS)
    Y,                      # (M, N) output, X's dtype
    Mean,                   # (M,) fp32 (written only when STORE_STATS)
    Rstd,                   # (M,) fp32 (written only when STORE_STATS)
    m,                      # rows
    n,                      # columns = row stride
    eps,                    # fp32
    scale,                  # fp32: 1 / P(keep) (dropout_constants)
    threshold,              # int: dropout keep threshold (see _keep_mask)
    Seed,                   # (1,) int64 Philox key (read only when HAS_DROPOUT)
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_STATS: tl.constexpr,  # the backward's mean and rstd; not without autograd (inference)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row_idx = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)    # [BLOCK_M]
    rows = row_idx[:, None]                                                       # [BLOCK_M, 1]
    cols = tl.arange(0, BLOCK_N)[None, :]                                         # [1, BLOCK_N]
    col_ok = cols < n
    mask = (rows < m) & col_ok
    offs = rows * n + cols

    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _keep_mask(tl.load(Seed), rows, threshold, BLOCK_M, BLOCK_N)
        s = tl.where(keep, s * scale, 0.0)
    if HAS_RESIDUAL:
        s += tl.load(Res + offs, mask=mask, other=0.0).to(tl.float32)

    mean = tl.sum(s, axis=1) / n                                                  # [BLOCK_M]
    diff = tl.where(col_ok, s - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(diff * diff, axis=1) / n + eps)                        # [BLOCK_M]
    y = diff * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(Mean + row_idx, mean, mask=row_idx < m)
        tl.store(Rstd + row_idx, rstd, mask=row_idx < m)


@triton.jit(do_not_specialize=["threshold"])
def _layer_norm_bwd_kernel(
    DY,                     # (M, N) gradient of y, contiguous
    X,                      # (M, N) forward input
    Res,                    # (M, N) forward residual (unused unless HAS_RESIDUAL)
    W,                      # (N,) weight (unused unless HAS_WEIGHT)
    Mean,                   # (M,) fp32
    Rstd,                   # (M,) fp32
    DX,                     # (M, N) gradient of x, X's dtype
    DRes,                   # (M, N) gradient of residual, its dtype (unused unless STORE_DRES)
    DW,                     # (programs, N) fp32 partial sums of dy * xhat (unused unless HAS_WEIGHT)
    DB,                     # (programs, N) fp32 partial sums of dy (unused unless HAS_BIAS)
    m,                      # rows
    n,                      # columns = row stride
    rows_per_program,       # int, a multiple of BLOCK_M
    scale,                  # fp32: 1 / P(keep) (dropout_constants)
    threshold,              # int: dropout keep threshold (see _keep_mask)
    Seed,                   # (1,) int64 Philox key (read only when HAS_DROPOUT)
    HAS_RESIDUAL: tl.constexpr,
    STORE_DRES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)[None, :]                                         # [1, BLOCK_N]
    col_ok = cols < n
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, m)
    for start in range(row_start, row_end, BLOCK_M):
        row_idx = tl.arange(0, BLOCK_M).to(tl.int64) + start                      # [BLOCK_M] int64
        rows = row_idx[:, None]
        row_ok = row_idx < m
        mask = row_ok[:, None] & col_ok
        offs = rows * n + cols

        s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rows, threshold, BLOCK_M, BLOCK_N)
            s = tl.where(keep, s * scale, 0.0)
        if HAS_RESIDUAL:
            s += tl.load(Res + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row_idx, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + row_idx, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        wdy = dy
        if HAS_WEIGHT:
            wdy = dy * w

        # ds = rstd * (wdy - mean(wdy) - xhat * mean(wdy * xhat))
        c1 = tl.sum(xhat * wdy, axis=1) / n
        c2 = tl.sum(wdy, axis=1) / n
        ds = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DROPOUT:
            tl.store(DX + offs, tl.where(keep, ds * scale, 0.0).to(DX.dtype.element_ty), mask=mask)
        else:
            tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)
        if STORE_DRES:
            tl.store(DRes + offs, ds.to(DRes.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy

    part = pid.to(tl.int64) * n + tl.arange(0, BLOCK_N)                          # [BLOCK_N]
    part_ok = tl.arange(0, BLOCK_N) < n
    if HAS_WEIGHT:
        tl.store(DW + part, tl.sum(dw_acc, axis=0), mask=part_ok)
    if HAS_BIAS:
        tl.store(DB + part, tl.sum(db_acc, axis=0), mask=part_ok)


@triton.jit
def _sum_partials_kernel(
    Part,                   # (S, P, N) fp32: S independent column sums, each over P rows of partial sums
    Out0,                   # (N,) result of sum 0, its own dtype
    Out1,                   # (N,) result of sum 1, its own dtype (unused when S == 1)
    chunks,                 # P
    n,                      # N
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                      # [BLOCK_N]
    col_ok = cols < n
    which = tl.program_id(1)
    part = Part + which.to(tl.int64) * chunks * n
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    # each step's tile is loaded one step ahead (as in linear.py's column sums): as a plain loop, ptxas
    # waited for each load of a step before it issued the next (sm_90 SASS)
    rows = tl.arange(0, BLOCK_P)                                                    # [BLOCK_P]
    tile = tl.load(part + rows[:, None].to(tl.int64) * n + cols[None, :],
                   mask=(rows < chunks)[:, None] & col_ok[None, :], other=0.0)
    for start in range(BLOCK_P, chunks + BLOCK_P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        next_tile = tl.load(part + rows[:, None].to(tl.int64) * n + cols[None, :],
                            mask=(rows < chunks)[:, None] & col_ok[None, :], other=0.0)  # all masked after the last
        acc += tile
        tile = next_tile
    total = tl.sum(acc, axis=0)
    if which == 0:
        tl.store(Out0 + cols, total.to(Out0.dtype.element_ty), mask=col_ok)
    else:
        tl.store(Out1 + cols, total.to(Out1.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=["threshold"])
def _dropout_mask_kernel(
    Keep,                   # (M, N) uint8 out: 1 = kept
    m,                      # rows
    n,                      # columns = row stride
    threshold,              # int: dropout keep threshold (see _keep_mask)
    Seed,                   # (1,) int64 Philox key
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    keep = _keep_mask(tl.load(Seed), rows, threshold, BLOCK_M, BLOCK_N)
    tl.store(Keep + rows * n + cols, keep.to(tl.uint8), mask=(rows < m) & (cols < n))


# ----------------------------------------------------------------------------- launchers
def _block_n(n: int) -> int:
    return max(MIN_BLOCK_N, _next_power_of_2(n))


def _launch_config(n: int, tile: int, elems_per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): about ``tile`` elements per block (whole rows of ``n``
    columns) and ``elems_per_thread`` per thread, within 4 .. MAX_WARPS warps."""
    block_n = _block_n(n)
    block_m = max(1, min(MAX_ROWS, tile // block_n))
    warp_size = 32
    num_warps = min(MAX_WARPS, max(4, block_m * block_n // (warp_size * elems_per_thread)))
    return block_m, block_n, num_warps


def _fwd_tile(n: int) -> int:
    """Elements per forward program for rows of n columns (FWD_TILE, FWD_TILE_NARROW)."""
    return FWD_TILE_NARROW if n <= NARROW_N else FWD_TILE


def dropout_constants(p: float, draw_range: int = DRAW_RANGE) -> tuple[int, float]:
    """(threshold, scale) of dropout with probability ``p`` on draws uniform in [0, draw_range) (the layer
    norm's 16-bit draws by default; the attention kernels' are 15-bit): a value is kept iff its draw >=
    threshold = round(p · draw_range) (at most draw_range - 1), so P(keep) = 1 - threshold / draw_range,
    within 1 / (2 draw_range) of 1 - p; kept values are scaled by 1 / P(keep), which keeps the expectation
    exact (1 / (1 - p) would be off by up to 2^-17 / (1 - p)², 7% at p = 0.9999, for 16-bit draws)."""
    threshold = min(round(p * draw_range), draw_range - 1)
    return threshold, draw_range / (draw_range - threshold)


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints >= 0 and b > 0, as triton.cdiv, which is a constexpr_function since Triton 3.5:
    from host code each call unwraps its arguments (1.5 µs against 0.07; a training step makes ~1400)."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n = 0), as triton.next_power_of_2 without its host-call cost."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # Triton interpreter on CPU: a few programs so the row loop runs more than once


def _split_rows(m: int, block_m: int, most: int, min_steps: int, least: int) -> tuple[int, int]:
    """(parts, rows per part) for m rows streamed in BLOCK_M-row steps, one partial row of sums per part:
    at most ``most`` parts, each at least ``min_steps`` steps long unless that leaves fewer than ``least``
    parts; rows per part are whole steps. At least one part (m = 0 too)."""
    row_blocks = max(1, _cdiv(m, block_m))
    parts = max(1, min(row_blocks, most, max(_cdiv(row_blocks, min_steps), least)))
    rows_per_part = _cdiv(row_blocks, parts) * block_m
    return max(1, _cdiv(m, rows_per_part)), rows_per_part


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device), a no-op on CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _sum_partials(part: torch.Tensor, *outs: torch.Tensor) -> None:
    """Stage 2 of a two-stage column reduction, one launch for up to two sums: outs[s] (N,) = Σ_p
    part[s, p, :] over the fp32 partials part (S, P, N), S = len(outs) ≤ 2, written in outs[s]'s dtype."""
    sums, chunks, n = part.shape
    assert sums == len(outs) in (1, 2) and part.dtype == torch.float32 and part.is_contiguous()
    if n == 0:
        return
    block_p = min(PARTIAL_TILE // PARTIAL_BLOCK_N, _next_power_of_2(max(1, chunks)))
    launch(_sum_partials_kernel, (_cdiv(n, PARTIAL_BLOCK_N), sums),
           part, outs[0], outs[-1], chunks, n, BLOCK_P=block_p, BLOCK_N=PARTIAL_BLOCK_N, num_warps=4)


def _check_rows(name: str, t: torch.Tensor, n: int) -> None:
    if t.dim() != 2 or t.shape[1] != n or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous (M, {n}) tensor, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")


def _seed_arg(seed: Optional[torch.Tensor], x: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The kernels' Seed pointer: the int64 (1,) seed on x's device, or x as an unread stand-in
    when there is no dropout."""
    return check_seed_tensor(seed, x.device) if dropout_p > 0.0 else x


def _fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
         bias: Optional[torch.Tensor], eps: float, dropout_p: float, seed: Optional[torch.Tensor],
         stats: bool = True):
    """Launch the forward on (M, N) rows. Returns y (M, N) in x's dtype, mean and rstd (M,) fp32 (empty
    (0,) tensors when not ``stats``: a forward that no backward follows)."""
    m, n = x.shape
    _check_rows("x", x, n)
    if residual is not None:
        _check_rows("residual", residual, n)
    seed = _seed_arg(seed, x, dropout_p)
    y = torch.empty_like(x)
    stats_rows = m if stats else 0
    mean = torch.empty(stats_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(stats_rows, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd
    block_m, block_n, num_warps = _launch_config(n, _fwd_tile(n), FWD_ELEMS_PER_THREAD)
    with _on_device(x):
        launch(_layer_norm_fwd_kernel, (_cdiv(m, block_m),),
               x, x if residual is None else residual, x if weight is None else weight,
               x if bias is None else bias, y, mean, rstd,
               m, n, eps, *reversed(dropout_constants(dropout_p)), seed,
               HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0,
               HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, STORE_STATS=stats,
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y, mean, rstd


def _stores_dres(x: torch.Tensor, residual: Optional[torch.Tensor], dropout_p: float) -> bool:
    """Whether the backward writes dresidual separately (else dresidual is dx itself)."""
    return residual is not None and (dropout_p > 0.0 or residual.dtype != x.dtype)


def _bwd(dy: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
         bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float,
         seed: Optional[torch.Tensor]):
    """Launch the backward. Returns (dx, dresidual or an empty tensor, dweight or empty, dbias or empty)."""
    m, n = x.shape
    for name, t in (("dy", dy), ("x", x)) + ((("residual", residual),) if residual is not None else ()):
        _check_rows(name, t, n)
    seed = _seed_arg(seed, x, dropout_p)
    dx = torch.empty_like(x)
    store_dres = _stores_dres(x, residual, dropout_p)
    dres = torch.empty_like(residual) if store_dres else x.new_empty(0)
    block_m, block_n, num_warps = _launch_config(n, BWD_TILE, BWD_ELEMS_PER_THREAD)
    sms = _sm_count(x.device)
    programs, rows_per_program = _split_rows(m, block_m, sms * max(1, BWD_WARPS_PER_SM // num_warps),
                                             BWD_MIN_STEPS, sms)
    # fp32 partial sums of dW and dB, one row per program each, in one buffer that one launch of
    # _sum_partials finishes (dw and db themselves are separate: custom-op outputs may not alias)
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    sums = [d for d, t in ((dw, weight), (db, bias)) if t is not None]
    alloc = torch.empty if m > 0 else torch.zeros        # every program writes its rows when m > 0
    part = alloc(len(sums), programs, n, dtype=torch.float32, device=x.device)
    with _on_device(x):
        if m > 0:
            launch(_layer_norm_bwd_kernel, (programs,),
                   dy, x, x if residual is None else residual, x if weight is None else weight, mean, rstd,
                   dx, dx if not store_dres else dres, part[0] if sums else x, part[-1] if sums else x,
                   m, n, rows_per_program, *reversed(dropout_constants(dropout_p)), seed,
                   HAS_RESIDUAL=residual is not None, STORE_DRES=store_dres, HAS_DROPOUT=dropout_p > 0.0,
                   HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        if sums:
            _sum_partials(part, *sums)
    return dx, dres, dw, db


# ----------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op(
    "fastelectra::layer_norm_fwd", mutates_args=(),
    schema="(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, float dropout_p, "
           "Tensor? seed) -> (Tensor, Tensor, Tensor)")
def _layer_norm_fwd_op(x, residual, weight, bias, eps, dropout_p, seed):
    return _fwd(x, residual, weight, bias, eps, dropout_p, seed)


@_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed):
    m = x.shape[0]
    return (torch.empty_like(x), x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op(
    "fastelectra::layer_norm_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
           "float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor)")
def _layer_norm_bwd_op(dy, x, residual, weight, bias, mean, rstd, dropout_p, seed):
    return _bwd(dy, x, residual, weight, bias, mean, rstd, dropout_p, seed)


@_layer_norm_bwd_op.register_fake
def _(dy, x, residual, weight, bias, mean, rstd, dropout_p, seed):
    dres = torch.empty_like(residual) if _stores_dres(x, residual, dropout_p) else x.new_empty(0)
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x), dres, dw, db


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, bias, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(mean, rstd)


def _backward_with(bwd, ctx, dy):
    """The autograd rule, with ``bwd`` the backward custom op (traced path) or its launcher (eager)."""
    x, residual, weight, bias, mean, rstd, seed = ctx.saved_tensors
    dx, dres, dw, db = bwd(dy.contiguous(), x, residual, weight, bias, mean, rstd, ctx.dropout_p, seed)
    if residual is not None and not _stores_dres(x, residual, ctx.dropout_p):
        dres = dx  # no dropout, same dtype: d(x + residual) flows unchanged to both
    return (dx, dres if residual is not None else None, dw if weight is not None else None,
            db if bias is not None else None, None, None, None)


_layer_norm_fwd_op.register_autograd(lambda ctx, dy, _dmean, _drstd: _backward_with(_layer_norm_bwd_op, ctx, dy),
                                     setup_context=_setup_context)
# eager calls: the same launchers and rule without the custom-op dispatch (fastelectra/autograd.py)
_layer_norm_eager = eager_function("_LayerNormFn", _fwd,
                                   lambda ctx, dy, _dmean, _drstd: _backward_with(_bwd, ctx, dy), _setup_context)


# ----------------------------------------------------------------------------- functional API
def _check_inputs(x, weight, bias, residual, eps, dropout_p) -> int:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if n > MAX_N:
        raise ValueError(f"fused_layer_norm supports hidden sizes up to {MAX_N}, got {n}")
    for name, t, shape in (("weight", weight, (n,)), ("bias", bias, (n,)), ("residual", residual, tuple(x.shape))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor or None, "
                            f"got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    _check_eps(eps)
    _check_dropout_p(dropout_p)
    return n


def fused_layer_norm(x, weight, bias, eps=1e-12, *, residual=None, dropout_p=0.0, seed=None):
    """y = LayerNorm(dropout(x, dropout_p) + residual) over the last dimension (Triton, autograd-capable).

    x, residual: (..., N) with 1 <= N <= 8192, any float dtype each; weight, bias: (N,) or None.
    Returns y of x's shape and dtype. ``dropout_p`` is applied as given (pass 0.0 in eval mode).
    ``seed`` (None | int | one-element integer tensor) keys the in-kernel dropout mask; the kernels
    read it from x's device. None draws it from torch's generator of x's device (no host sync;
    ``torch.manual_seed`` reproduces a run). Unused when ``dropout_p == 0``. The mask for a seed is
    ``dropout_mask(...)``.
    """
    n = _check_inputs(x, weight, bias, residual, eps, dropout_p)
    seed_t = seed_tensor(seed, x.device) if dropout_p > 0.0 else None
    # the kernels index weight and bias with stride 1 (a view such as w[::2] would read the wrong values)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    shape = x.shape
    x2 = x.reshape(-1, n).contiguous()
    res2 = residual.reshape(-1, n).contiguous() if residual is not None else None
    args = (x2, res2, weight, bias, float(eps), float(dropout_p), seed_t)
    if not use_eager(x2):                               # torch.compile, fake or functional tensors
        y = _layer_norm_fwd_op(*args)[0]
    elif needs_grad(x2, res2, weight, bias):
        y = _layer_norm_eager(*args)[0]
    else:                                               # no backward can follow: no mean/rstd, no Function
        y = _fwd(*args, stats=False)[0]
    return y.view(shape)


def dropout_mask(seed, shape, p: float, device=None) -> torch.Tensor:
    """The keep-mask (bool, ``shape`` = (..., N)) that ``fused_layer_norm`` uses for ``seed`` and ``p``.

    ``seed``: an int or a one-element integer tensor (as given to ``fused_layer_norm``).

    ``fused_layer_norm(x, ..., dropout_p=p, seed=seed)`` computes ``x * mask * dropout_constants(p)[1]``
    (1 / P(keep), within 2^-17 / (1 - p)² of 1 / (1 - p)) before the residual add, for x of this shape (rows
    are the flattened leading dimensions).
    """
    shape = tuple(shape)
    if len(shape) == 0 or shape[-1] == 0 or shape[-1] > MAX_N:
        raise ValueError(f"shape must end in a hidden size in [1, {MAX_N}], got {shape}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    n = shape[-1]
    m = 1
    for d in shape[:-1]:
        m *= d
    keep = torch.empty(m, n, dtype=torch.uint8, device=device)
    seed_t = seed_tensor(seed, keep.device)
    if m > 0:
        block_m, block_n, num_warps = _launch_config(n, _fwd_tile(n), FWD_ELEMS_PER_THREAD)
        with _on_device(keep):
            launch(_dropout_mask_kernel, (_cdiv(m, block_m),), keep, m, n, dropout_constants(p)[0], seed_t, BLOCK_M=block_m,
                   BLOCK_N=block_n, num_warps=num_warps)
    return keep.view(shape).bool()

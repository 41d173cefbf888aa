"""Linear layer whose backward reduces the bias gradient in Triton: y = x Wᵀ + b.

What it fuses. A linear layer's backward is two GEMMs (dx = dy W, dW = dyᵀ x) and one column
sum (db = Σ_rows dy). torch computes that sum with its generic reduction kernel, which on an H100
read the bias gradients of an ELECTRA-Base training step (99 calls over (16384, 256..3072) bf16
tensors) at about 1.1 TB/s, 3.4 ms of a 51 ms step (benchmarks/results/profile_*.md). Here it is
two Triton launches:

1. ``_column_partial_sums_kernel``: a grid of (column blocks) × (row chunks), about eight programs
   per SM; each program streams its chunk of rows once, accumulating fp32 sums in registers, and
   writes one row of partial sums.
2. ``_sum_partials_kernel``: sums those few rows per column and writes the result in the bias's
   dtype.

No atomics: the result is deterministic and does not depend on the launch order. The GEMMs and the
forward (cuBLAS through ``F.linear``, with its fused bias epilogue) are torch's.

Autocast. The fused path is a ``torch.autograd.Function``, which autocast does not see inside; the
functional API casts x, W and b to the autocast dtype first, as autocast does for ``F.linear``, so
the parameters' gradients return to their own dtype through those casts.

torch.compile traces ``F.linear`` instead (see fastelectra.ops.linear): inductor generates its own
fused reductions for the bias gradient, which a custom op would hide from it.

Limits: any (M, K) × (N, K) with N ≥ 1; dy rows are made contiguous for the column sum.

References: Triton tutorial 05 (the two-stage dW/dB reduction of its layer-norm backward);
torch.nn.functional.linear.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .layernorm import _on_device, _sm_count

__all__ = ["column_sums", "fused_linear"]

TILE = 4096             # elements per loop step of a stage-1 program (32 fp32 sums per thread at 4 warps)
MAX_BLOCK_N = 256       # columns per program: 512 contiguous bytes per bf16 row segment
MIN_BLOCK_N = 16
PROGRAMS_PER_SM = 8     # stage-1 programs in flight per SM: 8 x 8 KB of bf16 loads per loop step
PARTIAL_BLOCK_N = 32    # stage 2: columns per program (narrow: a few hundred partial rows each)
PARTIAL_BLOCK_P = 64    # stage 2: partial rows per loop step
NUM_WARPS = 4


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _column_partial_sums_kernel(
    X,                      # (M, N) input, row stride stride_m, unit column stride
    Part,                   # (chunks, N) fp32 out: one row of partial column sums per row chunk
    m,                      # rows
    n,                      # columns
    stride_m,               # elements between rows of X
    rows_per_program,       # int, a multiple of BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                 # [BLOCK_N]
    col_ok = cols < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid_m.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, m)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)                          # [BLOCK_M] int64
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        acc += tl.load(X + rows[:, None] * stride_m + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(Part + pid_m.to(tl.int64) * n + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _sum_partials_kernel(
    Part,                   # (chunks, N) fp32 partial sums
    Out,                    # (N,) result, its own dtype
    chunks,                 # rows of Part
    n,                      # columns
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                      # [BLOCK_N]
    col_ok = cols < n
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, chunks, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)                                        # [BLOCK_P]
        ok = (rows < chunks)[:, None] & col_ok[None, :]
        acc += tl.load(Part + rows[:, None].to(tl.int64) * n + cols[None, :], mask=ok, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------- launchers
def _plan(m: int, n: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, row chunks, rows per chunk) for column sums of an (m, n) tensor: about
    PROGRAMS_PER_SM programs per SM, each streaming whole BLOCK_M-row steps of its chunk."""
    block_n = min(MAX_BLOCK_N, max(MIN_BLOCK_N, triton.next_power_of_2(n)))
    block_m = TILE // block_n
    column_blocks = triton.cdiv(n, block_n)
    row_blocks = triton.cdiv(m, block_m)
    chunks = max(1, min(row_blocks, triton.cdiv(_sm_count(device) * PROGRAMS_PER_SM, column_blocks)))
    rows_per_chunk = triton.cdiv(row_blocks, chunks) * block_m
    return block_m, block_n, triton.cdiv(m, rows_per_chunk), rows_per_chunk


def column_sums(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Σ over rows of a 2-D tensor x (M, N) → (N,) in ``dtype`` (default x's), summed in fp32.

    Deterministic (no atomics). Rows may have any stride; columns are made contiguous if they are not.
    M = 0 gives zeros."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (rows, columns), got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    m, n = x.shape
    out = torch.empty(n, dtype=dtype or x.dtype, device=x.device)
    if n == 0:
        return out
    if m == 0:
        return out.zero_()
    if x.stride(1) != 1:
        x = x.contiguous()
    block_m, block_n, chunks, rows_per_chunk = _plan(m, n, x.device)
    part = torch.empty(chunks, n, dtype=torch.float32, device=x.device)
    with _on_device(x):
        _column_partial_sums_kernel[(triton.cdiv(n, block_n), chunks)](
            x, part, m, n, x.stride(0), rows_per_chunk, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)
        _sum_partials_kernel[(triton.cdiv(n, PARTIAL_BLOCK_N),)](
            part, out, chunks, n, BLOCK_P=PARTIAL_BLOCK_P, BLOCK_N=PARTIAL_BLOCK_N, num_warps=NUM_WARPS)
    return out


# ----------------------------------------------------------------------------- autograd
class _LinearFn(torch.autograd.Function):
    """y = x Wᵀ + b on rows x (M, K); the backward's bias gradient is :func:`column_sums`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = dy @ weight if need_x else None                                        # (M, K)
        dw = dy.t() @ x if need_w else None                                         # (N, K)
        db = column_sums(dy, ctx.bias_dtype) if need_b else None                    # (N,)
        return dx, dw, db


# ----------------------------------------------------------------------------- functional API
def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ + b, as ``F.linear``, with the bias gradient reduced by :func:`column_sums`.

    x: (..., K); weight: (N, K); bias: (N,). Under autocast, x, weight and bias are cast to the
    autocast dtype (as autocast does for F.linear); otherwise all three must share one dtype.
    Returns (..., N) in that dtype; differentiable in x, weight and bias."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., K) and weight (N, K) must agree in K, got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    elif not x.dtype == weight.dtype == bias.dtype:
        raise TypeError(f"x, weight and bias must share one dtype outside autocast, got {x.dtype}, "
                        f"{weight.dtype}, {bias.dtype}")
    y = _LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, bias)                 # (M, N)
    return y.view(*x.shape[:-1], weight.shape[0])

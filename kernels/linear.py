"""Linear layer whose backward reduces the bias gradient in Triton: y = x Wᵀ + b.

What it fuses. A linear layer's backward is two GEMMs (dx = dy W, dW = dyᵀ x) and one column
sum (db = Σ_rows dy). torch computes that sum with its generic reduction kernel, which on an H100
read the bias gradients of an ELECTRA-Base training step (99 calls over (16384, 256..3072) bf16
tensors) at about 1.1 TB/s, 3.4 ms of a 51 ms step (benchmarks/results/profile_*.md). Here it is
two Triton launches:

1. ``_column_partial_sums_kernel``: a grid of (column blocks) × (row chunks), up to four programs
   per SM, each at least eight loop steps long where that still leaves one per SM (``_plan``); each
   program streams its chunk of rows once, accumulating fp32 sums in registers, and writes one row of
   partial sums.
2. ``_sum_partials_kernel`` (kernels/layernorm.py, which finishes its dW/dB the same way): sums
   those few rows per column and writes the result in the bias's dtype.

No atomics: the result is deterministic and does not depend on the launch order. The GEMMs and the
forward (cuBLAS through ``F.linear``, with its fused bias epilogue) are torch's.

With an activation, y = act(x Wᵀ + b) (ELECTRA's feed-forward up-projection and its discriminator
head), the backward's elementwise part joins the first stage: given an ACTIVATION,
``_column_partial_sums_kernel`` reads the pre-activation h and dy once, writes dh = dy · act'(h) and
sums dh over its rows in the same pass. Unfused, torch's activation backward writes dh and the bias
sum reads it again: one (M, N) read less per layer here (at ELECTRA-Base, 16384 x 3072 bf16: 100 MB
per layer) and one launch less. Activations: transformers' "gelu" (erf), "gelu_new" (tanh
approximation), "relu" and "silu"; act'(h) is evaluated in fp32, as torch's backward kernels do.

Autocast. The fused path is a ``torch.autograd.Function``, which autocast does not see inside; x, W
and b enter it in their own dtype (fp32 master weights, typically) and it casts them to the autocast
dtype for the forward GEMM, as autocast does for ``F.linear``, returning each gradient in its input's
dtype. For W and b that is direct: the column sum writes db in fp32 from its fp32 accumulators, and
on CUDA dW = dyᵀ x is one GEMM that accumulates and writes fp32 (aten's ``mm.dtype``). Autocast
instead rounds both to bf16 and casts them back, one extra elementwise launch per parameter: about
200 launches per ELECTRA step (the H100 profile's ``direct_copy_kernel`` rows: 208 calls, 1.2 ms of
the Base step). The gradients are also no longer rounded to bf16 on the way.

torch.compile traces ``F.linear`` instead (see fastelectra.ops.linear): inductor generates its own
fused reductions for the bias gradient, which a custom op would hide from it.

When it runs. ``fastelectra.ops.linear`` takes this path only inside a CUDA graph's warm-up and capture
(fastelectra.graphs.replayed_work). Each call costs the host an autograd.Function and two Triton launches
in the backward, about 65 µs more than ``F.linear`` per forward + backward on a 2-core CPU
(benchmarks/host_overhead.py): an un-graphed step, which is host-bound, would pay that every step for GPU
savings of a few µs; a replayed graph pays it once.

Residual connections. A post-LN block feeds its input h both to a linear layer and to the residual of
its LayerNorm tail, so autograd adds the two gradients of h with one more elementwise pass (read two
(M, K) tensors, write one: 75 MB per fork at ELECTRA-Base, 48 forks per step). With ``return_input``
the linear layer also returns h itself; given to the tail as its residual, its gradient arrives in this
Function's backward and is added by the dx GEMM's epilogue (``addmm``), which reads it once.

Limits: any (M, K) × (N, K) with N ≥ 1; dy rows are made contiguous for the column sum.

References: Triton tutorial 05 (the two-stage dW/dB reduction of its layer-norm backward);
torch.nn.functional.linear.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from ..backend import cast_of
from ..ops import ACTIVATIONS, _check_activation
from .layernorm import _cdiv, _next_power_of_2, _on_device, _sm_count, _split_rows, _sum_partials
from .launch import launch

__all__ = ["column_sums", "fused_linear", "activation_backward"]

# transformers' activation name -> the kernels' ACTIVATION code (the forward is ops.ACTIVATIONS[name])
ACTIVATION_CODES = {"gelu": 1, "gelu_new": 2, "relu": 3, "silu": 4}
assert ACTIVATION_CODES.keys() == ACTIVATIONS.keys(), "every reference activation needs its kernel code"

# bytes of x per loop step of a stage-1 program: four 16-byte loads per thread at 4 warps, so every dtype
# keeps the same loads in flight (bf16: 4096 elements, 32 fp32 sums per thread; fp32: 2048 elements, whose
# 4096 took 116 registers on sm_90 against 48 and 4 programs per SM against PROGRAMS_PER_SM, and ptxas
# waited on 8 loads per step)
TILE_BYTES = 8192
MAX_BLOCK_N = 256       # columns per program: 512 contiguous bytes per bf16 row segment
MIN_BLOCK_N = 16
# Stage-1 programs per SM at most, and loop steps per program at least (fewer partial rows for stage 2
# to sum), unless that leaves fewer programs than SMs. Measured on an H100 (bench_linear --sweep,
# linear_sweep_*_20261124, 16384 rows): the sum's time grows with the number of partial rows, so at
# N <= 1024 the 1024..256 partial rows of 8 programs per SM and 1 step made bf16 sums 1.5-2.3x slower
# than 128 partial rows; from N = 2304, 4 programs per SM beat 8 and 2. Each width bench_linear times
# launches at (4, 8) as one of that sweep's timed rows (benchmarks/NOTES.md).
PROGRAMS_PER_SM = 4
MIN_STEPS = 8
# Activation backward: two inputs and one output per element, so a smaller tile. The 2026-11-24 H100 sweep
# timed 2048 against 4096 faster in 9 of its 10 cases (bf16 2-4% at every width, fp32 up to 3%; 2% slower
# at fp32 N = 256), with the same plan; on sm_90 its bf16 stage 1 takes 40 registers instead of 94.
ACT_TILE_BYTES = 2048
# The activation backward's plan: still the shipped (8, 1) that its ACT_TILE_BYTES sweep ran under, as
# its stage 1 moves three tensors per element (dy, h in, dh out); bench_linear --sweep now varies both.
ACT_PROGRAMS_PER_SM = 8
ACT_MIN_STEPS = 1
NUM_WARPS = 4
HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")   # aten mm.dtype: a GEMM writing another dtype than its inputs'


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _activation_grad(h, ACTIVATION: tl.constexpr):
    """d act(h) / dh in fp32 (h fp32), for the ACTIVATION_CODES."""
    if ACTIVATION == 1:      # erf GELU: Φ(h) + h φ(h)
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))                   # 1/sqrt(2)
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327                           # 1/sqrt(2 pi)
        return cdf + h * pdf
    elif ACTIVATION == 2:    # tanh GELU: 0.5 (1 + t) + 0.5 h (1 - t²) k (1 + 3c h²), t = tanh(k (h + c h³))
        k = 0.7978845608028654                                                     # sqrt(2/pi)
        c = 0.044715
        u = tl.minimum(tl.maximum(k * (h + c * h * h * h), -15.0), 15.0)          # tanh(±15) = ±1 in fp32
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0                                         # tanh(u) = 2σ(2u) - 1
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * k * (1.0 + 3.0 * c * h * h)
    elif ACTIVATION == 3:    # ReLU (torch: gradient 0 at h = 0)
        return tl.where(h > 0.0, 1.0, 0.0)
    else:                    # SiLU: σ(h) (1 + h (1 - σ(h)))
        sig = tl.sigmoid(h)
        return sig * (1.0 + h * (1.0 - sig))


@triton.jit
def _column_partial_sums_kernel(
    X,                      # (M, N) values to sum (row stride stride_m, unit column stride); with an
                            #   ACTIVATION: dy, the gradient of act(h)
    H,                      # (M, N) pre-activation h, row stride stride_m (read only with an ACTIVATION)
    DH,                     # (M, N) out: dy * act'(h) in H's dtype, the values summed (only with an ACTIVATION)
    Part,                   # (chunks, N) fp32 out: one row of partial column sums per row chunk
    m,                      # rows
    n,                      # columns
    stride_m,               # elements between rows of X (and of H, DH)
    rows_per_program,       # int, a multiple of BLOCK_M
    ACTIVATION: tl.constexpr,   # 0: sum X itself; else an ACTIVATION_CODES value
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WIDE: tl.constexpr,         # BLOCK_M * stride_m >= 2^31: offsets within a step in int64
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                                 # [BLOCK_N]
    col_ok = cols < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid_m.to(tl.int64) * rows_per_program
    rows_left = tl.minimum(rows_per_program, m - row_start).to(tl.int32)           # rows of this chunk
    chunk = row_start * stride_m                                                   # int64: its first element
    X += chunk
    H += chunk
    DH += chunk
    local = tl.arange(0, BLOCK_M)                                                  # [BLOCK_M] row in the step
    if WIDE:
        local = local.to(tl.int64)
    offs = local[:, None] * stride_m + cols[None, :]                               # within one step
    step = tl.full((), BLOCK_M, local.dtype) * stride_m                            # elements per step
    # Each step's tile is loaded one step ahead, before the current one is summed: written as a plain
    # loop, ptxas issued a thread's 16-byte loads of a step one after another, each after the adds of
    # the one before (sm_90 SASS: 4 load latencies per step instead of 1), and a program is only a few
    # steps long.
    ok = (local < rows_left)[:, None] & col_ok[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0)
    if ACTIVATION != 0:
        h = tl.load(H + offs, mask=ok, other=0.0)
    for first in range(BLOCK_M, rows_left + BLOCK_M, BLOCK_M):                      # the next step's first row
        next_ok = (first + local < rows_left)[:, None] & col_ok[None, :]         # all False after the last
        next_x = tl.load(X + step + offs, mask=next_ok, other=0.0)
        v = x.to(tl.float32)
        if ACTIVATION != 0:
            next_h = tl.load(H + step + offs, mask=next_ok, other=0.0)
            v = v * _activation_grad(h.to(tl.float32), ACTIVATION)                 # 0 where masked (dy = 0)
            tl.store(DH + offs, v.to(DH.dtype.element_ty), mask=ok)
            DH += step
            H += step
            h = next_h
        acc += v
        X += step
        x, ok = next_x, next_ok
    tl.store(Part + pid_m.to(tl.int64) * n + cols, tl.sum(acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------- launchers
def _plan(m: int, n: int, device: torch.device, tile: int, programs_per_sm: int,
          min_steps: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, row chunks, rows per chunk) for column sums of an (m, n) tensor in BLOCK_M-row
    steps of ``tile`` elements: at most ``programs_per_sm`` programs per SM; each program streams at least
    ``min_steps`` steps, unless that would leave fewer programs than SMs (small sums keep their
    parallelism; they have few partial rows anyway)."""
    block_n = min(MAX_BLOCK_N, max(MIN_BLOCK_N, _next_power_of_2(n)))
    block_m = max(1, tile // block_n)
    column_blocks = _cdiv(n, block_n)
    sms = _sm_count(device)
    # programs = chunks x column blocks: the caps and the floor in chunks
    chunks, rows_per_chunk = _split_rows(m, block_m, _cdiv(sms * programs_per_sm, column_blocks), min_steps,
                                         _cdiv(sms, column_blocks))
    return block_m, block_n, chunks, rows_per_chunk


def _stage_one(activation: int, element_size: int) -> tuple[int, int, int]:
    """(tile in elements, programs per SM, min steps) of a stage-1 launch: the column sum's constants, or
    the activation backward's. Read at each call (bench_linear --sweep varies them)."""
    if activation == 0:
        return TILE_BYTES // element_size, PROGRAMS_PER_SM, MIN_STEPS
    return ACT_TILE_BYTES // element_size, ACT_PROGRAMS_PER_SM, ACT_MIN_STEPS


def _partial_sums(x: torch.Tensor, h: torch.Tensor, dh: torch.Tensor, activation: int) -> torch.Tensor:
    """Stage 1 over x (M, N), unit column stride (with an ACTIVATION code: dy, beside h and dh of its
    layout): launches _column_partial_sums_kernel as _plan lays it out with _stage_one's constants and
    returns its (chunks, N) fp32 partial sums. Call on x's device."""
    m, n = x.shape
    stride = x.stride(0)
    block_m, block_n, chunks, rows_per_chunk = _plan(m, n, x.device, *_stage_one(activation, x.element_size()))
    part = torch.empty(chunks, n, dtype=torch.float32, device=x.device)
    launch(_column_partial_sums_kernel, (_cdiv(n, block_n), chunks),
           x, h, dh, part, m, n, stride, rows_per_chunk, ACTIVATION=activation,
           BLOCK_M=block_m, BLOCK_N=block_n, WIDE=block_m * stride >= 2**31, num_warps=NUM_WARPS)
    return part


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
    with _on_device(x):
        _sum_partials(_partial_sums(x, x, x, 0)[None], out)
    return out


def activation_backward(dy: torch.Tensor, h: torch.Tensor, activation: str,
                        bias_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backward of y = act(h) for 2-D h (M, N): returns (dh in h's dtype, Σ_rows dh in ``bias_dtype`` or
    None when ``bias_dtype`` is None). One pass over dy and h for both; the sum is deterministic."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    if h.dim() != 2 or dy.shape != h.shape:
        raise ValueError(f"dy and h must be 2-D tensors of one shape, got {tuple(dy.shape)} and {tuple(h.shape)}")
    dy, h = dy.contiguous(), h.contiguous()
    m, n = h.shape
    dh = torch.empty_like(h)
    db = torch.empty(n, dtype=bias_dtype, device=h.device) if bias_dtype is not None else None
    if m == 0 or n == 0:
        return dh, db.zero_() if db is not None else None
    with _on_device(h):
        part = _partial_sums(dy, h, dh, ACTIVATION_CODES[activation])
        if db is not None:
            _sum_partials(part[None], db)
    return dh, db


def _matmul_into(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b (2-D) returned in ``dtype``. For fp16/bf16 inputs and an fp32 result on CUDA this is one
    GEMM that accumulates and writes fp32; elsewhere the GEMM runs in the inputs' dtype and is cast."""
    if dtype == a.dtype:
        return a @ b
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16) and HAS_MM_OUT_DTYPE:
        return torch.ops.aten.mm.dtype(a, b, dtype)
    return (a @ b).to(dtype)


# ----------------------------------------------------------------------------- autograd
class _LinearFn(torch.autograd.Function):
    """y = act(x Wᵀ + b) (act optional) on rows x (M, K), computed in ``dtype``: x, W and b are cast to it
    here (autocast) and all three get their gradients in their own dtype. The backward's bias gradient
    is :func:`column_sums`, or comes out of :func:`activation_backward`'s pass with an activation.
    With ``return_input`` the outputs are (y, x itself as a view): the gradient arriving through that
    view (a residual connection's) is added to dx by the dx GEMM (addmm, beta = 1)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, activation, return_input):
        # the parameters' copies in ``dtype`` come from one multi-tensor copy per step where cast_once is in force
        xc, w, b = x.to(dtype), cast_of(weight, dtype), cast_of(bias, dtype)
        h = F.linear(xc, w, b)                                                       # (M, N)
        ctx.dtypes = x.dtype, weight.dtype, bias.dtype
        ctx.activation = activation
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(xc, w, *(() if activation is None else (h,)))
        y = h if activation is None else ACTIVATIONS[activation](h)
        return (y, x.view_as(x)) if return_input else y

    @staticmethod
    @once_differentiable   # Triton and fp32-output GEMMs: a double backward is an error, not silently wrong
    def backward(ctx, dy, dres=None):
        xc, w, *h = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if dy is None:                                        # only the returned input was used
            return dres, None, None, None, None, None
        if ctx.activation is None:
            dh = dy.contiguous()
            db = column_sums(dh, b_dtype) if need_b else None                         # (N,)
        else:
            dh, db = activation_backward(dy, h[0], ctx.activation, b_dtype if need_b else None)
        dx = None
        if need_x:
            if dres is not None and dres.dtype == dh.dtype == x_dtype:
                dx = torch.addmm(dres, dh, w)                 # + the residual's gradient, in the epilogue
            else:
                dx = (dh @ w).to(x_dtype)                                             # (M, K)
                dx = dx if dres is None else dx + dres
        dw = _matmul_into(dh.t(), xc, w_dtype) if need_w else None                    # (N, K)
        return dx, dw, db, None, None, None


# ----------------------------------------------------------------------------- functional API
def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 activation: Optional[str] = None, return_input: bool = False):
    """y = x Wᵀ + b, as ``F.linear``, with the bias gradient reduced by :func:`column_sums`; with
    ``activation`` ("gelu", "gelu_new", "relu" or "silu") y = act(x Wᵀ + b), its backward fused with the bias sum.

    x: (..., K); weight: (N, K); bias: (N,). Under autocast the GEMMs run in the autocast dtype (as
    autocast does for F.linear) and x, weight and bias get their gradients in their own dtype (the
    parameters' without a bf16 round trip); otherwise all three must share one dtype. Returns (..., N)
    in that dtype; differentiable in x, weight and bias. With ``return_input`` it returns (y, x') where
    x' is x itself (a view): pass x' on to the other consumer of x (a residual connection) and the
    gradient it receives is added to dx inside the dx GEMM, not by autograd's separate addition."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., K) and weight (N, K) must agree in K, got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    _check_activation(activation)
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)     # x, W and b are cast inside (see the header)
    elif not x.dtype == weight.dtype == bias.dtype:
        raise TypeError(f"x, weight and bias must share one dtype outside autocast, got {x.dtype}, "
                        f"{weight.dtype}, {bias.dtype}")
    else:
        dtype = x.dtype
    rows = math.prod(x.shape[:-1])                          # (reshape(-1, K) fails for K = 0)
    out = _LinearFn.apply(x.reshape(rows, x.shape[-1]), weight, bias, dtype, activation, return_input)
    if return_input:
        return out[0].view(*x.shape[:-1], weight.shape[0]), out[1].view(x.shape)
    return out.view(*x.shape[:-1], weight.shape[0])                                 # (..., N)

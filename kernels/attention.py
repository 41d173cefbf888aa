"""Fused multi-head attention for ELECTRA: key-padding mask + dropout, forward and backward.

What it fuses. Forward: S = Q Kᵀ·scale, the key-padding mask, an online (streaming) softmax in
base 2 with the scale folded into the exponent, dropout on the probabilities and P·V in one
pass over K/V per block of query rows; it saves only the output and the row log-sum-exp.
Backward: one kernel per block of queries accumulates dQ over all keys and computes
delta = rowsum(dO ∘ O) of its rows on the way, then one kernel per block of keys accumulates dK/dV
over all queries, both recomputing P from the saved log-sum-exp. No (T × T) matrix is ever in memory.

Layout. Tensors stay in the projection's layout (batch, seqlen, nheads, headdim), any strides
with a unit last stride: the kernels take strides, nothing is transposed through memory. The
varlen mode takes packed tokens (total, nheads, headdim) with cumulative sequence lengths, so
padded batches skip the padding entirely. ``flash_attention_qkvpacked`` takes the fused QKV
projection's output (..., 3, nheads, headdim) itself and returns its gradient as one tensor,
the three backward kernels' outputs written side by side (no stacking copy in autograd).

Key-padding mask. As per-sequence lengths (prefix masks) or as a general (batch, seqlen_k)
boolean mask, honoured exactly. Each program first reads its sequence's mask row to find the last
valid key (key blocks past it are never visited) and whether the mask is a prefix; the launcher
does nothing with it. Only tiles that may hold invalid keys are masked: for a prefix, the one with
its end; for a mask with holes, all. The forward and dQ kernels run full tiles in a loop without
the mask (nor the predicated loads), then the rest; dK/dV zeroes the rows of invalid keys once,
after its loop, and runs whole tiles of query rows without row predicates, then the tile that holds
the end of the rows with them. A sequence without a valid key gives zeros (not NaN).

Dropout. Philox2x32-7 in the kernels, regenerated identically in the backward, never stored.
One call gives two 32-bit words = four 15-bit draws, the keep decisions of a 2 x 2 block: query
rows {r, r + 8} x keys {n, n + 8} with r % 16 < 8 and n % 16 < 8 (word 0 for row r, word 1 for row
r + 8; bits 0-14 for key n, bits 16-30 for key n + 8; bits 15 and 31 are not used). A probability is
dropped when its draw is below T = round(p·2¹⁵). 15 bits, not 16, because then one f16x2 compare
(HSETP2) tests both draws of a word against T at once, as the magnitudes of two f16 bit patterns,
and sets the two predicates of the two selects: |f16| orders the patterns below 0x7C00 (inf) as
integers, and the NaNs above compare as kept, which they are for T <= 0x7C00 (p <= 0.96875; larger p
compile integer compares). That is 3 instructions per 2 probabilities where a 16-bit draw took 5
(a mask of the low half, two integer compares, two selects). With p(x) = 8·(x // 16) + x % 8 (the
pair of x) and P = 8·cdiv(seqlen_k, 16) (key pairs per row pair), the block of (batch b, head h) takes
the Philox key seed_lo and the counter
    (p(r)·P + p(n),  b·nheads + h + seed_hi)       (two 32-bit words, the second mod 2³²)
for the int64 seed = seed_hi·2³² + seed_lo. The MMA accumulator layout gives each thread whole
2 x 2 blocks whether the rows of a tile are queries (forward, dQ) or keys (dK/dV), so no kernel moves
random bits between threads (benchmarks/sass_loops.py reads it off the sm_90 SASS). Per draw it
costs what Philox4x32 does: each round is one wide multiply and one three-way XOR per two draws.
Seven rounds, as FlashAttention-2 and CK use for dropout; Random123 lists Philox2x32-7, like
Philox4x32-7, as crush-resistant (TestU01) with no safety margin. The mask does not depend on
block sizes; with dropout, sequences are limited to 2¹⁷ tokens (32-bit counters); the varlen mode
(seqlen_q = seqlen_k = max_seqlen) draws the same mask as the padded layout. ``dropout_mask``
returns it for tests.
The seed is an int64 (1,) tensor on q's device (fastelectra.rng) that the kernels load: no
``.item()``, no host sync, and a CUDA-graph replay uses the fresh seed drawn in the graph.

Limits. Non-causal; headdim 16, 32, 64 or 128; fp16 and bf16 (fp32 runs a correct, slower path
with IEEE-precision dots); self-attention in the varlen mode (one cu_seqlens for q and k).

References. T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (2023); the Triton fused-attention tutorial (06-fused-attention.py);
J. Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011) for Philox.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..autograd import eager_function, needs_grad, use_eager
from ..ops import _check_dropout_p, _check_softmax_scale
from ..rng import check_seed_tensor, seed_tensor
from .layernorm import _cdiv, _next_power_of_2, _on_device, dropout_constants
from .launch import launch

__all__ = ["flash_attention", "flash_attention_varlen", "flash_attention_qkvpacked", "dropout_mask",
           "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634           # 1/ln 2: exp(x) = exp2(x / ln 2)
DRAW_BITS = 15                       # bits of one dropout draw: a 32-bit Philox word holds two
DRAW_MASK = tl.constexpr((1 << DRAW_BITS) - 1)  # a draw's bits in its 16-bit half of the word
PHILOX_ROUNDS = tl.constexpr(7)      # Philox2x32-7 (see "Dropout" above)
DROP_BLOCK = tl.constexpr(16)        # a call decides rows {r, r+8} x keys {n, n+8} of a 16 x 16 block
DRAW_RANGE = 1 << DRAW_BITS          # draws are uniform in [0, DRAW_RANGE)
F16_MAX_THRESHOLD = 0x7C00           # f16 +inf: the largest threshold the f16x2 compare takes
# _zero_dropped's PTX: ($2, $3) with each set to 0 where its draw in word $4 (bits 0-14 for $2, 16-30 for
# $3) is below the threshold in both halves of $5. |f16| of a half is its 15-bit draw as a number; geu
# keeps NaNs (draws above 0x7C00 >= threshold). ptxas folds the abs into HSETP2's operand.
_SELECT_PAIR = tl.constexpr("{ .reg .pred lo, hi; .reg .b32 d; abs.f16x2 d, $4; setp.geu.f16x2 lo|hi, d, $5; "
                            "selp.f32 $0, $2, 0f00000000, lo; selp.f32 $1, $3, 0f00000000, hi; }")
MAX_DROPOUT_SEQLEN = 2**17           # a head's (T/2)^2 Philox counters stay below 2^32

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Two things differ under the interpreter: it multiplies bfloat16 bit patterns as integers in tl.dot
# (triton 3.9), so the kernels widen dot operands to fp32 first (exact for 16-bit inputs), and it runs
# no inline PTX, so Philox multiplies with umulhi + mul. Compiled kernels are unaffected.
_IN_INTERPRETER = tl.constexpr(_INTERPRET)
MASK_SCAN = tl.constexpr(16 if _INTERPRET else 1024)   # mask bytes a program reads per step of _mask_extent


# ============================================================================ Triton kernels
@triton.jit
def _mma(
    a,               # (M, K) fp16/bf16/fp32
    b,               # (K, N) like a
    acc,             # (M, N) fp32 accumulator, or None
    DOT_PRECISION: tl.constexpr,
):
    if _IN_INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _rng_pairs(
    seqlen,          # query rows or keys per sequence
):
    """p(seqlen): Philox counters per query-row pair, or query-row pairs (see "Dropout" above). A seqlen of 1
    arrives as a Python int (Triton specializes the value 1 into a constant): adding a uint32 zero makes
    either a uint32 scalar."""
    return tl.cdiv(seqlen, DROP_BLOCK) * (DROP_BLOCK // 2) + tl.zeros((), dtype=tl.uint32)


@triton.jit
def _mul_wide(
    a,               # (…) uint32
    M: tl.constexpr, # uint32 multiplier
):
    """(high, low) 32-bit words of the 64-bit product a·M: one IMAD.WIDE.U32 on the GPU."""
    if _IN_INTERPRETER:
        return tl.math.umulhi(a, M), a * M
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 t; mul.wide.u32 t, $2, $3; mov.b64 {$1, $0}, t; }", "=r,=r,r,r",
            [a, tl.full(a.shape, M, tl.uint32)], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)


@triton.jit
def _philox2x32(
    c0, c1,          # (…) uint32 counter words
    k,               # scalar uint32 key
    N_ROUNDS: tl.constexpr,
):
    """Philox2x32 (Salmon et al. 2011; Random123's constants and known answers, tests/philox_ref.py),
    with one 32x32->64-bit product per round so it compiles to a single IMAD.WIDE."""
    for _ in tl.static_range(N_ROUNDS):
        hi, lo = _mul_wide(c0, 0xD256D193)                      # PHILOX_M2x32_0
        c0 = hi ^ c1 ^ k
        c1 = lo
        k = k + 0x9E3779B9                                      # PHILOX_W32_0 (golden ratio)
    return c0, c1


@triton.jit
def _dropout_words(
    seed,            # scalar int64: low word the Philox key, high word added to the counter's high word
    bh,              # batch * nheads + head
    pairs_k,         # counters per query-row pair (_rng_pairs(seqlen_k))
    start_m,         # first query row of the tile, a multiple of DROP_BLOCK
    start_n,         # first key of the tile, a multiple of DROP_BLOCK
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KEYS_BY_ROW: tl.constexpr,  # the tile is (BLOCK_N keys, BLOCK_M queries), else (BLOCK_M, BLOCK_N)
):
    """The two Philox words of every call of a tile, on the grid (tile rows / 2, tile cols / 2) of
    its 2 x 2 blocks: (row pair, key pair), or (key pair, row pair) when KEYS_BY_ROW."""
    tl.static_assert(BLOCK_M % DROP_BLOCK.value == 0 and BLOCK_N % DROP_BLOCK.value == 0,
                     "dropout tiles are whole 16 x 16 blocks")
    pair_m = (start_m // 2 + tl.arange(0, BLOCK_M // 2)).to(tl.uint32)    # p(r) = 8 (r // 16) + r % 8
    pair_n = (start_n // 2 + tl.arange(0, BLOCK_N // 2)).to(tl.uint32)
    if KEYS_BY_ROW:
        c0 = pair_m[None, :] * pairs_k + pair_n[:, None]
    else:
        c0 = pair_m[:, None] * pairs_k + pair_n[None, :]
    key = seed.to(tl.uint64)
    c1 = bh.to(tl.uint32) + (key >> 32).to(tl.uint32)
    return _philox2x32(c0, tl.full(c0.shape, 0, tl.uint32) + c1, key.to(tl.uint32), PHILOX_ROUNDS)


@triton.jit
def _zero_dropped(
    x_lo, x_hi,      # (…) the two tile corners whose draws share a Philox word: bits 0-14, bits 16-30
    word,            # (…) uint32 Philox word
    drop_threshold,  # int32: a 15-bit draw below it drops
    F16_DRAWS: tl.constexpr,  # drop_threshold <= F16_MAX_THRESHOLD: one f16x2 compare per word
):
    """(x_lo, x_hi), each 0 where its draw is below the threshold. For fp32 x the compare and the two
    selects are one PTX block: as tl.where, LLVM sinks the select below the caller's cast to bf16 and
    selects 16-bit halves with byte permutes (two more instructions per element on sm_90)."""
    t = drop_threshold.to(tl.uint32)
    if _IN_INTERPRETER or x_lo.dtype != tl.float32 or not F16_DRAWS:
        return (tl.where((word & DRAW_MASK) >= t, x_lo, 0),
                tl.where(((word >> 16) & DRAW_MASK) >= t, x_hi, 0))
    return tl.inline_asm_elementwise(_SELECT_PAIR, "=f,=f,f,f,r,r",
                                     [x_lo, x_hi, word, tl.full(x_lo.shape, 0, tl.uint32) + (t | (t << 16))],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _dropout_apply(
    x,               # (ROWS, COLS) tile
    w0, w1,          # (ROWS / 2, COLS / 2) uint32 Philox words of its 2 x 2 blocks (_dropout_words)
    drop_threshold,  # int32: a 15-bit draw below it drops
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    KEYS_BY_ROW: tl.constexpr,  # rows are keys (the dK/dV tile), else query rows
    F16_DRAWS: tl.constexpr,    # see _zero_dropped
):
    """x with its dropped entries set to 0. A call decides the block query rows {r, r + 8} x keys
    {n, n + 8} (r % 16 < 8, n % 16 < 8): word 0 for row r, word 1 for row r + 8, bits 0-14 for key n,
    bits 16-30 for key n + 8. An MMA accumulator thread holds whole such blocks whichever side the
    keys are on (rows g, g + 8 of each 16-row slab, columns 2c, 2c + 1 of each 8-column group), so x is
    split into its four block corners and put back together in registers: no data moves between
    threads (benchmarks/sass_loops.py reads it off the sm_90 SASS)."""
    # (row, col) = (16 I + 8 hr + i, 16 J + 8 hc + j) -> (8 I + i, 8 J + j, hc, hr)
    x = tl.reshape(x, (ROWS // DROP_BLOCK.value, 2, 8, COLS // DROP_BLOCK.value, 2, 8))
    x = tl.reshape(tl.permute(x, (0, 2, 3, 5, 4, 1)), (ROWS // 2, COLS // 2, 2, 2))
    x_0, x_1 = tl.split(x)                          # hr = 0, 1
    x00, x01 = tl.split(x_0)                        # hc = 0, 1
    x10, x11 = tl.split(x_1)
    if KEYS_BY_ROW:                                 # hr: key half, hc: word (query row half)
        x00, x10 = _zero_dropped(x00, x10, w0, drop_threshold, F16_DRAWS)
        x01, x11 = _zero_dropped(x01, x11, w1, drop_threshold, F16_DRAWS)
    else:                                           # hr: word (query row half), hc: key half
        x00, x01 = _zero_dropped(x00, x01, w0, drop_threshold, F16_DRAWS)
        x10, x11 = _zero_dropped(x10, x11, w1, drop_threshold, F16_DRAWS)
    x = tl.join(tl.join(x00, x01), tl.join(x10, x11))
    x = tl.permute(tl.reshape(x, (ROWS // DROP_BLOCK.value, 8, COLS // DROP_BLOCK.value, 8, 2, 2)),
                   (0, 5, 1, 2, 4, 3))
    return tl.reshape(x, (ROWS, COLS))


@triton.jit
def _mask_extent(
    KeyMask,     # (seqlen_k,) uint8 mask row of one sequence
    seqlen_k,
):
    """(last valid key + 1, whether the mask is that prefix: no holes before it), read off the row
    in the kernel, so a mask costs the launcher nothing and the step no extra kernels."""
    last = tl.zeros((), dtype=tl.int32)
    count = tl.zeros((), dtype=tl.int32)
    for start in range(0, seqlen_k, MASK_SCAN):
        offs = start + tl.arange(0, MASK_SCAN)
        ok = tl.load(KeyMask + offs, mask=offs < seqlen_k, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(ok, offs + 1, 0), 0))
        count += tl.sum(ok.to(tl.int32), 0)
    return last, count == last


@triton.jit
def _sequence(
    KeyLens,     # (batch,) int32 valid prefix length of the keys; read when HAS_LENS
    KeyMask,     # (seqlen_k,) uint8 mask row of sequence b; read when HAS_MASK
    CuSeqlens,   # (batch + 1,) int32 packed row offsets; read when VARLEN
    b,           # batch index
    seqlen_q,    # query rows per sequence (dense)
    seqlen_k,    # key rows per sequence (dense)
    HAS_LENS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """(first packed row, query rows, key rows in memory, keys to visit, keys known valid: every key
    below it is valid, so tiles that end there need no key mask) of sequence b."""
    if VARLEN:
        row0 = tl.load(CuSeqlens + b).to(tl.int64)
        q_len = (tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)).to(tl.int32)
        k_rows = q_len
        k_len = q_len
        k_dense = q_len
    else:
        row0 = 0
        q_len = seqlen_q
        k_rows = seqlen_k
        if HAS_MASK:
            k_len, prefix = _mask_extent(KeyMask, seqlen_k)
            k_dense = tl.where(prefix, k_len, 0)
        elif HAS_LENS:
            k_len = tl.minimum(tl.maximum(tl.load(KeyLens + b), 0), seqlen_k)
            k_dense = k_len
        else:
            k_len = seqlen_k
            k_dense = seqlen_k
    return row0, q_len, k_rows, k_len, k_dense


@triton.jit
def _head_rows(
    P,           # base pointer of a (batch, seqlen, nheads, HEAD_DIM) or packed (total, nheads, HEAD_DIM) tensor
    b,           # batch index
    h,           # head index
    row0,        # first packed row of sequence b (0 when dense)
    stride_b,
    stride_h,
    stride_t,
):
    """Pointer to row 0 of sequence b, head h: offsets in int64 (large tensors overflow int32)."""
    return P + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + row0 * stride_t


@triton.jit
def _key_ok(
    KeyMask,     # (batch, seqlen_k) uint8 row of sequence b (already offset); read when HAS_MASK
    offs_n,      # (BLOCK_N,) key positions
    k_len,       # keys to visit; positions >= k_len are padding
    k_rows,      # keys in memory: the mask load's bound (a multiple of 16 lets it load 2+ bytes at once)
    HAS_MASK: tl.constexpr,
):
    ok = offs_n < k_len
    if HAS_MASK:
        ok = ok & (tl.load(KeyMask + offs_n, mask=offs_n < k_rows, other=0) != 0)
    return ok                                       # (BLOCK_N,) bool


@triton.jit
def _key_tile(
    K, V,            # row 0 of this sequence and head
    KeyMask,         # this sequence's mask row; read when MASKED and HAS_MASK
    tile,            # key tile index: keys tile * BLOCK_N ...
    k_len,           # keys to visit
    k_rows,          # keys in memory
    stride_kt, stride_vt,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,       # keys of the tile may be invalid (past k_len or masked out)
    HAS_MASK: tl.constexpr,
    V_BY_ROW: tl.constexpr,     # v as (BLOCK_N, HEAD_DIM), else vᵀ (HEAD_DIM, BLOCK_N)
):
    """(kᵀ (HEAD_DIM, BLOCK_N), v or vᵀ, key_ok (BLOCK_N,) bool) of one key tile; invalid keys read
    as zeros. Unmasked tiles load without predicates (all their keys are valid) and key_ok is all True."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kt_ptrs = K + offs_n[None, :] * stride_kt + offs_d[:, None]
    if V_BY_ROW:
        v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]
    else:
        v_ptrs = V + offs_n[None, :] * stride_vt + offs_d[:, None]
    if MASKED:
        key_ok = _key_ok(KeyMask, offs_n, k_len, k_rows, HAS_MASK)
        kt = tl.load(kt_ptrs, mask=key_ok[None, :], other=0.0)
        if V_BY_ROW:
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs, mask=key_ok[None, :], other=0.0)
    else:
        key_ok = offs_n >= 0
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
    return kt, v, key_ok


@triton.jit
def _fwd_tile(
    acc, l_i, m_i,   # (BLOCK_M, HEAD_DIM), (BLOCK_M,), (BLOCK_M,) fp32 running output, sum and max
    q,               # (BLOCK_M, HEAD_DIM) query tile
    kt, v, key_ok,   # the key tile (_key_tile)
    qk_scale,        # softmax_scale / ln 2
    seed, bh, pairs_k, start_m, start_n, drop_threshold,  # dropout: _dropout_words
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,       # key_ok may be False somewhere
    IS_DROPOUT: tl.constexpr,
    F16_DRAWS: tl.constexpr,    # drop_threshold <= F16_MAX_THRESHOLD (_zero_dropped)
    DOT_PRECISION: tl.constexpr,
):
    """One key tile of the forward's online softmax: returns the updated (acc, l_i, m_i)."""
    s = _mma(q, kt, None, DOT_PRECISION)                          # (BLOCK_M, BLOCK_N) unscaled
    if MASKED:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)            # max commutes with the scale (> 0)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)        # rows with no valid key so far
    p = tl.math.exp2(s * qk_scale - m_ref[:, None])             # one FFMA per score
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)                            # softmax sums before dropout
    acc = acc * alpha[:, None]
    if IS_DROPOUT:
        w0, w1 = _dropout_words(seed, bh, pairs_k, start_m, start_n, BLOCK_M, BLOCK_N, False)
        p = _dropout_apply(p, w0, w1, drop_threshold, BLOCK_M, BLOCK_N, False, F16_DRAWS)
    acc = _mma(p.to(v.dtype), v, acc, DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q,               # (batch, seqlen_q, nheads, HEAD_DIM), or packed (total, nheads, HEAD_DIM)
    K,               # (batch, seqlen_k, nheads, HEAD_DIM), or packed
    V,               # (batch, seqlen_k, nheads, HEAD_DIM), or packed
    Out,             # like Q
    Lse,             # (batch, nheads, seqlen_q) fp32 base-2 log-sum-exp of the scaled scores
    KeyMask,         # (batch, seqlen_k) uint8, 1 = attend; read when HAS_MASK
    KeyLens,         # (batch,) int32 keys to visit; read when HAS_LENS
    CuSeqlens,       # (batch + 1,) int32; read when VARLEN
    stride_qb, stride_qt, stride_qh,  # element strides of Q (batch stride 0 when VARLEN)
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_mb,       # KeyMask batch stride
    nheads,
    seqlen_q,        # query rows per sequence (max_seqlen when VARLEN)
    seqlen_k,        # key rows per sequence (max_seqlen when VARLEN)
    qk_scale,        # softmax_scale / ln 2, so scores go straight into exp2
    Seed,            # (1,) int64 Philox key of the dropout mask; read when IS_DROPOUT
    drop_threshold,  # a probability is dropped when its 15-bit draw is below this
    drop_scale,      # 1 / P(keep), ~1 / (1 - dropout_p) (dropout_constants)
    seq_bucket,      # next power of two of max(seqlen_q, seqlen_k): autotuning key only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_LENS: tl.constexpr,
    VARLEN: tl.constexpr,
    IS_DROPOUT: tl.constexpr,
    F16_DRAWS: tl.constexpr,    # drop_threshold <= F16_MAX_THRESHOLD (_zero_dropped)
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    bh = pid // num_m
    b = bh // nheads
    h = bh % nheads
    start_m = (pid % num_m) * BLOCK_M
    KeyMask += b.to(tl.int64) * stride_mb
    row0, q_len, k_rows, k_len, k_dense = _sequence(KeyLens, KeyMask, CuSeqlens, b, seqlen_q, seqlen_k, HAS_LENS,
                                                    HAS_MASK, VARLEN)
    k_end = tl.where(start_m < q_len, k_len, 0)     # varlen blocks past the sequence do nothing

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    Q = _head_rows(Q, b, h, row0, stride_qb, stride_qh, stride_qt)
    K = _head_rows(K, b, h, row0, stride_kb, stride_kh, stride_kt)
    V = _head_rows(V, b, h, row0, stride_vb, stride_vh, stride_vt)
    pairs_k = _rng_pairs(seqlen_k)

    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    seed = tl.load(Seed) if IS_DROPOUT else 0
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)                # running row sum of exp2
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)

    # tiles below k_dense hold valid keys only: no key mask; the rest (a tail, or every tile of a
    # mask with holes) take it
    k_full = tl.minimum(k_dense // BLOCK_N * BLOCK_N, k_end)
    for tile in range(0, k_full // BLOCK_N):
        kt, v, key_ok = _key_tile(K, V, KeyMask, tile, k_len, k_rows, stride_kt, stride_vt,
                                  HEAD_DIM, BLOCK_N, False, HAS_MASK, True)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kt, v, key_ok, qk_scale, seed, bh, pairs_k, start_m,
                                  tile * BLOCK_N, drop_threshold, BLOCK_M, BLOCK_N, False, IS_DROPOUT, F16_DRAWS,
                                  DOT_PRECISION)
    # a mask with holes sends every tile here: pipelined like the first loop; otherwise at most the
    # tile that holds the end of the keys, not worth a pipeline's registers
    for tile in tl.range(k_full // BLOCK_N, tl.cdiv(k_end, BLOCK_N), num_stages=None if HAS_MASK else 1):
        kt, v, key_ok = _key_tile(K, V, KeyMask, tile, k_len, k_rows, stride_kt, stride_vt,
                                  HEAD_DIM, BLOCK_N, True, HAS_MASK, True)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kt, v, key_ok, qk_scale, seed, bh, pairs_k, start_m,
                                  tile * BLOCK_N, drop_threshold, BLOCK_M, BLOCK_N, True, IS_DROPOUT, F16_DRAWS,
                                  DOT_PRECISION)

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    inv_l = tl.where(has_keys, drop_scale / l_safe, 0.0)                    # no valid key: zeros
    lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))     # +inf: P = 0 in backward
    out = acc * inv_l[:, None]
    Out = _head_rows(Out, b, h, row0, stride_ob, stride_oh, stride_ot)
    tl.store(Out + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(Lse + bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=row_ok)


@triton.jit
def _dkdv_tile(
    dk, dv,          # (BLOCK_N, HEAD_DIM) fp32 running dK (unscaled) and dV
    k, v,            # (BLOCK_N, HEAD_DIM) the program's keys and values
    Q, DO,           # row 0 of this sequence and head
    Lse, Delta,      # this (batch, head)'s rows
    start_m,         # first query row of the tile
    q_len,           # query rows of the sequence
    stride_qt, stride_dot,
    qk_scale,        # softmax_scale / ln 2
    seed, bh, pairs_k, start_n, drop_threshold,  # dropout: _dropout_words
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,       # rows of the tile may be past q_len
    IS_DROPOUT: tl.constexpr,
    F16_DRAWS: tl.constexpr,    # drop_threshold <= F16_MAX_THRESHOLD (_zero_dropped)
    DOT_PRECISION: tl.constexpr,
):
    """One query tile of the dK/dV pass: returns dk + dSᵀ Q and dv + Pᵀ dO for the tile (dropped P)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qt_ptrs = Q + offs_m[None, :] * stride_qt + offs_d[:, None]
    do_ptrs = DO + offs_m[:, None] * stride_dot + offs_d[None, :]
    if MASKED:                                      # rows past q_len: P = 0 (lse = +inf), zero dO
        row_ok = offs_m < q_len
        qt = tl.load(qt_ptrs, mask=row_ok[None, :], other=0.0)
        lse = tl.load(Lse + offs_m, mask=row_ok, other=float("inf"))
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
    else:
        qt = tl.load(qt_ptrs)
        lse = tl.load(Lse + offs_m)
        do = tl.load(do_ptrs)
        delta = tl.load(Delta + offs_m)
    st = _mma(k, qt, None, DOT_PRECISION) * qk_scale              # (BLOCK_N, BLOCK_M)
    pt = tl.math.exp2(st - lse[None, :])         # rows of invalid keys: zeroed in dk, dv after the loop
    dpt = _mma(v, tl.trans(do), None, DOT_PRECISION)       # dO Vᵀ, transposed
    if IS_DROPOUT:
        w0, w1 = _dropout_words(seed, bh, pairs_k, start_m, start_n, BLOCK_M, BLOCK_N, True)
        # 1/(1-p): on dv, after the loop
        pt_dropped = _dropout_apply(pt, w0, w1, drop_threshold, BLOCK_N, BLOCK_M, True, F16_DRAWS)
        # dS = P∘(Z∘dP/(1-p) - delta) = (Z∘P∘dP - P∘delta(1-p)) / (1-p), with Z∘P the tile dv takes:
        # one select per element (not one for P and one for dP); delta comes scaled, 1/(1-p) on dk after
        dst = pt_dropped * dpt - pt * delta[None, :]
    else:
        pt_dropped = pt
        dst = pt * (dpt - delta[None, :])
    dv = _mma(pt_dropped.to(do.dtype), do, dv, DOT_PRECISION)
    dk = _mma(dst.to(qt.dtype), tl.trans(qt), dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,               # (batch, seqlen_q, nheads, HEAD_DIM), or packed (total, nheads, HEAD_DIM)
    K,               # (batch, seqlen_k, nheads, HEAD_DIM), or packed
    V,               # like K
    DO,              # like Q: gradient of the output
    DK,              # like K: written here
    DV,              # like K: written here
    Lse,             # (batch, nheads, seqlen_q) fp32 from the forward
    Delta,           # (batch, nheads, seqlen_q) fp32 rowsum(dO * O) · P(keep), from the dQ kernel
    KeyMask,         # (batch, seqlen_k) uint8; read when HAS_MASK
    KeyLens,         # (batch,) int32; read when HAS_LENS
    CuSeqlens,       # (batch + 1,) int32; read when VARLEN
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_mb,
    nheads,
    seqlen_q,
    seqlen_k,
    qk_scale,        # softmax_scale / ln 2
    sm_scale,        # softmax_scale
    Seed,            # (1,) int64 Philox key; read when IS_DROPOUT
    drop_threshold,
    drop_scale,
    seq_bucket,      # autotuning key only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,   # query rows per step
    BLOCK_N: tl.constexpr,   # keys held by the program
    HAS_MASK: tl.constexpr,
    HAS_LENS: tl.constexpr,
    VARLEN: tl.constexpr,
    IS_DROPOUT: tl.constexpr,
    F16_DRAWS: tl.constexpr,    # drop_threshold <= F16_MAX_THRESHOLD (_zero_dropped)
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(seqlen_k, BLOCK_N)
    bh = pid // num_n
    b = bh // nheads
    h = bh % nheads
    start_n = (pid % num_n) * BLOCK_N
    KeyMask += b.to(tl.int64) * stride_mb
    row0, q_len, k_rows, k_len, k_dense = _sequence(KeyLens, KeyMask, CuSeqlens, b, seqlen_q, seqlen_k, HAS_LENS,
                                                    HAS_MASK, VARLEN)
    q_end = tl.where(start_n < k_len, q_len, 0)     # padding-only key blocks just store zeros

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    Q = _head_rows(Q, b, h, row0, stride_qb, stride_qh, stride_qt)
    K = _head_rows(K, b, h, row0, stride_kb, stride_kh, stride_kt)
    V = _head_rows(V, b, h, row0, stride_vb, stride_vh, stride_vt)
    DO = _head_rows(DO, b, h, row0, stride_dob, stride_doh, stride_dot)
    Lse += bh.to(tl.int64) * seqlen_q
    Delta += bh.to(tl.int64) * seqlen_q
    pairs_k = _rng_pairs(seqlen_k)

    key_ok = _key_ok(KeyMask, offs_n, k_len, k_rows, HAS_MASK)
    seed = tl.load(Seed) if IS_DROPOUT else 0
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)

    # whole tiles of valid query rows load without predicates and take no row mask; the tile that holds
    # the end of the rows (if any) takes them. fp32 (FMA dots, operands in registers) and programs holding
    # 128 keys of headdim 128 run every tile masked, in one loop: with two, they spilled (sm_90 SASS)
    ONE_LOOP: tl.constexpr = DOT_PRECISION == "ieee" or BLOCK_N * HEAD_DIM > 128 * 64
    if ONE_LOOP:
        q_full = 0
    else:
        q_full = q_end // BLOCK_M * BLOCK_M
        for start_m in range(0, q_full, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, Lse, Delta, start_m, q_len, stride_qt, stride_dot, qk_scale,
                                seed, bh, pairs_k, start_n, drop_threshold, HEAD_DIM, BLOCK_M, BLOCK_N, False,
                                IS_DROPOUT, F16_DRAWS, DOT_PRECISION)
    for start_m in tl.range(q_full, q_end, BLOCK_M, num_stages=None if ONE_LOOP else 1):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, Lse, Delta, start_m, q_len, stride_qt, stride_dot, qk_scale,
                            seed, bh, pairs_k, start_n, drop_threshold, HEAD_DIM, BLOCK_M, BLOCK_N, True,
                            IS_DROPOUT, F16_DRAWS, DOT_PRECISION)

    # a row of dk/dv depends on its own key only: invalid keys (k loaded as 0, so any finite or
    # infinite junk) are zeroed here once instead of masking P in every step
    if IS_DROPOUT:
        dv = dv * drop_scale
        dk = dk * drop_scale
    dv = tl.where(key_ok[:, None], dv, 0.0)
    dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
    store_ok = (offs_n < k_rows)[:, None]
    DK = _head_rows(DK, b, h, row0, stride_dkb, stride_dkh, stride_dkt)
    DV = _head_rows(DV, b, h, row0, stride_dvb, stride_dvh, stride_dvt)
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=store_ok)


@triton.jit
def _dq_tile(
    dq,              # (BLOCK_M, HEAD_DIM) fp32 running dQ (unscaled)
    q, do,           # (BLOCK_M, HEAD_DIM) query and output-gradient tiles
    lse, delta,      # (BLOCK_M,) fp32 base-2 log-sum-exp and rowsum(dO * O)
    kt, vt, key_ok,  # the key tile (_key_tile)
    qk_scale,        # softmax_scale / ln 2
    seed, bh, pairs_k, start_m, start_n, drop_threshold,  # dropout: _dropout_words
    drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,       # key_ok may be False somewhere
    IS_DROPOUT: tl.constexpr,
    F16_DRAWS: tl.constexpr,    # drop_threshold <= F16_MAX_THRESHOLD (_zero_dropped)
    DOT_PRECISION: tl.constexpr,
):
    """One key tile of the dQ pass: returns dq + dS K for the tile."""
    s = _mma(q, kt, None, DOT_PRECISION) * qk_scale                   # (BLOCK_M, BLOCK_N)
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(key_ok[None, :], p, 0.0)
    dp = _mma(do, vt, None, DOT_PRECISION)
    if IS_DROPOUT:
        w0, w1 = _dropout_words(seed, bh, pairs_k, start_m, start_n, BLOCK_M, BLOCK_N, False)
        dp = _dropout_apply(dp, w0, w1, drop_threshold, BLOCK_M, BLOCK_N, False, F16_DRAWS) * drop_scale
    ds = p * (dp - delta[:, None])                  # dropout's 1/(1-p) and "- delta": one FFMA
    return _mma(ds.to(kt.dtype), tl.trans(kt), dq, DOT_PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,               # (batch, seqlen_q, nheads, HEAD_DIM), or packed (total, nheads, HEAD_DIM)
    K,               # (batch, seqlen_k, nheads, HEAD_DIM), or packed
    V,               # like K
    Out,             # like Q: the forward's output
    DO,              # like Q: gradient of the output
    DQ,              # like Q: written here
    Lse,             # (batch, nheads, seqlen_q) fp32 from the forward
    Delta,           # (batch, nheads, seqlen_q) fp32 rowsum(dO * O) · P(keep): written for dK/dV
    KeyMask,         # (batch, seqlen_k) uint8; read when HAS_MASK
    KeyLens,         # (batch,) int32; read when HAS_LENS
    CuSeqlens,       # (batch + 1,) int32; read when VARLEN
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_mb,
    nheads,
    seqlen_q,
    seqlen_k,
    qk_scale,        # softmax_scale / ln 2
    sm_scale,        # softmax_scale
    Seed,            # (1,) int64 Philox key; read when IS_DROPOUT
    drop_threshold,
    drop_scale,
    seq_bucket,      # autotuning key only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,   # query rows held by the program
    BLOCK_N: tl.constexpr,   # keys per step
    HAS_MASK: tl.constexpr,
    HAS_LENS: tl.constexpr,
    VARLEN: tl.constexpr,
    IS_DROPOUT: tl.constexpr,
    F16_DRAWS: tl.constexpr,    # drop_threshold <= F16_MAX_THRESHOLD (_zero_dropped)
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    bh = pid // num_m
    b = bh // nheads
    h = bh % nheads
    start_m = (pid % num_m) * BLOCK_M
    KeyMask += b.to(tl.int64) * stride_mb
    row0, q_len, k_rows, k_len, k_dense = _sequence(KeyLens, KeyMask, CuSeqlens, b, seqlen_q, seqlen_k, HAS_LENS,
                                                    HAS_MASK, VARLEN)
    k_end = tl.where(start_m < q_len, k_len, 0)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    Q = _head_rows(Q, b, h, row0, stride_qb, stride_qh, stride_qt)
    K = _head_rows(K, b, h, row0, stride_kb, stride_kh, stride_kt)
    V = _head_rows(V, b, h, row0, stride_vb, stride_vh, stride_vt)
    Out = _head_rows(Out, b, h, row0, stride_ob, stride_oh, stride_ot)
    DO = _head_rows(DO, b, h, row0, stride_dob, stride_doh, stride_dot)
    pairs_k = _rng_pairs(seqlen_k)

    # delta = rowsum(dO * O) of these rows, here rather than in a kernel of its own: the program holds
    # dO already, and the dK/dV kernel, launched after this one, reads it back
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    o = tl.load(Out + offs_m[:, None] * stride_ot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * seqlen_q + offs_m, delta / drop_scale if IS_DROPOUT else delta, mask=row_ok)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * seqlen_q + offs_m, mask=row_ok, other=float("inf"))
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    seed = tl.load(Seed) if IS_DROPOUT else 0

    k_full = tl.minimum(k_dense // BLOCK_N * BLOCK_N, k_end)      # as in the forward
    for tile in range(0, k_full // BLOCK_N):
        kt, vt, key_ok = _key_tile(K, V, KeyMask, tile, k_len, k_rows, stride_kt, stride_vt,
                                   HEAD_DIM, BLOCK_N, False, HAS_MASK, False)
        dq = _dq_tile(dq, q, do, lse, delta, kt, vt, key_ok, qk_scale, seed, bh, pairs_k, start_m, tile * BLOCK_N,
                      drop_threshold, drop_scale, BLOCK_M, BLOCK_N, False, IS_DROPOUT, F16_DRAWS, DOT_PRECISION)
    for tile in tl.range(k_full // BLOCK_N, tl.cdiv(k_end, BLOCK_N), num_stages=None if HAS_MASK else 1):
        kt, vt, key_ok = _key_tile(K, V, KeyMask, tile, k_len, k_rows, stride_kt, stride_vt,
                                   HEAD_DIM, BLOCK_N, True, HAS_MASK, False)          # as in the forward
        dq = _dq_tile(dq, q, do, lse, delta, kt, vt, key_ok, qk_scale, seed, bh, pairs_k, start_m, tile * BLOCK_N,
                      drop_threshold, drop_scale, BLOCK_M, BLOCK_N, True, IS_DROPOUT, F16_DRAWS, DOT_PRECISION)

    dq = dq * sm_scale
    DQ = _head_rows(DQ, b, h, row0, stride_dqb, stride_dqh, stride_dqt)
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _dropout_mask_kernel(
    Keep,            # (batch, nheads, seqlen_q, seqlen_k) int8 keep-mask, written here
    seqlen_q,
    seqlen_k,
    Seed,            # (1,) int64 Philox key
    drop_threshold,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    F16_DRAWS: tl.constexpr,
):
    bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    start_n = tl.program_id(2) * BLOCK_N
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    pairs_k = _rng_pairs(seqlen_k)
    w0, w1 = _dropout_words(tl.load(Seed), bh, pairs_k, start_m, start_n, BLOCK_M, BLOCK_N, False)
    # fp32 ones, as the attention kernels' probabilities: the same select code on the GPU
    keep = _dropout_apply(tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32), w0, w1, drop_threshold,
                          BLOCK_M, BLOCK_N, False, F16_DRAWS).to(tl.int8)
    Keep += bh.to(tl.int64) * seqlen_q * seqlen_k
    tl.store(Keep + offs_m[:, None] * seqlen_k + offs_n[None, :], keep,
             mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


# ============================================================================ autotuning
def _configs(shapes):
    """Autotuning configs from (BLOCK_M, BLOCK_N, num_warps, num_stages, register cap); one small config
    under the interpreter (TRITON_INTERPRET=1), where timing means nothing and size is speed. _prune
    applies the register caps (with dropout at headdim 64)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s, _ in shapes]


def _register_caps(shapes) -> dict:
    """{(BLOCK_M, BLOCK_N, num_warps, num_stages): register cap} of the candidates that have one."""
    return {shape[:4]: shape[4] for shape in shapes if shape[4] is not None}


# three candidates per kernel: each costs a compile per autotuning key (seq bucket, head dim, mask,
# lengths, varlen, dropout), ~2 s on an H100 host, so the list stays short. On the H100 (2026-11-22,
# D=64, T=128 and 512, bf16) the winners were fwd 64x64/4w or 128x64/4w, dkdv 64x64/4w every time,
# dq 64x64/4w or 128x64/8w; 128x128 tiles never won the backward, so smaller tiles took their place.
# The sweep of 2026-11-23 (bench_attention --sweep, 32x12x512x64, 9 candidates per kernel,
# attention_sweep_*_20261123.md): fwd 128x128/8w was the slowest shipped candidate in both cases
# (239 / 163 TFLOP/s against 339 / 189 for the best), and 64x64/4w with 2 stages the fastest with mask
# + dropout (189 against 173 at 3 stages), so it took 128x128's place; dkdv and dq candidates were
# within 3% of the best of the nine.
# The register cap (ptxas's maxnreg) applies with dropout at headdim 64: there the dropout kernels hold
# a few registers too many for the next occupancy step. That sweep says the step pays: the forward at
# 2 stages (3 programs per SM by its registers, Triton 3.6) beat the same loop at 3 stages (2 per SM),
# 189 against 173 TFLOP/s, where without dropout (3 per SM both) 3 stages won; dQ's 64x32 tile (4 per
# SM) beat 64x64 (2 per SM) though its loop issues 14% more per key. Capped, on sm_90 with Triton 3.6
# (benchmarks/sass_loops.py): fwd 2 stages 166 -> 128 registers, 3 -> 4 programs, loop 489 -> 491;
# fwd 3 stages 176 -> 168, 2 -> 3, loop unchanged; dQ 64x64 212 -> 168, 2 -> 3, loop 418 -> 442; a
# register or two spilled outside the loops. dK/dV (244) would spill in its loop. Other head dims keep
# ptxas's own count: capped at 16 ptxas takes more registers, at 128 it spills in the loops.
_FWD_SHAPES = [(128, 64, 4, 3, None), (64, 64, 4, 2, 128), (64, 64, 4, 3, 168)]
_DKDV_SHAPES = [(64, 128, 8, 3, None), (32, 64, 4, 3, None), (64, 64, 4, 3, None)]
_DQ_SHAPES = [(128, 64, 8, 3, None), (64, 32, 4, 3, None), (64, 64, 4, 3, 168)]
_CANDIDATES = {"fwd": _FWD_SHAPES, "dkdv": _DKDV_SHAPES, "dq": _DQ_SHAPES}   # by kernel, for the benchmarks
_CAPPED_HEAD_DIM = 64                # the head dim the caps were read off the SASS at
_SMEM_BUDGET = 200 * 1024  # bytes of shared memory a config may plan for (H100: 227 KB per block)


def _caps_apply(is_dropout: bool, head_dim: int) -> bool:
    """Whether _prune gives the candidates their register caps: with dropout at headdim 64."""
    return bool(is_dropout) and head_dim == _CAPPED_HEAD_DIM


def _prune(configs, named_args, *, register_caps=None, **kwargs):
    """Drop configs whose tiles overflow shared memory or dwarf the sequence; with dropout at headdim 64,
    cap the registers of the candidates in ``register_caps`` (see the candidate lists above)."""
    args = {**named_args, **kwargs}
    if len(configs) <= 1:
        return configs
    head_dim = args["HEAD_DIM"]
    itemsize = args["Q"].element_size()
    if itemsize == 4:
        # fp32, the exact slower path: its IEEE dots run on FMAs, whose operands live in registers. 64 x 64
        # tiles spilled thousands of stores in the backward (sm_90 SASS); 32 x 16 over 8 warps spills none
        # at any headdim with Triton 3.6 (a few stores in two variants with 3.9): benchmarks/sass_loops.py --all
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=8, num_stages=2)]
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if args["seq_bucket"] <= 64 and (bm > 64 or bn > 64):
            continue
        # a rough bound for every kernel: the resident tile plus num_stages buffers of the streamed ones
        if (bm + bn) * head_dim * itemsize * (1 + c.num_stages) <= _SMEM_BUDGET:
            kept.append(c)
    kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    if not (register_caps and _caps_apply(args["IS_DROPOUT"], head_dim)):
        return kept
    capped = []
    for c in kept:
        cap = register_caps.get((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
        capped.append(c if cap is None else
                      triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=cap))
    return capped


def _autotuned(kernel, shapes):
    return triton.autotune(_configs(shapes), key=_TUNE_KEY, prune_configs_by={
        "early_config_prune": functools.partial(_prune, register_caps=_register_caps(shapes))})(kernel)


_TUNE_KEY = ["seq_bucket", "HEAD_DIM", "HAS_MASK", "HAS_LENS", "VARLEN", "IS_DROPOUT"]
_attn_fwd = _autotuned(_attn_fwd_kernel, _FWD_SHAPES)
_attn_bwd_dkdv = _autotuned(_attn_bwd_dkdv_kernel, _DKDV_SHAPES)
_attn_bwd_dq = _autotuned(_attn_bwd_dq_kernel, _DQ_SHAPES)


# ============================================================================ launchers
def _check_device(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _INTERPRET:
        return
    raise ValueError(f"{name} is on {t.device}: the Triton attention kernels need a CUDA tensor "
                     "(or CPU tensors under TRITON_INTERPRET=1)")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of headdim contiguous elements; other strides are free."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _Layout:
    """Sizes and strides of one call, dense (batch, seqlen, nheads, headdim) or packed varlen."""

    def __init__(self, q, k, cu_seqlens, max_seqlen):
        self.varlen = q.dim() == 3
        if self.varlen:
            self.batch = cu_seqlens.shape[0] - 1
            self.seqlen_q = self.seqlen_k = int(max_seqlen)
            self.nheads, self.head_dim = q.shape[1], q.shape[2]
        else:
            self.batch, self.seqlen_q, self.nheads, self.head_dim = q.shape
            self.seqlen_k = k.shape[1]

    def strides(self, t):
        """(batch, seq, head) element strides; batch stride 0 for packed tensors."""
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)


def _mask_args(key_mask, key_lens, device):
    """(uint8 mask or placeholder, int32 lengths or placeholder, batch stride, HAS_MASK, HAS_LENS).

    A general boolean mask is read by the kernels: each program first finds its sequence's last
    valid key (the end of its key loop: padding blocks are skipped) and whether the mask is a
    prefix (then only the tile that holds its end reads it), with no work in the launcher."""
    placeholder = torch.empty(1, dtype=torch.int32, device=device)
    if key_mask is not None:
        mask = key_mask if key_mask.stride(-1) == 1 else key_mask.contiguous()
        return mask.view(torch.uint8), placeholder, mask.stride(0), True, False
    if key_lens is not None:
        return placeholder, key_lens.to(torch.int32).contiguous(), 0, False, True
    return placeholder, placeholder, 0, False, False


def _seed_arg(seed, q, dropout_p):
    """The kernels' Seed pointer: the int64 (1,) seed on q's device, or q as an unread stand-in
    when there is no dropout."""
    return check_seed_tensor(seed, q.device) if dropout_p > 0.0 else q


def _grid(seqlen, block, layout):
    """Launch grid: one program per ``block`` (the autotuned config's) rows of ``seqlen``, per (batch, head)."""
    return lambda meta: (_cdiv(seqlen, meta[block]) * layout.batch * layout.nheads,)


def _dropout_args(p):
    """The kernels' dropout arguments for probability ``p``: drop_threshold and drop_scale of the 15-bit
    draws (dropout_constants), and F16_DRAWS, whether the threshold takes the f16x2 compare."""
    threshold, drop_scale = dropout_constants(p, DRAW_RANGE)
    return dict(drop_threshold=threshold, drop_scale=drop_scale, F16_DRAWS=threshold <= F16_MAX_THRESHOLD)


def _common_args(layout, dropout_p, softmax_scale, seed, q):
    return dict(qk_scale=softmax_scale * LOG2E, Seed=_seed_arg(seed, q, dropout_p), **_dropout_args(dropout_p),
                seq_bucket=_next_power_of_2(max(layout.seqlen_q, layout.seqlen_k)), IS_DROPOUT=dropout_p > 0.0,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HEAD_DIM=layout.head_dim,
                VARLEN=layout.varlen)


def _flash_fwd(q, k, v, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    """Launch the forward; returns (out like q, lse (batch, nheads, seqlen_q) fp32)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    layout = _Layout(q, k, cu_seqlens, max_seqlen)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((layout.batch, layout.nheads, layout.seqlen_q), dtype=torch.float32, device=q.device)
    mask, lens, stride_mb, has_mask, has_lens = _mask_args(key_mask, key_lens, q.device)
    cu = cu_seqlens if cu_seqlens is not None else lens

    with _on_device(q):   # Triton launches on the current device
        launch(_attn_fwd, _grid(layout.seqlen_q, "BLOCK_M", layout),
               q, k, v, out, lse, mask, lens, cu,
               *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out), stride_mb,
               layout.nheads, layout.seqlen_q, layout.seqlen_k,
               HAS_MASK=has_mask, HAS_LENS=has_lens, **_common_args(layout, dropout_p, softmax_scale, seed, q))
    return out, lse


def _flash_bwd(do, q, k, v, out, lse, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed,
               grads=None):
    """Launch the backward; returns (dq, dk, dv) shaped and typed like q, k, v, written into ``grads``
    (three tensors of those shapes, any strides with a unit last stride) when given."""
    do, q, k, v, out = (_unit_last(t) for t in (do, q, k, v, out))
    layout = _Layout(q, k, cu_seqlens, max_seqlen)
    mask, lens, stride_mb, has_mask, has_lens = _mask_args(key_mask, key_lens, q.device)
    cu = cu_seqlens if cu_seqlens is not None else lens
    dq, dk, dv = grads if grads is not None else (torch.empty(t.shape, dtype=t.dtype, device=t.device)
                                                  for t in (q, k, v))
    delta = torch.empty_like(lse)

    with _on_device(q):   # Triton launches on the current device
        common = _common_args(layout, dropout_p, softmax_scale, seed, q)
        # dQ first: it also writes delta, which the dK/dV kernel reads
        launch(_attn_bwd_dq, _grid(layout.seqlen_q, "BLOCK_M", layout),
               q, k, v, out, do, dq, lse, delta, mask, lens, cu,
               *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out),
               *layout.strides(do), *layout.strides(dq), stride_mb,
               layout.nheads, layout.seqlen_q, layout.seqlen_k, sm_scale=softmax_scale,
               HAS_MASK=has_mask, HAS_LENS=has_lens, **common)
        launch(_attn_bwd_dkdv, _grid(layout.seqlen_k, "BLOCK_N", layout),
               q, k, v, do, dk, dv, lse, delta, mask, lens, cu,
               *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(do),
               *layout.strides(dk), *layout.strides(dv), stride_mb,
               layout.nheads, layout.seqlen_q, layout.seqlen_k, sm_scale=softmax_scale,
               HAS_MASK=has_mask, HAS_LENS=has_lens, **common)
    return dq, dk, dv


def _flash_fwd_packed(qkv, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    """The forward on packed projections qkv (..., 3, nheads, headdim): q, k, v are its views."""
    return _flash_fwd(*qkv.unbind(-3), key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)


def _flash_bwd_packed(do, qkv, out, lse, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                      seed):
    """The backward on packed projections: the kernels write dq, dk, dv into one dqkv shaped like qkv,
    so autograd needs no copy to stack three gradients."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _flash_bwd(do, *qkv.unbind(-3), out, lse, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
               seed, grads=dqkv.unbind(-3))
    return dqkv


# ============================================================================ custom ops (autograd, torch.compile)
@torch.library.custom_op("fastelectra::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                       key_lens: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
                       dropout_p: float, softmax_scale: float,
                       seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_fwd(q, k, v, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)


@_flash_attn_fwd_op.register_fake
def _flash_attn_fwd_fake(q, k, v, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    if q.dim() == 3:
        lse_shape = (cu_seqlens.shape[0] - 1, q.shape[1], max_seqlen)
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fastelectra::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, key_mask: Optional[torch.Tensor], key_lens: Optional[torch.Tensor],
                       cu_seqlens: Optional[torch.Tensor], max_seqlen: int, dropout_p: float,
                       softmax_scale: float,
                       seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_bwd(do, q, k, v, out, lse, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p,
                      softmax_scale, seed)


@_flash_attn_bwd_op.register_fake
def _flash_attn_bwd_fake(do, q, k, v, out, lse, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p,
                         softmax_scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("fastelectra::flash_attn_qkvpacked_fwd", mutates_args=())
def _flash_attn_packed_fwd_op(qkv: torch.Tensor, key_mask: Optional[torch.Tensor], key_lens: Optional[torch.Tensor],
                              cu_seqlens: Optional[torch.Tensor], max_seqlen: int, dropout_p: float,
                              softmax_scale: float, seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_fwd_packed(qkv, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)


@_flash_attn_packed_fwd_op.register_fake
def _flash_attn_packed_fwd_fake(qkv, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    q, k, v = qkv.unbind(-3)
    return _flash_attn_fwd_fake(q, k, v, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed)


@torch.library.custom_op("fastelectra::flash_attn_qkvpacked_bwd", mutates_args=())
def _flash_attn_packed_bwd_op(do: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              key_mask: Optional[torch.Tensor], key_lens: Optional[torch.Tensor],
                              cu_seqlens: Optional[torch.Tensor], max_seqlen: int, dropout_p: float,
                              softmax_scale: float, seed: Optional[torch.Tensor]) -> torch.Tensor:
    return _flash_bwd_packed(do, qkv, out, lse, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p,
                             softmax_scale, seed)


@_flash_attn_packed_bwd_op.register_fake
def _flash_attn_packed_bwd_fake(do, qkv, out, lse, key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p,
                                softmax_scale, seed):
    return qkv.new_empty(qkv.shape)


_N_ARGS = 7   # the ops' arguments after the differentiable tensors: key_mask ... seed


def _setup_context(ctx, inputs, output):
    """For both op pairs: the differentiable inputs are (q, k, v) or (qkv,), then _N_ARGS others."""
    tensors = inputs[:-_N_ARGS]
    key_mask, key_lens, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed = inputs[-_N_ARGS:]
    out, lse = output
    ctx.save_for_backward(out, lse, key_mask, key_lens, cu_seqlens, seed, *tensors)
    ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward_with(bwd, ctx, grad_out):
    """The autograd rule, with ``bwd`` a backward custom op (traced path) or its launcher (eager)."""
    out, lse, key_mask, key_lens, cu_seqlens, seed, *tensors = ctx.saved_tensors
    grads = bwd(grad_out, *tensors, out, lse, key_mask, key_lens, cu_seqlens, ctx.max_seqlen,
                ctx.dropout_p, ctx.softmax_scale, seed)
    return (*(grads if isinstance(grads, (tuple, list)) else (grads,)),) + (None,) * _N_ARGS


def _register(fwd_op, bwd_op, fwd, bwd, name):
    """Autograd for the custom-op pair, and the eager Function over the same launchers and rule (without
    the custom-op dispatch, fastelectra/autograd.py); returns a picker of the one a call on the
    differentiable inputs ``tensors`` should take: the op when traced, the Function when a backward
    can follow, else the forward launcher itself (no_grad, inference_mode)."""
    fwd_op.register_autograd(lambda ctx, grad_out, _glse: _backward_with(bwd_op, ctx, grad_out),
                             setup_context=_setup_context)
    eager = eager_function(name, fwd, lambda ctx, grad_out, _glse: _backward_with(bwd, ctx, grad_out), _setup_context)

    def pick(*tensors):
        if not use_eager(tensors[0]):
            return fwd_op
        return eager if needs_grad(*tensors) else fwd
    return pick


_attn_op = _register(_flash_attn_fwd_op, _flash_attn_bwd_op, _flash_fwd, _flash_bwd, "_FlashAttnFn")
_attn_packed_op = _register(_flash_attn_packed_fwd_op, _flash_attn_packed_bwd_op, _flash_fwd_packed,
                            _flash_bwd_packed, "_FlashAttnQKVPackedFn")


# ============================================================================ functional API
def _check_qkv(q, k, v, packed: bool) -> None:
    rank = 3 if packed else 4
    layout = "(total, nheads, headdim)" if packed else "(batch, seqlen, nheads, headdim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        _check_device(t, name)
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if packed and q.shape != k.shape:
        raise ValueError(f"varlen attention is self-attention: q {tuple(q.shape)} and k {tuple(k.shape)} must match")
    if not packed and (q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, nheads and headdim")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"headdim {q.shape[-1]} is not supported; the kernels take {SUPPORTED_HEAD_DIMS}")
    if any(s == 0 for s in q.shape) or any(s == 0 for s in k.shape):
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")


def _check_dropout(dropout_p, *seqlens) -> float:
    dropout_p = _check_dropout_p(dropout_p)
    if dropout_p > 0.0 and any(n > MAX_DROPOUT_SEQLEN for n in seqlens):
        raise ValueError(f"dropout_p > 0 needs sequences of at most {MAX_DROPOUT_SEQLEN} tokens (the Philox "
                         f"counter of a (query, key) pair is 32 bits), got length {max(seqlens)}")
    return float(dropout_p)


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    return float(_check_softmax_scale(softmax_scale))


def _seed_for(seed, dropout_p: float, q: torch.Tensor) -> Optional[torch.Tensor]:
    """The dropout seed as an int64 (1,) tensor on q's device (see fastelectra.rng); None without dropout."""
    return seed_tensor(seed, q.device) if dropout_p > 0.0 else None


def _dense_args(q, k, v, key_padding_mask, key_lengths, dropout_p, softmax_scale):
    """Validated (key_padding_mask, key_lengths, dropout_p, softmax_scale) of a padded-layout call."""
    _check_qkv(q, k, v, packed=False)
    dropout_p = _check_dropout(dropout_p, q.shape[1], k.shape[1])
    batch, seqlen_k = k.shape[0], k.shape[1]
    if key_padding_mask is not None and key_lengths is not None:
        raise ValueError("pass key_padding_mask or key_lengths, not both")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.shape != (batch, seqlen_k):
            raise ValueError(f"key_padding_mask must be a tensor of shape (batch, seqlen_k) = {(batch, seqlen_k)}, "
                             f"got {tuple(getattr(key_padding_mask, 'shape', ()))}")
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise TypeError(f"key_padding_mask must be bool or integer (1 = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
    if key_lengths is not None:
        if (not isinstance(key_lengths, torch.Tensor) or key_lengths.shape != (batch,)
                or key_lengths.dtype.is_floating_point or key_lengths.dtype == torch.bool):
            raise ValueError(f"key_lengths must be an integer tensor of shape (batch,) = ({batch},), got "
                             f"{getattr(key_lengths, 'dtype', type(key_lengths).__name__)} "
                             f"{tuple(getattr(key_lengths, 'shape', ()))}")
        if key_lengths.device != q.device:
            raise ValueError(f"key_lengths is on {key_lengths.device} but q is on {q.device}")
        # values: checked on CPU only (on a GPU a host sync); the kernels clamp them to [0, seqlen_k]
        if (key_lengths.device.type == "cpu" and batch and not torch.compiler.is_compiling()
                and (key_lengths.min() < 0 or key_lengths.max() > k.shape[1])):
            raise ValueError(f"key_lengths must lie in [0, seqlen_k={k.shape[1]}], got {key_lengths.tolist()}")
    return key_padding_mask, key_lengths, dropout_p, _scale(softmax_scale, q.shape[-1])


def _varlen_args(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
    """Validated (cu_seqlens, dropout_p, softmax_scale) of a packed-tokens (varlen) call."""
    _check_qkv(q, k, v, packed=True)
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2
            or cu_seqlens.dtype != torch.int32):
        raise ValueError("cu_seqlens must be a 1-D int32 tensor (batch + 1,) of cumulative sequence lengths, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if not isinstance(max_seqlen, (int, torch.SymInt)) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    dropout_p = _check_dropout(dropout_p, max_seqlen)
    # value checks cost a GPU sync (and a graph break): eager CPU tensors (the interpreter) only
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        lengths = cu_seqlens.diff()
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != q.shape[0] or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to total = {q.shape[0]}, got {cu_seqlens.tolist()}")
        if int(lengths.max()) > max_seqlen:
            raise ValueError(f"max_seqlen = {max_seqlen} is below the longest sequence ({int(lengths.max())})")
    return cu_seqlens.contiguous(), dropout_p, _scale(softmax_scale, q.shape[-1])


def flash_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None, *,
                    key_lengths=None):
    """Non-causal multi-head attention with key padding and dropout on the probabilities.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads, headdim); any strides
    with a unit last stride (e.g. views into a fused QKV projection). headdim in 16/32/64/128;
    fp16/bf16 (fp32 runs a slower exact path).
    key_padding_mask: (batch, seqlen_k) bool/integer, True/1 = attend, honoured exactly.
    key_lengths: (batch,) integer valid key counts in [0, seqlen_k], an alternative for prefix masks
    (checked for CPU tensors; on a GPU, where that would cost a host sync, the kernels clamp them).
    dropout_p: applied as given; ``seed`` (None | int | one-element integer tensor) keys the
    in-kernel Philox, read on q's device (None: drawn from torch's generator of q's device, so
    torch.manual_seed reproduces; no host sync). Unused when dropout_p == 0. A sequence without a
    valid key gives zeros.
    Returns (batch, seqlen_q, nheads, headdim) in q's dtype; differentiable in q, k, v.
    """
    mask, lens, dropout_p, scale = _dense_args(q, k, v, key_padding_mask, key_lengths, dropout_p, softmax_scale)
    out, _ = _attn_op(q, k, v)(q, k, v, mask, lens, None, 0, dropout_p, scale, _seed_for(seed, dropout_p, q))
    return out


def flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, seed=None):
    """Self-attention over packed sequences, padding skipped entirely.

    q, k, v: (total, nheads, headdim), the tokens of all sequences back to back.
    cu_seqlens: (batch + 1,) int32 cumulative lengths, cu_seqlens[0] = 0, cu_seqlens[-1] = total.
    max_seqlen: an int >= the longest sequence. Dropout is drawn as in :func:`flash_attention`
    with seqlen_q = seqlen_k = max_seqlen, so both agree on the valid rows of a padded batch.
    Returns (total, nheads, headdim) in q's dtype; differentiable in q, k, v.
    """
    cu, dropout_p, scale = _varlen_args(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    out, _ = _attn_op(q, k, v)(q, k, v, None, None, cu, max_seqlen, dropout_p, scale, _seed_for(seed, dropout_p, q))
    return out


def flash_attention_qkvpacked(qkv, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None, *,
                              key_lengths=None, cu_seqlens=None, max_seqlen=None):
    """Self-attention on the packed output of a fused QKV projection.

    qkv: (batch, seqlen, 3, nheads, headdim), or (total, 3, nheads, headdim) with ``cu_seqlens`` and
    ``max_seqlen`` (packed sequences, as :func:`flash_attention_varlen`). The result, the dropout mask
    and the gradients are those of :func:`flash_attention` (or the varlen one) on ``qkv.unbind(-3)``;
    the difference is the backward, whose kernels write dq, dk and dv into one gradient shaped like
    qkv: autograd then needs no copy to stack three gradients into the projection's output.
    Returns (batch, seqlen, nheads, headdim) (or (total, nheads, headdim)) in qkv's dtype.
    """
    varlen = cu_seqlens is not None
    rank, layout = (4, "(total, 3, nheads, headdim)") if varlen else (5, "(batch, seqlen, 3, nheads, headdim)")
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != rank or qkv.shape[-3] != 3:
        raise ValueError(f"qkv must be {layout}{' with cu_seqlens' if varlen else ''}, got "
                         f"{tuple(getattr(qkv, 'shape', ())) or type(qkv).__name__}")
    q, k, v = qkv.unbind(-3)
    if varlen:
        if key_padding_mask is not None or key_lengths is not None:
            raise ValueError("with cu_seqlens (packed sequences) there is no key_padding_mask or key_lengths")
        cu, dropout_p, scale = _varlen_args(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
        keys = (None, None, cu, max_seqlen)
    else:
        mask, lens, dropout_p, scale = _dense_args(q, k, v, key_padding_mask, key_lengths, dropout_p, softmax_scale)
        keys = (mask, lens, None, 0)
    out, _ = _attn_packed_op(qkv)(qkv, *keys, dropout_p, scale, _seed_for(seed, dropout_p, qkv))
    return out


def dropout_mask(seed, batch, nheads, seqlen_q, seqlen_k, p, device):
    """The kernels' keep-mask: bool (batch, nheads, seqlen_q, seqlen_k), True = kept, drawn with the
    same Philox counters as the attention kernels for ``seed`` (an int or a one-element integer
    tensor) and dropout probability ``p``."""
    device = torch.device(device)
    if device.type == "cpu" and not _INTERPRET:
        raise ValueError("dropout_mask runs a Triton kernel: it needs a CUDA device (or TRITON_INTERPRET=1)")
    seed = seed_tensor(seed, device)
    drop = _dropout_args(_check_dropout(p, seqlen_q, seqlen_k))
    keep = torch.empty((batch, nheads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)
    block_m, block_n = (16, 16) if _INTERPRET else (64, 64)
    grid = (batch * nheads, _cdiv(seqlen_q, block_m), _cdiv(seqlen_k, block_n))
    with _on_device(keep):
        launch(_dropout_mask_kernel, grid, keep, seqlen_q, seqlen_k, seed, drop["drop_threshold"], BLOCK_M=block_m,
               BLOCK_N=block_n, F16_DRAWS=drop["F16_DRAWS"])
    return keep.bool()

"""Functional ops of fastelectra, each beside its torch reference; the one place that dispatches.

    linear          y = act(x Wᵀ + b), act optional; the bias gradient reduced in Triton (with the
                    activation's backward in the same pass)           -> kernels/linear.py
    layer_norm      y = LayerNorm(dropout(x) + residual)          -> kernels/layernorm.py (Triton)
    attention       softmax(q kᵀ·scale + key-padding mask), dropout, · v  -> kernels/attention.py
    attention_varlen  the same over packed sequences (total, nheads, headdim) -> kernels/attention.py
    attention_qkvpacked  self-attention on a fused QKV projection (..., 3, nheads, headdim), padded or
                    packed sequences; its gradient comes back as one tensor   -> kernels/attention.py
    replace_tokens  Gumbel-max sampling at masked rows + scatter + labels -> csrc/ (fastelectra._C)
    cross_entropy   per-row cross-entropy; given replace_tokens' row lse, its backward is one pass
                                                                  -> kernels/cross_entropy.py

The model calls only these functions. ``backend`` (``auto`` | ``fused`` | ``eager``, overridable by
``FASTELECTRA_BACKEND``) picks the implementation per call; see fastelectra/backend.py for the rules.
Every public op validates its arguments and raises a ValueError/TypeError that names the argument.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from . import backend as _backend
from . import rng as _rng
from .autograd import use_eager

__all__ = ["linear", "layer_norm", "attention", "attention_varlen", "attention_qkvpacked", "replace_tokens",
           "cross_entropy", "cross_entropy_takes_lse",
           "layer_norm_reference", "attention_reference", "attention_varlen_reference", "replace_tokens_reference"]

# transformers' hidden_act names -> the activation (the reference of linear(..., activation=name))
ACTIVATIONS = {
    "gelu": F.gelu,                                       # erf GELU, as transformers' "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 always takes the reference
MAX_INVERSE_TEMPERATURE = 2.0**32   # replace_tokens: τ below 1 / this is plain argmax (csrc/replace_tokens.h)


# ----------------------------------------------------------------------------- checks
def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float tensor (float32, float16, bfloat16 or float64), got {t.dtype}")


def _check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on one device")


def _number(name: str, value, integer: bool = False):
    """``value`` as a Python int or float (numpy scalars converted; torch.compile's symbolic numbers kept),
    or a TypeError naming ``name`` for anything else (bool, str, None, tensors)."""
    kind = type(value)
    if kind is int or (kind is float and not integer):     # the common case, without the ABC checks below
        return value
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__} {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_activation(activation) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATIONS)}, got {activation!r}")


def _check_dropout_p(dropout_p):
    """dropout_p as a Python number in [0, 1), else an error naming it."""
    dropout_p = _number("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def _check_eps(eps):
    """eps as a Python number >= 0 and finite, else an error naming it."""
    eps = _number("eps", eps)
    if not 0.0 <= eps < math.inf:  # false for NaN too
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def _check_softmax_scale(softmax_scale):
    """softmax_scale: None, or a Python number > 0 and finite, else an error naming it."""
    if softmax_scale is None:
        return None
    softmax_scale = _number("softmax_scale", softmax_scale)
    if not 0.0 < softmax_scale < math.inf:
        raise ValueError(f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}")
    return softmax_scale


def _check_qkv_layout(q, k, v, layout: str) -> None:
    """q, k, v are float tensors with one dimension per name in ``layout`` ("batch, seqlen, ...") and
    non-empty head and head-size dimensions."""
    ndim = len(layout.split(","))
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t)
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D ({layout}), got shape {tuple(t.shape)}")
    if q.shape[-1] == 0 or q.shape[-2] == 0:
        raise ValueError(f"q, k, v must have nheads >= 1 and headdim >= 1, got q {tuple(q.shape)}")


def _attention_kernel_takes(q, backend, op: str) -> bool:
    """Whether the Triton attention kernels run this call: backend and device allow Triton, the dtype
    is fp32/fp16/bf16 and the head size is one the kernels are built for (else the reference runs)."""
    if q.dtype not in KERNEL_DTYPES or not _backend.use_triton(q.device, backend, op):
        return False
    from .kernels.attention import SUPPORTED_HEAD_DIMS

    return q.shape[-1] in SUPPORTED_HEAD_DIMS


def _kernel_outside_compile(t, backend, op: str) -> bool:
    """Whether ``op`` runs its Triton kernel on ``t``: backend and device allow Triton, the dtype is
    fp32/fp16/bf16, and the call is eager or in a CUDA graph. While torch.compile traces, the
    reference runs instead, which inductor generates and fuses itself (for linear and cross-entropy
    that beats an opaque custom op)."""
    return t.dtype in KERNEL_DTYPES and use_eager(t) and _backend.use_triton(t.device, backend, op)


# ----------------------------------------------------------------------------- linear
def linear(x, weight, bias=None, *, activation=None, return_input=False, backend=None):
    """y = x Wᵀ + b, as ``F.linear``: x (..., K), weight (N, K), bias (N,) or None → (..., N); with
    ``activation`` (a key of ACTIVATIONS: "gelu", "gelu_new", "relu", "silu") y = act(x Wᵀ + b).

    ``return_input=True`` returns (y, x'), x' being x itself (a view), for an x that also feeds a
    residual connection: give x' to that consumer, and on the fused path the gradient it sends back is
    added to dx inside the dx GEMM instead of by a separate autograd addition.

    The fused path (CUDA tensors with a bias, inside :func:`fastelectra.graphs.replayed_work`: a CUDA
    graph's warm-up and capture) is :func:`fastelectra.kernels.linear.fused_linear`: the same cuBLAS
    GEMMs, the bias gradient summed over rows by a Triton kernel instead of torch's reduction (in the
    same pass as the activation's backward when there is one), and under autocast the parameters'
    gradients written in their own dtype. Everything else is the reference
    ``act(F.linear(x, weight, bias))``: no bias, CPU tensors, float64, calls that torch.compile traces
    (inductor generates and fuses that reduction itself), and eager calls outside a graph. Those would
    pay the fused path's host time on every step, and an un-graphed step is host-bound: in
    bench_pretrain's ELECTRA-Small step, measured on a CPU with the launches stubbed
    (benchmarks/host_overhead.py), the fused linear layers added 5 to 8 ms to a 43 to 46 ms step
    (about 65 µs per layer's forward + backward), for GPU savings of a few µs per layer.
    """
    _backend.check_name(backend)
    _check_float("x", x)
    _check_float("weight", weight)
    if bias is not None:
        _check_float("bias", bias)
    _check_activation(activation)
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., K) and weight (N, K) must agree in K, got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    _check_same_device(x=x, weight=weight, bias=bias)
    if (not (x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype))
            and not torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"x, weight and bias must share one dtype outside autocast, got {x.dtype}, {weight.dtype}"
                        f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if bias is not None and _backend.in_replayed_work() and _kernel_outside_compile(x, backend, "linear"):
        from .kernels.linear import fused_linear

        return fused_linear(x, weight, bias, activation, return_input)
    y = F.linear(x, weight, bias)
    y = y if activation is None else ACTIVATIONS[activation](y)
    return (y, x) if return_input else y


# ----------------------------------------------------------------------------- layer norm
def layer_norm_reference(x, weight, bias, eps=1e-12, *, residual=None, dropout_p=0.0):
    """Torch reference of :func:`layer_norm` (dropout from torch's RNG). Takes the dtype mixes the
    kernel takes: x + residual in their promoted dtype, weight and bias in x's dtype unless both are
    fp32 for an fp16/bf16 x (F.layer_norm's own mix); returns x's dtype."""
    out_dtype = x.dtype
    if dropout_p > 0.0:
        x = F.dropout(x, dropout_p, training=True)
    if residual is not None:
        x = x + residual
    params = [p for p in (weight, bias) if p is not None]
    if not all(p.dtype == x.dtype for p in params) and not (
            x.dtype in (torch.float16, torch.bfloat16) and all(p.dtype == torch.float32 for p in params)):
        weight, bias = (None if p is None else p.to(x.dtype) for p in (weight, bias))
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(out_dtype)


def layer_norm(x, weight, bias, eps=1e-12, *, residual=None, dropout_p=0.0, seed=None, backend=None):
    """y = LayerNorm(dropout(x, p) + residual) over the last dimension.

    x, residual: (..., N); weight, bias: (N,) or None. Returns y with x's shape and dtype.
    ``dropout_p`` is applied as given (pass 0.0 in eval mode). ``seed`` (None | int | one-element
    integer tensor) keys the fused kernel's in-kernel dropout, which reads it on x's device; None
    draws it from torch's generator of that device (no host sync). The reference ignores it.
    """
    _backend.check_name(backend)
    _check_float("x", x)
    n = x.shape[-1] if x.dim() > 0 else 0
    if x.dim() == 0 or n == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_float(name, p)
            if tuple(p.shape) != (n,):
                raise ValueError(f"{name} must have shape ({n},) to match x's last dimension, got {tuple(p.shape)}")
    eps = _check_eps(eps)
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if x.dtype != torch.float64:   # (the kernels take no float64, so neither does the reference beside them)
        for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
            if t is not None and t.dtype == torch.float64:
                raise TypeError(f"{name} is float64 but x is {x.dtype}: float64 goes with a float64 x only")
    dropout_p = _check_dropout_p(dropout_p)
    seed = _rng.check_seed(seed)
    _check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    if x.dtype in KERNEL_DTYPES and _backend.use_triton(x.device, backend, "layer_norm"):
        from .kernels.layernorm import MAX_N, fused_layer_norm

        if n <= MAX_N:  # wider rows do not fit one block: they take the reference
            return fused_layer_norm(x, weight, bias, eps, residual=residual, dropout_p=dropout_p, seed=seed)
    return layer_norm_reference(x, weight, bias, eps, residual=residual, dropout_p=dropout_p)


# ----------------------------------------------------------------------------- attention
def attention_reference(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None):
    """Torch reference of :func:`attention`: HF-style eager math in the inputs' dtype.

    Padded keys get the most negative finite score (as transformers does); a sequence with no valid
    key gets zeros (the fused kernel's rule, and SDPA's), where transformers would average all values.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))            # (B, H, T, D)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale         # (B, H, Tq, Tk)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    out = torch.matmul(probs, vh).transpose(1, 2)                   # (B, Tq, H, D)
    if key_padding_mask is not None:                                # no valid key: zeros
        out = out * key_padding_mask.any(-1)[:, None, None, None].to(out.dtype)
    return out


def _check_attention_args(q, k, v, key_padding_mask, dropout_p, softmax_scale):
    """Checks of :func:`attention`'s arguments; returns (the key-padding mask as bool or None, dropout_p,
    softmax_scale) as the kernels take them."""
    _check_qkv_layout(q, k, v, "batch, seqlen, nheads, headdim")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, nheads and headdim")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"empty batch or sequence: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a (batch, seqlen_k) bool or integer tensor, got "
                            f"{type(key_padding_mask).__name__}")
        if key_padding_mask.shape != (k.shape[0], k.shape[1]):
            raise ValueError(f"key_padding_mask must have shape (batch, seqlen_k) = {(k.shape[0], k.shape[1])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise TypeError(f"key_padding_mask must be bool or integer (1 = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
    _check_same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    return key_padding_mask, _check_dropout_p(dropout_p), _check_softmax_scale(softmax_scale)


def attention(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, *, seed=None, backend=None):
    """Non-causal multi-head attention with a key-padding mask and dropout on the probabilities.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads, headdim).
    key_padding_mask: (batch, seqlen_k), True/1 for real tokens (HF's attention_mask), or None.
    Returns (batch, seqlen_q, nheads, headdim) in q's dtype. ``dropout_p`` is applied as given;
    ``seed`` (None | int | one-element integer tensor) keys the fused kernel's in-kernel dropout,
    which reads it on q's device (None: drawn from torch's generator of that device, no host sync;
    the reference ignores it). The fused kernel takes headdim 16/32/64/128 in fp16/bf16/fp32; other
    head sizes and float64 run the reference.
    """
    _backend.check_name(backend)
    key_padding_mask, dropout_p, softmax_scale = _check_attention_args(q, k, v, key_padding_mask, dropout_p,
                                                                       softmax_scale)
    seed = _rng.check_seed(seed)
    if _attention_kernel_takes(q, backend, "attention"):
        from .kernels.attention import flash_attention

        return flash_attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                               softmax_scale=softmax_scale, seed=seed)
    return attention_reference(q, k, v, key_padding_mask, dropout_p, softmax_scale)


def attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None):
    """Torch reference of :func:`attention_varlen`: the packed tokens are placed into a zero-padded
    (batch, max_seqlen) layout, :func:`attention_reference` runs there with the matching prefix mask
    and the real rows are gathered back. No host sync; the cost is that of the padded batch. With
    cu_seqlens on the CPU (read without a sync) the padded length is the longest sequence's, however
    large ``max_seqlen`` is."""
    batch, total = cu_seqlens.shape[0] - 1, q.shape[0]
    cu = cu_seqlens.long()
    token = torch.arange(total, device=q.device)                                    # (total,)
    seq = torch.searchsorted(cu[1:], token, right=True)                              # (total,) its sequence
    pos = token - cu[seq]                                                            # (total,) its position there
    lengths = cu.diff()                                                              # (B,)
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        max_seqlen = min(max_seqlen, max(1, int(lengths.max())))
    mask = torch.arange(max_seqlen, device=q.device) < lengths[:, None]             # (B, max_seqlen)

    def pad(x):                                                     # (total, H, D) → (B, max_seqlen, H, D)
        return x.new_zeros(batch, max_seqlen, *x.shape[1:]).index_put((seq, pos), x)

    return attention_reference(pad(q), pad(k), pad(v), mask, dropout_p, softmax_scale)[seq, pos]


def _check_varlen_args(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
    """Checks of :func:`attention_varlen`'s arguments; returns (max_seqlen, dropout_p, softmax_scale) as
    the kernels take them."""
    _check_qkv_layout(q, k, v, "total, nheads, headdim")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have one shape (self-attention over the same tokens), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.numel() == 0:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = getattr(cu_seqlens, "dtype", type(cu_seqlens).__name__)
        raise TypeError(f"cu_seqlens must be an int32 tensor, got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape (batch + 1,) with batch >= 1, got {tuple(cu_seqlens.shape)}")
    max_seqlen = _number("max_seqlen", max_seqlen, integer=True)
    if max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    _check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens)
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        steps = cu_seqlens.diff()
        if not (cu_seqlens[0] == 0 and cu_seqlens[-1] == q.shape[0] and 0 <= steps.min() <= steps.max() <= max_seqlen):
            raise ValueError(f"cu_seqlens must rise from 0 to total = {q.shape[0]} in steps of 0 to max_seqlen = "
                             f"{max_seqlen}, got {cu_seqlens.tolist()}")
    return max_seqlen, _check_dropout_p(dropout_p), _check_softmax_scale(softmax_scale)


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, *, seed=None,
                     backend=None):
    """Self-attention over packed sequences (the unpadded layout): sequence b is rows
    ``cu_seqlens[b]:cu_seqlens[b+1]`` of q, k, v and attends to itself only; padding costs nothing.

    q, k, v: (total, nheads, headdim), the real tokens of all sequences back to back.
    cu_seqlens: (batch + 1,) int32 on q's device, cumulative lengths from 0 to total.
    max_seqlen: an int >= the longest sequence. The padded length T is a sync-free choice, and with
    it the fused kernel draws the same dropout mask as :func:`attention` on the padded batch.
    Returns (total, nheads, headdim) in q's dtype. ``dropout_p``, ``seed``, ``softmax_scale`` and the
    choice of kernel (headdim 16/32/64/128, not float64) are as in :func:`attention`. The values of
    cu_seqlens are checked for CPU tensors only (on a GPU that would cost a host sync).
    """
    _backend.check_name(backend)
    max_seqlen, dropout_p, softmax_scale = _check_varlen_args(q, k, v, cu_seqlens, max_seqlen, dropout_p,
                                                              softmax_scale)
    seed = _rng.check_seed(seed)
    if _attention_kernel_takes(q, backend, "attention_varlen"):
        from .kernels.attention import flash_attention_varlen

        return flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=dropout_p,
                                      softmax_scale=softmax_scale, seed=seed)
    return attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)


def attention_qkvpacked(qkv, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, *, cu_seqlens=None,
                        max_seqlen=None, seed=None, backend=None):
    """Self-attention on the packed output of a fused QKV projection.

    qkv: (batch, seqlen, 3, nheads, headdim) with ``key_padding_mask`` as in :func:`attention`, or
    (total, 3, nheads, headdim) with ``cu_seqlens`` and ``max_seqlen`` as in :func:`attention_varlen`.
    Computes exactly what those do on ``qkv.unbind(-3)`` (same kernels, same dropout mask for a
    seed). The fused backward writes the gradient of qkv as one tensor, so autograd skips the copy
    that stacks dq, dk and dv back into the projection's output.
    Returns (batch, seqlen, nheads, headdim), or (total, nheads, headdim), in qkv's dtype.
    """
    _backend.check_name(backend)
    _check_float("qkv", qkv)
    varlen = cu_seqlens is not None
    if not varlen and max_seqlen is not None:
        raise ValueError("max_seqlen goes with cu_seqlens (packed sequences); without cu_seqlens it must be None")
    rank, layout = ((4, "(total, 3, nheads, headdim) with cu_seqlens") if varlen
                    else (5, "(batch, seqlen, 3, nheads, headdim)"))
    if qkv.dim() != rank or qkv.shape[-3] != 3:
        raise ValueError(f"qkv must be {layout}, got shape {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(-3)
    if varlen:
        if key_padding_mask is not None:
            raise ValueError("with cu_seqlens (packed sequences) key_padding_mask must be None")
        max_seqlen, dropout_p, softmax_scale = _check_varlen_args(q, k, v, cu_seqlens, max_seqlen, dropout_p,
                                                                  softmax_scale)
    else:
        key_padding_mask, dropout_p, softmax_scale = _check_attention_args(q, k, v, key_padding_mask, dropout_p,
                                                                           softmax_scale)
    seed = _rng.check_seed(seed)
    if _attention_kernel_takes(q, backend, "attention_varlen" if varlen else "attention"):
        from .kernels.attention import flash_attention_qkvpacked

        return flash_attention_qkvpacked(qkv, key_padding_mask, dropout_p, softmax_scale, seed=seed,
                                         cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if varlen:
        return attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    return attention_reference(q, k, v, key_padding_mask, dropout_p, softmax_scale)


# ----------------------------------------------------------------------------- replacement
def replace_tokens_reference(logits, input_ids, masked_positions, *, temperature=1.0, seed=None, offset=0,
                             return_lse=False):
    """Torch reference of :func:`replace_tokens`: Gumbel-max with uniforms from torch's RNG; the same
    distribution as the fused op, not the same draws.

    ``seed`` None: torch's generator of the logits' device (``torch.manual_seed`` reproduces it; no
    host sync, safe in a CUDA graph; ``offset`` is unused). An int or one-element integer tensor:
    a fresh torch.Generator seeded from (seed, offset), the same draws for an int and a tensor of
    equal value; a tensor is read with ``.item()`` (a host sync: explicit seeds are for tests)."""
    x = logits.float()
    # the C++ op's rule: τ < 2^-32 is τ = 0, plain argmax (x / τ could overflow, and argmax would take the
    # first +inf instead of the largest logit); x is scaled by the float32 1/τ as there
    inv_tau = 1.0 / temperature if temperature > 0.0 else math.inf
    if inv_tau <= MAX_INVERSE_TEMPERATURE:
        if seed is None:
            u = torch.rand_like(x)        # (rand_like also traces with symbolic shapes under torch.compile)
        else:
            where = seed.device if isinstance(seed, torch.Tensor) else "cpu"  # validated without a copy
            seed = int(_rng.seed_tensor(seed, where).item())
            gen = torch.Generator(device=logits.device)
            gen.manual_seed((seed * 0x9E3779B97F4A7C15 + offset) % (2**63))
            u = torch.rand(x.shape, generator=gen, device=x.device)
        u = u.clamp_(min=torch.finfo(torch.float32).tiny)
        scores = x * inv_tau - torch.log(-torch.log(u))
    else:
        scores = x
    # the fused op's rule for non-finite logits: a NaN never wins (torch.argmax would take it), so a row
    # with nothing but NaN and -inf samples column 0
    sampled = torch.argmax(scores.masked_fill(scores.isnan(), -math.inf), dim=-1)
    flat = input_ids.reshape(-1)
    out = flat.clone()
    out[masked_positions] = sampled
    labels = torch.zeros_like(flat, dtype=torch.bool)
    labels[masked_positions] = sampled != flat[masked_positions]
    result = (out.view_as(input_ids), labels.view_as(input_ids), sampled)
    return result + (torch.logsumexp(x, dim=-1),) if return_lse else result


def _check_replace_args(logits, input_ids, masked_positions, temperature, offset):
    """Checks of :func:`replace_tokens`' arguments; returns (temperature, offset) as Python numbers."""
    _check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (num_masked, vocab_size), got shape {tuple(logits.shape)}")
    # (while torch.compile traces, the op's needs_contiguous_strides tag makes inductor hand it contiguous logits)
    if not logits.is_contiguous() and not torch.compiler.is_compiling():
        raise ValueError(f"logits must be contiguous (rows of vocab_size values), got strides {logits.stride()} "
                         f"for shape {tuple(logits.shape)}; pass logits.contiguous()")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64 or input_ids.dim() != 2:
        raise TypeError("input_ids must be an int64 tensor of shape (batch, seqlen), got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
    if (not isinstance(masked_positions, torch.Tensor) or masked_positions.dtype != torch.int64
            or masked_positions.dim() != 1):
        raise TypeError("masked_positions must be a 1-D int64 tensor of flat indices into input_ids, got "
                        f"{getattr(masked_positions, 'dtype', type(masked_positions).__name__)} "
                        f"{tuple(getattr(masked_positions, 'shape', ()))}")
    if masked_positions.shape[0] != logits.shape[0]:
        raise ValueError(f"masked_positions has {masked_positions.shape[0]} entries but logits has "
                         f"{logits.shape[0]} rows; they must match")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    temperature = _number("temperature", temperature)
    if not 0.0 <= temperature < math.inf:  # false for NaN too; unlike math.isfinite, traceable for a SymFloat
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    offset = _number("offset", offset, integer=True)
    if not 0 <= offset < 2**63:
        raise ValueError(f"offset must be an int in [0, 2**63), got {offset!r}")
    _check_same_device(logits=logits, input_ids=input_ids, masked_positions=masked_positions)
    # Data checks: on CPU only (a sync on GPU, where the _C kernel flags bad rows with sampled = -1)
    # and not while torch.compile traces (data-dependent branches; the _C CPU op checks the same).
    if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if masked_positions.numel() and (masked_positions.min() < 0 or masked_positions.max() >= input_ids.numel()):
            raise ValueError(f"masked_positions must lie in [0, {input_ids.numel()}) (flat indices into input_ids)")
        if masked_positions.unique().numel() != masked_positions.numel():
            raise ValueError("masked_positions must be distinct (two rows would write one position)")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= logits.shape[1]):
            raise ValueError(f"input_ids must lie in [0, vocab_size={logits.shape[1]})")
    return temperature, offset


def replace_tokens(logits, input_ids, masked_positions, *, temperature=1.0, seed=None, offset=0,
                   return_lse=False, backend=None):
    """ELECTRA's replacement step in one pass over the generator's logits.

    logits: (N, V) generator logits of the masked rows (fp32/bf16/fp16, no gradient flows).
    input_ids: (B, T) int64 original ids. masked_positions: (N,) int64 flat indices into
    ``input_ids.view(-1)``, in the order of the logits' rows.
    sample = argmax(logits/τ + Gumbel noise) (τ = 0, and any τ < 2^-32: plain argmax); the original may
    be sampled. A NaN logit never wins; a row of nothing but NaN and -inf samples id 0 (its lse, and so
    the MLM loss, is NaN or inf: that is where a diverged generator shows).
    Returns (discriminator input ids (B, T), is-replaced labels (B, T) bool, sampled ids (N,))
    and, with ``return_lse``, the row log-sum-exp of the logits (N,) in fp32.

    The fused op (csrc/) draws its noise from Philox4x32-10 keyed on the seed, the offset and the
    element's place (row, octet of its flat index; csrc/philox.h), so CPU and CUDA give identical
    samples for the same logits, seed and offset (logits of at most 2^32 - 1 rows); the eager reference
    samples the same distribution with other draws; float64 logits always take it. Positions must be
    distinct and logits contiguous. On CUDA, index ranges are checked inside the kernel without a
    host sync (a row whose position or original id is out of range writes nothing and reports
    ``sampled = -1``), and distinct positions are the caller's promise; on CPU both are checked.

    ``seed``: None, an int, or a one-element integer tensor. The fused op takes it as an int64 (1,)
    tensor on the logits' device that its kernel reads from memory (see fastelectra.rng): None
    draws it there from torch's generator, so ``torch.manual_seed`` reproduces a run, the step has
    no host sync and every replay of a captured CUDA graph samples afresh. An int and a tensor of
    the same value give the same samples. For the eager path see :func:`replace_tokens_reference`.
    """
    _backend.check_name(backend)
    temperature, offset = _check_replace_args(logits, input_ids, masked_positions, temperature, offset)
    seed = _rng.check_seed(seed)
    logits = logits.detach()
    if logits.dtype in KERNEL_DTYPES and _backend.use_extension(logits.device, backend, "replace_tokens"):
        seed = _rng.seed_tensor(seed, logits.device)
        ids, labels, sampled, lse = torch.ops.fastelectra.replace_tokens(
            logits, input_ids, masked_positions, float(temperature), seed, int(offset), bool(return_lse))
        return (ids, labels, sampled, lse) if return_lse else (ids, labels, sampled)
    return replace_tokens_reference(logits, input_ids, masked_positions, temperature=temperature, seed=seed,
                                    offset=offset, return_lse=return_lse)


# ----------------------------------------------------------------------------- cross-entropy
def cross_entropy_takes_lse(logits, backend=None) -> bool:
    """Whether :func:`cross_entropy` on ``logits`` uses an ``lse`` given to it (the fused path), so a
    caller asks :func:`replace_tokens` for one only when it saves work instead of adding a pass."""
    return _kernel_outside_compile(logits, backend, "cross_entropy")


def _check_lse_values(logits, lse) -> None:
    """On the host the lse is cheap to bound: max_j x_j <= lse <= max_j x_j + ln V (on a GPU, a sync)."""
    top = logits.detach().float().amax(1)
    slack = 1e-3 * (1.0 + top.abs())                                          # fp32 rounding of the lse
    ok = (lse >= top - slack) & (lse <= top + math.log(logits.shape[1]) + slack)   # false for NaN
    if not ok.all():
        row = int((~ok).nonzero()[0, 0])
        raise ValueError(f"lse must be the row log-sum-exp of logits: row {row} has lse {lse[row].item()} "
                         f"but its largest logit is {top[row].item()} (max <= lse <= max + ln(vocab_size))")


def cross_entropy(logits, targets, *, lse=None, backend=None):
    """Per-row cross-entropy (N,) fp32 of logits (N, V) against int64 targets (N,): the loss of
    ``F.cross_entropy(logits.float(), targets, reduction="none")``, its own reference.

    ``lse``: the row log-sum-exp (N,) fp32 of these logits when already known, as
    :func:`replace_tokens` returns it with ``return_lse=True``. Then, under ``fused`` on CUDA
    (eager calls and CUDA graphs), the forward is a gather and the backward one Triton pass over the
    logits (kernels/cross_entropy.py), instead of an fp32 copy, a log-softmax and its backward. The
    lse must belong to these logits; it gets no gradient. Everything else (no lse, CPU, float64,
    torch.compile, which fuses the reference itself) runs F.cross_entropy.
    """
    _backend.check_name(backend)
    _check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (rows, vocab_size), got shape {tuple(logits.shape)}")
    if (not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64
            or tuple(targets.shape) != tuple(logits.shape[:1])):
        raise TypeError(f"targets must be an int64 tensor of shape ({logits.shape[0]},), got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)} {tuple(getattr(targets, 'shape', ()))}")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if lse is not None and (not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32
                            or tuple(lse.shape) != tuple(logits.shape[:1])):
        raise TypeError(f"lse must be a float32 tensor of shape ({logits.shape[0]},), got "
                        f"{getattr(lse, 'dtype', type(lse).__name__)} {tuple(getattr(lse, 'shape', ()))}")
    _check_same_device(logits=logits, targets=targets, lse=lse)
    if (targets.device.type == "cpu" and targets.numel() and not torch.compiler.is_compiling()
            and (targets.min() < 0 or targets.max() >= logits.shape[1])):   # (F.cross_entropy would ignore -100)
        raise ValueError(f"targets must lie in [0, vocab_size={logits.shape[1]})")
    if lse is not None and lse.device.type == "cpu" and lse.numel() and not torch.compiler.is_compiling():
        _check_lse_values(logits, lse)
    if lse is not None and cross_entropy_takes_lse(logits, backend):
        from .kernels.cross_entropy import cross_entropy_with_lse

        return cross_entropy_with_lse(logits, targets, lse)
    return F.cross_entropy(logits.float(), targets, reduction="none")

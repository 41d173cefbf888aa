"""Drop-in modules backed by fastelectra's ops (Triton kernels under backend ``fused``).

FusedLinear         ⇄ nn.Linear: same constructor, state dict and results; its backward sums the
                      bias gradient in Triton (CUDA, eager calls and CUDA graphs).
FusedLayerNorm      ⇄ nn.LayerNorm: same constructor, state dict and results; forward also
                      takes the block tail's ``residual`` and ``dropout_p`` to fuse them.
FusedSelfAttention  ⇄ ELECTRA/BERT self-attention: ``query``/``key``/``value`` Linear layers,
                      (B, T, hidden) → (B, T, hidden) context, key-padding mask, attention dropout;
                      or unpadded rows (total, hidden) of packed sequences with ``cu_seqlens``.
"""
from __future__ import annotations

import torch
from torch import nn

from . import backend as _backend
from . import ops

__all__ = ["FusedLinear", "FusedLayerNorm", "FusedSelfAttention"]


def _check_module(name: str, module, kind: type) -> None:
    if not isinstance(module, kind):
        raise TypeError(f"{name} must be a torch.nn.{kind.__name__}, got {type(module).__name__}")


class FusedLinear(nn.Linear):
    """nn.Linear whose bias gradient is reduced by a Triton kernel inside a CUDA graph's warm-up and capture
    (:func:`fastelectra.graphs.replayed_work`); called eagerly it is ``F.linear`` (see fastelectra.ops.linear).

    With ``activation`` ("gelu", "gelu_new", "relu" or "silu", transformers' names) it computes
    act(x Wᵀ + b), the activation's backward fused with the bias sum; the state dict is nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 activation: str | None = None, backend: str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        ops._check_activation(activation)
        _backend.check_name(backend)
        self.activation = activation
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str | None = None,
                    backend: str | None = None) -> "FusedLinear":
        """A FusedLinear sharing ``linear``'s parameters (no copy)."""
        _check_module("linear", linear, nn.Linear)
        ops._check_activation(activation)
        _backend.check_name(backend)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.activation, new.backend = activation, backend
        return new

    def forward(self, x: torch.Tensor, return_input: bool = False):
        """act(x Wᵀ + b); with ``return_input``, (that, x') for an x that also feeds a residual connection
        (see :func:`fastelectra.ops.linear`)."""
        return ops.linear(x, self.weight, self.bias, activation=self.activation, return_input=return_input,
                          backend=self.backend)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return super().extra_repr() + act + f", backend={self.backend or 'auto'}"


class FusedLayerNorm(nn.LayerNorm):
    """LayerNorm over the last dimension, optionally fused with ``dropout(x) + residual``."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str | None = None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"FusedLayerNorm normalises the last dimension only; normalized_shape="
                             f"{tuple(self.normalized_shape)} must have one entry")
        _backend.check_name(backend)
        self.backend = backend

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm, backend: str | None = None) -> "FusedLayerNorm":
        """A FusedLayerNorm sharing ``ln``'s parameters (no copy)."""
        _check_module("ln", ln, nn.LayerNorm)
        _backend.check_name(backend)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = tuple(ln.normalized_shape), ln.eps, ln.elementwise_affine
        if len(new.normalized_shape) != 1:
            raise ValueError(f"cannot fuse a LayerNorm over {new.normalized_shape}: only the last dimension is supported")
        new.weight, new.bias = ln.weight, ln.bias
        new.backend = backend
        return new

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
        """y = LayerNorm(dropout(x, dropout_p) + residual); x, residual: (..., N)."""
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, dropout_p=dropout_p,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend or 'auto'}"


class FusedSelfAttention(nn.Module):
    """Multi-head self-attention with the query/key/value projections of BERT/ELECTRA.

    forward(hidden_states (batch, seqlen, hidden), key_padding_mask (batch, seqlen) bool/int, 1 = attend)
    → context (batch, seqlen, hidden), before the output projection (which lives in the block's
    ``attention.output.dense``, as in transformers).
    Unpadded: forward(hidden_states (total, hidden), cu_seqlens=(batch + 1,) int32, max_seqlen=int)
    → context (total, hidden); the rows are packed sequences, see :func:`fastelectra.ops.attention_varlen`.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout_p: float = 0.0, *, backend: str | None = None):
        super().__init__()
        hidden_size = ops._number("hidden_size", hidden_size, integer=True)
        num_heads = ops._number("num_heads", num_heads, integer=True)
        if num_heads < 1 or hidden_size < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads})")
        dropout_p = ops._check_dropout_p(dropout_p)
        _backend.check_name(backend)
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)   # parameters only: one fused GEMM below
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout_p = dropout_p
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None, return_input: bool = False):
        """context; with ``return_input``, (context, hidden_states') for hidden states that also feed the
        block's residual connection (see :func:`fastelectra.ops.linear`)."""
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        unpadded = cu_seqlens is not None
        if not unpadded and max_seqlen is not None:
            raise ValueError("max_seqlen goes with cu_seqlens (packed sequences); without cu_seqlens it must be None")
        if unpadded and (hidden_states.dim() != 2 or key_padding_mask is not None or max_seqlen is None):
            raise ValueError("with cu_seqlens, hidden_states must be (total, hidden), max_seqlen set and "
                             f"key_padding_mask None; got shape {tuple(hidden_states.shape)}, max_seqlen={max_seqlen!r}"
                             f", key_padding_mask {'set' if key_padding_mask is not None else 'None'}")
        if not unpadded and hidden_states.dim() != 3:
            raise ValueError("hidden_states must be (batch, seqlen, hidden), or (total, hidden) with cu_seqlens; "
                             f"got shape {tuple(hidden_states.shape)}")
        # one GEMM for q, k and v (the three weights side by side; their gradients split back by the
        # concatenation's backward), viewed as (..., 3, heads, head_dim) and read in place by the
        # kernels (no transpose copies), whose backward returns the gradient of qkv as one tensor
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])          # (3·hidden, hidden)
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = ops.linear(hidden_states, weight, bias, return_input=return_input, backend=self.backend)
        if return_input:
            qkv, hidden_states = qkv
        qkv = qkv.unflatten(-1, (3, self.num_heads, self.head_dim))                          # (..., 3, H, D)
        dropout_p = self.dropout_p if self.training else 0.0
        ctx = ops.attention_qkvpacked(qkv, key_padding_mask, dropout_p=dropout_p, cu_seqlens=cu_seqlens,
                                      max_seqlen=max_seqlen, backend=self.backend)   # (B, T, H, D) or (total, H, D)
        ctx = ctx.flatten(-2)                                                                  # (..., hidden)
        return (ctx, hidden_states) if return_input else ctx

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, dropout_p={self.dropout_p}, backend={self.backend or 'auto'}"

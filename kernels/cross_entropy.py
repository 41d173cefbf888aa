"""Cross-entropy over a vocabulary whose row log-sum-exp is already known, in Triton.

What it fuses. ELECTRA's generator loss is the cross-entropy of N masked rows of (N, V) logits. The
replacement step (fastelectra.ops.replace_tokens, ``return_lse=True``) already reads every logit
once and returns each row's log-sum-exp, so

    loss_i = lse_i - logits[i, target_i]                 (forward: a gather, no pass over the logits)
    dlogits_ij = g_i · (exp(logits_ij - lse_i) - [j == target_i])

and the backward is one kernel that reads the logits once and writes their gradient once, in the
logits' dtype. torch's ``F.cross_entropy(logits.float(), ...)`` instead makes an fp32 copy, a
log-softmax and, in the backward, a zero-filled one-hot gradient, the log-softmax backward and a
cast back: about nine times the logits' bytes in fp32 and bf16 traffic (an H100 profile of
ELECTRA-Small showed its softmax backward alone at 0.44 ms of a 16.8 ms step).

The lse is an input without a gradient: the formula above already differentiates through it.
Rows whose upstream gradient is 0 (ELECTRA's empty masked slots) get a zero gradient.

Limits: 2-D logits with a unit column stride (fp32/fp16/bf16), int64 targets in [0, V) (as
F.cross_entropy, an index outside is not checked on the GPU, where checking would cost a host sync),
fp32 lse. torch.compile traces F.cross_entropy instead (see fastelectra.ops.cross_entropy).

References: the fused linear-cross-entropy kernels of Liger-Kernel and Apple's cut-cross-entropy
(the gradient of a cross-entropy is softmax minus one-hot); Triton tutorial 02 (fused softmax).
"""
import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from .layernorm import _on_device
from .launch import launch

__all__ = ["cross_entropy_with_lse"]

BLOCK_V = 2048          # vocabulary columns per loop step: 16 values per thread at 4 warps
NUM_WARPS = 4


@triton.jit
def _grad_block(
    Logits,                 # pointer to this block's first logit
    DLogits,                # pointer to this block's first gradient
    limit,                  # int32: columns of the block that exist (read only when MASKED)
    target,                 # int32: the row's target column, counted from this block's first
    lse,                    # fp32: the row's log-sum-exp
    g,                      # fp32: the row's upstream gradient
    BLOCK: tl.constexpr,
    MASKED: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        x = tl.load(Logits + offs, mask=offs < limit, other=0.0).to(tl.float32)
    else:
        x = tl.load(Logits + offs).to(tl.float32)
    # softmax (1.4427 = log2 e: exp(y) = exp2(y log2 e)); x - lse first, which is exact near the row's top
    # logits, so fp32 logits of large magnitude lose no more than the lse's own rounding (x log2 e - lse log2 e
    # would add the rounding of lse · log2 e: twice the error)
    p = tl.exp2((x - lse) * 1.4426950408889634)
    d = (g * (p - tl.where(offs == target, 1.0, 0.0))).to(DLogits.dtype.element_ty)
    if MASKED:
        tl.store(DLogits + offs, d, mask=offs < limit)
    else:
        tl.store(DLogits + offs, d)


@triton.jit
def _cross_entropy_bwd_kernel(
    Logits,                 # (N, V) logits, row stride stride_l, unit column stride
    Targets,                # (N,) int64 target column of each row
    Lse,                    # (N,) fp32 row log-sum-exp of the logits
    DLoss,                  # (N,) fp32 upstream gradient of each row's loss
    DLogits,                # (N, V) out, Logits' dtype, row stride stride_d
    vocab,                  # V
    stride_l,               # elements between rows of Logits
    stride_d,               # elements between rows of DLogits
    ALIGN: tl.constexpr,    # elements per 16 bytes when both rows share their alignment, else 1
    BLOCK_V: tl.constexpr,
):
    """One program per row. A row of V = 30522 bf16 logits starts 4-byte aligned at best, so the
    columns before its first 16-byte boundary (the head, < ALIGN) and after its last whole block
    (the tail) are masked, and the whole blocks between run unmasked on 16-byte vectors."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(DLoss + row)
    lse = tl.load(Lse + row)
    target = tl.load(Targets + row).to(tl.int32)
    row_l = row * stride_l
    row_d = row * stride_d
    head = tl.minimum((ALIGN - row_l % ALIGN) % ALIGN, vocab).to(tl.int32)
    _grad_block(Logits + row_l, DLogits + row_d, head, target, lse, g, ALIGN, True)
    full = (vocab - head) // BLOCK_V
    for i in range(full):
        start = head + i * BLOCK_V
        # row_l + start is a multiple of ALIGN by the choice of head (row_d too: the launcher
        # passes ALIGN > 1 only when both rows share their stride and base alignment)
        off_l = tl.multiple_of(row_l + start, ALIGN)
        off_d = tl.multiple_of(row_d + start, ALIGN)
        _grad_block(Logits + off_l, DLogits + off_d, BLOCK_V, target - start, lse, g, BLOCK_V, False)
    start = head + full * BLOCK_V
    _grad_block(Logits + row_l + start, DLogits + row_d + start, vocab - start, target - start, lse, g,
                BLOCK_V, True)


def _backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, dloss: torch.Tensor) -> torch.Tensor:
    n, vocab = logits.shape
    dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n == 0:
        return dlogits
    vector = 16 // logits.element_size()
    same_alignment = (logits.stride(0) == dlogits.stride(0) and logits.data_ptr() % 16 == 0
                      and dlogits.data_ptr() % 16 == 0)
    with _on_device(logits):
        launch(_cross_entropy_bwd_kernel, (n,), logits, targets, lse, dloss.float().contiguous(), dlogits, vocab,
               logits.stride(0), dlogits.stride(0), ALIGN=vector if same_alignment else 1,
               BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return dlogits


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, lse):
        ctx.save_for_backward(logits, targets, lse)
        return lse - logits.gather(1, targets[:, None]).squeeze(1).float()       # (N,) fp32

    @staticmethod
    @once_differentiable   # the backward is a Triton pass: a double backward is an error, not silently wrong
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        return _backward(logits, targets, lse, dloss), None, None


def cross_entropy_with_lse(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy (N,) fp32 of logits (N, V) against int64 targets (N,), given the row
    log-sum-exp lse (N,) fp32 of those logits (e.g. from replace_tokens(return_lse=True)).

    Equals ``F.cross_entropy(logits.float(), targets, reduction="none")`` when lse is exact;
    differentiable in logits (one Triton pass in the backward), not in lse or targets."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype not in (
            torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("logits must be a 2-D float32/float16/bfloat16 tensor (rows, vocab), got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}")
    n = logits.shape[0]
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or tuple(targets.shape) != (n,):
        raise TypeError(f"targets must be an int64 tensor of shape ({n},), got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)} {tuple(getattr(targets, 'shape', ()))}")
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != (n,):
        raise TypeError(f"lse must be a float32 tensor of shape ({n},), got "
                        f"{getattr(lse, 'dtype', type(lse).__name__)} {tuple(getattr(lse, 'shape', ()))}")
    for name, t in (("targets", targets), ("lse", lse)):
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    if targets.device.type == "cpu" and n and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        raise ValueError(f"targets must lie in [0, vocab_size={logits.shape[1]})")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _CrossEntropyFn.apply(logits, targets.contiguous(), lse.detach().contiguous())

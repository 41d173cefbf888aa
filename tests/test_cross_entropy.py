"""Cross-entropy from a known row log-sum-exp (kernels/cross_entropy.py) against F.cross_entropy.

Without a GPU the Triton kernel runs on CPU tensors in the interpreter (TRITON_INTERPRET=1); the
``gpu`` tests add the generator's real shape and a CUDA graph. Accuracy rule as elsewhere: error
against a float64 reference at most twice that of torch in the same dtype, or a small floor.
"""
import os

import math

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported below

from fastelectra import ops  # noqa: E402
from fastelectra.kernels.cross_entropy import BLOCK_V, cross_entropy_with_lse  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# one unit in the last place at 1.0 for the 16-bit dtypes: Triton's interpreter truncates when it casts
# fp32 to them (the GPU rounds to nearest), an error of up to one ulp where torch makes half
FLOOR = {torch.float32: 1e-6, torch.float16: torch.finfo(torch.float16).eps,
         torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def make(n, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, vocab, generator=g)).to(device=DEVICE, dtype=dtype)
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    dloss = torch.rand(n, generator=g).to(DEVICE)
    dloss[::3] = 0.0                                  # ELECTRA's empty masked slots: weight 0
    return logits, targets, dloss


def loss_and_grad(fn, logits, dloss):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x)
    loss.backward(dloss.to(loss.dtype))
    return loss.detach(), x.grad


def reference(x, targets):
    return F.cross_entropy(x.float() if x.dtype != torch.float64 else x, targets, reduction="none")


def assert_accurate(got, same, exact, dtype):
    """(loss, dlogits) of the kernel: error against float64 at most twice torch's in ``dtype``, or a floor."""
    for name, g, s, e in zip(("loss", "dlogits"), got, same, exact):
        scale = max(1.0, e.abs().max().item())
        err, err_torch = (g.double() - e).abs().max().item(), (s.double() - e).abs().max().item()
        assert err <= max(2 * err_torch, FLOOR[dtype] * scale), f"{name}: {err:.3g} vs torch {err_torch:.3g}"


@pytest.mark.parametrize("n,vocab", [(1, 1), (7, 77), (5, BLOCK_V + 3), (3, 1000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_f_cross_entropy(n, vocab, dtype):
    logits, targets, dloss = make(n, vocab, dtype)
    lse = torch.logsumexp(logits.float(), dim=-1)
    got = loss_and_grad(lambda x: cross_entropy_with_lse(x, targets, lse), logits, dloss)
    same = loss_and_grad(lambda x: reference(x, targets), logits, dloss)
    exact = loss_and_grad(lambda x: reference(x, targets), logits.double(), dloss.double())
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert_accurate(got, same, exact, dtype)
    assert torch.equal(got[1][dloss == 0], torch.zeros_like(got[1][dloss == 0]))   # weight 0: zero gradient


def test_fp32_logits_far_from_zero():
    """fp32 logits around 1000: an fp32 lse is off by up to half its ulp (3e-5), which shifts each
    probability by that relative amount; the kernel's error stays within that. It takes exp2((x - lse) log2 e),
    whose x - lse is exact near the top logits; as x log2 e - lse log2 e, the rounding of lse log2 e added
    as much again (3.2e-5 against 1.5e-5 here, for a budget of 2.4e-5)."""
    logits, targets, _ = make(8, 333, torch.float32, seed=0)
    logits, dloss = logits + 1000.0, torch.ones(8, device=DEVICE)
    lse = torch.logsumexp(logits.double(), dim=-1).float()
    _, dlogits = loss_and_grad(lambda x: cross_entropy_with_lse(x, targets, lse), logits, dloss)
    _, exact = loss_and_grad(lambda x: reference(x, targets), logits.double(), dloss.double())
    half_ulp = (torch.nextafter(lse, torch.tensor(math.inf, device=DEVICE)) - lse).double() / 2
    p_top = torch.softmax(logits.double(), dim=-1).amax(-1)
    budget = (p_top * half_ulp).max().item()                 # the lse's own rounding
    assert (dlogits.double() - exact).abs().max().item() <= budget


def test_with_the_lse_of_replace_tokens(extension_built):
    """The lse the model passes: the _C op's one-pass log-sum-exp of the same logits."""
    logits, targets, dloss = make(9, 301, torch.bfloat16, seed=2)
    ids = torch.randint(0, 301, (3, 5), device=DEVICE)
    positions = torch.randperm(15, device=DEVICE)[:9]
    *_, lse = ops.replace_tokens(logits, ids, positions, seed=3, return_lse=True, backend="fused")
    got = loss_and_grad(lambda x: cross_entropy_with_lse(x, targets, lse), logits, dloss)
    ref = loss_and_grad(lambda x: reference(x, targets), logits, dloss)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].float(), ref[1].float(), atol=4e-3, rtol=1e-2)


def test_row_strided_logits_and_no_rows():
    logits, targets, dloss = make(4, 300, torch.float32)
    wide = torch.cat([logits, logits], dim=1)
    lse = torch.logsumexp(wide[:, 13:313], dim=-1)                 # of a view with row stride 600
    got = loss_and_grad(lambda x: cross_entropy_with_lse(x[:, 13:313], targets, lse), wide, dloss)
    ref = loss_and_grad(lambda x: reference(x[:, 13:313], targets), wide, dloss)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    empty = torch.empty(0, 5, device=DEVICE, requires_grad=True)
    loss = cross_entropy_with_lse(empty, torch.empty(0, dtype=torch.int64, device=DEVICE),
                                  torch.empty(0, device=DEVICE))
    loss.sum().backward()
    assert loss.shape == (0,) and empty.grad.shape == (0, 5)


def test_bad_inputs_name_the_argument():
    logits, targets, _ = make(4, 10, torch.float32)
    lse = torch.logsumexp(logits, -1)
    with pytest.raises(TypeError, match="logits must be a 2-D"):
        cross_entropy_with_lse(logits[0], targets, lse)
    with pytest.raises(TypeError, match=r"targets must be an int64 tensor of shape \(4,\)"):
        cross_entropy_with_lse(logits, targets.int(), lse)
    with pytest.raises(TypeError, match=r"lse must be a float32 tensor of shape \(4,\)"):
        cross_entropy_with_lse(logits, targets, lse[:3])
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"targets must lie in \[0, vocab_size=10\)"):
            cross_entropy_with_lse(logits, targets + 10, lse)
    with pytest.raises(ValueError, match="empty vocabulary"):
        cross_entropy_with_lse(logits[:, :0], targets, lse)
    with pytest.raises(TypeError, match="targets must be an int64"):
        ops.cross_entropy(logits, targets[:2])
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ops.cross_entropy(logits[0], targets)


def test_ops_cross_entropy_without_the_kernel_is_f_cross_entropy():
    logits, targets, _ = make(6, 50, torch.bfloat16)
    lse = torch.logsumexp(logits.float(), -1)
    ref = F.cross_entropy(logits.float(), targets, reduction="none")
    assert not ops.cross_entropy_takes_lse(logits, "eager")
    assert ops.cross_entropy_takes_lse(logits, "fused") == (DEVICE == "cuda")
    for kw in ({}, {"lse": lse, "backend": "eager"}) + (({"lse": lse, "backend": "fused"},) if DEVICE == "cpu" else ()):
        torch.testing.assert_close(ops.cross_entropy(logits, targets, **kw), ref)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_generator_shape_and_cuda_graph(dtype):
    """ELECTRA-Base's generator: 2458 masked rows x 30522; the fused path through ops in a CUDA graph."""
    logits, targets, dloss = make(2458, 30522, dtype, seed=5)
    lse = torch.logsumexp(logits.float(), dim=-1)
    got = loss_and_grad(lambda x: ops.cross_entropy(x, targets, lse=lse, backend="fused"), logits, dloss)
    same = loss_and_grad(lambda x: reference(x, targets), logits, dloss)
    exact = loss_and_grad(lambda x: reference(x, targets), logits.double(), dloss.double())
    assert_accurate(got, same, exact, dtype)
    x = logits.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.cross_entropy(x, targets, lse=lse, backend="fused").backward(dloss)     # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = ops.cross_entropy(x, targets, lse=lse, backend="fused")
        loss.backward(dloss)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, got[0])
    torch.testing.assert_close(x.grad, got[1])

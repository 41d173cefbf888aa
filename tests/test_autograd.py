"""fastelectra/autograd.py: eager calls of the fused ops take a plain autograd.Function over the same
launchers as their custom ops. Both paths must give the same outputs and gradients, bit for bit (same
kernels, same seeds), and anything that is not a plain tensor or is being traced must take the op."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported below

import pytest  # noqa: E402

from fastelectra.autograd import use_eager  # noqa: E402
from fastelectra.kernels import attention as attn  # noqa: E402
from fastelectra.kernels import layernorm as ln  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def grads_of(fn, inputs, seed=0):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    torch.manual_seed(seed)
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], g)
    return out.detach(), grads


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_layer_norm_eager_function_matches_the_custom_op(monkeypatch, dropout_p):
    x, res = torch.randn(2, 5, 48, device=DEVICE), torch.randn(2, 5, 48, device=DEVICE)
    w, b = 1 + 0.1 * torch.randn(48, device=DEVICE), 0.1 * torch.randn(48, device=DEVICE)

    def run(x, res, w, b):
        return ln.fused_layer_norm(x, w, b, 1e-5, residual=res, dropout_p=dropout_p, seed=7)

    calls = []
    real = ln._layer_norm_eager
    monkeypatch.setattr(ln, "_layer_norm_eager", lambda *a: calls.append(1) or real(*a))
    eager = grads_of(run, (x, res, w, b))
    assert calls, "an eager call on plain tensors must take the Function"
    monkeypatch.setattr(ln, "use_eager", lambda t: False)   # force the custom op
    op = grads_of(run, (x, res, w, b))
    assert torch.equal(eager[0], op[0])
    for a, c in zip(eager[1], op[1]):
        assert torch.equal(a, c)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_eager_function_matches_the_custom_op(monkeypatch, masked):
    q, k, v = (torch.randn(2, 19, 2, 16, device=DEVICE) for _ in range(3))
    mask = torch.arange(19, device=DEVICE)[None, :] < torch.tensor([[19], [11]], device=DEVICE) if masked else None

    def run(q, k, v):
        return attn.flash_attention(q, k, v, mask, dropout_p=0.1, seed=3)

    eager = grads_of(run, (q, k, v))
    monkeypatch.setattr(attn, "use_eager", lambda t: False)
    op = grads_of(run, (q, k, v))
    assert torch.equal(eager[0], op[0])
    for a, c in zip(eager[1], op[1]):
        assert torch.equal(a, c)


def test_only_plain_tensors_outside_tracing_take_the_eager_path():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert use_eager(torch.zeros(2))
    assert use_eager(torch.nn.Parameter(torch.zeros(2)))
    with FakeTensorMode() as mode:
        assert not use_eager(mode.from_tensor(torch.zeros(2)))
    seen = []

    def f(x):
        seen.append(use_eager(x))
        return x + 1

    torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(2))
    assert seen and not any(seen)


class _Fills(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the tensors the dispatcher creates filled with zeros (how autograd materializes a missing
    gradient) while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.new_zeros):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["layer_norm", "attention", "attention_qkvpacked"])
def test_eager_backward_allocates_no_zero_gradient_for_the_statistics(op):
    # mean/rstd (layer norm) and lse (attention) are outputs nobody differentiates: autograd must not
    # allocate and fill a zero gradient for them on every backward
    torch.manual_seed(0)
    if op == "layer_norm":
        leaves = [torch.randn(6, 40, device=DEVICE, requires_grad=True) for _ in range(2)]
        w = torch.ones(40, device=DEVICE, requires_grad=True)
        out = ln.fused_layer_norm(leaves[0], w, None, residual=leaves[1], dropout_p=0.1, seed=1)
    elif op == "attention":
        leaves = [torch.randn(2, 9, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3)]
        out = attn.flash_attention(*leaves, dropout_p=0.1, seed=1)
    else:
        leaves = [torch.randn(2, 9, 3, 2, 16, device=DEVICE, requires_grad=True)]
        out = attn.flash_attention_qkvpacked(leaves[0], dropout_p=0.1, seed=1)
    dy = torch.randn_like(out)
    with _Fills() as fills:
        grads = torch.autograd.grad(out, leaves, dy)
    assert fills.count == 0
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_double_backward_through_a_fused_op_is_an_error_not_a_silent_zero():
    """The backwards run Triton launchers that autograd cannot differentiate: create_graph=True must end
    in a clear error (once_differentiable), not in missing second-order terms."""
    from fastelectra.kernels.cross_entropy import cross_entropy_with_lse
    from fastelectra.kernels.linear import fused_linear

    torch.manual_seed(0)
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    w, b = torch.randn(16, device=DEVICE), torch.randn(16, device=DEVICE)
    q = torch.randn(1, 8, 2, 16, device=DEVICE, requires_grad=True)
    lin_w, lin_b = torch.randn(8, 16, device=DEVICE), torch.randn(8, device=DEVICE)
    logits = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    cases = [
        (lambda: ln.fused_layer_norm(x, w, b, 1e-5), x),
        (lambda: attn.flash_attention(q, q, q), q),
        (lambda: fused_linear(x, lin_w, lin_b, "gelu"), x),
        (lambda: cross_entropy_with_lse(logits, torch.arange(4, device=DEVICE),
                                        torch.logsumexp(logits.detach(), -1)), logits),
    ]
    for fn, leaf in cases:
        (g,) = torch.autograd.grad(fn().square().sum(), leaf, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            g.square().sum().backward()

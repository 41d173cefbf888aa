"""Fused dropout + residual + LayerNorm (kernels/layernorm.py) against torch references.

Without a GPU the Triton kernels run on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1,
which must be set before triton is imported), so shapes stay small. With a GPU the same tests run on
CUDA tensors, and the ``gpu`` tests add real sizes and torch.compile with inductor.

Accuracy rule: the kernel's error against a float64 reference is at most twice the error of the same
torch computation in the input dtype, or a small floor (fp32 summation order differs).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported below

from fastelectra.kernels.layernorm import (MAX_N, _on_device, _sum_partials, dropout_constants, dropout_mask,  # noqa: E402
                                          fused_layer_norm)

DEVICE = "cuda" if HAS_CUDA else "cpu"
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |ref|


def make_inputs(shape, dtype, *, residual=True, weight=True, bias=True, res_dtype=None, param_dtype=None,
                device=DEVICE, seed=0):
    """Fresh random leaves (never zeros); weight around 1 with spread, bias around 0."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def leaf(t, dt):
        return t.to(device=device, dtype=dt).requires_grad_()

    x = leaf(torch.randn(shape, generator=g) * 2 + 0.5, dtype)
    r = leaf(torch.randn(shape, generator=g), res_dtype or dtype) if residual else None
    w = leaf(1 + 0.5 * torch.randn(n, generator=g), param_dtype or dtype) if weight else None
    b = leaf(0.5 * torch.randn(n, generator=g), param_dtype or dtype) if bias else None
    return x, r, w, b


def keep_scale(p):
    """The documented dropout scale, 1 / P(keep): a value is kept iff its uniform 16-bit draw is >=
    round(p · 2^16) (at most 2^16 - 1), so P(keep) = 1 - that / 2^16 (not exactly 1 - p)."""
    return 2**16 / (2**16 - min(round(p * 2**16), 2**16 - 1))


def torch_tail(x, r, w, b, eps, keep, p, dtype=None):
    """dropout(x) with the given keep-mask, + residual, LayerNorm; in ``dtype`` (None: inputs' own)."""
    def cast(t):
        return t if t is None or dtype is None else t.to(dtype)

    xs, rs, ws, bs = (cast(t) for t in (x, r, w, b))
    if keep is not None:
        xs = xs * keep.to(xs.dtype) * keep_scale(p)
    if rs is not None:
        xs = xs + rs.to(xs.dtype)
    out_dtype = xs.dtype
    ws = ws.to(out_dtype) if ws is not None else None
    bs = bs.to(out_dtype) if bs is not None else None
    return F.layer_norm(xs, xs.shape[-1:], ws, bs, eps)


def outputs_and_grads(fn, leaves, dy):
    """Run fn on detached copies of the leaves; return [y, grad of each leaf] (None where leaf is None)."""
    copies = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    y = fn(*copies)
    y.backward(dy.to(y.dtype))
    return [y] + [None if t is None else t.grad for t in copies]


def assert_kernel_accurate(got, torch_same, exact, dtype, what):
    for name, g, t, e in zip(("y", "dx", "dresidual", "dweight", "dbias"), got, torch_same, exact):
        if e is None:
            assert g is None, f"{what}: {name} should be None"
            continue
        assert g.shape == e.shape, f"{what}: {name} shape {tuple(g.shape)} != {tuple(e.shape)}"
        scale = e.abs().max().item() or 1.0
        err = (g.double() - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        bound = max(2 * err_torch, FLOOR[dtype] * scale)
        assert err <= bound, f"{what}: {name} error {err:.3g} > bound {bound:.3g} (torch {err_torch:.3g})"


def check_against_reference(shape, dtype, *, p=0.0, seed=1234, eps=1e-5, **kw):
    x, r, w, b = make_inputs(shape, dtype, **kw)
    keep = dropout_mask(seed, shape, p, device=x.device) if p > 0 else None
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(x.device)
    leaves = (x, r, w, b)
    got = outputs_and_grads(
        lambda x, r, w, b: fused_layer_norm(x, w, b, eps, residual=r, dropout_p=p, seed=seed), leaves, dy)
    same = outputs_and_grads(lambda x, r, w, b: torch_tail(x, r, w, b, eps, keep, p), leaves, dy)
    exact = outputs_and_grads(lambda x, r, w, b: torch_tail(x, r, w, b, eps, keep, p, torch.float64), leaves, dy)
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    for leaf, grad in zip(leaves, got[1:]):
        if leaf is not None:
            assert grad.dtype == leaf.dtype, f"gradient dtype {grad.dtype} != input dtype {leaf.dtype}"
    assert_kernel_accurate(got, same, exact, dtype, f"shape={shape} {dtype} p={p} {kw}")


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("shape", [(5, 200), (6, 1000), (40, 16), (1, 768), (2, 3, 200)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_residual_layer_norm_matches_reference(shape, dtype):
    check_against_reference(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 1000), (40, 200), (2, 3, 16)], ids=lambda s: "x".join(map(str, s)))
def test_dropout_residual_layer_norm_matches_reference_with_kernel_mask(shape, dtype):
    check_against_reference(shape, dtype, p=0.1)


def test_dropout_keeps_the_expectation_exact_at_any_p():
    """Kept values are scaled by 1 / P(keep) of the 16-bit draw, not 1 / (1 - p): at p = 0.9999 the two
    differ by 7% (16-bit thresholds), and at p = 0.9 by 6e-5, which fp32 sees."""
    for p in (0.1, 0.5, 0.9, 0.9999, 0.99999, 1 - 2**-17):
        threshold, scale = dropout_constants(p)
        assert abs(threshold - p * 2**16) <= 0.5 and threshold < 2**16
        assert (1 - threshold / 2**16) * scale == 1.0 and scale == keep_scale(p)
    # the kernel's output is that of 1 / P(keep): ten times closer to it than 1 / (1 - p) is
    p, seed = 0.9, 21
    x, r, w, b = (t.detach() for t in make_inputs((6, 200), torch.float32))
    keep = dropout_mask(seed, (6, 200), p, device=x.device)
    got = fused_layer_norm(x, w, b, 1e-5, residual=r, dropout_p=p, seed=seed).double()
    want = torch_tail(x, r, w, b, 1e-5, keep, p, torch.float64)
    one_minus_p = F.layer_norm(x.double() * keep / (1 - p) + r.double(), (200,), w.double(), b.double(), 1e-5)
    assert (got - want).abs().max() * 10 < (one_minus_p - want).abs().max()


@pytest.mark.parametrize("residual,weight,bias", [(False, True, True), (True, False, False), (True, True, False),
                                                  (False, False, False)])
def test_optional_residual_weight_bias(residual, weight, bias):
    check_against_reference((6, 200), torch.float32, residual=residual, weight=weight, bias=bias)
    check_against_reference((6, 200), torch.float32, p=0.25, residual=residual, weight=weight, bias=bias)


def test_mixed_dtypes_keep_each_gradient_in_its_input_dtype():
    # bf16 activations on an fp32 residual stream with fp32 parameters (autocast-style)
    check_against_reference((5, 200), torch.bfloat16, res_dtype=torch.float32, param_dtype=torch.float32)
    check_against_reference((5, 200), torch.bfloat16, p=0.1, res_dtype=torch.float32, param_dtype=torch.float32)


def test_non_contiguous_input_and_residual():
    xt = torch.randn(200, 6, device=DEVICE).t()     # (6, 200) views with column stride 6
    rt = torch.randn(200, 6, device=DEVICE).t()
    w = torch.randn(200, device=DEVICE)
    assert not xt.is_contiguous() and not rt.is_contiguous()
    y = fused_layer_norm(xt, w, None, 1e-5, residual=rt)
    torch.testing.assert_close(y, F.layer_norm(xt + rt, (200,), w, None, 1e-5), atol=1e-5, rtol=1e-5)


def test_strided_and_expanded_weight_and_bias():
    """The kernels index weight and bias with stride 1: views with other strides are made contiguous
    first, and their gradients reach the original parameters."""
    x = torch.randn(3, 8, device=DEVICE)
    w_base = torch.randn(16, device=DEVICE, requires_grad=True)
    b_base = torch.randn(8, 2, device=DEVICE, requires_grad=True)
    for w, b in [(w_base[::2], b_base[:, 0]), (w_base[:1].expand(8), b_base[:1, 1].expand(8))]:
        assert w.stride() != (1,) and b.stride() != (1,)
        y = fused_layer_norm(x, w, b, 1e-5)
        ref = F.layer_norm(x, (8,), w, b, 1e-5)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        gw, gb = torch.autograd.grad(y.square().sum(), (w_base, b_base))
        rw, rb = torch.autograd.grad(ref.square().sum(), (w_base, b_base))
        torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gb, rb, atol=1e-4, rtol=1e-4)


def test_empty_rows():
    x, r, w, b = make_inputs((0, 200), torch.float32)
    y = fused_layer_norm(x, w, b, 1e-5, residual=r, dropout_p=0.1, seed=3)
    assert y.shape == (0, 200)
    y.sum().backward()
    assert x.grad.shape == (0, 200) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_without_autograd_skips_the_stats_and_gives_the_same_output(monkeypatch, p, dtype):
    """Under no_grad / inference_mode, or with no input requiring grad, no backward can follow: the forward
    runs the kernel variant that stores no mean/rstd, outside the autograd Function, with the same y."""
    import fastelectra.kernels.layernorm as L

    x, r, w, b = make_inputs((7, 200), dtype)
    with_grad = fused_layer_norm(x, w, b, 1e-5, residual=r, dropout_p=p, seed=5)
    assert with_grad.grad_fn is not None
    launches = []
    fwd = L._fwd
    monkeypatch.setattr(L, "_fwd", lambda *a, **k: launches.append(k.get("stats", True)) or fwd(*a, **k))
    with torch.no_grad():
        a = fused_layer_norm(x, w, b, 1e-5, residual=r, dropout_p=p, seed=5)
    with torch.inference_mode():
        c = fused_layer_norm(x, w, b, 1e-5, residual=r, dropout_p=p, seed=5)
    d = fused_layer_norm(*(t.detach() for t in (x, w, b)), 1e-5, residual=r.detach(), dropout_p=p, seed=5)
    assert launches == [False, False, False]
    for y in (a, c, d):
        assert y.grad_fn is None and torch.equal(y, with_grad.detach())


@pytest.mark.parametrize("chunks,n", [(1, 5), (700, 37), (1056, 768)], ids=str)
def test_sum_partials_finishes_one_or_two_column_sums(chunks, n):
    """Stage 2 of the dW/dB (and bias-gradient) reductions: several loop steps over partial rows, a
    ragged last column block, two sums in one launch, each written in its own output's dtype."""
    g = torch.Generator().manual_seed(chunks)
    part = torch.randn(2, chunks, n, generator=g).to(DEVICE)
    dw = torch.empty(n, device=DEVICE)
    db = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    with _on_device(part):
        _sum_partials(part, dw, db)
    exact = part.double().sum(1)
    torch.testing.assert_close(dw.double(), exact[0], atol=1e-5 * math.sqrt(chunks), rtol=1e-5)
    torch.testing.assert_close(db, exact[1].to(torch.bfloat16), atol=1e-5 * math.sqrt(chunks), rtol=8e-3)
    one = torch.empty(n, device=DEVICE)
    with _on_device(part):
        _sum_partials(part[1:], one)
    torch.testing.assert_close(one.double(), exact[1], atol=1e-5 * math.sqrt(chunks), rtol=1e-5)


def test_every_sweep_constant_keeps_the_kernels_accurate(monkeypatch):
    """bench_layernorm --sweep times the kernels under each of these values: each must still give the
    reference's outputs and gradients, and the backward's program plan must follow BWD_MIN_STEPS (several
    programs, each writing one partial row of dW and dB, so the partial rows really change)."""
    from benchmarks.bench_layernorm import SWEEP
    from benchmarks.common import one_at_a_time
    from fastelectra.kernels import layernorm

    seen = []
    launch = layernorm.launch
    monkeypatch.setattr(layernorm, "launch", lambda kernel, grid, *a, **kw: (
        seen.append(grid[0]) if kernel is layernorm._layer_norm_bwd_kernel else None,
        launch(kernel, grid, *a, **kw))[1])
    programs = {}
    for name, value, _ in one_at_a_time(layernorm, SWEEP):
        seen.clear()
        check_against_reference((300, 40), torch.float32, p=0.1)       # 19 backward steps of 16 rows
        assert len(seen) == 1, (name, value, seen)
        programs[name, value] = seen[0]
    if not HAS_CUDA:   # the interpreter's one SM: 32 // 4 warps = 8 programs (7 after rounding), then 19 / min steps
        assert [programs["BWD_MIN_STEPS", s] for s in SWEEP["BWD_MIN_STEPS"]] == [7, 5, 3, 2]


# ----------------------------------------------------------------------------- dropout
def test_same_seed_same_output_different_seed_different_output():
    x, r, w, b = make_inputs((6, 200), torch.float32)
    with torch.no_grad():
        a = fused_layer_norm(x, w, b, residual=r, dropout_p=0.2, seed=11)
        a2 = fused_layer_norm(x, w, b, residual=r, dropout_p=0.2, seed=11)
        c = fused_layer_norm(x, w, b, residual=r, dropout_p=0.2, seed=12)
    assert torch.equal(a, a2)
    assert not torch.equal(a, c)
    assert not torch.equal(dropout_mask(11, (6, 200), 0.2, device=DEVICE),
                           dropout_mask(12, (6, 200), 0.2, device=DEVICE))


@pytest.mark.parametrize("as_tensor", [
    lambda s: torch.tensor(s),                                        # 0-d int64 on the CPU
    lambda s: torch.tensor([s], dtype=torch.int32, device=DEVICE),    # (1,) int32 on x's device
], ids=["cpu-0d", "device-int32"])
def test_seed_tensor_gives_the_same_mask_output_and_gradients_as_the_int(as_tensor):
    x, r, w, b = make_inputs((6, 200), torch.float32)
    dy = torch.randn(6, 200, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def run(seed):
        return outputs_and_grads(lambda x, r, w, b: fused_layer_norm(x, w, b, residual=r, dropout_p=0.2, seed=seed),
                                 (x, r, w, b), dy)

    for got, want in zip(run(as_tensor(11)), run(11)):
        assert torch.equal(got, want)
    assert torch.equal(dropout_mask(as_tensor(11), (6, 200), 0.2, device=DEVICE),
                       dropout_mask(11, (6, 200), 0.2, device=DEVICE))


def test_seed_none_is_drawn_from_torch_generator():
    x, r, w, b = make_inputs((4, 200), torch.float32)
    with torch.no_grad():
        torch.manual_seed(5)
        a = fused_layer_norm(x, w, b, residual=r, dropout_p=0.3)
        b2 = fused_layer_norm(x, w, b, residual=r, dropout_p=0.3)
        torch.manual_seed(5)
        a2 = fused_layer_norm(x, w, b, residual=r, dropout_p=0.3)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b2)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_fraction_is_binomial(p):
    shape = (256, 1000)                             # 256k draws
    keep = dropout_mask(2024, shape, p, device=DEVICE)
    n = keep.numel()
    kept = keep.sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sigma, f"kept {kept} of {n}, expected {n * (1 - p):.0f} ± {sigma:.0f}"
    # no column pattern from eight draws per Philox call: each column position mod 8 keeps alike
    per_lane = keep.view(-1, 8).float().mean(0)
    assert (per_lane - (1 - p)).abs().max().item() < 5 * math.sqrt(p * (1 - p) / (n / 8))


@pytest.mark.parametrize("seed,shape,p", [(2**40 + 7, (5, 200), 0.1), (3, (3, 16), 0.5), (2**62 - 1, (2, 1000), 0.9)])
def test_mask_is_philox_on_the_documented_counters(seed, shape, p):
    """The layout kernels/layernorm.py documents, from the numpy Philox4x32-10 (checked against the Random123
    known answers in test_replace.py): (row, col) draws half col % 2 of word (col % 8) // 2 of the call on
    counter (col // 8, row lo, row hi, 0) with key (seed lo, seed hi), and is kept iff the draw >= round(p 2^16)."""
    import numpy as np
    from philox_ref import philox4x32

    m, n = shape
    rows, cols = np.meshgrid(np.arange(m, dtype=np.uint64), np.arange(n, dtype=np.uint64), indexing="ij")
    words = philox4x32((cols >> np.uint64(3), rows & np.uint64(0xFFFFFFFF), rows >> np.uint64(32), 0 * rows),
                       (seed & 0xFFFFFFFF, seed >> 32))
    j = (cols & np.uint64(7)).astype(np.int64)
    draws = (np.choose(j >> 1, words) >> (16 * (j & 1)).astype(np.uint32)) & np.uint32(0xFFFF)
    want = draws >= round(p * 2**16)
    np.testing.assert_array_equal(dropout_mask(seed, shape, p, device=DEVICE).cpu().numpy(), want)


def test_mask_depends_only_on_seed_row_and_column():
    # blocks differ (N=200 -> 256 wide, N=1000 -> 1024 wide; several rows per program for small N)
    small = dropout_mask(99, (8, 200), 0.3, device=DEVICE)
    large = dropout_mask(99, (40, 1000), 0.3, device=DEVICE)
    assert torch.equal(small, large[:8, :200])
    assert torch.equal(dropout_mask(99, (2, 4, 200), 0.3, device=DEVICE).view(8, 200), small)


def test_zero_dropout_mask_keeps_everything():
    assert dropout_mask(1, (3, 200), 0.0, device=DEVICE).all()


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make,exc,match", [
    (lambda: (torch.ones(2, 8, dtype=torch.int64), None, None, {}), TypeError, "x must be"),
    (lambda: (torch.randn(2, MAX_N + 1), None, None, {}), ValueError, "up to 8192"),
    (lambda: (torch.randn(2, 0), None, None, {}), ValueError, "non-empty last dimension"),
    (lambda: (torch.randn(()), None, None, {}), ValueError, "non-empty last dimension"),
    (lambda: (torch.randn(2, 8), torch.randn(7), None, {}), ValueError, "weight must have shape"),
    (lambda: (torch.randn(2, 8), None, torch.randn(8, 1), {}), ValueError, "bias must have shape"),
    (lambda: (torch.randn(2, 8), None, None, {"residual": torch.randn(3, 8)}), ValueError, "residual must have"),
    (lambda: (torch.randn(2, 8), None, None, {"residual": torch.ones(2, 8, dtype=torch.int32)}), TypeError,
     "residual must be"),
    (lambda: (torch.randn(2, 8), None, None, {"dropout_p": 1.0}), ValueError, "dropout_p"),
    (lambda: (torch.randn(2, 8), None, None, {"dropout_p": -0.1}), ValueError, "dropout_p"),
    (lambda: (torch.randn(2, 8), None, None, {"dropout_p": 0.1, "seed": 1.5}), TypeError, "seed"),
    (lambda: (torch.randn(2, 8), None, None, {"dropout_p": 0.1, "seed": torch.tensor([1, 2])}), TypeError, "seed"),
    (lambda: (torch.randn(2, 8), None, None, {"dropout_p": 0.1, "seed": torch.tensor([1.0])}), TypeError, "seed"),
    (lambda: (torch.randn(2, 8), None, None, {"dropout_p": 0.1, "seed": 2**64}), ValueError, "64 bits"),
    (lambda: (torch.randn(2, 8), None, None, {"dropout_p": 0.1, "seed": torch.tensor([1], device="meta")}),
     ValueError, "seed is on meta"),
    (lambda: (torch.randn(2, 8), torch.randn(8, device="meta"), None, {}), ValueError, "weight is on"),
    (lambda: (torch.randn(2, 8), None, None, {"eps": float("nan")}), ValueError, "eps must be"),
    (lambda: (torch.randn(2, 8), None, None, {"eps": -1e-5}), ValueError, "eps must be"),
], ids=["int-x", "too-wide", "empty-row", "scalar", "weight-shape", "bias-shape", "residual-shape",
        "residual-dtype", "p-one", "p-negative", "seed-float", "seed-two-elements", "seed-float-tensor",
        "seed-too-big", "seed-device", "device-mismatch", "eps-nan", "eps-negative"])
def test_bad_inputs_raise_clear_errors(make, exc, match):
    x, w, b, kw = make()
    kw = {"eps": 1e-5, **kw}
    with pytest.raises(exc, match=match):
        fused_layer_norm(x, w, b, **kw)


def test_dropout_mask_bad_arguments():
    with pytest.raises(ValueError, match="p must be"):
        dropout_mask(0, (2, 8), 1.0)
    with pytest.raises(ValueError, match="hidden size"):
        dropout_mask(0, (2, MAX_N + 1), 0.1)


# ----------------------------------------------------------------------------- custom ops / compile
@pytest.mark.parametrize("p", [0.1, 0.0])
def test_custom_ops_pass_opcheck(p):
    x, r, w, b = make_inputs((4, 200), torch.float32)
    seed = torch.tensor([3], dtype=torch.int64, device=DEVICE) if p > 0 else None  # the seed lives on x's device
    fwd = torch.ops.fastelectra.layer_norm_fwd.default
    torch.library.opcheck(fwd, (x, r, w, b, 1e-5, p, seed),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        _, mean, rstd = fwd(x, r, w, b, 1e-5, p, seed)
    dy = torch.randn_like(x)
    bwd = torch.ops.fastelectra.layer_norm_bwd.default
    torch.library.opcheck(bwd, (dy, x.detach(), r.detach(), w.detach(), b.detach(), mean, rstd, p, seed),
                          test_utils=("test_schema", "test_faketensor"))


def test_custom_op_rejects_a_seed_the_kernels_cannot_read():
    x = torch.randn(2, 16, device=DEVICE)
    fwd = torch.ops.fastelectra.layer_norm_fwd.default
    for seed in (None, torch.tensor([3], dtype=torch.int32, device=DEVICE), torch.tensor([3, 4], device=DEVICE)):
        with pytest.raises(ValueError, match="seed must be an int64 tensor of one element"):
            fwd(x, None, None, None, 1e-5, 0.1, seed)


@pytest.mark.parametrize("seed", [17, "tensor", None])
def test_torch_compile_fullgraph_traces_forward_and_backward(seed):
    # The custom ops are opaque to dynamo (their fake implementations give shapes), so this traces
    # the same graph on CPU under the interpreter as on a GPU; aot_eager also traces the backward.
    # The seed (drawn in the graph when None) reaches the kernels as a tensor: no .item() to break on.
    torch._dynamo.reset()
    if seed == "tensor":
        seed = torch.tensor([17], device=DEVICE)

    def tail(x, r, w, b):
        return fused_layer_norm(x, w, b, 1e-5, residual=r, dropout_p=0.1, seed=seed) * 2

    compiled = torch.compile(tail, fullgraph=True, backend="aot_eager")
    x, r, w, b = make_inputs((2, 3, 200), torch.float32)
    dy = torch.randn(2, 3, 200, device=DEVICE)
    torch.manual_seed(0)
    got = outputs_and_grads(compiled, (x, r, w, b), dy)
    again = outputs_and_grads(compiled, (x, r, w, b), dy)
    torch.manual_seed(0)
    want = outputs_and_grads(tail, (x, r, w, b), dy)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[0], again[0]) == (seed is not None)  # a fresh mask per call when seed is None


# ----------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [256, 768, 1000, 1024, 4096, 8192])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_real_sizes(n, p, dtype):
    rows = 65536 if n <= 1024 else 8192
    check_against_reference((rows, n), dtype, p=p, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()

    def block_tail(h, r, w, b):
        return fused_layer_norm(h, w, b, 1e-12, residual=r, dropout_p=0.1, seed=5)

    x, r, w, b = make_inputs((32, 128, 768), torch.bfloat16, device="cuda")
    dy = torch.randn(32, 128, 768, device="cuda")
    got = outputs_and_grads(torch.compile(block_tail, fullgraph=True), (x, r, w, b), dy)
    want = outputs_and_grads(block_tail, (x, r, w, b), dy)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_ops_layer_norm_dispatches_to_kernel():
    from fastelectra import ops

    x, r, w, b = make_inputs((4, 128, 768), torch.bfloat16, device="cuda")
    with torch.no_grad():
        got = ops.layer_norm(x, w, b, 1e-12, residual=r, dropout_p=0.1, seed=9, backend="fused")
        want = fused_layer_norm(x, w, b, 1e-12, residual=r, dropout_p=0.1, seed=9)
        from_tensor = ops.layer_norm(x, w, b, 1e-12, residual=r, dropout_p=0.1, backend="fused",
                                     seed=torch.tensor([9], device="cuda"))
    assert torch.equal(got, want) and torch.equal(from_tensor, want)


def test_host_cdiv_and_next_power_of_2_agree_with_triton():
    """The launchers' own host-side helpers (triton's are constexpr_functions: slow to call from Python)."""
    import triton

    from fastelectra.kernels.layernorm import _cdiv, _next_power_of_2

    for a in [0, 1, 2, 3, 15, 16, 17, 767, 768, 769, 65536, 2**31 + 5]:
        assert _next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in [1, 2, 3, 16, 64, 1000]:
            assert _cdiv(a, b) == triton.cdiv(a, b), (a, b)

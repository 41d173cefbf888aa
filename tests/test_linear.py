"""Linear with a Triton bias-gradient reduction (kernels/linear.py) against torch references.

Without a GPU the Triton kernels run on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1),
so shapes stay small; the ``gpu`` tests add the shapes of an ELECTRA-Base step and CUDA graphs.
Accuracy rule: the error against a float64 reference is at most twice that of the same torch
computation in the input dtype, or a small floor.
"""
import os

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported below

from fastelectra import ops  # noqa: E402
from fastelectra.kernels.linear import _matmul_into, _plan, activation_backward, column_sums, fused_linear  # noqa: E402,E501
from fastelectra.nn import FusedLinear  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # relative to max |ref|


def randn(*shape, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) + 0.25).to(device=device, dtype=dtype)


# The Triton interpreter casts fp32 -> bf16 by truncation where the GPU rounds to nearest (checked: 96% of
# an interpreted activation gradient equals the truncated value, 53% the rounded one). Truncation errors
# all point toward zero, so sums over rows of such a stored bf16 tensor (dW, dx after an activation) add
# them up instead of letting them cancel: on the interpreter those get twice the GPU's factor.
INTERPRETER_BF16_FACTOR = 1 if HAS_CUDA else 2


def assert_accurate(got, same, exact, dtype, what, rounded_bf16_stored=False):
    scale = exact.abs().max().item() or 1.0
    err = (got.double() - exact).abs().max().item()
    err_torch = (same.double() - exact).abs().max().item()
    factor = 2 * (INTERPRETER_BF16_FACTOR if rounded_bf16_stored and dtype == torch.bfloat16 else 1)
    bound = max(factor * err_torch, FLOOR[dtype] * scale)
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (torch {err_torch:.3g})"


# ----------------------------------------------------------------------------- column sums
@pytest.mark.parametrize("shape", [(1, 1), (77, 200), (300, 1000), (5000, 48), (3, 5)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_column_sums_match_reference(shape, dtype):
    x = randn(*shape, dtype=dtype)
    got = column_sums(x)
    assert got.dtype == dtype and got.shape == (shape[1],)
    assert_accurate(got, x.sum(0), x.double().sum(0), dtype, f"{shape} {dtype}")
    # summed in fp32 whatever the input: an fp32 result carries no rounding of its own beyond fp32
    torch.testing.assert_close(column_sums(x, torch.float32), x.float().sum(0), rtol=1e-5, atol=1e-4)


def test_column_sums_split_rows_into_chunks():
    # the partial-sum stage must really combine several row chunks and several column blocks,
    # with a last chunk that ends inside a BLOCK_M step
    from fastelectra.kernels import linear

    m, n = 5000, 300
    block_m, block_n, chunks, rows_per_chunk = _plan(m, n, torch.device(DEVICE), *linear._stage_one(0, 4))
    assert chunks > 1 and n > block_n and m % rows_per_chunk and rows_per_chunk % block_m == 0
    x = randn(m, n, seed=3)
    torch.testing.assert_close(column_sums(x), x.double().sum(0).float(), rtol=1e-5, atol=1e-3)


def test_plan_bounds_programs_and_partial_rows(monkeypatch):
    """programs_per_sm caps the programs, min_steps the partial rows stage 2 sums, except that a sum keeps
    at least one program per SM."""
    from fastelectra.kernels import linear

    device = torch.device(DEVICE)
    monkeypatch.setattr(linear, "_sm_count", lambda device: 132)              # an H100
    block_m = _plan(16384, 256, device, 4096, 1, 1)[0]
    steps = 32 * 132
    m = steps * block_m                                                       # one column block of 256
    assert _plan(m, 256, device, 4096, 10**4, 1)[2] == steps                  # one step each
    assert _plan(m, 256, device, 4096, 4, 1)[2] == 4 * 132
    assert _plan(m, 256, device, 4096, 10**4, 16)[2] == steps // 16
    assert _plan(m, 256, device, 4096, 10**4, 64)[2] == 132                   # the floor: one per SM
    assert _plan(m, 1024, device, 4096, 10**4, 256)[2] == 132 // 4            # ... counted in programs
    # the shipped constants, at 16384 rows of ELECTRA's widths on 132 SMs: the partial rows of launches
    # that bench_linear --sweep timed on an H100 (linear_sweep_*_20261124: each faster than the 1024..86
    # of the earlier (8, 1) plan)
    for dtype_size, n, chunks in ((2, 256, 128), (2, 768, 128), (2, 1024, 128), (2, 2304, 57), (2, 3072, 43),
                                  (4, 256, 256), (4, 768, 171), (4, 1024, 128), (4, 2304, 59), (4, 3072, 44)):
        assert _plan(16384, n, device, *linear._stage_one(0, dtype_size))[2] == chunks, (dtype_size, n)


def test_stage_one_reads_its_constants_at_each_call(monkeypatch):
    """bench_linear --sweep sets them between calls; the activation backward has its own."""
    from fastelectra.kernels import linear

    monkeypatch.setattr(linear, "MIN_STEPS", 3)
    monkeypatch.setattr(linear, "ACT_PROGRAMS_PER_SM", 5)
    assert linear._stage_one(0, 2) == (linear.TILE_BYTES // 2, linear.PROGRAMS_PER_SM, 3)
    assert linear._stage_one(1, 4) == (linear.ACT_TILE_BYTES // 4, 5, linear.ACT_MIN_STEPS)


def _launched_block_m(monkeypatch, fn, *args):
    """BLOCK_M of each stage-1 launch of fn(*args)."""
    from fastelectra.kernels import linear

    seen = []
    launch = linear.launch
    monkeypatch.setattr(linear, "launch", lambda kernel, *a, **kw: (
        seen.append(kw["BLOCK_M"]) if kernel is linear._column_partial_sums_kernel else None,
        launch(kernel, *a, **kw))[1])
    fn(*args)
    monkeypatch.setattr(linear, "launch", launch)
    return seen


def test_stage_one_steps_are_counted_in_bytes(monkeypatch):
    """A loop step reads TILE_BYTES of x (ACT_TILE_BYTES of dy with an activation) whatever its dtype, so
    fp32 steps take half the rows of 16-bit ones (the same loads in flight, half the registers), and the
    constants are read at each call."""
    from fastelectra.kernels import linear

    n = 256
    x16, x32 = randn(64, n, dtype=torch.bfloat16), randn(64, n)
    rows16 = _launched_block_m(monkeypatch, column_sums, x16)
    assert rows16 == [linear.TILE_BYTES // 2 // n]
    assert _launched_block_m(monkeypatch, column_sums, x32) == [rows16[0] // 2]
    act16 = _launched_block_m(monkeypatch, activation_backward, x16, x16, "relu", torch.float32)
    assert act16 == [linear.ACT_TILE_BYTES // 2 // n]
    assert _launched_block_m(monkeypatch, activation_backward, x32, x32, "relu", torch.float32) == [act16[0] // 2]
    monkeypatch.setattr(linear, "TILE_BYTES", 2 * linear.TILE_BYTES)
    assert _launched_block_m(monkeypatch, column_sums, x16) == [2 * rows16[0]]


def test_column_sums_exact_under_every_sweep_constant():
    """Every launch shape bench_linear --sweep times gives the same sums (several chunks, a ragged
    last chunk, several column blocks), and the GELU backward the same dh and sums."""
    from benchmarks.bench_linear import ACT_SWEEP, SWEEP
    from benchmarks.common import one_at_a_time
    from fastelectra.kernels import layernorm, linear

    x = randn(700, 300, seed=5)
    exact = x.double().sum(0).float()
    for module, constants in ((linear, SWEEP["linear"]), (layernorm, SWEEP["layernorm"])):
        shipped = {name: getattr(module, name) for name in constants}
        for name, value, _ in one_at_a_time(module, constants):
            torch.testing.assert_close(column_sums(x), exact, rtol=1e-5, atol=1e-3, msg=f"{name}={value}")
        assert all(getattr(module, name) == value for name, value in shipped.items())
    h = randn(700, 300, seed=6)
    dh = activation_backward(x, h, "gelu")[0]
    for name, value, _ in one_at_a_time(linear, ACT_SWEEP):
        got, db = activation_backward(x, h, "gelu", torch.float32)
        assert torch.equal(got, dh), f"{name}={value}"
        torch.testing.assert_close(db, dh.double().sum(0).float(), rtol=1e-5, atol=1e-3, msg=f"{name}={value}")


def test_column_sums_take_row_strides_and_transposed_views():
    wide = randn(40, 300, seed=1)
    view = wide[:, 7:207]                                     # row stride 300, unit column stride
    assert not view.is_contiguous()
    torch.testing.assert_close(column_sums(view), view.sum(0), rtol=1e-5, atol=1e-4)
    t = randn(200, 40, seed=2).t()                           # column stride 40: made contiguous
    torch.testing.assert_close(column_sums(t), t.sum(0), rtol=1e-5, atol=1e-4)


def test_column_sums_of_no_rows_are_zero_and_bad_input_is_refused():
    assert torch.equal(column_sums(torch.empty(0, 7, device=DEVICE)), torch.zeros(7, device=DEVICE))
    assert column_sums(torch.empty(4, 0, device=DEVICE)).shape == (0,)
    with pytest.raises(ValueError, match="2-D"):
        column_sums(torch.ones(5, device=DEVICE))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        column_sums(torch.ones(2, 3, dtype=torch.int64, device=DEVICE))


# ----------------------------------------------------------------------------- linear
def linear_outputs_and_grads(fn, x, w, b, dy, needs=(True, True, True)):
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((x, w, b), needs)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y] + [t.grad for t in leaves]


def reference_linear(activation):
    return lambda x, w, b: F.linear(x, w, b) if activation is None else ops.ACTIVATIONS[activation](F.linear(x, w, b))


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_new", "relu", "silu"], ids=str)
@pytest.mark.parametrize("shape,n", [((5, 24), 40), ((2, 7, 24), 33), ((1, 1, 16), 1)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_linear_matches_reference(shape, n, dtype, activation):
    k = shape[-1]
    x, w, b = randn(*shape, dtype=dtype, seed=1), randn(n, k, dtype=dtype, seed=2) * 0.2, randn(n, dtype=dtype, seed=3)
    dy = randn(*shape[:-1], n, seed=4)
    got = linear_outputs_and_grads(lambda x, w, b: fused_linear(x, w, b, activation), x, w, b, dy)
    same = linear_outputs_and_grads(reference_linear(activation), x, w, b, dy)
    exact = linear_outputs_and_grads(reference_linear(activation), x.double(), w.double(), b.double(), dy.double())
    for name, g, s, e, leaf in zip(("y", "dx", "dw", "db"), got, same, exact, (None, x, w, b)):
        assert g.shape == e.shape and g.dtype == dtype, f"{name}: {tuple(g.shape)} {g.dtype}"
        assert_accurate(g, s, e, dtype, f"{name} {shape}x{n} {dtype} {activation}",
                        rounded_bf16_stored=activation is not None)


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu"])
@pytest.mark.parametrize("shape", [(1, 1), (77, 200), (300, 48), (5000, 24)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activation_backward_matches_autograd(shape, dtype, activation):
    """dh = dy * act'(h) and db = Σ_rows dh in one pass, against torch's own backward of the activation
    (in the dtype, and in float64 as the truth); h spans the activation's curved part and its tails."""
    h = randn(*shape, dtype=dtype, seed=5) * 3
    dy = randn(*shape, dtype=dtype, seed=6)

    def torch_dh(h, dy):
        h = h.detach().requires_grad_()
        ops.ACTIVATIONS[activation](h).backward(dy)
        return h.grad

    dh, db = activation_backward(dy, h, activation, torch.float32)
    assert dh.dtype == dtype and db.dtype == torch.float32 and db.shape == (shape[1],)
    exact = torch_dh(h.double(), dy.double())
    assert_accurate(dh, torch_dh(h, dy), exact, dtype, f"dh {activation} {dtype}")
    assert_accurate(db, torch_dh(h, dy).float().sum(0), exact.sum(0), dtype, f"db {activation} {dtype}")
    dh_only, none = activation_backward(dy, h, activation)
    assert none is None and torch.equal(dh_only, dh)


def test_activation_backward_edges_and_bad_input():
    h = torch.tensor([[0.0, -1.0, 2.0]], device=DEVICE)
    dh, db = activation_backward(torch.ones_like(h), h, "relu", torch.float32)
    assert dh.tolist() == [[0.0, 0.0, 1.0]]                       # torch's ReLU gradient at 0 is 0
    empty, db0 = activation_backward(torch.empty(0, 5, device=DEVICE), torch.empty(0, 5, device=DEVICE), "gelu",
                                     torch.float32)
    assert empty.shape == (0, 5) and torch.equal(db0, torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="activation must be one of"):
        activation_backward(h, h, "tanh")
    with pytest.raises(ValueError, match="one shape"):
        activation_backward(h, h[:, :2], "gelu")
    with pytest.raises(ValueError, match="activation must be None or one of"):
        fused_linear(randn(3, 8), randn(5, 8), randn(5), "swish")


def test_fused_linear_computes_only_the_gradients_asked_for():
    x, w, b, dy = randn(6, 24, seed=1), randn(10, 24, seed=2), randn(10, seed=3), randn(6, 10, seed=4)
    for needs in [(False, True, True), (True, False, False), (False, False, True)]:
        got = linear_outputs_and_grads(fused_linear, x, w, b, dy, needs)
        ref = linear_outputs_and_grads(F.linear, x, w, b, dy, needs)
        for g, r, need in zip(got[1:], ref[1:], needs):
            assert (g is None) == (not need)
            if need:
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_fused_linear_under_autocast_casts_like_f_linear():
    # fp32 parameters and input, bf16 autocast: bf16 output, fp32 gradients, as F.linear under autocast
    x, w, b, dy = randn(2, 9, 24, seed=1), randn(40, 24, seed=2) * 0.2, randn(40, seed=3), randn(2, 9, 40, seed=4)

    def under_autocast(fn):
        def run(x, w, b):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return fn(x, w, b)
        return run

    got = linear_outputs_and_grads(under_autocast(fused_linear), x, w, b, dy)
    ref = linear_outputs_and_grads(under_autocast(F.linear), x, w, b, dy)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    for name, g, r in zip(("y", "dx", "dw", "db"), got, ref):
        assert g.dtype == r.dtype, f"{name}: {g.dtype} != {r.dtype}"
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2, msg=name)


def test_fused_linear_under_autocast_returns_gradients_without_casts():
    """fp32 x, weight and bias go into the Function itself (cast inside), so autograd runs no cast node
    for them: their gradients arrive in fp32 from the backward, not as bf16 cast back by a
    ToCopyBackward (one extra launch per parameter per step)."""
    x, w, b = randn(9, 24, seed=1).requires_grad_(), randn(40, 24, seed=2).requires_grad_(), randn(40, seed=3)
    b.requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = fused_linear(x, w, b)
    node = y.grad_fn
    while "LinearFn" not in node.name():                                   # past the output view
        node = node.next_functions[0][0]
    inputs = [fn.name() if fn is not None else None for fn, _ in node.next_functions[:3]]
    assert inputs[1:] == ["torch::autograd::AccumulateGrad"] * 2, inputs   # W and b: no cast between
    x_node = node.next_functions[0][0]                                      # x: at most its reshape view
    assert "ToCopy" not in x_node.name() and all("ToCopy" not in fn.name() for fn, _ in x_node.next_functions if fn)


# ----------------------------------------------------------------------------- cast_once
def _autocast_step(x, w, b, dy, activation=None):
    """Forward + backward of fused_linear under bf16 autocast on leaves w and b themselves (their grads
    reset first) and a fresh leaf x: (y, dx, dw, db)."""
    x = x.detach().clone().requires_grad_()
    w.grad = b.grad = None
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = fused_linear(x, w, b, activation)
    y.backward(dy.to(y.dtype))
    return y, x.grad, w.grad, b.grad


def test_cast_once_gives_the_same_step_from_one_copy_per_parameter(monkeypatch):
    """Inside replayed work, cast_once makes every parameter's bf16 copy with one _foreach_copy_ and the
    layer reads that copy (its output follows the copy), bit for bit the step of casting per call."""
    from fastelectra import backend
    from fastelectra.kernels import linear

    x, w, b, dy = randn(9, 24, seed=1), randn(40, 24, seed=2) * 0.2, randn(40, seed=3), randn(9, 40, seed=4)
    w.requires_grad_()
    b.requires_grad_()
    plain = _autocast_step(x, w, b, dy, "gelu")
    seen = []
    cast_of = backend.cast_of
    monkeypatch.setattr(linear, "cast_of", lambda t, dtype: (seen.append(cast_of(t, dtype)), seen[-1])[1])
    copies = []
    foreach_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: (copies.append(len(dst)), foreach_copy(dst, src)))
    with backend.replayed_work(), backend.cast_once([w, b, w], torch.bfloat16):
        once = _autocast_step(x, w, b, dy, "gelu")
        copy = backend.cast_of(w, torch.bfloat16)
        assert copies == [2] and torch.equal(copy, w.to(torch.bfloat16))   # w listed twice, copied once
        assert seen[-2] is copy and seen[-1] is backend.cast_of(b, torch.bfloat16)   # the step took them
        for g, r in zip(once, plain):
            assert torch.equal(g, r)
        with torch.no_grad():
            copy.zero_()                                      # the layer reads the copy, not a cast of w
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            assert torch.equal(fused_linear(x, w, b), b.to(torch.bfloat16).expand(9, 40))
    assert not torch.equal(backend.cast_of(w, torch.bfloat16), copy)        # outside: a cast of w again


def test_cast_once_casts_afresh_a_parameter_changed_inside_and_acts_only_in_replayed_work(monkeypatch):
    from fastelectra import backend

    x, w, b = randn(9, 24, seed=1), randn(40, 24, seed=2) * 0.2, randn(40, seed=3)
    calls = []
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: calls.append(dst))
    with backend.cast_once([w, b], torch.bfloat16):                # not replayed work: nothing to do
        assert calls == [] and backend.cast_of(w, torch.bfloat16) is not backend.cast_of(w, torch.bfloat16)
    monkeypatch.undo()
    with backend.replayed_work(), backend.cast_once([w, b], torch.bfloat16):
        with torch.no_grad():
            w.mul_(2.0)                                            # an in-place update: version + 1
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = fused_linear(x, w, b)
        assert torch.equal(backend.cast_of(w, torch.bfloat16), w.to(torch.bfloat16))
        assert backend.cast_of(w, torch.float16).dtype == torch.float16      # another dtype: a cast
        assert backend.cast_of(w, torch.float32) is w
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        assert torch.equal(y, F.linear(x, w, b))
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        with backend.cast_once([w], torch.int32):
            pass


def test_cast_once_refresh_before_the_backward_is_autograd_error():
    """The next step's copy overwrites this step's in place: a backward still owed fails loudly."""
    from fastelectra import backend

    x, w, b = randn(9, 24, seed=1), randn(40, 24, seed=2).requires_grad_(), randn(40, seed=3).requires_grad_()
    with backend.replayed_work():
        with backend.cast_once([w, b], torch.bfloat16), torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = fused_linear(x, w, b)
        with backend.cast_once([w, b], torch.bfloat16):
            pass
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.float().sum().backward()


def test_linear_parameters_are_the_fused_linear_layers_once_each():
    from fastelectra.config import ElectraConfig
    from fastelectra.graphs import linear_parameters
    from fastelectra.model import ElectraPretrainingModel

    model = ElectraPretrainingModel(ElectraConfig.preset("tiny", backend="fused"))
    params = linear_parameters(model)
    fused = [m for m in model.modules() if isinstance(m, FusedLinear)]
    expected = {id(p) for m in fused for p in (m.weight, m.bias) if p is not None}
    assert len(params) == len(expected) == len({id(p) for p in params}) and {id(p) for p in params} == expected
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any(k in names[id(p)] for p in params for k in ("query", "key", "value", "LayerNorm"))
    assert linear_parameters(ElectraPretrainingModel(ElectraConfig.preset("tiny", backend="eager"))) == []


# outside autocast x, W and b share one dtype (fp32 here); under bf16 autocast x is fp32 (the residual is
# added after the GEMM: dtypes differ) or bf16 (added by the GEMM)
@pytest.mark.parametrize("x_dtype,autocast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)],
                         ids=["fp32", "fp32-autocast", "bf16-autocast"])
def test_returned_input_carries_the_residual_gradient_into_dx(x_dtype, autocast):
    """return_input gives x back as a view; the gradient through it (a residual connection's) is added to
    dx by the dx GEMM (or after it when dtypes differ): dx equals autograd's sum of both paths."""
    x0 = randn(2, 5, 24, seed=1).to(x_dtype)
    w, b, dy, dr = randn(40, 24, seed=2) * 0.2, randn(40, seed=3), randn(2, 5, 40, seed=4), randn(2, 5, 24, seed=5)

    def run(fused):
        x, ww, bb = (t.detach().clone().requires_grad_() for t in (x0, w, b))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            if fused:
                y, res = fused_linear(x, ww, bb, "gelu", return_input=True)
                assert res.shape == x.shape and res.dtype == x.dtype and res.data_ptr() == x.data_ptr()
            else:
                y, res = reference_linear("gelu")(x, ww, bb), x
            out = (y.float() * dy).sum() + (res.float() * dr).sum()
        out.backward()
        return x.grad, ww.grad, bb.grad

    for name, g, r in zip(("dx", "dw", "db"), run(True), run(False)):
        assert g.dtype == r.dtype, name
        tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.float(), r.float(), **tol, msg=name)
    # only the returned input used, or only y: both still give x its gradient
    x = x0.detach().clone().requires_grad_()
    y, res = fused_linear(x, w.to(x_dtype), b.to(x_dtype), return_input=True)
    (res.float() * dr).sum().backward()
    torch.testing.assert_close(x.grad.float(), dr.to(x_dtype).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matmul_into_writes_the_requested_dtype(dtype):
    a, b = randn(30, 7, dtype=dtype, seed=1), randn(7, 12, dtype=dtype, seed=2)
    for out in (dtype, torch.float32):
        got = _matmul_into(a.t().contiguous().t(), b, out)
        assert got.dtype == out and got.shape == (30, 12)
        assert_accurate(got, a @ b, a.double() @ b.double(), dtype, f"{dtype}->{out}")


def test_fused_linear_bad_input_names_the_argument():
    x, w, b = randn(3, 8), randn(5, 8), randn(5)
    with pytest.raises(ValueError, match="agree in K"):
        fused_linear(x, randn(5, 7), b)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        fused_linear(x, w, randn(4))
    with pytest.raises(TypeError, match="share one dtype"):
        fused_linear(x.half(), w, b)
    with pytest.raises(TypeError, match="weight must be a float32"):
        fused_linear(x, w.long(), b)


# ----------------------------------------------------------------------------- dispatch and module
def test_ops_linear_dispatch_and_module_are_drop_ins():
    torch.manual_seed(0)
    ref = torch.nn.Linear(24, 40)
    mod = FusedLinear(24, 40, backend="fused")
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == ["weight", "bias"] and "backend=fused" in repr(mod)
    x = randn(3, 24, device="cpu")                   # the modules' device, on a GPU machine too
    torch.testing.assert_close(mod(x), ref(x))
    # CPU tensors, no bias, and float64 take F.linear itself
    torch.testing.assert_close(ops.linear(x, ref.weight, None, backend="fused"), F.linear(x, ref.weight))
    with pytest.raises(ValueError, match="agree in K"):
        ops.linear(x, randn(5, 7, device="cpu"))
    with pytest.raises(TypeError, match="weight must be a float tensor"):
        ops.linear(x, torch.ones(5, 24, dtype=torch.int64))
    # with an activation: the same state dict, act(F.linear) as the reference
    act = FusedLinear(24, 40, activation="gelu_new", backend="fused")
    act.load_state_dict(ref.state_dict())
    assert list(act.state_dict()) == ["weight", "bias"] and "activation=gelu_new" in repr(act)
    torch.testing.assert_close(act(x), F.gelu(ref(x), approximate="tanh"))
    with pytest.raises(ValueError, match="activation must be None or one of"):
        FusedLinear(24, 40, activation="tanh")
    with pytest.raises(ValueError, match="activation must be None or one of"):
        ops.linear(x, ref.weight, ref.bias, activation="tanh")


def test_ops_linear_takes_the_fused_path_only_in_replayed_work(monkeypatch):
    """Eager calls pay the fused path's host time on every step: they take F.linear. Inside replayed_work
    (a CUDA graph's warm-up and capture: host time paid once) the kernel path runs, on the same values."""
    from fastelectra import backend
    from fastelectra.kernels import linear as kernels_linear

    monkeypatch.setattr(backend, "use_triton", lambda device, requested, op: backend.resolve(requested) != "eager")
    calls = []
    monkeypatch.setattr(kernels_linear, "fused_linear", lambda *a: calls.append(a) or fused_linear(*a))
    x, w, b = randn(5, 24).requires_grad_(), randn(40, 24, seed=1), randn(40, seed=2)
    eager = ops.linear(x, w, b, activation="gelu", backend="fused")
    assert calls == [] and not backend.in_replayed_work()
    with backend.replayed_work():
        with backend.replayed_work():            # nests
            assert backend.in_replayed_work()
        fused = ops.linear(x, w, b, activation="gelu", backend="fused")
        assert ops.linear(x, w, b, backend="eager") is not None and len(calls) == 1   # eager stays eager
    assert len(calls) == 1 and not backend.in_replayed_work()
    torch.testing.assert_close(fused, eager)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("n", [64, 192, 256, 768, 1024, 2304, 3072, 30522])
def test_gpu_column_sums_at_electra_shapes(n):
    dy = torch.randn(16384 if n < 30522 else 2560, n, device="cuda", dtype=torch.bfloat16)
    got = column_sums(dy)
    assert_accurate(got, dy.sum(0), dy.double().sum(0), torch.bfloat16, f"16384x{n}")
    # the fp32 accumulators themselves (no bf16 rounding of the result): a lost or doubled row, which
    # moves a sum by ~1, cannot hide under the bf16 result's floor
    torch.testing.assert_close(column_sums(dy, torch.float32).double(), dy.double().sum(0), rtol=0, atol=2e-3)


@pytest.mark.gpu
def test_gpu_fused_linear_under_autocast_and_in_a_cuda_graph(monkeypatch):
    from fastelectra.graphs import replayed_work
    from fastelectra.kernels import linear as kernels_linear

    torch.manual_seed(0)
    lin = FusedLinear(768, 3072, backend="fused").cuda()
    ref = torch.nn.Linear(768, 3072).cuda()
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(8, 512, 768, device="cuda")
    dy = torch.randn(8, 512, 3072, device="cuda", dtype=torch.bfloat16)

    def step(m):
        m.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = m(x)
        y.backward(dy)
        return y

    y_ref = step(ref)
    g_ref = [p.grad.clone() for p in ref.parameters()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    calls = []
    monkeypatch.setattr(kernels_linear, "column_sums", lambda *a: calls.append(1) or column_sums(*a))
    with replayed_work():  # warm-up and capture: the fused path, its kernels loaded before the capture
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(lin)      # warm-up: kernels compiled, gradients allocated
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = step(lin)
    assert len(calls) == 3
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, y_ref)
    for p, g in zip(lin.parameters(), g_ref):
        torch.testing.assert_close(p.grad, g, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_cast_once_in_a_cuda_graph_copies_the_weights_of_each_replay():
    """A captured forward + backward inside cast_once: each replay takes bf16 copies of the weights as
    they are then (updated in place between replays, as an optimizer does), equal to F.linear's."""
    from fastelectra.graphs import capture, cast_once, linear_parameters

    torch.manual_seed(0)
    lin = FusedLinear(768, 3072, activation="gelu", backend="fused").cuda()
    ref = torch.nn.Linear(768, 3072).cuda()
    x = torch.randn(4, 256, 768, device="cuda")
    dy = torch.randn(4, 256, 3072, device="cuda", dtype=torch.bfloat16)
    params = linear_parameters(lin)
    assert [id(p) for p in params] == [id(lin.weight), id(lin.bias)]

    def step():
        with cast_once(params, torch.bfloat16), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = lin(x)
        y.backward(dy)
        return y

    replay, y = capture(step, torch.device("cuda"), before_capture=lambda: lin.zero_grad(set_to_none=True))
    for scale in (1.0, -0.5):
        with torch.no_grad():
            lin.weight.mul_(scale)                       # in place, outside the graph, between replays
            lin.bias.add_(scale)
        replay()
        ref.load_state_dict({"weight": lin.weight.detach(), "bias": lin.bias.detach()})
        with torch.autocast("cuda", dtype=torch.bfloat16):
            expected = F.gelu(ref(x))
        torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)   # stale weights would be off by O(1)


@pytest.mark.gpu
def test_gpu_weight_gradient_is_one_fp32_gemm_under_autocast():
    """On CUDA, dW under bf16 autocast comes from one GEMM writing fp32 (aten mm.dtype), no cast after
    it, and is at least as accurate as autocast's bf16-rounded gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.randn(4096, 768, device="cuda")
    w = (torch.randn(3072, 768, device="cuda") * 0.02).requires_grad_()
    b = torch.zeros(3072, device="cuda", requires_grad=True)
    dy = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)

    class Ops(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fused_linear(x, w, b)
    with Ops() as mode:
        y.backward(dy)
    assert "aten.mm.dtype" in mode.seen and not any("_to_copy" in op for op in mode.seen), mode.seen
    assert w.grad.dtype == b.grad.dtype == torch.float32
    x16 = x.to(torch.bfloat16)
    exact = dy.double().t() @ x16.double()
    autocast_dw = (dy.t() @ x16).float()
    assert (w.grad.double() - exact).abs().max() <= (autocast_dw.double() - exact).abs().max()


@pytest.mark.gpu
def test_gpu_feed_forward_with_residual_alias_matches_torch():
    """ELECTRA-Base's FFN up-projection on CUDA under bf16 autocast: GELU fused into the bias sum, fp32
    parameter gradients from mm.dtype and the residual's gradient added by addmm, against nn.Linear +
    F.gelu + autograd's addition (to bf16 tolerance: torch rounds its gradients to bf16 on the way)."""
    torch.manual_seed(0)
    lin = FusedLinear(768, 3072, activation="gelu", backend="fused").cuda()
    ref = torch.nn.Linear(768, 3072).cuda()
    ref.load_state_dict(lin.state_dict())
    h0 = torch.randn(8, 512, 768, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(8, 512, 3072, device="cuda", dtype=torch.bfloat16)
    dres = torch.randn(8, 512, 768, device="cuda", dtype=torch.bfloat16)
    grads = []
    for fused in (True, False):
        h = h0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, res = lin(h, return_input=True) if fused else (F.gelu(ref(h)), h)
        torch.autograd.backward([y, res], [dy, dres])
        m = lin if fused else ref
        grads.append([h.grad, m.weight.grad, m.bias.grad])
    for name, g, r in zip(("dx", "dw", "db"), *grads):
        assert g.dtype == r.dtype, name
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2 * r.abs().max().item(), msg=name)


def test_column_sums_of_rows_far_apart(monkeypatch):
    """Rows 2^24 elements apart: BLOCK_M * stride >= 2^31, so the kernel takes 64-bit offsets within a step
    (with 32-bit ones, a chunk spanning 2^31 elements would wrap). Two real rows keep it at 64 MB."""
    from fastelectra.kernels import linear

    stride, n = 2**24, 5
    base = randn(stride + n, seed=7)
    x = base.as_strided((2, n), (stride, 1))
    seen = []
    launch = linear.launch
    monkeypatch.setattr(linear, "launch", lambda *a, **kw: (seen.append(kw.get("WIDE")), launch(*a, **kw)))
    torch.testing.assert_close(column_sums(x), x.double().sum(0).float(), rtol=1e-5, atol=1e-5)
    assert seen[0] is True

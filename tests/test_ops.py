"""The torch references in fastelectra.ops against independent torch computations, the backend
switch, and argument validation of the public ops."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastelectra import backend, ops


def test_layer_norm_reference_matches_the_unfused_expression():
    torch.manual_seed(0)
    x, r = torch.randn(3, 7, 200, dtype=torch.float64), torch.randn(3, 7, 200, dtype=torch.float64)
    w, b = torch.randn(200, dtype=torch.float64), torch.randn(200, dtype=torch.float64)
    y = ops.layer_norm(x, w, b, 1e-5, residual=r, backend="eager")
    s = x + r
    mu, var = s.mean(-1, keepdim=True), s.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(y, (s - mu) / torch.sqrt(var + 1e-5) * w + b)


def test_layer_norm_reference_dropout_scales_kept_values():
    torch.manual_seed(0)
    x = torch.randn(64, 256) + 3.0
    torch.manual_seed(7)
    y = ops.layer_norm(x, None, None, 1e-5, dropout_p=0.25, backend="eager")
    torch.manual_seed(7)
    keep = F.dropout(torch.ones_like(x), 0.25) != 0
    torch.testing.assert_close(y, F.layer_norm(x * keep / 0.75, (256,), eps=1e-5))


def sdpa_reference(q, k, v, mask):
    """Independent reference: torch's SDPA (math) with an additive mask, on (B, H, T, D)."""
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask.bool(), float("-inf"))[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2)


@pytest.mark.parametrize("b,t,h,d", [(1, 1, 1, 16), (2, 77, 3, 32), (3, 17, 2, 64)])
def test_attention_reference_matches_sdpa(b, t, h, d):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(b, t, dtype=torch.bool)
    if b > 1:
        mask[-1, t // 2:] = False
    out = ops.attention(q, k, v, mask, backend="eager")
    torch.testing.assert_close(out, sdpa_reference(q, k, v, mask))
    int_mask = ops.attention(q, k, v, mask.long(), backend="eager")
    torch.testing.assert_close(int_mask, out)


def test_attention_dropout_zeroes_and_rescales_probabilities():
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    v = torch.eye(9)[None, :, None, :].expand(2, 9, 2, 9).contiguous()   # value = one-hot key index
    v = F.pad(v, (0, 7))                                                  # headdim 16
    out = ops.attention(q, k, v, dropout_p=0.5, backend="eager")          # = dropped probabilities
    probs = out[..., :9]
    nonzero = probs[probs != 0]
    assert ((probs == 0).float().mean() - 0.5).abs() < 0.15
    full = ops.attention(q, k, v, backend="eager")[..., :9]
    torch.testing.assert_close(nonzero, (full * 2)[probs != 0])


def test_replace_reference_samples_follow_softmax():
    torch.manual_seed(0)
    v, n = 6, 20000
    row = torch.randn(v)
    logits = row.expand(n, v).contiguous()
    ids = torch.zeros(1, n, dtype=torch.long)
    pos = torch.arange(n)
    for tau in (1.0, 0.5):
        _, _, sampled = ops.replace_tokens(logits, ids, pos, temperature=tau, seed=11, backend="eager")
        counts = torch.bincount(sampled, minlength=v).double()
        expected = torch.softmax(row.double() / tau, 0) * n
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 20.5, chi2   # chi-square, 5 degrees of freedom, p = 0.001


def test_replace_reference_lse_and_determinism():
    torch.manual_seed(0)
    logits, ids, pos = torch.randn(5, 33), torch.randint(0, 33, (2, 8)), torch.tensor([1, 3, 8, 9, 15])
    a = ops.replace_tokens(logits, ids, pos, seed=4, return_lse=True, backend="eager")
    b = ops.replace_tokens(logits, ids, pos, seed=4, return_lse=True, backend="eager")
    c = ops.replace_tokens(logits.repeat(20, 1), ids.repeat(1, 10), torch.arange(100), seed=4, offset=1,
                           backend="eager")
    d = ops.replace_tokens(logits.repeat(20, 1), ids.repeat(1, 10), torch.arange(100), seed=4, offset=0,
                           backend="eager")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(c[2], d[2])
    torch.testing.assert_close(a[3], torch.logsumexp(logits, -1))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.replace_tokens(torch.randn(3, 10).long(), torch.zeros(1, 4, dtype=torch.long),
                                torch.arange(3)), TypeError, "logits must be a float tensor"),
    (lambda: ops.replace_tokens(torch.randn(3, 10), torch.zeros(1, 4, dtype=torch.int32),
                                torch.arange(3)), TypeError, "input_ids must be an int64"),
    (lambda: ops.replace_tokens(torch.randn(3, 10), torch.zeros(1, 4, dtype=torch.long),
                                torch.arange(2)), ValueError, "masked_positions has 2 entries but logits has 3"),
    (lambda: ops.replace_tokens(torch.randn(3, 10), torch.zeros(1, 4, dtype=torch.long),
                                torch.tensor([0, 1, 4])), ValueError, r"masked_positions must lie in \[0, 4\)"),
    (lambda: ops.replace_tokens(torch.randn(3, 10), torch.full((1, 4), 10),
                                torch.arange(3)), ValueError, r"input_ids must lie in \[0, vocab_size=10\)"),
    (lambda: ops.replace_tokens(torch.randn(3, 10), torch.zeros(1, 4, dtype=torch.long), torch.arange(3),
                                temperature=-1.0), ValueError, "temperature"),
    (lambda: ops.attention(torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8),
                           torch.ones(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (lambda: ops.attention(torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8),
                           torch.ones(2, 5)), TypeError, "key_padding_mask must be bool or integer"),
    (lambda: ops.attention(torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)),
     ValueError, "q must be 4-D"),
    (lambda: ops.attention(torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8).half(), torch.randn(2, 5, 2, 8)),
     TypeError, "share one dtype"),
    (lambda: ops.attention(torch.randn(2, 0, 2, 8), torch.randn(2, 0, 2, 8), torch.randn(2, 0, 2, 8)),
     ValueError, "empty"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.ones(7), None), ValueError, r"weight must have shape \(8,\)"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, residual=torch.randn(4, 9)), ValueError, "residual"),
    (lambda: ops.layer_norm(torch.randn(4, 8).long(), None, None), TypeError, "x must be a float tensor"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.ones(8).long(), None), TypeError, "weight must be a float"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, [0.0] * 8), TypeError, "bias must be a torch.Tensor"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, float("nan")), ValueError, "eps must be a finite"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, -1.0), ValueError, "eps must be a finite"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, dropout_p=0.1, seed="abc"), TypeError, "seed must be"),
    (lambda: ops.attention(*[torch.randn(2, 5, 2, 8)] * 3, softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda: ops.attention(*[torch.randn(2, 5, 2, 8)] * 3, softmax_scale=0.0), ValueError, "softmax_scale"),
    (lambda: ops.attention(*[torch.randn(2, 5, 2, 0)] * 3), ValueError, "headdim >= 1"),
    (lambda: ops.attention(*[torch.randn(2, 5, 2, 8)] * 3, seed=1.5), TypeError, "seed must be"),
    (lambda: ops.attention_varlen(*[torch.randn(5, 2, 8)] * 3, torch.tensor([0, 5], dtype=torch.int32), 5,
                                  softmax_scale=-1.0), ValueError, "softmax_scale"),
    (lambda: ops.linear(torch.randn(6, 4), torch.randn(5, 4), torch.randn(3)), ValueError, r"bias must have shape \(5,\)"),
    (lambda: ops.linear(torch.randn(6, 4).double(), torch.randn(5, 4), None), TypeError, "share one dtype"),
    (lambda: ops.replace_tokens(torch.randn(3, 10), torch.zeros(1, 4, dtype=torch.long), torch.arange(3),
                                seed=1, offset=1.5), TypeError, "offset must be an int"),
    (lambda: ops.replace_tokens(torch.randn(3, 10), torch.zeros(1, 4, dtype=torch.long), torch.arange(3),
                                seed=1, offset=-1), ValueError, "offset must be an int"),
    (lambda: ops.replace_tokens(torch.randn(3, 10), torch.zeros(1, 4, dtype=torch.long),
                                torch.tensor([0, 2, 0])), ValueError, "masked_positions must be distinct"),
    (lambda: ops.cross_entropy(torch.randn(3, 10), torch.tensor([1, -100, 2])), ValueError,
     r"targets must lie in \[0, vocab_size=10\)"),
    (lambda: ops.cross_entropy(torch.randn(3, 10), torch.tensor([1, 10, 2])), ValueError, "targets must lie"),
    (lambda: ops.cross_entropy(torch.randn(3, 10), torch.tensor([1, 0, 2]), lse=torch.zeros(2)), TypeError,
     r"lse must be a float32 tensor of shape \(3,\)"),
    (lambda: ops.cross_entropy(torch.randn(3, 0), torch.tensor([1, 0, 2])), ValueError, "empty vocabulary"),
    # a misspelled backend fails wherever it is given, also where no kernel would run
    (lambda: ops.linear(torch.randn(6, 4), torch.randn(5, 4), backend="fuzed"), ValueError, "backend='fuzed'"),
    (lambda: ops.cross_entropy(torch.randn(3, 10), torch.tensor([1, 0, 2]), backend="fuzed"), ValueError,
     "backend='fuzed'"),
    (lambda: ops.layer_norm(torch.randn(4, 8).double(), None, None, backend="fuzed"), ValueError, "backend='fuzed'"),
    (lambda: ops.attention(*[torch.randn(2, 5, 2, 8).double()] * 3, backend="fuzed"), ValueError, "backend='fuzed'"),
    (lambda: ops.replace_tokens(torch.randn(3, 10).double(), torch.zeros(1, 4, dtype=torch.long), torch.arange(3),
                                backend="fuzed"), ValueError, "backend='fuzed'"),
    # numbers of the wrong type are named, not compared ("'<=' not supported")
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, "a"), TypeError, "eps must be a number"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, None), TypeError, "eps must be a number"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, dropout_p="0.1"), TypeError, "dropout_p must be a number"),
    (lambda: ops.replace_tokens(torch.randn(3, 10), torch.zeros(1, 4, dtype=torch.long), torch.arange(3),
                                temperature="1"), TypeError, "temperature must be a number"),
    (lambda: ops.attention(*[torch.randn(2, 5, 2, 8)] * 3, dropout_p=torch.tensor(0.1)), TypeError,
     "dropout_p must be a number"),
    (lambda: ops.attention(*[torch.randn(2, 5, 2, 8)] * 3, [[True] * 5] * 2), TypeError,
     "key_padding_mask must be a"),
    # one rule for both paths: the seed is checked even where dropout is off or the reference runs
    (lambda: ops.attention(*[torch.randn(2, 5, 2, 8)] * 3, seed="abc"), TypeError, "seed must be"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, seed="abc"), TypeError, "seed must be"),
    (lambda: ops.attention(*[torch.randn(2, 5, 0, 8)] * 3), ValueError, "nheads >= 1"),
    (lambda: ops.layer_norm(torch.randn(4, 8), torch.ones(8, dtype=torch.float64), None), TypeError,
     "weight is float64 but x is torch.float32"),
    (lambda: ops.layer_norm(torch.randn(4, 8), None, None, residual=torch.randn(4, 8).double()), TypeError,
     "residual is float64"),
    (lambda: ops.attention_qkvpacked(torch.randn(2, 5, 3, 2, 8), max_seqlen=5), ValueError,
     "max_seqlen goes with cu_seqlens"),
    (lambda: ops.replace_tokens(torch.randn(10, 3).t(), torch.zeros(1, 4, dtype=torch.long), torch.arange(3),
                                backend="eager"), ValueError, "logits must be contiguous"),
    (lambda: ops.replace_tokens(torch.randn(1, 10), torch.zeros(0, 4, dtype=torch.long), torch.tensor([0]),
                                backend="eager"), ValueError, r"masked_positions must lie in \[0, 0\)"),
    (lambda: ops.cross_entropy(torch.randn(3, 7), torch.tensor([0, 3, 6]), lse=torch.zeros(3)), ValueError,
     "lse must be the row log-sum-exp"),
    (lambda: ops.cross_entropy(torch.randn(3, 7), torch.tensor([0, 3, 6]), lse=torch.full((3,), float("nan"))),
     ValueError, "lse must be the row log-sum-exp"),
])
def test_bad_arguments_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_backend_resolution_and_environment_override(monkeypatch):
    assert backend.resolve(None) == "auto"
    assert backend.resolve("eager") == "eager"
    monkeypatch.setenv("FASTELECTRA_BACKEND", "eager")
    assert backend.resolve("fused") == "eager"
    monkeypatch.setenv("FASTELECTRA_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FASTELECTRA_BACKEND='cudnn'"):
        backend.resolve(None)
    monkeypatch.delenv("FASTELECTRA_BACKEND")
    with pytest.raises(ValueError, match="backend='x'"):
        ops.layer_norm(torch.randn(2, 4), None, None, backend="x")


def test_cpu_tensors_take_the_reference_for_attention_and_layer_norm():
    # even when fused is requested: Triton runs on CPU only in its interpreter, used by the kernel tests
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    torch.testing.assert_close(ops.layer_norm(x, None, None, 1e-5, backend="fused"), F.layer_norm(x, (16,), eps=1e-5))
    assert not backend.use_triton(torch.device("cpu"), "fused", "attention")


def test_fused_without_triton_on_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "triton_status", lambda: (False, "triton is not installed"))
    with pytest.raises(RuntimeError, match="backend 'fused' was requested for attention on cuda.*triton is not installed"):
        backend.use_triton(torch.device("cuda"), "fused", "attention")
    with pytest.warns(RuntimeWarning, match="uses the torch reference"):
        assert backend.use_triton(torch.device("cuda"), "auto", "attention_test_once") is False


def test_fused_without_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "extension_status", lambda: (False, "fastelectra._C not built"))
    with pytest.raises(RuntimeError, match="fastelectra._C op cannot run there: fastelectra._C not built"):
        ops.replace_tokens(torch.randn(2, 5), torch.zeros(1, 3, dtype=torch.long), torch.arange(2), backend="fused")
    assert math.isfinite(ops.replace_tokens(torch.randn(2, 5), torch.zeros(1, 3, dtype=torch.long),
                                            torch.arange(2), backend="eager")[2].sum().item())


def test_an_extension_built_without_cuda_is_not_used_for_cuda_tensors(monkeypatch, extension_built):
    """A CUDA torch whose build found no nvcc makes a CPU-only fastelectra._C: CUDA logits must then take the
    reference under auto (with a warning) and be a clear error under fused, not a dispatcher error from
    inside the op; CPU tensors still take the op."""
    from fastelectra import extension

    from torch.utils import cpp_extension

    cuda_build = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    assert extension.kernel_devices() == (("cpu", "cuda") if cuda_build else ("cpu",))
    assert f"kernels for {'CPU, CUDA' if cuda_build else 'CPU'}" in backend.extension_status()[1]
    monkeypatch.setattr(extension, "kernel_devices", lambda: ("cpu",))
    cuda = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="requested for replace_tokens on cuda:0.*built without a CUDA kernel"):
        backend.use_extension(cuda, "fused", "replace_tokens")
    with pytest.warns(RuntimeWarning, match="replace_tokens_test_once on cuda uses the torch reference"):
        assert backend.use_extension(cuda, "auto", "replace_tokens_test_once") is False
    assert backend.use_extension(torch.device("cpu"), "fused", "replace_tokens") is True
    assert backend.use_extension(torch.device("meta"), "fused", "replace_tokens") is True   # fake kernels


def test_reference_paths_take_the_inputs_the_kernels_take():
    """What the fused paths accept, the references compute too (and right): mixed layer-norm parameter
    and residual dtypes (float64 ones only with a float64 x, which the kernels do not take), float64 logits
    for replace_tokens under the default backend, K = 0 in linear."""
    torch.manual_seed(0)
    x, w, b = torch.randn(4, 8), 1 + 0.1 * torch.randn(8), 0.1 * torch.randn(8)
    expect = F.layer_norm(x.double(), (8,), w.double(), b.double(), 1e-5)
    for xd, wd, rd in [(torch.float32, torch.bfloat16, torch.float16), (torch.bfloat16, torch.float32, torch.float32),
                       (torch.float64, torch.float32, torch.float16), (torch.float64, torch.float64, torch.float64)]:
        y = ops.layer_norm(x.to(xd), w.to(wd), b.to(wd), 1e-5, residual=torch.zeros(4, 8, dtype=rd))
        assert y.dtype == xd
        torch.testing.assert_close(y.double(), expect, atol=0.05 if torch.bfloat16 in (xd, wd) else 1e-5, rtol=0)
    ids = torch.randint(0, 10, (2, 3))
    out = ops.replace_tokens(torch.randn(3, 10, dtype=torch.float64), ids, torch.tensor([0, 2, 5]), temperature=0.0)
    assert out[2].dtype == torch.int64 and out[0].shape == (2, 3)
    y = ops.linear(torch.randn(3, 0), torch.randn(5, 0), b[:5])
    torch.testing.assert_close(y, b[:5].expand(3, 5))


def test_attention_without_a_valid_key_gives_zeros_on_every_path():
    """A sequence whose keys are all padding: the reference returns zeros, as the kernel does (and SDPA),
    and gets no gradient from those rows."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out = ops.attention(q, k, v, mask, backend="eager")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1], ops.attention(q[:1], k[:1], v[:1], mask[:1], backend="eager"))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))


def test_backend_status_is_a_constant_under_torch_compile():
    """torch.compile takes the usability checks as constants instead of tracing into them
    (importlib.util.find_spec in triton_status broke the graph at every fused op under torch 2.11 on
    CUDA; torch 2.13 on the CPU traces it, so the CUDA test in test_fused_model is the one that saw it)."""
    torch._dynamo.reset()

    def f(x):
        return x + 1 if backend.triton_status()[0] and backend.extension_status()[0] else x - 1

    expected = 1.0 if backend.triton_status()[0] and backend.extension_status()[0] else -1.0
    assert torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2)).tolist() == [expected] * 2


def test_numpy_scalars_are_numbers():
    """Arguments that are numbers take numpy's too, with the results of Python's."""
    import numpy as np

    x = torch.randn(4, 8)
    torch.testing.assert_close(ops.layer_norm(x, None, None, np.float32(1e-5)), ops.layer_norm(x, None, None, 1e-5))
    q = torch.randn(2, 5, 2, 8)
    torch.testing.assert_close(ops.attention(q, q, q, softmax_scale=np.float32(0.5)),
                               ops.attention(q, q, q, softmax_scale=0.5))
    args = (torch.randn(3, 10), torch.zeros(1, 4, dtype=torch.long), torch.arange(3))
    got = ops.replace_tokens(*args, seed=np.int64(3), offset=np.int64(2), temperature=np.float32(0.5))
    want = ops.replace_tokens(*args, seed=3, offset=2, temperature=0.5)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_reference_sampling_at_a_temperature_whose_inverse_overflows_is_argmax():
    """As the C++ op: τ < 2^-32 is argmax, not the first +inf of x / τ."""
    logits = torch.tensor([[0.5, 3.0, 1.0, -2.0], [-1.0, -3.0, -0.5, -2.0]])
    ids, pos = torch.zeros(1, 2, dtype=torch.long), torch.arange(2)
    for backend_name in ("eager", "fused"):
        for temperature in (1e-39, 3e-39, 1e-20):     # 1/τ overflows fp32; x/τ does; τ < 2^-32
            sampled = ops.replace_tokens(logits, ids, pos, temperature=temperature, seed=0, backend=backend_name)[2]
            assert sampled.tolist() == [1, 2], (backend_name, temperature)


def test_cross_entropy_takes_a_true_lse_on_the_host():
    logits, targets = torch.randn(4, 9), torch.tensor([0, 8, 3, 3])
    loss = ops.cross_entropy(logits, targets, lse=torch.logsumexp(logits, 1))
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, reduction="none"))

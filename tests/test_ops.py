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
    with pytest.raises(RuntimeError, match="fastelectra._C extension is unavailable: fastelectra._C not built"):
        ops.replace_tokens(torch.randn(2, 5), torch.zeros(1, 3, dtype=torch.long), torch.arange(2), backend="fused")
    assert math.isfinite(ops.replace_tokens(torch.randn(2, 5), torch.zeros(1, 3, dtype=torch.long),
                                            torch.arange(2), backend="eager")[2].sum().item())

"""The unpadded encoder (ElectraConfig.unpad): ops.attention_varlen against its reference and the padded
attention, and the model with unpad on vs off on the same weights — eager, on the fused kernels (the
Triton interpreter on CPU), its FLOPs, and bf16 on a GPU."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_pretrain import make_batch
from electra_fixtures import randomise
from fastelectra import ops
from fastelectra.model import ElectraDiscriminator, ElectraPretrainingModel
from fastelectra.nn import FusedSelfAttention
from test_fused_model import DEVICE, config, kernels_on_this_device  # noqa: F401  (a fixture)


def mask_from(lengths, t, holes=()):
    """(B, T) int mask on DEVICE: row b keeps its first lengths[b] tokens, except the (row, position) holes."""
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()
    for row, pos in holes:
        mask[row, pos] = 0
    return mask.to(DEVICE)


def random_ids(mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 97, mask.shape, generator=g).to(DEVICE).masked_fill(mask == 0, 0)


def pair(backend_name, device=DEVICE, **kw):
    """(padded, unpadded) discriminators with the same random weights, in eval mode, on ``device``."""
    torch.manual_seed(0)
    padded = ElectraDiscriminator(config(backend_name, **kw))
    randomise(padded)
    unpadded = ElectraDiscriminator(config(backend_name, unpad=True, **kw))
    unpadded.load_state_dict(padded.state_dict())
    return padded.to(device).eval(), unpadded.to(device).eval()


def assert_same_outputs_and_gradients(padded, unpadded, ids, mask, atol, rtol):
    """Logits at the real positions and every parameter's gradient (of a random weighting of them)."""
    valid = mask.bool()
    a, b = padded(ids, mask), unpadded(ids, mask)
    torch.testing.assert_close(b[valid], a[valid], atol=atol, rtol=rtol)
    w = torch.randn(a.shape, device=DEVICE) * valid
    (a * w).sum().backward()
    (b * w).sum().backward()
    unpadded_params = dict(unpadded.named_parameters())
    for name, p in padded.named_parameters():
        torch.testing.assert_close(unpadded_params[name].grad, p.grad, atol=atol, rtol=rtol, msg=name)


# ----------------------------------------------------------------------------- the model
MASKS = {
    "odd lengths": ([11, 5, 7], 13, ()),
    "batch of one": ([6], 9, ()),
    "full-length row": ([13, 4], 13, ()),
    "hole": ([13, 8], 13, [(0, 3), (0, 4), (1, 0)]),     # general masks: real tokens after a gap
}


@pytest.mark.parametrize("case", MASKS)
def test_unpadded_model_matches_padded_eager(case):
    padded, unpadded = pair("eager")
    mask = mask_from(*MASKS[case])
    ids = random_ids(mask)
    assert_same_outputs_and_gradients(padded, unpadded, ids, mask, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        hidden = unpadded.electra(ids, mask)                                       # (B, T, H)
        assert hidden.shape == (*ids.shape, 32) and not hidden[mask == 0].any()   # padding rows are zero
        assert unpadded.electra(ids, torch.zeros_like(mask)).eq(0).all()            # nothing real: all zero
        assert torch.equal(unpadded.electra(ids), padded.electra(ids))             # no mask: the padded path


def test_unpadded_pretraining_step_gives_the_same_loss():
    """ElectraPretrainingModel is unchanged: same seed, no dropout → same replacements, same loss."""
    kw = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    padded = ElectraPretrainingModel(config("eager", **kw)).to(DEVICE)
    unpadded = ElectraPretrainingModel(config("eager", unpad=True, **kw)).to(DEVICE)
    unpadded.load_state_dict(padded.state_dict())
    ids, mask = make_batch(padded.config, 4, 16, padded=True, device=DEVICE, seed=1)
    torch.manual_seed(1)
    a = padded(ids, mask)
    torch.manual_seed(1)
    b = unpadded(ids, mask)
    assert torch.equal(a.is_replaced, b.is_replaced)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)


def test_unpadded_model_on_the_kernels_matches_padded(kernels_on_this_device):
    padded, unpadded = pair("fused")                                               # eval: dropout off
    mask = mask_from([13, 8, 5], 13, holes=[(1, 2)])
    assert_same_outputs_and_gradients(padded, unpadded, random_ids(mask), mask, atol=2e-5, rtol=1e-4)
    # 2 layers each: the padded model's 2 attentions, the unpadded one's 2 varlen ones, 5 + 5 layer norms,
    # 11 + 11 linears
    assert kernels_on_this_device == {"attention": 2, "attention_varlen": 2, "layer_norm": 10, "linear": 22,
                                      "cross_entropy": 0}


def test_unpadded_forward_flops_scale_with_the_real_tokens():
    """FlopCounterMode, eager discriminator forward, lengths uniform in [T/2, T] (f = R / (B·T) real).
    Every GEMM of the encoder layers runs on the R real rows instead of B·T, exactly; the E→H projection,
    the head stay padded, and the reference attention's scores are padded to the longest sequence (the
    fused varlen kernel skips padding too, but the counter does not see Triton kernels). Bound here: f·padded < unpadded ≤ (f + 0.1·(1 − f))·padded."""
    h, ffn, layers = 256, 1024, 4
    # on the CPU on any machine: the count below is the CPU reference's (on CUDA it pads to max_seqlen)
    padded, unpadded = pair("eager", device="cpu", vocab_size=1000, embedding_size=128, hidden_size=h,
                            num_attention_heads=4, intermediate_size=ffn, num_hidden_layers=layers,
                            max_position_embeddings=64)
    ids, mask = make_batch(padded.config, 8, 64, padded=True, device="cpu")

    def flops(model):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(ids, mask)
        return counter.get_total_flops()

    full, unpad = flops(padded), flops(unpadded)
    b, t = ids.shape
    real, longest = int(mask.sum()), int(mask.sum(1).max())
    f = real / (b * t)
    gemms = (b * t - real) * layers * 2 * (4 * h * h + 2 * h * ffn)                 # QKV, out, FFN in/out
    scores = layers * 4 * b * (t * t - longest * longest) * h   # the CPU reference pads to the longest, not T
    assert full - unpad == gemms + scores
    assert f * full < unpad <= (f + 0.1 * (1 - f)) * full


@pytest.mark.gpu
def test_gpu_unpad_bf16_matches_padded():
    """B=8, T=512, hidden 256, fused, bf16 autocast, lengths uniform in [T/2, T]: against the padded fp32
    model, the unpadded bf16 logits and gradients err at most 2x the padded bf16 ones (+ a small slack)."""
    padded, unpadded = pair("fused", vocab_size=1000, embedding_size=128, hidden_size=256, num_attention_heads=4,
                            intermediate_size=1024, num_hidden_layers=4, max_position_embeddings=512)
    ids, mask = make_batch(padded.config, 8, 512, padded=True, device=DEVICE)
    valid = mask.bool()
    w = torch.randn(ids.shape, device=DEVICE) * valid

    def run(model, bf16):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = model(ids, mask).float()
        return [out.detach()[valid], *torch.autograd.grad((out * w).sum(), list(model.parameters()))]

    gold, base, got = run(padded, False), run(padded, True), run(unpadded, True)
    names = ["logits"] + [n for n, _ in padded.named_parameters()]
    for name, g, b, u in zip(names, gold, base, got):
        err_base, err = (b.float() - g).abs().max().item(), (u.float() - g).abs().max().item()
        assert err <= 2 * err_base + 1e-2 * max(1.0, g.abs().max().item()), (name, err, err_base)


# ----------------------------------------------------------------------------- ops.attention_varlen
def packed(lengths, dtype=torch.float64, nheads=2, headdim=16, seed=0):
    """q, k, v (total, H, D) on DEVICE and cu_seqlens (B + 1,) int32 for sequences of these lengths."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lengths), nheads, headdim, generator=g).to(DEVICE, dtype) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0).to(DEVICE, torch.int32)
    return q, k, v, cu


def output_and_grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), do)]


@pytest.mark.parametrize("lengths", [[7, 1, 12], [5], [4, 0, 9]])
def test_attention_varlen_reference_matches_padded_attention(lengths):
    q, k, v, cu = (t.cpu() for t in packed(lengths))        # the CPU reference (see `huge` below)
    t = max(lengths) + 2                                     # any max_seqlen above the longest
    mask = mask_from(lengths, t).bool().cpu()

    def pad(x):                                              # (total, H, D) → (B, T, H, D)
        out = x.new_zeros(len(lengths), t, *x.shape[1:])
        out[mask] = x
        return out

    do = torch.randn_like(q)
    got = output_and_grads(lambda q, k, v: ops.attention_varlen(q, k, v, cu, t, backend="eager"), q, k, v, do)
    direct = output_and_grads(lambda q, k, v: ops.attention_varlen_reference(q, k, v, cu, t), q, k, v, do)
    ref = output_and_grads(lambda q, k, v: ops.attention_reference(pad(q), pad(k), pad(v), mask)[mask], q, k, v, do)
    # a max_seqlen far above the longest sequence costs nothing: the CPU reference pads to the longest
    huge = output_and_grads(lambda q, k, v: ops.attention_varlen(q, k, v, cu, 10**6, backend="eager"), q, k, v, do)
    for name, a, b, r, h in zip(("out", "dq", "dk", "dv"), got, direct, ref, huge):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, r, msg=name)
        torch.testing.assert_close(h, r, msg=name)


def test_attention_varlen_dispatches_to_the_kernel(kernels_on_this_device):
    lengths = [7, 0, 12]
    q, k, v, cu = packed(lengths, dtype=torch.float32)
    do = torch.randn_like(q)
    got = output_and_grads(lambda q, k, v: ops.attention_varlen(q, k, v, cu, 16, backend="fused"), q, k, v, do)
    ref = output_and_grads(lambda q, k, v: ops.attention_varlen_reference(q, k, v, cu, 16), q, k, v, do)
    assert kernels_on_this_device["attention_varlen"] == 1
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4, msg=name)
    ops.attention_varlen(q.double(), k.double(), v.double(), cu, 16, backend="fused")   # float64: the reference
    assert kernels_on_this_device["attention_varlen"] == 1


def _args(**over):
    """Valid CPU arguments with ``over`` replacing some: argument checks read metadata, and values of
    cu_seqlens only for CPU tensors, so the CPU exercises every check on any machine."""
    q, k, v, cu = (t.cpu() for t in packed([3, 5], dtype=torch.float32))
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=5)
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=torch.randn(2, 4, 2, 16)), ValueError, r"q must be 3-D \(total, nheads, headdim\)"),
    (dict(k=torch.randn(7, 2, 16)), ValueError, "q, k, v must have one shape"),
    (dict(v=torch.randn(8, 2, 16, dtype=torch.float64)), TypeError, "share one dtype"),
    (dict(q=torch.randn(8, 2, 16).long()), TypeError, "q must be a float tensor"),
    (dict(q=torch.randn(0, 2, 16), k=torch.randn(0, 2, 16), v=torch.randn(0, 2, 16),
          cu_seqlens=torch.zeros(2, dtype=torch.int32)), ValueError, "empty input"),
    (dict(cu_seqlens=torch.tensor([0, 3, 8])), TypeError, "cu_seqlens must be an int32 tensor"),
    (dict(cu_seqlens=[0, 3, 8]), TypeError, "cu_seqlens must be an int32 tensor"),
    (dict(cu_seqlens=torch.tensor([[0, 3, 8]], dtype=torch.int32)), ValueError,
     r"cu_seqlens must have shape \(batch \+ 1,\)"),
    (dict(cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens must rise from 0 to total = 8"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError, "cu_seqlens must rise"),
    (dict(max_seqlen=4), ValueError, "max_seqlen = 4"),
    (dict(max_seqlen=0), ValueError, "max_seqlen must be a positive int"),
    (dict(max_seqlen=5.0), TypeError, "max_seqlen must be an int, got float"),
    (dict(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32, device="meta")), ValueError, "cu_seqlens is on meta"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
])
def test_attention_varlen_bad_arguments_name_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        ops.attention_varlen(**_args(**over))


def test_fused_self_attention_unpadded_arguments():
    m = FusedSelfAttention(32, 2).eval()
    x = torch.randn(2, 5, 32)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    torch.testing.assert_close(m(x.flatten(0, 1), cu_seqlens=cu, max_seqlen=5), m(x).flatten(0, 1))
    with pytest.raises(ValueError, match=r"with cu_seqlens, hidden_states must be \(total, hidden\)"):
        m(x, cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match="max_seqlen=None"):
        m(x.flatten(0, 1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="key_padding_mask set"):
        m(x.flatten(0, 1), torch.ones(2, 5, dtype=torch.bool), cu_seqlens=cu, max_seqlen=5)
    with pytest.raises(ValueError, match=r"hidden_states must be \(batch, seqlen, hidden\)"):
        m(x.flatten(0, 1))

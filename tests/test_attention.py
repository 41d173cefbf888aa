"""Tests of the Triton fused attention (kernels/attention.py).

Without a CUDA GPU the kernels run on CPU tensors in the Triton interpreter (TRITON_INTERPRET=1,
set below before triton is imported): tiny shapes, few cases. The `gpu` tests run the real shapes
on the GPU machine. Accuracy rule (DESIGN.md): the kernel's error against an fp64 reference is at
most 2x the error of the torch op in the same dtype, plus a small absolute floor.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastelectra import ops  # noqa: E402
from fastelectra.kernels.attention import (dropout_mask, flash_attention, flash_attention_qkvpacked,  # noqa: E402
                                          flash_attention_varlen)
from fastelectra.kernels.layernorm import fused_layer_norm  # noqa: E402
from philox_ref import philox2x32  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}  # absolute error floor


def keep_scale(p):
    """The documented dropout scale, 1 / P(keep): a value is kept iff its uniform 15-bit draw is >=
    round(p · 2^15) (at most 2^15 - 1), so P(keep) = 1 - that / 2^15 (not exactly 1 - p)."""
    return 2**15 / (2**15 - min(round(p * 2**15), 2**15 - 1))


# ----------------------------------------------------------------------------- references
def reference(q, k, v, mask=None, keep=None, p=0.0, scale=None):
    """softmax(q kᵀ·scale, padded keys -inf) [* keep / P(keep)] @ v in q's dtype; rows with no valid
    key give 0. q: (B, Tq, H, D); mask: (B, Tk) bool; keep: (B, H, Tq, Tk) bool."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) * keep_scale(p)
    return torch.matmul(probs, vh).transpose(1, 2)


def run(fn, q, k, v, do):
    """Output and (dq, dk, dv) of fn(q, k, v) for upstream gradient do."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return [out.detach(), *grads]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(kernel_fn, ref_fn, q, k, v, do):
    """Kernel vs fp64 reference, bounded by 2x the same-dtype torch error + floor, for out and grads."""
    exact = run(ref_fn, q.double(), k.double(), v.double(), do.double())
    same_dtype = run(ref_fn, q, k, v, do)
    got = run(kernel_fn, q, k, v, do)
    for name, g, t, e in zip(("out", "dq", "dk", "dv"), got, same_dtype, exact):
        assert g.dtype == q.dtype and g.shape == e.shape, name
        assert torch.isfinite(g).all(), name
        bound = 2 * max_err(t, e) + FLOOR[q.dtype] * max(1.0, e.abs().max().item())
        assert max_err(g, e) <= bound, f"{name}: kernel error {max_err(g, e):.3g} > {bound:.3g}"


def make_mask(kind, batch, seqlen, device=DEVICE):
    """None, a prefix mask ("prefix"), or holes inside the sequence too ("general")."""
    if kind is None:
        return None
    lengths = torch.tensor([seqlen, max(1, seqlen // 2 + 1), max(1, seqlen - 3)][:batch])
    mask = torch.arange(seqlen)[None, :] < lengths[:, None]
    if kind == "general":
        mask[0, 1::3] = False  # holes inside a sequence, not only a padded tail
    return mask.to(device)


def rand(*shape, dtype=torch.float16, generator=None):
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=dtype)


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("batch, seqlen_q, seqlen_k, nheads, head_dim, dtype, mask_kind", [
    (2, 33, 33, 2, 32, torch.float16, "general"),    # odd length, holes in the mask
    (2, 17, 17, 2, 64, torch.bfloat16, "prefix"),
    (1, 1, 1, 1, 16, torch.float16, None),           # a batch of one, T = 1
    (2, 17, 40, 1, 16, torch.bfloat16, "lengths"),   # Tq != Tk, key lengths, masked q tail
    (1, 40, 40, 2, 64, torch.float32, "general"),    # fp32: the IEEE-dot path
    (3, 21, 70, 2, 16, torch.float16, "prefix"),     # prefix masks: unmasked full tiles, then the masked end
])
def test_matches_reference(batch, seqlen_q, seqlen_k, nheads, head_dim, dtype, mask_kind):
    g = torch.Generator().manual_seed(0)
    q = rand(batch, seqlen_q, nheads, head_dim, dtype=dtype, generator=g)
    k, v = (rand(batch, seqlen_k, nheads, head_dim, dtype=dtype, generator=g) for _ in range(2))
    do = rand(batch, seqlen_q, nheads, head_dim, dtype=dtype, generator=g)
    mask = make_mask("prefix" if mask_kind == "lengths" else mask_kind, batch, seqlen_k)
    if mask_kind == "lengths":
        lengths = mask.sum(1).to(torch.int32)
        kernel = lambda q, k, v: flash_attention(q, k, v, key_lengths=lengths)  # noqa: E731
    else:
        kernel = lambda q, k, v: flash_attention(q, k, v, mask)  # noqa: E731
    assert_close_to_reference(kernel, lambda q, k, v: reference(q, k, v, mask), q, k, v, do)


def test_strided_qkv_views_and_scale():
    """q, k, v as views into one fused projection output (B, T, 3, H, D): strides, no copies."""
    g = torch.Generator().manual_seed(1)
    qkv = rand(2, 24, 3, 2, 32, generator=g)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    do = rand(2, 24, 2, 32, generator=g)
    mask = make_mask("general", 2, 24)
    assert_close_to_reference(lambda q, k, v: flash_attention(q, k, v, mask, softmax_scale=0.3),
                              lambda q, k, v: reference(q, k, v, mask, scale=0.3), q, k, v, do)


# ----------------------------------------------------------------------------- masking
def test_padded_keys_get_zero_probability():
    g = torch.Generator().manual_seed(2)
    q, k, v = (rand(2, 20, 2, 16, generator=g) for _ in range(3))
    do = rand(2, 20, 2, 16, generator=g)
    mask = make_mask("general", 2, 20)
    out, dq, dk, dv = run(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=0.2, seed=7), q, k, v, do)
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = 100.0   # garbage at padded keys must not matter
    v2[~mask] = -50.0
    out2, dq2, _, _ = run(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=0.2, seed=7), q, k2, v2, do)
    assert torch.equal(out, out2) and torch.equal(dq, dq2)
    assert (dk[~mask] == 0).all() and (dv[~mask] == 0).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",      # the interpreter's numpy
                            "ignore:invalid value encountered:RuntimeWarning")  # meets the inf rows
def test_invalid_keys_far_above_the_scores_do_not_leak_into_gradients():
    """dK/dV skip the key mask in their loop and zero invalid keys' rows once: those rows may hold
    inf (an invalid key reads as k = 0, a score far above the valid ones), which must stay there."""
    g = torch.Generator().manual_seed(12)
    q = (8.0 + 0.1 * torch.randn(2, 40, 2, 16, generator=g)).to(DEVICE, torch.float16)
    k = (-8.0 + 0.1 * torch.randn(2, 40, 2, 16, generator=g)).to(DEVICE, torch.float16)  # scores ~ -256
    v, do = (rand(2, 40, 2, 16, generator=g) for _ in range(2))
    mask = make_mask("general", 2, 40)
    for p in (0.0, 0.2):
        keep = dropout_mask(3, 2, 2, 40, 40, p, DEVICE) if p else None
        assert_close_to_reference(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=p, seed=3),
                                  lambda q, k, v: reference(q, k, v, mask, keep, p), q, k, v, do)
        _, _, dk, dv = run(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=p, seed=3), q, k, v, do)
        assert (dk[~mask] == 0).all() and (dv[~mask] == 0).all()


def test_padded_query_rows_do_not_poison_gradients():
    """Query rows that are padding give finite outputs; with zero upstream gradient there, whatever
    they hold does not change dK/dV, and their dQ is zero."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (rand(2, 24, 2, 32, generator=g) for _ in range(3))
    mask = make_mask("prefix", 2, 24)
    do = rand(2, 24, 2, 32, generator=g) * mask[:, :, None, None]
    fn = lambda q, k, v: flash_attention(q, k, v, mask)  # noqa: E731
    out, dq, dk, dv = run(fn, q, k, v, do)
    q2 = q.clone()
    q2[~mask] = rand(int((~mask).sum()), 2, 32, generator=g) * 30.0
    out2, dq2, dk2, dv2 = run(fn, q2, k, v, do)
    for t in (out, dq, dk, dv, out2, dq2, dk2, dv2):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(dk2, dk, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(dv2, dv, atol=2e-3, rtol=1e-2)
    assert (dq2[~mask] == 0).all()


def test_sequence_without_valid_keys_gives_zeros():
    g = torch.Generator().manual_seed(4)
    q, k, v = (rand(2, 17, 2, 16, generator=g) for _ in range(3))
    do = rand(2, 17, 2, 16, generator=g)
    mask = torch.ones(2, 17, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out, dq, dk, dv = run(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=0.1, seed=1), q, k, v, do)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    keep = dropout_mask(1, 2, 2, 17, 17, 0.1, DEVICE)
    ref = reference(q[:1].double(), k[:1].double(), v[:1].double(), mask[:1], keep[:1], 0.1)
    assert max_err(out[:1], ref) < 2e-3
    # the torch reference that eager and CPU calls run follows the same rule
    eager, fused = ops.attention(q, k, v, mask, backend="eager"), flash_attention(q, k, v, mask)
    assert (eager[1] == 0).all() and (fused[1] == 0).all()
    assert max_err(eager[:1], fused[:1]) < 2e-3


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype, p", [(torch.float16, 0.1), (torch.bfloat16, 0.5)])
def test_dropout_matches_reference_with_kernel_mask(dtype, p):
    g = torch.Generator().manual_seed(5)
    q, k, v = (rand(2, 33, 2, 32, dtype=dtype, generator=g) for _ in range(3))
    do = rand(2, 33, 2, 32, dtype=dtype, generator=g)
    mask = make_mask("general", 2, 33)
    keep = dropout_mask(1234, 2, 2, 33, 33, p, DEVICE)
    assert_close_to_reference(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=p, seed=1234),
                              lambda q, k, v: reference(q, k, v, mask, keep, p), q, k, v, do)


def test_dropout_at_high_p_scales_by_the_keep_probability_of_its_draws():
    """fp32 at p = 0.9: 1 / P(keep) of the 15-bit draws differs from 1 / (1 - p) by 6e-5 (relative)."""
    g = torch.Generator().manual_seed(6)
    q, k, v, do = (rand(1, 17, 1, 16, dtype=torch.float32, generator=g) for _ in range(4))
    keep = dropout_mask(77, 1, 1, 17, 17, 0.9, DEVICE)
    assert_close_to_reference(lambda q, k, v: flash_attention(q, k, v, dropout_p=0.9, seed=77),
                              lambda q, k, v: reference(q, k, v, None, keep, 0.9), q, k, v, do)
    # ten times closer to the output of 1 / P(keep) than that of 1 / (1 - p) is
    got = flash_attention(q, k, v, dropout_p=0.9, seed=77).double()
    want = reference(q.double(), k.double(), v.double(), None, keep, 0.9)
    one_minus_p = want / keep_scale(0.9) / (1 - 0.9)
    assert (got - want).abs().max() * 10 < (one_minus_p - want).abs().max()


def test_dropout_mask_statistics():
    batch, nheads, seqlen = 2, 2, 40
    n = batch * nheads * seqlen * seqlen
    for p in (0.1, 0.5):
        keep = dropout_mask(99, batch, nheads, seqlen, seqlen, p, DEVICE).float()
        sd = ((1 - p) * p / n) ** 0.5
        assert abs(keep.mean().item() - (1 - p)) < 4 * sd, p
        pos = torch.arange(seqlen)
        slot = 2 * ((pos[:, None] // 8) % 2) + (pos[None, :] // 8) % 2     # which of a call's 4 draws
        per_slot = torch.stack([keep[..., slot == i].mean() for i in range(4)])
        assert ((per_slot - (1 - p)).abs() < 4 * sd * 4 ** 0.5).all(), (p, per_slot)
    a = dropout_mask(5, batch, nheads, seqlen, seqlen, 0.5, DEVICE)
    assert torch.equal(a, dropout_mask(5, batch, nheads, seqlen, seqlen, 0.5, DEVICE))
    assert not torch.equal(a, dropout_mask(6, batch, nheads, seqlen, seqlen, 0.5, DEVICE))
    assert not torch.equal(a, dropout_mask(2**32 + 5, batch, nheads, seqlen, seqlen, 0.5, DEVICE))  # high word
    assert not torch.equal(a[0, 0], a[0, 1]) and not torch.equal(a[0, 0], a[1, 0])
    assert dropout_mask(5, 1, 1, 8, 8, 0.0, DEVICE).all()


KAT2 = [  # Random123 kat_vectors, philox2x32 7 and 10: counter, key -> output
    (7, (0, 0), 0, (0x257A3673, 0xCD26BE2A)),
    (7, (0xFFFFFFFF, 0xFFFFFFFF), 0xFFFFFFFF, (0xAB302C4D, 0x3DC9D239)),
    (7, (0x243F6A88, 0x85A308D3), 0x13198A2E, (0xBEDBBE6B, 0xE4C770B3)),
    (10, (0, 0), 0, (0xFF1DAE59, 0x6CD10DF2)),
    (10, (0xFFFFFFFF, 0xFFFFFFFF), 0xFFFFFFFF, (0x2C3F628B, 0xAB4FD7AD)),
    (10, (0x243F6A88, 0x85A308D3), 0x13198A2E, (0xDD7CE038, 0xF62A4C12)),
]


@pytest.mark.parametrize("rounds,ctr,key,expected", KAT2)
def test_philox2x32_reference_known_answers(rounds, ctr, key, expected):
    out = philox2x32([[c] for c in ctr], [key], rounds=rounds)
    assert [int(w[0]) for w in out] == list(expected)


def documented_dropout_mask(seed, batch, nheads, seqlen_q, seqlen_k, p):
    """The keep-mask the module docstring specifies, from a numpy Philox2x32-7: query row r and key n of
    head bh take the call with counter (p(r)·P_k + p(n), bh + seed_hi), key seed_lo, where
    p(x) = 8·(x // 16) + x % 8 and P_k = 8·cdiv(Tk, 16); word (r // 8) % 2 of it, bits 0-14 when
    (n // 8) % 2 == 0, else bits 16-30; keep when that 15-bit draw >= round(p·2^15)."""
    import numpy as np

    pairs_k = 8 * -(-seqlen_k // 16)
    bh, r, n = np.meshgrid(np.arange(batch * nheads), np.arange(seqlen_q), np.arange(seqlen_k), indexing="ij")
    pair = lambda x: 8 * (x // 16) + x % 8  # noqa: E731
    c0 = (pair(r) * pairs_k + pair(n)).astype(np.uint64)
    c1 = (bh + (seed >> 32)) % 2**32
    words = philox2x32((c0, c1), seed & 0xFFFFFFFF, rounds=7)
    word = np.where((r // 8) % 2 == 0, words[0], words[1]).astype(np.uint64)
    draw = np.where((n // 8) % 2 == 0, word, word >> np.uint64(16)) & np.uint64(0x7FFF)
    return torch.from_numpy(draw >= min(round(p * 2**15), 2**15 - 1)).reshape(batch, nheads, seqlen_q, seqlen_k)


@pytest.mark.parametrize("seqlen_q,seqlen_k,p", [(3, 21, 0.3), (19, 77, 0.3), (19, 77, 0.99)])
def test_dropout_mask_follows_the_documented_counter_layout(seqlen_q, seqlen_k, p):
    batch, nheads, seed = 2, 2, 2**40 + 12345
    expected = documented_dropout_mask(seed, batch, nheads, seqlen_q, seqlen_k, p)
    assert torch.equal(dropout_mask(seed, batch, nheads, seqlen_q, seqlen_k, p, DEVICE).cpu(), expected)


def test_the_f16_pair_compare_is_the_integer_compare_of_15_bit_draws():
    """The compiled kernels test both draws of a Philox word with one f16x2 compare (kernels/attention.py,
    _SELECT_PAIR: keep iff |f16(half)| >= f16(T) or it is NaN). Over every 16-bit half and every threshold
    the launchers send down that path (T <= 0x7C00, subnormal f16 thresholds included) it must keep
    exactly the halves whose low 15 bits are >= T; the GPU tests check the hardware does the same."""
    import numpy as np

    from fastelectra.kernels.attention import DRAW_RANGE, F16_MAX_THRESHOLD

    halves = np.arange(2**16, dtype=np.uint32)
    magnitude = np.abs(halves.astype(np.uint16).view(np.float16))
    assert F16_MAX_THRESHOLD == 0x7C00 and DRAW_RANGE == 2**15
    for t in [*range(0, 1100), *range(1100, F16_MAX_THRESHOLD + 1, 7), F16_MAX_THRESHOLD]:
        f16_keep = ~(magnitude < np.uint16(t).view(np.float16))        # geu: >= or unordered
        assert np.array_equal(f16_keep, (halves & 0x7FFF) >= t), t


def test_seed_tensor_gives_the_same_output_gradients_and_mask_as_the_int():
    g = torch.Generator().manual_seed(10)
    q, k, v, do = (rand(1, 19, 2, 16, generator=g) for _ in range(4))
    mask = make_mask("prefix", 1, 19)
    by_int = run(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=0.3, seed=2**40 + 7), q, k, v, do)
    for seed in (torch.tensor(2**40 + 7), torch.tensor([2**40 + 7], device=DEVICE)):   # CPU 0-d, (1,) on q's device
        by_tensor = run(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=0.3, seed=seed), q, k, v, do)
        for a, b in zip(by_tensor, by_int):
            assert torch.equal(a, b)
        assert torch.equal(dropout_mask(seed, 1, 2, 19, 19, 0.3, DEVICE),
                           dropout_mask(2**40 + 7, 1, 2, 19, 19, 0.3, DEVICE))


def test_dropout_seed_none_follows_torch_manual_seed():
    g = torch.Generator().manual_seed(6)
    q, k, v = (rand(1, 16, 1, 16, generator=g) for _ in range(3))
    torch.manual_seed(0)
    a = flash_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(0)
    b = flash_attention(q, k, v, dropout_p=0.3)
    c = flash_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- varlen
def test_varlen_matches_padded():
    g = torch.Generator().manual_seed(7)
    lengths = [17, 5, 33]
    batch, seqlen, nheads, head_dim, p = len(lengths), max(lengths), 2, 16, 0.1
    q, k, v, do = (rand(batch, seqlen, nheads, head_dim, generator=g) for _ in range(4))
    mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).to(DEVICE)
    do = do * mask[:, :, None, None]
    dense = run(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=p, seed=11), q, k, v, do)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    packed = [t[mask] for t in (q, k, v, do)]                       # (total, H, D)
    varlen = run(lambda q, k, v: flash_attention_varlen(q, k, v, cu, seqlen, dropout_p=p, seed=11),
                 *packed[:3], packed[3])
    for name, d, vl in zip(("out", "dq", "dk", "dv"), dense, varlen):
        assert vl.shape == packed[0].shape
        torch.testing.assert_close(vl, d[mask], atol=2e-3, rtol=1e-2, msg=name)


def run_packed(fn, qkv, do):
    """Output and the gradient of qkv for fn(qkv)."""
    qkv = qkv.detach().clone().requires_grad_(True)
    out = fn(qkv)
    return [out.detach(), *torch.autograd.grad(out, qkv, do)]


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_qkvpacked_equals_attention_on_the_three_views(varlen):
    """The packed entry runs the same kernels on qkv's views: the same output, and one gradient that is
    exactly dq, dk, dv side by side, through the dK/dV and dQ kernels' strided stores."""
    g = torch.Generator().manual_seed(12)
    batch, seqlen, nheads, head_dim, p = 3, 21, 2, 16, 0.2
    if varlen:
        lengths = [21, 4, 13]
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
        qkv = rand(sum(lengths), 3, nheads, head_dim, generator=g)
        do = rand(sum(lengths), nheads, head_dim, generator=g)
        packed = run_packed(lambda t: flash_attention_qkvpacked(t, dropout_p=p, seed=5, cu_seqlens=cu,
                                                                max_seqlen=seqlen), qkv, do)
        split = run(lambda q, k, v: flash_attention_varlen(q, k, v, cu, seqlen, dropout_p=p, seed=5),
                    *qkv.unbind(-3), do)
    else:
        mask = make_mask("general", batch, seqlen)
        qkv = rand(batch, seqlen, 3, nheads, head_dim, generator=g)
        do = rand(batch, seqlen, nheads, head_dim, generator=g)
        packed = run_packed(lambda t: flash_attention_qkvpacked(t, mask, dropout_p=p, seed=5), qkv, do)
        split = run(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=p, seed=5), *qkv.unbind(-3), do)
    assert packed[1].shape == qkv.shape and packed[1].is_contiguous()
    assert torch.equal(packed[0], split[0])
    assert torch.equal(packed[1], torch.stack(split[1:], dim=-3))
    # and through the public op, whose CPU path (no kernel) is the reference on the same views
    if DEVICE == "cpu" and not varlen:
        torch.manual_seed(0)
        via_ops = ops.attention_qkvpacked(qkv, mask)
        torch.testing.assert_close(via_ops, ops.attention(*qkv.unbind(-3), mask))


def test_forward_without_autograd_gives_the_same_output():
    """Under no_grad / inference_mode, or with inputs that need no grad, the entries call the forward
    launcher without the autograd Function: the same output, no graph."""
    g = torch.Generator().manual_seed(4)
    mask = make_mask("general", 3, 19)
    qkv = rand(3, 19, 3, 2, 16, generator=g)
    calls = {"dense": lambda t: flash_attention(*t.unbind(-3), mask, dropout_p=0.2, seed=9),
             "packed": lambda t: flash_attention_qkvpacked(t, mask, dropout_p=0.2, seed=9)}
    for name, fn in calls.items():
        want = fn(qkv.clone().requires_grad_(True))
        assert want.grad_fn is not None, name
        with torch.no_grad():
            a = fn(qkv.clone().requires_grad_(True))
        with torch.inference_mode():
            b = fn(qkv)
        c = fn(qkv)
        for got in (a, b, c):
            assert got.grad_fn is None and torch.equal(got, want.detach()), name


def test_qkvpacked_bad_inputs_name_the_argument():
    qkv = rand(1, 8, 3, 1, 16)
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, nheads, headdim\)"):
        flash_attention_qkvpacked(qkv[:, :, :2])
    with pytest.raises(ValueError, match=r"qkv must be \(total, 3, nheads, headdim\)"):
        flash_attention_qkvpacked(qkv, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device=DEVICE), max_seqlen=8)
    with pytest.raises(ValueError, match="no key_padding_mask"):
        flash_attention_qkvpacked(qkv[0], torch.ones(1, 8, dtype=torch.bool, device=DEVICE),
                                  cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device=DEVICE), max_seqlen=8)
    with pytest.raises(ValueError, match="key_padding_mask must be a tensor of shape"):
        flash_attention_qkvpacked(qkv, torch.ones(1, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3, nheads, headdim\)"):
        ops.attention_qkvpacked(qkv[0])
    with pytest.raises(ValueError, match="key_padding_mask must be None"):
        ops.attention_qkvpacked(qkv[0], torch.ones(1, 8, dtype=torch.bool, device=DEVICE),
                                cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device=DEVICE), max_seqlen=8)


# ----------------------------------------------------------------------------- compile, errors
def test_torch_compile_fullgraph_traces_attention_and_layer_norm_dropout():
    """A block with both kernels' dropout, seeds drawn in the graph (seed=None): fullgraph tracing
    means no graph break (no .item() on a seed); forward and backward match eager under the same
    torch.manual_seed, and each call draws fresh masks for both kernels."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(8)
    q, k, v = (rand(2, 17, 2, 16, generator=g) for _ in range(3))
    mask = make_mask("general", 2, 17)
    x, r = (torch.randn(2, 17, 32, generator=g).to(DEVICE) for _ in range(2))

    def block(q, k, v):
        attn = flash_attention(q, k, v, mask, dropout_p=0.3)
        tail = fused_layer_norm(x, None, None, 1e-5, residual=r, dropout_p=0.3)   # a mask of its own
        return torch.cat([attn.flatten(), tail.flatten()])

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    do = torch.ones(2 * 17 * 2 * 16 + x.numel(), device=DEVICE)
    torch.manual_seed(3)
    eager = run(block, q, k, v, do)
    torch.manual_seed(3)
    traced = run(compiled, q, k, v, do)
    again = run(compiled, q, k, v, do)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
    n_attn = q.numel()
    assert not torch.equal(traced[0][:n_attn], again[0][:n_attn])     # attention masks differ
    assert not torch.equal(traced[0][n_attn:], again[0][n_attn:])     # layer norm masks differ


def test_autotuning_caps_registers_with_dropout_at_headdim_64_only():
    """The candidates' register caps (maxnreg) apply where they were read off the sm_90 code: with dropout
    at headdim 64. Without dropout, at other head dims and for fp32 every candidate keeps ptxas's own
    count; pruning for shared memory is unchanged by them; each autotuner prunes with its own list's caps."""
    import triton

    from fastelectra.kernels import attention as A

    class Like:                                   # what _prune reads of q
        def __init__(self, size):
            self.element_size = lambda: size

    for tuner, shapes in ((A._attn_fwd, A._FWD_SHAPES), (A._attn_bwd_dkdv, A._DKDV_SHAPES),
                          (A._attn_bwd_dq, A._DQ_SHAPES)):
        caps = A._register_caps(shapes)
        assert tuner.early_config_prune.keywords == {"register_caps": caps}
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s, _ in shapes]
        for size in (2, 4):
            for head_dim in (16, 32, 64, 128):
                for dropout in (False, True):
                    args = {"HEAD_DIM": head_dim, "Q": Like(size), "seq_bucket": 512, "IS_DROPOUT": dropout}
                    got = A._prune(configs, args, register_caps=caps)
                    uncapped = A._prune(configs, args)
                    assert [(c.kwargs, c.num_warps, c.num_stages) for c in got] == \
                        [(c.kwargs, c.num_warps, c.num_stages) for c in uncapped]
                    assert all(c.maxnreg is None for c in uncapped)
                    expect = [caps.get((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
                              if dropout and head_dim == 64 and size == 2 else None for c in got]
                    assert [c.maxnreg for c in got] == expect, (shapes, size, head_dim, dropout)
    assert A._register_caps(A._FWD_SHAPES) and A._register_caps(A._DQ_SHAPES)    # the fwd and dQ lists cap some
    assert A._register_caps(A._DKDV_SHAPES) == {}                                # dK/dV would spill in its loop


def test_custom_op_registration():
    """torch.library.opcheck: schema, fake (meta) kernel and autograd registration agree with the op."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (rand(1, 16, 1, 16, generator=g).requires_grad_(True) for _ in range(3))
    mask = make_mask("prefix", 1, 16)
    seed = torch.tensor([3], dtype=torch.int64, device=DEVICE)   # the seed lives on q's device
    for p, s in ((0.1, seed), (0.0, None)):
        torch.library.opcheck(torch.ops.fastelectra.flash_attn_fwd.default,
                              (q, k, v, mask, None, None, 0, p, 0.25, s),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        out, lse = torch.ops.fastelectra.flash_attn_fwd.default(q, k, v, mask, None, None, 0, 0.1, 0.25, seed)
    torch.library.opcheck(torch.ops.fastelectra.flash_attn_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, mask, None, None, 0,
                           0.1, 0.25, seed), test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="seed must be an int64 tensor of one element"):
        torch.ops.fastelectra.flash_attn_fwd.default(q, k, v, mask, None, None, 0, 0.1, 0.25, None)
    qkv = torch.stack([q, k, v], dim=2).detach().requires_grad_(True)           # (1, 16, 3, 1, 16)
    torch.library.opcheck(torch.ops.fastelectra.flash_attn_qkvpacked_fwd.default,
                          (qkv, mask, None, None, 0, 0.1, 0.25, seed),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        out, lse = torch.ops.fastelectra.flash_attn_qkvpacked_fwd.default(qkv, mask, None, None, 0, 0.1, 0.25, seed)
    torch.library.opcheck(torch.ops.fastelectra.flash_attn_qkvpacked_bwd.default,
                          (torch.randn_like(out), qkv.detach(), out, lse, mask, None, None, 0, 0.1, 0.25, seed),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_raise_clear_errors():
    q = rand(1, 8, 1, 16)
    with pytest.raises(ValueError, match="headdim"):
        flash_attention(rand(1, 8, 1, 48), rand(1, 8, 1, 48), rand(1, 8, 1, 48))
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attention(q, q.float(), q)
    with pytest.raises(TypeError, match="float16"):
        flash_attention(q.to(torch.int32), q.to(torch.int32), q.to(torch.int32))
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attention(q, q, q, dropout_p=1.0)
    for scale in (float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="softmax_scale"):
            flash_attention(q, q, q, softmax_scale=scale)
    with pytest.raises(TypeError, match="softmax_scale must be a number, got bool"):
        flash_attention(q, q, q, softmax_scale=True)
    if DEVICE == "cpu":
        for lengths in ([-1], [9]):
            with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, seqlen_k=8\]"):
                flash_attention(q, q, q, key_lengths=torch.tensor(lengths))
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_attention(q, q, q, torch.ones(1, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="key_padding_mask"):
        flash_attention(q, q, q, torch.ones(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens"):
        flash_attention_varlen(q[0], q[0], q[0], torch.tensor([0, 8], device=DEVICE), 8)
    with pytest.raises(ValueError, match="max_seqlen"):
        flash_attention_varlen(q[0], q[0], q[0], torch.tensor([0, 8], dtype=torch.int32, device=DEVICE), 4)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="rise from 0"):
            flash_attention_varlen(q[0], q[0], q[0], torch.tensor([0, 9], dtype=torch.int32), 9)
    for seed in (1.5, torch.tensor([1, 2]), torch.tensor([1.0])):
        with pytest.raises(TypeError, match="seed"):
            flash_attention(q, q, q, dropout_p=0.1, seed=seed)
    with pytest.raises(TypeError, match="seed"):
        dropout_mask(torch.tensor([1, 2]), 1, 1, 8, 8, 0.1, DEVICE)
    long = q[:, :1].expand(1, 2**17 + 1, 1, 16)          # a view: nothing is allocated or launched
    with pytest.raises(ValueError, match="at most 131072 tokens"):
        flash_attention(long, long, long, dropout_p=0.1)
    with pytest.raises(ValueError, match="at most 131072 tokens"):
        flash_attention_varlen(q[0], q[0], q[0], torch.tensor([0, 8], dtype=torch.int32, device=DEVICE), 2**17 + 1,
                               dropout_p=0.1)
    with pytest.raises(ValueError, match="at most 131072 tokens"):
        dropout_mask(1, 1, 1, 8, 2**17 + 1, 0.1, DEVICE)


# ----------------------------------------------------------------------------- GPU, real shapes
def _gpu_case(batch, seqlen, nheads, head_dim, dtype=torch.bfloat16, masked=True, p=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(batch, seqlen, nheads, head_dim, generator=g).to("cuda", dtype) for _ in range(4))
    mask = None
    if masked:
        lengths = torch.randint(max(1, seqlen // 2), seqlen + 1, (batch,), generator=g)
        mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).cuda()
    keep = dropout_mask(seed + 1, batch, nheads, seqlen, seqlen, p, "cuda") if p > 0 else None
    assert_close_to_reference(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=p, seed=seed + 1),
                              lambda q, k, v: reference(q, k, v, mask, keep, p), q, k, v, do)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, seqlen, nheads, head_dim, dtype, masked, p", [
    (4, 512, 12, 64, torch.bfloat16, True, 0.1),   # ELECTRA-Base: mask + dropout
    (4, 512, 12, 64, torch.float16, False, 0.0),
    (3, 77, 4, 64, torch.bfloat16, True, 0.0),
    (2, 256, 4, 128, torch.bfloat16, True, 0.1),
    (2, 200, 2, 32, torch.float32, True, 0.0),
    (5, 1, 3, 64, torch.bfloat16, False, 0.0),
])
def test_gpu_real_shapes(batch, seqlen, nheads, head_dim, dtype, masked, p):
    _gpu_case(batch, seqlen, nheads, head_dim, dtype, masked, p)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen_q,seqlen_k,p", [(512, 512, 0.1), (77, 77, 0.1), (130, 300, 0.1),
                                                 # f16 thresholds: subnormal, normal, +inf; integer compares
                                                 (130, 300, 0.01), (130, 300, 0.5), (130, 300, 0.96875),
                                                 (130, 300, 0.99)])
def test_gpu_dropout_mask_follows_the_documented_counter_layout(seqlen_q, seqlen_k, p):
    """The compiled kernels multiply with inline PTX (mul.wide.u32), the interpreter with umulhi, and test
    draws with an f16x2 compare (up to p = 0.96875) where the interpreter compares integers: the numpy
    Philox checks the compiled path here."""
    expected = documented_dropout_mask(2**33 + 7, 2, 3, seqlen_q, seqlen_k, p)
    assert torch.equal(dropout_mask(2**33 + 7, 2, 3, seqlen_q, seqlen_k, p, "cuda").cpu(), expected)


@pytest.mark.gpu
def test_gpu_varlen_and_keep_fraction():
    lengths = [512, 301, 77, 1]
    q, k, v, do = (torch.randn(len(lengths), 512, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    mask = torch.arange(512, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    do = do * mask[:, :, None, None]
    dense = run(lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=0.1, seed=5), q, k, v, do)
    cu = torch.tensor([0] + lengths).cumsum(0).to(device="cuda", dtype=torch.int32)
    packed = [t[mask] for t in (q, k, v, do)]
    varlen = run(lambda q, k, v: flash_attention_varlen(q, k, v, cu, 512, dropout_p=0.1, seed=5),
                 *packed[:3], packed[3])
    for d, vl in zip(dense, varlen):
        torch.testing.assert_close(vl, d[mask], atol=1e-2, rtol=2e-2)
    keep = dropout_mask(5, 4, 12, 512, 512, 0.1, "cuda")
    assert abs(keep.float().mean().item() - 0.9) < 1e-3


@pytest.mark.gpu
def test_gpu_ops_attention_dispatch_and_inductor():
    q, k, v = (torch.randn(2, 128, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = torch.ones(2, 128, dtype=torch.long, device="cuda")
    mask[1, 100:] = 0
    out = ops.attention(q, k, v, mask, dropout_p=0.1, seed=3, backend="fused")
    torch.testing.assert_close(out, flash_attention(q, k, v, mask.bool(), dropout_p=0.1, seed=3))
    torch.testing.assert_close(out, ops.attention(q, k, v, mask, dropout_p=0.1, backend="fused",
                                                  seed=torch.tensor([3], device="cuda")))
    compiled = torch.compile(lambda q, k, v: flash_attention(q, k, v, mask.bool()), fullgraph=True)
    out = compiled(q, k, v)
    out.float().sum().backward()
    torch.testing.assert_close(out, flash_attention(q, k, v, mask.bool()))
    assert torch.isfinite(q.grad).all()


@pytest.mark.gpu
def test_gpu_dropout_without_host_sync_and_fresh_masks_on_cuda_graph_replay():
    """The seeds are drawn and read on the device: a training step with both kernels' dropout makes no
    synchronising CUDA call, and a captured CUDA graph draws new masks on every replay."""
    q, k, v = (torch.randn(2, 128, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    x, r = (torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w, b = torch.ones(256, device="cuda", requires_grad=True), torch.zeros(256, device="cuda", requires_grad=True)
    mask = torch.arange(128, device="cuda")[None, :] < torch.tensor([128, 90], device="cuda")[:, None]

    def step(seed=None):
        attn = flash_attention(q, k, v, mask, dropout_p=0.5, seed=seed)
        tail = fused_layer_norm(x, w, b, 1e-12, residual=r, dropout_p=0.5, seed=seed)
        return attn, tail

    for seed in (None, 5):                      # compile and autotune outside the checked region
        a, t = step(seed)
        (a.float().sum() + t.float().sum()).backward()
    seeds = (None, 5, torch.tensor([5], device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for seed in seeds:
            a, t = step(seed)
            (a.float().sum() + t.float().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            a, t = step()
        graph.replay()
        a1, t1 = a.clone(), t.clone()
        graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(a1, a) and not torch.equal(t1, t)

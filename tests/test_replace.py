"""The fastelectra::replace_tokens op (csrc/): Philox, noise, samples, labels, lse, errors, tracing.

An independent numpy re-implementation of the counter layout, Philox4x32-10 and the Gumbel noise
(written from csrc/philox.h's description, checked against the Random123 known answers) is the
bit-for-bit reference of the CPU op; `gpu` tests check CPU == CUDA.
The op's seed is an int64 (1,) tensor on the logits' device; the helpers below turn an int into one.
"""
import ctypes
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from benchmarks.sass_loops import _nvcc
from fastelectra import ops, rng
from philox_ref import U32, philox4x32

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


# tests of the numpy reference and of the CUDA source alone: they run without the built extension
WITHOUT_EXTENSION = ("test_philox_reference_known_answers", "test_noise_is_gumbel_and_the_log_is_accurate",
                     "test_noise_of_an_octet_is_eight_independent_gumbels",
                     "test_noise_filter_skips_only_elements_that_lose", "test_cuda_kernel_compiles_with_nvcc")


@pytest.fixture(autouse=True)
def _extension_loaded(request):
    if request.function.__name__ not in WITHOUT_EXTENSION:
        request.getfixturevalue("extension_built")


def op(logits, input_ids, masked_positions, temperature, seed, offset, return_lse):
    """The raw replace_tokens op; an int seed is passed as the (1,) tensor on logits' device it takes."""
    if isinstance(seed, int):
        seed = rng.seed_tensor(seed, logits.device)
    return torch.ops.fastelectra.replace_tokens(logits, input_ids, masked_positions, temperature, seed, offset,
                                                return_lse)


def noise(logits, seed, offset):
    """The raw gumbel_noise op, with an int seed as in :func:`op`."""
    if isinstance(seed, int):
        seed = rng.seed_tensor(seed, logits.device)
    return torch.ops.fastelectra.gumbel_noise(logits, seed, offset)


# ----------------------------------------------------------------------------- numpy reference
F32 = np.float32


def _hexf(s):
    return F32(float.fromhex(s))


def uniform_open(r):
    v = r.astype(F32) * _hexf("0x1p-32") + _hexf("0x1p-33")
    return np.minimum(v, _hexf("0x1.fffffep-1"))


def log_ref(x):
    """The op's logarithm, float32 operation for operation."""
    ix = x.astype(F32).view(np.uint32).astype(np.int64)
    k = ((ix - 0x3F3504F3 + (64 << 23)) & 0xFFFFFFFF) >> 23
    k = k - 64
    m = ((ix - (k << 23)) & 0xFFFFFFFF).astype(np.uint32).view(F32)
    f = m - F32(1)
    s = f / (F32(2) + f)
    z = s * s
    p = _hexf("0x1.24924ap-2") + z * _hexf("0x1.c71c72p-3")
    p = _hexf("0x1.99999ap-2") + z * p
    p = _hexf("0x1.555556p-1") + z * p
    log_m = (s + s) + (s * z) * p
    kf = k.astype(F32)
    return kf * _hexf("0x1.62e4p-1") + (log_m + kf * _hexf("0x1.7f7d1cp-20"))


def exponential_of_uniform_ref(v):
    """E = -log(1 - v), float32 operation for operation (the rounding error c of w = 1 - v kept)."""
    w = F32(1) - v
    c = (F32(1) - w) - v
    return -(log_ref(w) + c / w)


def exponential_ref(r):
    """The Exponential(1) variate of random words r."""
    return exponential_of_uniform_ref(uniform_open(r))


def _call(c0, c1, seed, offset):
    """Philox4x32-10 of counters (c0, c1, offset lo, offset hi), key (seed lo, seed hi)."""
    c0 = np.asarray(c0, dtype=np.uint64)
    return philox4x32((c0, c1, np.full_like(c0, offset & 0xFFFFFFFF), np.full_like(c0, offset >> 32)),
                      (seed & 0xFFFFFFFF, seed >> 32))


def octet_min_words_ref(n_rows, vocab, seed, offset):
    """The min word of every octet o = flat // 8 (csrc/philox.h's layout): an octet whose 8 elements lie
    in one row is that row's whole octet q = o - ceil(row V / 8) and takes word (q >> 5) % 4 of the call
    (row, (q >> 7) << 5 | q % 32); any other octet takes word 0 of its edge call (o lo, o hi | 2^30)."""
    seed, offset = seed % 2**64, offset % 2**64
    o = np.arange((n_rows * vocab + 7) // 8, dtype=np.uint64)
    v = np.uint64(vocab)
    row = (o * np.uint64(8)) // v
    row_begin = row * v
    whole = o * np.uint64(8) + np.uint64(8) <= row_begin + v
    q = o - (row_begin + np.uint64(7)) // np.uint64(8)
    q = np.where(whole, q, np.uint64(0))
    group = ((q >> np.uint64(7)) << np.uint64(5)) | (q & np.uint64(31))
    row_words = np.choose(((q >> np.uint64(5)) & np.uint64(3)).astype(np.int64), _call(row & U32, group, seed, offset))
    edge_word = _call(o & U32, (o >> np.uint64(32)) | np.uint64(2**30), seed, offset)[0]
    return np.where(whole, row_words, edge_word)


def noise_ref(n_rows, vocab, seed, offset):
    """(n_rows, vocab) float32 Gumbel noise: per octet, E_min = E(min word) / 8 at position
    J = fine word 7 >> 29, every other position j: E_min + E(fine word j, or j - 1 past J), with fine
    words 0-3 from the call (o lo, o hi | 2^31) and 4-7 from (o lo, o hi | 2^31 | 2^30); g = -log(E)."""
    seed, offset = seed % 2**64, offset % 2**64
    total = n_rows * vocab
    o = np.arange((total + 7) // 8, dtype=np.uint64)
    fine = (_call(o & U32, (o >> np.uint64(32)) | np.uint64(2**31), seed, offset)
            + _call(o & U32, (o >> np.uint64(32)) | np.uint64(2**31 + 2**30), seed, offset))
    J = (fine[7] >> np.uint32(29)).astype(np.int64)
    with np.errstate(all="ignore"):
        e_min = exponential_ref(octet_min_words_ref(n_rows, vocab, seed, offset)) * F32(0.125)
        e = np.empty((o.size, 8), dtype=F32)
        for j in range(8):
            k = np.minimum(np.where(j > J, j - 1, j), 6)  # (unused where j == J)
            e[:, j] = np.where(j == J, e_min, e_min + exponential_ref(np.choose(k, fine[:7])))
        return (-log_ref(e)).ravel()[:total].reshape(n_rows, vocab)


def samples_ref(logits, temperature, seed, offset):
    x = logits.float().numpy()
    if temperature == 0:
        return np.argmax(x, axis=1)
    keys = x * F32(1.0 / temperature) + noise_ref(*x.shape, seed, offset)
    return np.argmax(keys, axis=1)  # first index of the max, as the op


# ----------------------------------------------------------------------------- Philox and noise
KAT = [  # Random123 kat_vectors, philox4x32 10: counter, key -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_reference_known_answers(ctr, key, expected):
    out = philox4x32([[c] for c in ctr], [[k] for k in key])
    assert [int(w[0]) for w in out] == list(expected)


def test_op_noise_starts_from_the_known_answer():
    # seed 0, offset 0, one row of 8: the row's whole octet 0 takes word 0 of the min call with counter 0
    # and key 0, the first known answer: its noise peaks at -log(E / 8) of that word
    got = noise(torch.empty(1, 8), 0, 0).numpy()[0]
    e_min = exponential_ref(np.array([KAT[0][2][0]], dtype=np.uint32)) * F32(0.125)
    assert got.max() == -log_ref(e_min)[0] and (got < got.max()).sum() == 7


@pytest.mark.parametrize("shape,seed,offset", [((3, 7), 0, 0), ((5, 1), 1, 2), ((2, 30522), 2**62 - 1, 7),
                                               ((4, 33), 12345, 2**40 + 3), ((1, 4096), -1, -1)])
def test_op_noise_bit_identical_to_numpy(shape, seed, offset):
    got = noise(torch.empty(shape, dtype=torch.bfloat16), seed, offset)
    assert got.dtype == torch.float32 and got.shape == shape
    np.testing.assert_array_equal(got.numpy().view(np.uint32), noise_ref(*shape, seed, offset).view(np.uint32))


def test_noise_is_gumbel_and_the_log_is_accurate():
    x = np.exp(np.linspace(-23.0, 3.0, 20001)).astype(F32)
    np.testing.assert_allclose(log_ref(x), np.log(x.astype(np.float64)), rtol=0, atol=3e-7 * 23)
    g = noise_ref(64, 4096, 5, 0).ravel().astype(np.float64)
    assert abs(g.mean() - 0.5772156649) < 0.01 and abs(g.var() - math.pi**2 / 6) < 0.03  # Euler gamma, pi^2/6
    # the noise of every part of the uniform map, extremes included (v -> 0 gives the largest noise)
    v = np.concatenate([np.exp(np.linspace(np.log(2.0**-33), 0.0, 200001)), [2.0**-33, 2.0**-24, 0.5, 1 - 2.0**-24]])
    v = np.minimum(v.astype(F32), _hexf("0x1.fffffep-1"))
    exact = -np.log(-np.log1p(-v.astype(np.float64)))
    np.testing.assert_allclose(-log_ref(exponential_of_uniform_ref(v)), exact, rtol=0, atol=4e-6)
    # and of an octet's minimum (E / 8) and the others (E_min + E'), at the extremes too
    e_min = exponential_of_uniform_ref(v) * F32(0.125)
    np.testing.assert_allclose(-log_ref(e_min), exact + np.log(8.0), rtol=0, atol=4e-6)
    e = e_min[::-1] + exponential_of_uniform_ref(v)
    exact_e = -np.log1p(-v[::-1].astype(np.float64)) / 8 - np.log1p(-v.astype(np.float64))
    np.testing.assert_allclose(-log_ref(e), -np.log(exact_e), rtol=0, atol=4e-6)


def test_noise_of_an_octet_is_eight_independent_gumbels():
    """The octet's exponential race (min first, the others above it) gives each position a Gumbel(0, 1)
    noise, independent of the others: per-position mean, variance and quantiles, the octet's maximum
    (Gumbel + log 8), its position (uniform) and the correlations between positions. 64-column rows:
    every octet is a whole one; 61 columns: most rows also have octets that span two rows."""
    gamma, var = 0.5772156649, math.pi**2 / 6
    for vocab in (64, 61):
        g = noise_ref(131072 // vocab * 8, vocab, 11, 3).ravel()
        g = g[: g.size // 8 * 8].reshape(-1, 8).astype(np.float64)
        n = g.shape[0]  # ~131k octets: standard errors ~0.0035 (mean), ~0.009 (variance)
        assert np.all(np.abs(g.mean(0) - gamma) < 0.02), g.mean(0)
        assert np.all(np.abs(g.var(0) - var) < 0.05), g.var(0)
        for x in (-1.0, 0.0, 1.0, 3.0, 6.0):  # the CDF exp(-exp(-x)), per position
            p = math.exp(-math.exp(-x))
            assert np.all(np.abs((g <= x).mean(0) - p) < 5 * math.sqrt(p * (1 - p) / n)), (x, (g <= x).mean(0), p)
        top = g.max(1)
        assert abs(top.mean() - (gamma + math.log(8))) < 0.02 and abs(top.var() - var) < 0.05
        counts = np.bincount(g.argmax(1), minlength=8).astype(np.float64)
        assert _chi_square_pvalue(torch.tensor(counts), torch.full((8,), 1 / 8, dtype=torch.float64)) > 1e-3, counts
        corr = np.corrcoef(g.T)
        assert np.abs(corr - np.eye(8)).max() < 0.02, corr


def _filter_q_c(y, m, t, device_error):
    """The filter's q = exp(y - m) and c = 8 exp(m - t + margin) (infinite outside |m|, |t| <= 2^14),
    float32 operation for operation (their host form); device_error < 1 shrinks both as an exp2 that
    is a few ulps low (the device's MUFU) would."""
    log2e = _hexf("0x1.715476p+0")
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.exp2(y * log2e - m * log2e) * F32(device_error)
        in_range = (np.abs(m) <= F32(2.0**14)) & (np.abs(t) <= F32(2.0**14))
        c = np.where(in_range, np.exp2((m - t + _hexf("0x1p-5")) * log2e + F32(3)) * F32(device_error), F32(np.inf))
    return q, c


def _one_plus_v_low(r):
    """1 + (r >> 9) 2^-23, exactly: the bound of a word's uniform that the filter's tests read."""
    return ((r >> np.uint32(9)) | np.uint32(0x3F800000)).view(F32)


def filter_skips_ref(r, y, m, t, device_error=1.0):
    """philox.h's noise filter (filter_may_win): True where the elements of an octet with min word r and
    y = logit/tau, under running max m and best key t, are skipped."""
    q, c = _filter_q_c(y, m, t, device_error)
    with np.errstate(invalid="ignore"):
        return _one_plus_v_low(r) > q * c + _hexf("0x1.000004p+0")


def filter_above_skips_ref(e_min, r, y, m, t, device_error=1.0):
    """philox.h's second test (filter_may_win_above): True where an element with fine word r in an
    octet with minimum e_min is skipped."""
    q, c = _filter_q_c(y, m, t, device_error)
    with np.errstate(invalid="ignore"):
        return (e_min + (_one_plus_v_low(r) - F32(1))) > q * c * F32(0.125)


@pytest.mark.parametrize("device_error", [1.0, 1 - 2.0**-18])
def test_noise_filter_skips_only_elements_that_lose(device_error):
    """The kernels skip the exact noise where the filter says no key y + g of an octet can reach the best
    key t. The largest noise an octet can give is its minimum's, -log(E_min). Thresholds right at the key
    (ties included), near the filter's range limit of 2^14 and beyond."""
    rng = np.random.default_rng(0)
    n = 1_000_000
    r = np.concatenate([rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32),
                        np.arange(0, 2**12, dtype=np.uint32), (2**32 - 1 - np.arange(2**12)).astype(np.uint32),
                        (np.arange(0, 2**23, 2**7, dtype=np.uint32) << np.uint32(9))])  # low bits 0: the bound is tight
    size = r.size
    g = -log_ref(exponential_ref(r) * F32(0.125))
    base = rng.choice(np.array([0.0, 37.0, -3000.0, 2.0**13, 2.0**14 - 40, -(2.0**14) + 40, 2.0**15]), size)
    y = (base + rng.normal(0, 5, size)).astype(F32)
    m = (y + np.abs(rng.normal(0, 3, size)) * (rng.random(size) < 0.7)).astype(F32)  # m >= y, often m == y
    key = y + g
    kind = rng.random(size)  # t == key (a tie), t within the margin of key, t clearly above key
    above = np.where(kind < 0.6, rng.normal(0, 0.05, size), np.abs(rng.normal(0, 10, size)))
    t = np.where(kind < 0.2, key, key + above)
    t = t.astype(F32)
    skip = filter_skips_ref(r, y, m, t, device_error)
    assert not (skip & (key >= t)).any()
    assert skip[kind >= 0.6].mean() > 0.5  # and it does skip
    # the second test, of an element other than the minimum's: E = E_min + E' >= E_min + v_low of its word
    e_min = exponential_ref(rng.permutation(r)) * F32(0.125)
    key = y - log_ref(e_min + exponential_ref(r))
    t = np.where(kind < 0.2, key, key + above).astype(F32)
    skip = filter_above_skips_ref(e_min, r, y, m, t, device_error)
    assert not (skip & (key >= t)).any()
    assert skip[kind >= 0.6].mean() > 0.5


# ----------------------------------------------------------------------------- samples
@pytest.mark.parametrize("device", ["cpu", "host-built kernel", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale,shift,temperature", [(0.01, 0.0, 1.0), (30.0, 0.0, 1.0), (30.0, 0.0, 0.5),
                                                     (1.0, 2.0**13, 1.0), (1.0, -(2.0**14), 1.0),
                                                     (0.0, 2.0**14, 1.0), (1.0, 1e6, 1.0), (0.0, 1e30, 1.0)])
def test_samples_exact_at_every_logit_scale(request, device, dtype, scale, shift, temperature):
    """The filter changes no sample: tiny and wide spreads, logits around the filter's range limit
    (2^14, where keys round to 2^-9 and tie; in bf16 the logits themselves tie), huge ones (filter
    off, every key exact), -inf columns. The CUDA kernel's filter (per vector, lane and warp
    thresholds) runs on the host (see host_kernels below), and on the GPU with the device's exp2."""
    g = torch.Generator().manual_seed(7)
    logits = (shift + scale * torch.randn(40, 3001, generator=g, dtype=torch.float64)).to(dtype)
    logits[::7, ::3] = -float("inf")
    ids, pos = torch.zeros(4, 10, dtype=torch.long), torch.arange(40)
    if device == "host-built kernel":
        _, _, sampled, _ = host_op(request.getfixturevalue("host_kernels"), logits, ids, pos, temperature, 123, 4,
                                   False)
    else:
        _, _, sampled, _ = op(logits.to(device), ids.to(device), pos.to(device), temperature, 123, 4, False)
    np.testing.assert_array_equal(sampled.cpu().numpy(), samples_ref(logits, temperature, 123, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,vocab", [(64, 1), (300, 7), (40, 129), (3, 30522)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_bit_identical_to_numpy(dtype, n, vocab, temperature):
    g = torch.Generator().manual_seed(n * vocab)
    logits = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    ids = torch.randint(0, vocab, (n, 3), generator=g)
    pos = torch.randperm(3 * n, generator=g)[:n]
    _, _, sampled, _ = op(logits, ids, pos, temperature, 2**61 + 17, 5, False)
    np.testing.assert_array_equal(sampled.numpy(), samples_ref(logits, temperature, 2**61 + 17, 5))


def test_low_precision_logits_sample_like_their_fp32_values():
    logits = torch.randn(50, 1001).bfloat16()
    ids, pos = torch.zeros(5, 10, dtype=torch.long), torch.arange(50)
    a = op(logits, ids, pos, 1.0, 3, 0, True)
    b = op(logits.float(), ids, pos, 1.0, 3, 0, True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _chi_square_pvalue(counts, probs):
    n = counts.sum()
    expected = probs * n
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = len(counts) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("vocab", [7, 37, 64])
def test_sample_distribution_is_softmax(temperature, vocab):
    """7 columns: every octet spans rows (edge calls); 64: every octet is a whole one (row calls, two
    windows of the CUDA kernel's layout); 37: both. Logits spread so that every class is drawn often."""
    row = torch.linspace(-2.5, 2.0, vocab, dtype=torch.float64)[torch.randperm(vocab, generator=torch.Generator().manual_seed(vocab))]
    draws = 200_000 if vocab < 64 else 100_000
    logits = row.float().expand(draws, -1).contiguous()
    ids = torch.zeros(1, draws, dtype=torch.long)
    _, _, sampled, _ = op(logits, ids, torch.arange(draws), temperature, 99, int(temperature * 10), False)
    counts = torch.bincount(sampled, minlength=row.numel()).double()
    probs = torch.softmax(row.float().double() / temperature, 0)
    assert _chi_square_pvalue(counts, probs) > 1e-3, (counts / draws, probs)


def test_temperature_zero_is_argmax():
    logits = torch.randn(20, 30522)
    ids, pos = torch.zeros(4, 10, dtype=torch.long), torch.randperm(40)[:20]
    # tau < 2^-32 is the tau -> 0 limit too: logits / tau would overflow fp32 where 1/tau alone does not (3e-39)
    for temperature in (0.0, 1e-300, 3e-39, 1e-38, 1e-20, 2.0**-33):
        _, _, sampled, _ = op(logits, ids, pos, temperature, 1, 0, False)
        torch.testing.assert_close(sampled, torch.argmax(logits, dim=1))
    ties = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0]])
    assert op(ties, ids, pos[:1], 0.0, 1, 0, False)[2].item() == 1  # the first maximum


def test_labels_ids_and_untouched_positions():
    g = torch.Generator().manual_seed(0)
    vocab, (b, t) = 50, (4, 33)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    pos = torch.randperm(b * t, generator=g)[:40]
    logits = torch.randn(40, vocab, generator=g)
    logits[torch.arange(0, 40, 2), ids.view(-1)[pos[::2]]] += 30.0  # even rows: the original wins
    before = ids.clone()
    out, labels, sampled, lse = op(logits, ids, pos, 1.0, 8, 0, False)
    assert torch.equal(ids, before) and out.shape == ids.shape and labels.dtype == torch.bool
    assert lse.shape == (0,)
    flat_out, flat_lab, orig = out.view(-1), labels.view(-1), ids.view(-1)
    assert torch.equal(flat_out[pos], sampled)
    assert torch.equal(flat_lab[pos], sampled != orig[pos])
    assert not flat_lab[pos[::2]].any()  # the original may be sampled; then the label is False
    assert flat_lab[pos[1::2]].float().mean() > 0.8
    untouched = torch.ones(b * t, dtype=torch.bool)
    untouched[pos] = False
    assert torch.equal(flat_out[untouched], orig[untouched]) and not flat_lab[untouched].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lse_matches_torch(dtype):
    logits = (4 * torch.randn(30, 30522)).to(dtype)
    logits[3] = -float("inf")
    logits[4, 5] = float("inf")
    lse = op(logits, torch.zeros(3, 10, dtype=torch.long), torch.arange(30), 1.0, 0, 0, True)[3]
    assert lse.dtype == torch.float32 and lse.shape == (30,)
    torch.testing.assert_close(lse, torch.logsumexp(logits.float(), dim=1), rtol=1e-5, atol=1e-5)


def special_logits():
    """Rows of -inf, +inf, NaN (documented: NaN never wins, a row of NaN samples column 0)."""
    logits = torch.randn(6, 100)
    logits[0] = -float("inf")
    logits[1, 5] = float("inf")
    logits[2, 3] = float("nan")
    logits[3] = float("nan")
    logits[4] = -float("inf")
    logits[4, 77] = 0.0
    return logits


def test_special_values():
    logits = special_logits()
    _, _, sampled, lse = op(logits, torch.zeros(2, 3, dtype=torch.long), torch.arange(6), 1.0, 0, 0, True)
    assert sampled[:5].tolist() == [0, 5, sampled[2].item(), 0, 77] and sampled[2].item() != 3
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1), equal_nan=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_reference_follows_the_special_value_rule(temperature):
    """The eager path samples what the fused op does where the outcome does not depend on the noise:
    -inf rows and rows of NaN give 0, a lone +inf or finite value wins, a NaN never does."""
    logits = special_logits()
    ids, pos = torch.zeros(2, 3, dtype=torch.long), torch.arange(6)
    for backend in ("eager", "fused"):
        sampled = ops.replace_tokens(logits, ids, pos, temperature=temperature, seed=3, backend=backend)[2]
        assert sampled[[0, 1, 3, 4]].tolist() == [0, 5, 0, 77], backend
        assert sampled[2].item() != 3 and not (temperature == 0 and sampled[2] != logits[2].nan_to_num(-1e9).argmax())


def test_same_seed_same_result_other_seed_or_offset_differs():
    logits, ids, pos = torch.randn(64, 100), torch.zeros(8, 8, dtype=torch.long), torch.arange(64)
    a = op(logits, ids, pos, 1.0, 7, 0, False)[2]
    assert torch.equal(a, op(logits, ids, pos, 1.0, 7, 0, False)[2])
    assert (a != op(logits, ids, pos, 1.0, 8, 0, False)[2]).float().mean() > 0.5
    assert (a != op(logits, ids, pos, 1.0, 7, 1, False)[2]).float().mean() > 0.5
    assert (a != op(logits, ids, pos, 1.0, 2**32 + 7, 0, False)[2]).float().mean() > 0.5  # seed's high word


def test_empty_masked_set():
    ids = torch.randint(0, 9, (2, 5))
    out, labels, sampled, lse = op(torch.empty(0, 9), ids, torch.empty(0, dtype=torch.long), 1.0, 0, 0, True)
    assert torch.equal(out, ids) and not labels.any() and sampled.shape == (0,) and lse.shape == (0,)
    res = ops.replace_tokens(torch.empty(0, 9), ids, torch.empty(0, dtype=torch.long), seed=1, backend="fused")
    assert torch.equal(res[0], ids) and len(res) == 3


def test_wrapper_dispatches_to_the_op():
    logits, ids, pos = torch.randn(6, 11), torch.randint(0, 11, (2, 5)), torch.tensor([0, 2, 4, 6, 8, 9])
    got = ops.replace_tokens(logits, ids, pos, temperature=0.9, seed=4, offset=2, return_lse=True, backend="fused")
    want = op(logits, ids, pos, 0.9, 4, 2, True)
    assert len(got) == 4 and all(torch.equal(x, y) for x, y in zip(got, want))


# ----------------------------------------------------------------------------- the seed tensor
def test_tensor_seed_gives_the_int_seeds_samples():
    logits, ids, pos = torch.randn(40, 257), torch.randint(0, 257, (4, 10)), torch.randperm(40)
    for value in (0, 12345, 2**62 + 5, -3):
        want = op(logits, ids, pos, 1.0, value, 4, True)
        got = torch.ops.fastelectra.replace_tokens(logits, ids, pos, 1.0, torch.tensor([value]), 4, True)
        assert all(torch.equal(x, y) for x, y in zip(got, want))
        for seed in (value, torch.tensor([value]), torch.tensor(value), torch.tensor([[value]], dtype=torch.int64)):
            res = ops.replace_tokens(logits, ids, pos, seed=seed, offset=4, return_lse=True, backend="fused")
            assert all(torch.equal(x, y) for x, y in zip(res, want))
        # the eager reference: its own draws, but the same ones for an int and a tensor seed
        ref_int = ops.replace_tokens(logits, ids, pos, seed=value, offset=4, backend="eager")
        ref_tensor = ops.replace_tokens(logits, ids, pos, seed=torch.tensor([value]), offset=4, backend="eager")
        assert all(torch.equal(x, y) for x, y in zip(ref_int, ref_tensor))
    assert torch.equal(noise(torch.empty(3, 9), 77, 1), torch.ops.fastelectra.gumbel_noise(
        torch.empty(3, 9), torch.tensor([77]), 1))


def test_seed_tensor_is_read_when_the_op_runs():
    """The op reads the seed's value at each call, so changing it in place changes the samples."""
    logits, ids, pos = torch.randn(64, 100), torch.zeros(8, 8, dtype=torch.long), torch.arange(64)
    seed = torch.tensor([5])
    a = torch.ops.fastelectra.replace_tokens(logits, ids, pos, 1.0, seed, 0, False)[2]
    seed.fill_(6)
    b = torch.ops.fastelectra.replace_tokens(logits, ids, pos, 1.0, seed, 0, False)[2]
    assert torch.equal(b, op(logits, ids, pos, 1.0, 6, 0, False)[2]) and (a != b).float().mean() > 0.5


@pytest.mark.parametrize("backend", ["fused", "eager"])
def test_seed_none_follows_torch_manual_seed(backend):
    logits, ids, pos = torch.randn(64, 100), torch.zeros(8, 8, dtype=torch.long), torch.arange(64)
    torch.manual_seed(0)
    a = ops.replace_tokens(logits, ids, pos, backend=backend)[2]
    b = ops.replace_tokens(logits, ids, pos, backend=backend)[2]
    torch.manual_seed(0)
    assert torch.equal(a, ops.replace_tokens(logits, ids, pos, backend=backend)[2])
    assert (a != b).float().mean() > 0.5  # the generator moved on: a fresh seed per call


@pytest.mark.parametrize("seed", [torch.tensor([1.0]), torch.tensor([1, 2]), torch.tensor([1], dtype=torch.int32),
                                  torch.empty(0, dtype=torch.long)])
def test_bad_seed_tensor_is_a_clear_error_of_the_op(seed):
    logits, ids, pos = torch.randn(3, 10), torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 5, 7])
    with pytest.raises(RuntimeError, match="replace_tokens: seed must be an int64 tensor with one element"):
        torch.ops.fastelectra.replace_tokens(logits, ids, pos, 1.0, seed, 0, False)
    with pytest.raises(RuntimeError, match="gumbel_noise: seed must be an int64 tensor with one element"):
        torch.ops.fastelectra.gumbel_noise(logits, seed, 0)


@pytest.mark.parametrize("backend", ["fused", "eager"])
@pytest.mark.parametrize("seed,exc", [(torch.tensor([1.0]), TypeError), (torch.tensor([1, 2]), TypeError),
                                      (torch.tensor([True]), TypeError), (1.5, TypeError), ("7", TypeError),
                                      (2**64, ValueError)])
def test_bad_seed_is_a_clear_error_of_the_wrapper(backend, seed, exc):
    logits, ids, pos = torch.randn(3, 10), torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 5, 7])
    with pytest.raises(exc, match="^seed "):
        ops.replace_tokens(logits, ids, pos, seed=seed, backend=backend)


# ----------------------------------------------------------------------------- registration
@pytest.mark.parametrize("return_lse", [False, True])
def test_opcheck(return_lse):
    logits = torch.randn(5, 13, dtype=torch.bfloat16)
    seed = torch.tensor([3])
    args = (logits, torch.randint(0, 13, (2, 4)), torch.tensor([7, 0, 3, 5, 1]), 1.0, seed, 0, return_lse)
    torch.library.opcheck(torch.ops.fastelectra.replace_tokens.default, args)
    torch.library.opcheck(torch.ops.fastelectra.gumbel_noise.default, (logits, seed, 1))


def test_torch_compile_fullgraph_traces_the_op():
    def step(logits, ids, pos, seed):
        out, labels, sampled, lse = ops.replace_tokens(logits * 2.0, ids, pos, temperature=1.0, seed=seed,
                                                       return_lse=True, backend="fused")
        return out + 1, labels, lse.sum()

    logits, ids, pos = torch.randn(6, 17), torch.randint(0, 17, (3, 4)), torch.tensor([0, 3, 4, 7, 9, 11])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for seed in (5, torch.tensor([5])):
        for x, y in zip(compiled(logits, ids, pos, seed), step(logits, ids, pos, seed)):
            torch.testing.assert_close(x, y)
    torch.manual_seed(1)  # seed None: drawn inside the graph from torch's generator
    drawn = compiled(logits, ids, pos, None)
    torch.manual_seed(1)
    for x, y in zip(drawn, step(logits, ids, pos, None)):
        torch.testing.assert_close(x, y)


# ----------------------------------------------------------------------------- errors
def _args(**override):
    args = dict(logits=torch.randn(3, 10), input_ids=torch.zeros(2, 4, dtype=torch.long),
                masked_positions=torch.tensor([0, 5, 7]), temperature=1.0, seed=0, offset=0, return_lse=False)
    args.update(override)
    return tuple(args.values())


# argument errors the op raises on every device (the messages carry the offending numbers and shapes)
BAD_ARGS = [
    (dict(logits=torch.randn(3, 10).long()), "logits must be float32, float16 or bfloat16, got Long"),
    (dict(logits=torch.randn(3, 10, 1)), r"logits must be 2-D .*got shape \[3, 10, 1\]"),
    (dict(logits=torch.randn(10, 3).t()), r"logits must be contiguous .*got strides \[1, 3\]"),
    (dict(logits=torch.randn(3, 20)[:, ::2]), r"logits must be contiguous .*got strides \[20, 2\]"),
    (dict(logits=torch.randn(3, 0)), "empty vocabulary"),
    (dict(input_ids=torch.zeros(2, 4, dtype=torch.int32)),
     r"input_ids must be an int64 tensor .*got Int of shape \[2, 4\]"),
    (dict(input_ids=torch.zeros(8, dtype=torch.long)), r"input_ids must be an int64 tensor of shape .*\[8\]"),
    (dict(masked_positions=torch.tensor([0, 5, 7], dtype=torch.int32)), "masked_positions must be a 1-D int64"),
    (dict(masked_positions=torch.tensor([0, 5])), "masked_positions has 2 entries but logits has 3 rows"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1$"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
]


@pytest.mark.parametrize("override,message", BAD_ARGS + [   # and the data checks of the CPU op
    (dict(masked_positions=torch.tensor([0, 5, 8])), r"masked_positions\[2\] = 8 is out of range .* 8 elements"),
    (dict(masked_positions=torch.tensor([0, -1, 7])), r"masked_positions\[1\] = -1 is out of range"),
    (dict(input_ids=torch.full((2, 4), 10)),
     r"input_ids contains 10 \(flat index 0\), outside \[0, vocab_size=10\)"),
    (dict(input_ids=torch.full((2, 4), -2)), "input_ids contains -2"),
])
def test_bad_input_raises_a_clear_error(override, message):
    with pytest.raises(RuntimeError, match=message):
        op(*_args(**override))


def test_torch_compile_gets_contiguous_logits():
    """Inductor pads the rows of a wide matmul output; the tag makes it hand the op contiguous logits."""
    assert torch.Tag.needs_contiguous_strides in torch.ops.fastelectra.replace_tokens.default.tags


def test_device_mix_is_rejected_by_the_wrapper():
    with pytest.raises(ValueError, match="input_ids is on meta but logits is on cpu"):
        ops.replace_tokens(torch.randn(3, 10), torch.zeros(2, 4, dtype=torch.long, device="meta"),
                           torch.tensor([0, 5, 7]), seed=0, backend="fused")


# ----------------------------------------------------------------------------- CUDA source
# shared memory per SM (KB) of the architectures whose ring sizes differ: T4 (no cp.async: a ring of one
# step), A100 (4 KB per warp), H100 (8 KB)
_SHARED_KB_PER_SM = {"sm_75": 64, "sm_80": 164, "sm_90": 228}


def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    """Without warnings for each ring size, and 5 blocks of every variant fit an SM's shared memory (the 20
    rows per SM that the register cap is made for; 1 KB per block is the system's from sm_80 on)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in _SHARED_KB_PER_SM]
    cmd = [nvcc, "-c", *gencode, "-O3", "-std=c++17", "-Xptxas", "-v", "-I", CSRC,
           os.path.join(CSRC, "replace_tokens_kernel.cu"), "-o", str(tmp_path / "replace_tokens_kernel.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr.lower(), res.stderr
    shared, arch = {}, None
    for line in res.stderr.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if entry:
            arch = entry.group(2) if "replace_tokens_kernel" in entry.group(1) else None
        used = re.search(r"(\d+) bytes smem", line)
        if used and arch is not None:
            shared.setdefault(arch, []).append(int(used.group(1)))
            arch = None
    assert sorted(shared) == sorted(_SHARED_KB_PER_SM) and all(len(v) == 18 for v in shared.values()), shared
    for a, per_block in shared.items():
        reserved = 0 if a == "sm_75" else 1024
        assert 5 * (max(per_block) + reserved) <= _SHARED_KB_PER_SM[a] * 1024, (a, per_block)


# ----------------------------------------------------------------------------- CUDA kernel on the host
# csrc/replace_tokens_kernel.cu compiled by g++ with tests/cuda_host/ standing in for CUDA's headers:
# the kernels run on the CPU, each warp's 32 lanes as fibers with real shuffle semantics, so the
# kernel's own logic (vector loop and row edges, Philox counters per vector, noise filter with lane
# and warp thresholds, warp reductions, invalid rows) is checked here against the CPU op, without a
# GPU. Lanes that diverge at a shuffle, a 16-byte load that is misaligned or outside the logits, fail
# the launch. Timing, registers and the device's exp2 are not modelled: the `gpu` tests below are.
CUDA_HOST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_host")
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # replace_tokens_cuda.h's LogitsDtype
_GUARD = 8  # elements of canary before and after every output the kernel writes


def _build_host_kernels(tmp_path_factory, *defines):
    """csrc/replace_tokens_kernel.cu built for the host (tests/cuda_host/), behind ctypes."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA kernel for the host")
    lib_path = str(tmp_path_factory.mktemp("cuda_host") / "replace_tokens_host.so")
    # -ffp-contract=off as for the CPU op (csrc/philox.h); the kernel's fp16 unpack type-puns
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared",
           "-Wno-unknown-pragmas", *(f"-D{d}" for d in defines), "-I", CUDA_HOST, "-I", CSRC,
           os.path.join(CUDA_HOST, "replace_tokens_host.cpp"), "-o", lib_path]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(lib_path)
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.fe_host_replace_tokens.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr,
                                           ctypes.c_float, ctypes.c_int, ptr, ctypes.c_uint64, ctypes.c_char_p,
                                           ctypes.c_int]
    lib.fe_host_gumbel_noise.argtypes = [ptr, i64, i64, ptr, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_int]
    return lib


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """The kernel as sm_90 builds it (an 8 KB ring of steps per warp)."""
    return _build_host_kernels(tmp_path_factory)


@pytest.fixture(scope="module")
def host_kernels_4k(tmp_path_factory):
    """The kernel with the 4 KB ring that sm_80, sm_86, sm_89 and sm_120 build (4 steps of 16-bit logits, 2 of fp32)."""
    return _build_host_kernels(tmp_path_factory, "FE_REPLACE_RING_BYTES=4096")


@pytest.fixture(scope="module")
def host_kernels_2k(tmp_path_factory):
    """A 2 KB ring: 2 steps of 16-bit logits, 1 of fp32 (the depth that GPUs before sm_80 build)."""
    return _build_host_kernels(tmp_path_factory, "FE_REPLACE_RING_BYTES=2048")


def _guarded(like, fill):
    """(buffer, interior view): `like`'s shape and dtype inside _GUARD canary elements on each side."""
    buf = torch.full((like.numel() + 2 * _GUARD,), fill, dtype=like.dtype)
    inner = buf[_GUARD:_GUARD + like.numel()]
    return buf, inner


def _canaries_intact(buf, fill):
    return bool((buf[:_GUARD] == fill).all() and (buf[-_GUARD:] == fill).all())


def host_op(lib, logits, input_ids, masked_positions, temperature, seed, offset, return_lse):
    """What the CUDA binding does around the kernel (outputs prepared, 1/tau as inverse_temperature),
    with the host-built kernel; the outputs of op(), and every canary checked."""
    n, vocab = logits.shape
    # inputs inside canaries too: ids of 0 just outside input_ids (a valid id: a read there would be
    # used), positions that point into it
    _, ids_in = _guarded(input_ids, 0)
    ids_in.copy_(input_ids.reshape(-1))
    _, positions = _guarded(masked_positions, 0)
    positions.copy_(masked_positions)
    inv = np.float32(1.0 / temperature) if temperature > 0 else np.float32(np.inf)
    noise_on = bool(temperature > 0 and 1.0 / temperature <= 2.0**32)     # csrc's kMaxInverseTemperature
    ids_buf, out_ids = _guarded(input_ids, -7)
    out_ids.copy_(input_ids.reshape(-1))
    labels_buf, labels = _guarded(input_ids.to(torch.bool), True)
    labels.fill_(False)
    sampled_buf, sampled = _guarded(torch.empty(n, dtype=torch.long), -7)
    lse_buf, lse = _guarded(torch.empty(n if return_lse else 0), -7.0)
    seed_t = torch.tensor([seed], dtype=torch.long)
    err = ctypes.create_string_buffer(512)
    rc = lib.fe_host_replace_tokens(logits.data_ptr(), _DTYPE_CODES[logits.dtype], n, vocab, ids_in.data_ptr(),
                                    input_ids.numel(), positions.data_ptr(), out_ids.data_ptr(),
                                    labels.data_ptr(), sampled.data_ptr(), lse.data_ptr() if return_lse else None,
                                    float(inv) if noise_on else 1.0, int(noise_on), seed_t.data_ptr(), offset % 2**64,
                                    err, len(err))
    assert rc == 0, err.value.decode()
    for buf, fill in ((ids_buf, -7), (labels_buf, True), (sampled_buf, -7), (lse_buf, -7.0)):
        assert _canaries_intact(buf, fill), "the kernel wrote outside an output"
    return out_ids.view(input_ids.shape), labels.view(input_ids.shape), sampled, lse


def _assert_same(host, cpu):
    """ids, labels and samples bit for bit; the lse to the host exp2's error (philox.h's fast_exp2 fit,
    3e-6 relative, which the host build sums where the device sums MUFU.EX2's results)."""
    for name, h, c in zip(("ids", "labels", "sampled"), host[:3], cpu[:3]):
        assert torch.equal(h, c), name
    torch.testing.assert_close(host[3], cpu[3], rtol=2e-6, atol=5e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,vocab,temperature,return_lse", [
    (37, 7, 0.5, True), (64, 1, 1.0, True), (33, 129, 2.0, False), (30, 30522, 0.0, True), (9, 30522, 0.0, False),
    (5, 8193, 1.0, True), (97, 30522, 1.0, True), (13, 30522, 1.0, False), (6, 4099, 0.7, True)])
def test_cuda_kernel_on_the_host_matches_cpu_bit_for_bit(host_kernels, dtype, n, vocab, temperature, return_lse):
    """Every kernel variant (dtype, noise, lse, tau = 1): rows shorter than a vector, rows whose vectors
    start mid-row (odd V: head and tail elements), several steps per row, several blocks."""
    g = torch.Generator().manual_seed(vocab + n)
    logits = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    ids = torch.randint(0, vocab, (n, 4), generator=g)
    pos = torch.randperm(4 * n, generator=g)[:n]
    _assert_same(host_op(host_kernels, logits, ids, pos, temperature, 2**62 - 3, 11, return_lse),
                 op(logits, ids, pos, temperature, 2**62 - 3, 11, return_lse))


@pytest.mark.parametrize("ring", ["8 KB", "4 KB", "2 KB"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [301, 4103, 16411])
def test_cuda_kernel_on_the_host_ring_of_steps(request, ring, dtype, vocab):
    """The kernel copies its steps into a shared-memory ring (cp.async) ring - 1 steps ahead (8 KB: 8 steps
    of 16-bit logits, 4 of fp32; 4 KB: 4 and 2; 2 KB: 2 and 1): rows shorter than the ring, rows that wrap
    it once and many times. The host build leaves a copy's destination NaN until its wait retires it, so a
    step read before its copy landed changes the lse, and a slot copied over before it was read changes
    the samples."""
    host_kernels = request.getfixturevalue({"8 KB": "host_kernels", "4 KB": "host_kernels_4k",
                                            "2 KB": "host_kernels_2k"}[ring])
    g = torch.Generator().manual_seed(vocab)
    n = 6
    logits = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    ids = torch.randint(0, vocab, (n, 2), generator=g)
    pos = torch.randperm(2 * n, generator=g)[:n]
    for temperature in (1.0, 0.0):
        _assert_same(host_op(host_kernels, logits, ids, pos, temperature, 77, 2, True),
                     op(logits, ids, pos, temperature, 77, 2, True))


def _survivor_queue_rows(dtype):
    """Rows whose logits rise along the row, rise in jumps, fall, or are random (and each reversed)."""
    vocab = 4099
    col = torch.arange(vocab, dtype=torch.float64)
    g = torch.Generator().manual_seed(17)
    rows = [0.05 * col, 6.0 * torch.floor(col / 700), 6.0 * torch.floor(col / 2100) + 0.01 * torch.randn(vocab, generator=g,
            dtype=torch.float64), -0.05 * col, 3 * torch.randn(vocab, generator=g, dtype=torch.float64),
            torch.where(col % 512 < 256, 0.0, 4.0) + 0.02 * col]
    logits = torch.stack(rows + [r.flip(0) for r in rows]).to(dtype)
    n = logits.shape[0]
    ids = torch.randint(0, vocab, (n, 2), generator=g)
    return logits, ids, torch.randperm(2 * n, generator=g)[:n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cuda_kernel_on_the_host_survivor_queue_extremes(host_kernels, dtype, temperature):
    """The kernel queues the vectors that pass its filter and settles them a batch at a time: rows whose
    logits rise along the row (every vector of a step passes, so a lane settles two or more entries of a
    batch), rise in jumps between plateaus (a few pass, then all: the queue near its capacity), fall
    (almost none pass after the first steps), or are random."""
    logits, ids, pos = _survivor_queue_rows(dtype)
    _assert_same(host_op(host_kernels, logits, ids, pos, temperature, 99, 3, True),
                 op(logits, ids, pos, temperature, 99, 3, True))


@pytest.mark.parametrize("dtype,shift", [(torch.bfloat16, 1), (torch.float16, 3), (torch.float32, 1)])
def test_cuda_kernel_on_the_host_unaligned_logits(host_kernels, dtype, shift):
    """Logits that do not start on 16 bytes take the element path for every row."""
    base = (3 * torch.randn(7 * 1001 + shift, generator=torch.Generator().manual_seed(shift))).to(dtype)
    logits = base[shift:].view(7, 1001)
    assert logits.data_ptr() % 16 != 0
    ids, pos = torch.randint(0, 1001, (3, 3), generator=torch.Generator().manual_seed(1)), torch.arange(7)
    _assert_same(host_op(host_kernels, logits, ids, pos, 1.0, 5, 0, True), op(logits, ids, pos, 1.0, 5, 0, True))


def test_cuda_kernel_on_the_host_flags_invalid_rows_and_matches_special_values(host_kernels):
    logits = torch.randn(3, 10)
    ids = torch.zeros(2, 4, dtype=torch.long)
    ids[0, 1] = 10  # original id >= V at position 1
    out, labels, sampled, _ = host_op(host_kernels, logits, ids, torch.tensor([1, 99, 6]), 1.0, 0, 0, False)
    assert sampled[:2].tolist() == [-1, -1] and sampled[2].item() >= 0
    assert out.view(-1)[1].item() == 10 and not labels.view(-1)[:6].any()
    assert torch.equal(out.view(-1)[:6], ids.view(-1)[:6])
    out, labels, sampled, _ = host_op(host_kernels, logits, ids, torch.tensor([-1, 3, 2]), 1.0, 0, 0, False)
    assert sampled[0].item() == -1 and sampled[1:].ge(0).all()
    special, ids, pos = special_logits(), torch.zeros(2, 3, dtype=torch.long), torch.arange(6)
    _assert_same(host_op(host_kernels, special, ids, pos, 1.0, 0, 0, True), op(special, ids, pos, 1.0, 0, 0, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature,return_lse", [(1.0, True), (1.0, False), (0.5, True), (0.0, False)])
def test_cuda_kernel_on_the_host_special_values_inside_vectors(host_kernels, dtype, temperature, return_lse):
    """NaN, +-inf and signed zeros next to finite logits in the same 16-byte vector, in every dtype: the
    kernel takes a vector's max packed (16-bit pairs) before it unpacks and filters the vector on it, so
    the CPU op's samples must come out whatever that max makes of NaN (a NaN max only lets the whole
    vector through to the exact per-element test), and -0 ties with +0 (the lower column wins). Rows
    9.. hold NaN in most vectors."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(25, 203, generator=g)
    logits[9:] = logits[9:].masked_fill(torch.rand(16, 203, generator=g) < 0.3, float("nan"))  # most vectors
    logits[0, 8:16] = float("nan")                      # a whole vector of NaN
    logits[1, 9] = float("nan")                         # NaN beside the row's largest logit
    logits[1, 10] = 50.0
    logits[2] = float("nan")
    logits[2, 100:108] = torch.tensor([-0.0, 0.0, float("nan"), -0.0, float("nan"), 0.0, -0.0, 0.0])
    logits[3] = -float("inf")
    logits[3, 17] = -0.0
    logits[3, 19] = 0.0                                 # ties with column 17 under argmax
    logits[4, ::2] = float("nan")
    logits[5, 40:48] = float("inf")
    logits[5, 44] = float("nan")
    logits[6] = -float("inf")
    logits[6, 5::16] = float("nan")
    logits[7, 120:128] = torch.tensor([-float("inf"), float("nan")] * 4)
    logits[8] = float("nan")
    logits[8, 202] = -float("inf")                      # one -inf in the row's tail, every other NaN
    logits = logits.to(dtype)
    ids, pos = torch.randint(0, 203, (5, 6), generator=g), torch.randperm(30, generator=g)[:25]
    _assert_same(host_op(host_kernels, logits, ids, pos, temperature, 3, 1, return_lse),
                 op(logits, ids, pos, temperature, 3, 1, return_lse))


def test_cuda_noise_kernel_on_the_host_matches_cpu_bit_for_bit(host_kernels):
    for shape, seed, offset in (((7, 30522), 2**62 - 1, 3), ((3, 5), 1, 2**40 + 1)):
        out = torch.empty(shape)
        seed_t = torch.tensor([seed])
        err = ctypes.create_string_buffer(256)
        assert host_kernels.fe_host_gumbel_noise(out.data_ptr(), *shape, seed_t.data_ptr(), offset, err, 256) == 0, \
            err.value.decode()
        assert torch.equal(out.view(torch.int32), noise(torch.empty(shape), seed, offset).view(torch.int32))


# ----------------------------------------------------------------------------- GPU
def _assert_cuda_matches_cpu(logits, ids, pos, temperature, seed, offset):
    """The op on CUDA against the CPU op (with the lse): ids, labels and samples bit for bit."""
    cpu = op(logits, ids, pos, temperature, seed, offset, True)
    gpu = op(logits.cuda(), ids.cuda(), pos.cuda(), temperature, seed, offset, True)
    for name, c, d in zip(("ids", "labels", "sampled"), cpu[:3], gpu[:3]):
        assert torch.equal(c, d.cpu()), name
    torch.testing.assert_close(gpu[3].cpu(), cpu[3], rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cuda_survivor_queue_extremes_match_cpu(dtype, temperature):
    """The survivor queue's extremes (see the host-built test) on the device, where lanes need not run
    in lockstep."""
    _assert_cuda_matches_cpu(*_survivor_queue_rows(dtype), temperature, 99, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,vocab,temperature", [(2500, 30522, 1.0), (37, 7, 0.5), (64, 1, 1.0), (33, 129, 2.0),
                                                 (300, 30522, 0.0), (5, 8193, 1.0)])
def test_cuda_matches_cpu_bit_for_bit(dtype, n, vocab, temperature):
    g = torch.Generator().manual_seed(vocab + n)
    logits = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    ids = torch.randint(0, vocab, (n, 4), generator=g)
    pos = torch.randperm(4 * n, generator=g)[:n]
    _assert_cuda_matches_cpu(logits, ids, pos, temperature, 2**62 - 3, 11)


@pytest.mark.gpu
def test_cuda_noise_matches_cpu_bit_for_bit():
    like = torch.empty(7, 30522)
    cpu = noise(like, 2**62 - 1, 3)
    gpu = noise(like.cuda(), 2**62 - 1, 3)
    assert torch.equal(cpu.view(torch.int32), gpu.cpu().view(torch.int32))


@pytest.mark.gpu
def test_cuda_unaligned_logits_and_stream():
    base = torch.randn(9 * 1001 + 1, device="cuda").bfloat16()
    logits = base[1:].view(9, 1001)  # 2-byte offset: not 16-byte aligned, element-by-element path
    assert logits.data_ptr() % 16 != 0
    ids, pos = torch.randint(0, 1001, (3, 3), device="cuda"), torch.arange(9, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gpu = op(logits, ids, pos, 1.0, 5, 0, True)
    stream.synchronize()
    cpu = op(logits.cpu(), ids.cpu(), pos.cpu(), 1.0, 5, 0, True)
    assert torch.equal(gpu[2].cpu(), cpu[2])
    torch.testing.assert_close(gpu[3].cpu(), cpu[3], rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
def test_cuda_flags_invalid_rows_without_crashing():
    logits = torch.randn(3, 10, device="cuda")
    ids = torch.zeros(2, 4, dtype=torch.long, device="cuda")
    ids[0, 1] = 10  # original id >= V at position 1
    out, labels, sampled, _ = op(logits, ids, torch.tensor([1, 99, 6], device="cuda"), 1.0, 0, 0, False)
    assert sampled[:2].tolist() == [-1, -1] and sampled[2].item() >= 0
    assert out.view(-1)[1].item() == 10 and not labels.view(-1)[:6].any()
    torch.cuda.synchronize()  # the context is still healthy


@pytest.mark.gpu
@pytest.mark.parametrize("override,message", BAD_ARGS)
def test_cuda_bad_input_raises_a_clear_error(override, message):
    """The CUDA build formats the same messages: where the toolchain linked its own libstdc++ into
    the extension, streaming a number into TORCH_CHECK's message crashed (a segfault, not an error)."""
    # the same strides on the GPU (.cuda() would make a tensor with gaps contiguous)
    args = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda").copy_(a)
            if isinstance(a, torch.Tensor) else a for a in _args(**override)]
    with pytest.raises(RuntimeError, match=message):
        op(*args)


@pytest.mark.gpu
def test_cuda_device_mix_is_rejected():
    with pytest.raises(RuntimeError, match="must be on one device"):
        op(torch.randn(3, 10, device="cuda"), torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 5, 7]),
           1.0, 0, 0, False)


@pytest.mark.gpu
def test_cuda_special_values_and_empty_set_match_cpu():
    logits, ids, pos = special_logits(), torch.zeros(2, 3, dtype=torch.long), torch.arange(6)
    cpu = op(logits, ids, pos, 1.0, 0, 0, True)
    gpu = op(logits.cuda(), ids.cuda(), pos.cuda(), 1.0, 0, 0, True)
    assert torch.equal(cpu[2], gpu[2].cpu())
    torch.testing.assert_close(gpu[3].cpu(), cpu[3], equal_nan=True, rtol=2e-6, atol=2e-6)
    out, labels, sampled, lse = op(torch.empty(0, 9, device="cuda"), ids.cuda(),
                                   torch.empty(0, dtype=torch.long, device="cuda"), 1.0, 0, 0, True)
    assert torch.equal(out, ids.cuda()) and not labels.any() and sampled.numel() == 0 and lse.numel() == 0


@pytest.mark.gpu
def test_cuda_opcheck():
    logits = torch.randn(5, 13, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([3], device="cuda")
    args = (logits, torch.randint(0, 13, (2, 4), device="cuda"), torch.tensor([7, 0, 3, 5, 1], device="cuda"),
            1.0, seed, 0, True)
    torch.library.opcheck(torch.ops.fastelectra.replace_tokens.default, args)
    torch.library.opcheck(torch.ops.fastelectra.gumbel_noise.default, (logits, seed, 1))


@pytest.mark.gpu
def test_cuda_seed_on_another_device_is_rejected():
    logits, ids, pos = (torch.randn(3, 10, device="cuda"), torch.zeros(2, 4, dtype=torch.long, device="cuda"),
                        torch.tensor([0, 5, 7], device="cuda"))
    with pytest.raises(RuntimeError, match=r"replace_tokens: seed must be on the device of logits \(cuda:0\), "
                                           "got seed on cpu"):
        torch.ops.fastelectra.replace_tokens(logits, ids, pos, 1.0, torch.tensor([1]), 0, False)
    with pytest.raises(RuntimeError, match="gumbel_noise: seed must be on the device of logits"):
        torch.ops.fastelectra.gumbel_noise(logits, torch.tensor([1]), 0)


@pytest.mark.gpu
def test_cuda_graph_replays_read_the_seed_tensor():
    """Captured once, the op keys every replay with the seed tensor's value at that replay (no host
    copy of the seed); with seed None the wrapper draws a fresh seed inside the graph per replay."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(64, 1000, generator=g)).bfloat16()
    ids = torch.randint(0, 1000, (8, 16), generator=g)
    pos = torch.randperm(128, generator=g)[:64]
    dev = [t.cuda() for t in (logits, ids, pos)]
    seed = torch.zeros(1, dtype=torch.long, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        op(*dev, 1.0, seed, 3, True)
        ops.replace_tokens(*dev, backend="fused")
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = op(*dev, 1.0, seed, 3, True)
    for value in (7, 2**62 - 1):
        seed.fill_(value)
        graph.replay()
        want = op(logits, ids, pos, 1.0, value, 3, True)
        for name, c, d in zip(("ids", "labels", "sampled"), want[:3], captured[:3]):
            assert torch.equal(c, d.cpu()), (name, value)

    fresh = torch.cuda.CUDAGraph()
    with torch.cuda.graph(fresh):
        drawn = ops.replace_tokens(*dev, backend="fused")[2]
    fresh.replay()
    first = drawn.cpu()
    fresh.replay()
    assert (first != drawn.cpu()).float().mean() > 0.5

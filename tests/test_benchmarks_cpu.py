"""pytest-benchmark cases for what runs on a CPU: replace_tokens (the _C CPU op vs its torch reference),
the layer-norm reference, and one training step of the tiny preset (backend eager).

Each case is timed over a few rounds only (the suite stays quick) and checks what it timed.
"""
import math

import pytest
import torch

from benchmarks.bench_pretrain import fastelectra_step, make_batch, training_step
from fastelectra import ops
from fastelectra.config import ElectraConfig

# the `benchmark` fixture comes from pytest-benchmark, part of the `test` extra the test command installs

ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)
N, V = 256, 4096                    # masked rows x vocab


@pytest.fixture(scope="module")
def replace_inputs():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(N, V, generator=g)
    ids = torch.randint(0, V, (16, 128), generator=g)
    positions = torch.randperm(ids.numel(), generator=g)[:N]
    return logits, ids, positions


@pytest.mark.benchmark(group="replace_tokens 256x4096 fp32")
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_replace_tokens(benchmark, replace_inputs, impl, request):
    logits, ids, positions = replace_inputs
    if impl == "fused":
        request.getfixturevalue("extension_built")
        fn = ops.replace_tokens
    else:
        fn = ops.replace_tokens_reference
    out, labels, sampled = benchmark.pedantic(fn, (logits, ids, positions), dict(temperature=1.0, seed=1234),
                                              **ROUNDS)

    assert out.shape == labels.shape == ids.shape and sampled.shape == (N,)
    assert torch.equal(out.view(-1)[positions], sampled)
    untouched = torch.ones(ids.numel(), dtype=torch.bool)
    untouched[positions] = False
    assert torch.equal(out.view(-1)[untouched], ids.view(-1)[untouched])
    assert torch.equal(labels, out != ids)
    # Gumbel-max samples softmax(logits): the mean sampled logit is E_p[logit] within 4 standard errors
    p = logits.softmax(-1)
    expected = (p * logits).sum(-1)
    var = (p * logits.square()).sum(-1) - expected.square()
    mean_sampled = logits.gather(1, sampled[:, None]).squeeze(1).mean()
    assert abs(float(mean_sampled - expected.mean())) < 4 * math.sqrt(float(var.sum())) / N


@pytest.mark.benchmark(group="layer norm 2048x768 fp32")
def test_layer_norm_reference(benchmark):
    g = torch.Generator().manual_seed(0)
    x, residual = torch.randn(2, 2048, 768, generator=g).unbind(0)
    weight, bias = 1 + 0.1 * torch.randn(768, generator=g), 0.1 * torch.randn(768, generator=g)
    y = benchmark.pedantic(ops.layer_norm_reference, (x, weight, bias, 1e-12), dict(residual=residual), **ROUNDS)

    h = (x + residual).double()
    expected = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-12).sqrt()
    torch.testing.assert_close(y, (expected * weight.double() + bias.double()).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.benchmark(group="pretraining step, tiny preset, B8 T64")
def test_tiny_pretraining_step(benchmark, one_thread):
    torch.manual_seed(0)
    cfg = ElectraConfig.preset("tiny", backend="eager")
    model, loss_fn = fastelectra_step(cfg, "eager", False, torch.device("cpu"))
    ids, mask = make_batch(cfg, 8, 64, padded=True, device="cpu")
    before = [p.detach().clone() for p in model.parameters()]
    step = training_step(model, loss_fn, ids, mask, torch.float32)
    first = step()
    loss = benchmark.pedantic(step, **ROUNDS)

    # at initialisation both heads are near uniform: MLM loss ~ ln V, RTD loss ~ ln 2 (weight 50)
    assert first.dim() == 0 and abs(float(first) - (math.log(cfg.vocab_size) + 50 * math.log(2))) < 2
    assert math.isfinite(float(loss)) and float(loss) < float(first)      # the same batch, five steps later
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()) if b.requires_grad)


def test_add_speedups_compares_only_timed_rows_of_the_same_case():
    from benchmarks.common import add_speedups

    rows = [dict(case=1, contender="ours", ms=2.0), dict(case=1, contender="a", ms=4.0),
            dict(case=1, contender="copy", ms=1.0), dict(case=2, contender="a", ms=9.0),
            dict(case=2, contender="ours", skipped="OOM"), dict(case=1, contender="b", skipped="OOM")]
    add_speedups(rows, lambda r: r["case"], lambda r: r["contender"] == "ours", lambda r: r["contender"] == "a")
    assert rows[0]["speedup"] == {"a": 2.0}
    assert all("speedup" not in r for r in rows[1:])


def test_profile_counts_kernels_not_the_device_spans_of_annotations():
    from types import SimpleNamespace

    from benchmarks.profile_step import kernel_events

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [SimpleNamespace(key="Optimizer.step#AdamW.step", device_type=cpu, is_user_annotation=True),
              SimpleNamespace(key="Optimizer.step#AdamW.step", device_type=cuda, is_user_annotation=False),
              SimpleNamespace(key="multi_tensor_apply_kernel", device_type=cuda, is_user_annotation=False),
              SimpleNamespace(key="aten::add", device_type=cpu, is_user_annotation=False),
              SimpleNamespace(key="_attn_fwd_kernel", device_type=cuda)]
    assert [e.key for e in kernel_events(events)] == ["multi_tensor_apply_kernel", "_attn_fwd_kernel"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("step"):
            torch.ones(3).add_(1)
    assert any(e.key == "step" for e in prof.key_averages() if getattr(e, "is_user_annotation", False)), \
        "torch no longer flags record_function ranges: kernel_events would count their device spans"


def test_until_interrupted_keeps_the_rows_measured_before_a_sigint():
    from benchmarks.common import until_interrupted

    def run(n, results):
        for i in range(n):
            if i == 2:
                raise KeyboardInterrupt
            results.append(i)

    assert until_interrupted(run, 5) == ([0, 1], True)
    assert until_interrupted(run, 2) == ([0, 1], False)


def test_host_profile_splits_a_steps_own_time_by_where_the_code_lives():
    import os

    import torch.nn.functional as F

    from benchmarks.profile_step import host_group, host_profile, report

    assert host_group(os.path.join("", "x", "site-packages", "triton", "runtime", "jit.py")) == "triton"
    assert host_group(os.path.join("", "repo", "kernels", "layernorm.py")) == "fastelectra"
    assert host_group(os.path.join("", "x", "site-packages", "torch", "nn", "functional.py")) == "torch"
    assert host_group("~") == "other"
    x = torch.randn(256)

    def busy_python():   # own time that cProfile must attribute to this file
        return sum(i * i for i in range(2000))

    def step():
        busy_python()
        F.relu(x)

    h = host_profile(step, steps=4)
    assert h["issue_ms"] > 0
    assert abs(sum(h["groups_ms"].values()) - h["profiled_ms"]) < 1e-9
    assert h["groups_ms"]["torch"] > 0
    mine = [f for f in h["top_functions"] if f["function"].endswith("(busy_python)")]
    assert len(mine) == 1 and mine[0]["calls_per_step"] == 1 and mine[0]["group"] == "other"
    assert mine[0]["cum_ms"] >= mine[0]["own_ms"] >= 0
    r = {"preset": "tiny", "batch": 2, "seqlen": 8, "backend": "fused", "steps": 4, "wall_ms": 1.0,
         "gpu_busy_ms": 0.5, "seq_per_s": 2000.0, "families_ms": {"GEMM": 0.5}, "top_kernels": [], "host": h}
    md = report(r)
    assert "| torch |" in md and "(busy_python)" in md


def test_attention_sweep_pins_one_config_and_gives_the_tuner_back():
    import triton

    from benchmarks.bench_attention import SWEEP, pinned
    from fastelectra.kernels import attention
    from fastelectra.ops import attention_reference

    shipped = attention._CANDIDATES
    for kernel, candidates in SWEEP.items():   # what the kernels and the dropout draws' 2 x 2 blocks take
        for candidate in candidates:
            bm, bn, warps, stages, cap = (*candidate, None)[:5]
            assert bm >= 16 and bn >= 16 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0, (kernel, bm, bn)
            # a register cap is timed beside the same tile uncapped
            assert cap is None or (0 < cap <= 255 and (bm, bn, warps, stages) in candidates), (kernel, candidate)
        assert len(set(candidates)) == len(candidates), kernel
        for bm, bn, warps, stages, cap in shipped[kernel]:  # every shipped candidate, capped and uncapped
            assert (bm, bn, warps, stages) in candidates, (kernel, bm, bn, warps, stages)
            assert cap is None or (bm, bn, warps, stages, cap) in candidates, (kernel, cap)
    tuner = attention._attn_fwd
    configs, cache = list(tuner.configs), dict(tuner.cache)
    config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1, num_stages=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"      # the kernel runs in the interpreter on a CPU
    q, k, v = (torch.randn(1, 37, 2, 16, device=device) for _ in range(3))
    with pinned(tuner, config):
        out = attention.flash_attention(q, k, v)
        assert tuner.best_config is config            # the launch ran the pinned config
    assert tuner.configs == configs and tuner.cache == cache
    torch.testing.assert_close(out, attention_reference(q, k, v, None, 0.0), atol=2e-5, rtol=1e-4)
    with pytest.raises(KeyboardInterrupt), pinned(tuner, config):   # given back on the way out of an error too
        raise KeyboardInterrupt
    assert tuner.configs == configs


def test_replace_filter_model_finds_the_best_key_and_queueing_settles_less():
    """The model behind the replace kernel's survivor queue (benchmarks/replace_filter_sim.py): both ways
    end with the row's true best key (checked inside), and at the benchmark's N(0, 3^2) logits batches of
    16 take fewer out-of-line instructions and far fewer trips than settling each step's passes."""
    import numpy as np

    from benchmarks.replace_filter_sim import draw_row, immediate, queued
    rng = np.random.default_rng(1)
    for _ in range(2):
        d = draw_row(rng, "n3")
        (now, runs), (batched, batches) = immediate(d), queued(d, 16)
        assert batched < now and batches * 2 < runs, (now, runs, batched, batches)

"""The cached Triton launcher (kernels/launch.py) against Triton's own launch path.

Its key must be at least as fine as Triton's specialization: two arguments it keys alike must be
specialized alike by Triton (checked against Triton's own specialization function, no GPU needed). And
a launch through it must be the launch Triton's path makes: benchmarks/host_overhead.py --check compiles
the kernels for sm_90 on this CPU, runs fused training steps and single calls both ways under a fake
driver and compares every launch (compiled kernel, grid, arguments). That check runs in a subprocess:
this test process imported Triton under TRITON_INTERPRET=1, where kernels are not compiled.
"""
import itertools

import pytest
import torch

pytest.importorskip("triton")


def _triton_spec():
    """Triton's specialization of one runtime argument, as its launch path computes it for a CUDA target."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    return lambda v: native_specialize_impl(backend, v, False, True, True)


def test_launch_key_is_at_least_as_fine_as_triton_specialization():
    from fastelectra.kernels.launch import _spec

    triton_spec = _triton_spec()
    buf32, buf16 = torch.zeros(64), torch.zeros(64, dtype=torch.bfloat16)
    values = [0, 1, 2, 15, 16, 17, 32, -1, -15, -16, -17, 2 ** 31 - 16, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16,
              -2 ** 31, -2 ** 31 - 16, -2 ** 31 - 1, 2 ** 32, 2 ** 63 - 16, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 16,
              -2 ** 63, 0.0, 1.0, 2.5, True, False, None,
              buf32, buf32[1:], buf32[4:], buf32[3:], buf16, buf16[1:], buf16[8:], torch.nn.Parameter(buf32.clone()),
              torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.uint8)]
    for a, b in itertools.combinations(values, 2):
        if _spec(a) == _spec(b):
            assert triton_spec(a) == triton_spec(b), (a, b, _spec(a), triton_spec(a), triton_spec(b))
    # ints Triton tells apart, and the key too
    assert len({_spec(v) for v in (1, 16, 17, 2 ** 31, 2 ** 31 + 1, 2 ** 63, 2 ** 63 + 1)}) == 7


def test_launch_refuses_what_it_cannot_key():
    from fastelectra.kernels.launch import _spec, _Unsupported

    class Sub(torch.Tensor):
        pass

    for v in ("a", torch.float32, [1], torch.zeros(2).as_subclass(Sub)):
        with pytest.raises(_Unsupported):
            _spec(v)


def test_launches_ask_for_fma_contraction():
    """Every launch asks Triton for FMA contraction (enable_fp_fusion), which the kernels were tuned with:
    Triton 3.9 gives it by default with a warning, and 3.10 will not by default. A call's own option wins."""
    import warnings

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    from fastelectra.kernels import launch as L

    calls = []

    class Kernel:   # not a JITFunction: launch() takes Triton's path, whose call this records
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    L.launch(Kernel(), (2,), 1, BLOCK=4)
    L.launch(Kernel(), (3,), enable_fp_fusion=False)
    assert calls == [((2,), (1,), {"enable_fp_fusion": True, "BLOCK": 4}), ((3,), (), {"enable_fp_fusion": False})]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        options = CUDABackend(GPUTarget("cuda", 90, 32)).parse_options(dict(L.COMPILE_OPTIONS))
    assert options.enable_fp_fusion is True


@pytest.fixture(scope="module")
def check_report(tmp_path_factory):
    from test_sass_loops import compiled_module_json

    return compiled_module_json(tmp_path_factory.mktemp("launch") / "check.json", "host_overhead", "--check")


def test_cached_launches_are_the_launches_triton_makes(check_report):
    steps = check_report["steps"]
    assert len(steps) == 2 and all(s["launches"] > 300 for s in steps), steps   # ELECTRA-Small's layer structure
    assert all(s["same"] for s in steps), steps
    assert steps[-1]["triton_path_calls"] == 0, steps     # the second step: every launch from the cache
    calls = check_report["calls"]
    assert all(c["same"] for c in calls), [c for c in calls if not c["same"]]
    assert all(c["triton_path_calls"] == 0 for c in calls if c["round"] == 1), calls   # every key cached
    # a pinned config (bench_attention's sweep) asks the autotuner, and so does the first call after it
    assert [c["triton_path_calls"] for c in calls if c["round"] == 2] == [1, 1, 0], calls


def test_arguments_that_change_triton_specialization_change_the_cached_kernel(check_report):
    """A misaligned tensor, a size of 1 and a size that is not a multiple of 16 each compiled their own
    kernel on Triton's path, and the cached launcher launched that same kernel (the previous test); the
    backward kernels compile at those sizes too."""
    kernels = {c["call"]: c["kernels"] for c in check_report["calls"] if c["round"] != 1}
    assert kernels["layer_norm 64x48 bf16"] != kernels["layer_norm 64x48 bf16, x misaligned"]
    assert kernels["layer_norm 17x40 fp32"] != kernels["layer_norm 17x40 fp32, x misaligned"]
    assert kernels["attention T=16"] != kernels["attention T=1"]
    assert kernels["cross_entropy 1x1"] != kernels["cross_entropy 3x77"]
    # a sweep's pinned config runs, not the cached choice of the autotuner (the kernels differ only there)
    fwd = [k for k in kernels["attention T=16"] if k.startswith("_attn_fwd")]
    pinned_fwd = [k for k in kernels["attention T=16, forward config pinned"] if k.startswith("_attn_fwd")]
    assert fwd and pinned_fwd and fwd != pinned_fwd
    assert kernels["attention T=16, after the pin"] == kernels["attention T=16, again"] == kernels["attention T=16"]
    # forward and backward kernels of every fused op ran, at sizes of 1 too (they compiled for sm_90)
    names = {k.split(":")[0] for ks in kernels.values() for k in ks}
    assert {"_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_sum_partials_kernel", "_attn_fwd_kernel",
            "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_column_partial_sums_kernel",
            "_cross_entropy_bwd_kernel"} <= names, names
    assert any(k.startswith("_attn_bwd") for k in kernels["attention T=1, key mask, dropout"])

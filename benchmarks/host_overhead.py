"""Host time of an un-graphed training step, measured on a CPU: what our Python and Triton's launch path cost.

Without a CUDA graph or torch.compile, a training step is host-bound on the GPU machine
(benchmarks/results/profile_*.md: the GPU was busy 11 ms of an ELECTRA-Small step that took the host
~150 ms to issue). That host time does not need a GPU to be measured. Here the fastelectra step runs on
CPU tensors and the fused backend takes its real Triton launch path: kernels compiled for sm_90 (Triton
ships ptxas), argument binding and specialization, cache lookups, the autotuner's cache; only the driver
is fake, and its C launcher records the launch and returns. The widths are tiny (the layer structure of
a preset, 12 + 12 layers for Small, one head of 16) so that torch's CPU compute stays small: the figures
are host overhead per training step (bench_pretrain's: bf16 autocast, forward, backward, clip,
AdamW): eager vs fused as an un-graphed step runs it, fused with Triton's own launch path vs
fastelectra's cached launcher (kernels/launch.py), and fused inside replayed_work (what a CUDA graph's
warm-up runs: the linear layers on their fused path, see fastelectra.ops.linear).

    python -m benchmarks.host_overhead                    # ms per step, a markdown table
    python -m benchmarks.host_overhead --json out.json
    python -m benchmarks.host_overhead --check --json c.json   # the cached launcher against Triton's path

--check runs fused steps with Triton's launch path and with the cached launcher from the same seeds and
compares every launch (kernel, grid, arguments' dtypes / alignments / values), then single forward +
backward calls whose arguments change Triton's specialization (a misaligned tensor, a size of 1, sizes
that are and are not multiples of 16), then an autotuner config pinned and unpinned as
bench_attention's sweep does. tests/test_launch.py runs it.

These are CPU figures: they rank the paths, they are not the GPU machine's host times (its host is
slower). Runs without TRITON_INTERPRET (the interpreter has no launch path to measure); the fake driver
replaces the CUDA one for the whole process.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch

__all__ = ["install_fake_driver", "step_host_ms", "check_launches", "main"]

# the layer structure of a preset at widths where CPU compute is negligible (head size 16: a kernel head size)
TINY_WIDTHS = dict(vocab_size=256, embedding_size=16, hidden_size=16, num_attention_heads=1, intermediate_size=32,
                   generator_hidden_size=16)


class _Recorder:
    """The fake C launcher's log: one (kernel, grid, arguments) entry per launch while ``log`` is a list."""

    def __init__(self):
        self.log = None

    def launcher(self):
        def run(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
                *args):
            if self.log is not None:
                self.log.append((function, (grid_0, grid_1, grid_2), tuple(_describe(a) for a in args)))
        return run


def _describe(a):
    """What a launch argument means to a kernel: a tensor's dtype, shape, strides and 16-byte alignment."""
    if isinstance(a, torch.Tensor):
        return "tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16
    return a


RECORDER = _Recorder()


def install_fake_driver() -> None:
    """Make Triton compile for an H100 (sm_90) and launch into RECORDER on a machine without a GPU, and let
    the fused backend take CPU tensors. For this process only: there is no way back."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    import fastelectra.backend as backend
    import fastelectra.kernels.attention as attention
    import fastelectra.ops as ops

    class FakeDriver:
        def is_active(self): return True
        def get_current_device(self): return 0
        def set_current_device(self, device): pass
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_device_capability(self, device=0): return 9, 0
        def get_active_torch_device(self): return torch.device("cpu")
        def map_python_to_cpp_type(self, ty): return ty
        def get_benchmarker(self): raise RuntimeError("no GPU: nothing to benchmark")
        def get_device_interface(self): return torch.cuda
        def get_empty_cache_for_benchmark(self): raise RuntimeError("no GPU")
        def clear_cache(self, cache): pass

    def init_handles(self):   # instead of loading the cubin on a device
        if self.module is not None:
            return
        self._run = RECORDER.launcher()
        self.module, self.function = object(), f"{self.name}:{self.hash[:12]}"
        self.n_regs, self.n_spills, self.n_max_threads = 0, 0, 1024

    driver.set_active(FakeDriver())
    compiler.CompiledKernel._init_handles = init_handles
    # no timing without a GPU: the autotuner takes its first pruned config, once per key, as it would a winner
    Autotuner._bench = lambda self, *args, config, **kwargs: [float(self.configs.index(config))] * 3
    use_triton = backend.use_triton
    backend.use_triton = lambda device, requested, op: (backend.resolve(requested) != "eager"
                                                         if device.type == "cpu" else use_triton(device, requested, op))
    attention._check_device = lambda t, name: None
    # a data check that CUDA tensors skip (the fake kernels leave the lse unwritten)
    ops._check_lse_values = lambda logits, lse: None


def _set_fast_launch(on: bool) -> None:
    import fastelectra.kernels.launch as launch

    launch._ENABLED = on


def _tiny_step(preset: str, backend: str, batch: int, seqlen: int, seed: int = 0):
    """bench_pretrain's training step at tiny widths on CPU tensors; backend "eager" or "fused" (fastelectra),
    or "hf-sdpa" / "hf-eager" (transformers' ELECTRA, wired as bench_pretrain wires it)."""
    from fastelectra.config import ElectraConfig

    from .bench_pretrain import fastelectra_step, hf_step, make_batch, training_step

    base = ElectraConfig.preset(preset).to_dict()
    cfg = ElectraConfig.from_dict({**base, **{k: v for k, v in TINY_WIDTHS.items() if k in base}})
    torch.manual_seed(seed)
    if backend.startswith("hf-"):
        model, loss_fn = hf_step(cfg, backend[3:], False, torch.device("cpu"))
    else:
        model, loss_fn = fastelectra_step(cfg, backend, False, torch.device("cpu"))
    ids, mask = make_batch(cfg, batch, seqlen, False, torch.device("cpu"))
    # bench_pretrain's step: bf16 autocast, backward, clip, AdamW
    return training_step(model, loss_fn, ids, mask, torch.bfloat16)


def step_host_ms(preset: str, backend: str, fast_launch: bool, steps: int, batch: int = 2, seqlen: int = 16,
                 replayed: bool = False) -> float:
    """Median host ms of one training step at tiny widths (after warm-up steps, which also compile);
    ``replayed``: inside replayed_work, as a CUDA graph's warm-up and capture run (fused linear layers)."""
    from fastelectra.backend import replayed_work

    _set_fast_launch(fast_launch)
    step = _tiny_step(preset, backend, batch, seqlen)
    with replayed_work() if replayed else contextlib.nullcontext():
        for _ in range(3):
            step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _launches(fn, fast_launch: bool) -> tuple[list, int]:
    """The launches of fn() and how many of them went through Triton's own path (JITFunction.run)."""
    from triton.runtime.jit import JITFunction

    _set_fast_launch(fast_launch)
    calls = [0]
    run = JITFunction.run

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return run(self, *args, **kwargs)

    JITFunction.run = counted
    RECORDER.log = []
    try:
        fn()
        return RECORDER.log, calls[0]
    finally:
        JITFunction.run = run
        RECORDER.log = None


def _single_calls():
    """Forward + backward calls whose arguments change Triton's specialization (misaligned tensors, sizes
    of 1, sizes that are or are not multiples of 16): (name, fn) pairs, each fn a fresh call."""
    from fastelectra import ops
    from fastelectra.kernels.cross_entropy import cross_entropy_with_lse
    from fastelectra.kernels.linear import column_sums

    def layer_norm(m, n, offset=0, dtype=torch.bfloat16, p=0.0):
        buf = torch.randn(m * n + offset, dtype=dtype)
        x = buf[offset:].view(m, n).requires_grad_()    # offset > 0: a misaligned (but contiguous) x
        res = torch.randn(m, n, dtype=dtype, requires_grad=True)
        w, b = torch.randn(n, dtype=dtype, requires_grad=True), torch.randn(n, dtype=dtype, requires_grad=True)
        return lambda: ops.layer_norm(x, w, b, 1e-12, residual=res, dropout_p=p, backend="fused").sum().backward()

    def attention(t, mask, p=0.0):
        q, k, v = (torch.randn(2, t, 1, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        key_mask = torch.arange(t)[None, :] < torch.tensor([[t], [max(1, t // 2)]]) if mask else None
        return lambda: ops.attention(q, k, v, key_mask, dropout_p=p, backend="fused").sum().backward()

    def sums(m, n):
        x = torch.randn(m, n)
        return lambda: column_sums(x)

    def attention_pinned(t, block_m, block_n):
        import triton

        from fastelectra.kernels import attention as kernels

        from .bench_attention import pinned

        call = attention(t, False)

        def run():
            with pinned(kernels._attn_fwd, triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4,
                                                         num_stages=2)):
                call()
        return run

    def cross_entropy(n, vocab):
        logits = torch.randn(n, vocab, dtype=torch.bfloat16, requires_grad=True)
        targets, lse = torch.zeros(n, dtype=torch.int64), torch.zeros(n)
        return lambda: cross_entropy_with_lse(logits, targets, lse).sum().backward()

    pinned = [("attention T=16, forward config pinned", attention_pinned(16, 32, 16)),
              ("attention T=16, after the pin", attention(16, False)),
              ("attention T=16, again", attention(16, False))]
    return pinned, [("layer_norm 64x48 bf16", layer_norm(64, 48)),
            ("layer_norm 64x48 bf16, x misaligned", layer_norm(64, 48, 1)),
            ("layer_norm 1x48 bf16, dropout", layer_norm(1, 48, 0, torch.bfloat16, 0.1)),
            ("layer_norm 17x40 fp32", layer_norm(17, 40, 0, torch.float32)),
            ("layer_norm 17x40 fp32, x misaligned", layer_norm(17, 40, 3, torch.float32)),
            ("attention T=16", attention(16, False)), ("attention T=16, key mask", attention(16, True)),
            ("attention T=1", attention(1, False)), ("attention T=1, key mask, dropout", attention(1, True, 0.1)),
            ("attention T=23, key mask, dropout", attention(23, True, 0.1)),
            ("column_sums 33x1", sums(33, 1)), ("column_sums 64x48", sums(64, 48)),
            ("cross_entropy 1x1", cross_entropy(1, 1)), ("cross_entropy 3x77", cross_entropy(3, 77))]


def check_launches(preset: str = "small", steps: int = 2) -> dict:
    """Every launch of ``steps`` fused steps, and of each single call after every other, through the cached
    launcher against Triton's own path: the same kernels, grids and arguments."""
    from fastelectra.kernels import launch

    from fastelectra.backend import replayed_work

    report = {"steps": []}
    triton_step, fast_step = _tiny_step(preset, "fused", 2, 16), _tiny_step(preset, "fused", 2, 16)
    with replayed_work():                               # every fused op, the linear layers' too
        for i in range(steps):
            want, _ = _launches(triton_step, False)
            got, triton_calls = _launches(fast_step, True)
            report["steps"].append({"launches": len(want), "same": got == want, "triton_path_calls": triton_calls})
    pinned, singles = _single_calls()
    report["calls"] = []
    # rounds 0 and 1 (the second: every key is cached), then round 2: a sweep pins an autotuner config
    # (bench_attention.pinned) and unpins it, after the unpinned call of the same key was cached
    for repeat, calls in ((0, singles), (1, singles), (2, pinned)):
        for name, fn in calls:
            want, _ = _launches(fn, False)
            got, triton_calls = _launches(fn, True)
            report["calls"].append({"call": name, "round": repeat, "launches": len(want), "same": got == want,
                                    "triton_path_calls": triton_calls, "kernels": sorted({w[0] for w in want})})
    report["cached_keys"] = launch.cache_info()
    return report


def _have_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--check", action="store_true", help="compare the cached launcher with Triton's path")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    install_fake_driver()
    if args.check:
        result = check_launches(args.presets[0])
        for s in result["steps"]:
            print(f"step: {s['launches']} launches, same: {s['same']}, through Triton's path: {s['triton_path_calls']}")
        for c in result["calls"]:
            print(f"{c['call']} (round {c['round']}): same: {c['same']}, through Triton's path: {c['triton_path_calls']}")
    else:
        from .common import env_info, markdown_table

        rows = []
        for preset in args.presets:
            eager = step_host_ms(preset, "eager", True, args.steps)
            # transformers' ELECTRA with SDPA, the peer an un-graphed user compares with, where installed
            peers = (("hf-sdpa", True, False),) if _have_transformers() else ()
            # (backend, cached launcher, inside replayed_work: the linear layers' fused path); the first fused
            # row is how an un-graphed fused step ran before kernels/launch.py and the replayed_work rule
            for backend, fast, replayed in (("eager", True, False), ("fused", False, True), ("fused", False, False),
                                            ("fused", True, False), ("fused", True, True)) + peers:
                ms = eager if backend == "eager" else step_host_ms(preset, backend, fast, args.steps, replayed=replayed)
                fused = backend == "fused"
                rows.append({"preset": preset, "backend": backend,
                             "launch": ("cached" if fast else "triton") if fused else "-",
                             "linear": ("fused" if replayed else "F.linear") if fused else "-",
                             "host_ms_per_step": round(ms, 2), "x_vs_eager": round(ms / eager, 3)})
        print(markdown_table(rows, list(rows[0])))
        result = {"env": {**env_info(), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
                  "rows": rows, "widths": TINY_WIDTHS, "batch": 2, "seqlen": 16}
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()

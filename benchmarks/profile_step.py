"""Profiler pass over one ELECTRA pretraining step: where the GPU time goes, and how busy the GPU is.

For each preset and backend, a full training step (bf16 autocast, backward, clip, fused AdamW; the
same closure as bench_pretrain) is warmed up, then a few steps run under torch.profiler. Printed:
wall ms per step, GPU-busy ms per step (the sum of kernel times, so launch gaps show as the
difference), and the kernels with the most GPU time, grouped into families (attention, layer norm,
GEMMs, replacement, elementwise, optimizer). A step whose GPU-busy time is well under its wall time
is launch-bound: torch.compile or CUDA graphs are the remedy, not faster kernels.

Un-graphed steps also get a host-side pass: the time Python takes to issue a step (no sync inside),
then cProfile over the same steps, with the functions that take the most own time and that time
grouped by where the code lives (Triton's launcher, torch, fastelectra, the rest). That says which
Python a launch-bound step spends its host time in.

    python -m benchmarks.profile_step --presets small base --out benchmarks/results/profile_<gpu>_<date>.json
    fastelectra bench profile --presets base --backends fused eager
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import time

import torch

from fastelectra.config import ElectraConfig

from .bench_pretrain import SHAPES, fastelectra_step, make_batch, training_step
from .common import require_cuda, write_results

FAMILIES = [   # first match wins; matched against the lower-cased kernel name
    ("attention (fastelectra)", r"_attn_|attn_fwd|attn_bwd"),
    ("attention (torch)", r"flash|fmha|attention|softmax|cudnn"),
    ("layer norm (fastelectra)", r"_layer_norm_"),
    ("layer norm (torch)", r"layer_norm|layernorm"),
    ("replace_tokens (_C)", r"replace_tokens|gumbel"),
    ("GEMM", r"gemm|sm90_xmma|cutlass|ampere|nvjet|cublas|matmul|s16816|wgmma"),
    ("optimizer", r"adam|multi_tensor|foreach|norm_kernel|clip"),
    ("loss / softmax-xent", r"log_softmax|nll|cross_entropy|binary_cross"),
    ("copy / cast", r"copy|cast|cat_|direct_copy"),
    ("elementwise / reduce", r"elementwise|reduce|vectorized|triton_"),
]


def family(name: str) -> str:
    low = name.lower()
    return next((fam for fam, pat in FAMILIES if re.search(pat, low)), "other")


def kernel_events(events) -> list:
    """The CUDA kernel rows of ``prof.key_averages()``. A ``record_function`` range (torch's own
    "Optimizer.step#AdamW.step", for one) is reported on the CPU and again as a device-side span
    covering its kernels, which are rows of their own: counting the span too would count them twice."""
    annotations = {e.key for e in events if getattr(e, "is_user_annotation", False)}
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.key not in annotations]


HOST_GROUPS = [   # first match wins; matched against the source path of a profiled function
    ("triton", os.sep + "triton" + os.sep),
    ("fastelectra", os.sep + "fastelectra" + os.sep),
    ("fastelectra", os.sep + "kernels" + os.sep),
    ("torch", os.sep + "torch" + os.sep),
    ("benchmark harness", os.sep + "benchmarks" + os.sep),
]


def host_group(path: str) -> str:
    """Where a profiled function lives: triton, fastelectra (with its kernels), torch, the benchmark
    harness, or other (C builtins such as tensor methods show as "~" and count as other)."""
    return next((g for g, part in HOST_GROUPS if part in path), "other")


def host_profile(step, steps: int, top: int = 20) -> dict:
    """Host side of ``steps`` calls of ``step``: ms per step to issue them (no sync inside: equal to the
    wall time when the step is launch-bound), then cProfile over as many more calls: own (tottime) ms
    per step by host_group, and the ``top`` functions by own time with their cumulative time."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    issue_ms = (time.perf_counter() - t0) * 1e3 / steps
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    sync()
    stats = pstats.Stats(prof).stats
    groups: dict[str, float] = {}
    funcs = []
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in stats.items():
        g = host_group(path)
        groups[g] = groups.get(g, 0.0) + tottime * 1e3 / steps
        where = f"{os.path.basename(path)}:{line}" if path != "~" else "builtin"
        funcs.append({"function": f"{where}({name})", "group": g, "calls_per_step": ncalls / steps,
                      "own_ms": tottime * 1e3 / steps, "cum_ms": cumtime * 1e3 / steps})
    funcs.sort(key=lambda f: -f["own_ms"])
    return {"issue_ms": issue_ms, "profiled_ms": sum(groups.values()),
            "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])), "top_functions": funcs[:top]}


def profile(preset: str, backend: str, steps: int, device, graph: bool = False) -> dict:
    """One profiled configuration: wall and GPU-busy ms per step, ms per kernel family, top kernels."""
    cfg = ElectraConfig.preset(preset)
    b, t = SHAPES[preset]
    torch.manual_seed(0)
    model, loss_fn = fastelectra_step(cfg, backend, False, device)
    step = training_step(model, loss_fn, *make_batch(cfg, b, t, False, device), torch.bfloat16, graph=graph)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        start.record()
        for _ in range(steps):
            step()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end) / steps
    host = None if graph else host_profile(step, steps)
    kernels = kernel_events(prof.key_averages())
    def dev_us(e):   # total device microseconds of one event group, across torch versions
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    busy = sum(dev_us(e) for e in kernels) / 1e3 / steps
    fams: dict[str, float] = {}
    for e in kernels:
        fams[family(e.key)] = fams.get(family(e.key), 0.0) + dev_us(e) / 1e3 / steps
    top = sorted(kernels, key=lambda e: -dev_us(e))[:15]
    del model, step
    torch.cuda.empty_cache()
    return {"preset": preset, "batch": b, "seqlen": t, "backend": backend + ("+graph" if graph else ""), "steps": steps,
            "wall_ms": wall, "gpu_busy_ms": busy, "seq_per_s": b / wall * 1e3,
            "families_ms": dict(sorted(fams.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"kernel": e.key, "calls_per_step": e.count / steps, "ms_per_step": dev_us(e) / 1e3 / steps}
                            for e in top],
            "host": host}


def share_table(head: str, parts: dict, total: float, unit: str) -> list[str]:
    """Markdown rows: each part's ms per step and its share of ``total``."""
    return [f"| {head} | {unit} | share |", "|---|---|---|"] + \
        [f"| {k} | {ms:.3f} | {100 * ms / total:.1f}% |" for k, ms in parts.items()]


def report(r: dict) -> str:
    """Markdown for one profile() result."""
    lines = [f"## {r['preset']} (B={r['batch']}, T={r['seqlen']}), backend={r['backend']}, bf16, "
             f"{r['steps']} profiled steps",
             f"wall {r['wall_ms']:.2f} ms/step under the profiler ({r['seq_per_s']:.0f} seq/s), GPU busy {r['gpu_busy_ms']:.2f} ms/step "
             f"({100 * r['gpu_busy_ms'] / r['wall_ms']:.0f}% of wall)", ""]
    lines += share_table("family", r["families_ms"], r["gpu_busy_ms"], "GPU ms/step")
    lines += ["", "| kernel | calls/step | ms/step |", "|---|---|---|"]
    lines += [f"| {k['kernel'][:90]} | {k['calls_per_step']:.0f} | {k['ms_per_step']:.3f} |" for k in r["top_kernels"]]
    h = r.get("host")
    if h:
        lines += ["", f"Host: {h['issue_ms']:.2f} ms/step to issue the step (no sync inside); under cProfile "
                      f"{h['profiled_ms']:.2f} ms/step of own time, by where the code lives:", ""]
        lines += share_table("code", h["groups_ms"], h["profiled_ms"], "own ms/step")
        lines += ["", "| function | group | calls/step | own ms/step | cumulative ms/step |", "|---|---|---|---|---|"]
        lines += [f"| {f['function'][:90]} | {f['group']} | {f['calls_per_step']:.0f} | {f['own_ms']:.3f} | {f['cum_ms']:.3f} |"
                  for f in h["top_functions"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small", "base"], choices=sorted(SHAPES))
    ap.add_argument("--backends", nargs="+", default=["fused", "eager"], choices=["fused", "eager"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--graph", action="store_true", help="profile the step replayed as one CUDA graph instead")
    ap.add_argument("--out", help="JSON path (the markdown report is written beside it)")
    args = ap.parse_args(argv)
    require_cuda("profile_step")
    results = [profile(p, be, args.steps, torch.device("cuda"), args.graph)
               for p in args.presets for be in args.backends]
    header = f"# profile_step on {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n"
    write_results(args.out, {"benchmark": "profile_step", "results": results},
                  header + "\n\n".join(report(r) for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

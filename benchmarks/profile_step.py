"""Profiler pass over one ELECTRA pretraining step: where the GPU time goes, and how busy the GPU is.

For each preset and backend, a full training step (bf16 autocast, backward, clip, fused AdamW; the
same closure as bench_pretrain) is warmed up, then a few steps run under torch.profiler. Printed:
wall ms per step, GPU-busy ms per step (the sum of kernel times, so launch gaps show as the
difference), and the kernels with the most GPU time, grouped into families (attention, layer norm,
GEMMs, replacement, elementwise, optimizer). A step whose GPU-busy time is well under its wall time
is launch-bound: torch.compile or CUDA graphs are the remedy, not faster kernels.

    python -m benchmarks.profile_step --presets small base --out benchmarks/results/profile_<gpu>_<date>.json
    fastelectra bench profile --presets base --backends fused eager
"""
from __future__ import annotations

import argparse
import re

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
                            for e in top]}


def report(r: dict) -> str:
    """Markdown for one profile() result."""
    lines = [f"## {r['preset']} (B={r['batch']}, T={r['seqlen']}), backend={r['backend']}, bf16, "
             f"{r['steps']} profiled steps",
             f"wall {r['wall_ms']:.2f} ms/step under the profiler ({r['seq_per_s']:.0f} seq/s), GPU busy {r['gpu_busy_ms']:.2f} ms/step "
             f"({100 * r['gpu_busy_ms'] / r['wall_ms']:.0f}% of wall)", "",
             "| family | ms/step | share of GPU time |", "|---|---|---|"]
    for fam, ms in r["families_ms"].items():
        lines.append(f"| {fam} | {ms:.3f} | {100 * ms / r['gpu_busy_ms']:.1f}% |")
    lines += ["", "| kernel | calls/step | ms/step |", "|---|---|---|"]
    for k in r["top_kernels"]:
        lines.append(f"| {k['kernel'][:90]} | {k['calls_per_step']:.0f} | {k['ms_per_step']:.3f} |")
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

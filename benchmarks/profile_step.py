"""Profiler pass over one ELECTRA pretraining step: where the GPU time goes, and how busy the GPU is.

For each preset and backend, a full training step (bf16 autocast, backward, clip, fused AdamW; the
same closure as bench_pretrain) is warmed up, then a few steps run under torch.profiler. Printed:
wall ms per step, GPU-busy ms per step (the sum of kernel times, so launch gaps show as the
difference), and the kernels with the most GPU time, grouped into families (attention, layer norm,
GEMMs, replacement, elementwise, optimizer). A step whose GPU-busy time is well under its wall time
is launch-bound: torch.compile or CUDA graphs are the remedy, not faster kernels.

    python -m benchmarks.profile_step --presets small base --out gpu_results/profile.txt
"""
from __future__ import annotations

import argparse
import re

import torch

from fastelectra.config import ElectraConfig

from .bench_pretrain import SHAPES, fastelectra_step, make_batch, training_step

FAMILIES = [   # first match wins; matched against the lower-cased kernel name
    ("attention (fastelectra)", r"_attn_|attn_fwd|attn_bwd|_attention_preprocess|_delta"),
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


def profile(preset: str, backend: str, steps: int, device) -> str:
    cfg = ElectraConfig.preset(preset)
    b, t = SHAPES[preset]
    torch.manual_seed(0)
    model, loss_fn = fastelectra_step(cfg, backend, False, device)
    step = training_step(model, loss_fn, *make_batch(cfg, b, t, False, device), torch.bfloat16)
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
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    def dev_us(e):   # total device microseconds of one event group, across torch versions
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    busy = sum(dev_us(e) for e in kernels) / 1e3 / steps
    fams: dict[str, float] = {}
    for e in kernels:
        fams[family(e.key)] = fams.get(family(e.key), 0.0) + dev_us(e) / 1e3 / steps
    lines = [f"## {preset} (B={b}, T={t}), backend={backend}, bf16, {steps} profiled steps",
             f"wall {wall:.2f} ms/step ({b / wall * 1e3:.0f} seq/s), GPU busy {busy:.2f} ms/step "
             f"({100 * busy / wall:.0f}% of wall)", "", "| family | ms/step | share of GPU time |", "|---|---|---|"]
    for fam, ms in sorted(fams.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {fam} | {ms:.3f} | {100 * ms / busy:.1f}% |")
    lines += ["", "| kernel | calls/step | ms/step |", "|---|---|---|"]
    for e in sorted(kernels, key=lambda e: -dev_us(e))[:15]:
        lines.append(f"| {e.key[:90]} | {e.count / steps:.0f} | {dev_us(e) / 1e3 / steps:.3f} |")
    del model, step
    torch.cuda.empty_cache()
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small", "base"], choices=sorted(SHAPES))
    ap.add_argument("--backends", nargs="+", default=["fused", "eager"], choices=["fused", "eager"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", help="text file for the report (also printed)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step: needs a CUDA GPU")
    report = "\n\n".join(profile(p, be, args.steps, torch.device("cuda"))
                         for p in args.presets for be in args.backends)
    header = f"# profile_step on {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n"
    print(header + report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Attention microbenchmark: fastelectra's Triton flash attention vs SDPA backends and eager attention.

Forward and forward+backward TFLOP/s at ELECTRA shapes, bf16 by default, one process:
  fastelectra          kernels.attention.flash_attention on (B, T, H, D) tensors (no transposes)
  fastelectra-varlen   flash_attention_varlen on the packed tokens (padded cases only; packing untimed)
  sdpa-<backend>       F.scaled_dot_product_attention pinned with torch.nn.attention.sdpa_kernel to
                       FLASH_ATTENTION / EFFICIENT_ATTENTION / CUDNN_ATTENTION / MATH, and sdpa-default
                       (torch's own pick); inputs are (B, H, T, D) views of the same tensors, as HF does
  hf-eager             fastelectra.ops.attention_reference, HF-style eager math
Cases: plain (no mask, no dropout); mask+dropout with an all-valid mask (the cost of handling a mask);
mask+dropout with lengths uniform in [T/2, T] (real padding, which the fused kernels skip).
FLOPs are counted densely for every contender: 4·B·H·T²·D forward, 3.5x that for forward+backward
(backward = 2.5x forward), so skipping padding shows up as a higher rate. A backend that refuses a
case is recorded with its reason.

    python -m benchmarks.bench_attention --out benchmarks/results/attention_<gpu>_<date>.json

--sweep instead times the fused kernels one autotuning candidate at a time (SWEEP: a wider net than
the three shipped per kernel in kernels/attention.py), the other kernels autotuned as usual, at
32,12,512,64 without and with mask + dropout unless --shapes / --cases say otherwise: the data to
choose the shipped candidates from.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime

import torch
import torch.nn.functional as F

from .common import (TIMING, add_speedups, bench_ms, gpu_slug, rate_table, require_cuda, skip_reason,
                     until_interrupted, write_results)

SHAPES = [(128, 4, 128, 64), (32, 12, 512, 64), (8, 16, 2048, 64)]   # (batch, nheads, seqlen, headdim)
CASES = ("plain", "mask-full+dropout", "mask-padded+dropout")
DROPOUT = 0.1
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def attention_flops(batch, nheads, seqlen, head_dim, backward: bool) -> float:
    forward = 4.0 * batch * nheads * seqlen * seqlen * head_dim
    return forward * (3.5 if backward else 1.0)


# --sweep candidates (BLOCK_M, BLOCK_N, num_warps, num_stages[, register cap]) per kernel: the shipped
# ones, more warps per tile, other stage counts, and tiles on either side of the H100 winners of
# 2026-11-23 (mask + dropout at 32,12,512,64: fwd 128x64/4w, dkdv 64x64/4w, dq 64x32/4w); the shipped
# register caps beside the same tiles uncapped, so one run says what each cap buys. Every block size is a
# power of two >= 16 (tl.dot, and the dropout draws' 2 x 2 blocks).
SWEEP = {
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 3, 168), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3),
            (64, 128, 4, 3), (128, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 2, 128), (128, 64, 4, 2),
            (128, 64, 4, 4)],
    "dkdv": [(64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 8, 3),
             (128, 64, 8, 3), (32, 32, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2)],
    "dq": [(64, 64, 4, 3), (64, 64, 4, 3, 168), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3),
           (128, 32, 4, 3), (32, 32, 4, 3), (64, 16, 4, 3), (64, 32, 4, 2), (64, 32, 4, 4)],
}
SWEEP_SHAPE = (32, 12, 512, 64)
SWEEP_CASES = ("plain", "mask-full+dropout")


def make_inputs(batch, nheads, seqlen, head_dim, case, dtype, seed=0):
    """q, k, v, do (B, T, H, D) random; key-padding mask (B, T) bool or None; dropout p."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(batch, seqlen, nheads, head_dim, generator=g).to("cuda", dtype) for _ in range(4))
    if case == "plain":
        return q, k, v, do, None, 0.0
    if case == "mask-full+dropout":
        return q, k, v, do, torch.ones(batch, seqlen, dtype=torch.bool, device="cuda"), DROPOUT
    lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,), generator=g)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).cuda()
    return q, k, v, do * mask[:, :, None, None], mask, DROPOUT


def contenders(q, k, v, mask, p):
    """name -> fn(q, k, v) returning (B, T, H, D) (or packed) output; varlen packs once, untimed."""
    from fastelectra.kernels.attention import flash_attention, flash_attention_varlen
    from fastelectra.ops import attention_reference

    fns = {"fastelectra": lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=p)}
    if mask is not None and not bool(mask.all()):
        lengths = mask.sum(1, dtype=torch.int32)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        max_len = int(lengths.max())
        fns["fastelectra-varlen"] = (
            lambda q, k, v: flash_attention_varlen(q, k, v, cu, max_len, dropout_p=p), mask)
    sdpa_mask = None if mask is None else mask[:, None, None, :]

    def sdpa(backend):
        def fn(q, k, v):
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            if backend is None:
                out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=sdpa_mask, dropout_p=p)
            else:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(getattr(SDPBackend, backend)):
                    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=sdpa_mask, dropout_p=p)
            return out.transpose(1, 2)
        return fn

    for backend in SDPA_BACKENDS:
        fns["sdpa-" + backend.split("_")[0].lower()] = sdpa(backend)
    fns["sdpa-default"] = sdpa(None)
    fns["hf-eager"] = lambda q, k, v: attention_reference(q, k, v, mask, p)
    return fns


def time_contender(fn, q, k, v, do, backward: bool, pack_mask=None) -> dict:
    """bench_ms timings (ms, ms_call) of one forward (no autograd) or forward+backward call."""
    if pack_mask is not None:  # varlen: time on the packed tokens
        q, k, v, do = (t[pack_mask] for t in (q, k, v, do))
    if not backward:
        with torch.no_grad():
            fn(q, k, v)                     # compile / autotune outside the timing
            return bench_ms(lambda: fn(q, k, v))
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))

    def step():
        out = fn(q, k, v)
        out.backward(do)
        q.grad = k.grad = v.grad = None

    step()
    return bench_ms(step)


def run(shapes, cases, dtype, modes, results=None):
    rows = [] if results is None else results
    for batch, nheads, seqlen, head_dim in shapes:
        for case in cases:
            q, k, v, do, mask, p = make_inputs(batch, nheads, seqlen, head_dim, case, dtype)
            for name, entry in contenders(q, k, v, mask, p).items():
                fn, pack_mask = entry if isinstance(entry, tuple) else (entry, None)
                for mode in modes:
                    row = dict(batch=batch, nheads=nheads, seqlen=seqlen, head_dim=head_dim, case=case,
                               contender=name, mode=mode)
                    try:
                        row.update(time_contender(fn, q, k, v, do, mode == "fwd+bwd", pack_mask))
                        flops = attention_flops(batch, nheads, seqlen, head_dim, mode == "fwd+bwd")
                        row["tflops"] = flops / row["ms"] / 1e9
                    except (RuntimeError, ValueError) as err:  # a backend refusing the case
                        row.update(skipped=skip_reason(err))
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(f"{case:20s} {str((batch, nheads, seqlen, head_dim)):18s} {mode:8s} {name:20s} "
                          + (f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row else row["skipped"]), flush=True)
    return rows


@contextlib.contextmanager
def pinned(tuner, config):
    """Within: the triton.autotune kernel ``tuner`` launches ``config`` alone, untuned (an autotuner
    with one config runs it); after: its own configs and tuning cache are back. (fastelectra's cached
    launcher, kernels/launch.py, asks the autotuner again whenever its config list is another object.)"""
    configs, cache = tuner.configs, dict(tuner.cache)
    tuner.configs = [config]
    try:
        yield
    finally:
        tuner.configs = configs
        tuner.cache.clear()
        tuner.cache.update(cache)


def sweep(shapes, cases, dtype, results=None):
    """Time fastelectra's attention with each kernel pinned, in turn, to each SWEEP candidate: fwd
    candidates in the forward alone, dK/dV and dQ candidates in forward+backward (the other kernels
    autotuned, so rows of one kernel differ by that kernel alone)."""
    import triton

    from fastelectra.kernels import attention

    tuners = {"fwd": attention._attn_fwd, "dkdv": attention._attn_bwd_dkdv, "dq": attention._attn_bwd_dq}
    shipped = attention._CANDIDATES
    rows = [] if results is None else results
    for batch, nheads, seqlen, head_dim in shapes:
        for case in cases:
            q, k, v, do, mask, p = make_inputs(batch, nheads, seqlen, head_dim, case, dtype)
            fn = contenders(q, k, v, mask, p)["fastelectra"]
            capped = attention._caps_apply(p > 0.0, head_dim)
            for kernel, candidates in SWEEP.items():
                mode = "fwd" if kernel == "fwd" else "fwd+bwd"
                as_shipped = {(bm, bn, w, s, cap if capped else None) for bm, bn, w, s, cap in shipped[kernel]}
                for candidate in candidates:
                    bm, bn, warps, stages, cap = (*candidate, None)[:5]
                    row = dict(batch=batch, nheads=nheads, seqlen=seqlen, head_dim=head_dim, case=case,
                               kernel=kernel, mode=mode,
                               config=f"{bm}x{bn} {warps}w {stages}s" + (f" max {cap} regs" if cap else ""),
                               shipped=(bm, bn, warps, stages, cap) in as_shipped)
                    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages,
                                           maxnreg=cap)
                    try:
                        with pinned(tuners[kernel], config):
                            row.update(time_contender(fn, q, k, v, do, mode == "fwd+bwd"))
                        row["tflops"] = attention_flops(batch, nheads, seqlen, head_dim, mode == "fwd+bwd") / row["ms"] / 1e9
                    except Exception as err:   # e.g. a tile that overflows shared memory: record, go on
                        row.update(skipped=skip_reason(err))
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(f"{case:20s} {kernel:5s} {row['config']:26s} {'shipped' if row['shipped'] else '':8s}"
                          + (f"{row['ms']:8.4f} ms {row['tflops']:7.1f} TFLOP/s" if "tflops" in row else row["skipped"]),
                          flush=True)
    return rows


def add_ratios(rows):
    """Each fastelectra row gets fastelectra TFLOP/s / peer TFLOP/s for every timed peer (= peer ms /
    its ms: one case has one FLOP count) and the ratio to the best of them."""
    add_speedups(rows, lambda r: (r["batch"], r["nheads"], r["seqlen"], r["head_dim"], r["case"], r["mode"]),
                 lambda r: r["contender"].startswith("fastelectra"))
    for r in rows:
        if "speedup" in r:
            r["ratios"] = r.pop("speedup")
            r["vs_best_peer"] = min(r["ratios"].values(), default=None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON path (a .md table is written beside it)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--shapes", nargs="+", metavar="B,H,T,D",
                        help="shapes to run (default: " + " ".join(",".join(map(str, s)) for s in SHAPES)
                        + "; with --sweep: " + ",".join(map(str, SWEEP_SHAPE)) + ")")
    parser.add_argument("--cases", nargs="+", choices=CASES,
                        help=f"cases to run (default: all; with --sweep: {' '.join(SWEEP_CASES)})")
    parser.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    parser.add_argument("--sweep", action="store_true",
                        help="instead: time each kernel under each autotuning candidate in SWEEP")
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else \
        ([SWEEP_SHAPE] if args.sweep else SHAPES)
    if any(len(s) != 4 for s in shapes):
        parser.error("--shapes takes B,H,T,D quadruples")
    require_cuda("bench_attention")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    if args.sweep:
        cases = args.cases or list(SWEEP_CASES)
        rows, truncated = until_interrupted(sweep, shapes, cases, dtype)
        benchmark, header, extra = "attention_sweep", "TFLOP/s", {"sweep": SWEEP}
        columns = ["shape", "case", "kernel", "mode", "config", "shipped", "ms", header, "ms_call"]
    else:
        cases = args.cases or list(CASES)
        rows, truncated = until_interrupted(run, shapes, cases, dtype, args.modes)
        add_ratios(rows)
        benchmark, header = "attention", "result"
        extra = {"modes": args.modes, "flops": "4*B*H*T^2*D forward, x3.5 forward+backward, dense"}
        columns = ["shape", "case", "mode", "contender", "ms", header, "vs_best_peer", "ms_call"]
    table_rows = [dict(r, shape=f"{r['batch']},{r['nheads']},{r['seqlen']},{r['head_dim']}") for r in rows]
    table = rate_table(table_rows, columns, "tflops", header, digits=1)
    payload = {
        "benchmark": benchmark,
        "config": {"dtype": args.dtype, "dropout_p": DROPOUT, "shapes": shapes, "cases": cases, **extra,
                   "gpu_slug": gpu_slug(),
                   "timing": f"ms, TFLOP/s: {TIMING}",
                   "date": datetime.date.today().isoformat()},
        "results": rows,
    }
    write_results(args.out, payload, table, truncated)
    return 1 if truncated else 0


if __name__ == "__main__":
    raise SystemExit(main())

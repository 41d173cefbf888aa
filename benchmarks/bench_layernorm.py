"""Layer-norm microbenchmark: fastelectra's fused Triton tail vs F.layer_norm eager and torch.compile.

Cases, bf16 by default, M = 65536 rows, N in {256, 768, 1024, 4096}, one process:
  ln                       y = LayerNorm(x)
  dropout+residual+ln      y = LayerNorm(dropout(x, 0.1) + residual)   (the ELECTRA block tail)
Contenders:
  fastelectra              kernels.layernorm.fused_layer_norm (dropout seed drawn per call)
  torch-eager              F.dropout / + / F.layer_norm, unfused
  torch-compile            torch.compile of that same unfused expression (inductor, default mode)
  copy                     x.copy_ into a preallocated tensor (ln forward only): the bandwidth ceiling
Modes: fwd (no autograd) and fwd+bwd (torch.autograd.grad for x, residual, weight, bias).
GB/s counts each input read once and each output written once: fwd reads x (+ residual) and
writes y; fwd+bwd also reads dy and writes dx (+ dresidual), dweight, dbias; weight/bias read once.
Targets (DESIGN.md, H100): ln fwd >= 2.7 TB/s at N = 768; ln fwd+bwd <= 0.25 ms at 65536 x 768.

    python -m benchmarks.bench_layernorm --out benchmarks/results/layernorm_<gpu>_<date>.json
"""
from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F

from .common import (TIMING, add_speedups, bench_ms, gpu_slug, rate_table, one_at_a_time, require_cuda, skip_reason,
                     until_interrupted, write_results)

ROWS = 65536
HIDDEN = (256, 768, 1024, 4096)
CASES = ("ln", "dropout+residual+ln")
MODES = ("fwd", "fwd+bwd")
DROPOUT = 0.1
EPS = 1e-12
TARGET_FWD_GBPS = 2700.0        # ln fwd at N = 768
TARGET_FWD_BWD_MS = 0.25        # ln fwd+bwd at 65536 x 768


def make_inputs(rows, n, dtype, seed=0):
    """x, residual, dy (rows, n) and weight, bias (n,): random, on the GPU."""
    g = torch.Generator().manual_seed(seed)
    x, residual, dy = (torch.randn(rows, n, generator=g).to("cuda", dtype) for _ in range(3))
    weight = (1 + 0.1 * torch.randn(n, generator=g)).to("cuda", dtype)
    bias = (0.1 * torch.randn(n, generator=g)).to("cuda", dtype)
    return x, residual, dy, weight, bias


def unfused_tail(x, weight, bias, residual, p):
    if p > 0.0:
        x = F.dropout(x, p, training=True)
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, x.shape[-1:], weight, bias, EPS)


def contenders(case):
    """name -> fn(x, weight, bias, residual) for one case."""
    from fastelectra.kernels.layernorm import fused_layer_norm

    p = DROPOUT if case == "dropout+residual+ln" else 0.0

    def eager(x, w, b, r):
        return unfused_tail(x, w, b, r, p)

    torch._dynamo.reset()
    compiled = torch.compile(eager, dynamic=False)
    return {
        "fastelectra": lambda x, w, b, r: fused_layer_norm(x, w, b, EPS, residual=r, dropout_p=p),
        "torch-eager": eager,
        "torch-compile": compiled,
    }


def bytes_moved(rows, n, elem, case, mode) -> int:
    has_res = case == "dropout+residual+ln"
    activations = 2 + has_res                   # x, residual, y
    params = 2                                  # weight, bias read
    if mode == "fwd+bwd":
        activations += 2 + has_res              # dy, dx, dresidual
        params += 2                             # dweight, dbias written
    return elem * (rows * n * activations + n * params)


def time_contender(fn, x, w, b, r, dy, mode) -> dict:
    """bench_ms timings (ms, ms_call) of one forward (no autograd) or forward+backward call."""
    if mode == "fwd":
        with torch.no_grad():
            fn(x, w, b, r)                      # compile / first launch outside the timing
            return bench_ms(lambda: fn(x, w, b, r))
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b) + ((r,) if r is not None else ())]
    xg, wg, bg = leaves[:3]
    rg = leaves[3] if r is not None else None

    def step():
        return torch.autograd.grad(fn(xg, wg, bg, rg), leaves, dy)

    step()
    return bench_ms(step)


def time_copy(x) -> dict:
    out = torch.empty_like(x)
    return bench_ms(lambda: out.copy_(x))


def run(rows, hidden, cases, modes, dtype, results=None):
    results = [] if results is None else results
    elem = torch.empty((), dtype=dtype).element_size()
    for n in hidden:
        x, residual, dy, weight, bias = make_inputs(rows, n, dtype)
        for case in cases:
            r = residual if case == "dropout+residual+ln" else None
            fns = contenders(case)
            for mode in modes:
                timed = [(name, lambda fn=fn: time_contender(fn, x, weight, bias, r, dy, mode))
                         for name, fn in fns.items()]
                if case == "ln" and mode == "fwd":
                    timed.append(("copy", lambda: time_copy(x)))
                for name, measure in timed:
                    row = dict(rows=rows, n=n, case=case, mode=mode, contender=name)
                    try:
                        row.update(measure())
                        row["gbps"] = bytes_moved(rows, n, elem, case, mode) / row["ms"] / 1e6
                    except (RuntimeError, ValueError) as err:  # e.g. a compile failure: record, go on
                        row.update(skipped=skip_reason(err))
                    results.append(row)
                    print(f"N={n:5d} {case:20s} {mode:8s} {name:14s} "
                          + (f"{row['ms']:8.4f} ms {row['gbps']:7.0f} GB/s" if "ms" in row else row["skipped"]),
                          flush=True)
                torch.cuda.empty_cache()
    return results


def add_ratios(results):
    """Each fastelectra row gets speedup = peer ms / fastelectra ms for every peer in the same run."""
    add_speedups(results, lambda r: (r["rows"], r["n"], r["case"], r["mode"]),
                 lambda r: r["contender"] == "fastelectra", lambda r: r["contender"] not in ("fastelectra", "copy"))
    for r in results:
        if "speedup" in r:
            r["vs_eager"] = r["speedup"].get("torch-eager")
            r["vs_compile"] = r["speedup"].get("torch-compile")


def check_targets(results):
    """The DESIGN.md targets, where this run measured them (None: not measured)."""
    def ours(case, mode):
        return next((r for r in results if r["contender"] == "fastelectra" and r["n"] == 768
                     and r["rows"] == ROWS and r["case"] == case and r["mode"] == mode and "ms" in r), None)

    fwd, both = ours("ln", "fwd"), ours("ln", "fwd+bwd")
    return {
        "ln_fwd_gbps_at_768": None if fwd is None else
        {"measured": fwd["gbps"], "target": TARGET_FWD_GBPS, "met": fwd["gbps"] >= TARGET_FWD_GBPS},
        "ln_fwd_bwd_ms_at_65536x768": None if both is None else
        {"measured": both["ms"], "target": TARGET_FWD_BWD_MS, "met": both["ms"] <= TARGET_FWD_BWD_MS},
    }


# Launch shapes to try with --sweep: kernels/layernorm.py's module constants (read at each launch)
SWEEP = {
    "FWD_TILE": (1024, 2048, 4096, 8192),   # 1024: one row per program up to N = 1024
    "FWD_TILE_NARROW": (512, 1024, 2048),    # FWD_TILE of rows of at most NARROW_N columns
    "FWD_ELEMS_PER_THREAD": (8, 16, 32),
    "BWD_TILE": (1024, 2048, 4096),
    "BWD_WARPS_PER_SM": (16, 32, 64),
    "BWD_MIN_STEPS": (1, 4, 8, 16),          # at 16384 rows of 64 and 256 (ELECTRA-Small's) it binds
}


def sweep(rows, hidden, dtype, results=None):
    """Time the fused kernels under each launch shape in SWEEP, one constant varied at a time from the
    shipped values (fwd for FWD_*, fwd+bwd for BWD_*): what to change to reach the targets."""
    from fastelectra.kernels import layernorm

    results = [] if results is None else results
    elem = torch.empty((), dtype=dtype).element_size()
    fused = contenders("ln")["fastelectra"]
    for n in hidden:
        x, _, dy, weight, bias = make_inputs(rows, n, dtype)
        for name, value, shipped in one_at_a_time(layernorm, SWEEP):
            if name.startswith("FWD_TILE") and (name == "FWD_TILE_NARROW") != (n <= layernorm.NARROW_N):
                continue                    # the forward tile of the other row widths: no effect at n
            mode = "fwd" if name.startswith("FWD") else "fwd+bwd"
            row = dict(rows=rows, n=n, mode=mode, constant=name, value=value, shipped=shipped)
            try:
                row.update(time_contender(fused, x, weight, bias, None, dy, mode))
                row["gbps"] = bytes_moved(rows, n, elem, "ln", mode) / row["ms"] / 1e6
            except Exception as err:   # e.g. a shape that does not compile: record, go on
                row["skipped"] = skip_reason(err)
            results.append(row)
            print(f"N={n:5d} {mode:8s} {name}={value:<6d} "
                  + (f"{row['ms']:8.4f} ms {row['gbps']:7.0f} GB/s" if "ms" in row else row["skipped"]), flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON path (a .md table is written beside it)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--sweep", action="store_true",
                        help="instead: time the fused kernels under other launch shapes (see SWEEP)")
    args = parser.parse_args(argv)
    if args.rows < 1 or any(not 1 <= n <= 8192 for n in args.hidden):
        parser.error("--rows must be >= 1 and every --hidden in [1, 8192]")
    require_cuda("bench_layernorm")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    if args.sweep:
        results, truncated = until_interrupted(sweep, args.rows, args.hidden, dtype)
        table = rate_table(results, ["n", "mode", "constant", "value", "shipped", "ms", "GB/s", "ms_call"],
                           "gbps", "GB/s")
        write_results(args.out, {"benchmark": "layernorm_sweep", "config": {"dtype": args.dtype, "rows": args.rows,
                                                                            "hidden": args.hidden, "sweep": SWEEP},
                                 "results": results}, table, truncated)
        return 1 if truncated else 0
    results, truncated = until_interrupted(run, args.rows, args.hidden, args.cases, args.modes, dtype)
    add_ratios(results)
    targets = check_targets(results)
    table = rate_table(results, ["n", "case", "mode", "contender", "ms", "GB/s", "vs_eager", "vs_compile", "ms_call"],
                       "gbps", "GB/s")
    payload = {
        "benchmark": "layernorm",
        "config": {"dtype": args.dtype, "rows": args.rows, "hidden": args.hidden, "cases": args.cases,
                   "modes": args.modes, "dropout_p": DROPOUT, "eps": EPS, "gpu_slug": gpu_slug(),
                   "bytes": "each input read once + each output written once",
                   "timing": f"ms, GB/s: {TIMING}", "date": datetime.date.today().isoformat()},
        "targets": targets,
        "results": results,
    }
    write_results(args.out, payload, table + f"\n\ntargets: {targets}", truncated)
    return 1 if truncated else 0


if __name__ == "__main__":
    raise SystemExit(main())

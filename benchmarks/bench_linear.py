"""Linear-layer microbenchmark: the bias gradient's column sum, and a whole linear fwd+bwd.

The bias gradient of a linear layer is Σ_rows dy; torch reduces it with its generic reduction kernel,
which on an H100 read the 99 bias gradients of an ELECTRA-Base step at about 1.1 TB/s (3.4 ms of 51,
benchmarks/results/profile_*.md). fastelectra's FusedLinear sums them with two Triton launches
(kernels/linear.py).

Cases, rows M = 16384 (ELECTRA-Base: B=32 x T=512):
  colsum   dy (M, N) -> (N,) for the widths of ELECTRA's linears, N in {64, 256, 768, 1024, 2304, 3072},
           in bf16 (autocast training) and fp32 (training without autocast: its stage-1 kernel holds
           twice the accumulator registers per loaded byte)
           fastelectra        kernels.linear.column_sums
           torch-sum          dy.sum(0) (what autograd runs for nn.Linear's bias)
           torch-compile      torch.compile(lambda t: t.sum(0)) (inductor's generated reduction)
           GB/s counts dy read once.
  layer    fwd+bwd of one linear under bf16 autocast, fp32 parameters, (K -> N) in {768 -> 3072,
           3072 -> 768, 768 -> 2304}, and 768 -> 3072 followed by erf GELU (the feed-forward
           up-projection: activation backward and bias sum in one pass, fp32 parameter gradients
           without a bf16 round trip)
           fastelectra        nn.FusedLinear (backend fused; activation="gelu" for the last case)
           torch              nn.Linear (then F.gelu)
           torch-compile      torch.compile of the torch contender (inductor fuses the bias sum
                              and the GELU backward itself)

--sweep instead times the column sums under each of the launch constants in SWEEP, and the GELU
backward with its bias sum under ACT_SWEEP, one varied at a time from the shipped values, in each
dtype: the data to choose them from (the 2026-11-23 H100 run had inductor's reduction 1.2-3x faster
than ours).

    python -m benchmarks.bench_linear --out benchmarks/results/linear_<gpu>_<date>.json
    python -m benchmarks.bench_linear --sweep --out benchmarks/results/linear_sweep_<gpu>_<date>.json
"""
from __future__ import annotations

import argparse
import datetime

import torch

from .common import (TIMING, add_speedups, bench_ms, gpu_slug, rate_table, one_at_a_time, require_cuda, skip_reason,
                     until_interrupted, write_results)

ROWS = 16384
WIDTHS = (64, 256, 768, 1024, 2304, 3072)   # 64: the Small generator's hidden size
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYERS = ((768, 3072, None), (3072, 768, None), (768, 2304, None), (768, 3072, "gelu"))   # (K, N, activation)


def colsum_contenders():
    from fastelectra.kernels.linear import column_sums

    compiled = torch.compile(lambda t: t.sum(0))
    return {"fastelectra": column_sums, "torch-sum": lambda t: t.sum(0), "torch-compile": compiled}


def run_colsum(rows, widths, dtypes, results=None):
    results = [] if results is None else results
    fns = colsum_contenders()
    for dtype, n in ((d, n) for d in dtypes for n in widths):
        dy = torch.randn(rows, n, device="cuda", dtype=DTYPES[dtype])
        ref = dy.double().sum(0)
        for name, fn in fns.items():
            row = dict(case="colsum", dtype=dtype, m=rows, n=n, contender=name)
            try:
                err = (fn(dy).double() - ref).abs().max().item()
                row.update(bench_ms(lambda fn=fn: fn(dy)), max_abs_err=err)
                row["gbps"] = dy.numel() * dy.element_size() / row["ms"] / 1e6
            except Exception as err:  # noqa: BLE001 - a failing peer is a row, not an abort
                row.update(skipped=skip_reason(err))
            results.append(row)
            print(f"colsum {dtype} {rows}x{n:5d} {name:14s} " + (f"{row['ms']:.4f} ms {row['gbps']:6.0f} GB/s"
                                                         if "ms" in row else row["skipped"]), flush=True)
    return results


def run_layers(rows, layers, results=None):
    from fastelectra import ops
    from fastelectra.nn import FusedLinear

    results = [] if results is None else results
    for k, n, act in layers:
        torch.manual_seed(0)
        ref = torch.nn.Linear(k, n).cuda()
        fused = FusedLinear(k, n, activation=act, backend="fused").cuda()
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(rows, k, device="cuda", requires_grad=True)
        dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
        eager = (lambda t: ref(t)) if act is None else (lambda t: ops.ACTIVATIONS[act](ref(t)))
        for name, fn in (("fastelectra", fused), ("torch", eager), ("torch-compile", torch.compile(eager))):
            def step(fn=fn):
                with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                    y = fn(x)
                y.backward(dy)
                # fresh gradients every call: accumulating into them would time an extra read-add-write
                x.grad = None
                ref.zero_grad(set_to_none=True)
                fused.zero_grad(set_to_none=True)
            row = dict(case="layer", dtype="bf16", m=rows, k=k, n=n, activation=act or "-", contender=name)
            try:
                step()
                row.update(bench_ms(step))
                row["tflops"] = 3 * 2 * rows * k * n / row["ms"] / 1e9
            except Exception as err:  # noqa: BLE001
                row.update(skipped=skip_reason(err))
            results.append(row)
            print(f"layer  {rows}x{k}->{n} {act or '-':5s} {name:14s} "
                  + (f"{row['ms']:.4f} ms {row['tflops']:6.0f} TFLOP/s" if "ms" in row else row["skipped"]),
                  flush=True)
    return results


# Launch shapes to try with --sweep: the column sum's constants, read at each launch. Stage 1 is
# kernels/linear.py's; stage 2 is kernels/layernorm.py's, which also finishes the layer norm's dW/dB.
SWEEP = {
    "linear": {"PROGRAMS_PER_SM": (2, 4, 8, 16), "MIN_STEPS": (1, 2, 4, 8), "TILE_BYTES": (4096, 8192, 16384),
               # narrower column blocks: more stage-1 programs per row chunk, so fewer partial rows
               "MAX_BLOCK_N": (64, 128, 256)},
    # stage 2: the 2026-11-24 sweep timed 16 < 32 < 64 columns per program (more programs), so narrower too
    "layernorm": {"PARTIAL_BLOCK_N": (4, 8, 16, 32), "PARTIAL_TILE": (2048, 4096, 8192)},
}
# ... and the GELU backward's (activation_backward: dy and h read, dh written, dh summed). On sm_90 its
# bf16 stage 1 took 94 registers at 4096 bytes (5 programs per SM) and 40 at 2048. Its plan has its own
# constants: the column sum's moved to (4, 8) on the 2026-11-24 sweep, which did not vary these.
ACT_SWEEP = {"ACT_TILE_BYTES": (2048, 4096, 8192), "ACT_PROGRAMS_PER_SM": (2, 4, 8, 16),
             "ACT_MIN_STEPS": (1, 2, 4, 8)}


def sweep(rows, widths, dtypes, results=None):
    """Time column_sums under each launch constant in SWEEP, and the GELU backward under each in
    ACT_SWEEP, one varied at a time from the shipped values, with the error against a float64 sum and
    the number of partial rows (chunks) stage 1 plans."""
    from fastelectra.kernels import layernorm, linear
    from fastelectra.kernels.linear import _plan, _stage_one, activation_backward, column_sums

    results = [] if results is None else results
    modules = {"linear": linear, "layernorm": layernorm}
    for dtype, n in ((d, n) for d in dtypes for n in widths):
        dy = torch.randn(rows, n, device="cuda", dtype=DTYPES[dtype])
        h = torch.randn(rows, n, device="cuda", dtype=DTYPES[dtype])
        cases = {"colsum": (lambda: column_sums(dy), dy.double().sum(0), 1, 0, SWEEP)}
        dh = activation_backward(dy, h, "gelu")[0].double()          # the sum's reference: the dh it writes
        cases["gelu"] = (lambda: activation_backward(dy, h, "gelu", torch.float32)[1], dh.sum(0), 3,
                         linear.ACTIVATION_CODES["gelu"], {"linear": ACT_SWEEP})
        for case, (fn, ref, passes, code, sweep_constants) in cases.items():
            for module_name, constants in sweep_constants.items():
                for name, value, shipped in one_at_a_time(modules[module_name], constants):
                    row = dict(case=case, dtype=dtype, m=rows, n=n, constant=name, value=value, shipped=shipped,
                               chunks=_plan(rows, n, dy.device, *_stage_one(code, dy.element_size()))[2])
                    try:
                        row["max_abs_err"] = (fn().double() - ref).abs().max().item()
                        row.update(bench_ms(fn))
                        row["gbps"] = passes * dy.numel() * dy.element_size() / row["ms"] / 1e6
                    except Exception as err:  # noqa: BLE001 - a shape that does not compile: a row
                        row["skipped"] = skip_reason(err)
                    results.append(row)
                    print(f"{case} {dtype} {rows}x{n:5d} {name}={value:<5d} chunks {row['chunks']:5d} "
                          + (f"{row['ms']:.4f} ms {row['gbps']:6.0f} GB/s" if "ms" in row else row["skipped"]),
                          flush=True)
    return results


def add_ratios(results):
    """fastelectra rows get speedup = peer ms / fastelectra ms, per case."""
    add_speedups(results, lambda r: (r["case"], r["dtype"], r["m"], r.get("k"), r["n"], r.get("activation")),
                 lambda r: r["contender"] == "fastelectra")
    for r in results:
        if "speedup" in r:
            r["vs_torch"] = r["speedup"].get("torch-sum", r["speedup"].get("torch"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON path (a .md table is written beside it)")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="dtypes of the column sums (the layer cases run bf16 autocast)")
    parser.add_argument("--no-layers", action="store_true", help="only the column sums")
    parser.add_argument("--sweep", action="store_true",
                        help="instead: time the column sums under other launch constants (see SWEEP)")
    args = parser.parse_args(argv)
    if args.rows < 1 or min(args.widths) < 1:
        parser.error("--rows and --widths must be positive")
    require_cuda("bench_linear")
    if args.sweep:
        results, truncated = until_interrupted(sweep, args.rows, args.widths, args.dtypes)
        table = rate_table(results, ["case", "dtype", "m", "n", "constant", "value", "shipped", "chunks", "ms",
                                     "GB/s", "max_abs_err", "ms_call"], "gbps", "GB/s")
        write_results(args.out, {"benchmark": "linear_sweep",
                                 "config": {"rows": args.rows, "widths": args.widths, "dtypes": args.dtypes,
                                            "sweep": SWEEP, "act_sweep": ACT_SWEEP,
                                            "timing": f"ms: {TIMING}", "date": datetime.date.today().isoformat()},
                                 "results": results}, table, truncated)
        return 1 if truncated else 0
    colsum_rows, truncated = until_interrupted(run_colsum, args.rows, args.widths, args.dtypes)
    layer_rows = []
    if not args.no_layers and not truncated:
        layer_rows, truncated = until_interrupted(run_layers, args.rows, LAYERS)
    results = colsum_rows + layer_rows
    add_ratios(results)
    colsum = rate_table(colsum_rows, ["dtype", "m", "n", "contender", "ms", "GB/s", "vs_torch", "max_abs_err", "ms_call"],
                        "gbps", "GB/s")
    layers = rate_table(layer_rows,
                        ["m", "k", "n", "activation", "contender", "ms", "TFLOP/s", "vs_torch", "ms_call"], "tflops",
                        "TFLOP/s")
    payload = {"benchmark": "linear",
               "config": {"rows": args.rows, "widths": args.widths, "layers": [] if args.no_layers else LAYERS,
                          "dtypes": args.dtypes, "gpu_slug": gpu_slug(), "bytes": "colsum: dy read once",
                          "timing": f"ms: {TIMING}", "date": datetime.date.today().isoformat()},
               "results": results}
    write_results(args.out, payload, "## bias-gradient column sums\n\n" + colsum
                  + "\n\n## linear fwd+bwd, bf16 autocast\n\n" + layers, truncated)
    return 1 if truncated else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``fastelectra bench NAME [ARGS...]``: run one benchmark, or all of them, with the benchmark's own options.

ARGS go to the benchmark's own argument parser (``fastelectra bench pretrain --help`` lists them); the same
benchmark runs as ``python -m benchmarks.<module>`` from the repository root. ``all`` runs every benchmark
with its defaults, one after the other, and goes on past a failing one (``--out-dir DIR`` writes each
result as DIR/<name>_<gpu>_<date>.json). Without a GPU a GPU benchmark says so and exits non-zero.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import traceback

# name -> (module in this package, what it measures)
BENCHMARKS = {
    "layernorm": ("bench_layernorm", "fused (dropout + residual +) layer norm vs F.layer_norm and torch.compile"),
    "attention": ("bench_attention", "Triton flash attention vs the SDPA backends and eager attention"),
    "linear": ("bench_linear", "the bias-gradient column sum and linear fwd+bwd vs torch's reduction"),
    "replace": ("bench_replace", "the replace_tokens op vs eager Gumbel-max and torch.multinomial"),
    "pretrain": ("bench_pretrain", "sequences/s of the full training step, fastelectra vs HF transformers"),
    "convergence": ("convergence", "loss curves of backend fused vs eager agree within run-to-run noise"),
    "profile": ("profile_step", "where a training step's time goes: GPU-busy vs wall time, top kernels"),
}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {n:12s} {h}" for n, (_, h) in BENCHMARKS.items()) + (
        "\n  all          every benchmark above with its defaults (option: --out-dir DIR)")
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark (see below)")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="options of that benchmark (fastelectra bench NAME --help lists them)")


def run_one(name: str, argv: list[str]) -> int:
    """Run benchmark ``name``'s main(argv); its exit status (a SystemExit message is printed, status 1)."""
    module = importlib.import_module(f"{__package__}.{BENCHMARKS[name][0]}")
    prog = sys.argv[0]
    sys.argv[0] = f"fastelectra bench {name}"   # what the benchmark's argparse shows as its usage line
    try:
        return int(module.main(argv) or 0)
    except SystemExit as e:                     # argparse (--help: 0, bad option: 2) or require_cuda (message)
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(f"error: {e.code}", file=sys.stderr)
        return 1
    finally:
        sys.argv[0] = prog


def run_all(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastelectra bench all", description="every benchmark, defaults")
    parser.add_argument("--out-dir", help="write each result as OUT_DIR/<name>_<gpu>_<date>.json (+ .md, .png)")
    args = parser.parse_args(argv)
    from .common import gpu_slug, require_cuda

    try:
        require_cuda("fastelectra bench all")
    except SystemExit as e:
        print(f"error: {e.code}", file=sys.stderr)
        return 1
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    failed = []
    for name in BENCHMARKS:
        out = [] if not args.out_dir else ["--out", os.path.join(args.out_dir, f"{name}_{gpu_slug()}_{date}.json")]
        print(f"== fastelectra bench {name} {' '.join(out)}", flush=True)
        try:
            code = run_one(name, out)
        except Exception:                       # one benchmark crashing must not hide the others
            traceback.print_exc()
            code = 1
        if code:
            failed.append(name)
    print("all benchmarks finished" if not failed else f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def run_cli(args: argparse.Namespace) -> int:
    return run_all(args.args) if args.name == "all" else run_one(args.name, args.args)

"""Static cost of the attention kernels' inner loops: compile for sm_90 (no GPU needed), count SASS.

The attention kernels are issue-bound on an H100: per 64x64 tile the tensor cores need ~256 cycles,
the loop body issues more warp instructions than that. So the instruction count of the inner loop
predicts throughput well (2026-11-22: the counts of the then-current kernels predicted the measured
mask+dropout/no-dropout fwd+bwd ratio, 108 vs 260 TFLOP/s, within 2%), and it can be read on a machine
without a GPU: Triton compiles for a target it is given and ships ptxas and nvdisasm.

    python -m benchmarks.sass_loops                 # the H100 winning configs, dropout on and off
    python -m benchmarks.sass_loops --json out.json

For each kernel and tile config: SASS instructions in the main loop (per warp and iteration),
shared-memory stores/loads in it (a layout conversion shows up as STS/LDS + BAR), registers and spill
stores of the whole kernel. Pointer and stride arguments get the 16-divisibility the JIT would infer
at real shapes (without it no load is vectorised or pipelined and the counts mean nothing).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

__all__ = ["compile_sm90", "loop_stats", "main"]

_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "DO": "*bf16", "DQ": "*bf16",
             "DK": "*bf16", "DV": "*bf16", "Lse": "*fp32", "Delta": "*fp32", "KeyMask": "*u8",
             "KeyLens": "*i32", "CuSeqlens": "*i32", "Seed": "*i64"}
_FLOATS = {"qk_scale", "sm_scale", "drop_scale"}
_DIVISIBLE = re.compile(r"^(stride_.*|seqlen_q|seqlen_k)$")
# (kernel, BLOCK_M, BLOCK_N, num_warps): the autotuner's winners on the H100 at D=64 (attention.py)
DEFAULT_CASES = [("fwd", 64, 64, 4), ("fwd", 128, 64, 4), ("dkdv", 64, 64, 4), ("dq", 64, 64, 4),
                 ("dq", 128, 64, 8)]


def _nvidia_bin(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_sm90(kernel: str, block_m: int, block_n: int, num_warps: int, num_stages: int = 3, *,
                 dropout: bool = True, has_mask: bool = True, head_dim: int = 64) -> bytes:
    """cubin of one attention kernel ("fwd", "dkdv", "dq") for sm_90, bf16, dense layout."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastelectra.kernels import attention as A

    fn = {"fwd": A._attn_fwd_kernel, "dkdv": A._attn_bwd_dkdv_kernel, "dq": A._attn_bwd_dq_kernel}[kernel]
    consts = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_MASK=has_mask, HAS_LENS=False,
                  VARLEN=False, IS_DROPOUT=dropout, DOT_PRECISION="tf32")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            continue
        signature[name] = _POINTERS.get(name) or ("fp32" if name in _FLOATS else "i32")
        if name in _POINTERS or _DIVISIBLE.match(name):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, consts, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.asm["cubin"]


def _opcode(text: str) -> str:
    return re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", text).group(1)


def loop_stats(cubin: bytes) -> dict:
    """Instruction counts of the main loop (the longest backward branch's body) and the kernel's
    registers and spills."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_nvidia_bin("nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
    instrs, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instrs)
            continue
        ins = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if ins:
            instrs.append(ins.group(1))
    loops = []
    for i, text in enumerate(instrs):
        target = re.search(r"BRA\s.*?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), i + 1) < i:   # a backward branch closes a loop
            loops.append((labels[target.group(1)], i))
    start, end = max(loops, key=lambda se: se[1] - se[0]) if loops else (0, len(instrs) - 1)
    ops = collections.Counter(_opcode(t) for t in instrs[start:end + 1])
    regs = re.search(r"REG:(\d+)", usage)
    return {"loop_instructions": end - start + 1, "loop_sts": ops["STS"], "loop_lds": ops["LDS"],
            "loop_hgmma": ops["HGMMA"], "registers": int(regs.group(1)) if regs else None,
            "spill_stores": sum(1 for t in instrs if _opcode(t) == "STL"),
            "top_ops": dict(ops.most_common(8))}


def _case(text: str):
    kernel, bm, bn, warps = text.split(",")
    if kernel not in ("fwd", "dkdv", "dq"):
        raise argparse.ArgumentTypeError(f"--case: kernel must be fwd, dkdv or dq, got {kernel!r}")
    return kernel, int(bm), int(bn), int(warps)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--case", type=_case, action="append", metavar="KERNEL,BLOCK_M,BLOCK_N,WARPS",
                        help="e.g. fwd,64,64,4 (repeatable; default: the H100 autotuning winners)")
    parser.add_argument("--dropout-only", action="store_true", help="skip the no-dropout variants")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels would be built with their interpreter "
                     "branches; unset it to read the code a GPU runs")
    rows = []
    for kernel, bm, bn, warps in args.case or DEFAULT_CASES:
        for dropout in (True,) if args.dropout_only else (False, True):
            stats = loop_stats(compile_sm90(kernel, bm, bn, warps, dropout=dropout))
            rows.append({"kernel": kernel, "tile": f"{bm}x{bn}", "warps": warps, "dropout": dropout, **stats})
    print("| kernel | tile | warps | dropout | loop instrs | loop STS/LDS | regs | spill stores |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['tile']} | {r['warps']} | {r['dropout']} | {r['loop_instructions']} "
              f"| {r['loop_sts']}/{r['loop_lds']} | {r['registers']} | {r['spill_stores']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""Static cost of the kernels' inner loops: compile for sm_90 (no GPU needed), count SASS.

The attention kernels are issue-bound on an H100: per 64x64 tile the tensor cores need ~256 cycles,
the loop body issues more warp instructions than that. So the instruction count of the inner loop
predicts throughput well (2026-11-22: the counts of the then-current kernels predicted the measured
mask+dropout/no-dropout fwd+bwd ratio, 108 vs 260 TFLOP/s, within 2%), and it can be read on a machine
without a GPU: Triton compiles for a target it is given and ships ptxas and cuobjdump.

    python -m benchmarks.sass_loops                 # the autotuning candidates at d=64, dropout on and off
    python -m benchmarks.sass_loops --case fwd,64,64,4,2,128   # one tile: warps, stages, register cap
    python -m benchmarks.sass_loops --json out.json
    python -m benchmarks.sass_loops --replace       # the replace_tokens CUDA kernel (needs nvcc)

For each kernel and tile config: SASS instructions in the main loop (per warp and iteration; for the
forward and dQ kernels the loop over full tiles of valid keys, with the loop over the tiles that need
the key mask beside it), shared-memory stores/loads in it (a layout conversion shows up as STS/LDS +
BAR), registers and spill stores of the whole kernel, its shared memory, and how many of its programs
an H100 SM holds at once (registers, shared memory, warps). Pointer and stride arguments get the
16-divisibility the JIT would infer at real shapes (without it no load is vectorised or pipelined
and the counts mean nothing).

--replace compiles csrc/replace_tokens_kernel.cu with nvcc and reports, per kernel variant, the
instructions per logit element on the hot path of its vector loop: the loop body without the
out-of-line survivor calls of the noise filter, which run for a few elements per row. That kernel is
issue-bound too (2026-11-22, H100: 0.85 TB/s of bf16 logits with the lse at ~42 instructions per element).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

__all__ = ["compile_kernel", "compile_sm90", "kernel_cases", "compile_all", "loop_stats", "programs_per_sm",
           "replace_kernel_stats", "main"]

_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "DO": "*bf16", "DQ": "*bf16",
             "DK": "*bf16", "DV": "*bf16", "Lse": "*fp32", "Delta": "*fp32", "KeyMask": "*u8",
             "KeyLens": "*i32", "CuSeqlens": "*i32", "Seed": "*i64"}
_FLOATS = {"qk_scale", "sm_scale", "drop_scale"}
_DIVISIBLE = re.compile(r"^(stride_.*|seqlen_q|seqlen_k)$")


def _nvidia_bin(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_kernel(fn, consts: dict, pointers: dict[str, str], *, floats=(), divisible=None, num_warps: int = 4,
                   num_stages: int = 3, maxnreg: int | None = None, info: dict | None = None) -> bytes:
    """cubin of the @triton.jit kernel ``fn`` for sm_90, as the JIT would build it: pointer arguments
    of the given types (e.g. "*bf16"), ``floats`` fp32, the other runtime arguments i32; pointers and
    the names in ``divisible`` (default: ``_DIVISIBLE``'s) get the 16-divisibility the JIT infers at
    real shapes; ``maxnreg`` caps the registers per thread, as a triton.Config's does. ``info``, if given,
    receives the kernel's shared memory in bytes ("shared")."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastelectra.kernels.launch import COMPILE_OPTIONS

    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name) or ("fp32" if name in floats else "i32")
        if name in pointers or (name in divisible if divisible is not None else _DIVISIBLE.match(name)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, consts, attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages, **COMPILE_OPTIONS)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    if info is not None:
        info["shared"] = compiled.metadata.shared
    return compiled.asm["cubin"]


def compile_sm90(kernel: str, block_m: int, block_n: int, num_warps: int, num_stages: int = 3, *,
                 dropout: bool = True, has_mask: bool = True, head_dim: int = 64, maxnreg: int | None = None,
                 info: dict | None = None) -> bytes:
    """cubin of one attention kernel ("fwd", "dkdv", "dq") for sm_90, bf16, dense layout."""
    from fastelectra.kernels import attention as A

    fn = {"fwd": A._attn_fwd_kernel, "dkdv": A._attn_bwd_dkdv_kernel, "dq": A._attn_bwd_dq_kernel}[kernel]
    consts = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_MASK=has_mask, HAS_LENS=False,
                  VARLEN=False, IS_DROPOUT=dropout, F16_DRAWS=True, DOT_PRECISION="tf32")
    return compile_kernel(fn, consts, _POINTERS, floats=_FLOATS, num_warps=num_warps, num_stages=num_stages,
                          maxnreg=maxnreg, info=info)


def kernel_cases() -> list[dict]:
    """Every Triton kernel of fastelectra in the variants its launchers build for ELECTRA's shapes:
    each dtype pair, each fused-feature flag, the tile configs the launchers (or the attention
    autotuner, after its pruning) pick, every supported head dim. Block sizes come from the
    launchers' own planning functions."""
    import torch
    import triton

    from fastelectra.kernels import attention as A
    from fastelectra.kernels import cross_entropy as C
    from fastelectra.kernels import layernorm as L
    from fastelectra.kernels import linear as N

    cases = []

    def add(op, fn, variant, consts, pointers, floats=(), divisible=(), num_warps=4, num_stages=3, maxnreg=None):
        cases.append(dict(op=op, kernel=fn.fn.__name__, variant=variant,
                          fn=fn, consts=consts, pointers=pointers, floats=set(floats),
                          divisible=None if divisible is None else set(divisible), num_warps=num_warps,
                          num_stages=num_stages, maxnreg=maxnreg))

    # layer norm: x dtype with the weight's (under autocast the weights stay fp32), flags, widths
    ln_flags = [(True, True, True, True), (True, False, True, True), (False, False, True, True),
                (False, False, False, False)]    # residual, dropout, weight, bias
    for x_t, w_t in (("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32")):
        for n in (768, 200, 8192):
            for res, drop, w, b in ln_flags:
                flags = dict(HAS_RESIDUAL=res, HAS_DROPOUT=drop, HAS_WEIGHT=w, HAS_BIAS=b)
                label = f"x {x_t}, w {w_t}, n {n}, " + ",".join(k[4:].lower() for k, v in flags.items() if v)
                div = {"n"} if n % 16 == 0 else set()
                bm, bn, warps = L._launch_config(n, L._fwd_tile(n), L.FWD_ELEMS_PER_THREAD)
                # the training forward stores mean and rstd; without dropout also the inference one, without
                for stats in (True,) if drop else (True, False):
                    add("layer_norm", L._layer_norm_fwd_kernel, label + ("" if stats else ", no stats"),
                        {**flags, "STORE_STATS": stats, "BLOCK_M": bm, "BLOCK_N": bn},
                        {"X": "*" + x_t, "Res": "*" + x_t, "W": "*" + w_t, "B": "*" + w_t, "Y": "*" + x_t,
                         "Mean": "*fp32", "Rstd": "*fp32", "Seed": "*i64"}, ("eps", "scale"), div, warps)
                bm, bn, warps = L._launch_config(n, L.BWD_TILE, L.BWD_ELEMS_PER_THREAD)
                add("layer_norm", L._layer_norm_bwd_kernel, label,
                    {**flags, "STORE_DRES": res, "BLOCK_M": bm, "BLOCK_N": bn},
                    {"DY": "*" + x_t, "X": "*" + x_t, "Res": "*" + x_t, "W": "*" + w_t, "Mean": "*fp32",
                     "Rstd": "*fp32", "DX": "*" + x_t, "DRes": "*" + x_t, "DW": "*fp32", "DB": "*fp32",
                     "Seed": "*i64"}, ("scale",), div | {"rows_per_program"}, warps)
    for out_t in ("fp32", "bf16", "fp16"):
        block_p = min(L.PARTIAL_TILE // L.PARTIAL_BLOCK_N, L._next_power_of_2(1056))
        add("layer_norm / linear", L._sum_partials_kernel, f"out {out_t}",
            {"BLOCK_P": block_p, "BLOCK_N": L.PARTIAL_BLOCK_N},
            {"Part": "*fp32", "Out0": "*" + out_t, "Out1": "*" + out_t}, (), {"n"})
    bm, bn, warps = L._launch_config(768, L._fwd_tile(768), L.FWD_ELEMS_PER_THREAD)
    add("layer_norm", L._dropout_mask_kernel, "n 768", {"BLOCK_M": bm, "BLOCK_N": bn},
        {"Keep": "*u8", "Seed": "*i64"}, (), {"n"}, warps)

    # linear: the bias gradient's column sums, alone and with each activation's backward
    cpu = torch.device("cpu")
    for x_t in ("bf16", "fp16", "fp32"):
        for name, code in [("sum", 0), *N.ACTIVATION_CODES.items()]:
            for n in (768, 3072, 2):
                bm, bn, _, _ = N._plan(16384, n, cpu, *N._stage_one(code, 4 if x_t == "fp32" else 2))
                add("linear", N._column_partial_sums_kernel, f"{x_t}, {name}, n {n}",
                    {"ACTIVATION": code, "BLOCK_M": bm, "BLOCK_N": bn, "WIDE": False},
                    {"X": "*" + x_t, "H": "*" + x_t, "DH": "*" + x_t, "Part": "*fp32"}, (),
                    {"n", "stride_m", "rows_per_program"} if n % 16 == 0 else {"rows_per_program"}, N.NUM_WARPS)

    # the MLM loss's backward from the lse: each dtype, rows aligned alike or not
    for x_t, size in (("bf16", 2), ("fp16", 2), ("fp32", 4)):
        for align in (16 // size, 1):
            add("cross_entropy", C._cross_entropy_bwd_kernel, f"{x_t}, align {align}",
                {"ALIGN": align, "BLOCK_V": C.BLOCK_V},
                {"Logits": "*" + x_t, "Targets": "*i64", "Lse": "*fp32", "DLoss": "*fp32", "DLogits": "*" + x_t},
                (), set(), C.NUM_WARPS)

    # attention: the autotuner's configs that survive its pruning, ELECTRA's case (prefix mask as a bool
    # mask + dropout) and the plain one at D = 64; every head dim with lengths, varlen, fp16 and fp32
    class _Like:                                    # what _prune reads of the q tensor
        def __init__(self, size):
            self.size = size

        def element_size(self):
            return self.size

    kernels = (("fwd", A._attn_fwd_kernel), ("dkdv", A._attn_bwd_dkdv_kernel), ("dq", A._attn_bwd_dq_kernel))
    variants = [("bf16", 64, dict(HAS_MASK=True, IS_DROPOUT=True), "all"),
                ("bf16", 64, dict(), "all")]
    for d in (16, 32, 64, 128):
        variants += [("fp16", d, dict(HAS_LENS=True, IS_DROPOUT=True), "first"),
                     ("bf16", d, dict(VARLEN=True, IS_DROPOUT=True), "first")]
    variants += [("fp32", 64, dict(HAS_MASK=True, IS_DROPOUT=True), "all"),
                 ("fp32", 128, dict(HAS_MASK=True), "all"),
                 ("bf16", 64, dict(HAS_MASK=True, IS_DROPOUT=True, F16_DRAWS=False), "first")]  # p > 0.96875
    for kernel, fn in kernels:
        shapes = A._CANDIDATES[kernel]
        for x_t, d, flags, which in variants:
            size = 4 if x_t == "fp32" else 2
            configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                       for bm, bn, w, st, _ in shapes]
            configs = A._prune(configs, {"HEAD_DIM": d, "Q": _Like(size), "seq_bucket": 512,
                                         "IS_DROPOUT": flags.get("IS_DROPOUT", False)},
                               register_caps=A._register_caps(shapes))
            for cfg in configs if which == "all" else configs[:1]:
                consts = {"HEAD_DIM": d, "HAS_MASK": False, "HAS_LENS": False, "VARLEN": False, "IS_DROPOUT": False,
                          "F16_DRAWS": True, "DOT_PRECISION": "ieee" if x_t == "fp32" else "tf32", **flags,
                          **cfg.kwargs}
                pointers = {k: ("*" + x_t if v == "*bf16" else v) for k, v in _POINTERS.items()}
                label = (f"{x_t}, d {d}, {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}/{cfg.num_warps}w"
                         f"/{cfg.num_stages}s" + (f"/max {cfg.maxnreg} regs" if cfg.maxnreg else "") + ", "
                         + (",".join(k.lower() if v else "no " + k.lower() for k, v in flags.items()) or "plain"))
                add("attention", fn, label, consts, pointers, _FLOATS, None, cfg.num_warps, cfg.num_stages,
                    cfg.maxnreg)
    for f16 in (True, False):
        add("attention", A._dropout_mask_kernel, "16x32" + ("" if f16 else ", no f16_draws"),
            {"BLOCK_M": 16, "BLOCK_N": 32, "F16_DRAWS": f16}, {"Keep": "*i8", "Seed": "*i64"}, (), set(), 4)
    return cases


def _compile_case(c: dict) -> dict:
    row = {k: c[k] for k in ("op", "kernel", "variant", "num_warps")}
    try:
        cubin = compile_kernel(c["fn"], c["consts"], c["pointers"], floats=c["floats"], divisible=c["divisible"],
                               num_warps=c["num_warps"], num_stages=c["num_stages"], maxnreg=c["maxnreg"])
    except Exception as e:                          # reported per case: one broken variant hides no other
        return {**row, "registers": "-", "spill_stores": "-", "error": f"{type(e).__name__}: {e}"[:300]}
    instrs, regs = _kernel_sass(cubin)
    looped = _in_loops(instrs)
    return {**row, "registers": regs, "spill_stores": _spills(instrs), "loop_spill_stores": _spills(looped),
            "loop_spill_loads": _spill_loads(looped), "loads_waited": _loads_waited(instrs), "error": ""}


_worker_cases: list[dict] = []     # kernel_cases() of a compile_all worker process, built once per process


def _init_worker() -> None:
    _worker_cases.extend(kernel_cases())           # the cases hold kernel objects, which do not pickle


def _compile_case_at(index: int) -> dict:
    return _compile_case(_worker_cases[index])


def compile_all(jobs: int | None = None) -> list[dict]:
    """Compiles every case of kernel_cases() for sm_90 on ``jobs`` processes (default: one per CPU):
    per case its registers and spill stores, or the compiler's error."""
    import concurrent.futures
    import multiprocessing

    cases = kernel_cases()
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(cases)))
    if jobs == 1:
        return [_compile_case(c) for c in cases]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_init_worker) as pool:
        return list(pool.map(_compile_case_at, range(len(cases))))


_PREDICATE = r"@!?U?P\w+\s+"     # an instruction's guard, e.g. "@!P0 "


def _opcode(text: str) -> str:
    return re.match(rf"(?:{_PREDICATE})?([A-Z0-9_]+)", text).group(1)


def _disassemble(path: str) -> dict[str, list[str]]:
    """SASS of every function in a cubin: name -> instructions (branch targets as indices, "@i")."""
    sass = subprocess.run([_nvidia_bin("cuobjdump"), "-sass", path], capture_output=True, text=True,
                          check=True).stdout
    functions, name = {}, None
    for line in sass.splitlines():
        header = re.match(r"\s+Function : (\S+)", line)
        if header:
            name = header.group(1)
            functions[name] = []
            continue
        ins = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if ins and name is not None:
            functions[name].append((int(ins.group(1), 16), ins.group(2)))
    out = {}
    for name, rows in functions.items():
        index = {addr: i for i, (addr, _) in enumerate(rows)}
        out[name] = [re.sub(r"(\bBRA\b.*?)0x([0-9a-f]+)",
                            lambda m: f"{m.group(1)}@{index.get(int(m.group(2), 16), -1)}", text)
                     for _, text in rows]
    return out


def _branch_target(text: str):
    target = re.search(r"\bBRA\b.*?@(-?\d+)", text)
    return int(target.group(1)) if target else None


def _loops(instrs: list[str]) -> list[tuple[int, int]]:
    """(first, last) instruction of every loop: the body of each backward branch."""
    return [(t, i) for i, text in enumerate(instrs) if (t := _branch_target(text)) is not None and 0 <= t < i]


def _registers(path: str) -> dict[str, int]:
    usage = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                           check=True).stdout
    return dict((m.group(1), int(m.group(2)))
                for m in re.finditer(r"Function (\S+):\s*\n?\s*REG:(\d+)", usage))


def _spills(instrs: list[str]) -> int:
    return sum(1 for t in instrs if _opcode(t) == "STL")


def _spill_loads(instrs: list[str]) -> int:
    return sum(1 for t in instrs if _opcode(t) == "LDL")


def _in_loops(instrs: list[str]) -> list[str]:
    """The instructions inside any loop, each once."""
    inside = sorted({i for a, b in _loops(instrs) for i in range(a, b + 1)})
    return [instrs[i] for i in inside]


def _registers_read(text: str) -> set[int]:
    """General registers an instruction reads: every R operand after the first (the destination), all of
    them for stores and reductions; a 64-bit pair (R12.64) counts both."""
    body = re.sub("^" + _PREDICATE, "", text)
    opcode, _, operands = body.partition(" ")
    parts = operands.split(",")
    read = parts if opcode.startswith(("ST", "RED", "ATOM")) else parts[1:]
    regs = set()
    for part in read:
        for r, wide in re.findall(r"\bR(\d+)(\.64)?", part):
            regs.update((int(r), int(r) + 1) if wide else (int(r),))
    return regs


def _loads_waited(instrs: list[str]) -> int | None:
    """How many global loads of the kernel's first loop that has any are read (their destination
    registers) later in the same iteration: each makes the warp wait a memory round trip inside the
    iteration, where a load read only in the next iteration overlaps this one's work. None without
    such a loop."""
    width = {".64": 2, ".128": 4}
    for start, end in _loops(instrs):
        body = instrs[start:end + 1]
        loads = [(i, m) for i, t in enumerate(body) if (m := re.search(r"\bLDG\.E(\.64|\.128)?\S*\s+R(\d+)", t))]
        if not loads:
            continue
        waited = 0
        for i, m in loads:
            dest = set(range(int(m.group(2)), int(m.group(2)) + width.get(m.group(1), 1)))
            waited += any(_registers_read(t) & dest for t in body[i + 1:])
        return waited
    return None


def _stats(instrs: list[str], start: int, end: int) -> dict:
    ops = collections.Counter(_opcode(t) for t in instrs[start:end + 1])
    return {"loop_instructions": end - start + 1, "loop_sts": ops["STS"], "loop_lds": ops["LDS"],
            "loop_hgmma": ops["HGMMA"] + ops["HMMA"], "top_ops": dict(ops.most_common(8))}


def _kernel_sass(cubin: bytes) -> tuple[list[str], int | None]:
    """(SASS instructions, registers) of a cubin holding one kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        (name, instrs), = _disassemble(path).items()
        return instrs, _registers(path).get(name)


def loop_stats(cubin: bytes) -> dict:
    """Instruction counts of the kernel's tile loops (the loops that issue tensor-core instructions),
    and its registers and spills. The forward and dQ kernels have two: full tiles of valid keys, which
    take no key mask ("loop_*"), then the tiles that hold the end of the keys or, for a mask with
    holes, every tile ("masked_*"); dK/dV has one."""
    instrs, regs = _kernel_sass(cubin)
    loops = sorted({(a, b) for a, b in _loops(instrs)
                    if any(_opcode(t) in ("HGMMA", "HMMA") for t in instrs[a:b + 1])})
    if not loops:
        loops = [(0, len(instrs) - 1)]
    out = {**_stats(instrs, *loops[0]), "tile_loops": len(loops), "registers": regs,
           "spill_stores": _spills(instrs)}
    if len(loops) > 1:
        out.update({"masked_" + k: v for k, v in _stats(instrs, *loops[-1]).items()})
    return out




def programs_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Programs (thread blocks) of a kernel an H100 SM holds at once: 64K registers (allocated per warp
    in units of 256), 228 KB of shared memory (1 KB of it reserved per block), 64 warps, 32 blocks."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (per_warp * num_warps), 228 * 1024 // (shared + 1024), 64 // num_warps, 32)


def _nvcc() -> str | None:
    import shutil
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.join(home, "bin", "nvcc") if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def replace_kernel_stats() -> list[dict]:
    """Per variant of the replace_tokens CUDA kernel (dtype, noise, lse, tau = 1): instructions on the
    hot path of the vector loop, per iteration (a window of two steps) and per logit element, and
    registers / spills (in the whole kernel and in the loop)."""
    from fastelectra.extension import CSRC

    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH or CUDA_HOME/bin): --replace compiles csrc/ with it")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "replace.cubin")
        subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-I", CSRC, "-o", path,
                        os.path.join(CSRC, "replace_tokens_kernel.cu")], check=True, capture_output=True)
        functions, registers = _disassemble(path), _registers(path)
    rows = []
    for name, instrs in functions.items():
        variant = re.search(r"replace_tokens_kernelI(13__nv_bfloat16|6__half|f)Lb(\d)ELb(\d)ELb(\d)E", name)
        if not variant:
            continue
        dtype = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}[variant.group(1)]
        # the vector loop: of the loops that read the most 16-byte vectors from the ring of steps in shared
        # memory (LDS.128; the loop also copies later steps in: LDGSTS, cp.async) the innermost
        def loads(se):
            return sum(_opcode(t) == "LDS" and ".128" in t for t in instrs[se[0]:se[1] + 1])
        loops = [(a, b) for a, b in _loops(instrs) if loads((a, b)) > 0]
        most = max(loads(se) for se in loops)
        start, end = min((se for se in loops if loads(se) == most), key=lambda se: se[1] - se[0])
        # cold: the innermost forward branches that jump over an out-of-line call or a shared-memory atomic
        # (the rare vectors that pass the noise filter: their enqueue, the settling of the warp's queue)
        skips = [(i, t) for i in range(start, end + 1)
                 if instrs[i].startswith("@") and (t := _branch_target(instrs[i])) is not None and i < t <= end + 1
                 and any("CALL" in x or "ATOMS" in x for x in instrs[i + 1:t])]
        inner = [s for s in skips if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in skips)]
        cold = {j for i, t in inner for j in range(i + 1, t)}
        hot = [instrs[j] for j in range(start, end + 1) if j not in cold]
        # per lane and loop iteration: one 16-byte vector per read (two per step; the loop may hold two steps)
        elements = loads((start, end)) * (8 if dtype != "fp32" else 4)
        ops = collections.Counter(_opcode(t) for t in hot)
        rows.append({"kernel": "replace_tokens", "dtype": dtype, "noise": variant.group(2) == "1",
                     "lse": variant.group(3) == "1", "unit_tau": variant.group(4) == "1",
                     "hot_instructions": len(hot), "elements": elements,
                     "per_element": round(len(hot) / elements, 2), "hot_calls": ops["CALL"],
                     "hot_mufu": ops["MUFU"], "registers": registers.get(name),
                     "spill_stores": _spills(instrs),
                     "loop_spill_stores": _spills(instrs[start:end + 1]),
                     "loop_spill_loads": _spill_loads(instrs[start:end + 1]),
                     "top_ops": dict(ops.most_common(8))})
    return rows


def _case(text: str):
    """--case KERNEL,BLOCK_M,BLOCK_N,WARPS[,STAGES[,MAXNREG]] -> (kernel, bm, bn, warps, stages, cap
    without dropout, cap with dropout): an explicit cap applies to both variants."""
    kernel, *numbers = text.split(",")
    if kernel not in ("fwd", "dkdv", "dq"):
        raise argparse.ArgumentTypeError(f"--case: kernel must be fwd, dkdv or dq, got {kernel!r}")
    if not 3 <= len(numbers) <= 5 or not all(n.strip().isdigit() for n in numbers):
        raise argparse.ArgumentTypeError(f"--case: expected KERNEL,BLOCK_M,BLOCK_N,WARPS[,STAGES[,MAXNREG]], got {text!r}")
    bm, bn, warps, stages, cap = [int(n) for n in numbers] + [3, None][len(numbers) - 3:]
    return kernel, bm, bn, warps, stages, cap, cap


def _shipped_cases() -> list[tuple]:
    """The autotuner's candidates at headdim 64, as _case returns them: the register cap (if any) with
    dropout only, as kernels/attention.py's _prune applies it."""
    from fastelectra.kernels import attention as A

    return [(kernel, bm, bn, warps, stages, None, cap)
            for kernel, shapes in A._CANDIDATES.items()
            for bm, bn, warps, stages, cap in shapes]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--case", type=_case, action="append", metavar="KERNEL,BLOCK_M,BLOCK_N,WARPS[,STAGES[,MAXNREG]]",
                        help="e.g. fwd,64,64,4 or fwd,64,64,4,2,128 (repeatable; stages default to 3; default: "
                             "the autotuner's candidates at headdim 64, capped with dropout where it caps them)")
    parser.add_argument("--dropout-only", action="store_true", help="skip the no-dropout variants")
    parser.add_argument("--replace", action="store_true",
                        help="the replace_tokens CUDA kernel (csrc/, compiled with nvcc) instead of attention")
    parser.add_argument("--all", action="store_true",
                        help="compile every Triton kernel in the variants its launchers build (kernel_cases): "
                             "registers, spills, or the compiler's error")
    parser.add_argument("--jobs", type=int, help="--all: compiler processes (default: one per CPU)")
    args = parser.parse_args(argv)
    if args.replace:
        return _report(replace_kernel_stats(), {
            "dtype": "dtype", "noise": "noise", "lse": "lse", "tau = 1": "unit_tau",
            "hot instrs / window": "hot_instructions", "per element": "per_element", "MUFU": "hot_mufu",
            "regs": "registers", "spill stores": "spill_stores", "loop spill loads": "loop_spill_loads"}, args.json)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels would be built with their interpreter "
                     "branches; unset it to read the code a GPU runs")
    if args.all:
        return _report(compile_all(args.jobs), {"op": "op", "kernel": "kernel", "variant": "variant", "warps": "num_warps",
                                       "regs": "registers", "spill stores": "spill_stores",
                                       "in loops": "loop_spill_stores", "loop spill loads": "loop_spill_loads",
                                       "error": "error"}, args.json)
    rows = []
    for kernel, bm, bn, warps, stages, plain_cap, dropout_cap in args.case or _shipped_cases():
        for dropout in (True,) if args.dropout_only else (False, True):
            cap = dropout_cap if dropout else plain_cap
            info = {}
            stats = loop_stats(compile_sm90(kernel, bm, bn, warps, stages, dropout=dropout, maxnreg=cap, info=info))
            rows.append({"kernel": kernel, "tile": f"{bm}x{bn}", "warps": warps, "stages": stages,
                         "max_regs": cap or "-", "dropout": dropout, **stats,
                         "loop_sts_lds": f"{stats['loop_sts']}/{stats['loop_lds']}",
                         "masked": stats.get("masked_loop_instructions", "-"),
                         "shared_kb": round(info["shared"] / 1024, 1),
                         "programs_per_sm": programs_per_sm(stats["registers"], warps, info["shared"])})
    return _report(rows, {"kernel": "kernel", "tile": "tile", "warps": "warps", "stages": "stages",
                          "max regs": "max_regs", "dropout": "dropout",
                          "loop instrs": "loop_instructions", "loop STS/LDS": "loop_sts_lds",
                          "masked-tile loop": "masked", "regs": "registers", "spill stores": "spill_stores",
                          "shared KB": "shared_kb", "programs / SM": "programs_per_sm"}, args.json)


def _report(rows: list[dict], columns: dict[str, str], json_path: str | None) -> list[dict]:
    """Prints rows as a markdown table (header -> row key) and writes them as JSON if asked."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r[key]) for key in columns.values()) + " |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows

if __name__ == "__main__":
    main()

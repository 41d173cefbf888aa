"""Loading the C++/CUDA extension ``fastelectra._C`` (the ``torch.ops.fastelectra`` ops).

Order: the extension built by setup.py; else, once per process, a JIT build of csrc/ (a checkout's, or
the copy an installed package carries) through torch.utils.cpp_extension + ninja (into torch's extension
cache). Failures are recorded with the reason and reported by ``status()`` / ``fastelectra info``; they
never raise at import time. Set ``FASTELECTRA_NO_JIT=1`` to forbid the JIT build.
"""
from __future__ import annotations

import glob
import importlib
import os
import threading

import torch

_lock = threading.Lock()
_state: dict = {}
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}    # the device types the op may have kernels for
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _sources_folder() -> str:
    """csrc/ beside the package in a checkout (editable install), else the copy an installed wheel carries
    in the package (fastelectra/csrc); the checkout's when neither has sources (for the error message)."""
    checkout, installed = os.path.join(os.path.dirname(_PACKAGE), "csrc"), os.path.join(_PACKAGE, "csrc")
    for folder in (checkout, installed):
        if glob.glob(os.path.join(folder, "*.cpp")):
            return folder
    return checkout


CSRC = _sources_folder()


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if not sources:
        raise RuntimeError(f"no C++ sources found in {CSRC} (installed without csrc/)")
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    # as in setup.py: no FP contraction on the host, no fast-math on the device (csrc/philox.h);
    # torch adds the C++ standard its headers need
    flags, cuda_flags = ["-O3", "-fopenmp", "-ffp-contract=off"], ["-O3"]
    if use_cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
        flags.append("-DFASTELECTRA_WITH_CUDA")
        cuda_flags.append("-DFASTELECTRA_WITH_CUDA")
    cpp_extension.load(
        name="fastelectra_C_jit", sources=sources, extra_include_paths=[CSRC],
        extra_cflags=flags, extra_cuda_cflags=cuda_flags if use_cuda else None,
        extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False,
    )


def _load() -> tuple[bool, str]:
    try:
        importlib.import_module("fastelectra._C")
        return True, "ok (built by setup.py)"
    except ImportError as e:
        built_error = f"fastelectra._C not built ({e})"
    if os.environ.get("FASTELECTRA_NO_JIT") == "1":
        return False, built_error + "; JIT build disabled by FASTELECTRA_NO_JIT=1"
    try:
        _jit_build()
        return True, "ok (JIT-built from csrc/)"
    except Exception as e:  # compiler missing, ninja missing, compile error...
        return False, f"{built_error}; JIT build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"


def _check_seed_fake(op: str, seed, logits) -> None:
    torch._check(seed.dtype == torch.int64 and seed.numel() == 1,
                 lambda: f"{op}: seed must be an int64 tensor with one element, got {seed.dtype} {tuple(seed.shape)}")
    torch._check(seed.device == logits.device,
                 lambda: f"{op}: seed must be on the device of logits ({logits.device}), got seed on {seed.device}")


def _register_fakes() -> None:
    """Shape-only (fake/meta) implementations, so torch.compile and FakeTensor can trace the ops."""

    @torch.library.register_fake("fastelectra::replace_tokens")
    def _replace_tokens_fake(logits, input_ids, masked_positions, temperature, seed, offset, return_lse):
        torch._check(logits.dim() == 2, lambda: f"replace_tokens: logits must be 2-D, got {logits.dim()}-D")
        torch._check(input_ids.dim() == 2, lambda: f"replace_tokens: input_ids must be 2-D, got {input_ids.dim()}-D")
        torch._check(masked_positions.dim() == 1,
                     lambda: f"replace_tokens: masked_positions must be 1-D, got {masked_positions.dim()}-D")
        torch._check(masked_positions.shape[0] == logits.shape[0],
                     lambda: "replace_tokens: masked_positions and logits must have the same number of rows")
        _check_seed_fake("replace_tokens", seed, logits)
        n = logits.shape[0]
        ids = input_ids.new_empty(input_ids.shape)
        labels = input_ids.new_empty(input_ids.shape, dtype=torch.bool)
        sampled = input_ids.new_empty((n,))
        lse = logits.new_empty((n if return_lse else 0,), dtype=torch.float32)
        return ids, labels, sampled, lse

    @torch.library.register_fake("fastelectra::gumbel_noise")
    def _gumbel_noise_fake(logits, seed, offset):
        torch._check(logits.dim() == 2, lambda: f"gumbel_noise: logits must be 2-D, got {logits.dim()}-D")
        _check_seed_fake("gumbel_noise", seed, logits)
        return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once while tracing
def status() -> tuple[bool, str]:
    """(loaded, reason). Loads (or JIT-builds) the extension on first call and registers the fake
    implementations of its ops."""
    known = _state.get("status")
    if known is not None:  # the common case, lock-free so torch.compile can trace through it
        return known
    with _lock:
        if "status" not in _state:
            ok, why = _load()
            if ok and not hasattr(torch.ops.fastelectra, "replace_tokens"):
                ok, why = False, "the extension loaded but registered no fastelectra::replace_tokens op"
            if ok:
                try:
                    _register_fakes()
                except Exception as e:  # an op schema that does not match the fakes: a stale build
                    ok, why = False, f"registering the fake implementations failed ({e}); rebuild fastelectra._C"
            if ok:
                devices = tuple(t for t, key in DISPATCH_KEYS.items()
                                if torch._C._dispatch_has_kernel_for_dispatch_key("fastelectra::replace_tokens", key))
                _state["devices"] = devices
                why = f"{why}; kernels for {', '.join(t.upper() for t in devices) or 'no device'}"
            _state["status"] = (ok, why)
        return _state["status"]


@torch.compiler.assume_constant_result
def kernel_devices() -> tuple[str, ...]:
    """The device types (of DISPATCH_KEYS) whose tensors the loaded op takes: "cpu", and "cuda" when it was
    built with its CUDA kernel (a CUDA torch whose build found no nvcc gives a CPU-only op); () when the
    extension is not loaded."""
    return _state.get("devices", ()) if status()[0] else ()

"""Which implementation runs: backend selection and what is usable on this machine.

Backends:
  ``fused``  Triton kernels for CUDA tensors (attention, layer norm) and the ``fastelectra._C``
             op for token replacement (CPU and CUDA).
  ``eager``  the plain torch reference of every op (the baseline benchmarks compare to).
  ``auto``   ``fused`` wherever it can run, else ``eager`` (the reason is reported once).

The choice comes from a constructor/config argument and is overridden by the environment
variable ``FASTELECTRA_BACKEND=eager|fused|auto``. Nothing here touches the GPU at import time.

Replayed work. One fused op, ``linear``, saves the GPU a few µs per call but costs the host more
than torch's own (an autograd.Function and two Triton launches per backward). Called eagerly that is
a loss: an un-graphed training step is host-bound. So it runs only inside :func:`replayed_work`,
the scope of work that is recorded once and replayed (CUDA graph warm-up and capture, which
:func:`fastelectra.graphs.capture` opens), where host time costs nothing per step.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import weakref
import warnings

import torch

BACKENDS = ("auto", "fused", "eager")
ENV_VAR = "FASTELECTRA_BACKEND"


def check_name(requested: str | None) -> None:
    """A ValueError unless ``requested`` is None or a backend's name. The ops call it before anything else,
    so a misspelled backend is an error also where no kernel would run (and whatever FASTELECTRA_BACKEND)."""
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"backend={requested!r} is not a backend; expected one of {BACKENDS} or None")


def resolve(requested: str | None = None) -> str:
    """The backend in force for a call: ``FASTELECTRA_BACKEND`` if set, else ``requested``,
    else ``auto``. Raises ValueError for an unknown name."""
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR}={env!r} is not a backend; expected one of {BACKENDS}")
        return env
    name = requested or "auto"
    check_name(name)
    return name


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once while tracing
def triton_status() -> tuple[bool, str]:
    """(usable, reason): whether the Triton kernels can run on CUDA tensors here. Computed once.
    torch.compile must not trace into it: ``importlib.util.find_spec`` broke the graph at every op."""
    known = _triton_status.get("status")
    if known is None:
        if importlib.util.find_spec("triton") is None:
            known = False, "triton is not installed"
        elif not torch.cuda.is_available():
            if os.environ.get("TRITON_INTERPRET") == "1":
                known = True, "TRITON_INTERPRET=1: kernels run in the Triton interpreter (CPU, slow)"
            else:
                known = False, "no CUDA GPU (Triton kernels need one, or TRITON_INTERPRET=1)"
        else:
            known = True, "ok"
        _triton_status["status"] = known
    return known


_triton_status: dict[str, tuple[bool, str]] = {}


def extension_status() -> tuple[bool, str]:
    """(usable, reason): whether the ``fastelectra._C`` replacement op is loaded."""
    from . import extension

    return extension.status()


_reported: set[str] = set()


def _unusable(name: str, what: str, op: str, device: torch.device, why: str) -> bool:
    """For a fused path (``what``) that cannot run ``op`` on ``device``: under backend ``fused`` a RuntimeError
    saying why; under ``auto`` False, after a warning (once per process for each path, op and device type)
    that the op takes the torch reference."""
    if name == "fused":
        raise RuntimeError(f"backend 'fused' was requested for {op} on {device}, but {what} cannot run there: {why}")
    key = f"{what}:{op}:{device.type}"
    if key not in _reported:
        _reported.add(key)
        # stacklevel 3: the op that asked (use_triton / use_extension called this)
        warnings.warn(f"fastelectra: {op} on {device.type} uses the torch reference ({why})", RuntimeWarning,
                      stacklevel=3)
    return False


def use_triton(device: torch.device, requested: str | None, op: str) -> bool:
    """Decide whether ``op`` runs its Triton kernel for tensors on ``device``.

    CPU tensors take the reference (Triton on CPU exists only in the interpreter, used by the
    kernel tests directly). Under ``fused`` a CUDA tensor without usable Triton is an error;
    under ``auto`` it falls back to the reference with a one-time warning.
    """
    name = resolve(requested)
    if name == "eager" or device.type != "cuda":
        return False
    ok, why = triton_status()
    return ok or _unusable(name, "the Triton kernels", op, device, why)


def use_extension(device: torch.device, requested: str | None, op: str) -> bool:
    """Decide whether ``op`` runs the ``fastelectra._C`` op for tensors on ``device`` (CPU and CUDA alike,
    where the build has that device's kernel). Under ``fused`` an op that cannot run is an error; under
    ``auto`` it falls back to the reference with a one-time warning."""
    from . import extension

    name = resolve(requested)
    if name == "eager":
        return False
    ok, why = extension_status()
    if ok and device.type in extension.DISPATCH_KEYS and device.type not in extension.kernel_devices():
        ok, why = False, (f"fastelectra._C was built without a {device.type.upper()} kernel ({why}); for CUDA, "
                          f"reinstall where nvcc and CUDA_HOME are found (see fastelectra info)")
    return ok or _unusable(name, "the fastelectra._C op", op, device, why)


_replayed = threading.local()


@contextlib.contextmanager
def replayed_work():
    """The scope of work that is recorded once and replayed: a CUDA graph's warm-up and capture (both, so
    that the capture meets no kernel for the first time: loading one is not allowed while a stream
    captures). Host time there costs nothing per replayed step, so ops whose fused path trades host
    time for GPU time take it (``linear``). Thread-local; nests."""
    depth = getattr(_replayed, "depth", 0)
    _replayed.depth = depth + 1
    try:
        yield
    finally:
        _replayed.depth = depth


def in_replayed_work() -> bool:
    """Whether the calling thread is inside :func:`replayed_work`."""
    return getattr(_replayed, "depth", 0) > 0


# Low-precision copies of parameters, made once per replayed step. Under autocast the fused linear
# layer casts its fp32 weight and bias to the autocast dtype in every forward: in a CUDA graph of an
# ELECTRA-Small step that was ~150 copy kernels of 16 K to 1 M elements (the H100 profile's
# bfloat16_copy_kernel: 207 calls, 0.32 ms, ~1.6 µs each). Inside ``cast_once`` one multi-tensor copy
# (torch._foreach_copy_, a few launches) makes them all at entry, and the layer takes its copy instead.
_copies: dict[tuple[int, torch.dtype], tuple] = {}   # (id(param), dtype) -> (weakref to param, copy): kept
_cast = threading.local()                              # .active: {id(param): (weakref, version, copy)} or None


@contextlib.contextmanager
def cast_once(params, dtype: torch.dtype):
    """Inside: the fused linear layers take their weights' and biases' ``dtype`` copies from one
    multi-tensor copy made on entry, instead of casting each in its forward (see :func:`cast_of`).

    Only inside :func:`replayed_work` (the only place the fused linear layer runs) and only for
    floating-point ``params`` of another dtype; elsewhere it does nothing. A copy is used only while its
    parameter is unchanged since entry (its version counter), so an in-place update inside the block
    makes the layer cast afresh. The copies persist between blocks (one buffer per parameter and dtype,
    as autocast's own copies would be alive during the step anyway) and each entry overwrites them in
    place, bumping their version: a backward that still needs the previous step's copies fails with
    autograd's in-place error instead of reading new weights. Thread-local; nests."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    chosen, seen = [], set()
    if in_replayed_work():
        for p in params:
            if isinstance(p, torch.Tensor) and p.is_floating_point() and p.dtype != dtype and id(p) not in seen:
                seen.add(id(p))
                chosen.append(p)
    previous = getattr(_cast, "active", None)
    if not chosen:
        yield
        return
    copies = [_copy_buffer(p, dtype) for p in chosen]
    with torch.no_grad():
        torch._foreach_copy_(copies, chosen)
    active = dict(previous or {})
    active.update({id(p): (weakref.ref(p), p._version, c) for p, c in zip(chosen, copies)})
    _cast.active = active
    try:
        yield
    finally:
        _cast.active = previous


def _copy_buffer(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The persistent ``dtype`` buffer for parameter ``p`` (a new one if ``p`` is new or changed shape,
    device or layout); buffers of parameters that no longer exist are dropped."""
    key = (id(p), dtype)
    entry = _copies.get(key)
    if entry is not None and entry[0]() is p and entry[1].shape == p.shape and entry[1].device == p.device \
            and entry[1].stride() == p.stride():
        return entry[1]
    for k in [k for k, (ref, _) in _copies.items() if ref() is None]:
        del _copies[k]
    buf = torch.empty_strided(p.shape, p.stride(), dtype=dtype, device=p.device)
    _copies[key] = (weakref.ref(p), buf)
    return buf


def cast_of(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, or the copy :func:`cast_once` made of ``t`` if one is in force and ``t`` has not
    changed since."""
    if t.dtype == dtype:
        return t
    active = getattr(_cast, "active", None)
    if active:
        entry = active.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == t._version and entry[2].dtype == dtype:
            return entry[2]
    return t.to(dtype)

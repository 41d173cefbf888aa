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


def report_once(key: str, message: str) -> None:
    """Warn once per process that a fused path is unavailable, with the reason."""
    if key not in _reported:
        _reported.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


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
    if ok:
        return True
    if name == "fused":
        raise RuntimeError(f"backend 'fused' was requested for {op} on {device}, but the Triton "
                           f"kernels cannot run here: {why}")
    report_once(f"triton:{op}", f"fastelectra: {op} uses the torch reference ({why})")
    return False


def use_extension(requested: str | None, op: str) -> bool:
    """Decide whether ``op`` runs the ``fastelectra._C`` op (CPU and CUDA alike)."""
    name = resolve(requested)
    if name == "eager":
        return False
    ok, why = extension_status()
    if ok:
        return True
    if name == "fused":
        raise RuntimeError(f"backend 'fused' was requested for {op}, but the fastelectra._C "
                           f"extension is unavailable: {why}")
    report_once(f"ext:{op}", f"fastelectra: {op} uses the torch reference ({why})")
    return False


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

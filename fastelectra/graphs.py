"""CUDA-graph capture of training work.

ELECTRA's training step in fastelectra never waits for the host (static shapes, no `.item()`, no
boolean indexing) and every random number it draws is keyed by a seed that lives in device memory
(torch's CUDA generator, which graphs replay with its current state). So the step can be captured
once and replayed: each replay runs the same kernels with no Python in between and draws fresh masks,
dropout and Gumbel noise, and ``torch.manual_seed`` before a replay makes it reproducible. On an H100
the whole ELECTRA-Small step went from 845 to 7618 sequences/s this way (benchmarks/results/).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .backend import cast_once, replayed_work, resolve
from .data import FastElectraError

__all__ = ["capture", "replayed_work", "cast_once", "linear_parameters"]


def capture(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3,
            before_capture: Optional[Callable[[], None]] = None) -> tuple[Callable[[], None], Any]:
    """Capture ``fn()`` in a CUDA graph on ``device``; return ``(replay, out)``.

    ``fn`` runs ``warmup`` times first on a side stream (Triton autotuning, cuBLAS workspaces and
    gradient buffers happen there, outside the capture), then ``before_capture()`` may undo what the
    warm-up changed (zero the gradients, restore counters), then one call of ``fn`` is captured.
    ``replay()`` reruns the captured kernels; ``out`` is what the captured call returned, and each
    replay overwrites its tensors. Inputs must be fed by copying into the tensors ``fn`` reads.
    ``fn`` must not synchronize with the host; autocast inside it needs ``cache_enabled=False``.

    Warm-up and capture run inside :func:`replayed_work`, so ``fn`` takes the fused paths that trade host
    time for GPU time (``fastelectra.ops.linear``'s). To capture a graph yourself with those paths, run its
    warm-up and its capture inside ``with fastelectra.graphs.replayed_work():``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise FastElectraError(f"CUDA graphs need a CUDA device, got {device}")
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with replayed_work():
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        current.wait_stream(side)
        if before_capture is not None:
            before_capture()
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may make CUDA calls meanwhile (the DataLoader's pin-memory thread
        # allocates pinned host memory), which the default "global" mode turns into a failed capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
    return graph.replay, out


def linear_parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    """The weights and biases of ``module``'s :class:`fastelectra.nn.FusedLinear` layers whose backend is not
    ``eager``, each once: what :func:`cast_once` copies for a replayed step of ``module``, as in

        autocast = torch.autocast("cuda", torch.bfloat16, cache_enabled=False)
        with fastelectra.graphs.cast_once(params, torch.bfloat16), autocast:
            loss = model(...)

    inside the function that :func:`capture` records (where the fused linear layer runs). Linear layers
    of other classes cast as autocast does (FusedSelfAttention's q, k, v weights are concatenated first)."""
    from .nn import FusedLinear

    params, seen = [], set()
    for m in module.modules():
        if isinstance(m, FusedLinear) and resolve(m.backend) != "eager":
            for p in (m.weight, m.bias):
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params

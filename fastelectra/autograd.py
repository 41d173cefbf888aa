"""The eager path of a fused op: the same launchers and autograd rule as its custom op, fewer host µs.

Each fused op (layer norm, attention) is a ``torch.library.custom_op`` pair (forward, backward) with
``register_autograd``: that is what torch.compile traces. Called eagerly, a custom op costs host time
in the dispatcher and its Python wrappers on every call (measured on a CPU with the kernel launches
stubbed out: a layer-norm forward+backward took 148 µs through the custom ops, 82 µs through a plain
``torch.autograd.Function`` over the same launchers, 32 µs for the launchers alone). Host time is what
an un-graphed training loop spends most of (benchmarks/results/profile_*.md), so eager calls of
plain tensors take the Function and everything else (torch.compile, fake or functional tensors)
takes the op. Both run the same ``forward``/``backward``/``setup_context`` functions.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

__all__ = ["eager_function", "use_eager", "needs_grad"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_function(name: str, forward: Callable, backward: Callable, setup_context: Callable) -> Callable:
    """``apply`` of a ``torch.autograd.Function`` named ``name``: ``forward(*inputs)`` returns the outputs,
    ``setup_context(ctx, inputs, output)`` saves what the backward needs, ``backward(ctx, *grads)``
    returns one gradient (or None) per input: the contract of ``custom_op.register_autograd``.

    Outputs marked non-differentiable (a layer norm's mean and rstd, attention's lse) reach ``backward``
    as None, not as zero tensors that autograd would otherwise allocate and fill on every backward
    (two memsets per layer norm, one per attention): ``backward`` must ignore their gradients."""
    def run(ctx, *inputs):   # forward(ctx, ...) style: apply() then skips binding the inputs to a signature
        ctx.set_materialize_grads(False)
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # The backward runs Triton launchers, which autograd cannot see through: once_differentiable makes a
    # double backward (create_graph=True) an error instead of silently missing second-order terms.
    fn = type(name, (torch.autograd.Function,),
              {"forward": staticmethod(run), "backward": staticmethod(once_differentiable(backward))})
    return fn.apply


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether a backward can follow a call on ``tensors`` (None entries skipped): grad mode is on and one of
    them requires grad. When not (no_grad, inference_mode, eval on detached inputs), an eager call can run
    its forward launcher alone, without the Function and what it saves for a backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_eager(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` may take the eager Function: not while torch.compile traces, and only for
    plain tensors (a FakeTensor or FunctionalTensor must go through the custom op's registrations)."""
    return type(t) in _PLAIN and not torch.compiler.is_compiling()

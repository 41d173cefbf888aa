"""Seeds for the counter-based (Philox) random numbers of the fused kernels.

Every fused op that draws random numbers (dropout in layer norm and attention, Gumbel noise in
replace_tokens) is keyed by a *seed tensor*: int64, one element, on the device of the op's data.
The kernels read it from device memory, so

- no host sync and no ``.item()``: the step stays asynchronous and torch.compile(fullgraph=True)
  traces it;
- CUDA-graph replays draw fresh numbers: the seed itself comes from torch's generator of that
  device (graph-safe), so ``torch.manual_seed`` reproduces a run and every replay differs.

A user-given seed may be a Python int (tests, reproducible calls) or such a tensor.
"""
from __future__ import annotations

import numbers

import torch

__all__ = ["SEED_MAX", "draw_seed", "check_seed", "seed_tensor", "check_seed_tensor"]

SEED_MAX = 2**62  # seeds are drawn in [0, 2^62): non-negative as int64 and as uint64 Philox keys


def draw_seed(device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh seed, int64 of shape (1,) on ``device``, from torch's generator of that device."""
    return torch.randint(0, SEED_MAX, (1,), dtype=torch.int64, device=device)


def check_seed(seed, name: str = "seed"):
    """``seed`` if it is None, a one-element integer tensor or an int in int64's range (a numpy integer
    comes back as an int), else a TypeError/ValueError naming ``name``. Metadata only: no tensor op."""
    if seed is None:
        return None
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or a one-element integer tensor, got a {seed.dtype} tensor "
                            f"of shape {tuple(seed.shape)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, a one-element integer tensor or None, got {type(seed).__name__}")
    seed = seed if isinstance(seed, torch.SymInt) else int(seed)
    if not -2**63 <= seed < 2**63:
        raise ValueError(f"{name} must fit in 64 bits (int64), got {seed}")
    return seed


def seed_tensor(seed, device: torch.device | str, name: str = "seed") -> torch.Tensor:
    """``seed`` (None | int | one-element integer tensor) as an int64 (1,) tensor on ``device``.

    None draws one with :func:`draw_seed`. Ints must fit in int64; tensors must hold one integer
    and live on ``device`` (or the CPU, whence they are copied without a sync)."""
    seed = check_seed(seed, name)
    if seed is None:
        return draw_seed(device)
    if isinstance(seed, torch.Tensor):
        device = torch.device(device)
        if seed.device != device and seed.device.type != "cpu":
            raise ValueError(f"{name} is on {seed.device} but the op's tensors are on {device}")
        return seed.detach().reshape(1).to(device=device, dtype=torch.int64, non_blocking=True)
    # a fill kernel with the value as its argument: unlike torch.tensor(..., device=cuda), no
    # host-to-device copy and no stream sync
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def check_seed_tensor(seed, device: torch.device | str, name: str = "seed") -> torch.Tensor:
    """``seed`` unchanged if it is what a kernel reads (int64, one element, on ``device``), else a
    ValueError naming ``name``: the ops' own check, on metadata only (no sync)."""
    device = torch.device(device)
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
        got = f"{seed.dtype} {tuple(seed.shape)} on {seed.device}" if isinstance(seed, torch.Tensor) else repr(seed)
        raise ValueError(f"{name} must be an int64 tensor of one element on {device}, got {got}")
    return seed

"""Triton launches at a fraction of the host cost of ``kernel[grid](...)``.

What it saves. ``kernel[grid](*args, **kwargs)`` runs Triton's whole JIT launch path on every call:
binding the arguments to the signature, specializing each one, building the cache key string, looking
the compiled kernel up, reading the knobs, building the launch metadata; through ``triton.autotune`` also
the autotuner's key, its dict merges and its config lookup. Measured on a 2-core CPU with the C
launcher stubbed out (the fake driver of benchmarks/host_overhead.py): a layer-norm forward launch took
9.1 µs that way and 4.6 µs here; the attention forward's launcher with its one autotuned launch 48 µs
and 20 µs. An un-graphed ELECTRA training step makes ~430 launches, and an un-graphed step is
host-bound (benchmarks/results/profile_*.md), so this is time the step takes.

How. ``launch(kernel, grid, *args, **kwargs)`` means exactly ``kernel[grid](*args, **kwargs)``. The first
call with a given *key* goes through Triton's path (compiling, autotuning and launching as usual) and
keeps the compiled kernel that path returns (and, through an autotuner, the config it chose); later
calls with the same key call that compiled kernel's launcher directly, as ``CompiledKernel[grid]``
does. The key is at least as fine as everything Triton's choice depends on:

- per runtime argument, what Triton specializes on: a tensor's dtype and whether its address is a
  multiple of 16; an int's range class (i32 / i64 / u64), whether it is 1, whether it is a multiple of
  16; the type of a float, bool or None;
- the value of every constexpr argument, of every autotuning-key argument, and of the launch options
  (num_warps, num_stages);
- the current device (compiled kernels are loaded per device);
- for an autotuner, its config list: swapping it (benchmarks/bench_attention.py pins one config that
  way) makes every cached launch of the kernel ask the autotuner again.

So a call that would make Triton compile or pick another kernel misses and takes Triton's path; a hit
runs the very kernel Triton would have run, with the same arguments. Not part of the key, as they are
fixed for a process in this package: module globals that kernels read (Triton rechecks them on its own
path only) and Triton's debug knobs.

Triton's own path runs instead under the interpreter (TRITON_INTERPRET=1), while a launch hook is set
(profilers such as proton), for argument types outside the list above (tensor subclasses included),
for kernels that are not a JITFunction or an Autotuner over one, when the autotuner's config has a
pre_hook, and everywhere when ``FASTELECTRA_TRITON_FAST_LAUNCH=0``.

References: triton.runtime.jit.JITFunction.run and triton.compiler.CompiledKernel.__getitem__ (the
launch this reproduces), triton.runtime.autotuner.Autotuner.run.
"""
from __future__ import annotations

import os

from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

import torch

__all__ = ["launch", "enabled", "cache_info", "COMPILE_OPTIONS"]

_MISSING = object()          # a parameter the call leaves to the autotuner's config or to its default


class _Unsupported(Exception):
    """An argument this module does not know how to key: the call takes Triton's path."""


def enabled() -> bool:
    """Whether launches take the cached path (not under the interpreter or FASTELECTRA_TRITON_FAST_LAUNCH=0)."""
    return (os.environ.get("FASTELECTRA_TRITON_FAST_LAUNCH", "1") != "0"
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


_ENABLED = enabled()


class _Kernel:
    """What a kernel's launches need to know once: its parameters, and per call shape (number of positional
    arguments, keyword names) a generated function that builds the key and the launcher's argument list."""

    __slots__ = ("name", "names", "index", "by_value", "positional", "blank", "autotuned", "shapes")

    def __init__(self, fn):
        self.autotuned = isinstance(fn, Autotuner)
        jit = fn.fn if self.autotuned else fn
        if not isinstance(jit, JITFunction):
            raise _Unsupported(type(jit).__name__)
        self.name = jit.fn.__name__
        self.names = list(jit.arg_names)
        self.index = {name: i for i, name in enumerate(self.names)}
        tune_keys = set(fn.keys) if self.autotuned else set()
        # keyed by value: constexprs and autotuning keys; every other parameter by its specialization
        self.by_value = {p.name for p in jit.params if p.is_constexpr or p.name in tune_keys}
        # how many leading parameters may come positionally (runtime ones, keyed by specialization)
        self.positional = next((i for i, p in enumerate(jit.params) if p.name in self.by_value), len(self.names))
        # what a call leaves out: the parameter's default, else the autotuner's config fills it in
        self.blank = [p.default if p.has_default else _MISSING for p in jit.params]
        self.shapes: dict = {}

    def shape(self, n: int, keywords: tuple) -> "_Shape":
        shape = self.shapes.get((n, keywords))
        if shape is None:
            shape = self.shapes[(n, keywords)] = _Shape(self, n, keywords)
        return shape


class _Shape:
    """One call shape of a kernel: ``build(device, *args, *kwargs.values())`` returns (key, launcher
    arguments in parameter order), from code generated for the shape (as Triton generates its binder)."""

    __slots__ = ("build", "cache")

    def __init__(self, kernel: _Kernel, n: int, keywords: tuple):
        if n > kernel.positional:
            raise _Unsupported("a constexpr given positionally")   # or too many arguments: Triton's path
        inputs = [f"a{i}" for i in range(n)] + [f"k{j}" for j in range(len(keywords))]
        key = ["device"] + [_SPEC.format(v=f"a{i}") for i in range(n)]
        slots = {i: f"a{i}" for i in range(n)}
        for j, name in enumerate(keywords):
            i = kernel.index.get(name)
            # launch options (num_warps, ...) and constexprs by value, with their name; runtime ones by specialization
            key.append(f"{name!r}, k{j}" if i is None or name in kernel.by_value
                       else f"{name!r}, {_SPEC.format(v=f'k{j}')}")
            if i is not None:
                slots[i] = f"k{j}"
        values = [slots.get(i, f"blank[{i}]") for i in range(len(kernel.names))]
        src = (f"def build(device, {', '.join(inputs)}):\n"
               f"    return ({', '.join(key)},), [{', '.join(values)}]\n")
        scope = {"Tensor": torch.Tensor, "spec": _spec, "blank": kernel.blank}
        exec(compile(src, f"<fastelectra launch of {kernel.name}>", "exec"), scope)
        self.build = scope["build"]
        self.cache: dict = {}


# a runtime argument's part of the key: a plain tensor inline, anything else through _spec
_SPEC = "((({v}).dtype, ({v}).data_ptr() & 15 == 0) if type({v}) is Tensor else spec({v}))"
_KERNELS: dict[int, _Kernel] = {}   # id(kernel) -> _Kernel; the kernels are module globals, never freed


def _spec(v):
    """What Triton's specialization of the runtime argument v depends on: a tensor's dtype and 16-byte
    alignment; an int's range class and whether it is 1 or a multiple of 16 (strings that are not
    identifiers, so they never read as a keyword's name in a key); the type of a float, bool or None."""
    t = type(v)
    if t is int:
        if v == 1:
            return "#1"
        if -0x80000000 <= v <= 0x7FFFFFFF:
            return "#i32" if v & 15 else "#i32/16"
        if -0x8000000000000000 <= v <= 0x7FFFFFFFFFFFFFFF:
            return "#i64" if v & 15 else "#i64/16"
        return "#u64" if v & 15 else "#u64/16"
    if t is torch.nn.Parameter or t is torch.Tensor:
        return v.dtype, (v.data_ptr() & 15) == 0
    if t is float or t is bool or v is None:
        return t
    raise _Unsupported(t.__name__)


def _hooked(hook) -> bool:
    """Whether a launch hook is set: Triton 3.6+ keeps an empty HookChain there when none is."""
    return hook is not None and bool(getattr(hook, "calls", True))


# Compile options every kernel of this package asks for. FMA contraction (a * b + c as one rounding): the
# kernels' instruction counts and tolerances were made with it. Triton 3.9 enables it unless told
# otherwise, with a warning that 3.10 will not (TRITON_DEFAULT_FP_FUSION); asking for it keeps the kernels
# as they are on every Triton and leaves the default of other kernels in the process alone.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def _triton_launch(fn, grid, args, kwargs):
    """Triton's own launch path, with COMPILE_OPTIONS (a call's own option wins)."""
    return fn[grid](*args, **{**COMPILE_OPTIONS, **kwargs})


def launch(fn, grid, *args, **kwargs):
    """``fn[grid](*args, **kwargs)`` for a ``@triton.jit`` kernel or a ``triton.autotune`` over one, through
    the cached launcher when the call's key has been seen (see the module docstring), compiled with
    COMPILE_OPTIONS."""
    if not _ENABLED or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
        return _triton_launch(fn, grid, args, kwargs)
    kernel = _KERNELS.get(id(fn))
    try:
        if kernel is None:
            kernel = _KERNELS.setdefault(id(fn), _Kernel(fn))
        shape = kernel.shape(len(args), tuple(kwargs))
        device = driver.active.get_current_device()
        key, values = shape.build(device, *args, *kwargs.values())
        hit = shape.cache.get(key)
    except (_Unsupported, TypeError):              # TypeError: an unhashable constexpr
        return _triton_launch(fn, grid, args, kwargs)
    if hit is None:
        return _first_launch(fn, kernel, shape, key, values, grid, args, kwargs)
    compiled, config_values, configs = hit
    if configs is not None and configs is not fn.configs:
        # the autotuner's config list was swapped since (a sweep pinning one config): ask it again
        return _first_launch(fn, kernel, shape, key, values, grid, args, kwargs)
    for i, v in config_values:
        values[i] = v
    if callable(grid):
        grid = grid(dict(zip(kernel.names, values)))
    stream = driver.active.get_current_stream(device)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, None, None, None, *values)
    return compiled


def _first_launch(fn, kernel: _Kernel, shape: _Shape, key, values, grid, args, kwargs):
    """Triton's own launch; keeps what it compiled (and the autotuner's choice) for the key."""
    compiled = _triton_launch(fn, grid, args, kwargs)
    if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        return compiled                             # not a CompiledKernel: nothing to reuse
    config_values, configs = (), None
    if kernel.autotuned:
        configs = fn.configs
        config = fn.best_config
        if config.pre_hook is not None:             # it must run before every launch: Triton's path does that
            return compiled
        config_values = tuple((kernel.index[name], v) for name, v in config.kwargs.items() if name in kernel.index)
    filled = {i for i, _ in config_values}
    if any(v is _MISSING and i not in filled for i, v in enumerate(values)):
        return compiled                             # a parameter no call value fills: leave it to Triton
    shape.cache[key] = (compiled, config_values, configs)
    return compiled


def cache_info() -> dict[str, int]:
    """Cached keys per kernel (by the kernel function's name): what the launches so far compiled or picked."""
    out: dict[str, int] = {}
    for kernel in _KERNELS.values():
        out[kernel.name] = out.get(kernel.name, 0) + sum(len(shape.cache) for shape in kernel.shapes.values())
    return out

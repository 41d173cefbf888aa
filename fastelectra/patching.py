"""Patch a live torch model in place: fastelectra's fused modules replace LayerNorms and ELECTRA attention.

    report = fastelectra.patch(model)      # HF ElectraModel / ElectraFor*, or any torch model
    print(report)                          # what was replaced (and what was left as is, and why)
    fastelectra.unpatch(model)             # the original modules are back

What is swapped (every parameter is shared, never copied, and the attribute names stay, so the
state dict keeps its keys and an optimizer built before patching keeps working):

  nn.LayerNorm (any model)          → FusedLayerNorm (1-D normalized_shape; subclasses with their own
                                      forward are left alone)
  ELECTRA post-LN tails             → the same module with ``LayerNorm(dropout(dense(x)) + input)`` done
    (ElectraSelfOutput, ElectraOutput)  by one fused residual-add + dropout + LayerNorm call
  ELECTRA self-attention            → PatchedSelfAttention: the same query/key/value Linear layers,
    (ElectraSelfAttention)              attention through fastelectra.ops.attention with a key-padding mask
  nn.Linear with a bias (any model,  → FusedLinear (inside a CUDA graph's warm-up and capture, see
    not its subclasses)                 fastelectra.graphs.replayed_work: bias gradient summed in Triton, and
                                        under autocast the parameter gradients come back in fp32 without a
                                        bf16 round trip; called eagerly it is F.linear)
  ELECTRA feed-forward up-projection → FusedIntermediate: act(dense(x)) as one fastelectra.ops.linear call
    (ElectraIntermediate)               whose backward fuses the activation's with the bias sum
                                        (transformers' gelu, gelu_new, relu, silu activations)

Left untouched, and listed in the report: cross-attention (ElectraCrossAttention) and causal (decoder)
self-attention, which need masks other than key padding; modules with an instance-level ``forward``
(accelerate's device hooks, for instance); Linear and LayerNorm layers whose weight or bias is not a
registered Parameter (``nn.utils.weight_norm``, pruning, parametrizations compute it from others).
Hooks registered on a replaced module stay registered and keep firing: the replacement shares the
original's hook dictionaries (a LayerNorm with forward pre-hooks keeps its unfused post-LN tail, since
the fused tail would hand those hooks a different input).

Patched attention never materialises the attention weights, so it does not return them: with
``output_attentions=True`` transformers 5 gives an empty ``attentions`` tuple (4.x: None per layer);
unpatch the model to inspect them. The attention mask HF builds for the configured
``attn_implementation`` (eager: additive float, sdpa: bool, both (B, 1, Tq, Tk); or None) is turned
back into the (B, Tk) key-padding mask; any other mask (causal, per-query, a bias, flex attention's
BlockMask) is a clear error. A sequence whose keys are all padding gets zeros (as SDPA gives), where
transformers' eager math averages the values: only the hidden states of such all-padding rows differ.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .nn import FusedLayerNorm, FusedLinear

__all__ = ["patch", "unpatch", "PatchReport", "PatchedSelfAttention", "FusedPostLNOutput", "FusedIntermediate"]

ORIGINAL = "_fastelectra_original"    # attribute (not a submodule) holding the module a patch replaced
# transformers' classes whose code the fused replacements below reproduce
ATTENTION_CLASSES = {"ElectraSelfAttention"}
TAIL_CLASSES = {"ElectraSelfOutput", "ElectraOutput"}
INTERMEDIATE_CLASSES = {"ElectraIntermediate"}
# transformers' activation modules -> the name fastelectra.ops.linear fuses
HF_ACTIVATIONS = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_new", "ReLU": "relu", "SiLU": "silu",
                  "SiLUActivation": "silu"}
MASKED_BELOW = -1e4                   # additive-mask entries at or below this are "do not attend" (HF uses finfo.min)
# (weakref to the last HF mask, its version counter, batch, seqlen_k, its key-padding mask): shared by all layers
_mask_cache = None
# the hook dictionaries of an nn.Module that a replacement shares with the module it replaces
HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


@dataclass
class PatchReport:
    """What :func:`patch` did: ``replaced`` holds (module path, old class, new class); ``skipped`` holds
    (module path, reason) for modules of a patchable kind that were left as they are."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, old, new in self.replaced:
            out[f"{old} -> {new}"] = out.get(f"{old} -> {new}", 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"fastelectra.patch: replaced {len(self.replaced)} modules"]
        lines += [f"  {n} x {kind}" for kind, n in self.counts().items()]
        lines += [f"  left as is: {path} ({why})" for path, why in self.skipped]
        return "\n".join(lines)


def _class_name(m: nn.Module) -> str:
    return type(m).__name__


def _is_transformers(m: nn.Module, names: set[str]) -> bool:
    return type(m).__module__.startswith("transformers.") and type(m).__name__ in names


# ----------------------------------------------------------------------------- replacement modules
def key_padding_mask_from_hf(mask: torch.Tensor | None, batch: int, seqlen_k: int,
                             host_checks: bool = True) -> torch.Tensor | None:
    """The (B, Tk) bool key-padding mask (True = attend) behind the mask HF passes to self-attention.

    Accepts None, a (B, Tk) 0/1 or bool mask, or a (B, 1 or heads, Tq, Tk) mask that is bool (True = attend) or
    additive float (0 = attend, <= -1e4 = masked) and the same for every query and head. Raises ValueError
    for anything else (causal or per-query masks, attention biases): those need the unpatched module.
    The two checks of the mask's values read them on the host (a sync on CUDA); with ``host_checks=False``
    (inside torch.compile, where a host read breaks the graph) they are device-side asserts instead.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"patched attention takes the eager or sdpa attention mask (a tensor), got a "
                         f"{type(mask).__name__} (attn_implementation='flex_attention'?); use attn_implementation="
                         "'sdpa' or 'eager', or unpatch the model (fastelectra.unpatch)")
    if mask.dim() == 2:
        if mask.shape != (batch, seqlen_k):
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not match (batch, seqlen) = "
                             f"{(batch, seqlen_k)}")
        if mask.dtype != torch.bool:   # 0/1, as HF's attention_mask; an additive 0/-inf mask would read inverted
            _check_values(((mask == 0) | (mask == 1)).all(), host_checks,
                          "patched attention got a 2-D attention mask with values other than 0 and 1; a 2-D mask "
                          "must be HF's attention_mask (1 = attend, 0 = padding) or bool (True = attend)")
        return mask != 0
    if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[-1] != seqlen_k:
        raise ValueError(f"patched attention expects a (batch, 1, seqlen_q, seqlen_k) attention mask, got shape "
                         f"{tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        attend = mask
    elif mask.dtype.is_floating_point:
        attend = mask == 0
        _check_values(((mask == 0) | (mask <= MASKED_BELOW)).all(), host_checks,
                      "patched attention got an additive attention mask with values other than 0 and a large "
                      "negative number (an attention bias, not a key-padding mask); unpatch this model "
                      "(fastelectra.unpatch) to use it")
    else:
        attend = mask != 0
    first = attend[:, :1, :1, :]                                                # (B, 1, 1, Tk)
    _check_values((attend == first).all(), host_checks,
                  "patched attention supports key-padding masks only (the same keys masked for every query "
                  "and head); this mask differs between queries (causal or per-query masking) - unpatch "
                  "the model (fastelectra.unpatch) to use it")
    # a copy, so the (B, 1, Tq, Tk) mask is not kept alive by a view of it
    return first[:, 0, 0, :].expand(batch, seqlen_k).clone(memory_format=torch.contiguous_format)


def _check_values(ok: torch.Tensor, on_host: bool, message: str) -> None:
    """Raise ValueError(message) unless the bool tensor ``ok`` holds True: read on the host, or, with
    ``on_host=False``, as a device-side assert (no sync; a CUDA kernel fails instead)."""
    if on_host:
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


class PatchedSelfAttention(nn.Module):
    """Drop-in for transformers' ElectraSelfAttention backed by fastelectra.ops.attention.

    Keeps the original's ``query``/``key``/``value`` Linear layers and ``dropout`` (same state-dict keys).
    forward takes the arguments the original's forward takes, positionally or by name:
      transformers 5: (hidden_states, attention_mask=None, past_key_values=None, **kwargs);
      4.40-4.53: (hidden_states, attention_mask, head_mask, encoder_hidden_states, encoder_attention_mask,
        past_key_value, output_attentions);
      4.55-4.57: (hidden_states, attention_mask, head_mask, encoder_hidden_states, past_key_value(s),
        output_attentions, cache_position);
    and returns (context (B, T, hidden), None): attention weights are never materialised. A head mask, encoder
    states or a cache are errors (the unpatched module computes those).
    """

    def __init__(self, original: nn.Module, backend: str | None = None):
        super().__init__()
        self.query, self.key, self.value = original.query, original.key, original.value
        self.dropout = original.dropout
        self.num_attention_heads = original.num_attention_heads
        self.attention_head_size = original.attention_head_size
        # transformers 4.x divides the scores by sqrt(head size) and keeps no scaling attribute
        self.scaling = getattr(original, "scaling", original.attention_head_size ** -0.5)
        self.backend = backend
        self.layer_idx = getattr(original, "layer_idx", None)
        # the original forward's parameter names in order (after self): how positional arguments are meant
        self._arg_names = tuple(name for name, p in inspect.signature(type(original).forward).parameters.items()
                                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[1:]

    @staticmethod
    def key_padding_mask(mask, batch, seqlen_k):
        # every layer receives the same mask tensor: convert (and check, one host sync on CUDA) once per forward.
        # The key is the tensor, its version counter (a buffer refilled in place is a new mask) and the shape
        # it is read at (a (1, 1, T, T) mask broadcasts over any batch size).
        global _mask_cache
        if mask is None:
            return None
        if torch.compiler.is_compiling():   # no host read, no cache: the graph computes it once per forward
            return key_padding_mask_from_hf(mask, batch, seqlen_k, host_checks=False)
        key = getattr(mask, "_version", None), batch, seqlen_k
        if _mask_cache is not None and _mask_cache[0]() is mask and _mask_cache[1] == key:
            return _mask_cache[2]
        kpm = key_padding_mask_from_hf(mask, batch, seqlen_k)
        _mask_cache = (weakref.ref(mask), key, kpm)
        return kpm

    def forward(self, *args, **kwargs):
        if len(args) > len(self._arg_names):
            raise TypeError(f"patched ELECTRA self-attention takes at most {len(self._arg_names)} positional "
                            f"arguments {self._arg_names}, got {len(args)}")
        kwargs.update(zip(self._arg_names, args))
        hidden_states, attention_mask = kwargs["hidden_states"], kwargs.get("attention_mask")
        for name, what in (("past_key_values", "a decoder cache"), ("past_key_value", "a decoder cache"),
                           ("head_mask", "a head mask"), ("encoder_hidden_states", "cross-attention"),
                           ("encoder_attention_mask", "cross-attention")):
            if kwargs.get(name) is not None:
                raise ValueError(f"patched ELECTRA self-attention does not support {name} ({what}); unpatch the "
                                 f"model (fastelectra.unpatch) to use it")
        b, t, _ = hidden_states.shape
        shape = (b, t, self.num_attention_heads, self.attention_head_size)
        q = self.query(hidden_states).view(shape)                                   # (B, T, H, D)
        k = self.key(hidden_states).view(shape)
        v = self.value(hidden_states).view(shape)
        kpm = self.key_padding_mask(attention_mask, b, t)
        ctx = ops.attention(q, k, v, kpm, dropout_p=self.dropout.p if self.training else 0.0,
                            softmax_scale=self.scaling, backend=self.backend)      # (B, T, H, D)
        return ctx.reshape(b, t, -1), None

    def extra_repr(self) -> str:
        return (f"heads={self.num_attention_heads}, head_dim={self.attention_head_size}, "
                f"dropout_p={self.dropout.p}, backend={self.backend or 'auto'}")


class FusedPostLNOutput(nn.Module):
    """Drop-in for transformers' ElectraSelfOutput / ElectraOutput: LayerNorm(dropout(dense(x)) + input)
    with the dropout, residual add and LayerNorm in one fused call. Same ``dense``/``LayerNorm``/``dropout``."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = original.dense, original.LayerNorm, original.dropout

    def forward(self, hidden_states, input_tensor):
        p = self.dropout.p if self.training else 0.0
        return self.LayerNorm(self.dense(hidden_states), residual=input_tensor, dropout_p=p)


class FusedIntermediate(nn.Module):
    """Drop-in for transformers' ElectraIntermediate: act(dense(x)) in one fastelectra.ops.linear call, whose
    backward computes the activation's gradient and the bias gradient in one pass. Same ``dense`` (and the
    original's activation module, kept for unpatch); ``activation`` is its fastelectra name."""

    def __init__(self, original: nn.Module, activation: str, backend: str | None = None):
        super().__init__()
        self.dense, self.intermediate_act_fn = original.dense, original.intermediate_act_fn
        self.activation, self.backend = activation, backend

    def forward(self, hidden_states):
        return ops.linear(hidden_states, self.dense.weight, self.dense.bias, activation=self.activation,
                          backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation}, backend={self.backend or 'auto'}"


# ----------------------------------------------------------------------------- patch / unpatch
def _why_not_replaceable(m: nn.Module) -> str | None:
    """Why a module of a patchable kind must stay as it is, or None."""
    if "forward" in m.__dict__:
        return "it has an instance-level forward (e.g. accelerate's hooks)"
    for name in ("weight", "bias"):
        if (isinstance(m, (nn.Linear, nn.LayerNorm)) and getattr(m, name, None) is not None
                and name not in m._parameters):
            return f"its {name} is not a registered Parameter (weight_norm, pruning or another reparametrization)"
    return None


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in HOOK_DICTS)


def _share_hooks(new: nn.Module, old: nn.Module) -> None:
    """Hooks registered on ``old`` (before or after patching) fire on ``new`` too: the dictionaries are shared."""
    for name in HOOK_DICTS:
        if name in old.__dict__:
            new.__dict__[name] = old.__dict__[name]


def _layer_norm_replacement(m: nn.Module, backend, report: PatchReport, path: str):
    if isinstance(m, FusedLayerNorm) or not isinstance(m, nn.LayerNorm):
        return None
    if type(m).forward is not nn.LayerNorm.forward:
        report.skipped.append((path, f"{_class_name(m)} has its own forward"))
        return None
    if len(m.normalized_shape) != 1:
        report.skipped.append((path, f"normalized_shape {tuple(m.normalized_shape)} is not 1-D"))
        return None
    return FusedLayerNorm.from_layer_norm(m, backend=backend)


def _attention_replacement(m: nn.Module, backend, report: PatchReport, path: str):
    # transformers 5 has a class of its own for cross-attention; 4.x an ElectraSelfAttention under `crossattention`
    if _is_transformers(m, {"ElectraCrossAttention"}) or (
            _is_transformers(m, ATTENTION_CLASSES) and path.split(".")[-2:-1] == ["crossattention"]):
        report.skipped.append((path, "cross-attention"))
        return None
    if not _is_transformers(m, ATTENTION_CLASSES):
        return None
    if getattr(m, "is_causal", False) or getattr(m, "is_decoder", False):
        report.skipped.append((path, "causal (decoder) self-attention"))
        return None
    # transformers 4.x's relative_key / relative_key_query add position terms to the scores
    position = getattr(m, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        report.skipped.append((path, f"position_embedding_type={position!r} (relative-position scores)"))
        return None
    return PatchedSelfAttention(m, backend=backend)


def _linear_replacement(m: nn.Module, backend, report: PatchReport, path: str):
    if _is_transformers(m, INTERMEDIATE_CLASSES):
        act = HF_ACTIVATIONS.get(_class_name(m.intermediate_act_fn))
        if act is None:
            why = f"activation {_class_name(m.intermediate_act_fn)} is not one fastelectra fuses"
        elif not isinstance(m.dense, nn.Linear) or m.dense.bias is None:
            why = "its dense layer is not a Linear with a bias"
        elif _has_hooks(m.dense) or _has_hooks(m.intermediate_act_fn):   # the fused call runs neither module
            why = "its dense layer or activation has hooks"
        else:
            why = _why_not_replaceable(m.dense)
        if why is not None:
            report.skipped.append((path, why))
            return None
        return FusedIntermediate(m, act, backend=backend)
    if isinstance(m, FusedLinear) or not isinstance(m, nn.Linear):
        return None
    if type(m) is not nn.Linear:        # e.g. MultiheadAttention's out_proj, typed to keep quantization off it
        report.skipped.append((path, f"{_class_name(m)} is a subclass of nn.Linear"))
        return None
    if m.bias is None:
        return None                      # no bias gradient to sum: F.linear is the whole layer already
    return FusedLinear.from_linear(m, backend=backend)


def patch(model: nn.Module, *, attention: bool = True, layer_norm: bool = True, linear: bool = True,
          backend: str | None = None) -> PatchReport:
    """Swap ``model``'s LayerNorms and Linears (and, for transformers' ELECTRA, its self-attentions, post-LN
    tails and feed-forward up-projections) for fastelectra's fused modules, in place. Parameters are shared
    and state-dict keys unchanged.

    ``backend`` (auto | fused | eager; None = auto) is given to every new module. Calling patch twice is
    harmless (already patched modules are kept). Returns a :class:`PatchReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        from .backend import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not a backend; expected one of {BACKENDS}")
    if (isinstance(model, (nn.LayerNorm, nn.Linear))
            or _is_transformers(model, ATTENTION_CLASSES | TAIL_CLASSES | INTERMEDIATE_CLASSES)):
        raise ValueError(f"model is itself a {_class_name(model)}, which cannot be replaced in place; patch the "
                         "module that holds it (or use fastelectra.nn.FusedLayerNorm.from_layer_norm / "
                         "FusedLinear.from_linear)")
    report = PatchReport()
    new_for: dict[int, nn.Module] = {}     # id(old) -> new, so a module shared by two parents stays shared

    def replacement(m: nn.Module, path: str) -> nn.Module | None:
        new = None
        if ((isinstance(m, (nn.LayerNorm, nn.Linear)) and not isinstance(m, (FusedLayerNorm, FusedLinear)))
                or _is_transformers(m, ATTENTION_CLASSES | INTERMEDIATE_CLASSES)):
            why = _why_not_replaceable(m)
            if why is not None:
                report.skipped.append((path, why))
                return None
        if layer_norm:
            new = _layer_norm_replacement(m, backend, report, path)
        if new is None and attention:
            new = _attention_replacement(m, backend, report, path)
        if new is None and linear:
            new = _linear_replacement(m, backend, report, path)
        return new

    def visit(parent: nn.Module, prefix: str, seen: set[int]) -> None:
        for name, child in list(parent._modules.items()):   # named_children() would hide repeats
            if child is None:
                continue
            path = prefix + name
            if id(child) in new_for:
                setattr(parent, name, new_for[id(child)])
                continue
            if id(child) in seen:
                continue
            new = replacement(child, path)
            if new is not None:
                _share_hooks(new, child)
                object.__setattr__(new, ORIGINAL, child)
                new.train(child.training)
                new_for[id(child)] = new
                setattr(parent, name, new)
                report.replaced.append((path, _class_name(child), _class_name(new)))
                child = new
            seen.add(id(child))
            visit(child, path + ".", seen)
            # post-LN tails: fused once their LayerNorm is (the LayerNorm swap above ran in visit)
            if layer_norm and _is_transformers(child, TAIL_CLASSES) and isinstance(child.LayerNorm, FusedLayerNorm):
                why = _why_not_replaceable(child) or (
                    "its LayerNorm has forward pre-hooks, which the fused tail would give another input"
                    if child.LayerNorm._forward_pre_hooks or child.LayerNorm._forward_pre_hooks_with_kwargs else None)
                if why is not None:
                    report.skipped.append((path, why))
                    continue
                tail = FusedPostLNOutput(child)
                _share_hooks(tail, child)
                object.__setattr__(tail, ORIGINAL, child)
                tail.train(child.training)
                new_for[id(child)] = tail
                setattr(parent, name, tail)
                report.replaced.append((path, _class_name(child), _class_name(tail)))

    visit(model, "", {id(model)})
    return report


def unpatch(model: nn.Module) -> int:
    """Undo :func:`patch`: put every replaced module back (with the replacement's current parameters,
    submodules and train/eval mode). Returns the number of modules restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    old_for: dict[int, nn.Module] = {}
    restored = 0

    def original_of(m: nn.Module) -> nn.Module:
        orig = m.__dict__[ORIGINAL]
        for name, child in m.named_children():
            setattr(orig, name, child)
        for name, p in m.named_parameters(recurse=False):
            setattr(orig, name, p)
        orig.train(m.training)
        return orig

    def visit(parent: nn.Module, seen: set[int]) -> None:
        nonlocal restored
        for name, child in list(parent._modules.items()):   # named_children() would hide repeats
            if child is None:
                continue
            if id(child) in old_for:
                setattr(parent, name, old_for[id(child)])
                continue
            if id(child) in seen:
                continue
            if ORIGINAL in child.__dict__:
                orig = original_of(child)
                old_for[id(child)] = orig
                setattr(parent, name, orig)
                restored += 1
                child = orig
            seen.add(id(child))
            visit(child, seen)

    visit(model, {id(model)})
    return restored

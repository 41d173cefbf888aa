"""A plain torch ELECTRA (Clark et al. 2020), state-dict compatible with transformers' Electra*.

Built bottom-up: Embeddings → Layer (self-attention, feed-forward; post-LN) → Encoder →
ElectraModel → heads (discriminator, generator, classifier) → ElectraPretrainingModel, which
runs one whole ELECTRA step: masking, generator (LM head on masked rows only), sampled-token
replacement, discriminator, loss = mlm_weight·MLM + rtd_weight·RTD.

All attention, layer-norm and replacement math goes through fastelectra.ops (via nn.py), so
the backend (fused kernels or torch reference) is chosen in one place.
With ``config.unpad`` and an attention mask, ElectraModel runs the encoder on the real tokens only
(rows (R, H), varlen attention) and scatters them back to (B, T, H): every caller sees the same shapes.
Shapes: B batch, T sequence length, E embedding size, H hidden size, V vocabulary, N masked tokens,
R real (non-padding) tokens of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import ElectraConfig
from .nn import FusedLayerNorm, FusedLinear, FusedSelfAttention

__all__ = ["ElectraModel", "ElectraDiscriminator", "ElectraGenerator", "ElectraForSequenceClassification",
           "ElectraPretrainingModel", "ElectraPretrainingOutput"]

def check_inputs(config: ElectraConfig, input_ids, attention_mask=None, token_type_ids=None,
                 check_values: bool = True) -> None:
    """Raise a clear error for ids/masks that would fail (or silently misbehave) inside the model.

    Value-range checks read the data; on CUDA they cost one host sync (disable with check_values=False
    when the data were validated on the CPU). They are skipped while torch.compile traces, where
    reading values would break the graph."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seqlen), got {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    if b == 0 or t == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if t > config.max_position_embeddings:
        raise ValueError(f"sequence length {t} exceeds max_position_embeddings={config.max_position_embeddings}")
    for name, t_ in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t_ is None:
            continue
        if not isinstance(t_, torch.Tensor) or t_.shape != input_ids.shape:
            raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(getattr(t_, 'shape', ())) or type(t_).__name__}")
        if t_.dtype.is_floating_point:
            raise TypeError(f"{name} must be an integer or bool tensor, got {t_.dtype}")
        if t_.device != input_ids.device:
            raise ValueError(f"{name} is on {t_.device} but input_ids is on {input_ids.device}")
    if not check_values or torch.compiler.is_compiling():
        return
    stats = [input_ids.min(), input_ids.max()]
    if token_type_ids is not None:
        stats += [token_type_ids.min(), token_type_ids.max()]
    stats = torch.stack([s.to(torch.int64) for s in stats]).tolist()    # one sync on CUDA
    if stats[0] < 0 or stats[1] >= config.vocab_size:
        raise ValueError(f"input_ids must lie in [0, vocab_size={config.vocab_size}), got values in "
                         f"[{stats[0]}, {stats[1]}]")
    if token_type_ids is not None and (stats[2] < 0 or stats[3] >= config.type_vocab_size):
        raise ValueError(f"token_type_ids must lie in [0, type_vocab_size={config.type_vocab_size}), got "
                         f"values in [{stats[2]}, {stats[3]}]")


def check_config(config, name: str = "config") -> None:
    """``config`` must be an ElectraConfig (validated again here: its fields may have been set since)."""
    if not isinstance(config, ElectraConfig):
        raise TypeError(f"{name} must be an ElectraConfig, got {type(config).__name__} (build one with "
                        "ElectraConfig(**fields) or ElectraConfig.from_dict)")
    config.validate()


def check_masked_positions(masked_positions, num_tokens: int, device: torch.device) -> None:
    """``masked_positions`` must be a 1-D int64 (or int32) tensor of flat indices into the B·T tokens.
    The value range is checked on CPU tensors only, outside torch.compile: on CUDA it would cost a host
    sync in every training step (there, the caller builds the positions in range)."""
    if not isinstance(masked_positions, torch.Tensor):
        raise TypeError(f"masked_positions must be a torch.Tensor, got {type(masked_positions).__name__}")
    if masked_positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"masked_positions must be an int64 (or int32) tensor of flat token indices, got "
                        f"{masked_positions.dtype}")
    if masked_positions.dim() != 1:
        raise ValueError(f"masked_positions must be 1-D (flat indices into batch·seqlen), got shape "
                         f"{tuple(masked_positions.shape)}")
    if masked_positions.device != device:
        raise ValueError(f"masked_positions is on {masked_positions.device} but input_ids is on {device}")
    if masked_positions.device.type != "cpu" or not masked_positions.numel() or torch.compiler.is_compiling():
        return
    low, high = (v.item() for v in torch.aminmax(masked_positions))
    if low < 0 or high >= num_tokens:
        raise ValueError(f"masked_positions must lie in [0, batch·seqlen={num_tokens}), got values in "
                         f"[{low}, {high}]")


# ----------------------------------------------------------------------------- building blocks
class Embeddings(nn.Module):
    """word + token type + position embeddings → LayerNorm → dropout: (B, T) ids → (B, T, E)."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.LayerNorm = FusedLayerNorm(config.embedding_size, eps=config.layer_norm_eps, backend=config.backend)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None):
        t = input_ids.shape[1]
        x = self.word_embeddings(input_ids)                                          # (B, T, E)
        if token_type_ids is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        else:
            x = x + self.token_type_embeddings.weight[0]
        pos = self.position_embeddings.weight[:t].expand_as(x)                      # (B, T, E)
        return self.dropout(self.LayerNorm(x, residual=pos))


class SelfOutput(nn.Module):
    """The block tail after attention: LayerNorm(dropout(dense(ctx)) + residual)."""

    def __init__(self, config: ElectraConfig, in_features: int):
        super().__init__()
        self.dense = FusedLinear(in_features, config.hidden_size, backend=config.backend)
        self.LayerNorm = FusedLayerNorm(config.hidden_size, eps=config.layer_norm_eps, backend=config.backend)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x), residual=residual, dropout_p=self.dropout_p if self.training else 0.0)


class Attention(nn.Module):
    """attention.self (q/k/v + attention) and attention.output (dense + fused tail), as in transformers."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.self = FusedSelfAttention(config.hidden_size, config.num_attention_heads,
                                       config.attention_probs_dropout_prob, backend=config.backend)
        self.output = SelfOutput(config, config.hidden_size)

    def forward(self, h, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        # h feeds the QKV projection and the residual: passing on the alias the projection returns lets
        # the two gradients of h meet inside its dx GEMM (see fastelectra.ops.linear)
        ctx, h = self.self(h, key_padding_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, return_input=True)
        return self.output(ctx, h)


class Intermediate(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.dense = FusedLinear(config.hidden_size, config.intermediate_size, activation=config.hidden_act,
                                 backend=config.backend)

    def forward(self, h, return_input: bool = False):
        return self.dense(h, return_input=return_input)                              # act(h Wᵀ + b)


class Layer(nn.Module):
    """One post-LN transformer block: (B, T, H) → (B, T, H) with a key-padding mask (B, T), or
    unpadded rows (R, H) → (R, H) of packed sequences with cu_seqlens (B + 1,) and max_seqlen."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = SelfOutput(config, config.intermediate_size)

    def forward(self, h, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        h = self.attention(h, key_padding_mask, cu_seqlens, max_seqlen)
        a, h = self.intermediate(h, return_input=True)          # h's alias for the residual, as in Attention
        return self.output(a, h)


class Encoder(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.layer = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, h, key_padding_mask=None, cu_seqlens=None, max_seqlen=None):
        for layer in self.layer:
            h = layer(h, key_padding_mask, cu_seqlens, max_seqlen)
        return h


class ElectraModel(nn.Module):
    """Embeddings (+ projection E→H when they differ) and the encoder: (B, T) ids → (B, T, H).

    With ``config.unpad`` and an attention mask the encoder sees only the real tokens: they are
    gathered once after the embeddings (each row's in order, so masks with holes work too), every
    layer runs on (R, H) rows with varlen attention, and the result is scattered back to (B, T, H)
    with zeros at the padding. Counting R costs one host sync per call, so this path cannot be
    captured in a CUDA graph or traced by torch.compile(fullgraph=True) (plain torch.compile
    breaks the graph there)."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        check_config(config)
        self.config = config
        self.embeddings = Embeddings(config)
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = FusedLinear(config.embedding_size, config.hidden_size,
                                                  backend=config.backend)
        self.encoder = Encoder(config)
        self.check_values = True  # see check_inputs

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        check_inputs(self.config, input_ids, attention_mask, token_type_ids, self.check_values)
        h = self.embeddings(input_ids, token_type_ids)                               # (B, T, E)
        if hasattr(self, "embeddings_project"):
            h = self.embeddings_project(h)                                           # (B, T, H)
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        if not (self.config.unpad and key_padding_mask is not None):
            return self.encoder(h, key_padding_mask)                                 # (B, T, H)
        # unpadded: gather the R real tokens, run the encoder on rows, scatter back (zeros at padding)
        b, t, hidden = h.shape
        real = key_padding_mask.flatten().nonzero().squeeze(1)                      # (R,) into B·T: one host sync
        cu_seqlens = F.pad(key_padding_mask.sum(1).cumsum(0), (1, 0)).int()        # (B + 1,) row offsets
        rows = h.flatten(0, 1).index_select(0, real)                                 # (R, H)
        if len(rows):                                                                # none if all is padding
            rows = self.encoder(rows, cu_seqlens=cu_seqlens, max_seqlen=t)          # (R, H); T bounds every length
        return rows.new_zeros(b * t, hidden).index_copy(0, real, rows).view(b, t, hidden)


# ----------------------------------------------------------------------------- models with heads
class ElectraPreTrainedModel(nn.Module):
    """Shared init (transformers' scheme) and HF checkpoint I/O for the models below."""

    hf_architecture = ""

    def init_weights(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_pretrained(cls, path: str, **config_overrides):
        """Load a directory written by transformers' (or our) save_pretrained. Never downloads."""
        from .hf import load_model

        return load_model(cls, path, **config_overrides)

    def save_pretrained(self, path: str) -> None:
        """Write config.json + model.safetensors that transformers loads."""
        from .hf import save_model

        save_model(self, path)


class ElectraDiscriminator(ElectraPreTrainedModel):
    """transformers' ElectraForPreTraining: one replaced-token logit per position, (B, T)."""

    hf_architecture = "ElectraForPreTraining"

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = config
        self.electra = ElectraModel(config)
        self.discriminator_predictions = DiscriminatorPredictions(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.discriminator_predictions(self.electra(input_ids, attention_mask, token_type_ids))


class DiscriminatorPredictions(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.dense = FusedLinear(config.hidden_size, config.hidden_size, activation=config.hidden_act,
                                 backend=config.backend)
        self.dense_prediction = FusedLinear(config.hidden_size, 1, backend=config.backend)

    def forward(self, h):                                                            # (B, T, H) → (B, T)
        return self.dense_prediction(self.dense(h)).squeeze(-1)


class GeneratorPredictions(nn.Module):
    """dense H→E, erf GELU, LayerNorm: the generator's head before the tied LM projection."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.dense = FusedLinear(config.hidden_size, config.embedding_size, activation="gelu", backend=config.backend)
        self.LayerNorm = FusedLayerNorm(config.embedding_size, eps=config.layer_norm_eps, backend=config.backend)

    def forward(self, h):
        return self.LayerNorm(self.dense(h))


class ElectraGenerator(ElectraPreTrainedModel):
    """transformers' ElectraForMaskedLM; the LM head's weight is the word-embedding matrix."""

    hf_architecture = "ElectraForMaskedLM"

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = config
        self.electra = ElectraModel(config)
        self.generator_predictions = GeneratorPredictions(config)
        self.generator_lm_head = FusedLinear(config.embedding_size, config.vocab_size, backend=config.backend)
        self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        self.generator_lm_head.weight = self.electra.embeddings.word_embeddings.weight

    def lm_logits(self, h):
        """(..., H) hidden states → (..., V) logits."""
        return self.generator_lm_head(self.generator_predictions(h))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, masked_positions=None):
        """Logits (B, T, V), or only at ``masked_positions`` (flat indices into (B·T)) → (N, V)."""
        h = self.electra(input_ids, attention_mask, token_type_ids)                  # (B, T, Hg)
        if masked_positions is not None:
            check_masked_positions(masked_positions, input_ids.numel(), input_ids.device)
            h = h.reshape(-1, h.shape[-1]).index_select(0, masked_positions)        # (N, Hg)
        return self.lm_logits(h)


class ClassificationHead(nn.Module):
    """[CLS] → dropout → dense → GELU → dropout → out_proj (transformers' ElectraClassificationHead)."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.dense = FusedLinear(config.hidden_size, config.hidden_size, activation="gelu", backend=config.backend)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.out_proj = FusedLinear(config.hidden_size, config.num_labels, backend=config.backend)

    def forward(self, h):                                                            # (B, T, H) → (B, C)
        x = self.dropout(h[:, 0])
        x = self.dropout(self.dense(x))                                              # GELU(x Wᵀ + b)
        return self.out_proj(x)


class ElectraForSequenceClassification(ElectraPreTrainedModel):
    """transformers' ElectraForSequenceClassification: (B, T) → logits (B, num_labels)."""

    hf_architecture = "ElectraForSequenceClassification"

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = config
        self.electra = ElectraModel(config)
        self.classifier = ClassificationHead(config)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.classifier(self.electra(input_ids, attention_mask, token_type_ids))


# ----------------------------------------------------------------------------- the ELECTRA step
@dataclass
class ElectraPretrainingOutput:
    loss: torch.Tensor              # mlm_weight·mlm_loss + rtd_weight·rtd_loss
    mlm_loss: torch.Tensor          # generator cross-entropy over the masked tokens
    rtd_loss: torch.Tensor          # discriminator BCE over the non-pad tokens
    mlm_accuracy: torch.Tensor      # generator argmax == original, over masked tokens
    rtd_accuracy: torch.Tensor      # (logit > 0) == replaced, over non-pad tokens
    rtd_precision: torch.Tensor     # of the tokens predicted replaced, the fraction that were
    rtd_recall: torch.Tensor        # of the replaced tokens, the fraction predicted
    num_masked: torch.Tensor        # N: real masked tokens (a 0-d tensor)
    disc_logits: torch.Tensor       # (B, T)
    is_replaced: torch.Tensor       # (B, T) bool labels
    masked_positions: torch.Tensor  # (B·K,) flat indices into (B·T) of the masked slots, K per sequence
    masked_valid: torch.Tensor      # (B·K,) bool: the slot is a real masked token (N of them)


def rtd_metrics(disc_logits, is_replaced, valid):
    """Accuracy, precision and recall of replaced-token detection over the ``valid`` (non-pad) tokens."""
    pred = (disc_logits > 0) & valid
    target = is_replaced & valid
    n_valid = valid.sum().clamp(min=1)
    tp = (pred & target).sum()
    accuracy = (((disc_logits > 0) == is_replaced) & valid).sum() / n_valid
    precision = tp / pred.sum().clamp(min=1)
    recall = tp / target.sum().clamp(min=1)
    return accuracy.float(), precision.float(), recall.float()


class ElectraPretrainingModel(nn.Module):
    """Generator + discriminator sharing word/position/type embeddings and the embedding LayerNorm
    (each keeps its own ``embeddings_project``)."""

    def __init__(self, config: ElectraConfig, generator_config: ElectraConfig | None = None):
        super().__init__()
        check_config(config)
        if generator_config is not None:
            check_config(generator_config, "generator_config")
        self.config = config
        gen_config = generator_config or config.generator()
        if gen_config.embedding_size != config.embedding_size or gen_config.vocab_size != config.vocab_size:
            raise ValueError("generator and discriminator must share embedding_size and vocab_size to share embeddings")
        self.discriminator = ElectraDiscriminator(config)
        self.generator = ElectraGenerator(gen_config)
        self.generator.electra.embeddings = self.discriminator.electra.embeddings
        self.generator.tie_weights()
        self._special = tuple(sorted(set(config.special_token_ids)))
        self.register_buffer("special_ids", torch.tensor(self._special), persistent=False)

    def _recheck_config(self) -> None:
        """The config's fields may have been set since the model was built: validate them again (a few µs of
        host time per step) and follow a change of the special-token ids that masking skips."""
        check_config(self.config)
        special = tuple(sorted(set(self.config.special_token_ids)))
        if special != self._special:
            self._special = special
            self.special_ids = torch.tensor(special, device=self.special_ids.device)

    def mask_tokens(self, input_ids, attention_mask):
        """ELECTRA's masking (DESIGN.md step 2): per sequence, k = round(mask_prob · n) of its n eligible
        (non-special, non-pad) tokens, at least 1 (0 if n = 0), chosen uniformly without replacement; of
        those, mask_token_prob become [MASK] and the rest keep the original (no random tokens, as in the
        original code). The original code counts k from all non-pad tokens, draws positions with replacement
        and may choose [UNK]; here [PAD], [CLS], [SEP], [MASK] and [UNK] are never chosen and k counts only
        eligible tokens (a difference of ~2 tokens in 128).

        Every sequence has K = config.max_predictions(T) ≥ k slots, so all shapes are static (no host
        sync, no data-dependent shapes): slot j of sequence b is real when ``valid[b, j]``.
        Returns (generator input (B, T), slot token indices (B, K) into T, valid (B, K) bool)."""
        cfg = self.config
        b, t = input_ids.shape
        k_max = cfg.max_predictions(t)
        eligible = ~torch.isin(input_ids, self.special_ids)
        if attention_mask is not None:
            eligible &= attention_mask.bool()
        n = eligible.sum(1)                                                          # (B,)
        k = torch.minimum(torch.round(n * cfg.mask_prob).clamp(min=1), n)            # (B,)
        # the top-k of iid uniform scores over the eligible tokens is a uniform k-subset of them;
        # ineligible tokens score -1 and only fill the slots beyond k
        scores = torch.rand(input_ids.shape, device=input_ids.device).masked_fill_(~eligible, -1.0)
        slots = scores.topk(k_max, dim=1, sorted=True).indices                     # (B, K)
        valid = torch.arange(k_max, device=input_ids.device) < k[:, None]          # (B, K)
        to_mask = valid & (torch.rand(valid.shape, device=input_ids.device) < cfg.mask_token_prob)
        originals = input_ids.gather(1, slots)
        gen_input = input_ids.scatter(1, slots, torch.where(to_mask, cfg.mask_token_id, originals))
        return gen_input, slots, valid

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> ElectraPretrainingOutput:
        """One ELECTRA step without host syncs: every shape is fixed by (B, T) (with ``config.unpad``
        each of the two encoders makes one, to count the real tokens)."""
        cfg = self.config
        if not torch.compiler.is_compiling():    # (under torch.compile the traced values are guarded)
            self._recheck_config()
        check_inputs(cfg, input_ids, attention_mask, token_type_ids, self.discriminator.electra.check_values)
        input_ids = input_ids.long()
        b, t = input_ids.shape
        gen_input, slots, valid = self.mask_tokens(input_ids, attention_mask)         # (B, T), (B, K), (B, K)
        k_max = slots.shape[1]
        rows = torch.arange(b, device=input_ids.device)[:, None]                     # (B, 1)
        masked_positions = (rows * t + slots).reshape(-1)                            # (B·K,) into (B·T)
        valid = valid.reshape(-1)                                                    # (B·K,)
        n_valid = valid.sum()

        logits = self.generator(gen_input, attention_mask, token_type_ids, masked_positions)  # (B·K, V)
        targets = input_ids.reshape(-1).index_select(0, masked_positions)            # (B·K,)

        # Replacement writes only the valid slots' tokens: ids get K scratch columns, the padding slots
        # point at their own scratch column (distinct positions, nothing real overwritten), then dropped.
        # Its one pass over the logits also gives their row log-sum-exp where the MLM loss reuses it.
        scratch = torch.arange(t, t + k_max, device=input_ids.device)                # (K,)
        write_pos = (rows * (t + k_max) + torch.where(valid.view(b, k_max), slots, scratch)).reshape(-1)
        ids_ext = F.pad(input_ids, (0, k_max), value=cfg.pad_token_id)               # (B, T+K)
        want_lse = ops.cross_entropy_takes_lse(logits, cfg.backend)
        replaced = ops.replace_tokens(logits.detach(), ids_ext, write_pos, return_lse=want_lse,
                                      temperature=cfg.sampling_temperature, backend=cfg.backend)
        disc_ext, replaced_ext = replaced[:2]
        lse = replaced[3] if want_lse else None                                      # (B·K,) fp32
        disc_input, is_replaced = disc_ext[:, :t].contiguous(), replaced_ext[:, :t].contiguous()  # (B, T)
        ce = ops.cross_entropy(logits, targets, lse=lse, backend=cfg.backend)         # (B·K,) fp32
        mlm_loss = (ce * valid).sum() / n_valid.clamp(min=1)
        disc_logits = self.discriminator(disc_input, attention_mask, token_type_ids)   # (B, T)
        # the tokens the RTD loss counts: the attention mask's, or without one every token but [PAD]
        valid_tokens = input_ids != cfg.pad_token_id if attention_mask is None else attention_mask.bool()
        bce = F.binary_cross_entropy_with_logits(disc_logits.float(), is_replaced.float(), reduction="none")
        rtd_loss = (bce * valid_tokens).sum() / valid_tokens.sum().clamp(min=1)
        loss = cfg.mlm_weight * mlm_loss + cfg.rtd_weight * rtd_loss

        with torch.no_grad():
            mlm_accuracy = ((logits.argmax(-1) == targets) & valid).sum().float() / n_valid.clamp(min=1)
            rtd_accuracy, rtd_precision, rtd_recall = rtd_metrics(disc_logits, is_replaced, valid_tokens)
        return ElectraPretrainingOutput(loss, mlm_loss, rtd_loss, mlm_accuracy, rtd_accuracy, rtd_precision,
                                        rtd_recall, n_valid, disc_logits, is_replaced, masked_positions, valid)

    def save_pretrained(self, path: str) -> None:
        """Write ``path/discriminator`` and ``path/generator`` in transformers' format."""
        import os

        self.discriminator.save_pretrained(os.path.join(path, "discriminator"))
        self.generator.save_pretrained(os.path.join(path, "generator"))

    @classmethod
    def from_pretrained(cls, path: str) -> "ElectraPretrainingModel":
        """Load ``path/discriminator`` + ``path/generator``; the shared embeddings come from the
        discriminator (they are identical when both were saved from one ElectraPretrainingModel)."""
        import os

        disc = ElectraDiscriminator.from_pretrained(os.path.join(path, "discriminator"))
        gen = ElectraGenerator.from_pretrained(os.path.join(path, "generator"))
        model = cls(disc.config, gen.config)
        model.discriminator.load_state_dict(disc.state_dict())
        shared = ("electra.embeddings.", "generator_lm_head.weight")
        gen_state = {k: v for k, v in gen.state_dict().items() if not k.startswith(shared)}
        result = model.generator.load_state_dict(gen_state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(shared)]
        if missing or result.unexpected_keys:
            raise ValueError(f"generator checkpoint in {path} does not fit: missing {missing}, "
                             f"unexpected {result.unexpected_keys}")
        return model

"""ElectraConfig: one dataclass for discriminator, generator and classifier models.

Field names follow transformers' ElectraConfig, so a HF ``config.json`` round-trips
(``from_dict`` / ``to_dict``); the pretraining fields (masking, loss weights, generator size,
special token ids), ``backend`` and ``unpad`` are fastelectra's own and are ignored by transformers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

# hidden / layers / heads / FFN / embedding of the paper's discriminators (Clark et al. 2020, Table 6),
# the generator hidden size for each (the paper's multipliers: 1/4, 1/3, 1/4 of the discriminator: 64, 256,
# 256) and its mask percent (15, 15, 25).
PRESETS = {
    "tiny":  dict(hidden_size=64,   num_hidden_layers=2,  num_attention_heads=2,  intermediate_size=256,
                  embedding_size=64,   max_position_embeddings=128, generator_hidden_size=32),
    "small": dict(hidden_size=256,  num_hidden_layers=12, num_attention_heads=4,  intermediate_size=1024,
                  embedding_size=128,  generator_hidden_size=64),
    "base":  dict(hidden_size=768,  num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  embedding_size=768,  generator_hidden_size=256),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  embedding_size=1024, generator_hidden_size=256, mask_prob=0.25),
}

@dataclass
class ElectraConfig:
    # --- transformers' ElectraConfig fields (same names, same defaults)
    vocab_size: int = 30522
    embedding_size: int = 128
    hidden_size: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    num_labels: int = 2
    # --- fastelectra's pretraining fields
    generator_hidden_size: int | None = None   # None: hidden_size // 4
    generator_size_fraction: float = 0.25       # used when generator_hidden_size is None
    mask_prob: float = 0.15                     # fraction of non-special, non-pad tokens chosen
    mask_token_prob: float = 0.85               # of the chosen: become [MASK]; the rest keep the original
    sampling_temperature: float = 1.0
    mlm_weight: float = 1.0
    rtd_weight: float = 50.0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    unk_token_id: int = 100
    backend: str = "auto"                        # auto | fused | eager (FASTELECTRA_BACKEND overrides)
    unpad: bool = False                          # with an attention mask, run the encoder on the real
                                                 # tokens only (varlen attention); one host sync per call
    extra: dict = field(default_factory=dict, repr=False)  # other HF keys, written back unchanged

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ElectraConfig.{name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ElectraConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in ("gelu", "gelu_new", "relu", "silu"):
            raise ValueError(f"ElectraConfig.hidden_act={self.hidden_act!r} is not supported; "
                             "expected gelu, gelu_new, relu or silu")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "mask_prob", "mask_token_prob"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0 and not (name == "mask_token_prob" and v == 1.0):
                raise ValueError(f"ElectraConfig.{name} must be in [0, 1), got {v}")
        if not 0.0 <= self.sampling_temperature < math.inf:   # false for NaN too
            raise ValueError(f"ElectraConfig.sampling_temperature must be a finite number >= 0, got "
                             f"{self.sampling_temperature}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"ElectraConfig.pad_token_id={self.pad_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if not isinstance(self.unpad, bool):
            raise ValueError(f"ElectraConfig.unpad must be True or False, got {self.unpad!r}")
        if self.backend not in ("auto", "fused", "eager"):
            raise ValueError(f"ElectraConfig.backend={self.backend!r}; expected 'auto', 'fused' or 'eager'")

    # ------------------------------------------------------------------ presets and derived configs
    @classmethod
    def preset(cls, name: str, **overrides) -> "ElectraConfig":
        """The paper's ELECTRA-Small/Base/Large discriminator (or ``tiny`` for tests and demos)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """[PAD], [CLS], [SEP], [MASK], [UNK] ids; checked against the vocabulary (pretraining needs them)."""
        ids = {}
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "unk_token_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"ElectraConfig.{name}={v} is outside the vocabulary [0, {self.vocab_size}); "
                                 "set the special-token ids from the tokenizer")
            ids[name] = v
        return tuple(ids.values())

    def max_predictions(self, seqlen: int) -> int:
        """Masked slots per sequence of length ``seqlen``: ceil(mask_prob · seqlen), at least 1. A
        static count, so the step's shapes do not depend on the data (no host sync, graph capture)."""
        return max(1, math.ceil(self.mask_prob * seqlen))

    def generator(self) -> "ElectraConfig":
        """The generator's config: same depth and embeddings, hidden = generator_hidden_size (or the
        fraction of hidden_size), heads = hidden // 64 (at least 1), FFN = 4·hidden."""
        hidden = self.generator_hidden_size or max(1, int(self.hidden_size * self.generator_size_fraction))
        heads = max(1, hidden // 64)
        if hidden % heads:
            raise ValueError(f"generator hidden size {hidden} is not divisible by its {heads} heads")
        return dataclasses.replace(self, hidden_size=hidden, num_attention_heads=heads,
                                   intermediate_size=4 * hidden, generator_hidden_size=None, extra={})

    # ------------------------------------------------------------------ HF config.json round trip
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for name in ("cls_token_id", "sep_token_id", "mask_token_id", "unk_token_id"):
            if not 0 <= d[name] < self.vocab_size:  # unset for this vocabulary: transformers would warn
                del d[name]
        return {**self.extra, **d, "model_type": "electra"}

    @classmethod
    def from_dict(cls, d: dict) -> "ElectraConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        if "num_labels" not in known and isinstance(d.get("id2label"), dict):
            known["num_labels"] = len(d["id2label"])
        extra = {k: v for k, v in d.items() if k not in names and k not in ("model_type",)}
        if d.get("model_type", "electra") != "electra":
            raise ValueError(f"config model_type is {d.get('model_type')!r}, expected 'electra'")
        for key in ("is_decoder", "add_cross_attention"):
            if d.get(key):
                raise ValueError(f"config has {key}=true (a causal or encoder-decoder checkpoint, e.g. "
                                 "ElectraForCausalLM); fastelectra's ELECTRA is a bidirectional encoder")
        if known.get("pad_token_id") is None:
            known.pop("pad_token_id", None)
        return cls(**known, extra=extra)

    def to_json_file(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str) -> "ElectraConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

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

from .backend import BACKENDS

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

# transformers' keys for a classifier's task (label names, loss): not ElectraConfig fields (they travel in
# ``extra``) but settable as overrides; a new classification head drops the checkpoint's (fastelectra.hf.load_model)
HF_TASK_KEYS = ("id2label", "label2id", "problem_type")
SPECIAL_TOKEN_FIELDS = ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "unk_token_id")


def read_json_object(path: str, what: str) -> dict:
    """The JSON object (key: value pairs) in file ``path``; ValueError naming ``what`` and ``path`` if the file
    is not valid JSON or holds another JSON value. OSError from opening it propagates."""
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except ValueError as e:   # JSONDecodeError, or bytes that are not text
            raise ValueError(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{what} {path} must hold a JSON object (key: value pairs), got a {type(d).__name__}")
    return d


def _check_int(name: str, v, minimum: int | None, what: str | None = None) -> None:
    """``v`` must be an int (not a bool) >= ``minimum`` (None: any int), else a ValueError naming the field."""
    if isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum):
        return
    if what is None:
        what = "an integer" if minimum is None else "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"ElectraConfig.{name} must be {what}, got {v!r}")


def _check_number(name: str, v, low: float, high: float = math.inf, *, low_open: bool = False,
                  high_open: bool = True, what: str = "a number") -> None:
    """``v`` must be a real number (not a bool) in the interval, else a ValueError naming the field.
    With ``high=inf`` the interval is open there, so NaN and infinities are rejected too."""
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if number and (low < v if low_open else low <= v) and (v < high if high_open else v <= high):
        return
    if high == math.inf:
        expected = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        expected = f"{what} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"ElectraConfig.{name} must be {expected}, got {v!r}")


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
    generator_hidden_size: int | None = None   # None: generator_size_fraction of hidden_size (0 is an error)
    generator_size_fraction: float = 0.25       # in (0, 1]; used when generator_hidden_size is None
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
        """Raise ValueError naming the first field that is out of range or of the wrong type."""
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels"):
            _check_int(name, getattr(self, name), 1)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ElectraConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ("gelu", "gelu_new", "relu", "silu"):
            raise ValueError(f"ElectraConfig.hidden_act={self.hidden_act!r} is not supported; "
                             "expected gelu, gelu_new, relu or silu")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "mask_prob"):
            _check_number(name, getattr(self, name), 0.0, 1.0)
        _check_number("mask_token_prob", self.mask_token_prob, 0.0, 1.0, high_open=False)
        if self.classifier_dropout is not None:
            _check_number("classifier_dropout", self.classifier_dropout, 0.0, 1.0, what="None or a number")
        for name in ("initializer_range", "layer_norm_eps", "sampling_temperature", "mlm_weight", "rtd_weight"):
            _check_number(name, getattr(self, name), 0.0)
        _check_int("pad_token_id", self.pad_token_id, 0, what=f"an integer in [0, vocab_size={self.vocab_size})")
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"ElectraConfig.pad_token_id={self.pad_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        for name in ("cls_token_id", "sep_token_id", "mask_token_id", "unk_token_id"):  # range: special_token_ids
            _check_int(name, getattr(self, name), None)
        if self.generator_hidden_size is not None:
            _check_int("generator_hidden_size", self.generator_hidden_size, 1, what="None or a positive integer")
        _check_number("generator_size_fraction", self.generator_size_fraction, 0.0, 1.0, low_open=True,
                      high_open=False)
        if not isinstance(self.unpad, bool):
            raise ValueError(f"ElectraConfig.unpad must be True or False, got {self.unpad!r}")
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"ElectraConfig.backend={self.backend!r}; expected 'auto', 'fused' or 'eager'")
        if not isinstance(self.extra, dict):
            raise ValueError(f"ElectraConfig.extra must be a dict, got {type(self.extra).__name__}")

    @classmethod
    def field_names(cls) -> list[str]:
        """The settable fields (``extra`` excluded), in declaration order."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    def with_overrides(self, **overrides) -> "ElectraConfig":
        """A validated copy with ``overrides`` applied through the HF dict: ElectraConfig fields, keys this
        config already carries in ``extra``, and transformers' ``id2label`` / ``label2id`` / ``problem_type``.
        Any other key (a misspelt field) is a TypeError naming it."""
        allowed = set(self.field_names()) | set(self.to_dict()) | set(HF_TASK_KEYS)
        unknown = sorted(k for k in overrides if k not in allowed)
        if unknown:
            raise TypeError(f"unknown ElectraConfig override{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}; valid fields: {', '.join(self.field_names())} "
                            f"(and {', '.join(HF_TASK_KEYS)})")
        return type(self).from_dict({**self.to_dict(), **overrides})

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
        """[PAD], [CLS], [SEP], [MASK], [UNK] ids; checked against the vocabulary and to be distinct
        (pretraining needs them)."""
        ids = {}
        for name in SPECIAL_TOKEN_FIELDS:
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ValueError(f"ElectraConfig.{name}={v} is outside the vocabulary [0, {self.vocab_size}); "
                                 "set the special-token ids from the tokenizer")
            for other, w in ids.items():
                if w == v:
                    raise ValueError(f"ElectraConfig.{name}={v} is also {other}: the special tokens need distinct "
                                     "ids (masking and padding would be confused); set them from the tokenizer")
            ids[name] = v
        return tuple(ids.values())

    def max_predictions(self, seqlen: int) -> int:
        """Masked slots per sequence of length ``seqlen``: ceil(mask_prob · seqlen), at least 1. A
        static count, so the step's shapes do not depend on the data (no host sync, graph capture)."""
        return max(1, math.ceil(self.mask_prob * seqlen))

    def generator(self) -> "ElectraConfig":
        """The generator's config: same depth and embeddings, hidden = generator_hidden_size (or the
        fraction of hidden_size), heads = hidden // 64 (at least 1), FFN = 4·hidden."""
        if self.generator_hidden_size is not None:
            hidden, source = self.generator_hidden_size, f"generator_hidden_size={self.generator_hidden_size}"
        else:
            hidden = max(1, int(self.hidden_size * self.generator_size_fraction))
            source = (f"generator_size_fraction={self.generator_size_fraction} of hidden_size={self.hidden_size} "
                      f"(= {hidden})")
        heads = max(1, hidden // 64)
        if hidden % heads:
            raise ValueError(f"ElectraConfig.{source} gives a generator hidden size not divisible by its "
                             f"{heads} heads (hidden // 64); use a multiple of 64 or a size below 128")
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
        if not isinstance(d, dict):
            raise TypeError(f"ElectraConfig.from_dict expects a dict, got {type(d).__name__}")
        names = set(cls.field_names())
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
        position = d.get("position_embedding_type", "absolute")
        if position not in (None, "absolute"):
            raise ValueError(f"config has position_embedding_type={position!r}; fastelectra's ELECTRA has absolute "
                             "position embeddings only (no relative-position attention scores)")
        for name in SPECIAL_TOKEN_FIELDS:   # HF writes null for an unset token id: keep ours
            if name in known and known[name] is None:
                del known[name]
        return cls(**known, extra=extra)

    def to_json_file(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str) -> "ElectraConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        d = read_json_object(path, "config file")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"config file {path}: {e}") from e

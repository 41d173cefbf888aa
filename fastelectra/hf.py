"""transformers interop: read and write HF ELECTRA checkpoint directories (no network, ever).

A directory holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), as written by
``save_pretrained`` of transformers' ElectraForPreTraining / ElectraForMaskedLM /
ElectraForSequenceClassification; our models have the same state-dict keys.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from .config import HF_TASK_KEYS, ElectraConfig

__all__ = ["load_model", "save_model", "load_state_dict_file", "CheckpointMismatchError"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# keys transformers may store that carry no parameters of ours (old checkpoints saved buffers)
IGNORED_KEYS = ("electra.embeddings.position_ids", "electra.embeddings.token_type_ids")
TIED_KEYS = ("generator_lm_head.weight",)
EMBEDDING_KEY = "electra.embeddings.word_embeddings.weight"   # what TIED_KEYS are tied to


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys are not the model's: ``missing`` (the model's keys it lacks) and ``unexpected``
    (its keys the model does not have), e.g. a discriminator loaded as a sequence classifier."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """The state dict stored in checkpoint directory ``path`` (safetensors preferred)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    for name in WEIGHT_FILES:
        f = os.path.join(path, name)
        if os.path.isfile(f):
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return load_file(f)
                return torch.load(f, map_location="cpu", weights_only=True)
            except OSError:
                raise
            except Exception as e:   # SafetensorError, UnpicklingError, ...: corrupt or truncated
                raise ValueError(f"cannot read weights file {f} (corrupt or truncated?): "
                                 f"{type(e).__name__}: {e}") from e
    if any(n.endswith(".index.json") for n in os.listdir(path)):
        raise ValueError(f"{path} holds a sharded checkpoint; fastelectra reads single-file checkpoints "
                         f"({' or '.join(WEIGHT_FILES)})")
    raise FileNotFoundError(f"no weights in {path}: expected {' or '.join(WEIGHT_FILES)}")


def load_model(cls, path: str, *, new_head: bool = False, **config_overrides):
    """Build ``cls`` from ``path/config.json`` and load its weights, strictly: every parameter must be
    present (except the generator's LM head, tied to the word embeddings) and no key left over.

    ``new_head=True`` (fine-tuning on a new task) loads only the encoder (``electra.*``, which must be
    complete): the checkpoint's head keys are dropped and ``cls``'s head keeps its fresh initialisation.
    A bare ElectraModel checkpoint (keys without the ``electra.`` prefix) is then accepted too. The old
    task's ``id2label`` / ``label2id`` / ``problem_type`` are dropped from the config with its head (pass
    new ones as overrides), so save_model never writes them for the new head.

    ``config_overrides`` replace config.json's values: ElectraConfig fields (or keys the file carries, or
    ``id2label`` / ``label2id`` / ``problem_type``); any other key is a TypeError (see
    ElectraConfig.with_overrides). A checkpoint whose keys do not match raises CheckpointMismatchError."""
    config = ElectraConfig.from_json_file(os.path.join(path, "config.json"))
    config = _special_ids_from_tokenizer(config, path, skip=config_overrides)
    if new_head:
        config = dataclasses.replace(config, extra={k: v for k, v in config.extra.items() if k not in HF_TASK_KEYS})
    if config_overrides:
        config = config.with_overrides(**config_overrides)
    model = cls(config)
    state = load_state_dict_file(path)
    if new_head:
        if not any(k.startswith("electra.") for k in state):
            state = {"electra." + k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k.startswith("electra.")}
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in TIED_KEYS and (k.startswith("electra.") or not new_head)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointMismatchError(f"checkpoint {path} does not match {cls.__name__}: missing keys {missing[:8]}"
                                      f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                                      f"{'...' if len(unexpected) > 8 else ''}", missing, unexpected)
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"checkpoint {path}: {k} has shape {tuple(v.shape)} but the config gives "
                             f"{tuple(own[k].shape)}")
    tied = [k for k in TIED_KEYS if k in own]
    if tied and (config.extra.get("tie_word_embeddings") is False or any(
            k in state and not torch.equal(state[k], state.get(EMBEDDING_KEY, state[k])) for k in tied)):
        raise ValueError(f"checkpoint {path} has an LM head untied from the word embeddings (tie_word_embeddings="
                         f"{config.extra.get('tie_word_embeddings')}); fastelectra's generator ties them, as ELECTRA "
                         "does, and would silently replace one with the other")
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _special_ids_from_tokenizer(config: ElectraConfig, path: str, skip) -> ElectraConfig:
    """transformers' ELECTRA config.json has no [CLS] / [SEP] / [MASK] / [UNK] ids (only pad_token_id), so
    ElectraConfig's BERT defaults (101, 102, 103, 100) fill them. Where the file lacks one and a tokenizer
    of the checkpoint's vocabulary is saved beside it, its ids are taken instead (they are what masking
    writes and skips). ``skip``: fields given explicitly."""
    from .config import SPECIAL_TOKEN_FIELDS, read_json_object

    raw = read_json_object(os.path.join(path, "config.json"), "config file")
    unset = [n for n in SPECIAL_TOKEN_FIELDS if raw.get(n) is None and n not in skip]
    if not unset or not any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "vocab.txt")):
        return config
    from .data import FastElectraError, load_tokenizer, special_token_ids

    try:
        ids = special_token_ids(load_tokenizer(path))
    except FastElectraError:          # unreadable, or without ELECTRA's special tokens: keep the defaults
        return config
    if ids["vocab_size"] != config.vocab_size:
        return config
    return config.with_overrides(**{n: ids[n] for n in unset})


def save_model(model, path: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers' ``from_pretrained`` loads. The config's
    ``dtype`` is the saved tensors' (transformers loads them in it by default), whatever dtype or torch_dtype
    the source config carried (fastelectra loads a bf16 checkpoint in fp32); with mixed floating dtypes it has
    none."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in TIED_KEYS}
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("dtype", "torch_dtype")}
    config.update(architectures=[model.hf_architecture], tie_word_embeddings=True)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)

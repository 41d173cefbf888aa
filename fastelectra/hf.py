"""transformers interop: read and write HF ELECTRA checkpoint directories (no network, ever).

A directory holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), as written by
``save_pretrained`` of transformers' ElectraForPreTraining / ElectraForMaskedLM /
ElectraForSequenceClassification; our models have the same state-dict keys.
"""
from __future__ import annotations

import json
import os

import torch

from .config import ElectraConfig

__all__ = ["load_model", "save_model", "load_state_dict_file"]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# keys transformers may store that carry no parameters of ours (old checkpoints saved buffers)
IGNORED_KEYS = ("electra.embeddings.position_ids", "electra.embeddings.token_type_ids")
TIED_KEYS = ("generator_lm_head.weight",)
EMBEDDING_KEY = "electra.embeddings.word_embeddings.weight"   # what TIED_KEYS are tied to


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
    A bare ElectraModel checkpoint (keys without the ``electra.`` prefix) is then accepted too.

    ``config_overrides`` replace config.json's values: ElectraConfig fields (or keys the file carries, or
    ``id2label`` / ``label2id``); any other key is a TypeError (see ElectraConfig.with_overrides)."""
    config = ElectraConfig.from_json_file(os.path.join(path, "config.json"))
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
        raise ValueError(f"checkpoint {path} does not match {cls.__name__}: missing keys {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
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


def save_model(model, path: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers' ``from_pretrained`` loads."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config = {**model.config.to_dict(), "architectures": [model.hf_architecture], "tie_word_embeddings": True}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in TIED_KEYS}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)

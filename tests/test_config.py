import dataclasses

import pytest

from fastelectra.config import ElectraConfig

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name,dims,gen_hidden,mask_prob", [       # Clark et al. 2020, Table 6
    ("small", (256, 12, 4, 1024, 128), 64, 0.15),
    ("base", (768, 12, 12, 3072, 768), 256, 0.15),
    ("large", (1024, 24, 16, 4096, 1024), 256, 0.25),
])
def test_presets_have_the_papers_sizes(name, dims, gen_hidden, mask_prob):
    c = ElectraConfig.preset(name)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.embedding_size) == dims
    assert c.mask_prob == mask_prob
    g = c.generator()
    assert g.hidden_size == gen_hidden
    assert g.num_hidden_layers == c.num_hidden_layers
    assert g.num_attention_heads == gen_hidden // 64
    assert g.intermediate_size == 4 * gen_hidden
    assert g.embedding_size == c.embedding_size and g.vocab_size == c.vocab_size


def test_generator_fraction_is_configurable():
    c = ElectraConfig.preset("base", generator_hidden_size=None, generator_size_fraction=1 / 3)
    assert c.generator().hidden_size == 256
    c = ElectraConfig.preset("base", generator_hidden_size=None, generator_size_fraction=0.5)
    assert c.generator().hidden_size == 384 and c.generator().num_attention_heads == 6


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ElectraConfig.preset("huge")


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=100, num_attention_heads=3), "divisible"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_act="swish2"), "hidden_act"),
    (dict(backend="cuda"), "backend"),
    (dict(mask_prob=1.5), "mask_prob"),
    (dict(pad_token_id=40000), "pad_token_id"),
    (dict(unpad="yes"), "unpad must be True or False"),
    (dict(sampling_temperature=float("nan")), "sampling_temperature"),
    (dict(sampling_temperature=-1.0), "sampling_temperature"),
])
def test_invalid_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ElectraConfig(**kwargs)


def test_special_ids_outside_vocab_are_reported_when_used():
    c = ElectraConfig(vocab_size=50)
    with pytest.raises(ValueError, match="cls_token_id=101 is outside the vocabulary"):
        c.special_token_ids


def test_hf_config_round_trips():
    hf = transformers.ElectraConfig(vocab_size=1234, embedding_size=48, hidden_size=96, num_hidden_layers=3,
                                    num_attention_heads=6, intermediate_size=200, hidden_act="gelu_new",
                                    layer_norm_eps=1e-7, max_position_embeddings=77, num_labels=5)
    ours = ElectraConfig.from_dict(hf.to_dict())
    for f in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "hidden_act", "layer_norm_eps", "max_position_embeddings"):
        assert getattr(ours, f) == getattr(hf, f), f
    assert ours.num_labels == 5
    back = transformers.ElectraConfig.from_dict(ours.to_dict())
    assert back.to_dict()["hidden_size"] == 96 and back.num_labels == 5 and back.hidden_act == "gelu_new"
    again = ElectraConfig.from_dict(ours.to_dict())
    assert dataclasses.asdict(again) == dataclasses.asdict(ours)


def test_model_type_must_be_electra():
    with pytest.raises(ValueError, match="model_type"):
        ElectraConfig.from_dict({"model_type": "bert"})


def test_unpad_round_trips_and_transformers_ignores_it():
    ours = ElectraConfig(vocab_size=300, hidden_size=32, num_attention_heads=2, unpad=True)
    assert ElectraConfig.from_dict(ours.to_dict()).unpad is True
    assert ElectraConfig.from_dict({k: v for k, v in ours.to_dict().items() if k != "unpad"}).unpad is False
    hf = transformers.ElectraConfig.from_dict(ours.to_dict())
    assert hf.hidden_size == 32 and ElectraConfig.from_dict(hf.to_dict()).unpad is True

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
    (dict(initializer_range=-0.02), r"initializer_range must be a finite number >= 0"),
    (dict(initializer_range=float("nan")), "initializer_range"),
    (dict(pad_token_id=0.5), r"pad_token_id must be an integer in \[0, vocab_size=30522\)"),
    (dict(pad_token_id=None), "pad_token_id must be an integer"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(num_labels=0), "num_labels must be a positive integer"),
    (dict(num_labels=-1), "num_labels"),
    (dict(classifier_dropout=1.5), r"classifier_dropout must be None or a number in \[0, 1\)"),
    (dict(layer_norm_eps=-1.0), "layer_norm_eps must be a finite number >= 0"),
    (dict(layer_norm_eps=float("nan")), "layer_norm_eps"),
    (dict(generator_hidden_size=0), "generator_hidden_size must be None or a positive integer, got 0"),
    (dict(generator_hidden_size=-64), "generator_hidden_size must be None or a positive integer"),
    (dict(generator_hidden_size=32.5), "generator_hidden_size must be None or a positive integer"),
    (dict(generator_size_fraction=-1.0), r"generator_size_fraction must be a number in \(0, 1\]"),
    (dict(generator_size_fraction=0.0), "generator_size_fraction"),
    (dict(generator_size_fraction=float("nan")), "generator_size_fraction"),
    (dict(mlm_weight=float("nan")), "mlm_weight must be a finite number >= 0"),
    (dict(rtd_weight=-1.0), "rtd_weight must be a finite number >= 0"),
    (dict(rtd_weight="a"), "rtd_weight must be a finite number >= 0, got 'a'"),
    (dict(rtd_weight=float("inf")), "rtd_weight"),
    (dict(vocab_size=True), "vocab_size must be a positive integer, got True"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers must be a positive integer"),
    (dict(hidden_dropout_prob="0.1"), r"hidden_dropout_prob must be a number in \[0, 1\), got '0.1'"),
    (dict(attention_probs_dropout_prob=None), "attention_probs_dropout_prob"),
    (dict(mask_token_prob=1.5), r"mask_token_prob must be a number in \[0, 1\]"),
    (dict(mask_prob=True), "mask_prob"),
    (dict(cls_token_id="101"), "cls_token_id must be an integer"),
    (dict(extra=None), "extra must be a dict"),
])
def test_invalid_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ElectraConfig(**kwargs)


def test_boundary_values_are_accepted():
    c = ElectraConfig(layer_norm_eps=0.0, initializer_range=0, classifier_dropout=0.0, num_labels=1, mlm_weight=0,
                      generator_size_fraction=1.0, mask_token_prob=1.0)
    assert c.generator().hidden_size == c.hidden_size


def test_validate_is_called_by_presets_replace_and_from_dict():
    with pytest.raises(ValueError, match="ElectraConfig.num_labels"):
        ElectraConfig.preset("tiny", num_labels=0)
    with pytest.raises(ValueError, match="ElectraConfig.rtd_weight"):
        dataclasses.replace(ElectraConfig(), rtd_weight=-1.0)
    with pytest.raises(ValueError, match="ElectraConfig.layer_norm_eps"):
        ElectraConfig.from_dict({"layer_norm_eps": -1})
    with pytest.raises(TypeError, match="from_dict expects a dict, got list"):
        ElectraConfig.from_dict([1, 2])


def test_generator_size_that_does_not_split_into_heads_names_the_field():
    with pytest.raises(ValueError, match=r"generator_hidden_size=200 gives a generator hidden size not divisible"):
        ElectraConfig(generator_hidden_size=200).generator()
    with pytest.raises(ValueError, match=r"generator_size_fraction=0.25 of hidden_size=800 \(= 200\)"):
        ElectraConfig(hidden_size=800, num_attention_heads=4).generator()


def test_hf_null_token_ids_keep_the_defaults():
    c = ElectraConfig.from_dict({"pad_token_id": None, "sep_token_id": None})
    assert (c.pad_token_id, c.sep_token_id) == (0, 102)


def test_config_file_must_be_a_json_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config file .*config.json must hold a JSON object .*got a list"):
        ElectraConfig.from_json_file(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"config file .*config.json is not valid JSON"):
        ElectraConfig.from_json_file(str(path))
    path.write_text('{"num_labels": 0}')
    with pytest.raises(ValueError, match=r"config file .*config.json: ElectraConfig.num_labels must be"):
        ElectraConfig.from_json_file(str(path))


def test_overrides_must_name_fields():
    c = ElectraConfig(vocab_size=300, extra={"architectures": ["ElectraForPreTraining"]})
    with pytest.raises(TypeError, match=r"unknown ElectraConfig override 'num_label'; valid fields: .*num_labels"):
        c.with_overrides(num_label=5)
    d = c.with_overrides(num_labels=5, id2label={"0": "a"}, architectures=["X"])
    assert d.num_labels == 5 and d.extra["id2label"] == {"0": "a"} and d.extra["architectures"] == ["X"]
    with pytest.raises(ValueError, match="ElectraConfig.num_labels"):
        c.with_overrides(num_labels=0)


def test_relative_position_checkpoints_are_rejected():
    assert ElectraConfig.from_dict({"position_embedding_type": "absolute"}).extra["position_embedding_type"] == "absolute"
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'; fastelectra's ELECTRA has absolute"):
        ElectraConfig.from_dict({"position_embedding_type": "relative_key"})


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

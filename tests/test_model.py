"""Parity with transformers' ELECTRA: random-initialised HF models saved and loaded by fastelectra
(and back), compared on padded batches in fp32 eval mode — outputs and gradients."""
import json
import os

import pytest
import torch

from fastelectra.config import ElectraConfig
from fastelectra.model import ElectraDiscriminator, ElectraForSequenceClassification, ElectraGenerator
from electra_fixtures import hf_config, padded_batch, randomise

transformers = pytest.importorskip("transformers")

PAIRS = [
    ("ElectraForPreTraining", ElectraDiscriminator),
    ("ElectraForMaskedLM", ElectraGenerator),
    ("ElectraForSequenceClassification", ElectraForSequenceClassification),
]


def load_pair(hf_name, ours_cls, tmp_path, **overrides):
    torch.manual_seed(0)
    hf = getattr(transformers, hf_name)(hf_config(**overrides))
    randomise(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = ours_cls.from_pretrained(str(tmp_path / "hf"), backend="eager")
    return hf.eval(), ours.eval()


@pytest.mark.parametrize("hf_name,ours_cls", PAIRS)
@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_logits_match_transformers(hf_name, ours_cls, act, tmp_path):
    hf, ours = load_pair(hf_name, ours_cls, tmp_path, hidden_act=act)
    ids, mask, types = padded_batch(211)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        out = ours(ids, mask, types)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hf_name,ours_cls", PAIRS)
def test_gradients_match_transformers(hf_name, ours_cls, tmp_path):
    hf, ours = load_pair(hf_name, ours_cls, tmp_path)
    ids, mask, types = padded_batch(211, seed=3)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    out = ours(ids, mask, types)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    (ref * w).sum().backward()
    (out * w).sum().backward()
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        ref_grad = hf_params[name].grad
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_grad, atol=1e-5, rtol=1e-4, msg=name)
        checked += 1
    assert checked == len(hf_params)


def test_padding_does_not_change_valid_outputs(tmp_path):
    _, ours = load_pair("ElectraForPreTraining", ElectraDiscriminator, tmp_path)
    ids, mask, types = padded_batch(211)
    with torch.no_grad():
        a = ours(ids, mask, types)
        ids2 = ids.clone()
        ids2[mask == 0] = 7                                   # change what sits under the padding
        b = ours(ids2, mask, types)
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("hf_name,ours_cls", PAIRS)
def test_save_pretrained_loads_in_transformers(hf_name, ours_cls, tmp_path):
    cfg = ElectraConfig(vocab_size=211, embedding_size=40, hidden_size=48, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=72, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(2)
    ours = ours_cls(cfg).eval()
    randomise(ours)
    ours.save_pretrained(str(tmp_path / "ours"))
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["architectures"] == [hf_name]
    hf = getattr(transformers, hf_name).from_pretrained(str(tmp_path / "ours"), attn_implementation="eager").eval()
    ids, mask, types = padded_batch(211)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask, types), hf(input_ids=ids, attention_mask=mask,
                                                              token_type_ids=types).logits, atol=1e-5, rtol=1e-5)


def test_generator_head_is_tied_and_pytorch_bin_loads(tmp_path):
    torch.manual_seed(0)
    hf = transformers.ElectraForMaskedLM(hf_config())
    randomise(hf)
    os.makedirs(tmp_path / "bin")
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")   # the legacy format, tied key included
    ours = ElectraGenerator.from_pretrained(str(tmp_path / "bin"))
    assert ours.generator_lm_head.weight is ours.electra.embeddings.word_embeddings.weight
    torch.testing.assert_close(ours.generator_lm_head.weight, hf.generator_lm_head.weight)


def test_missing_checkpoint_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        ElectraDiscriminator.from_pretrained(str(tmp_path))
    ElectraConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                  intermediate_size=64, embedding_size=32).to_json_file(str(tmp_path / "config.json"))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        ElectraDiscriminator.from_pretrained(str(tmp_path))


def test_checkpoint_of_another_architecture_is_rejected(tmp_path):
    torch.manual_seed(0)
    transformers.ElectraForMaskedLM(hf_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match ElectraDiscriminator"):
        ElectraDiscriminator.from_pretrained(str(tmp_path))


def test_untied_lm_head_and_decoder_checkpoints_are_rejected(tmp_path):
    """fastelectra's generator ties its LM head to the word embeddings and its encoder is bidirectional:
    a checkpoint with an untied head, or a causal-LM one, would load as a different model."""
    torch.manual_seed(0)
    transformers.ElectraForMaskedLM(hf_config(tie_word_embeddings=False)).save_pretrained(tmp_path / "untied")
    with pytest.raises(ValueError, match="untied from the word embeddings"):
        ElectraGenerator.from_pretrained(str(tmp_path / "untied"))
    transformers.ElectraForCausalLM(hf_config(is_decoder=True)).save_pretrained(tmp_path / "causal")
    with pytest.raises(ValueError, match="is_decoder=true"):
        ElectraGenerator.from_pretrained(str(tmp_path / "causal"))


@pytest.fixture
def tiny():
    cfg = ElectraConfig(vocab_size=100, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                        intermediate_size=64, embedding_size=32, max_position_embeddings=16)
    return ElectraDiscriminator(cfg).eval()


@pytest.mark.parametrize("make,exc,match", [
    (lambda: dict(input_ids=torch.tensor([[1, 100]])), ValueError, r"input_ids must lie in \[0, vocab_size=100\)"),
    (lambda: dict(input_ids=torch.tensor([[1, -1]])), ValueError, "input_ids must lie in"),
    (lambda: dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, "input_ids must be int64"),
    (lambda: dict(input_ids=torch.tensor([1, 2])), ValueError, r"shape \(batch, seqlen\)"),
    (lambda: dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4)),
     ValueError, "attention_mask must have input_ids' shape"),
    (lambda: dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 5)),
     TypeError, "attention_mask must be an integer or bool"),
    (lambda: dict(input_ids=torch.ones(1, 17, dtype=torch.long)), ValueError, "exceeds max_position_embeddings=16"),
    (lambda: dict(input_ids=torch.ones(0, 5, dtype=torch.long)), ValueError, "empty"),
    (lambda: dict(input_ids=torch.ones(1, 5, dtype=torch.long), token_type_ids=torch.full((1, 5), 2)),
     ValueError, "token_type_ids must lie in"),
])
def test_bad_input_is_a_clear_error(tiny, make, exc, match):
    with pytest.raises(exc, match=match):
        tiny(**make())

"""Parity with transformers' ELECTRA: random-initialised HF models saved and loaded by fastelectra
(and back), compared on padded batches in fp32 eval mode — outputs and gradients."""
import json
import os

import pytest
import torch

from fastelectra.config import ElectraConfig
from fastelectra.model import (ElectraDiscriminator, ElectraForSequenceClassification, ElectraGenerator,
                               ElectraPretrainingModel)
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


def test_special_token_ids_come_from_the_tokenizer_beside_an_hf_checkpoint(tmp_path):
    """transformers' config.json names no [CLS]/[SEP]/[MASK]/[UNK]: with a vocab.txt of the checkpoint's size
    beside it, its ids are used, not BERT's defaults (101, 102, 103, 100); ids given explicitly win."""
    from fastelectra.model import ElectraPretrainingModel

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(206)]     # 211 = hf_config's
    for name in ("discriminator", "generator"):
        folder = tmp_path / name
        model = transformers.ElectraForPreTraining(hf_config()) if name == "discriminator" else \
            transformers.ElectraForMaskedLM(hf_config(hidden_size=24, num_attention_heads=2, intermediate_size=36))
        model.save_pretrained(folder)
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    disc = ElectraDiscriminator.from_pretrained(str(tmp_path / "discriminator"))
    assert disc.config.special_token_ids == (0, 2, 3, 4, 1)
    assert ElectraPretrainingModel.from_pretrained(str(tmp_path)).config.mask_token_id == 4
    given = ElectraDiscriminator.from_pretrained(str(tmp_path / "discriminator"), mask_token_id=7)
    assert given.config.special_token_ids == (0, 2, 3, 7, 1)
    (tmp_path / "discriminator" / "vocab.txt").write_text("\n".join(vocab[:-1]) + "\n")   # another vocab size
    assert ElectraDiscriminator.from_pretrained(str(tmp_path / "discriminator")).config.mask_token_id == 103


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


def tiny_config(**kw):
    return ElectraConfig(**{**dict(vocab_size=50, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                   intermediate_size=64, embedding_size=32, max_position_embeddings=16), **kw})


def test_unknown_from_pretrained_overrides_are_errors(tmp_path):
    """A misspelt override must not vanish into ``extra``; the HF keys a config.json carries still load."""
    torch.manual_seed(0)
    transformers.ElectraForSequenceClassification(hf_config()).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"unknown ElectraConfig override 'num_label'; valid fields: .*num_labels"):
        ElectraForSequenceClassification.from_pretrained(str(tmp_path), num_label=5)
    clf = ElectraForSequenceClassification.from_pretrained(str(tmp_path), backend="eager", num_labels=3,
                                                           id2label={"0": "a", "1": "b", "2": "c"},
                                                           architectures=["ElectraForSequenceClassification"])
    assert clf.config.num_labels == 3 and clf.config.extra["id2label"]["2"] == "c"
    assert clf.config.extra["transformers_version"]                 # the file's own HF keys are kept
    with pytest.raises(ValueError, match="ElectraConfig.num_labels must be a positive integer"):
        ElectraForSequenceClassification.from_pretrained(str(tmp_path), new_head=True, num_labels=0)


def test_new_head_drops_the_old_tasks_labels_and_problem_type(tmp_path):
    """A new classification head knows nothing of the checkpoint's task: its id2label / label2id (here of
    another length) and problem_type must not reach the exported config, where transformers would read them."""
    torch.manual_seed(0)
    transformers.ElectraForSequenceClassification(hf_config(num_labels=2, id2label={0: "neg", 1: "pos"},
                                                            problem_type="multi_label_classification")
                                                  ).save_pretrained(tmp_path / "hf")
    clf = ElectraForSequenceClassification.from_pretrained(str(tmp_path / "hf"), new_head=True, num_labels=4)
    assert not {"id2label", "label2id", "problem_type"} & set(clf.config.extra)
    clf.save_pretrained(str(tmp_path / "ours"))
    with open(tmp_path / "ours" / "config.json") as f:
        saved = json.load(f)
    assert saved["num_labels"] == 4 and not {"id2label", "label2id", "problem_type"} & set(saved)
    hf = transformers.ElectraForSequenceClassification.from_pretrained(str(tmp_path / "ours"))
    assert hf.config.id2label == {i: f"LABEL_{i}" for i in range(4)} and hf.config.problem_type is None
    named = ElectraForSequenceClassification.from_pretrained(str(tmp_path / "hf"), new_head=True, num_labels=3,
                                                             id2label={"0": "a", "1": "b", "2": "c"})
    assert named.config.extra["id2label"] == {"0": "a", "1": "b", "2": "c"}       # overrides still apply
    kept = ElectraForSequenceClassification.from_pretrained(str(tmp_path / "hf"))  # the same head: the same task
    assert kept.config.extra["problem_type"] == "multi_label_classification"
    assert kept.config.extra["id2label"] == {"0": "neg", "1": "pos"}


@pytest.mark.parametrize("source_dtype", [torch.bfloat16, torch.float16])
def test_saved_config_dtype_is_the_saved_tensors(source_dtype, tmp_path):
    """fastelectra loads a 16-bit checkpoint into fp32 and saves fp32 tensors: config.json must say float32
    (a stale "bfloat16" made transformers load the fp32 weights as bf16 by default)."""
    torch.manual_seed(0)
    hf16 = transformers.ElectraForSequenceClassification(hf_config()).to(source_dtype)
    hf16.save_pretrained(tmp_path / "hf16")
    with open(tmp_path / "hf16" / "config.json") as f:
        saved16 = json.load(f)
    # transformers 5 writes "dtype", 4.x "torch_dtype"
    assert saved16.get("dtype", saved16.get("torch_dtype")) == str(source_dtype).removeprefix("torch.")
    ours = ElectraForSequenceClassification.from_pretrained(str(tmp_path / "hf16"), backend="eager").eval()
    ours.save_pretrained(str(tmp_path / "ours"))
    with open(tmp_path / "ours" / "config.json") as f:
        saved = json.load(f)
    assert saved["dtype"] == "float32" and "torch_dtype" not in saved
    hf = transformers.ElectraForSequenceClassification.from_pretrained(str(tmp_path / "ours"),
                                                                      attn_implementation="eager").eval()
    assert {p.dtype for p in hf.parameters()} == {torch.float32}
    ids, mask, types = padded_batch(211)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask, types), hf(input_ids=ids, attention_mask=mask,
                                                              token_type_ids=types).logits, atol=1e-5, rtol=1e-5)


def test_corrupt_weights_file_names_its_path(tmp_path):
    ElectraDiscriminator(tiny_config()).save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match=r"cannot read weights file .*model.safetensors"):
        ElectraDiscriminator.from_pretrained(str(tmp_path))


def test_models_need_an_electra_config():
    cfg = tiny_config()
    with pytest.raises(TypeError, match="generator_config must be an ElectraConfig, got dict"):
        ElectraPretrainingModel(cfg, {"hidden_size": 16})
    with pytest.raises(TypeError, match="config must be an ElectraConfig, got dict"):
        ElectraPretrainingModel(dict(vars(cfg)))
    with pytest.raises(TypeError, match="config must be an ElectraConfig, got dict"):
        ElectraDiscriminator({"hidden_size": 32})
    cfg.num_labels = 0                                              # set after construction: checked again
    with pytest.raises(ValueError, match="ElectraConfig.num_labels"):
        ElectraForSequenceClassification(cfg)


@pytest.mark.parametrize("positions,exc,match", [
    (torch.tensor([0, 10]), ValueError, r"masked_positions must lie in \[0, batch·seqlen=10\), got .*\[0, 10\]"),
    (torch.tensor([-1, 3]), ValueError, "masked_positions must lie in"),
    (torch.tensor([[0, 1]]), ValueError, r"masked_positions must be 1-D .*got shape \(1, 2\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "masked_positions must be an int64 .*got torch.float32"),
    ([0, 1], TypeError, "masked_positions must be a torch.Tensor, got list"),
])
def test_bad_masked_positions_are_clear_errors(positions, exc, match):
    gen = ElectraGenerator(tiny_config()).eval()
    with pytest.raises(exc, match=match):
        gen(torch.randint(0, 50, (2, 5)), masked_positions=positions)


def test_masked_positions_select_rows():
    gen = ElectraGenerator(tiny_config()).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = gen(ids).reshape(10, -1)
        for positions in (torch.tensor([0, 9, 4]), torch.tensor([9, 1], dtype=torch.int32)):
            torch.testing.assert_close(gen(ids, masked_positions=positions), full[positions.long()])
        assert gen(ids, masked_positions=torch.zeros(0, dtype=torch.long)).shape == (0, 50)

"""The ELECTRA step of ElectraPretrainingModel: masking, replacement labels, loss weighting, metrics."""
import math

import pytest
import torch

from fastelectra import ops
from fastelectra.config import ElectraConfig
from fastelectra.model import ElectraPretrainingModel, rtd_metrics

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4


def tiny_config(**kw):
    base = dict(vocab_size=120, embedding_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, generator_hidden_size=16,
                pad_token_id=PAD, unk_token_id=UNK, cls_token_id=CLS, sep_token_id=SEP, mask_token_id=MASK,
                backend="eager")
    base.update(kw)
    return ElectraConfig(**base)


def batch(b=16, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (b, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return ids, mask


def expected_count(n, p=0.15):
    """The original ELECTRA code's number of masked tokens for n eligible ones (Python's round is
    half-to-even, like tf.round and torch.round)."""
    return min(max(1, round(n * p)), n)


def test_masking_picks_the_original_electra_count_per_sequence():
    torch.manual_seed(0)
    model = ElectraPretrainingModel(tiny_config())
    ids, mask = batch(b=64, t=64)
    ids[0, 1:] = PAD                                      # [CLS] only: nothing eligible
    mask[0, 1:] = 0
    ids[1, 3:], mask[1, 3:] = PAD, 0                      # [CLS] x [SEP]: one eligible token
    ids[1, 2] = SEP
    eligible = (ids > MASK) & mask.bool()
    k_max = model.config.max_predictions(64)
    masked_total = chosen_total = 0
    for _ in range(20):
        gen_input, slots, valid = model.mask_tokens(ids, mask)
        assert slots.shape == valid.shape == (64, k_max)
        assert slots.dtype == torch.int64 and valid.dtype == torch.bool
        chosen = torch.zeros_like(eligible).scatter_(1, slots, valid)
        assert all(len(set(row.tolist())) == k_max for row in slots), "a slot repeats a position"
        assert torch.equal(valid.sum(1), torch.tensor([expected_count(int(n)) for n in eligible.sum(1)]))
        assert torch.equal(valid, valid.cummin(1).values), "real slots come first"
        assert not (chosen & ~eligible).any(), "special or pad token chosen"
        assert torch.equal(gen_input[~chosen], ids[~chosen]), "unchosen tokens changed"
        became_mask = chosen & (gen_input == MASK)
        assert torch.equal(gen_input[chosen & ~became_mask], ids[chosen & ~became_mask])  # kept originals
        masked_total += int(became_mask.sum())
        chosen_total += int(chosen.sum())
    assert chosen_total == 20 * sum(expected_count(int(n)) for n in eligible.sum(1))
    q = masked_total / chosen_total                      # binomial tolerance: 5 standard deviations
    assert abs(q - 0.85) < 5 * math.sqrt(0.85 * 0.15 / chosen_total)


def test_masked_tokens_are_uniform_over_the_eligible_ones():
    torch.manual_seed(1)
    model = ElectraPretrainingModel(tiny_config())
    ids, mask = batch(b=1, t=48, seed=3)
    ids = ids.expand(500, -1).contiguous()               # one sequence, 500 independent draws at once
    mask = mask.expand(500, -1).contiguous()
    eligible = ((ids[0] > MASK) & mask[0].bool())
    _, slots, valid = model.mask_tokens(ids, mask)
    counts = torch.zeros(48).index_put_((slots[valid],), torch.ones(int(valid.sum())), accumulate=True)
    n = int(eligible.sum())
    assert counts[~eligible].sum() == 0
    expect = 500 * expected_count(n) / n
    chi2 = float(((counts[eligible] - expect) ** 2 / expect).sum())
    # Pearson's statistic (conservative here: draws without replacement have less variance) against
    # its mean + 5 standard deviations for n - 1 degrees of freedom
    assert chi2 < (n - 1) + 5 * math.sqrt(2 * (n - 1))


def test_labels_and_replacement_semantics():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 9))
    pos = torch.tensor([0, 5, 11, 30, 35])
    logits = torch.randn(5, 50)
    logits[1, ids.view(-1)[5]] = 100.0                   # this row samples its original almost surely
    disc, labels, sampled = ops.replace_tokens(logits, ids, pos, seed=3, backend="eager")
    flat, lab = disc.view(-1), labels.view(-1)
    untouched = torch.ones(ids.numel(), dtype=torch.bool)
    untouched[pos] = False
    assert torch.equal(flat[untouched], ids.view(-1)[untouched])
    assert not lab[untouched].any()
    assert torch.equal(flat[pos], sampled)
    assert torch.equal(lab[pos], sampled != ids.view(-1)[pos])
    assert not lab[5]
    _, _, argmax = ops.replace_tokens(logits, ids, pos, temperature=0.0, seed=3, backend="eager")
    assert torch.equal(argmax, logits.argmax(-1))


def test_loss_is_weighted_sum_and_metrics_are_consistent():
    torch.manual_seed(1)
    model = ElectraPretrainingModel(tiny_config(rtd_weight=50.0, mlm_weight=1.0))
    ids, mask = batch()
    out = model(ids, mask)
    torch.testing.assert_close(out.loss, out.mlm_loss + 50.0 * out.rtd_loss)
    valid = mask.bool()
    acc, prec, rec = rtd_metrics(out.disc_logits, out.is_replaced, valid)
    torch.testing.assert_close(out.rtd_accuracy, acc)
    assert not (out.is_replaced & ~valid).any()
    replaced_positions = out.is_replaced.view(-1).nonzero().squeeze(1)
    assert torch.isin(replaced_positions, out.masked_positions[out.masked_valid]).all()
    assert out.masked_positions.shape == out.masked_valid.shape == (ids.shape[0] * model.config.max_predictions(ids.shape[1]),)
    assert out.num_masked.item() == out.masked_valid.sum().item() > 0
    for m in (out.mlm_accuracy, out.rtd_accuracy, out.rtd_precision, out.rtd_recall):
        assert 0.0 <= m.item() <= 1.0
    model2 = ElectraPretrainingModel(tiny_config(rtd_weight=7.0, mlm_weight=0.5))
    model2.load_state_dict(model.state_dict())
    torch.manual_seed(5)
    a = model(ids, mask)
    torch.manual_seed(5)
    b = model2(ids, mask)
    torch.testing.assert_close(b.loss, 0.5 * a.mlm_loss + 7.0 * a.rtd_loss)


def test_without_an_attention_mask_the_rtd_loss_leaves_out_pad_tokens():
    """No attention mask: every token is attended (as transformers does), but [PAD] is neither masked nor
    counted by the RTD loss and metrics, so padded ids give the loss of the same batch with its mask."""
    torch.manual_seed(3)
    model = ElectraPretrainingModel(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ids, mask = batch()
    torch.manual_seed(4)
    without = model(ids)
    torch.manual_seed(4)
    attend_all = model(ids, torch.ones_like(mask))
    valid = ids != PAD
    torch.testing.assert_close(without.rtd_accuracy, rtd_metrics(without.disc_logits, without.is_replaced, valid)[0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(without.disc_logits, without.is_replaced.float(),
                                                               reduction="none")
    torch.testing.assert_close(without.rtd_loss, bce[valid].mean())
    assert not torch.equal(without.rtd_loss, attend_all.rtd_loss)      # an all-ones mask counts the pads


def test_rtd_metrics_on_a_hand_made_case():
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 5.0]])   # predicted replaced: 0, 2, (4 is padding)
    labels = torch.tensor([[True, True, False, False, True]])
    valid = torch.tensor([[True, True, True, True, False]])
    acc, prec, rec = rtd_metrics(logits, labels, valid)
    # valid tokens 0..3: predictions T F T F vs labels T T F F -> 2 of 4 right; TP = 1
    assert acc.item() == pytest.approx(0.5)
    assert prec.item() == pytest.approx(1 / 2)
    assert rec.item() == pytest.approx(1 / 2)


def test_embeddings_are_shared_and_both_losses_train_them():
    torch.manual_seed(0)
    model = ElectraPretrainingModel(tiny_config())
    gen, disc = model.generator, model.discriminator
    assert gen.electra.embeddings is disc.electra.embeddings
    assert gen.generator_lm_head.weight is disc.electra.embeddings.word_embeddings.weight
    assert gen.electra.embeddings_project is not None and not hasattr(disc.electra, "embeddings_project")
    ids, mask = batch()
    out = model(ids, mask)
    out.mlm_loss.backward(retain_graph=True)
    g_mlm = disc.electra.embeddings.position_embeddings.weight.grad.clone()
    model.zero_grad()
    out.rtd_loss.backward()
    g_rtd = disc.electra.embeddings.position_embeddings.weight.grad.clone()
    assert g_mlm.abs().sum() > 0 and g_rtd.abs().sum() > 0
    # no gradient flows through the sampling into the generator from the RTD loss
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in gen.named_parameters()
               if not n.startswith("electra.embeddings") and n != "generator_lm_head.weight")


def test_a_batch_with_nothing_to_mask_gives_a_finite_loss():
    model = ElectraPretrainingModel(tiny_config())
    ids = torch.tensor([[CLS, SEP, PAD, PAD]])
    out = model(ids, torch.tensor([[1, 1, 0, 0]]))
    assert out.num_masked.item() == 0 and torch.isfinite(out.loss)
    out.loss.backward()


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = ElectraPretrainingModel(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, mask = batch(b=8, t=32)
    losses = []
    for _ in range(25):
        out = model(ids, mask)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_pretraining_model_round_trips_through_hf_format(tmp_path):
    torch.manual_seed(0)
    model = ElectraPretrainingModel(tiny_config()).eval()
    model.save_pretrained(str(tmp_path))
    loaded = ElectraPretrainingModel.from_pretrained(str(tmp_path)).eval()
    assert loaded.generator.electra.embeddings is loaded.discriminator.electra.embeddings
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def test_special_ids_must_fit_the_vocabulary_and_be_distinct():
    with pytest.raises(ValueError, match="mask_token_id=500 is outside the vocabulary"):
        ElectraPretrainingModel(tiny_config(mask_token_id=500))
    with pytest.raises(ValueError, match="mask_token_id=0 is also pad_token_id"):
        ElectraPretrainingModel(tiny_config(mask_token_id=PAD))


def test_config_fields_set_after_the_model_was_built_are_checked_and_followed():
    torch.manual_seed(0)
    model = ElectraPretrainingModel(tiny_config(mask_token_prob=1.0))
    ids, mask = batch()
    model.config.mask_prob = 2.0
    with pytest.raises(ValueError, match="ElectraConfig.mask_prob"):
        model(ids, mask)
    model.config.mask_prob = 0.15
    model.config.mask_token_id = SEP
    with pytest.raises(ValueError, match="sep_token_id"):
        model(ids, mask)
    model.config.mask_token_id = 7                     # a new [MASK]: masking uses it and never picks it
    ids[ids == 7] = 8
    ids[:, 5] = 9
    model.config.unk_token_id = 9                      # and a new [UNK]: never chosen
    out = model(ids, mask)
    gen_input, slots, valid = model.mask_tokens(ids, mask)
    chosen = torch.zeros_like(mask, dtype=torch.bool).scatter_(1, slots, valid)
    assert torch.isfinite(out.loss) and (gen_input[chosen] == 7).all() and not chosen[:, 5].any()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
def test_the_step_is_one_graph_without_host_syncs(padded, dynamic):
    """torch.compile(fullgraph=True) fails on anything that needs the host: .item(), data-dependent
    shapes (nonzero, boolean indexing), Python branches on values. The step has none of them, also
    with symbolic batch and sequence sizes (dynamic=True: what varying shapes recompile to)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ElectraPretrainingModel(tiny_config())
    ids, mask = batch(b=4, t=16)
    if not padded:
        mask = torch.ones_like(mask)
        ids[:, -1] = SEP
        ids[(ids == PAD)] = 7
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    torch.manual_seed(3)
    out = compiled(ids, mask)
    out.loss.backward()
    torch.manual_seed(3)
    ref = model(ids, mask)
    torch.testing.assert_close(out.loss, ref.loss)
    assert torch.equal(out.is_replaced, ref.is_replaced)
    assert all(p.grad is not None for p in model.parameters())

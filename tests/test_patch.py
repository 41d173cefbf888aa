"""fastelectra.patch / unpatch on live transformers models and plain torch models: outputs, gradients,
state dicts and training agree with the unpatched twin; unpatch restores the original modules."""
import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import fastelectra
from fastelectra.nn import FusedLayerNorm, FusedLinear
from fastelectra.patching import FusedIntermediate, FusedPostLNOutput, PatchedSelfAttention, key_padding_mask_from_hf
from electra_fixtures import LAYERS, hf_config, padded_batch, randomise
from test_fused_model import DEVICE, kernels_on_this_device  # noqa: F401 - a fixture

transformers = pytest.importorskip("transformers")
# transformers 4.x (4.40 on) has no SDPA ELECTRA and builds the 4-D mask itself (the model takes 2-D or 3-D masks)
HF5 = int(transformers.__version__.split(".")[0]) >= 5
IMPLS = ["eager", pytest.param("sdpa", marks=pytest.mark.skipif(
    not getattr(transformers.ElectraPreTrainedModel, "_supports_sdpa", False), reason="no SDPA ELECTRA in "
    f"transformers {transformers.__version__}"))]

HEADS = ["ElectraModel", "ElectraForPreTraining", "ElectraForMaskedLM", "ElectraForSequenceClassification",
         "ElectraForTokenClassification", "ElectraForQuestionAnswering"]
pytestmark = pytest.mark.usefixtures("one_thread")


def make_pair(name, **overrides):
    torch.manual_seed(0)
    ref = getattr(transformers, name)(hf_config(**overrides))
    randomise(ref)
    ref.eval()
    return ref, copy.deepcopy(ref)


def first_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "start_logits", None) is not None:
        return torch.stack([out.start_logits, out.end_logits], -1)
    return out.last_hidden_state


def module_types(model):
    return [(n, type(m)) for n, m in model.named_modules()]


def assert_same_gradients(model, out, ref, expected):
    """Backpropagate one random weighting of both outputs; every parameter gets the reference's gradient."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if ref_params[n].grad is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, ref_params[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def biased_linears(model):
    return sum(type(m) is nn.Linear and m.bias is not None for m in model.modules())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("name", HEADS)
def test_patched_electra_matches_outputs_and_gradients(name, backend, impl):
    extra = dict(num_labels=2) if name == "ElectraForQuestionAnswering" else {}   # start/end logits
    ref, model = make_pair(name, attn_implementation=impl, **extra)
    keys_before = list(model.state_dict())
    report = fastelectra.patch(model, backend=backend)
    assert list(model.state_dict()) == keys_before
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k], rtol=0, atol=0)

    ids, mask, types = padded_batch()
    out = first_output(model(input_ids=ids, attention_mask=mask, token_type_ids=types))
    expected = first_output(ref(input_ids=ids, attention_mask=mask, token_type_ids=types))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    assert_same_gradients(model, out, ref, expected)

    counts = report.counts()
    n_ln = 1 + 2 * LAYERS + (1 if name == "ElectraForMaskedLM" else 0)
    assert counts["LayerNorm -> FusedLayerNorm"] == n_ln
    assert counts["ElectraSelfAttention -> PatchedSelfAttention"] == LAYERS
    assert counts["ElectraSelfOutput -> FusedPostLNOutput"] == LAYERS
    assert counts["ElectraOutput -> FusedPostLNOutput"] == LAYERS
    assert counts["ElectraIntermediate -> FusedIntermediate"] == LAYERS
    assert counts["Linear -> FusedLinear"] == biased_linears(ref)                # every Linear of these heads
    assert not report.skipped
    assert "replaced" in str(report)
    paths = [p for p, _, _ in report.replaced]
    prefix = "" if name == "ElectraModel" else "electra."
    assert f"{prefix}embeddings.LayerNorm" in paths and f"{prefix}encoder.layer.0.attention.self" in paths


@pytest.mark.parametrize("name", ["ElectraForPreTraining", "ElectraForMaskedLM"])
def test_unpatch_restores_modules_and_outputs(name):
    ref, model = make_pair(name)
    types_before = module_types(model)
    report = fastelectra.patch(model)
    assert isinstance(model.electra.embeddings.LayerNorm, FusedLayerNorm)
    assert isinstance(model.electra.encoder.layer[0].attention.self, PatchedSelfAttention)
    assert isinstance(model.electra.encoder.layer[0].attention.self.query, FusedLinear)
    assert isinstance(model.electra.encoder.layer[0].output, FusedPostLNOutput)
    assert isinstance(model.electra.encoder.layer[0].intermediate, FusedIntermediate)
    model.train()                                      # the mode set while patched survives unpatch
    expected = 1 + 2 * LAYERS + (name == "ElectraForMaskedLM") + 4 * LAYERS + biased_linears(ref)
    assert len(report.replaced) == expected
    assert fastelectra.unpatch(model) == expected
    assert module_types(model) == types_before
    assert model.training and all(m.training for m in model.modules())
    assert fastelectra.unpatch(model) == 0
    model.eval()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_training_after_patch_matches_unpatched_twin():
    ref, model = make_pair("ElectraForSequenceClassification", hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    # built before patching: params are shared. eps 1e-6: the key biases' gradient is 0 up to rounding (softmax
    # ignores a score added to every key), and the default 1e-8 would turn two implementations' different
    # rounding noise (~1e-9) into lr-sized updates of opposite signs
    opt_model = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    fastelectra.patch(model)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6)
    ids, mask, types = padded_batch()
    labels = torch.tensor([0, 2, 1])
    model.train()
    ref.train()
    for _ in range(4):
        losses = []
        for m, opt in ((model, opt_model), (ref, opt_ref)):
            loss = m(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


def test_training_mode_uses_attention_dropout():
    _, model = make_pair("ElectraModel", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5)
    fastelectra.patch(model, backend="eager")
    ids, mask, _ = padded_batch()
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                               model(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_bert_and_plain_torch_models_get_fused_layer_norms():
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, attn_implementation="eager")).eval()
    randomise(bert)
    ref = copy.deepcopy(bert)
    report = fastelectra.patch(bert)
    # attention and the fused feed-forward are ELECTRA-only; LayerNorms and Linears are any model's
    assert report.counts() == {"LayerNorm -> FusedLayerNorm": 5, "Linear -> FusedLinear": 13}
    ids, mask, _ = padded_batch(99, t=17)
    torch.testing.assert_close(bert(ids, attention_mask=mask).last_hidden_state,
                               ref(ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)

    ln = nn.LayerNorm(24)
    net = nn.Sequential(nn.Linear(24, 24), ln, nn.GELU(), nn.Linear(24, 24), ln,           # one LayerNorm, twice
                        nn.TransformerEncoderLayer(24, 2, 48, dropout=0.0, batch_first=True),
                        nn.LayerNorm((3, 8)))                                             # not 1-D: left as is
    randomise(net)
    net_ref = copy.deepcopy(net)
    report = fastelectra.patch(net)
    # the Linears: net[0], net[3], the encoder layer's linear1/linear2 (not its attention's out_proj subclass)
    assert report.counts() == {"LayerNorm -> FusedLayerNorm": 3, "Linear -> FusedLinear": 4}
    assert net[1] is net[4] and isinstance(net[1], FusedLayerNorm) and isinstance(net[0], FusedLinear)
    assert report.skipped == [("5.self_attn.out_proj", "NonDynamicallyQuantizableLinear is a subclass of nn.Linear"),
                              ("6", "normalized_shape (3, 8) is not 1-D")]
    x = torch.randn(2, 5, 24)
    out, expected = net[:6](x), net_ref[:6](x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(net[1].weight.grad, net_ref[1].weight.grad, atol=1e-5, rtol=1e-4)
    assert fastelectra.unpatch(net) == 7
    assert type(net[1]) is nn.LayerNorm and net[1] is net[4] and type(net[0]) is nn.Linear


def test_patch_flags_and_repeated_calls():
    _, model = make_pair("ElectraModel")
    assert set(fastelectra.patch(model, attention=False, linear=False).counts()) == {
        "LayerNorm -> FusedLayerNorm", "ElectraSelfOutput -> FusedPostLNOutput", "ElectraOutput -> FusedPostLNOutput"}
    assert set(fastelectra.patch(model, layer_norm=False, linear=False).counts()) == {
        "ElectraSelfAttention -> PatchedSelfAttention"}
    assert set(fastelectra.patch(model).counts()) == {"Linear -> FusedLinear",
                                                      "ElectraIntermediate -> FusedIntermediate"}
    assert fastelectra.patch(model).replaced == []
    with pytest.raises(ValueError, match="itself a LayerNorm"):
        fastelectra.patch(nn.LayerNorm(8))
    with pytest.raises(ValueError, match="itself a Linear"):
        fastelectra.patch(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastelectra.patch("model")
    with pytest.raises(ValueError, match="backend="):
        fastelectra.patch(model, backend="triton")


def test_relative_position_attention_is_left_alone():
    """transformers 4.x's ElectraSelfAttention carries position_embedding_type; relative_key(_query) adds
    position terms to the scores that the fused kernel does not compute (5.x has no such layers: set here)."""
    _, model = make_pair("ElectraModel")
    for m in model.modules():
        if type(m).__name__ == "ElectraSelfAttention":
            m.position_embedding_type = "relative_key"
    report = fastelectra.patch(model)
    assert [why for _, why in report.skipped] == ["position_embedding_type='relative_key' (relative-position scores)"] * LAYERS
    assert "PatchedSelfAttention" not in {new for _, _, new in report.replaced}


def test_decoder_attention_is_left_alone():
    ref, model = make_pair("ElectraModel", is_decoder=True, add_cross_attention=True)
    report = fastelectra.patch(model)
    reasons = {why for _, why in report.skipped}
    assert reasons == {"causal (decoder) self-attention", "cross-attention"}
    assert len(report.skipped) == 2 * LAYERS
    assert "PatchedSelfAttention" not in {new for _, _, new in report.replaced}
    ids, mask, _ = padded_batch()
    enc = torch.randn(3, 7, 48)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc).last_hidden_state,
                               ref(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc).last_hidden_state,
                               atol=1e-5, rtol=1e-5)


def test_masks_that_are_not_key_padding_are_rejected():
    b, t = 2, 5
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    expected = valid
    bool4d = valid[:, None, None, :].expand(b, 1, t, t)
    additive = torch.zeros(b, 1, t, t).masked_fill(~bool4d, torch.finfo(torch.float32).min)
    assert torch.equal(key_padding_mask_from_hf(bool4d, b, t), expected)
    assert torch.equal(key_padding_mask_from_hf(additive, b, t), expected)
    assert torch.equal(key_padding_mask_from_hf(valid.long(), b, t), expected)
    assert key_padding_mask_from_hf(None, b, t) is None
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool)).expand(b, 1, t, t)
    with pytest.raises(ValueError, match="key-padding masks only"):
        key_padding_mask_from_hf(causal, b, t)
    with pytest.raises(ValueError, match="attention bias"):
        key_padding_mask_from_hf(torch.randn(b, 1, t, t), b, t)
    with pytest.raises(ValueError, match="expects a"):
        key_padding_mask_from_hf(torch.ones(b, t, t), b, t)
    assert torch.equal(key_padding_mask_from_hf(valid.float(), b, t), expected)     # 0/1 floats: HF's attention_mask
    additive2d = torch.zeros(b, t).masked_fill(~valid, -1e9)                         # would read inverted as != 0
    with pytest.raises(ValueError, match="2-D attention mask with values other than 0 and 1"):
        key_padding_mask_from_hf(additive2d, b, t)

    with pytest.raises(ValueError, match="got a BlockMask"):
        key_padding_mask_from_hf(type("BlockMask", (), {})(), b, t)      # flex attention's mask object

    _, model = make_pair("ElectraModel")
    fastelectra.patch(model)
    ids = torch.randint(1, 211, (b, t))
    with pytest.raises(ValueError, match="key-padding masks only"):
        model(input_ids=ids, attention_mask=causal if HF5 else causal[:, 0])   # 4.x: (B, Tq, Tk), made 4-D


@pytest.mark.skipif(not HF5, reason="transformers 4.x builds a new 4-D mask every forward")
@pytest.mark.parametrize("impl", IMPLS)
def test_a_mask_buffer_refilled_in_place_or_broadcast_over_batches_is_read_afresh(impl):
    """The layers share one converted key-padding mask per HF mask tensor; a 4-D mask that the caller
    refills in place, or a (1, 1, T, T) mask broadcast over batches of other sizes, is converted again."""
    ref, model = make_pair("ElectraModel", attn_implementation=impl)
    fastelectra.patch(model)
    t = 6
    ids = torch.randint(1, 211, (3, t))

    def hf_mask(valid):                                   # what transformers passes to attention for `impl`
        bool4d = valid[:, None, None, :].expand(valid.shape[0], 1, t, t)
        if impl == "sdpa":
            return bool4d.clone()
        return torch.zeros(bool4d.shape).masked_fill(~bool4d, torch.finfo(torch.float32).min)

    buffer = hf_mask(torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]).bool())
    with torch.no_grad():
        for valid in ([[1, 1, 1, 0, 0, 0], [1] * 6], [[1] * 6, [1, 1, 0, 0, 0, 0]]):
            buffer.copy_(hf_mask(torch.tensor(valid).bool()))
            torch.testing.assert_close(model(ids[:2], attention_mask=buffer).last_hidden_state,
                                       ref(ids[:2], attention_mask=buffer).last_hidden_state, atol=1e-5, rtol=1e-5)
        shared = hf_mask(torch.tensor([[1, 1, 1, 1, 0, 0]]).bool())      # batch 1: broadcast
        for batch in (2, 3):
            torch.testing.assert_close(model(ids[:batch], attention_mask=shared).last_hidden_state,
                                       ref(ids[:batch], attention_mask=shared).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_hooks_keep_firing_and_reparametrized_layers_are_left_alone():
    """A replaced module keeps the hooks registered on it (the dictionaries are shared, so hooks added
    later or removed by handle work too); a Linear under weight norm or pruning, whose weight is computed
    from other parameters, and a module with an instance-level forward are not replaced."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    ref = copy.deepcopy(net)
    for m in (net, ref):
        nn.utils.parametrizations.weight_norm(m[2])
        prune.l1_unstructured(m[3], "weight", amount=0.5)
    net[4].forward = ref[4].forward = lambda x: x
    for m in (net, ref):
        m[1].register_forward_hook(lambda mod, args, out: out * 0 + 1)
    seen = []
    handle = net[0].register_forward_pre_hook(lambda mod, args: seen.append(type(mod).__name__))
    keys = list(net.state_dict())

    report = fastelectra.patch(net)
    assert report.counts() == {"Linear -> FusedLinear": 1, "LayerNorm -> FusedLayerNorm": 1}
    skipped = dict(report.skipped)
    assert "weight is not a registered Parameter" in skipped["2"] and "weight is not" in skipped["3"]
    assert "instance-level forward" in skipped["4"]
    assert list(net.state_dict()) == keys
    x = torch.randn(3, 8)
    out, expected = net(x), ref(x)
    torch.testing.assert_close(out, expected)
    assert seen == ["FusedLinear"]                        # the pre-hook fired on the replacement
    out.sum().backward()
    expected.sum().backward()
    assert net[2].parametrizations.weight.original0.grad is not None and net[3].weight_orig.grad is not None
    net[1].register_forward_hook(lambda mod, args, out: out + 1)     # added after patching: runs on both
    assert (net[1](x) == 2).all()
    handle.remove()
    net(x)
    assert seen == ["FusedLinear"]
    fastelectra.unpatch(net)
    assert (net[1](x) == 2).all()                         # the original module has the hook added meanwhile


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ElectraForPreTraining", "ElectraForSequenceClassification"])
def test_patched_model_on_cuda_bf16(name):
    """Patched bf16 on CUDA (Triton kernels) vs unpatched: its error against the fp32 model is at most
    twice the unpatched bf16 model's error (the kernel issues' rule), plus a small absolute slack."""
    ref, model = make_pair(name, attn_implementation="sdpa", hidden_size=128, num_attention_heads=2,
                           intermediate_size=256)
    ids, mask, types = (t.cuda() for t in padded_batch(t=61))
    ref32 = ref.cuda()
    with torch.no_grad():
        gold = ref32(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    ref_bf16 = copy.deepcopy(ref32).to(torch.bfloat16)
    model = model.cuda().to(torch.bfloat16)
    fastelectra.patch(model, backend="fused")
    with torch.no_grad():
        base = ref_bf16(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.float()
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.float()
    valid = mask.bool() if out.shape == mask.shape else slice(None)   # per-token logits: real tokens only
    err_base = (base - gold)[valid].abs().max().item()
    err = (out - gold)[valid].abs().max().item()
    assert err <= 2 * err_base + 1e-2, (err, err_base)


def test_feed_forward_fuses_known_activations_and_reports_the_others():
    """gelu_new fuses (tanh GELU); an activation fastelectra does not fuse (quick_gelu) leaves the
    feed-forward as it is, with the reason, while its Linear is still swapped."""
    ref, model = make_pair("ElectraModel", hidden_act="gelu_new")
    report = fastelectra.patch(model)
    assert model.encoder.layer[0].intermediate.activation == "gelu_new"
    ids, mask, types = padded_batch()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                               ref(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert not report.skipped
    ref, model = make_pair("ElectraModel", hidden_act="quick_gelu")
    report = fastelectra.patch(model)
    assert {why for _, why in report.skipped} == {"activation QuickGELUActivation is not one fastelectra fuses"}
    assert isinstance(model.encoder.layer[0].intermediate.dense, FusedLinear)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state,
                               ref(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_from_linear_shares_parameters():
    lin = nn.Linear(6, 4)
    fused = FusedLinear.from_linear(lin, activation="relu", backend="eager")
    assert fused.weight is lin.weight and fused.bias is lin.bias and list(fused.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 6)
    torch.testing.assert_close(fused(x), torch.relu(lin(x)))
    with pytest.raises(ValueError, match="activation must be None or one of"):
        FusedLinear.from_linear(lin, activation="tanh")


def test_patched_hf_model_on_the_kernels_matches_the_original(kernels_on_this_device):
    """The HF discriminator patched with backend fused, the kernels forced (the interpreter on a CPU): the
    Linear swaps and the fused feed-forward give HF's outputs and every parameter's gradient."""
    ref, model = (m.to(DEVICE) for m in make_pair("ElectraForPreTraining"))
    fastelectra.patch(model, backend="fused")
    ids, mask, types = (t.to(DEVICE) for t in padded_batch())
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    # per layer: q, k, v, attention output, feed-forward up (with GELU) and down; the embedding projection;
    # the discriminator head's two
    assert kernels_on_this_device["linear"] == 6 * LAYERS + 3
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert_same_gradients(model, out, ref, expected)


def test_compiled_patched_hf_model_has_no_graph_break_of_ours(kernels_on_this_device):
    """torch.compile over a patched HF model: the mask conversion's checks read the mask on the host and
    broke the graph at every layer (10 breaks); compiled, they are device-side asserts and nothing of
    fastelectra breaks the graph. The compiled model gives the eager outputs."""
    _, model = make_pair("ElectraForPreTraining")
    fastelectra.patch(model, backend="fused")
    model.to(DEVICE)
    ids, mask, types = (t.to(DEVICE) for t in padded_batch())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert kernels_on_this_device["layer_norm"] > 0        # the fused ops were traced, not the references
    ours = [(reason.reason.splitlines()[0], frame.filename, frame.lineno) for reason in explained.break_reasons
            for frame in reason.user_stack if "fastelectra" in frame.filename]
    assert not ours, ours
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(out, model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits)


def test_compiled_patched_attention_still_rejects_per_query_masks():
    _, model = make_pair("ElectraModel")
    fastelectra.patch(model, backend="eager")
    attention = model.encoder.layer[0].attention.self
    b, t = 2, 5
    hidden = torch.randn(b, t, attention.num_attention_heads * attention.attention_head_size)
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t)
    torch._dynamo.reset()
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    good = torch.ones(b, 1, t, t, dtype=torch.bool)
    torch.testing.assert_close(compiled(hidden, good)[0], attention(hidden, good)[0])
    with pytest.raises(RuntimeError, match="key-padding masks only"):
        compiled(hidden, causal)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_dropout(kernels_on_this_device, reentrant):
    """transformers' activation (gradient) checkpointing over a patched model with dropout: the recompute
    in the backward goes through the kernels again and must draw the forward's dropout masks (their seeds
    come from torch's generator, whose state checkpoint restores), so the gradients are the ones of the
    same step without checkpointing; another seed gives another loss, so the masks were really drawn."""
    _, model = make_pair("ElectraForSequenceClassification", hidden_dropout_prob=0.2,
                         attention_probs_dropout_prob=0.2, num_attention_heads=3,    # head size 16: a kernel's
                         num_hidden_layers=1)
    fastelectra.patch(model, backend="fused")
    model.to(DEVICE).train()
    ids, mask, types = (t.to(DEVICE) for t in padded_batch(t=9))
    labels = torch.tensor([0, 2, 1], device=DEVICE)
    # transformers 5 names it activation checkpointing; 4.x has only the older name (same first argument)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable

    def step(seed, checkpointed):
        if checkpointed:
            enable({"use_reentrant": reentrant})
        else:
            disable()
        model.zero_grad(set_to_none=True)
        before = kernels_on_this_device["attention"]
        torch.manual_seed(seed)
        loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, kernels_on_this_device["attention"] - before

    loss, grads, calls = step(7, False)
    loss_ckpt, grads_ckpt, calls_ckpt = step(7, True)
    assert calls == 1 and calls_ckpt == 2                      # the backward recomputed the layer
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for n, g in grads.items():
        torch.testing.assert_close(grads_ckpt[n], g, atol=1e-6, rtol=1e-5, msg=n)
    assert not torch.allclose(step(8, True)[0], loss)


def test_patched_attention_rejects_what_it_does_not_compute():
    """A head mask, encoder states or a cache (which transformers 4.x passes positionally, 5 by name) are errors
    that name the argument, not silently ignored; so are more positional arguments than the original takes."""
    _, model = make_pair("ElectraModel")
    fastelectra.patch(model, backend="eager")
    attention = model.encoder.layer[0].attention.self
    hidden = torch.randn(2, 5, 48)
    torch.testing.assert_close(attention(hidden)[0], attention(hidden_states=hidden, attention_mask=None)[0])
    for name, value in (("head_mask", torch.ones(4)), ("encoder_hidden_states", hidden), ("past_key_values", ())):
        with pytest.raises(ValueError, match=f"does not support {name}"):
            attention(hidden, **{name: value})
    with pytest.raises(TypeError, match="positional arguments"):
        attention(hidden, *[None] * 10)

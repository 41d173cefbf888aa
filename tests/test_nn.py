"""Drop-in modules: FusedLayerNorm ⇄ nn.LayerNorm, FusedSelfAttention ⇄ HF self-attention weights."""
import pytest
import torch
from torch import nn

from fastelectra import ops
from fastelectra.nn import FusedLayerNorm, FusedLinear, FusedSelfAttention


@pytest.mark.parametrize("shape", [(5, 200), (2, 3, 768), (1, 16)])
def test_fused_layer_norm_is_a_drop_in(shape):
    torch.manual_seed(0)
    ref = nn.LayerNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    fused = FusedLayerNorm(shape[-1], eps=1e-6)
    fused.load_state_dict(ref.state_dict())
    assert fused.state_dict().keys() == ref.state_dict().keys()
    assert isinstance(fused, nn.LayerNorm)
    x = torch.randn(shape, requires_grad=True)
    torch.testing.assert_close(fused(x), ref(x))
    shared = FusedLayerNorm.from_layer_norm(ref)
    assert shared.weight is ref.weight and shared.bias is ref.bias
    torch.testing.assert_close(shared(x), ref(x))
    r = torch.randn(shape)
    torch.testing.assert_close(fused(x, residual=r), ref(x + r))
    assert "backend=auto" in repr(fused)


def test_fused_layer_norm_without_affine_and_bias():
    x = torch.randn(4, 33)
    for kw in (dict(elementwise_affine=False), dict(bias=False)):
        torch.testing.assert_close(FusedLayerNorm(33, **kw)(x), nn.LayerNorm(33, **kw)(x))


def test_fused_layer_norm_rejects_multi_dim_shapes():
    with pytest.raises(ValueError, match="last dimension only"):
        FusedLayerNorm((4, 8))


def test_fused_self_attention_matches_the_hf_computation():
    transformers = pytest.importorskip("transformers")
    from transformers.models.electra.modeling_electra import ElectraSelfAttention

    torch.manual_seed(0)
    cfg = transformers.ElectraConfig(hidden_size=48, num_attention_heads=4, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")
    hf = ElectraSelfAttention(cfg).eval()
    ours = FusedSelfAttention(48, 4).eval()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 11, 48)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 6:] = False
    additive = torch.zeros(2, 1, 1, 11).masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
    ref = hf(x, attention_mask=additive)[0]
    torch.testing.assert_close(ours(x, mask), ref, atol=1e-6, rtol=1e-5)
    # return_input: the same context, and the input itself for the block's residual connection
    ctx, same = ours(x, mask, return_input=True)
    torch.testing.assert_close(ctx, ref, atol=1e-6, rtol=1e-5)
    assert same.shape == x.shape and same.data_ptr() == x.data_ptr()


def test_fused_self_attention_uses_dropout_only_in_training(monkeypatch):
    seen = []
    real = ops.attention_qkvpacked

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "attention_qkvpacked", spy)
    m = FusedSelfAttention(32, 2, dropout_p=0.1)
    x = torch.randn(1, 5, 32)
    m.train()(x)
    m.eval()(x)
    assert seen == [0.1, 0.0]


@pytest.mark.parametrize("hidden,heads,p", [(8, 0, 0.0), (8, 3, 0.0), (0, 2, 0.0), (8, 2, 1.0)])
def test_fused_self_attention_constructor_names_bad_arguments(hidden, heads, p):
    with pytest.raises(ValueError, match="num_heads|dropout_p"):
        FusedSelfAttention(hidden, heads, p)


def test_drop_in_modules_name_bad_arguments():
    """A misspelled backend fails at construction (not at the first forward), and so do arguments of the
    wrong type, each named."""
    with pytest.raises(ValueError, match="backend='fuzed'"):
        FusedLinear(8, 5, backend="fuzed")
    with pytest.raises(ValueError, match="backend='fuzed'"):
        FusedLayerNorm(8, backend="fuzed")
    with pytest.raises(ValueError, match="backend='fuzed'"):
        FusedSelfAttention(16, 2, backend="fuzed")
    with pytest.raises(TypeError, match="num_heads must be an int"):
        FusedSelfAttention(16, 2.0)
    with pytest.raises(TypeError, match="hidden_size must be an int"):
        FusedSelfAttention(16.0, 2)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear, got LayerNorm"):
        FusedLinear.from_linear(torch.nn.LayerNorm(4))
    with pytest.raises(TypeError, match="ln must be a torch.nn.LayerNorm, got Linear"):
        FusedLayerNorm.from_layer_norm(torch.nn.Linear(4, 4))
    attn = FusedSelfAttention(16, 2)
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor, got list"):
        attn([[0.0] * 16])
    with pytest.raises(ValueError, match="max_seqlen goes with cu_seqlens"):
        attn(torch.randn(2, 3, 16), max_seqlen=3)

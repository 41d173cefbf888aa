"""The whole model wired to the fused kernels: backend fused vs eager on the same weights.

On a GPU this runs on CUDA; without one the Triton kernels run in the interpreter on CPU tensors
(dispatch is forced there, since fastelectra sends CPU tensors to the reference by design)."""
import pytest
import torch

from fastelectra import backend
from fastelectra.config import ElectraConfig
from fastelectra.model import ElectraDiscriminator, ElectraPretrainingModel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels_on_this_device(monkeypatch):
    """Route fused calls to the kernels (interpreter on CPU) and count them, so a silent fallback
    to the reference cannot pass these tests."""
    if DEVICE == "cpu":
        real = backend.use_triton
        monkeypatch.setattr(backend, "use_triton",
                            lambda device, requested, op: backend.resolve(requested) != "eager"
                            or real(device, requested, op))
    from fastelectra.kernels import attention, layernorm

    calls = {"attention": 0, "layer_norm": 0}
    for module, fn_name, key in ((attention, "flash_attention", "attention"),
                                 (layernorm, "fused_layer_norm", "layer_norm")):
        def counted(*args, _fn=getattr(module, fn_name), _key=key, **kwargs):
            calls[_key] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, fn_name, counted)
    yield calls


def config(backend_name, **kw):
    base = dict(vocab_size=97, embedding_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=32, generator_hidden_size=16,
                pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4,
                backend=backend_name)
    base.update(kw)
    return ElectraConfig(**base)


def padded_batch(b=2, t=13):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 97, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, t - 5:] = 0
    ids[mask == 0] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def test_discriminator_fused_matches_eager_outputs_and_gradients(kernels_on_this_device):
    torch.manual_seed(0)
    eager = ElectraDiscriminator(config("eager")).to(DEVICE).eval()
    fused = ElectraDiscriminator(config("fused")).to(DEVICE).eval()
    fused.load_state_dict(eager.state_dict())
    ids, mask = padded_batch()
    a, b = eager(ids, mask), fused(ids, mask)
    # 2 layers: 2 attentions; embeddings + 2 tails per layer: 5 layer norms
    assert kernels_on_this_device == {"attention": 2, "layer_norm": 5}
    valid = mask.bool()
    torch.testing.assert_close(b[valid], a[valid], atol=2e-5, rtol=1e-4)
    w = torch.randn(a.shape, device=DEVICE) * valid
    (a * w).sum().backward()
    (b * w).sum().backward()
    fused_params = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(fused_params[name].grad, p.grad, atol=5e-5, rtol=1e-3, msg=name)


def test_pretraining_step_runs_on_the_fused_kernels_with_dropout(kernels_on_this_device):
    torch.manual_seed(0)
    model = ElectraPretrainingModel(config("fused", hidden_dropout_prob=0.1,
                                           attention_probs_dropout_prob=0.1)).to(DEVICE)
    ids, mask = padded_batch()
    out = model(ids, mask)
    assert kernels_on_this_device["attention"] == 4          # generator + discriminator, 2 layers each
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

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
    to the reference cannot pass these tests. The test runs inside replayed_work (as a CUDA graph's
    warm-up and capture do), where the linear layers take their fused path too."""
    if DEVICE == "cpu":
        real = backend.use_triton
        monkeypatch.setattr(backend, "use_triton",
                            lambda device, requested, op: backend.resolve(requested) != "eager"
                            or real(device, requested, op))
    from fastelectra.kernels import attention, cross_entropy, layernorm, linear

    calls = {"attention": 0, "attention_varlen": 0, "layer_norm": 0, "linear": 0, "cross_entropy": 0}
    for module, fn_name, key in ((attention, "flash_attention", "attention"),
                                 (attention, "flash_attention_varlen", "attention_varlen"),
                                 (attention, "flash_attention_qkvpacked", None),   # padded or varlen: by cu_seqlens
                                 (layernorm, "fused_layer_norm", "layer_norm"),
                                 (linear, "fused_linear", "linear"),
                                 (cross_entropy, "cross_entropy_with_lse", "cross_entropy")):
        def counted(*args, _fn=getattr(module, fn_name), _key=key, **kwargs):
            calls[_key or ("attention" if kwargs.get("cu_seqlens") is None else "attention_varlen")] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, fn_name, counted)
    with backend.replayed_work():
        yield calls
    # a test whose tensors missed the kernels (CPU tensors on a GPU machine, say) would test the references
    assert sum(calls.values()) > 0, "no fused kernel ran in this test: its inputs took the reference paths"


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
    # 2 layers: 2 attentions; embeddings + 2 tails per layer: 5 layer norms; 4 linears per layer,
    # the embedding projection (24 -> 32) and the head's two: 11 linears
    assert kernels_on_this_device == {"attention": 2, "attention_varlen": 0, "layer_norm": 5, "linear": 11,
                                      "cross_entropy": 0}
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
    assert kernels_on_this_device["cross_entropy"] == 1      # the MLM loss from replace_tokens' lse
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_pretraining_step_fused_matches_eager_losses_and_gradients(kernels_on_this_device):
    """The whole step on the same weights and masks, without randomness (eval: no dropout; temperature 0:
    argmax replacement): linears with the Triton bias gradient, packed attention, the fused tails and the
    MLM loss from the replacement's lse give eager's losses and every parameter's gradient."""
    models = {}
    for name in ("eager", "fused"):
        models[name] = ElectraPretrainingModel(config(name, sampling_temperature=0.0)).to(DEVICE).eval()
    models["fused"].load_state_dict(models["eager"].state_dict())
    ids, mask = padded_batch()
    outs = {}
    for name, model in models.items():
        torch.manual_seed(1)                                  # the same masked positions for both
        outs[name] = model(ids, mask)
        outs[name].loss.backward()
    assert kernels_on_this_device["cross_entropy"] == 1 and kernels_on_this_device["linear"] > 0
    a, b = outs["eager"], outs["fused"]
    assert torch.equal(a.masked_positions, b.masked_positions) and torch.equal(a.is_replaced, b.is_replaced)
    for what in ("mlm_loss", "rtd_loss"):
        torch.testing.assert_close(getattr(b, what), getattr(a, what), atol=1e-5, rtol=1e-5, msg=what)
    fused_params = dict(models["fused"].named_parameters())
    for name, p in models["eager"].named_parameters():
        torch.testing.assert_close(fused_params[name].grad, p.grad, atol=5e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("dynamic", [False, True])
def test_fused_step_compiles_as_one_graph(kernels_on_this_device, dynamic):
    """fullgraph=True fails on a host sync, a data-dependent shape or a Python int seed read with
    .item(): the fused step (Triton custom ops, the _C replacement op) has none, also with symbolic
    batch and sequence sizes."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ElectraPretrainingModel(config("fused", hidden_dropout_prob=0.1,
                                           attention_probs_dropout_prob=0.1)).to(DEVICE)
    model.discriminator.electra.check_values = model.generator.electra.check_values = False
    ids, mask = padded_batch()
    out = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)(ids, mask)
    assert kernels_on_this_device["attention"] >= 4
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
def test_fused_step_compiles_as_one_graph_with_inductor_on_cuda():
    """The real dispatch on CUDA (no counting shim) under inductor, fullgraph: backend.triton_status's
    importlib lookup broke the graph at every op, and inductor pads the rows of the 30522-wide
    generator logits, which replace_tokens must get contiguous (padded rows crashed the step)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ElectraPretrainingModel(config("fused", vocab_size=30522, hidden_dropout_prob=0.1,
                                           attention_probs_dropout_prob=0.1)).to(DEVICE)
    model.discriminator.electra.check_values = model.generator.electra.check_values = False
    ids, mask = padded_batch(b=4, t=32)
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(ids, mask)
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.is_replaced.shape == ids.shape
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def small_fused_model():
    cfg = config("fused", vocab_size=1000, embedding_size=128, hidden_size=256, num_attention_heads=4,
                 intermediate_size=1024, generator_hidden_size=64, max_position_embeddings=128,
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = ElectraPretrainingModel(cfg).to(DEVICE)
    model.discriminator.electra.check_values = model.generator.electra.check_values = False
    return model


def real_batch(b=16, t=128):
    ids = torch.randint(5, 1000, (b, t), device=DEVICE)
    lengths = torch.randint(t // 2, t + 1, (b,), device=DEVICE)
    mask = (torch.arange(t, device=DEVICE)[None] < lengths[:, None]).long()
    ids[:, 0] = 2
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.gpu
def test_training_step_never_syncs_with_the_host():
    torch.manual_seed(0)
    model = small_fused_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids, mask = real_batch()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()                                   # autotuning and the first launches may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_graph_replays_draw_fresh_random_numbers():
    """A captured step must not bake its seeds in: two replays differ (dropout, masking, Gumbel noise),
    and a replay after torch.manual_seed(s) repeats the first one after the same reseed."""
    torch.manual_seed(0)
    model = small_fused_model()
    ids, mask = real_batch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):            # warm-up (autotuning) outside the capture
        for _ in range(2):
            model(ids, mask)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(ids, mask)
    results = []
    for s in (1, 2, 1):
        torch.manual_seed(s)
        graph.replay()
        results.append((out.loss.clone(), out.is_replaced.clone(), out.disc_logits.clone()))
    assert not torch.equal(results[0][2], results[1][2])
    assert torch.equal(results[0][1], results[2][1]) and torch.equal(results[0][2], results[2][2])
    eager = model(ids, mask)
    assert abs(eager.loss.item() - results[0][0].item()) < 0.5 * results[0][0].item()   # same model, sane loss

"""Shared by the parity tests (test_model.py, test_patch.py): HF ELECTRA configs and padded batches."""
import torch

LAYERS = 3


def hf_config(**overrides):
    """A transformers ElectraConfig with E != H (embeddings_project), several heads, odd sizes and a
    non-default eps."""
    import transformers

    kw = dict(vocab_size=211, embedding_size=40, hidden_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
              intermediate_size=72, max_position_embeddings=64, layer_norm_eps=1e-7, num_labels=3,
              attn_implementation="eager")
    kw.update(overrides)
    return transformers.ElectraConfig(**kw)


def padded_batch(vocab=211, b=3, t=23, seed=0):
    """(ids, attention_mask, token_type_ids) with two padded rows and two segments."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(b, t, dtype=torch.long)
    types[:, t // 2:] = 1
    return ids, mask, types


def randomise(model, seed=1):
    """Non-trivial LayerNorm/bias values, so parity does not hinge on ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)

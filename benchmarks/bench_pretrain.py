"""End-to-end ELECTRA pretraining throughput: one full training step (generator + replacement +
discriminator + backward + AdamW) in sequences/s, fastelectra vs HF transformers, one process.

Contenders (with and without torch.compile, where the compiled variant is asked for):
  fastelectra-fused   ElectraPretrainingModel, backend fused (Triton kernels + the _C op)
  fastelectra-fused-unpad  the same with config.unpad: the encoders skip the padding (varlen
                      attention); padded batches only, without torch.compile (it syncs once per encoder)
  fastelectra-eager   the same model on the torch reference ops (the baseline)
  fastelectra-*+graph the same steps captured once as one CUDA graph and replayed (the step has no
                      host sync, and its seeds live on the device, so each replay draws fresh masks);
                      no launch overhead. HF steps cannot be captured: their masking syncs.
  hf-eager / hf-sdpa  transformers' ElectraForMaskedLM + ElectraForPreTraining wired the ELECTRA
                      way (shared embeddings, tied LM head, Gumbel-max replacement), with the
                      eager or sdpa attention implementation
Shapes: ELECTRA-Small (B=128, T=128) and ELECTRA-Base (B=32, T=512) in bf16 autocast, with full
batches and padded ones (lengths uniform in [T/2, T]). Reports seq/s, ms/step, the ratio to each HF
peer, MFU (model FLOPs, padded positions counted, over the GPU's dense bf16 peak) and peak memory.

    python -m benchmarks.bench_pretrain --out benchmarks/results/pretrain_<gpu>_<date>.json
    python -m benchmarks.bench_pretrain --device cpu --presets tiny --steps 2 --warmup 1   # smoke run
"""
from __future__ import annotations

import argparse
import datetime
import time

import torch

from fastelectra.config import ElectraConfig
from fastelectra.graphs import cast_once, linear_parameters
from fastelectra.model import ElectraPretrainingModel
from fastelectra.pretrain import clip_and_step, decays

from .common import cuda_events_ms, env_info, markdown_table, pyplot, until_interrupted, write_results

SHAPES = {"tiny": (8, 64), "small": (128, 128), "base": (32, 512), "large": (8, 512)}
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # vendor datasheet, dense


def make_batch(cfg: ElectraConfig, b: int, t: int, padded: bool, device, seed: int = 0):
    """Random ids (never a constant batch): [CLS] tokens [SEP] [PAD]...; lengths in [T/2, T] if padded."""
    g = torch.Generator().manual_seed(seed)
    first = max(cfg.special_token_ids) + 1
    ids = torch.randint(first, cfg.vocab_size, (b, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g) if padded else torch.full((b,), t)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids[:, 0] = cfg.cls_token_id
    ids[torch.arange(b), lengths - 1] = cfg.sep_token_id
    ids[mask == 0] = cfg.pad_token_id
    return ids.to(device), mask.to(device)


def step_flops(cfg: ElectraConfig, b: int, t: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), all B·T positions counted."""
    def encoder(c: ElectraConfig) -> float:  # forward FLOPs per token
        h, f, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        proj = 2 * c.embedding_size * h if c.embedding_size != h else 0
        return proj + layers * (2 * (4 * h * h + 2 * h * f) + 4 * t * h)   # dense layers + QKᵀ and PV

    gen = cfg.generator()
    per_token = encoder(cfg) + encoder(gen) + 2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size
    masked = cfg.mask_prob * b * t
    head = masked * (2 * gen.hidden_size * cfg.embedding_size + 2 * cfg.embedding_size * cfg.vocab_size)
    return 3.0 * (b * t * per_token + head)


# ----------------------------------------------------------------------------- contenders
def fastelectra_step(cfg: ElectraConfig, backend: str, compile_: bool, device, unpad: bool = False):
    cfg = ElectraConfig.from_dict({**cfg.to_dict(), "backend": backend, "unpad": unpad})
    model = ElectraPretrainingModel(cfg).to(device)
    model.discriminator.electra.check_values = False   # the batch is validated once, below
    model.generator.electra.check_values = False
    fwd = torch.compile(model) if compile_ else model
    return model, lambda ids, mask: fwd(ids, mask).loss


def hf_step(cfg: ElectraConfig, attn: str, compile_: bool, device):
    import transformers

    def hf_config(c: ElectraConfig):
        keys = ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")
        return transformers.ElectraConfig(**{k: getattr(c, k) for k in keys}, attn_implementation=attn)

    gen = transformers.ElectraForMaskedLM(hf_config(cfg.generator())).to(device)
    disc = transformers.ElectraForPreTraining(hf_config(cfg)).to(device)
    gen.electra.embeddings = disc.electra.embeddings                          # shared embeddings
    gen.generator_lm_head.weight = disc.electra.embeddings.word_embeddings.weight
    model = torch.nn.ModuleDict({"generator": gen, "discriminator": disc})
    gen_fwd, disc_fwd = (torch.compile(gen), torch.compile(disc)) if compile_ else (gen, disc)
    special = torch.tensor(cfg.special_token_ids, device=device)

    def loss(ids, mask):
        chosen = (torch.rand(ids.shape, device=device) < cfg.mask_prob) & ~torch.isin(ids, special) & mask.bool()
        to_mask = chosen & (torch.rand(ids.shape, device=device) < cfg.mask_token_prob)
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        out = gen_fwd(input_ids=torch.where(to_mask, cfg.mask_token_id, ids), attention_mask=mask, labels=labels)
        with torch.no_grad():                                                   # Gumbel-max replacement
            logits = out.logits[chosen].float()
            sampled = torch.argmax(logits - torch.log(-torch.log(torch.rand_like(logits).clamp_(min=1e-20))), -1)
            disc_ids = ids.clone()
            disc_ids[chosen] = sampled
            replaced = (disc_ids != ids).long()
        d = disc_fwd(input_ids=disc_ids, attention_mask=mask, labels=replaced)
        return out.loss + cfg.rtd_weight * d.loss

    return model, loss


# the contenders every row is also compared with (seq/s ratio), where the run measured them
PEERS = ("hf-eager", "hf-sdpa", "hf-eager+compile", "hf-sdpa+compile", "fastelectra-eager")


def training_step(model, loss_fn, ids, mask, dtype, graph: bool = False):
    """One full training step as a closure: loss (autocast to ``dtype`` unless fp32) + backward + clip to
    1.0 + AdamW (decay 0.01, none on LayerNorm and biases). It returns the loss, detached (no host sync).
    ``graph``: the step is captured once in a CUDA graph and the closure replays it (same batch tensors,
    fresh masking/dropout/noise per replay from the device-side seeds); needs a sync-free step."""
    device = ids.device
    decay = [p for n, p in model.named_parameters() if decays(n)]
    rest = [p for n, p in model.named_parameters() if not decays(n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, fused=device.type == "cuda", capturable=graph)

    # in a CUDA graph fastelectra's fused linear layers take their weights in ``dtype`` from one
    # multi-tensor copy per step (a no-op elsewhere, and for models without FusedLinear layers)
    cast_params = linear_parameters(model)

    def step(zero_grad: bool = True):
        # autocast's weight-cast cache must be off under capture (the casts have to be in the graph)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=not graph)
        with cast_once(cast_params, dtype), autocast:
            loss = loss_fn(ids, mask)
        loss.backward()
        clip_and_step(opt, model.parameters(), 1.0)
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    if not graph:
        return step
    from fastelectra.graphs import capture

    # warm-up steps accumulate into the grads; set them to None so the captured backward writes them fresh
    replay, static_loss = capture(lambda: step(zero_grad=False), device,
                                  before_capture=lambda: opt.zero_grad(set_to_none=True))

    def replayed():
        replay()
        return static_loss

    return replayed


def measure(name, build, cfg, b, t, padded, device, steps, warmup, dtype, graph=False):
    torch.manual_seed(0)
    if device.type == "cuda":
        # before the model exists: replays of a CUDA graph allocate nothing, so its activations only
        # show in the peak while it is captured (inside training_step)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, loss_fn = build()
    step = training_step(model, loss_fn, *make_batch(cfg, b, t, padded, device), dtype, graph=graph)
    if device.type == "cuda":
        ms = cuda_events_ms(step, steps, warmup)
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        for _ in range(warmup):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        ms, peak = (time.perf_counter() - t0) * 1e3 / steps, None
    flops = step_flops(cfg, b, t)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else ""
    peak_flops = next((v for k, v in DENSE_BF16_PEAK.items() if k in gpu), None)
    del model, step
    return {"contender": name, "seq_per_s": b / (ms / 1e3), "ms_per_step": ms,
            "mfu": flops / (ms / 1e3) / peak_flops if peak_flops else None, "peak_mem_gib": peak}


def run(args, variants, have_hf: bool, device, dtype, results: list) -> None:
    """Measure every (preset, padding, contender) that ``args`` asks for, appending a row each to ``results``."""
    for preset in args.presets:
        cfg = ElectraConfig.preset(preset)
        b, t = SHAPES[preset]
        for padding in args.padding:
            for compile_ in variants:
                if compile_ and padding == "padded" and not args.compile_padded:
                    continue
                suffix = "+compile" if compile_ else ""
                builders = {
                    "fastelectra-fused": lambda c=compile_: fastelectra_step(cfg, "fused", c, device),
                    "fastelectra-eager": lambda c=compile_: fastelectra_step(cfg, "eager", c, device),
                }
                if padding == "padded" and not compile_:
                    builders["fastelectra-fused-unpad"] = lambda: fastelectra_step(cfg, "fused", False, device,
                                                                                   unpad=True)
                if have_hf:
                    builders["hf-eager"] = lambda c=compile_: hf_step(cfg, "eager", c, device)
                    builders["hf-sdpa"] = lambda c=compile_: hf_step(cfg, "sdpa", c, device)
                runs = [(name + suffix, build, False) for name, build in builders.items()]
                if not compile_ and device.type == "cuda":   # sync-free steps: whole step as one CUDA graph
                    runs += [(name + "+graph", builders[name], True)
                             for name in ("fastelectra-fused", "fastelectra-eager")]
                for full_name, build, graph in runs:
                    if args.contenders and full_name not in args.contenders:
                        continue
                    try:
                        r = measure(full_name, build, cfg, b, t, padding == "padded", device,
                                    args.steps, args.warmup, dtype, graph=graph)
                    except Exception as e:   # one contender failing (e.g. out of memory) hides no other
                        r = {"contender": full_name, "error": f"{type(e).__name__}: {e}"[:300]}
                    r.update(preset=preset, batch=b, seqlen=t, padding=padding)
                    results.append(r)
                    print(r, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base"], choices=sorted(SHAPES))
    ap.add_argument("--padding", nargs="+", default=["full", "padded"], choices=["full", "padded"])
    ap.add_argument("--contenders", nargs="+", default=None,
                    help="subset of: fastelectra-fused fastelectra-eager hf-eager hf-sdpa, each also as NAME+compile "
                         "(the torch.compile variant); fastelectra-fused+graph, fastelectra-eager+graph (the "
                         "whole step replayed as one CUDA graph); fastelectra-fused-unpad (padded batches)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--compile-padded", action="store_true",
                    help="also compile on padded batches (default: compiled variants on full batches only; "
                         "each compile costs 30-60 s)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="JSON path (a .md table and a .png chart go beside it)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_pretrain: --device cuda but torch sees no GPU (use --device cpu for a smoke run)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        import transformers  # noqa: F401
        have_hf, hf_note = True, None
    except ImportError:
        have_hf, hf_note = False, "transformers is not installed: HF peers skipped"
    variants = [False] if args.no_compile or device.type == "cpu" else [False, True]
    rows, truncated = until_interrupted(run, args, variants, have_hf, device, dtype)
    rates: dict = {}                                 # ratios against the peers of the same (preset, padding)
    for r in rows:
        rates.setdefault((r["preset"], r["padding"]), {})[r["contender"]] = r.get("seq_per_s")
    for r in rows:
        by_name = rates[r["preset"], r["padding"]]
        for peer in PEERS:
            if r.get("seq_per_s") and by_name.get(peer):
                r[f"x_vs_{peer}"] = r["seq_per_s"] / by_name[peer]
    cols = ["preset", "batch", "seqlen", "padding", "contender", "seq_per_s", "ms_per_step", "mfu", "peak_mem_gib",
            *(f"x_vs_{peer}" for peer in PEERS if any(f"x_vs_{peer}" in r for r in rows)), "error"]
    table = markdown_table(rows, cols)
    write_results(args.out, {"benchmark": "pretrain_step", "dtype": str(dtype), "steps": args.steps,
                             "warmup": args.warmup, "note": hf_note, "rows": rows}, table, truncated)
    if args.out:
        chart(rows, args.out.rsplit(".", 1)[0] + ".png")
    return 1 if truncated else 0


def chart(rows: list[dict], path: str, env: dict | None = None) -> None:
    """Bar chart of seq/s per contender, one panel per (preset, padding)."""
    plt = pyplot()
    if plt is None:
        return
    groups = sorted({(r["preset"], r["padding"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (preset, padding) in zip(axes[0], groups):
        rs = [r for r in rows if (r["preset"], r["padding"]) == (preset, padding) and r.get("seq_per_s")]
        ax.barh([r["contender"] for r in rs], [r["seq_per_s"] for r in rs],
                color=["tab:green" if r["contender"].startswith("fastelectra-fused") else "tab:gray" for r in rs])
        ax.set_title(f"ELECTRA-{preset}, {padding} batches")
        ax.set_xlabel("sequences / s (higher is better)")
    env = env or env_info()       # the machine the rows were measured on (default: this one, now)
    fig.suptitle(f"{env['gpu'] or 'cpu'} · torch {env['torch']} · {env.get('date', datetime.date.today())}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())

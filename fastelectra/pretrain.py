"""ELECTRA pretraining: ``fastelectra pretrain`` and the Python API :func:`pretrain`.

One optimizer step (global batch B = world · grad_accum · micro-batch):

    for each of this rank's grad_accum micro-batches j:
        reseed torch from (seed, step, j)          masking, sampling and dropout of micro-batch j are
                                                    the same whatever the (world, grad_accum) split
        loss_j = model(ids, mask).loss / grad_accum  bf16 autocast on CUDA, fp32 on CPU
        loss_j.backward()                           DDP all-reduces (averages) on the last micro-batch
    clip grad norm to 1.0; AdamW step (fused on CUDA, the clip inside it)
    LambdaLR: linear warmup, then linear decay to 0

Rank 0 alone writes: metrics.jsonl (one JSON line per log step), checkpoint.pt (atomically: temp file
in the same folder, fsync, os.replace), the HF exports out/discriminator and out/generator (with the
tokenizer files), and summary.json. ``--resume`` restores model, optimizer, scheduler, RNG states, data
position and the metrics window, so an interrupted run continues exactly as if it had not stopped. It
keeps the run's optimization options (SCHEDULE_KEYS: a different value given is an error) and its trained
vocab (kept in the checkpoint too); a larger --steps extends the run, the linear decay ending at the new total.

Multi-GPU: ``torchrun --nproc_per_node N -m fastelectra pretrain ...`` (nccl on CUDA, gloo on CPU);
each rank reads its own micro-batches of every global batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from . import backend as _backend
from . import data
from .config import PRESETS, ElectraConfig
from .data import FastElectraError

__all__ = ["PretrainConfig", "pretrain", "FastElectraError", "PRESET_DEFAULTS", "add_cli_arguments", "run_cli"]

# the paper's optimisation settings per model size (Clark et al. 2020, Table 6: lr, batch, seq 128 for
# Small and 512 for Base/Large, 10k warmup steps, 1M / 766k / 400k steps); ``tiny`` is sized so the
# default run (embedded corpus, tokenizer training included) takes 1-5 minutes on 2 CPU cores, without
# dropout (a 0.4M-parameter model trained for 800 steps does not overfit; dropout costs ~25% of a CPU step).
PRESET_DEFAULTS = {
    "tiny":  dict(steps=800,       batch_size=32,   seq_len=128, lr=2e-3, warmup_steps=80,    vocab_size=4096,
                  log_every=20, dropout=0.0),
    "small": dict(steps=1_000_000, batch_size=128,  seq_len=128, lr=5e-4, warmup_steps=10_000, vocab_size=30522,
                  log_every=100),
    "base":  dict(steps=766_000,   batch_size=256,  seq_len=512, lr=2e-4, warmup_steps=10_000, vocab_size=30522,
                  log_every=100),
    "large": dict(steps=400_000,   batch_size=2048, seq_len=512, lr=2e-4, warmup_steps=10_000, vocab_size=30522,
                  log_every=100),
}
METRICS = ("loss", "mlm_loss", "rtd_loss", "mlm_accuracy", "rtd_accuracy", "rtd_precision", "rtd_recall")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1
# run settings a resumed run must share with its checkpoint (else the data order or model differ)
RESUME_KEYS = ("seq_len", "batch_size", "seed", "corpus", "tokenizer")
# options that shape the optimization: a resumed run keeps the checkpoint's (each defaults to it; a different
# value given is an error). --steps may grow: the linear decay then ends at the new total.
SCHEDULE_KEYS = ("lr", "warmup_steps", "weight_decay", "max_grad_norm")
DEFAULT_WEIGHT_DECAY, DEFAULT_MAX_GRAD_NORM = 0.01, 1.0


@dataclass
class PretrainConfig:
    """Options of a pretraining run; None means the preset's default (PRESET_DEFAULTS)."""
    preset: str = "tiny"
    corpus: str | None = None          # text file, folder of *.txt, or None for the embedded stdlib docs
    tokenizer: str | None = None       # HF tokenizer dir / tokenizer.json / vocab.txt; None: train WordPiece
    out: str | None = None             # output folder; None: runs/<preset>
    steps: int | None = None           # optimizer steps
    batch_size: int | None = None      # global batch: sequences per optimizer step over all ranks
    seq_len: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None    # None: the preset's, at most steps // 10
    weight_decay: float | None = None  # None: 0.01 (AdamW's, not on LayerNorm weights and biases)
    grad_accum: int = 1
    max_grad_norm: float | None = None  # None: 1.0
    save_every: int | None = 1000      # checkpoint every N steps (and always after the last); 0: only last
    log_every: int | None = None
    resume: bool = False
    backend: str = "auto"              # auto | fused | eager
    compile: bool = False              # torch.compile the model (one graph: fullgraph=True)
    cuda_graphs: bool | None = None    # replay forward+backward as a CUDA graph; None: where it can (use_cuda_graphs)
    seed: int = 0
    vocab_size: int | None = None      # WordPiece vocab to train (without --tokenizer); must match it with one
    device: str | None = None          # None: cuda if available, else cpu
    num_workers: int = 2               # DataLoader workers on CUDA (CPU loads in-process)
    progress: bool = True              # tqdm progress bar on rank 0
    dropout: float | None = None       # hidden and attention dropout; None: the preset's (0.1; tiny: 0)
    model_overrides: dict = field(default_factory=dict)   # other ElectraConfig fields, e.g. num_hidden_layers


# ----------------------------------------------------------------------------- options
MAX_SEED = 2**32 - 1   # numpy's (np.random.seed) range; torch's is wider


def check_seed(seed) -> None:
    """--seed must be an integer in [0, 2**32 - 1] (checked before any data work)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise FastElectraError(f"--seed must be an integer in [0, 2**32 - 1 = {MAX_SEED}], got {seed!r}")


def resolve_options(config: PretrainConfig) -> PretrainConfig:
    """A copy with the preset's defaults filled in; raises FastElectraError naming a bad option."""
    if config.preset not in PRESET_DEFAULTS:
        raise FastElectraError(f"unknown preset {config.preset!r}; expected one of {list(PRESET_DEFAULTS)}")
    d = PRESET_DEFAULTS[config.preset]
    c = dataclasses.replace(config, model_overrides=dict(config.model_overrides))
    for name in ("steps", "batch_size", "seq_len", "lr", "log_every"):
        if getattr(c, name) is None:
            setattr(c, name, d[name])
    if c.warmup_steps is None:
        c.warmup_steps = min(d["warmup_steps"], c.steps // 10)
    for name, default in (("weight_decay", DEFAULT_WEIGHT_DECAY), ("max_grad_norm", DEFAULT_MAX_GRAD_NORM)):
        if getattr(c, name) is None:
            setattr(c, name, default)
    if c.dropout is None:
        c.dropout = d.get("dropout", ElectraConfig.hidden_dropout_prob)
    if not isinstance(c.dropout, (int, float)) or not 0 <= c.dropout < 1:
        raise FastElectraError(f"--dropout must be in [0, 1), got {c.dropout!r}")
    if c.out is None:
        c.out = os.path.join("runs", c.preset)
    if c.save_every is None:
        c.save_every = 0
    for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 3), ("grad_accum", 1), ("log_every", 1),
                      ("warmup_steps", 0), ("save_every", 0), ("num_workers", 0)):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise FastElectraError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")
    check_seed(c.seed)
    for name in ("lr", "weight_decay", "max_grad_norm"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
            kind = "positive" if name == "lr" else "non-negative"
            raise FastElectraError(f"--{name.replace('_', '-')} must be a {kind} number, got {v!r}")
    if c.vocab_size is not None and (not isinstance(c.vocab_size, int) or c.vocab_size < 16):
        raise FastElectraError(f"--vocab-size must be an integer >= 16, got {c.vocab_size!r}")
    if c.backend not in _backend.BACKENDS:
        raise FastElectraError(f"--backend must be one of {_backend.BACKENDS}, got {c.backend!r}")
    if c.device not in (None, "cpu", "cuda") and not str(c.device).startswith("cuda:"):
        raise FastElectraError(f"--device must be cpu or cuda, got {c.device!r}")
    if c.cuda_graphs and c.compile:
        raise FastElectraError("--cuda-graphs and --compile do not go together: pick one")
    unknown = set(c.model_overrides) - set(ElectraConfig.field_names())
    if unknown:
        raise FastElectraError(f"model_overrides has unknown ElectraConfig fields: {sorted(unknown)}")
    return c


def check_backend(name: str, device: torch.device) -> None:
    """Fail before training when ``fused`` is asked for where its kernels cannot run."""
    if _backend.resolve(name) != "fused":
        return
    ok, why = _backend.extension_status()
    if not ok:
        raise FastElectraError(f"--backend fused needs the fastelectra._C extension: {why}")
    if device.type == "cuda":
        ok, why = _backend.triton_status()
        if not ok:
            raise FastElectraError(f"--backend fused needs Triton on {device}: {why}")


def use_cuda_graphs(c: PretrainConfig, device: torch.device, world: int, unpad: bool) -> bool:
    """Whether the run replays each micro-batch as a CUDA graph. ``cuda_graphs=None`` (the default)
    means wherever it can: one CUDA device, no --compile (its own graph) and no ``unpad`` (it counts
    tokens on the host); ``True`` asks for it and is an error where it cannot run."""
    if c.cuda_graphs is None:
        return device.type == "cuda" and world == 1 and not c.compile and not unpad
    if c.cuda_graphs:
        if device.type != "cuda":
            raise FastElectraError(f"--cuda-graphs needs a CUDA device, got {device}")
        if world > 1:
            raise FastElectraError(f"--cuda-graphs runs on one GPU (DistributedDataParallel's hooks cannot be "
                                   f"captured); this run has {world} processes")
        if unpad:
            raise FastElectraError("--cuda-graphs does not go with unpad=True, which counts each batch's "
                                   "tokens on the host")
    return bool(c.cuda_graphs)


def model_config(c: PretrainConfig, tok_ids: dict) -> ElectraConfig:
    """The preset's ElectraConfig with the tokenizer's vocab size and special-token ids, the backend,
    room for seq_len positions, and ``model_overrides``; a vocab size that disagrees with the tokenizer
    is an error."""
    vocab = tok_ids["vocab_size"]
    if c.tokenizer is not None and c.vocab_size is not None and c.vocab_size != vocab:
        raise FastElectraError(f"--vocab-size {c.vocab_size} does not match the tokenizer {c.tokenizer}, "
                               f"which has {vocab} tokens")
    asked = c.model_overrides.get("vocab_size", vocab)
    if asked != vocab:
        raise FastElectraError(f"the model config has vocab_size={asked} but the tokenizer has {vocab} tokens; "
                               "they must match")
    max_pos = max(PRESETS[c.preset].get("max_position_embeddings", 512), c.seq_len)
    fields = dict(max_position_embeddings=max_pos, backend=c.backend, hidden_dropout_prob=c.dropout,
                  attention_probs_dropout_prob=c.dropout, **tok_ids)
    fields.update({k: v for k, v in c.model_overrides.items() if k != "vocab_size"})
    try:
        return ElectraConfig.preset(c.preset, **fields)
    except ValueError as e:
        raise FastElectraError(f"invalid model config: {e}") from e


# ----------------------------------------------------------------------------- distributed
def setup_distributed(device_name: str | None):
    """(rank, world_size, device): init_process_group from torchrun's env vars when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if device_name and device_name.startswith("cuda") and not torch.cuda.is_available():
        raise FastElectraError(f"--device {device_name}: torch sees no CUDA GPU here")
    if world <= 1:
        return 0, 1, torch.device(device_name or ("cuda" if use_cuda else "cpu"))
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    t = t.clone()
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


def micro_batch_seed(seed: int, step: int, j: int) -> int:
    """The torch seed of micro-batch j of optimizer step ``step`` (same on every rank layout)."""
    digest = hashlib.blake2b(f"{seed}/{step}/{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- optimizer
def decays(name: str) -> bool:
    """Whether AdamW's weight decay applies to the parameter ``name``: not to biases, not to LayerNorm
    weights (BERT's and ELECTRA's rule)."""
    return not (name.endswith("bias") or "LayerNorm" in name)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW (betas 0.9/0.999, eps 1e-6 as in ELECTRA); no decay on LayerNorm weights and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():      # named_parameters() lists a shared parameter once
        if not p.requires_grad:
            continue
        (decay if decays(name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, fused=device.type == "cuda")


def clip_and_step(optimizer: torch.optim.Optimizer, parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_(parameters, max_norm)`` then ``optimizer.step()``; returns the gradients' total
    norm before clipping (a tensor: no host sync).

    With a fused Adam/AdamW the clip factor is handed to the step itself as its ``grad_scale`` (the hook
    GradScaler uses to unscale inside the fused kernel): the step divides each gradient by
    max(1, (norm + 1e-6) / max_norm), which is clip_grad_norm_'s factor, so the separate multiply over
    every gradient (a read and a write of all of them, ~1 GB per ELECTRA-Base step) is not run. Any
    other optimizer clips the usual way."""
    params = [p for p in parameters if p.grad is not None]
    fused = (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
             and all(g.get("fused") for g in optimizer.param_groups))
    if not fused or not params:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        return norm
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale       # a later plain step() must not reuse this step's factor
    return norm


def lr_lambda(warmup: int, total: int):
    """Linear warmup from lr/warmup to lr over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


# ----------------------------------------------------------------------------- checkpoints
def rng_states() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:])}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` atomically: a temp file in the same folder, fsync, os.replace. On failure
    (a full disk) the previous checkpoint stays intact, the temp file is removed, and a
    FastElectraError names the path."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise FastElectraError(f"could not write checkpoint {path}: {e}; the previous checkpoint is "
                                   "unchanged") from e
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)               # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FastElectraError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise FastElectraError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise FastElectraError(f"{path} is not a fastelectra pretraining checkpoint (version {CHECKPOINT_VERSION})")
    return ckpt


def check_resume(ckpt: dict, path: str, mcfg: ElectraConfig, run: dict, c: PretrainConfig) -> None:
    """A checkpoint from another model config, corpus, tokenizer, data setting or optimization is an error."""
    saved = dict(ckpt["model_config"])
    here = mcfg.to_dict()
    runtime = ("backend", "unpad")   # how the math runs, not what it computes: may change on resume
    diffs = [f"{k}={saved.get(k)!r} there, {here.get(k)!r} here" for k in sorted(here)
             if k not in runtime and saved.get(k) != here.get(k)]
    diffs += [f"{k}={ckpt['run'].get(k)!r} there, {run[k]!r} here" for k in RESUME_KEYS
              if ckpt["run"].get(k) != run[k]]
    if ckpt["run"].get("tokenizer") != run["tokenizer"] and c.tokenizer is None:
        diffs.append("(the vocab trained for this run is kept in OUT/cache/ and, since this version, in the "
                     "checkpoint; a cache trained anew differs)")
    saved_options = ckpt.get("options", {})
    diffs += [f"--{k.replace('_', '-')}={saved_options[k]!r} there, {getattr(c, k)!r} here" for k in SCHEDULE_KEYS
              if k in saved_options and saved_options[k] != getattr(c, k)]
    if diffs:
        raise FastElectraError(f"checkpoint {path} was written for another configuration: " + "; ".join(diffs)
                               + " (resume with the run's options, or start a new run in another --out)")


def continue_schedule(c: PretrainConfig, given: PretrainConfig, ckpt: dict) -> PretrainConfig:
    """For --resume from ``ckpt``: the options the user left unset (``given``) take the checkpoint's values
    (SCHEDULE_KEYS, and --dropout from its model config); --steps must go beyond the checkpoint's step."""
    saved, step = ckpt.get("options", {}), ckpt["data"]["step"]
    if c.steps <= step:
        raise FastElectraError(f"--resume: the checkpoint is at step {step} and --steps is {c.steps}: nothing to "
                               f"train; pass --steps above {step} to continue the run")
    for k in SCHEDULE_KEYS:
        if getattr(given, k) is None and k in saved:
            setattr(c, k, saved[k])
    dropout = ckpt.get("model_config", {}).get("hidden_dropout_prob")
    if given.dropout is None and isinstance(dropout, (int, float)):
        c.dropout = dropout
    return c


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop log lines after ``last_step`` (written by a run that went on past its last checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(rows)


# ----------------------------------------------------------------------------- the run
def pretrain(config: PretrainConfig) -> dict:
    """Run ELECTRA pretraining; returns the summary (also written to out/summary.json on rank 0)."""
    c = resolve_options(config)
    rank, world, device = setup_distributed(c.device)
    try:
        return _pretrain(c, config, rank, world, device)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _pretrain(c: PretrainConfig, given: PretrainConfig, rank: int, world: int, device: torch.device) -> dict:
    """The run of the resolved options ``c``; ``given`` are the options as passed (None: unset)."""
    t_start = time.perf_counter()
    master = rank == 0
    check_backend(c.backend, device)
    use_cuda_graphs(c, device, world, unpad=False)      # an impossible --cuda-graphs fails before the data work
    out = os.path.abspath(c.out)
    cache = os.path.join(out, "cache")
    ckpt_path = os.path.join(out, CHECKPOINT)
    ckpt = None
    if c.resume:   # read once, before the tokenizer work (which may need the vocab it keeps)
        ckpt = load_checkpoint(ckpt_path)
        c = continue_schedule(c, given, ckpt)
    if master:
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError as e:
            raise FastElectraError(f"cannot create output folder {out}: {e.strerror or e}") from e

    # data: corpus -> tokenizer (trained and cached by rank 0) -> token file -> packed examples
    corpus = data.resolve_corpus(c.corpus)
    vocab = c.vocab_size or PRESET_DEFAULTS[c.preset]["vocab_size"]
    if master:
        try:
            tok, tok_source = data.get_tokenizer(c.tokenizer, corpus, vocab, cache,
                                                 saved=ckpt.get("tokenizer_cache") if ckpt else None)
            token_file = data.tokenize_corpus(corpus, tok, cache)
        except OSError as e:
            raise FastElectraError(f"cannot write the tokenizer / token cache in {cache}: {e}") from e
    barrier(world)
    if not master:
        tok, tok_source = data.get_tokenizer(c.tokenizer, corpus, vocab, cache, train=False)
        token_file = data.tokenize_corpus(corpus, tok, cache, build=False)
    tok_ids = data.special_token_ids(tok)
    mcfg = model_config(c, tok_ids)
    graphs = use_cuda_graphs(c, device, world, mcfg.unpad)
    examples = data.PackedExamples(token_file, c.seq_len, mcfg.vocab_size, mcfg.cls_token_id,
                                   mcfg.sep_token_id, mcfg.pad_token_id)
    run = {"seq_len": c.seq_len, "batch_size": c.batch_size, "seed": c.seed, "preset": c.preset,
           "corpus": corpus.fingerprint(), "tokenizer": data.tokenizer_fingerprint(tok)}
    # a trained vocab goes into every checkpoint too: retraining it would not reproduce it exactly
    tokenizer_cache = ({"folder": os.path.basename(tok_source), "json": tok.to_str()} if c.tokenizer is None
                       else None)

    # model, optimizer, schedule
    from .graphs import cast_once, linear_parameters
    from .model import ElectraPretrainingModel

    torch.manual_seed(c.seed)
    random.seed(c.seed)
    np.random.seed(c.seed)
    model = ElectraPretrainingModel(mcfg).to(device)
    model.train()
    for m in model.modules():   # ids were checked on the CPU (PackedExamples): no per-step value check (a sync)
        if hasattr(m, "check_values"):
            m.check_values = False
    optimizer = build_optimizer(model, c.lr, c.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c.warmup_steps, c.steps))
    n_params = sum(p.numel() for p in model.parameters())

    metrics_path = os.path.join(out, "metrics.jsonl")
    window = torch.zeros(len(METRICS) + 1, dtype=torch.float64)   # metric sums + micro-batch count
    start_step = 0
    if c.resume:
        check_resume(ckpt, ckpt_path, mcfg, run, c)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # the lr of the next step from this run's schedule: the same value for an exact resume, the
        # re-stretched decay when --steps grew (the saved lr of a finished run is 0)
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
        set_rng_states(ckpt["rng"])
        start_step = ckpt["data"]["step"]
        if master:
            window = ckpt["log_window"].clone()
            truncate_metrics(metrics_path, start_step)
        del ckpt
    elif master and os.path.exists(metrics_path):
        os.remove(metrics_path)       # a fresh run starts a fresh log
    window = window.to(device)

    train_model = model
    if c.compile:
        # the step has no host syncs and static shapes, so it compiles to one graph
        train_model = torch.compile(model, fullgraph=True)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None,
                          broadcast_buffers=False)
    sampler = data.BatchSampler(len(examples), c.batch_size, world, rank, c.grad_accum, c.seed, start_step, c.steps)
    batches = data.micro_batches(examples, sampler, device, c.num_workers)
    # under graph capture the weight casts must be recorded in the graph: no autocast cache
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphs)
                if device.type == "cuda" else nullcontext())

    # in a CUDA graph the fused linear layers take their bf16 weights from one multi-tensor copy per
    # micro-batch (fastelectra.graphs.cast_once; a no-op elsewhere)
    cast_params = linear_parameters(model)

    def micro_step(ids, mask):
        """Forward + backward of one micro-batch (grads accumulate in place) + its metrics into window."""
        with cast_once(cast_params, torch.bfloat16), autocast:
            o = train_model(ids, mask)
        (o.loss / c.grad_accum).backward()
        window.add_(torch.stack([o.loss.detach(), o.mlm_loss.detach(), o.rtd_loss.detach(), o.mlm_accuracy,
                                 o.rtd_accuracy, o.rtd_precision, o.rtd_recall,
                                 torch.ones((), device=device)]).to(window.dtype))

    graph = None   # with CUDA graphs: (replay, static ids, static mask), captured at the first micro-batch
    # With one micro-batch per step the captured backward writes the gradients: captured with them unset,
    # each parameter's AccumulateGrad keeps the buffer the backward made (in the graph's memory), and every
    # replay overwrites it, so no zeroing between steps and no read-add-write of every gradient. With
    # grad_accum > 1 the replays must add up, so the capture finds the gradients allocated and zeroed.
    grads_written = c.grad_accum == 1

    def capture_micro_step(ids, mask):
        """micro_step captured as a CUDA graph: warm-ups on a copy of the first batch, then their grads
        and metrics are undone. The grads are unset before the capture when each replay writes them
        (grads_written), else zeroed in place and kept, so that replays accumulate into them."""
        from .graphs import capture

        static_ids, static_mask = ids.clone(), mask.clone()
        window_before = window.clone()

        def undo_warmup():
            optimizer.zero_grad(set_to_none=grads_written)
            window.copy_(window_before)

        try:
            replay, _ = capture(lambda: micro_step(static_ids, static_mask), device, before_capture=undo_warmup)
        except BaseException:
            optimizer.zero_grad(set_to_none=True)        # no warm-up gradients or metrics left behind
            window.copy_(window_before)
            raise
        return replay, static_ids, static_mask
    setup_s = time.perf_counter() - t_start

    from tqdm.auto import tqdm

    bar = tqdm(total=c.steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (master and c.progress), desc=f"pretrain {c.preset}")
    t_train = t_window = time.perf_counter()
    steps_in_window = 0
    last_row = None
    for step in range(start_step, c.steps):
        for a in range(c.grad_accum):
            _, j, ids, mask = next(batches)               # (step, micro-batch index, ids, mask)
            ids = ids.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            if graphs and graph is None:
                try:
                    graph = capture_micro_step(ids, mask)
                except Exception as e:
                    if c.cuda_graphs:
                        raise FastElectraError(f"--cuda-graphs: capturing the training step failed: {e}") from e
                    graphs = False
                    warnings.warn(f"fastelectra pretrain: capturing the training step as a CUDA graph failed "
                                  f"({type(e).__name__}: {e}); training without CUDA graphs (--no-cuda-graphs "
                                  "skips the attempt)", RuntimeWarning, stacklevel=1)
            torch.manual_seed(micro_batch_seed(c.seed, step, j))
            if graph is not None and ids.shape == graph[1].shape:
                graph[1].copy_(ids)
                graph[2].copy_(mask)
                graph[0]()                                # replay: the same work, no Python per kernel
                continue
            if graph is not None and grads_written:        # (then this is the step's only micro-batch)
                # the replays leave the last step's gradients in place, and this micro-step adds; zeroed in
                # place, not unset, so that the graph's next replay still writes the tensors the optimizer reads
                optimizer.zero_grad(set_to_none=False)
            sync = train_model.no_sync() if world > 1 and a < c.grad_accum - 1 else nullcontext()
            with sync:
                micro_step(ids, mask)
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = clip_and_step(optimizer, model.parameters(), c.max_grad_norm)
        scheduler.step()
        if graph is None:
            optimizer.zero_grad(set_to_none=True)
        elif not grads_written:
            optimizer.zero_grad(set_to_none=False)        # the captured backward accumulates into these buffers
        steps_in_window += 1
        n = step + 1
        bar.update(1)

        if n == 1 or n % c.log_every == 0 or n == c.steps:
            sums = all_reduce_sum(window, world).tolist()      # one host sync per log step
            now = time.perf_counter()
            row = {"step": n, **{k: sums[i] / sums[-1] for i, k in enumerate(METRICS)}, "lr": lr,
                   "grad_norm": float(grad_norm), "seq_per_s": steps_in_window * c.batch_size / (now - t_window)}
            window.zero_()
            t_window, steps_in_window = now, 0
            last_row = row
            if master:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.3f}", rtd_acc=f"{row['rtd_accuracy']:.3f}",
                                mlm_acc=f"{row['mlm_accuracy']:.3f}", seq_s=f"{row['seq_per_s']:.0f}")
        if (c.save_every and n % c.save_every == 0) or n == c.steps:
            global_window = all_reduce_sum(window, world)       # the log window as one process would hold it
            if master:
                save_checkpoint({
                    "version": CHECKPOINT_VERSION,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_states(),
                    "data": {"step": n, "samples_seen": n * c.batch_size, "n_examples": len(examples)},
                    "log_window": global_window.cpu(),
                    "model_config": mcfg.to_dict(),
                    "run": run,
                    "options": dataclasses.asdict(c),
                    "tokenizer_cache": tokenizer_cache,
                }, ckpt_path)
            if world > 1:
                window.copy_(global_window if master else torch.zeros_like(window))
    bar.close()
    train_s = time.perf_counter() - t_train

    summary = None
    if master:
        disc_dir, gen_dir = os.path.join(out, "discriminator"), os.path.join(out, "generator")
        try:
            model.discriminator.save_pretrained(disc_dir)
            model.generator.save_pretrained(gen_dir)
            for d in (disc_dir, gen_dir):
                data.save_tokenizer_files(tok, d, model_max_length=mcfg.max_position_embeddings)
        except OSError as e:
            raise FastElectraError(f"could not export the trained model to {out}: {e}") from e
        first = None
        if os.path.isfile(metrics_path) and os.path.getsize(metrics_path):
            with open(metrics_path) as f:
                first = json.loads(f.readline())
        trained = c.steps - start_step
        summary = {
            "preset": c.preset, "steps": c.steps, "start_step": start_step, "world_size": world,
            "batch_size": c.batch_size, "seq_len": c.seq_len, "grad_accum": c.grad_accum, "device": str(device),
            "backend": _backend.resolve(c.backend), "compile": c.compile, "cuda_graphs": graph is not None,
            "parameters": n_params,
            "vocab_size": mcfg.vocab_size, "corpus": corpus.name, "tokenizer": tok_source,
            "tokens": examples.n_tokens, "examples": len(examples),
            "setup_s": setup_s, "train_s": train_s, "total_s": time.perf_counter() - t_start,
            "seq_per_s": trained * c.batch_size / train_s if trained else 0.0,
            "first": first, "final": last_row,
            "out": out, "checkpoint": ckpt_path, "discriminator": disc_dir, "generator": gen_dir,
        }
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    barrier(world)
    return summary


def format_summary(s: dict) -> str:
    lines = [f"pretrained ELECTRA-{s['preset']} ({s['parameters'] / 1e6:.2f}M parameters, vocab {s['vocab_size']}) "
             f"on {s['device']} x{s['world_size']}, backend {s['backend']}"
             f"{', CUDA graphs' if s.get('cuda_graphs') else ''}{', compiled' if s.get('compile') else ''}",
             f"  steps {s['start_step']}->{s['steps']}, batch {s['batch_size']} x seq {s['seq_len']}, "
             f"{s['seq_per_s']:.1f} seq/s; setup {s['setup_s']:.1f}s, training {s['train_s']:.1f}s, "
             f"total {s['total_s']:.1f}s"]
    for name in ("first", "final"):
        r = s[name]
        if r:
            lines.append(f"  {name:5s} (step {r['step']}): loss {r['loss']:.4f}, mlm_loss {r['mlm_loss']:.4f}, "
                         f"rtd_loss {r['rtd_loss']:.4f}, mlm_accuracy {r['mlm_accuracy']:.4f}, "
                         f"rtd_accuracy {r['rtd_accuracy']:.4f}")
    lines.append(f"  discriminator: {s['discriminator']}")
    lines.append(f"  generator:     {s['generator']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def _per_preset(key: str) -> str:
    """"(default: tiny 800, small 1000000, ...)": a preset default for --help."""
    return "(default: " + ", ".join(f"{name} {d[key] if isinstance(d[key], int) else format(d[key], 'g')}"
                                    for name, d in PRESET_DEFAULTS.items()) + ")"


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--preset", choices=list(PRESET_DEFAULTS), default="tiny", help="model size and its defaults (default: tiny)")
    a("--corpus", help="text file or folder of *.txt (default: the embedded Python stdlib documentation)")
    a("--tokenizer", help="HF tokenizer folder, tokenizer.json or vocab.txt (default: train a WordPiece vocab)")
    a("--vocab-size", type=int, help="size of the WordPiece vocab to train " + _per_preset("vocab_size"))
    a("--out", help="output folder (default: runs/<preset>)")
    a("--steps", type=int, help="optimizer steps " + _per_preset("steps"))
    a("--batch-size", type=int, help="global batch size (sequences per optimizer step, all GPUs together) "
      + _per_preset("batch_size"))
    a("--seq-len", type=int, help="tokens per example, [CLS] and [SEP] included " + _per_preset("seq_len"))
    a("--lr", type=float, help="peak learning rate " + _per_preset("lr") + "; with --resume: the run's")
    a("--warmup-steps", type=int, help="linear warmup steps (default: the preset's, at most steps/10; with "
      "--resume: the run's)")
    a("--dropout", type=float, help="hidden and attention dropout (default: 0.1; tiny: 0; with --resume: the run's)")
    a("--weight-decay", type=float, help=f"AdamW weight decay, not on LayerNorm weights and biases (default: "
                                          f"{DEFAULT_WEIGHT_DECAY}; with --resume: the run's)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step on each process (default: 1)")
    a("--save-every", type=int, default=1000,
      help="checkpoint every N steps (and after the last; 0: last only) (default: 1000)")
    a("--log-every", type=int, help="log metrics every N steps " + _per_preset("log_every"))
    a("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    a("--backend", choices=list(_backend.BACKENDS), default="auto",
      help="kernels: fused, eager (torch) or auto (default: auto)")
    a("--compile", action="store_true", help="torch.compile the model (as one graph)")
    a("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
      help="capture forward+backward once as a CUDA graph and replay it every micro-batch, which removes "
           "Python's launch overhead (default: on where it can run: one CUDA GPU, no --compile)")
    a("--seed", type=int, default=0, help="seed of the initialisation, data order, masking and sampling (default: 0)")
    a("--device", help="cpu or cuda (default: cuda when available)")
    a("--num-workers", type=int, default=2, help="DataLoader workers on CUDA (default: 2)")
    a("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    config = PretrainConfig(
        preset=args.preset, corpus=args.corpus, tokenizer=args.tokenizer, vocab_size=args.vocab_size, out=args.out,
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, dropout=args.dropout, weight_decay=args.weight_decay,
        grad_accum=args.grad_accum,
        save_every=args.save_every, log_every=args.log_every, resume=args.resume, backend=args.backend,
        compile=args.compile, cuda_graphs=args.cuda_graphs, seed=args.seed, device=args.device, num_workers=args.num_workers,
        progress=not args.no_progress)
    try:
        summary = pretrain(config)
    except ValueError as e:        # FastElectraError and the config's own checks
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if summary is not None:
        print(format_summary(summary))
    return 0

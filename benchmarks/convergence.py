"""Convergence parity: the pretraining loss curves of backend ``fused`` and ``eager`` agree within noise.

Per preset, three pretraining runs through the Python API (fastelectra.pretrain.pretrain) on one corpus
(default: the embedded standard-library docs) with one tokenizer, trained once and shared, logging every step:
  fused        backend fused, seed S       (Triton kernels + the _C op on CUDA; on CPU the _C op only)
  eager        backend eager, seed S       (the torch reference)
  eager-seed   backend eager, seed S + 1   (the run-to-run noise of the reference itself)
Defaults: 300 steps of tiny (batch 32) and small (batch 64, half the preset's 128, so a run takes well under
a minute on an H100), each preset's own sequence length, learning rate, warmup and dropout.

Tolerance, and why. fused and eager with the same seed start from the same weights and see the same
batches and the same masked positions (pretrain reseeds torch per micro-batch), but they draw their dropout
masks and Gumbel noise from different generators (Philox in the kernels, torch's generator in the
reference) and round differently, so after a few steps their trajectories are different samples of the
same random process: the curves cannot be bit-equal. How far apart two correct samples may be is measured,
not guessed: the eager-seed run differs from eager in *all* its random draws (initial weights, data order,
masks, dropout, sampling), so |eager - eager-seed| is the run-to-run noise of a correct implementation, and
an upper bound of what fused vs eager should show (they share weights, data and masks). The curves are
smoothed by averaging over windows of W steps (default: steps / 12); for each of mlm_loss and rtd_loss

    gap   = RMS over windows of (fused - eager)          noise = RMS over windows of (eager - eager-seed)
    pass  iff  every loss is finite  and  gap <= K * noise + FLOOR * mean(eager)

with K = 2 (the noise is estimated from one pair of runs, so it can come out low by chance) and
FLOOR = 0.2% of the loss level (so curves that are equal up to rounding pass when the noise is tiny too).
The exit status is non-zero when a preset fails. The total loss (mlm + 50 rtd) is reported, not tested: it
is a fixed combination of the two.

    python -m benchmarks.convergence --out benchmarks/results/convergence_<gpu>_<date>.json
    python -m benchmarks.convergence --device cpu --presets tiny --steps 8 --batch-size 8 --seq-len 32
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import tempfile

import torch

from fastelectra import data
from fastelectra.pretrain import PRESET_DEFAULTS, PretrainConfig, pretrain

from .common import env_info, gpu_slug, markdown_table, pyplot, require_cuda, until_interrupted, write_results

PRESETS = ("tiny", "small")
STEPS = 300
BATCH = {"tiny": 32, "small": 64, "base": 16, "large": 8}     # sequences per step (small: half the preset's)
WINDOWS = 12                # default window = steps // WINDOWS
K = 2.0                     # gap may be this many times the measured run-to-run noise
FLOOR = 0.002               # ... plus this fraction of the loss level
TESTED = ("mlm_loss", "rtd_loss")
REPORTED = ("loss",) + TESTED


def run_names(seed: int) -> dict[str, tuple[str, int]]:
    """run name -> (backend, seed)."""
    return {"fused": ("fused", seed), "eager": ("eager", seed), "eager-seed": ("eager", seed + 1)}


def window_means(values: list[float], window: int) -> torch.Tensor:
    """Means over consecutive windows of ``window`` steps (the last one may be shorter), float64."""
    return torch.stack([w.mean() for w in torch.tensor(values, dtype=torch.float64).split(window)])


def rms(x: torch.Tensor) -> float:
    return float(x.square().mean().sqrt())


def compare(fused: list[float], eager: list[float], eager_seed: list[float], window: int,
            k: float = K, floor: float = FLOOR) -> dict:
    """The criterion (module docstring) for one loss: per-step curves of equal length -> verdict and numbers."""
    if not len(fused) == len(eager) == len(eager_seed) > 0:
        raise ValueError(f"curves must be non-empty and of equal length, got {len(fused)}, {len(eager)}, "
                         f"{len(eager_seed)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    wf, we, ws = (window_means(c, window) for c in (fused, eager, eager_seed))
    finite = all(math.isfinite(v) for c in (fused, eager, eager_seed) for v in c)
    gap, noise = rms(wf - we), rms(we - ws)
    tolerance = k * noise + floor * float(we.abs().mean())
    return {"gap": gap, "noise": noise, "ratio": gap / noise if noise > 0 else None, "tolerance": tolerance,
            "finite": finite, "passed": bool(finite and gap <= tolerance),
            "windows": {"fused": wf.tolist(), "eager": we.tolist(), "eager-seed": ws.tolist()}}


def read_curves(out: str) -> dict[str, list[float]]:
    """metrics.jsonl of a run logged every step -> {"step": [...], metric: [...]}."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {k: [r[k] for r in rows] for k in ("step",) + REPORTED}


def run_preset(args, preset: str, work: str, tokenizer: str) -> dict:
    """The three runs of one preset and their comparison."""
    batch = args.batch_size or BATCH[preset]
    runs, curves = {}, {}
    for name, (backend, seed) in run_names(args.seed).items():
        out = os.path.join(work, preset, name)
        print(f"convergence: {preset} {name} (backend {backend}, seed {seed}, {args.steps} steps, batch {batch})",
              flush=True)
        summary = pretrain(PretrainConfig(
            preset=preset, corpus=args.corpus, tokenizer=tokenizer, out=out, steps=args.steps, batch_size=batch,
            seq_len=args.seq_len, backend=backend, seed=seed, device=args.device, log_every=1, save_every=0,
            progress=False))
        curves[name] = read_curves(out)
        runs[name] = {"backend": backend, "seed": seed, "seq_per_s": summary["seq_per_s"],
                      "cuda_graphs": summary["cuda_graphs"],
                      "final": {k: curves[name][k][-1] for k in REPORTED}}
    if not curves["fused"]["step"] == curves["eager"]["step"] == curves["eager-seed"]["step"]:
        raise RuntimeError(f"{preset}: the runs logged different steps")
    window = args.window or max(1, args.steps // WINDOWS)
    checks = {m: compare(curves["fused"][m], curves["eager"][m], curves["eager-seed"][m], window)
              for m in REPORTED}
    return {"preset": preset, "steps": args.steps, "batch": batch, "window": window, "runs": runs,
            "checks": checks, "passed": all(checks[m]["passed"] for m in TESTED), "curves": curves}


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        for m in REPORTED:
            c = r["checks"][m]
            rows.append({"preset": r["preset"], "steps": r["steps"], "batch": r["batch"], "window": r["window"],
                         "loss": m + ("" if m in TESTED else " (not tested)"),
                         **{f"final {n}": r["runs"][n]["final"][m] for n in r["runs"]},
                         "rms gap fused-eager": c["gap"], "rms noise eager-seed": c["noise"],
                         "tolerance": c["tolerance"], "passed": "yes" if c["passed"] else "NO"})
    return rows


def chart(results: list[dict], path: str) -> None:
    """The loss curves of every run, one panel per preset and loss (raw, thin; window means, markers)."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(len(results), len(TESTED), figsize=(6 * len(TESTED), 3.5 * len(results)),
                             squeeze=False)
    colors = {"fused": "tab:green", "eager": "tab:gray", "eager-seed": "tab:blue"}
    for row, r in zip(axes, results):
        for ax, m in zip(row, TESTED):
            for name in reversed(r["curves"]):                     # fused drawn last, on top
                curve = r["curves"][name]
                ax.plot(curve["step"], curve[m], color=colors[name], alpha=0.3, linewidth=0.8)
                ax.plot(window_means(curve["step"], r["window"]).tolist(), r["checks"][m]["windows"][name], "o-",
                        color=colors[name], label=name, markersize=3)
            verdict = "pass" if r["checks"][m]["passed"] else "FAIL"
            ax.set_title(f"ELECTRA-{r['preset']} {m} ({verdict})")
            ax.set_xlabel("step")
            ax.legend()
    env = env_info()
    fig.suptitle(f"fused vs eager · {env['gpu'] or 'cpu'} · torch {env['torch']} · {datetime.date.today()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_presets(args, work: str, results: list) -> None:
    """The three runs of each preset in ``args.presets``, compared; one result per preset appended to ``results``."""
    for preset in args.presets:
        tokenizer = args.tokenizer
        if tokenizer is None:   # one vocab for all three runs: two trainings can break ties differently
            vocab = PRESET_DEFAULTS[preset]["vocab_size"]
            tokenizer = data.get_tokenizer(None, data.resolve_corpus(args.corpus), vocab,
                                           os.path.join(work, "tokenizers"))[1]
        results.append(run_preset(args, preset, work, tokenizer))
        r = results[-1]
        print(f"convergence: {preset} " + ", ".join(
            f"{m} gap {r['checks'][m]['gap']:.4g} vs tolerance {r['checks'][m]['tolerance']:.4g}" for m in TESTED)
            + (" -> pass" if r["passed"] else " -> FAIL"), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESET_DEFAULTS))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch-size", type=int, help="sequences per step (default: tiny 32, small 64)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    ap.add_argument("--window", type=int, help=f"steps per smoothing window (default: steps // {WINDOWS})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fused and eager runs (eager-seed: +1)")
    ap.add_argument("--corpus", help="text file or folder of *.txt (default: the embedded stdlib docs)")
    ap.add_argument("--tokenizer", help="tokenizer for every run (default: a WordPiece vocab trained once)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the reference paths + the _C CPU op)")
    ap.add_argument("--work-dir", help="folder for the runs (default: a temporary folder, removed afterwards)")
    ap.add_argument("--out", help="JSON path (a .md table and a .png chart go beside it)")
    args = ap.parse_args(argv)
    if args.steps < 1 or (args.window is not None and args.window < 1):
        ap.error("--steps and --window must be >= 1")
    if args.device.startswith("cuda"):
        require_cuda("convergence")

    with tempfile.TemporaryDirectory(prefix="fastelectra-convergence-") as tmp:
        work = args.work_dir or tmp
        results, truncated = until_interrupted(run_presets, args, work)

    cols = ["preset", "steps", "batch", "window", "loss", "final fused", "final eager", "final eager-seed",
            "rms gap fused-eager", "rms noise eager-seed", "tolerance", "passed"]
    passed = bool(results) and not truncated and all(r["passed"] for r in results)
    table = markdown_table(table_rows(results), cols) + (
        f"\n\ncriterion: RMS over windows of (fused - eager) <= {K:g} x RMS of (eager - eager-seed) "
        f"+ {FLOOR:g} x loss level, for {' and '.join(TESTED)}: " + ("pass" if passed else "FAIL"))
    payload = {"benchmark": "convergence",
               "config": {"presets": args.presets, "steps": args.steps, "seed": args.seed, "device": args.device,
                          "corpus": args.corpus or "embedded stdlib docs", "gpu_slug": gpu_slug(),
                          "runs": {n: {"backend": b, "seed": s} for n, (b, s) in run_names(args.seed).items()}},
               "criterion": {"k": K, "floor": FLOOR, "tested": list(TESTED),
                             "rule": "rms_windows(fused - eager) <= k * rms_windows(eager - eager-seed) "
                                     "+ floor * mean(eager)"},
               "passed": passed, "results": results}
    write_results(args.out, payload, table, truncated)
    if args.out and results:
        chart(results, os.path.splitext(args.out)[0] + ".png")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""A model of the replace_tokens CUDA kernel's noise filter: how often a warp leaves its hot loop.

The kernel (csrc/replace_tokens_kernel.cu) reads a row with one warp, 64 bf16 vectors (octets) per
step, and tests each vector against the best exact key found so far (philox.h's filter). The vectors
that pass need their exact noise, out of line. This model draws the octets' exponentials the way the
noise layout does (the minimum E_min first, the others E_min + E'), applies the filter with the same
bounds (v <= 8 exp(y - T + margin) for the vector, then per element; the second test E_min + v' for
the others) and counts, per 30522-column row, the out-of-line work of two ways to settle the passes:

- immediate: each step and vector slot in which any lane's vector passes costs one run of the
  out-of-line path by the warp (lanes that passed do their vector; the lanes' own best keys tighten
  their next tests; the warp shares the best after the step);
- queued: passes are queued (a few instructions per step and slot with any pass) and, when a step ends
  with `batch` or more queued, the warp settles them 32 at a time, a lane per vector, against the last
  shared threshold, then shares the best key.

A run or a batch costs RUN_BASE warp instructions (fine Philox calls, E_min, the tests) plus PER_LOG for
each position of the octet whose element needs its logarithms in some lane: the warp runs a position's
logarithm once if any of its lanes needs it. The constants are rounded from the sm_90 SASS of the
out-of-line functions; the model ignores rounding (the margin covers it) and the rows' edge octets.

    python -m benchmarks.replace_filter_sim                 # batch sizes 1, 4, 16, 32; 12 rows per case
    python -m benchmarks.replace_filter_sim --batch 16 --rows 40
"""
from __future__ import annotations

import argparse

import numpy as np

__all__ = ["draw_row", "immediate", "queued", "main"]

VOCAB = 30522
LANES = 32
SLOTS = 2               # vectors per lane and step (bf16)
MARGIN = 1 / 32         # philox.h's kFilterMargin
RUN_BASE = 300          # warp instructions of one out-of-line run or batch, without logarithms
PER_LOG = 100           # ... for each octet position that needs its logarithms in some lane
ENQUEUE = 25            # one step and slot with any pass: the branch, the atomic, two stores


def draw_row(rng: np.random.Generator, kind: str) -> dict:
    """One row's octets: logits of the given kind and the exponentials of the layout."""
    n = VOCAB // 8 * 8
    if kind == "equal":
        x = np.zeros(n)
    elif kind == "n1":
        x = rng.standard_normal(n)
    elif kind == "n3":
        x = 3 * rng.standard_normal(n)
    elif kind == "peak":                            # a bulk and a few tokens far above it
        x = rng.standard_normal(n)
        x[rng.choice(n, 10, replace=False)] += 8
    else:
        raise ValueError(f"kind must be equal, n1, n3 or peak, got {kind!r}")
    e = rng.exponential(size=(n // 8, 8))
    e_min = e.min(1)
    return {"x": x.reshape(-1, 8), "e": e, "e_min": e_min, "J": e.argmin(1),
            "v": -np.expm1(-8 * e_min),                        # the min word's uniform: E0 = 8 E_min
            "v_other": -np.expm1(-(e - e_min[:, None]))}     # the others' fine words: E' = E - E_min


def _passes(d: dict, i: int, t: float) -> bool:
    return d["v"][i] <= 8 * np.exp(d["x"][i].max() - t + MARGIN)


def _settle(d: dict, i: int, t: float) -> tuple[set, float]:
    """The positions of octet i that need logarithms against threshold t, and the best key after it."""
    x, e_min, J = d["x"][i], d["e_min"][i], d["J"][i]
    logs, best = set(), t
    if d["v"][i] <= 8 * np.exp(x[J] - best + MARGIN):            # the minimum's element first
        logs.add(J)
        best = max(best, x[J] - np.log(e_min))
    for j in range(8):
        if j == J or not d["v"][i] <= 8 * np.exp(x[j] - best + MARGIN):
            continue
        if not e_min + d["v_other"][i, j] <= np.exp(x[j] - best + MARGIN):   # the second test
            continue
        logs.add(j)
        best = max(best, x[j] - np.log(d["e"][i, j]))
    return logs, best


def _first_threshold(d: dict) -> float:
    """The kernel's threshold before the loop: each lane keys its first octet's minimum element."""
    return max(d["x"][q, d["J"][q]] - np.log(d["e_min"][q]) for q in range(LANES))


def _check(d: dict, t: float) -> None:
    assert abs(t - (d["x"] - np.log(d["e"])).max()) < 1e-9, "the model lost the row's best key"


def immediate(d: dict) -> tuple[int, int]:
    """(out-of-line warp instructions, runs) of the row, settling passes as they come."""
    octets = len(d["x"])
    t = _first_threshold(d)
    lane_best = np.full(LANES, t)
    cost = runs = 0
    for s in range(0, octets, LANES * SLOTS):
        for k in range(SLOTS):
            logs, any_pass = set(), False
            for lane in range(LANES):
                i = s + k * LANES + lane
                if i >= octets:
                    continue
                t_lane = max(t, lane_best[lane])
                if _passes(d, i, t_lane):
                    any_pass = True
                    pos, best = _settle(d, i, t_lane)
                    logs |= pos
                    lane_best[lane] = max(lane_best[lane], best)
            if any_pass:
                runs += 1
                cost += RUN_BASE + PER_LOG * len(logs)
        t = max(t, lane_best.max())
    _check(d, t)
    return cost, runs


def queued(d: dict, batch: int) -> tuple[int, int]:
    """(out-of-line warp instructions, batches) of the row, queueing passes and settling by batches."""
    octets = len(d["x"])
    t = _first_threshold(d)
    queue: list[int] = []
    cost = batches = 0

    def settle():
        nonlocal t, cost, batches
        while queue:
            part, queue[:] = queue[:LANES], queue[LANES:]
            logs, best = set(), t
            for i in part:
                if _passes(d, i, t):
                    pos, b = _settle(d, i, t)
                    logs |= pos
                    best = max(best, b)
            cost += RUN_BASE + PER_LOG * len(logs)
            batches += 1
            t = best

    for s in range(0, octets, LANES * SLOTS):
        for k in range(SLOTS):
            passed = [i for i in range(s + k * LANES, min(s + (k + 1) * LANES, octets)) if _passes(d, i, t)]
            if passed:
                cost += ENQUEUE
                queue.extend(passed)
        if len(queue) >= batch:
            settle()
    settle()
    _check(d, t)
    return cost, batches


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32], help="queued: settle at this many")
    ap.add_argument("--rows", type=int, default=12, help="rows per logit kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    out = []
    print("| logits | immediate: instructions / row | runs | " +
          " | ".join(f"queued {b}: instructions / row | batches" for b in args.batch) + " |")
    print("|---|---|---|" + "---|---|" * len(args.batch))
    for kind in ("equal", "n1", "n3", "peak"):
        rows = [draw_row(rng, kind) for _ in range(args.rows)]
        now = np.mean([immediate(d) for d in rows], axis=0)
        row = {"logits": kind, "immediate": now.tolist()}
        cells = [f"{now[0]:.0f}", f"{now[1]:.1f}"]
        for b in args.batch:
            q = np.mean([queued(d, b) for d in rows], axis=0)
            row[f"queued_{b}"] = q.tolist()
            cells += [f"{q[0]:.0f}", f"{q[1]:.1f}"]
        print(f"| {kind} | " + " | ".join(cells) + " |")
        out.append(row)
    return out


if __name__ == "__main__":
    main()

"""What every benchmark shares: the environment record, GPU timing, and writing results.

Timing follows DESIGN.md: CUDA-synchronised (triton.testing.do_bench median, or CUDA events after
warm-up), random inputs (never zeros); each result carries the GPU name, versions and date so a
file under benchmarks/results/ says where its numbers came from.
"""
from __future__ import annotations

import datetime
import json
import os
import platform

import torch


def require_cuda(name: str) -> None:
    """Exit with a clear message where there is no GPU to measure on."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{name}: needs a CUDA GPU (torch {torch.__version__} sees none); "
                         "GPU benchmarks only run on a GPU machine")


def env_info() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def gpu_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def do_bench_ms(fn, warmup_ms: int = 50, rep_ms: int = 200) -> float:
    """Median time of ``fn()`` in milliseconds (CUDA-synchronised, L2 flushed between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_replay_ms(fn, calls: int = 10, replays: int = 15) -> float:
    """Median GPU milliseconds per call of ``fn()``: ``calls`` calls captured in one CUDA graph, the graph
    replayed ``replays`` times and timed with CUDA events. Host launch cost is left out: this is the
    time a CUDA-graphed (or otherwise launch-bound-free) training step spends in the calls. Raises if
    ``fn`` cannot be captured (a host sync, a CPU-side check of device values)."""
    import statistics

    from fastelectra.graphs import capture

    replay, _ = capture(lambda: [fn() for _ in range(calls)], torch.device("cuda", torch.cuda.current_device()))
    replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def bench_ms(fn) -> dict:
    """Both timings of one contender: ``ms`` = GPU time per call from CUDA-graph replays (the rate the
    kernels reach; the call-time figure where capture fails, with ``timing`` saying so) and ``ms_call`` =
    triton do_bench median of eager calls with L2 flushed (host launch overhead included where it
    exceeds the GPU work, as in an uncompiled, ungraphed loop)."""
    out = {"ms_call": do_bench_ms(fn)}
    try:
        out.update(ms=graph_replay_ms(fn), timing="cuda-graph replay")
    except Exception as err:   # not capturable: report the eager-call time and why
        torch.cuda.synchronize()
        out.update(ms=out["ms_call"], timing=f"eager calls (capture failed: {type(err).__name__})")
    return out


def add_speedups(rows: list[dict], key, ours, peer=None) -> None:
    """For every timed row (one with "ms") that ``ours(row)`` selects: row["speedup"] = {peer contender:
    peer ms / its ms} over the timed rows of the same ``key(row)`` that ``peer(row)`` selects (default:
    those not ours), all measured in the same run."""
    peer = peer or (lambda r: not ours(r))
    peers: dict = {}
    for r in rows:
        if "ms" in r and peer(r):
            peers.setdefault(key(r), {})[r["contender"]] = r["ms"]
    for r in rows:
        if "ms" in r and ours(r):
            r["speedup"] = {name: ms / r["ms"] for name, ms in peers.get(key(r), {}).items()}


def cuda_events_ms(fn, steps: int, warmup: int) -> float:
    """Mean milliseconds per call of ``fn()`` over ``steps`` calls after ``warmup`` calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def until_interrupted(fn, *args, **kwargs) -> tuple[list, bool]:
    """(rows, truncated): ``fn(*args, results=rows, **kwargs)`` appends its rows to ``rows``; a SIGINT (the
    time cap of benchmarks/run_gpu.sh sends one) ends it early instead of losing what it measured."""
    rows: list = []
    try:
        fn(*args, results=rows, **kwargs)
    except KeyboardInterrupt:
        print(f"interrupted (a time cap?): writing the {len(rows)} rows measured so far", flush=True)
        return rows, True
    return rows, False


def write_results(path: str | None, payload: dict, table: str, truncated: bool = False) -> None:
    """Print the markdown table; write ``payload`` (with env_info) as JSON and the table as .md. A
    ``truncated`` run (interrupted before its last row) is marked in both."""
    if truncated:
        payload = {**payload, "truncated": True}
        table = "**truncated: the run was interrupted before its last row**\n\n" + table
    print(table)
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"env": env_info(), **payload}, f, indent=2)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(table + "\n")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a note) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart written")
        return None
    return plt


# how bench_ms's two timings are described in each benchmark's JSON (after "ms, <rate unit>: ")
TIMING = ("GPU time per call from CUDA-graph replays; ms_call: "
          "triton.testing.do_bench median of eager calls (host overhead included)")


def one_at_a_time(module, constants: dict):
    """Sweep ``module``'s launch constants (read at each launch) one at a time from their shipped values:
    yields (name, value, shipped) with ``module.<name>`` set to ``value``, for each value of each constant
    in ``constants`` ({name: values}). Each constant is back at its shipped value before the next one
    moves, and all are on the way out, error or not."""
    shipped = {name: getattr(module, name) for name in constants}
    try:
        for name, values in constants.items():
            for value in values:
                setattr(module, name, value)
                yield name, value, value == shipped[name]
            setattr(module, name, shipped[name])
    finally:
        for name, value in shipped.items():
            setattr(module, name, value)


def skip_reason(err: Exception) -> str:
    """What a results row records for a contender that failed: the error's type and first line."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def rate_table(rows: list[dict], columns: list[str], rate: str, header: str, digits: int = 0) -> str:
    """markdown_table with column ``header`` showing each row's ``rate`` to ``digits`` decimals, or
    "skipped" where the row has none (a contender that failed or refused the case)."""
    return markdown_table([dict(r, **{header: f"{r[rate]:.{digits}f}" if rate in r else "skipped"}) for r in rows],
                          columns)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)

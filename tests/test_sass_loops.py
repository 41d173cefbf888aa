"""The dropout of the attention kernels costs no data movement between threads in the forward and dQ
loops (kernels/attention.py, "Dropout"): checked on the SASS Triton builds for sm_90, which needs no
GPU. Run in a subprocess: this test process imported Triton under TRITON_INTERPRET=1."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from benchmarks.sass_loops import _nvidia_bin  # noqa: E402


def test_dropout_adds_no_shared_memory_round_trip_to_the_forward_and_dq_loops(tmp_path):
    if not all(os.path.exists(_nvidia_bin(b)) for b in ("nvdisasm", "cuobjdump", "ptxas")):
        pytest.skip("this Triton wheel ships no nvdisasm/cuobjdump/ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, "-m", "benchmarks.sass_loops", "--json", str(out),
                    "--case", "fwd,64,64,4", "--case", "dq,64,64,4"], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True)
    rows = {(r["kernel"], r["dropout"]): r for r in json.loads(out.read_text())}
    for kernel in ("fwd", "dq"):
        with_dropout, without = rows[(kernel, True)], rows[(kernel, False)]
        assert with_dropout["loop_hgmma"] > 0, with_dropout          # the compiled tensor-core loop
        assert with_dropout["loop_sts"] == 0, with_dropout           # no layout conversion via shared memory
        assert with_dropout["spill_stores"] == 0, with_dropout
        # Philox4x32-7 for 8 keys per call + compare + select: well under twice the no-dropout loop
        assert with_dropout["loop_instructions"] < 1.6 * without["loop_instructions"], (with_dropout, without)

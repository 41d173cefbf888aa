#!/usr/bin/env bash
# Everything the GPU machine must check: build the extension, run the `gpu`-marked tests, every
# speed benchmark, and the fused-vs-eager convergence check. Logs and results are written to $RES
# (default gpu_results/) and, when $OUT is set (the device tool's return folder: at most 8 files),
# packed into $OUT/results.tgz. A failing step is logged and the script goes on; the exit status
# is non-zero if any step failed.
#
#   bash benchmarks/run_gpu.sh                    # all stages: build tests bench conv
#   STAGES="build tests" bash benchmarks/run_gpu.sh   # one stage set per call where calls are time-limited:
#   STAGES=bench bash benchmarks/run_gpu.sh           #   "build tests", then bench, then conv
#   STAGES=conv bash benchmarks/run_gpu.sh
set -uo pipefail
RES=${RES:-gpu_results}
STAGES=${STAGES:-"build tests bench conv"}
PY=${PYTHON:-python3}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
date=$(date -u +%Y%m%d)
status=0

# fastelectra.kernels and fastelectra.benchmarks exist only in an installed package (package-dir
# mappings in pyproject.toml); an editable install without the extension build takes seconds
if ! $PY -c "import fastelectra.kernels, fastelectra.benchmarks" 2>/dev/null; then
  FASTELECTRA_SKIP_EXT=1 $PY -m pip install --no-build-isolation --no-deps -e . >"$RES/install.log" 2>&1 \
    || { echo "editable install failed (see install.log)"; status=1; }
fi
if [[ " $STAGES " == *" build "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/gpu.txt"
  $PY setup.py build_ext --inplace >"$RES/build.log" 2>&1 || { echo "build failed (see build.log)"; status=1; }
  tail -3 "$RES/build.log"
  $PY -m fastelectra info | tee -a "$RES/gpu.txt"
fi
if [[ " $STAGES " == *" tests "* ]]; then
  $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml="$RES/gpu_tests.xml" 2>&1 | tail -25 | tee "$RES/gpu_tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [[ " $STAGES " == *" bench "* || " $STAGES " == *" conv "* ]]; then
  slug=$($PY -c "from benchmarks.common import gpu_slug; print(gpu_slug())")
fi
if [[ " $STAGES " == *" bench "* ]]; then
  for b in bench_layernorm bench_attention bench_replace bench_pretrain; do
    $PY -m benchmarks.$b --out "$RES/${b#bench_}_${slug}_${date}.json" >"$RES/$b.log" 2>&1 \
      || { echo "$b failed (see $b.log)"; status=1; }
    tail -12 "$RES/$b.log"
  done
fi
if [[ " $STAGES " == *" conv "* ]]; then   # 300 steps x (fused, eager, eager with another seed) x (tiny, small)
  $PY -m benchmarks.convergence --out "$RES/convergence_${slug}_${date}.json" >"$RES/convergence.log" 2>&1 \
    || { echo "convergence failed (see convergence.log)"; status=1; }
  tail -12 "$RES/convergence.log"
fi
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" -C "$RES" . && cp "$RES"/gpu_tests.txt "$OUT"/ 2>/dev/null
fi
exit $status

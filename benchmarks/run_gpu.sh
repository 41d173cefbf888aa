#!/usr/bin/env bash
# Everything the GPU machine must check, in one call: build the extension, run the `gpu`-marked
# tests, then every benchmark. Logs and results are written to $RES (default gpu_results/) and, when
# $OUT is set (the device tool's return folder: at most 8 files), packed into $OUT/results.tgz.
#
#   bash benchmarks/run_gpu.sh            # on the GPU machine, from the repository root
#   STAGES="build tests" bash benchmarks/run_gpu.sh
set -uo pipefail
RES=${RES:-gpu_results}
STAGES=${STAGES:-"build tests bench"}
PY=${PYTHON:-python3}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
date=$(date -u +%Y%m%d)
status=0

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
if [[ " $STAGES " == *" bench "* ]]; then
  slug=$($PY -c "from benchmarks.common import gpu_slug; print(gpu_slug())")
  for b in bench_layernorm bench_attention bench_replace bench_pretrain; do
    $PY -m benchmarks.$b --out "$RES/${b#bench_}_${slug}_${date}.json" >"$RES/$b.log" 2>&1 \
      || { echo "$b failed (see $b.log)"; status=1; }
    tail -12 "$RES/$b.log"
  done
fi
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" -C "$RES" . && cp "$RES"/gpu_tests.txt "$OUT"/ 2>/dev/null
fi
exit $status

#!/usr/bin/env bash
# Everything the GPU machine must check: build the extension, run the `gpu`-marked tests, every
# speed benchmark, a profiler pass over the training step, and the fused-vs-eager convergence check.
# Logs and results are written to $RES (default gpu_results/) and, when $OUT is set (the device
# tool's return folder: at most 8 files), packed into $OUT/results.tgz after every step, so a call cut
# short still returns what ran. A failing step is logged and the script goes on; the exit status is
# non-zero if any step failed. Every step is capped so that the whole script ends by $DEADLINE seconds
# (default 570: the device tool stops a command at 600 s); steps that no longer fit are skipped.
#
#   bash benchmarks/run_gpu.sh                        # all stages: build tests bench prof conv
#   STAGES="build tests" bash benchmarks/run_gpu.sh   # one stage set per call where calls are time-limited
#   STAGES=bench BENCHES="bench_attention bench_pretrain" bash benchmarks/run_gpu.sh
#   STAGES=conv bash benchmarks/run_gpu.sh
#   STAGES="build quick" bash benchmarks/run_gpu.sh   # the figures the open targets hinge on, in minutes: the
#                         graphed training step (Small, Base), attention with mask + dropout, the
#                         replacement op, the column sums (bf16, fp32), the layer-norm launch-shape
#                         sweep at N = 768, and the README's main job
#   STAGES=suite bash benchmarks/run_gpu.sh            # the tests not marked gpu (what CI runs without a GPU), here with
#                         CUDA available: kernels compiled instead of interpreted, CUDA as the default device
#   STAGES=cli bash benchmarks/run_gpu.sh              # `fastelectra pretrain --preset small`, 400 steps, as a user
#                         runs it: seq/s per 100-step window (the first includes the warm-up and capture)
#   STAGES=sweep bash benchmarks/run_gpu.sh            # the attention kernels under each autotuning candidate
#                         (bench_attention --sweep) and the column sums under each launch constant
#                         (bench_linear --sweep), the layer norm's at 16384 rows of 64, 256 and 768
#                         (bench_layernorm --sweep): the data to choose the shipped values from
# Knobs: DEADLINE, T_TESTS, T_SUITE, T_BENCH, T_CONV, T_PROF, T_QUICK, T_CLI, T_SWEEP, T_SWEEP_LINEAR, T_SWEEP_LN (caps in s;
# T_bench_<name> for one benchmark),
# PYTEST_ARGS (e.g. a test file), ARGS_bench_<name> and ARGS_profile_step (extra arguments).
set -uo pipefail
RES=${RES:-gpu_results}
STAGES=${STAGES:-"build tests bench prof conv"}
PY=${PYTHON:-python3}
# wall-clock caps (s) per stage, so that a hung or slow step cannot eat a time-limited call whole
DEADLINE=${DEADLINE:-570}
T_TESTS=${T_TESTS:-500}
T_BENCH=${T_BENCH:-150}
T_CONV=${T_CONV:-400}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
# compiled Triton kernels survive between calls when this folder travels (git-ignored)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton_cache}
date=$(date -u +%Y%m%d)
status=0
last_rc=0

# pack: what $RES holds so far goes to $OUT (cheap: logs and small JSON)
pack() {
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null
    cp "$RES"/gpu_tests.txt "$OUT"/ 2>/dev/null
  fi
  return 0
}

# run_module LOG CAP MODULE [ARGS...]: python -m MODULE ARGS, at most CAP seconds and never past the
# deadline, output in $RES/LOG.log, exit status in $last_rc; a failure, a cut (SIGINT at the cap: the
# benchmarks then write what they measured, marked truncated) or a skip is reported and remembered in
# the exit status, and the script goes on
run_module() {
  local log=$1 cap=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 25))          # 25 s: the -k grace and the packing
  if [ "$left" -lt 20 ]; then
    echo "$log skipped: too close to the ${DEADLINE} s deadline" | tee "$RES/$log.log"
    status=1 last_rc=124
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  timeout -s INT -k 20 "$cap" $PY -m "$@" >"$RES/$log.log" 2>&1
  last_rc=$?
  [ "$last_rc" -eq 0 ] || { echo "$log failed or was cut at ${cap} s (exit $last_rc, see $log.log)"; status=1; }
  pack
}

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
  pack
fi
# run_pytest LOG CAP MARKEXPR: the tests selected by a marker expression, their summary in $RES/LOG.txt
run_pytest() {
  local log=$1 cap=$2 marks=$3
  run_module "$log" "$cap" pytest -q -m "$marks" -p no:cacheprovider -rfEs \
    $($PY -c "import pytest_timeout" 2>/dev/null && echo --timeout=240) --durations=15 --junitxml="$RES/$log.xml" \
    ${PYTEST_ARGS:-}
  # (an interrupted pytest still ends with "N passed": the exit status and the banner say it was cut)
  { grep -E "^(FAILED|ERROR)|passed|failed| in [0-9.]+s|Interrupted|KeyboardInterrupt|Timeout" "$RES/$log.log" | tail -40
    echo "pytest exit status: $last_rc (0: all passed; 1: failures; 2 or 124+: interrupted or cut)"; } \
    | tee "$RES/$log.txt"
  pack
}
if [[ " $STAGES " == *" tests "* ]]; then
  run_pytest gpu_tests "$T_TESTS" gpu
fi
if [[ " $STAGES " == *" suite "* ]]; then   # the rest of the README's test command, as a user with a GPU runs it
  run_pytest suite_tests "${T_SUITE:-500}" "not gpu"
fi
if [[ " $STAGES " =~ " "(bench|quick|cli|sweep|prof|conv)" " ]]; then
  slug=$($PY -c "from benchmarks.common import gpu_slug; print(gpu_slug())")
fi
if [[ " $STAGES " == *" bench "* ]]; then
  export TRITON_PRINT_AUTOTUNING=${TRITON_PRINT_AUTOTUNING:-1}   # the winning configs, in the logs
  for b in ${BENCHES:-bench_layernorm bench_linear bench_attention bench_replace bench_pretrain}; do
    args_var=ARGS_$b   # extra arguments of one benchmark, e.g. ARGS_bench_pretrain="--presets small"
    cap_var=T_$b                   # a cap for one benchmark, e.g. T_bench_pretrain=300 (else T_BENCH)
    run_module "$b" "${!cap_var:-$T_BENCH}" benchmarks.$b ${!args_var:-} --out "$RES/${b#bench_}_${slug}_${date}.json"
    tail -12 "$RES/$b.log"
  done
fi
if [[ " $STAGES " == *" quick "* ]]; then   # first answers where device time is short (no peers but the key ones)
  run_module quick_pretrain "${T_QUICK:-300}" benchmarks.bench_pretrain --presets small base --padding full --no-compile \
    --contenders fastelectra-fused+graph fastelectra-fused fastelectra-eager+graph hf-sdpa \
    --out "$RES/pretrain_quick_${slug}_${date}.json"
  tail -8 "$RES/quick_pretrain.log"
  run_module quick_attention "${T_QUICK:-300}" benchmarks.bench_attention --shapes 32,12,512,64 \
    --cases plain mask-full+dropout --out "$RES/attention_quick_${slug}_${date}.json"
  tail -16 "$RES/quick_attention.log"
  run_module quick_replace "${T_QUICK:-300}" benchmarks.bench_replace --no-loss \
    --out "$RES/replace_quick_${slug}_${date}.json"
  tail -16 "$RES/quick_replace.log"
  run_module quick_linear "${T_QUICK:-300}" benchmarks.bench_linear --no-layers \
    --out "$RES/linear_quick_${slug}_${date}.json"
  tail -12 "$RES/quick_linear.log"
  run_module quick_layernorm_sweep "${T_QUICK:-300}" benchmarks.bench_layernorm --sweep --hidden 768 \
    --out "$RES/layernorm_sweep_${slug}_${date}.json"
  tail -16 "$RES/quick_layernorm_sweep.log"
  # the README's main job (tiny preset, embedded corpus) as a user runs it: CUDA graphs by default
  run_module main_job "${T_QUICK:-300}" fastelectra pretrain --steps 300 --log-every 100 --no-progress \
    --out /tmp/fastelectra_main_job          # checkpoints and token cache stay out of the results
  cp /tmp/fastelectra_main_job/summary.json "$RES/main_job_summary.json" 2>/dev/null && pack
  tail -6 "$RES/main_job.log"
fi
if [[ " $STAGES " == *" cli "* ]]; then   # what a user of `fastelectra pretrain --preset small` gets, per log window
  # (the first window holds the warm-up, autotuning and graph capture; later ones are steady). The embedded
  # corpus yields a ~11k-token vocab, not bench_pretrain's 30522: a smaller LM head than the benchmark's
  run_module cli_small "${T_CLI:-240}" fastelectra pretrain --preset small --steps 400 --log-every 100 \
    --save-every 0 --no-progress --out /tmp/fastelectra_cli_small
  cp /tmp/fastelectra_cli_small/metrics.jsonl "$RES/cli_small_metrics_${slug}_${date}.jsonl" 2>/dev/null
  cp /tmp/fastelectra_cli_small/summary.json "$RES/cli_small_summary_${slug}_${date}.json" 2>/dev/null && pack
  tail -6 "$RES/cli_small.log"
fi
if [[ " $STAGES " == *" sweep "* ]]; then   # one autotuning candidate at a time, fwd alone and fwd+bwd
  run_module attention_sweep "${T_SWEEP:-400}" benchmarks.bench_attention --sweep \
    --out "$RES/attention_sweep_${slug}_${date}.json"
  tail -60 "$RES/attention_sweep.log"
  run_module linear_sweep "${T_SWEEP_LINEAR:-240}" benchmarks.bench_linear --sweep \
    --out "$RES/linear_sweep_${slug}_${date}.json"
  tail -40 "$RES/linear_sweep.log"
  # the layer norm at ELECTRA-Small's rows (generator 64, discriminator 256) and Base's width
  run_module layernorm_sweep_small "${T_SWEEP_LN:-150}" benchmarks.bench_layernorm --sweep --rows 16384 \
    --hidden 64 256 768 --out "$RES/layernorm_sweep_rows16384_${slug}_${date}.json"
  tail -40 "$RES/layernorm_sweep_small.log"
fi
if [[ " $STAGES " == *" prof "* ]]; then   # where a training step's GPU time goes
  run_module profile "${T_PROF:-$T_BENCH}" benchmarks.profile_step ${ARGS_profile_step:-} \
    --out "$RES/profile_${slug}_${date}.json"
  grep -E "^## |^wall" "$RES/profile.log"
fi
if [[ " $STAGES " == *" conv "* ]]; then   # 300 steps x (fused, eager, eager with another seed) x (tiny, small)
  run_module convergence "$T_CONV" benchmarks.convergence --out "$RES/convergence_${slug}_${date}.json"
  tail -12 "$RES/convergence.log"
fi
pack
exit $status

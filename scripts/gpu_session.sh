#!/usr/bin/env bash
# Everything a GPU session measures, in stages that each fit one 10-minute device call. Logs and JSON land in
# $OUT (the device tool's output folder) or ./gpu_out. Run the stages back to back so the machine stays warm and
# torch.compile's cache is reused:
#   scripts/gpu_session.sh check     # versions, sm_90 kernel report, the gpu test tier (graphs, bf16 rule, memory)
#   scripts/gpu_session.sh model     # W1 (bench_model) and W5 (bench_kernels)
#   scripts/gpu_session.sh steer     # W2–W4 (bench_steer)
#   scripts/gpu_session.sh profile   # the profiler for W2 and W3 shapes with NVML telemetry
#   scripts/gpu_session.sh table     # RESULTS.md record from the benchmark JSON files of the stages above;
#                                    # with the device tool each call's $OUT starts empty, so run this stage
#                                    # where the files were fetched: OUT=<folder with bench_*.json> scripts/...
#   scripts/gpu_session.sh tune      # W5 fused-op bandwidth with 8 and with 16 warps per row-kernel launch
# No install step: the GPU image has torch, triton and the test/bench dependencies; this checkout is put on the path.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BENCH="-p no:cacheprovider -q --benchmark-only --benchmark-columns=median,rounds"
case "${1:-check}" in
  check)
    $PY -m mfm_fast info 2>&1 | tee "$OUT/info.txt"
    $PY -m mfm_fast kernels --model MFM-XL/2 --dtype bf16 fp32 --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1
    tail -3 "$OUT/kernels.txt"
    $PY -m pytest tests -m gpu -p no:cacheprovider -q -rs 2>&1 | tee "$OUT/gpu_tests.txt"
    ;;
  model)
    $PY -m pytest benchmarks/bench_model.py benchmarks/bench_kernels.py $BENCH \
      --benchmark-json="$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.txt"
    ;;
  steer)
    $PY -m pytest benchmarks/bench_steer.py $BENCH --benchmark-json="$OUT/bench_steer.json" 2>&1 \
      | tee "$OUT/bench_steer.txt"
    ;;
  profile)
    $PY -m mfm_fast profile --model MFM-XL/2 --states 8 --particles 32 --steps 8 \
      --paths fast,ref,compile,compile-ro --w4-search 1024 --json "$OUT/profile_w2.json" 2>&1 | tee "$OUT/profile.txt"
    $PY -m mfm_fast profile --model MFM-XL/2 --states 1 --particles 4 --steps 32 \
      --paths fast,ref,compile,compile-ro --json "$OUT/profile_w3.json" 2>&1 | tee -a "$OUT/profile.txt"
    ;;
  table)
    files=$(ls "$OUT"/bench_*.json 2>/dev/null)
    [ -n "$files" ] || { echo "no $OUT/bench_*.json: run the model and steer stages first" >&2; exit 2; }
    # shellcheck disable=SC2086
    $PY benchmarks/results_table.py $files \
      --command "scripts/gpu_session.sh model && scripts/gpu_session.sh steer" | tee "$OUT/results.md"
    ;;
  tune)
    for w in 8 16; do
      MFM_FAST_ROW_WARPS=$w $PY -m pytest benchmarks/bench_kernels.py $BENCH -k "fast or eager" \
        --benchmark-json="$OUT/tune_w$w.json" > "$OUT/tune_w$w.txt" 2>&1
      echo "== MFM_FAST_ROW_WARPS=$w"
      $PY benchmarks/results_table.py "$OUT/tune_w$w.json" --command "MFM_FAST_ROW_WARPS=$w bench_kernels" \
        | grep -E "^\| (ln_modulate|gate_residual|input_stage)"
    done 2>&1 | tee "$OUT/tune.txt"
    ;;
  *)
    echo "usage: $0 check|model|steer|profile|table|tune" >&2
    exit 2
    ;;
esac

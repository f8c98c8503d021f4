#!/usr/bin/env bash
# One command for a GPU machine: the checks of the MTA step, the CUDA test suite, the FSDP resume
# test, one distillation step end to end, the op sweep, then a summary printed last. Uses only torch, triton, transformers and pytest from the
# image; the package is imported from the source tree (PYTHONPATH=.), nothing is installed.
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh                  # on the GPU machine
#   MTA_GPU_CHECK_CPU=1 OUT=/tmp/x bash benchmarks/gpu_check.sh      # CPU dry run of the plumbing
#
# Wall time stays under MTA_GPU_CHECK_TOTAL_S (default 450 s): the tests and the step are capped
# (environment 60, step checks 80, tests 120, FSDP 75, end-to-end 90: 425 s at worst, plus 25 s
# kept for the summary), the sweep gets what is left (its --budget-s stops adding shapes, a hard cap stops the rest);
# rows are appended as they are measured, so a cut sweep keeps what it measured.
# Writes flat under $OUT: ops_<card>.csv, e2e_<card>.csv, device_peaks_<card>.json, summary.md,
# gpu_check.log. Exits 0 even when a step fails; the summary lists each step's exit status and the
# OOM/ERROR rows. The device copy has no .git: set MTA_COMMIT=<hash> to stamp the rows.
set -u
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 0
PY=${PYTHON:-python3}
# absolute: the torchrun workers of the FSDP test start in other folders
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
TOTAL_S=${MTA_GPU_CHECK_TOTAL_S:-450}
TEST_S=${MTA_GPU_CHECK_TEST_S:-120}
E2E_S=${MTA_GPU_CHECK_E2E_S:-90}
FSDP_S=${MTA_GPU_CHECK_FSDP_S:-75}
RESERVE_S=25 # rendering the summary, and the margin of the sweep's hard cap
LOG=$OUT/gpu_check.log
STEP_OUT=$(mktemp)
trap 'rm -f "$STEP_OUT"' EXIT
: >"$LOG"
start=$SECONDS
steps=()

if [[ -n ${MTA_GPU_CHECK_CPU:-} ]]; then
  device=cpu
  e2e_args=(--preset tiny)
  sweep_args=(--quick --dtypes fp32 --compile-backend eager)
else
  device=cuda
  e2e_args=(--preset paper)
  sweep_args=()
fi

# run_step NAME CAP_S CMD...: run CMD for at most CAP_S seconds, output to the terminal and the log.
run_step() {
  local name=$1 cap=$2 rc note=""
  shift 2
  echo "=== $name (cap ${cap} s, started at $((SECONDS - start)) s)" | tee -a "$LOG"
  : >"$STEP_OUT" # this step's output only
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG" "$STEP_OUT"
  rc=${PIPESTATUS[0]}
  [[ $rc == 124 || $rc == 137 ]] && note=" (time cap reached)"
  steps+=("$name: exit $rc$note after $((SECONDS - start)) s")
}

run_step environment 60 "$PY" -c '
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton",
      triton.__version__)
try:
    import transformers
    print("transformers", transformers.__version__)
except ImportError:
    print("transformers: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
else:
    print("no CUDA device")
'

# The checks of the MTA step named one by one in the summary (they also run on CPU, the CUDA-only
# ones skipped there): bf16 at the paper shape against float64 with outlier channels and NaN
# padding, teacher = student + 1e-2, CUDA-graph replay, 100 bitwise-equal steps, one compiled
# graph for five batch shapes.
STEP_CHECKS=(
  tests/test_loss.py::test_bf16_paper_shape_with_outliers_and_nan_padding
  tests/test_structural_loss.py::test_nearly_equal_geometry
  tests/test_loss.py::test_step_replays_from_a_cuda_graph
  tests/test_loss.py::test_repeated_steps_are_bitwise_equal
  tests/test_compile.py::test_mta_step_compiles_once_across_batch_shapes
)
deselect=()
for check in "${STEP_CHECKS[@]}"; do deselect+=(--deselect "$check"); done
run_step "MTA step checks" 80 "$PY" -m pytest "${STEP_CHECKS[@]}" -v -rfEs -p no:cacheprovider \
  --benchmark-disable
checks_lines=$(grep -E '(PASSED|FAILED|ERROR|SKIPPED)' "$STEP_OUT" | grep '::' | sed 's/ *\[ *[0-9]*%\]//')

run_step "CUDA tests" "$TEST_S" "$PY" -m pytest tests -m "cuda or kernels" -q -rfEs -p no:cacheprovider \
  --benchmark-disable --ignore=tests/test_fsdp.py "${deselect[@]}"
tests_line=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$STEP_OUT" | tail -n 1)

# Two torchrun launches of the trainer under accelerate's FSDP: capped apart so that a slow start
# cannot eat the kernel tests' time.
run_step "FSDP resume test" "$FSDP_S" "$PY" -m pytest tests/test_fsdp.py -m cuda -q -rfEs \
  -p no:cacheprovider
fsdp_line=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$STEP_OUT" | tail -n 1)

run_step "end-to-end step" "$E2E_S" "$PY" -m benchmarks.bench_e2e --device "$device" \
  --out-dir "$OUT" "${e2e_args[@]}"

left=$((TOTAL_S - (SECONDS - start) - RESERVE_S))
if ((left > 30)); then
  run_step "op sweep" "$left" "$PY" -m benchmarks.bench_ops --device "$device" --out-dir "$OUT" \
    --budget-s $((left - 20)) "${sweep_args[@]}"
else
  steps+=("op sweep: skipped, ${left} s left")
fi

run_step summary 60 "$PY" -m benchmarks.render --results "$OUT" --summary "$OUT/summary.md"
{
  echo
  echo "## gpu_check steps"
  echo
  for step in "${steps[@]}"; do echo "- $step"; done
  echo "- MTA step checks:"
  while IFS= read -r line; do [[ -n $line ]] && echo "  - $line"; done <<<"${checks_lines:-no result lines}"
  echo "- tests: ${tests_line:-no pytest summary line}"
  echo "- FSDP test: ${fsdp_line:-no pytest summary line}"
  echo "- total: $((SECONDS - start)) s; full log: gpu_check.log"
} >>"$OUT/summary.md"
echo
cat "$OUT/summary.md"
exit 0

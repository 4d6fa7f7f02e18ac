#!/usr/bin/env bash
# Build, test and benchmark on a CUDA machine: bench/gpu_check.sh OUTDIR
#
# Installs sar_fast (editable, CUDA kernels for sm_90), runs the test suite, runs every
# bench/bench_*.py with --out, and records the environment. It never stops early: each
# step's exit code goes to OUTDIR/status.txt and the script carries on.
#
# OUTDIR receives six files:
#   log.txt               everything printed by every step
#   status.txt            one line per step: name, exit code, seconds
#   junit.xml             pytest results
#   bench_results.json    {"<file name>": <parsed JSON>, ...} of every JSON a bench wrote
#   bench_results.tar.gz  everything the benches wrote (JSON, plots)
#   env.txt               nvidia-smi, toolkit, python and package versions
#
# Knobs (environment): TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default nproc),
# GPU_CHECK_BUILD_TIMEOUT / GPU_CHECK_PYTEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT (seconds,
# defaults 300 / 300 / 120), GPU_CHECK_PYTEST_ARGS (extra pytest arguments, e.g. "-k cuda"),
# GPU_CHECK_BENCHES (space-separated bench scripts; default bench/bench_*.py),
# GPU_CHECK_QUICK (default 1: --quick for the benches that have it; 0 for the full grids),
# GPU_CHECK_COMPILE_ARCHS (compile report archs, default this GPU's, e.g. 90),
# GPU_CHECK_COMPILE_TIMEOUT (seconds, default 150),
# PYTHON (default python).
set -u

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUTDIR="$1"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
BUILD_TIMEOUT="${GPU_CHECK_BUILD_TIMEOUT:-300}"
PYTEST_TIMEOUT="${GPU_CHECK_PYTEST_TIMEOUT:-300}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-120}"
BENCH_SCRATCH="$(mktemp -d)"

exec > >(tee -a "$OUTDIR/log.txt") 2>&1
TEE_PID=$!
: > "$OUTDIR/status.txt"

# run_step NAME TIMEOUT CMD...: run, log, record exit code (also in LAST_CODE) and
# duration; never aborts.
LAST_CODE=0
run_step() {
  local name="$1" limit="$2"
  shift 2
  echo "=== [$(date -u +%H:%M:%S)] ${name}: $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local code=$?
  local note=""
  if [[ $code -eq 124 || $code -eq 137 ]]; then
    note=" (timed out after ${limit} s)"
  fi
  echo "=== ${name}: exit ${code}${note}, $((SECONDS - start)) s"
  printf '%s\texit=%s\t%ss%s\n' "$name" "$code" "$((SECONDS - start))" "$note" >> "$OUTDIR/status.txt"
  LAST_CODE=$code
  return 0
}

# Re-pack after every bench, so a run cut short still returns what finished.
pack_bench_results() {
  tar -czf "$OUTDIR/bench_results.tar.gz" -C "$BENCH_SCRATCH" . 2>/dev/null
  "$PYTHON" - "$BENCH_SCRATCH" "$OUTDIR/bench_results.json" <<'PY'
import json, pathlib, sys
root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {}
for path in sorted(root.rglob("*.json")):
    try:
        merged[str(path.relative_to(root))] = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        merged[str(path.relative_to(root))] = {"unreadable": str(err)}
out.write_text(json.dumps(merged, indent=1))
PY
}

echo "gpu_check: OUTDIR=$OUTDIR TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

# --no-deps: the machine may be offline; torch and friends are expected to be installed.
run_step install "$BUILD_TIMEOUT" "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
run_step extension_check 60 "$PYTHON" -c "
from sar_fast._C_loader import cuda_compiled, load_extension
import torch
load_extension()
print('cuda available:', torch.cuda.is_available(), '| CUDA kernels compiled:', cuda_compiled())
assert cuda_compiled(), 'sar_fast._C was built without CUDA kernels'
"

# shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS is a list of words on purpose
run_step pytest "$PYTEST_TIMEOUT" "$PYTHON" -m pytest -q tests \
  --junitxml="$OUTDIR/junit.xml" -p no:cacheprovider ${GPU_CHECK_PYTEST_ARGS:-}

# Static numbers next to the measured ones: the compile report (registers, spills, shared
# memory, tensor cores of every Triton variant; bf16 for this GPU's arch unless
# GPU_CHECK_COMPILE_ARCHS says otherwise) and the modeled work (tile fractions, rooflines).
COMPILE_ARCHS="${GPU_CHECK_COMPILE_ARCHS:-$("$PYTHON" -c "import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)" 2>/dev/null || echo 90)}"
run_step compile_report "${GPU_CHECK_COMPILE_TIMEOUT:-150}" "$PYTHON" bench/compile_report.py \
  --arch "$COMPILE_ARCHS" --dtypes bf16 --jobs "$MAX_JOBS" --out "$BENCH_SCRATCH/compile_report"
run_step modeled_work 120 "$PYTHON" bench/modeled_work.py --out "$BENCH_SCRATCH/modeled_work"
pack_bench_results

failed_benches=()
benches="${GPU_CHECK_BENCHES:-$(ls bench/bench_*.py 2>/dev/null)}"
for bench in $benches; do
  name="$(basename "$bench" .py)"
  mkdir -p "$BENCH_SCRATCH/$name"
  extra=()
  # GPU_CHECK_QUICK=1 (default) passes --quick to the benches that offer it, so the whole
  # check (build + GPU tests + every bench) takes about 10 minutes on one GPU
  if [[ "${GPU_CHECK_QUICK:-1}" == "1" ]] && grep -q -- '"--quick"' "$bench"; then
    extra+=(--quick)
  fi
  run_step "$name" "$BENCH_TIMEOUT" "$PYTHON" "$bench" --out "$BENCH_SCRATCH/$name" "${extra[@]}"
  if [[ $LAST_CODE -ne 0 ]]; then
    failed_benches+=("$name")
  fi
  pack_bench_results
done
if [[ -z "$benches" ]]; then
  echo "no bench/bench_*.py found"
fi
pack_bench_results
echo "failed benches: ${failed_benches[*]:-none}" | tee -a "$OUTDIR/status.txt"

{
  echo "### date";        date -u
  echo "### host";        uname -a; echo "cpus: $(nproc)"
  echo "### nvidia-smi";  nvidia-smi 2>&1
  echo "### nvidia-smi -q (clocks, power, memory)"
  nvidia-smi -q -d CLOCK,POWER,MEMORY 2>&1 | head -n 120
  echo "### nvcc";        nvcc --version 2>&1
  echo "### python";      "$PYTHON" --version 2>&1
  echo "### torch"
  "$PYTHON" -c "
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print('capability', torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
" 2>&1
  echo "### packages"
  "$PYTHON" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|numpy|ninja|pybind11|nvidia-ml-py|pytest|hypothesis|sar.fast) ' 
  echo "### git";         git rev-parse HEAD 2>&1; git status --short 2>&1 | head -n 20
} > "$OUTDIR/env.txt" 2>&1

echo "=== status"
cat "$OUTDIR/status.txt"
rm -rf "$BENCH_SCRATCH"
exec >&- 2>&-  # let tee write out the rest of log.txt before the script ends
wait "$TEE_PID" 2>/dev/null
exit 0

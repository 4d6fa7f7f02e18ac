#!/usr/bin/env bash
# CI stage "torch 2.11 / triton 3.6 / Python 3.12 (CPU)", run by .ci/run after the main pytest
# stage (also on its own: `bash .ci/torch2.11.sh` from the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
export SAR_FAST_CI=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# The lent GPU's image (Python 3.12, torch 2.11.0, triton 3.6.0) rebuilt on the CPU, so the
# package, its tests and the trainer keep working there, not only on the pin above. Pins:
# .ci/constraints-torch2.11.txt (numpy < 2.4 for triton 3.6's interpreter, setuptools < 82
# for torch 2.11); pip refuses anything that would replace them.
# Time, measured 2026-12-02 on the shared 2-core machine under load from four other jobs:
# first run 34.9 min wall (fresh venv: ~3 GB download; 12.6 min of CPU time); with the venv
# kept 17.7 min wall (extension build for sm_90 ~9 min of it under that load, pytest 6.8 min,
# compile report 0.7 min). Quiet, expect less than that; the whole CI (~13 min before this
# stage) has to stay under 30 min on 2 cores, hence the subset:
# - op tests under the interpreter: the Triton ops (attention, fused CE/KL, scale shift),
#   the backend dispatch, the extension's ops (quantiser, sampler) built against 2.11, and
#   torch.compile(fullgraph=True) of the ops (dynamo differs most between releases);
# - the trainer: 1 == 2 == 4 ranks (with micro-batches), collectives per step under both
#   reshard policies, HSDP, the FSDP2 probe and its public fallback (forced, with its
#   collective counts), two torchrun "nodes" of two against one of four, the private-API
#   fences, the memory estimate's
#   reshard policy (the parts that touch FSDP2 and dynamo, which differ between releases;
#   the rest of the suite is release-independent Python and stays on the pin only);
# - the compile report's CI subset for sm_90 (the lent H200) in bf16 with triton 3.6's own
#   compiler: sm_80 and fp16/fp32 stay on the pin's full report.
# Python 3.12: python3.12 on PATH if it runs (a pyenv shim may exist but refuse to run it),
# else pyenv's own build of it
py312=""
for candidate in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  if [[ -n "$candidate" && -x "$candidate" ]] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    py312="$candidate"
    break
  fi
done
if [[ -z "$py312" ]]; then
  echo "the torch 2.11 stage needs Python 3.12: no working python3.12 on PATH nor in pyenv's versions" >&2
  exit 1
fi
echo "Python 3.12: ${py312}"
# kept outside the clone, so a later CI run on this machine reuses it: pip then only checks
# the pins (the first run downloads torch 2.11 with its CUDA libraries, ~3 GB)
venv211="${SAR_FAST_VENV211:-${XDG_CACHE_HOME:-$HOME/.cache}/sar_fast/venv-torch2.11}"
"$py312" -m venv "$venv211"
py211="${venv211}/bin/python"
"$py211" -m pip install -c .ci/constraints-torch2.11.txt torch==2.11.0 "numpy<2.4" "setuptools>=70.1,<82" wheel
# the C++/CUDA extension built against 2.11, for the lent GPU's sm_90 only; with every extra,
# and without the torch/triton pins: the package's own requirements must keep torch 2.11.0
# (eval brings torchvision through torch-fidelity; unpinned, pip replaced torch with a newer
# release), which tests/test_install.py checks below
grep -v -E '^(torch|triton)==' .ci/constraints-torch2.11.txt > "${venv211}/constraints-no-torch.txt"
TORCH_CUDA_ARCH_LIST="9.0" "$py211" -m pip install --no-build-isolation -c "${venv211}/constraints-no-torch.txt" \
  -e '.[test,train,eval]'
SAR_FAST_EXPECT_TORCH=2.11.0 "$py211" -m pytest -q tests/test_install.py
"$py211" - <<'PY'
import numpy, torch, triton
from sar_fast._C_loader import load_extension

assert (torch.__version__.split("+")[0], triton.__version__) == ("2.11.0", "3.6.0"), (torch.__version__, triton.__version__)
load_extension()
print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__, "- sar_fast._C loaded")
PY
"$py211" -m pytest -q tests/test_attention.py tests/test_cross_entropy.py tests/test_scale_shift.py \
  tests/test_ops_api.py tests/test_quantize.py tests/test_sample_op.py tests/test_torch_compile.py \
  tests/test_fsdp_policy.py \
  tests/test_train.py::test_one_rank_equals_two_ranks \
  tests/test_train.py::test_label_dropout_and_drop_path_do_not_depend_on_ranks_or_accumulation \
  tests/test_train.py::test_gradient_accumulation_matches_one_big_batch \
  tests/test_train_scale.py::test_one_gather_and_one_reduce_per_unit_per_step \
  tests/test_train_scale.py::test_pass_policy_gathers_per_pass \
  tests/test_train_scale.py::test_hsdp_mesh_trains_like_fsdp \
  tests/test_train_scale.py::test_public_fallback_trains_alike_with_one_gather_per_step \
  tests/test_multinode.py tests/test_torch_api_audit.py \
  tests/test_memory.py::test_estimate_drives_the_reshard_policy_of_the_step
cr_out="$(mktemp -d)"
"$py211" bench/compile_report.py --arch 90 --dtypes bf16 --head-dims 64,128 --subset ci --no-quantiser \
  --out "$cr_out"
rm -rf "$cr_out"
# the GPU first-contact script under the image's versions (python3 there is this venv's)
gpu_first_out="$(mktemp -d)"
PYTHON3="$py211" bash bench/gpu_first.sh "$gpu_first_out" --dry-run
rm -rf "$gpu_first_out"

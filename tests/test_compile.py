"""The Triton kernels compile for sm_80 and sm_90 at the d16 shapes (bf16), fit shared memory,
spill no registers and run their GEMMs on tensor cores -- checked without a GPU.

Every variant the ops launch (every kept autotune config) is compiled by bench/compile_report.py
(imported, not copied) in spawned worker processes with TRITON_INTERPRET unset, whatever
conftest set for the interpreter tests. About 1 minute on 2 quiet cores (up to 6 under load);
SAR_FAST_SKIP_COMPILE=1 skips it, SAR_FAST_COMPILE_KERNELS=_fwd_kernel,... narrows it to some
kernels while working on them.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import compile_report  # noqa: E402

# sm_100 is in the full report (bench/compile_report.py --arch 80,90,100); CI keeps the two
# archs the no-spill rule covers. Head dims: the d16..d30 models' 64 and the widest, 128.
CI_ARCHS = (80, 90)
CI_HEAD_DIMS = (64, 128)
ONLY_KERNELS = [k for k in os.environ.get("SAR_FAST_COMPILE_KERNELS", "").split(",") if k] or None


def _nvidia_backend() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not os.path.exists(compile_report._nvidia_bin("cuobjdump")) and shutil.which("cuobjdump") is None:
        return "no cuobjdump (triton's NVIDIA backend tools)"
    if os.environ.get("SAR_FAST_SKIP_COMPILE") == "1":
        return "SAR_FAST_SKIP_COMPILE=1"
    return None


pytestmark = pytest.mark.skipif(_nvidia_backend() is not None, reason=str(_nvidia_backend()))


@pytest.fixture(scope="module")
def bf16_matrix():
    return compile_report.run_matrix(CI_ARCHS, ["bf16"], CI_HEAD_DIMS, jobs=2, progress=False,
                                     kernels=ONLY_KERNELS, subset="ci")


def test_every_op_kernel_is_in_the_matrix(bf16_matrix):
    """A kernel the recording misses would pass every other check vacuously."""
    if ONLY_KERNELS:
        pytest.skip("SAR_FAST_COMPILE_KERNELS narrows the matrix")
    seen = {(r["arch"], r["kernel"]) for r in bf16_matrix}
    kernels = set(compile_report.GEMM_KERNELS) | {"_bwd_delta_kernel", "_scale_shift_fwd_kernel",
                                                 "_scale_shift_bwd_kernel"}
    missing = sorted((a, k) for a in CI_ARCHS for k in kernels if (a, k) not in seen)
    assert not missing, f"kernels never launched by the recorded ops: {missing}"
    cached = [r for r in bf16_matrix if "cached_attention" in r["op"] or any("cached" in o for o in r["ops"])]
    assert cached, "the KV-cache attention path was not recorded"


def test_bf16_sm80_sm90_compile_fit_no_spill_tensor_cores(bf16_matrix):
    bad = compile_report.failures(bf16_matrix)
    assert not bad, f"{len(bad)} of {len(bf16_matrix)} variants fail:\n" + "\n".join(bad)


def _tiles(request) -> tuple:
    """(BLOCK_M or BLOCK_N, BLOCK_N or BLOCK_V, [BLOCK_K,] warps, stages) of a request's config."""
    parts = dict(p.split("=") for p in request.config.split() if "=" in p)
    warps, stages = re.fullmatch(r"w(\d+)s(\d+)", request.config.split()[-1]).groups()
    names = ("BLOCK_M", "BLOCK_N") if "BLOCK_M" in parts else ("BLOCK_N", "BLOCK_V", "BLOCK_K")
    return (*(int(parts[n]) for n in names), int(warps), int(stages))


def test_each_dtype_launches_its_own_list():
    """Through the ops' own launch code and Triton's autotuner: fp32 inputs ask for exactly the
    fp32 lists' tiles, bf16 inputs for the 16-bit lists' (per arch family, head dim 128)."""
    from sar_fast.kernels import _tuning
    from sar_fast.kernels import attention as att
    from sar_fast.kernels import attention_backward as att_bwd
    from sar_fast.kernels import cross_entropy as ce
    tables = {"_fwd_kernel": [(att.FWD_CONFIGS, att.FWD_FP32_CONFIGS), (att.CACHED_CONFIGS, att.CACHED_FP32_CONFIGS)],
              "_bwd_dkdv_kernel": [(att_bwd.DKDV_CONFIGS, att_bwd.DKDV_FP32_CONFIGS)],
              "_bwd_dq_kernel": [(att_bwd.DQ_CONFIGS, att_bwd.DQ_FP32_CONFIGS)],
              "_ce_forward_kernel": [(ce.CE_FORWARD_CONFIGS, ce.CE_FORWARD_FP32_CONFIGS)],
              "_kl_forward_kernel": [(ce.KL_FORWARD_CONFIGS, ce.KL_FORWARD_FP32_CONFIGS)],
              "_grad_logits_kernel": [(ce.GRAD_LOGITS_CONFIGS, ce.GRAD_LOGITS_FP32_CONFIGS)]}
    requests = compile_report.record_requests(CI_ARCHS, ["bf16", "fp32"], [128])
    for arch in CI_ARCHS:
        for dtype in ("bf16", "fp32"):
            for kernel, pairs in tables.items():
                want = set()
                for half, full in pairs:
                    table = full if dtype == "fp32" else half
                    entries = table[_tuning.family(arch, list(table))]
                    is_attention = kernel.startswith(("_fwd", "_bwd"))
                    want |= {e[:4] if is_attention else e for e in entries
                             if not is_attention or att._admits_head_dim(e, {"HEAD_DIM": 128})}
                got = {_tiles(r) for r in requests if (r.arch, r.dtype, r.kernel) == (arch, dtype, kernel)}
                assert got == want, (arch, dtype, kernel, sorted(got), sorted(want))


def test_failures_names_each_violation():
    """The checks themselves: a spill, an overflow, an error and a missing tensor core are reported."""
    base = dict(arch=80, kernel="_fwd_kernel", dtype="bf16", config="c", ok=True, error="", shared=1000,
                smem_limit=compile_report.SMEM_LIMIT[80], registers=255, stack=0, tensor_cores="mma.sync")
    assert compile_report.failures([base]) == []
    cases = {"spill": dict(stack=64), "shared memory": dict(shared=200 * 1024),
             "compile error": dict(ok=False, error="boom"), "tensor cores": dict(tensor_cores="none")}
    for what, change in cases.items():
        bad = compile_report.failures([{**base, **change}])
        assert len(bad) == 1 and bad[0].startswith(what), (what, bad)
    # sm_100 is held to compiling and fitting, fp32 (IEEE products) to no tensor cores
    assert compile_report.failures([{**base, "arch": 100, "stack": 64, "tensor_cores": "tcgen05"}]) == []
    assert compile_report.failures([{**base, "dtype": "fp32", "tensor_cores": "none"}]) == []
    # a stack ACCEPTED_STACK allows: only under its Triton release, and only up to its bytes
    (release, arch, kernel, config), allowed = next(iter(compile_report.ACCEPTED_STACK.items()))
    accepted = {**base, "arch": arch, "kernel": kernel, "config": config, "stack": allowed}
    assert compile_report.failures([{**accepted, "triton": f"{release}.0"}]) == []
    assert len(compile_report.failures([{**accepted, "triton": "9.9.0"}])) == 1
    assert len(compile_report.failures([{**accepted, "triton": f"{release}.0", "stack": allowed + 8}])) == 1
    # ... unless torch asked for TF32 products
    bad = compile_report.failures([{**base, "dtype": "fp32", "config": "c TF32", "tensor_cores": "none"}])
    assert len(bad) == 1 and bad[0].startswith("tensor cores"), bad


def test_ptxas_parser():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]"""
    (row,) = compile_report.parse_ptxas(text)
    assert row == dict(kernel="_Z3fooPf", arch=90, registers=40, stack=16, spill_stores=8, spill_loads=4,
                       shared=4096)
    bad = compile_report.failures([], {"ok": True, "error": "", "rows": [row]})
    assert len(bad) == 1 and "quantiser spill" in bad[0]


def test_kernel_lookup_without_triton_registry_finds_every_kernel_in_a_fresh_process():
    """triton 3.6 has no JIT-function registry: the report then collects the kernels from
    sar_fast.kernels, and a fresh worker process may not have imported every module yet."""
    import subprocess
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import compile_report as cr; "
            "print(sorted(n.split(':')[1] for n in map(cr._jit_name, cr._kernel_jit_functions())))")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "bench")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    names = set(eval(res.stdout.strip().splitlines()[-1]))  # a printed list of str
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_grad_logits_kernel", "_kl_forward_kernel"):
        assert kernel in names, (kernel, sorted(names))

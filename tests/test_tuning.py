"""Autotune config lists per architecture and dtype (kernels/_tuning.py): which list a launch
is tuned over, and that every launch the ops can make keeps at least one config (that fits the
arch's shared memory)."""
import os
import sys

import pytest
import torch
import triton

from sar_fast.kernels import _tuning
from sar_fast.kernels import attention as att
from sar_fast.kernels import attention_backward as att_bwd
from sar_fast.kernels import cross_entropy as ce
from sar_fast.kernels.support import HEAD_DIMS


def make(entry):
    m, n, w, s = entry[:4]
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


HALF = {80: [(128, 64, 8, 3, 128), (64, 64, 4, 3, 128)], 90: [(128, 128, 8, 3, 128)]}
FP32 = {80: [(32, 32, 4, 2, 128), (64, 64, 4, 3, 64)]}  # (64, 64, 4, 3) also in HALF, other limit


def configs():
    return _tuning.ArchConfigs(HALF, make, admits=lambda e, args: args["HEAD_DIM"] <= e[4],
                               fp32_table=FP32, dtype_arg="Q")


def kept(cfgs, arch, monkeypatch, dtype, head_dim):
    monkeypatch.setattr(_tuning, "target_arch", lambda: arch)
    named = {"Q": torch.empty(0, dtype=dtype), "HEAD_DIM": head_dim}
    return sorted((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in cfgs.prune(cfgs.configs, named))


def test_family_is_the_largest_listed_arch_below():
    assert _tuning.family(86, [80, 90]) == 80
    assert _tuning.family(90, [80, 90]) == 90
    assert _tuning.family(120, [80, 90, 100]) == 100
    assert _tuning.family(75, [80, 90]) == 80


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_tune_over_the_arch_list(monkeypatch, dtype):
    cfgs = configs()
    assert kept(cfgs, 80, monkeypatch, dtype, 128) == [(64, 64, 4, 3), (128, 64, 8, 3)]
    assert kept(cfgs, 90, monkeypatch, dtype, 64) == [(128, 128, 8, 3)]
    assert kept(cfgs, 89, monkeypatch, dtype, 64) == [(64, 64, 4, 3), (128, 64, 8, 3)]


def test_fp32_inputs_tune_over_their_own_list_with_their_own_limits(monkeypatch):
    cfgs = configs()
    assert kept(cfgs, 80, monkeypatch, torch.float32, 64) == [(32, 32, 4, 2), (64, 64, 4, 3)]
    # the same tile admitted to head dim 128 for bf16 stops at 64 for fp32
    assert kept(cfgs, 80, monkeypatch, torch.float32, 128) == [(32, 32, 4, 2)]
    assert kept(cfgs, 80, monkeypatch, torch.bfloat16, 128) == [(64, 64, 4, 3), (128, 64, 8, 3)]
    # sm_90 falls back to the fp32 list's largest family below (sm_80)
    assert kept(cfgs, 90, monkeypatch, torch.float32, 128) == [(32, 32, 4, 2)]


def test_every_config_is_offered_once():
    cfgs = configs()
    keys = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in cfgs.configs]
    assert len(keys) == len(set(keys)) == 4


def test_an_fp32_table_needs_the_argument_that_picks_it():
    with pytest.raises(ValueError, match="dtype_arg"):
        _tuning.ArchConfigs(HALF, make, fp32_table=FP32)


ATTENTION_TABLES = {"fwd": (att.FWD_CONFIGS, att.FWD_FP32_CONFIGS),
                    "cached": (att.CACHED_CONFIGS, att.CACHED_FP32_CONFIGS),
                    "dkdv": (att_bwd.DKDV_CONFIGS, att_bwd.DKDV_FP32_CONFIGS),
                    "dq": (att_bwd.DQ_CONFIGS, att_bwd.DQ_FP32_CONFIGS)}
CE_TABLES = {"ce": (ce.CE_FORWARD_CONFIGS, ce.CE_FORWARD_FP32_CONFIGS),
             "kl": (ce.KL_FORWARD_CONFIGS, ce.KL_FORWARD_FP32_CONFIGS),
             "grad": (ce.GRAD_LOGITS_CONFIGS, ce.GRAD_LOGITS_FP32_CONFIGS)}


@pytest.mark.parametrize("arch", [80, 86, 89, 90, 100, 120])
def test_every_launch_keeps_a_config(arch):
    """An arch, dtype and head dim with no admitted entry would fail at launch ("No valid
    autotuner configs after pruning")."""
    for name, tables in ATTENTION_TABLES.items():
        for table in tables:
            entries = table[_tuning.family(arch, list(table))]
            for head_dim in HEAD_DIMS:
                assert any(att._admits_head_dim(e, {"HEAD_DIM": head_dim}) for e in entries), (name, arch, head_dim)
    for name, tables in CE_TABLES.items():
        for table in tables:
            assert table[_tuning.family(arch, list(table))], (name, arch)


def test_attention_entries_may_name_their_smallest_head_dim():
    admits = att._admits_head_dim
    assert [d for d in HEAD_DIMS if admits((16, 64, 8, 2, 64), {"HEAD_DIM": d})] == [16, 32, 64]
    assert [d for d in HEAD_DIMS if admits((16, 64, 8, 2, 128, 128), {"HEAD_DIM": d})] == [128]
    assert [d for d in HEAD_DIMS if admits((16, 64, 8, 2, 64, 32), {"HEAD_DIM": d})] == [32, 64]


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from compile_report import SMEM_LIMIT  # noqa: E402  (the per-arch opt-in limits the report checks)

SMEM_ARCHS = (80, 86, 89, 90, 100, 120)


def attention_smem(kernel: str, entry: tuple, head_dim: int, itemsize: int) -> int:
    """Upper bound on the shared memory Triton gives an attention kernel, in bytes.

    Triton's pipeliner keeps num_stages - 1 copies of each tile a loop streams (K and V for
    the forward and dQ; Q and dO for dK/dV), the tiles loaded once before the loop stay in
    shared memory as MMA operands (Q for the forward; Q, dO for dQ; K, V for dK/dV), and each
    probability tile fed to a second product may take one [M, N] layout-conversion buffer
    (one in the forward and dQ, two in dK/dV); 2 KB covers barriers and static shared memory.
    Against the compile report (`--arch 86,89,120 --dtypes bf16,fp32 --head-dims 64,128
    --subset ci`: 267 GEMM-kernel variants, attention and CE/KL) it is never below the measured
    size, and over by at most the conversion buffers the compiler often shares (e.g. dQ 128 x 32
    / 3 stages at head dim 128: 98,560 B measured, 108,544 modelled)."""
    m, n, stages = entry[0], entry[1], max(entry[3] - 1, 1)
    d = head_dim
    if kernel in ("fwd", "cached"):
        tiles = m * d + stages * 2 * n * d + m * n
    elif kernel == "dq":
        tiles = 2 * m * d + stages * 2 * n * d + m * n
    else:  # dkdv
        tiles = 2 * n * d + stages * 2 * m * d + 2 * m * n
    return itemsize * tiles + 2048


def ce_smem(kernel: str, entry: tuple, itemsize: int) -> int:
    """Same model for the CE/KL GEMM tiles: num_stages - 1 copies of the hidden [BLOCK_N,
    BLOCK_K] and weight [BLOCK_V, BLOCK_K] tiles; for KL and grad-logits a second hidden tile
    (a teacher run through the same head) and one fp32 [BLOCK_N, BLOCK_V] conversion buffer (a
    teacher logit tile: 32 KB measured for fp32 128 x 64 x 16 on sm_86/89/120)."""
    n, v, k, _, stages = entry
    if kernel in ("kl", "grad"):
        return itemsize * max(stages - 1, 1) * (2 * n + v) * k + 4 * n * v + 2048
    return itemsize * max(stages - 1, 1) * (n + v) * k + 2048


@pytest.mark.parametrize("arch", SMEM_ARCHS)
def test_every_launch_keeps_a_config_that_fits_shared_memory(arch):
    """The 99 KB parts (sm_86/89/120) once tuned with the sm_80/sm_100 lists: at head dim 128
    no dQ config of the sm_100 list fit sm_120, and the autotuner fails a launch with none."""
    limit = SMEM_LIMIT[arch]
    for name, (half, fp32) in ATTENTION_TABLES.items():
        for table, itemsize in ((half, 2), (fp32, 4)):
            entries = table[_tuning.family(arch, list(table))]
            for head_dim in HEAD_DIMS:
                fits = [e for e in entries if att._admits_head_dim(e, {"HEAD_DIM": head_dim})
                        and attention_smem(name, e, head_dim, itemsize) <= limit]
                assert fits, (name, arch, itemsize, head_dim)
    for name, (half, fp32) in CE_TABLES.items():
        for table, itemsize in ((half, 2), (fp32, 4)):
            entries = table[_tuning.family(arch, list(table))]
            assert any(ce_smem(name, e, itemsize) <= limit for e in entries), (name, arch, itemsize)

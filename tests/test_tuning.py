"""Autotune config lists per architecture and dtype (kernels/_tuning.py): which list a launch
is tuned over, and that every launch the ops can make keeps at least one config."""
import pytest
import torch
import triton

from sar_fast.kernels import _tuning
from sar_fast.kernels import attention as att
from sar_fast.kernels import cross_entropy as ce


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
                    "dkdv": (att.DKDV_CONFIGS, att.DKDV_FP32_CONFIGS),
                    "dq": (att.DQ_CONFIGS, att.DQ_FP32_CONFIGS)}
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
            for head_dim in att.HEAD_DIMS:
                assert any(att._admits_head_dim(e, {"HEAD_DIM": head_dim}) for e in entries), (name, arch, head_dim)
    for name, tables in CE_TABLES.items():
        for table in tables:
            assert table[_tuning.family(arch, list(table))], (name, arch)


def test_attention_entries_may_name_their_smallest_head_dim():
    admits = att._admits_head_dim
    assert [d for d in att.HEAD_DIMS if admits((16, 64, 8, 2, 64), {"HEAD_DIM": d})] == [16, 32, 64]
    assert [d for d in att.HEAD_DIMS if admits((16, 64, 8, 2, 128, 128), {"HEAD_DIM": d})] == [128]
    assert [d for d in att.HEAD_DIMS if admits((16, 64, 8, 2, 64, 32), {"HEAD_DIM": d})] == [32, 64]

"""What a GPU run of the kernels depends on besides their arithmetic, checked on the CPU:
grid axes within CUDA's limits for any batch of heads, the CUDA device guard, the
deterministic mode (config and vocabulary splits independent of row count, GPU and timing),
autotune keys with a length bucket, poisoned outputs re-poisoned after autotuning, and a
codebook gradient summed in a fixed order. docs/gpu_checks.md lists what only a GPU confirms;
the GPU-only tests here run in bench/gpu_first.sh's correctness step."""
from __future__ import annotations

import contextlib
import os
import importlib

import pytest
import torch
import triton

from conftest import need_module

need_module("triton")

from sar_fast import ops  # noqa: E402
from sar_fast.ops import gpu  # noqa: E402
from sar_fast.kernels import _tuning as tuning  # noqa: E402
from sar_fast.kernels import attention as att  # noqa: E402
from sar_fast.kernels import attention_backward as att_bwd  # noqa: E402
from sar_fast.kernels import cross_entropy as ce  # noqa: E402
from sar_fast.kernels import scale_shift as shift_kernels  # noqa: E402
ss = importlib.import_module("sar_fast.ops.scale_shift")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
AXIS_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's grid limits per axis


@pytest.fixture(autouse=True)
def _default_mode():
    gpu.set_deterministic(None)
    yield
    gpu.set_deterministic(None)


class RecordLaunch:
    """Stands in for a Triton kernel: records each launch's grid (evaluated with `meta`, the
    smallest tiles, so the most programs) and keyword arguments; runs nothing."""

    def __init__(self, meta: dict):
        self.meta, self.grids, self.kwargs = meta, [], []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid({**self.meta, **kwargs}) if callable(grid) else grid)
            self.kwargs.append(kwargs)
        return launch


def assert_within_limits(grids):
    for grid in grids:
        assert len(grid) <= 3 and all(0 <= g <= lim for g, lim in zip(grid, AXIS_LIMITS)), grid


# ------------------------------------------------------------------------------------------
# grid axes: B*H (attention) and B (scale shift) beyond 65,535
# ------------------------------------------------------------------------------------------
def test_attention_grids_fit_cuda_limits_for_a_cfg_doubled_batch_of_heads(monkeypatch):
    """2 x 1,100 samples x 30 heads = 66,000 (batch, head) pairs: more than grid axis 1 or 2
    takes (65,535; the launch fails on a GPU, the interpreter does not check), so they must
    ride axis 0."""
    record = RecordLaunch({"BLOCK_M": 16, "BLOCK_N": 16})
    for module, name in ((att, "_fwd_tuned"), (att, "_cached_tuned"), (att_bwd, "_bwd_delta_kernel"),
                         (att_bwd, "_dkdv_tuned"), (att_bwd, "_dq_tuned")):
        monkeypatch.setattr(module, name, record)
    q = torch.zeros(2 * 1100, 30, 1, 16)
    sid, off = att.scale_layout((1,), q.device)
    for cached in (False, True):
        att.forward(q, q, q, sid, sid, off, 0.25, 1, cached=cached)
    att_bwd.backward(q, q, q, q, q, torch.zeros(2 * 1100, 30, 1), sid, sid, off, off, 0.25, 1)
    assert len(record.grids) == 5
    assert_within_limits(record.grids)
    assert all(g[0] == 66000 for g in record.grids)  # one program per (tile, batch, head)


def test_scale_shift_grids_fit_cuda_limits_for_a_large_batch(monkeypatch):
    record = RecordLaunch({})
    monkeypatch.setattr(shift_kernels, "_scale_shift_fwd_kernel", record)
    monkeypatch.setattr(shift_kernels, "_scale_shift_bwd_kernel", record)
    B, C = 70000, 8
    out = torch.zeros(B, 4, C)
    shift_kernels.launch_forward(out, torch.zeros(3, C), torch.zeros(B, 5, dtype=torch.long),
                                 torch.zeros(1, 8, dtype=torch.long), [2], C)
    shift_kernels.launch_backward(torch.zeros(B, C), out, torch.zeros(1, 8, dtype=torch.long), [1], C)
    assert len(record.grids) == 2
    assert_within_limits(record.grids)


@pytest.mark.skipif(not ON_GPU, reason="CUDA grid limits exist only on a GPU (the interpreter runs "
                    "~40 ms per program: 66,000 programs would take 45 min); the grid shape is checked above")
def test_attention_over_65535_heads_matches_reference_on_gpu():
    B, H, L, D = 2 * 1100, 30, 5, 16
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16) for _ in range(3))
    with ops.use_backend("kernel"):
        got = ops.scale_causal_attention(q, k, v, (1, 4))
    with ops.use_backend("reference"):
        want = ops.scale_causal_attention(q.float(), k.float(), v.float(), (1, 4))
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not ON_GPU, reason="CUDA grid limits exist only on a GPU; checked above on the CPU")
def test_scale_shift_over_65535_samples_on_gpu():
    B, V, C, schedule = 70000, 16, 4, (1, 2)
    codes = torch.randint(0, V, (B, 5), device="cuda")
    book = torch.randn(V, C, device="cuda")
    with ops.use_backend("kernel"):
        got = ops.scale_shift(codes, book, schedule)
    with ops.use_backend("reference"):
        want = ops.scale_shift(codes, book, schedule)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# CUDA device guard
# ------------------------------------------------------------------------------------------
def test_device_guard_makes_a_cuda_tensors_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)

    class OnCuda1:
        is_cuda, device = True, torch.device("cuda", 1)

    with gpu.device_guard(OnCuda1()):
        pass
    with gpu.device_guard(torch.zeros(1)):  # CPU tensors need none
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_kernel_launch_runs_inside_the_device_guard(monkeypatch):
    """Each custom op launches its kernels with its input's device current (cuda:1 tensors with
    cuda:0 current would otherwise launch on cuda:0)."""
    depth, launched_outside = [0], []

    @contextlib.contextmanager
    def guard(t):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    def watch(module, name):
        real = getattr(module, name)

        def launcher(*args, **kwargs):
            if depth[0] == 0:
                launched_outside.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, launcher)

    for module in ("attention", "cross_entropy", "scale_shift"):
        monkeypatch.setattr(importlib.import_module(f"sar_fast.ops.{module}"), "device_guard", guard)
    watch(att, "forward")
    watch(att_bwd, "backward")
    for name in ("ce_forward", "kl_forward", "head_backward"):
        watch(ce, name)
    for name in ("launch_forward", "launch_backward"):
        watch(shift_kernels, name)

    with ops.use_backend("kernel"):
        q = torch.randn(1, 1, 5, 16, requires_grad=True)
        ops.scale_causal_attention(q, q, q, (1, 4)).sum().backward()
        h, w = torch.randn(3, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
        ops.fused_linear_cross_entropy(h, w, None, torch.tensor([0, 1, 4])).backward()
        ops.fused_linear_kl_div(h, w, None, target_hidden=torch.randn(3, 8)).backward()
        book = torch.randn(6, 4, requires_grad=True)
        ops.scale_shift(torch.randint(0, 6, (2, 5)), book, (1, 2)).sum().backward()
        maps = [torch.randn(1, 4, s, s, requires_grad=True) for s in (1, 2)]
        ops.scale_shift(scales=maps, schedule=(1, 2)).sum().backward()
    assert launched_outside == []
    assert q.grad is not None and book.grad is not None and maps[0].grad is not None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (the lent machine has one); "
                    "the guard is checked above with a stand-in")
def test_ops_on_the_second_gpu_with_the_first_current():
    torch.cuda.set_device(0)
    q = torch.randn(1, 2, 5, 16, device="cuda:1", dtype=torch.float16)
    with ops.use_backend("kernel"):
        got = ops.scale_causal_attention(q, q, q, (1, 4))
    with ops.use_backend("reference"):
        want = ops.scale_causal_attention(q.float(), q.float(), q.float(), (1, 4))
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------------------
# autotune keys: a length bucket; deterministic mode
# ------------------------------------------------------------------------------------------
class RecordArgs(RecordLaunch):
    """RecordLaunch that also names the positional arguments after `kernel`'s."""

    def __init__(self, meta: dict, kernel):
        super().__init__(meta)
        self.names, self.named = kernel.autotuner.arg_names, []

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def named_launch(*args, **kwargs):
            self.named.append(dict(zip(self.names, args)))
            launch(*args, **kwargs)
        return named_launch


def test_autotune_keys_hold_length_buckets():
    for kernel in (att._fwd_tuned, att._cached_tuned, att_bwd._dkdv_tuned, att_bwd._dq_tuned):
        assert {"HEAD_DIM", "q_bucket", "k_bucket"} <= set(kernel.autotuner.keys)
    for kernel in (ce._ce_forward_kernel, ce._kl_forward_kernel, ce._grad_logits_kernel):
        assert {"C", "V", "n_bucket"} <= set(kernel.autotuner.keys)
    assert [tuning.length_bucket(n, 8192) for n in (1, 3, 680, 2240, 10**6)] == [1, 4, 1024, 4096, 8192]


def test_launches_pass_the_length_buckets(monkeypatch):
    """The KV-cache path sees 1 query at the first scale and hundreds later: separate keys."""
    meta = {"BLOCK_M": 16, "BLOCK_N": 16}
    fwd, cached = RecordArgs(meta, att._fwd_tuned), RecordArgs(meta, att._cached_tuned)
    monkeypatch.setattr(att, "_fwd_tuned", fwd)
    monkeypatch.setattr(att, "_cached_tuned", cached)
    sid, off = att.scale_layout((1, 4, 9, 16), "cpu")
    att.forward(torch.zeros(1, 1, 30, 16), torch.zeros(1, 1, 30, 16), torch.zeros(1, 1, 30, 16),
                sid, sid, off, 0.25, 9)
    for lq in (1, 9):
        q = torch.zeros(1, 1, lq, 16)
        k = torch.zeros(1, 1, 14, 16)
        att.forward(q, k, k, sid[:lq], sid[:14], off[:2], 0.25, 1, cached=True)
    assert [(n["q_bucket"], n["k_bucket"]) for n in fwd.named] == [(32, 32)]
    assert [(n["q_bucket"], n["k_bucket"]) for n in cached.named] == [(1, 16), (16, 16)]
    rows = RecordArgs({"BLOCK_N": 16}, ce._ce_forward_kernel)
    monkeypatch.setattr(ce, "_ce_forward_kernel", rows)
    for n in (3, 37):
        ce.ce_forward(torch.zeros(n, 8), torch.zeros(5, 8), None, torch.zeros(n, dtype=torch.long), 0.0, -100)
    assert [named["n_bucket"] for named in rows.named] == [4, 64]


def test_deterministic_mode_sources(monkeypatch):
    monkeypatch.delenv("SAR_FAST_DETERMINISTIC", raising=False)
    assert not ops.is_deterministic()
    monkeypatch.setenv("SAR_FAST_DETERMINISTIC", "1")
    assert ops.is_deterministic()
    with ops.use_deterministic(False):
        assert not ops.is_deterministic()
    monkeypatch.setenv("SAR_FAST_DETERMINISTIC", "0")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert ops.is_deterministic()
    finally:
        torch.use_deterministic_algorithms(previous)
    ops.set_deterministic(True)
    assert ops.is_deterministic()
    with pytest.raises(TypeError, match="set_deterministic"):
        ops.set_deterministic(1)
    monkeypatch.setenv("SAR_FAST_DETERMINISTIC", "maybe")
    ops.set_deterministic(None)
    with pytest.raises(ValueError, match="SAR_FAST_DETERMINISTIC"):
        ops.is_deterministic()


def test_deterministic_vocabulary_splits_depend_on_v_only(monkeypatch):
    cuda0 = torch.device("cuda", 0)

    def splits(sm_count, n, v):
        monkeypatch.setitem(ce._SM_COUNT, 0, sm_count)
        return ce._num_splits(n, v, cuda0)

    cases = [(sms, n) for sms in (8, 132) for n in (1, 5000, 10**6)]
    assert len({splits(sms, n, 4096) for sms, n in cases}) > 1  # tuned mode: it varies
    with ops.use_deterministic(True):
        assert {splits(sms, n, 4096) for sms, n in cases} == {8}
        assert {splits(sms, n, 300) for sms, n in cases} == {1}
        assert ce._num_splits(7, 4096, torch.device("cpu")) == 8  # same on every device


class FakeAutotuner:
    """An autotuner over `configs` whose launches run `body(out)`; `fn` launches one config."""

    def __init__(self, configs, body):
        self.configs, self.arg_names, self.keys, self.body = configs, ["out", "Q", "HEAD_DIM"], [], body
        self.tuned, self.direct = 0, []
        self.fn = self

    def __getitem__(self, grid):
        def launch(out, *args, **kwargs):
            if "BLOCK_M" in kwargs:  # a launch of one config (deterministic mode)
                self.direct.append(kwargs)
            else:
                self.tuned += 1
            self.body(out, first=self.tuned == 1)
        return launch


def make_attention_config(entry):
    return triton.Config({"BLOCK_M": entry[0], "BLOCK_N": entry[1]}, num_warps=entry[2], num_stages=entry[3])


@pytest.mark.parametrize("arch, dtype, head_dim, want", [
    (90, torch.bfloat16, 64, (128, 64, 4, 3)),     # the sm_90 list's first entry
    (90, torch.bfloat16, 128, (128, 64, 8, 3)),    # its first entry admitting head dim 128
    (90, torch.float32, 128, (16, 64, 8, 2)),      # the fp32 list's
])
def test_deterministic_mode_launches_the_first_admitted_config(monkeypatch, arch, dtype, head_dim, want):
    configs = tuning.ArchConfigs(att.FWD_CONFIGS, make_attention_config, admits=att._admits_head_dim,
                                 fp32_table=att.FWD_FP32_CONFIGS, dtype_arg="Q")
    fake = FakeAutotuner(configs.configs, lambda out, first: None)
    kernel = tuning.TunedKernel(fake, configs, make_attention_config)
    monkeypatch.setattr(tuning, "target_arch", lambda: arch)
    q = torch.empty(0, dtype=dtype)
    kernel[(1,)](None, q, HEAD_DIM=head_dim)
    assert fake.tuned == 1 and not fake.direct
    with ops.use_deterministic(True):
        for _ in range(3):  # whatever the row count or timing: the same config, never tuned
            kernel[(1,)](None, q, HEAD_DIM=head_dim)
    assert fake.tuned == 1
    assert {(d["BLOCK_M"], d["BLOCK_N"], d["num_warps"], d["num_stages"]) for d in fake.direct} == {want}


def test_deterministic_mode_runs_the_real_kernels():
    """Through each op (interpreter: one config), deterministic launches give the same bits."""
    q, k, v = (torch.randn(1, 2, 14, 16) for _ in range(3))
    h, w = torch.randn(9, 24), torch.randn(40, 24)
    target = torch.randint(0, 40, (9,))

    def run():
        with ops.use_backend("kernel"):
            qq = q.clone().requires_grad_()
            out = ops.scale_causal_attention(qq, k, v, (1, 4, 9))
            (dq,) = torch.autograd.grad(out.sum(), qq)
            hh = h.clone().requires_grad_()
            loss = ops.fused_linear_cross_entropy(hh, w, None, target)
            (dh,) = torch.autograd.grad(loss, hh)
            kl = ops.fused_linear_kl_div(h, w, None, target_hidden=h.flip(0))
            return [out, dq, loss, dh, kl]

    tuned = run()
    with ops.use_deterministic(True):
        fixed = run()
    for a, b in zip(tuned, fixed):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# poisoned outputs on a GPU: autotuning writes every config into them first
# ------------------------------------------------------------------------------------------
def leaves_last_unwritten(out, first):
    """A kernel whose other configs (benchmarked on the first call) write everything, and
    whose winner leaves the last element unwritten."""
    if first:
        out.fill_(0.0)
    out[:-1] = 1.0


@pytest.mark.parametrize("n_configs, launches, last", [(2, 2, "nan"), (1, 1, "nan")])
def test_poisoned_outputs_are_poisoned_again_after_autotuning(n_configs, launches, last):
    out = torch.full((4,), float("nan"))
    fake = FakeAutotuner([make_attention_config((16, 16, 4, 1))] * n_configs,
                         leaves_last_unwritten if n_configs > 1 else lambda out, first: out[:-1].fill_(1.0))
    tuning.TunedKernel(fake, None)[(1,)](out, poisoned=[out])
    assert fake.tuned == launches
    assert out[:-1].eq(1.0).all() and out[-1].isnan()  # the unwritten element shows


def test_launchers_hand_their_outputs_for_poisoning(monkeypatch):
    monkeypatch.setattr(att, "POISON_OUTPUTS", True)
    monkeypatch.setattr(ce, "POISON_OUTPUTS", True)
    records = {}
    for module, name in [(att, "_fwd_tuned"), (att_bwd, "_dkdv_tuned"), (att_bwd, "_dq_tuned"),
                         (ce, "_ce_forward_kernel"), (ce, "_kl_forward_kernel"), (ce, "_grad_logits_kernel")]:
        records[name] = RecordLaunch({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_V": 16})
        monkeypatch.setattr(module, name, records[name])
    monkeypatch.setattr(att_bwd, "_bwd_delta_kernel", RecordLaunch({}))
    q = torch.zeros(1, 1, 5, 16)
    sid, off = att.scale_layout((1, 4), "cpu")
    att.forward(q, q, q, sid, sid, off, 0.25, 1)
    att_bwd.backward(q, q, q, q, q, torch.zeros(1, 1, 5), sid, sid, off, off, 0.25, 1)
    h, w, t = torch.zeros(3, 8), torch.zeros(5, 8), torch.zeros(3, dtype=torch.long)
    ce.ce_forward(h, w, None, t, 0.0, -100)
    ce.kl_forward(h, w, None, None, h, 1.0)
    ce.head_backward(torch.ones(3), h, w, None, torch.zeros(3), ce.MODE_TARGET, target=t)
    counts = {name: len(r.kwargs[0]["poisoned"]) for name, r in records.items()}
    assert counts == {"_fwd_tuned": 2, "_dkdv_tuned": 2, "_dq_tuned": 1, "_ce_forward_kernel": 5,
                      "_kl_forward_kernel": 5, "_grad_logits_kernel": 1}
    assert all(t.isnan().all() or t.dtype == torch.int32 for r in records.values() for t in r.kwargs[0]["poisoned"])


# ------------------------------------------------------------------------------------------
# codebook gradient of the scale shift: a fixed summation order
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, size", [(0, 4), (1, 4), (7, 3), (1000, 17), (513, 1), (300, 1000)])
def test_sum_rows_by_index_matches_float64(n, size):
    index = torch.randint(0, size, (n,))
    rows = torch.randn(n, 5)
    got = ss.sum_rows_by_index(index, rows, size)
    want = torch.zeros(size, 5, dtype=torch.float64).index_add_(0, index, rows.double())
    assert got.shape == (size, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5 * max(n, 1) ** 0.5, rtol=0)


def test_sum_rows_by_index_order_is_fixed():
    """Same bits on every call, and a code's sum does not depend on the other codes' rows
    between its own (what atomics would make it depend on: who lands first)."""
    index = torch.randint(0, 3, (777,))
    rows = torch.randn(777, 4) * 1e3
    first = ss.sum_rows_by_index(index, rows, 3)
    assert all(torch.equal(first, ss.sum_rows_by_index(index, rows, 3)) for _ in range(3))
    mine = index == 1
    alone = ss.sum_rows_by_index(torch.zeros(int(mine.sum()), dtype=torch.long), rows[mine], 1)
    assert torch.equal(alone[0], first[1])


def test_codebook_gradient_uses_no_scatter_add(monkeypatch):
    """index_add_ / scatter_add_ / index_put_(accumulate) run as atomics on CUDA."""
    def atomic(*args, **kwargs):
        raise AssertionError("an atomic scatter-add summed the codebook gradient")

    for name in ("index_add_", "index_add", "scatter_add_", "scatter_add"):
        monkeypatch.setattr(torch.Tensor, name, atomic)
    V, C, schedule = 5, 3, (1, 2, 3)
    codes = torch.randint(0, V, (4, 14))
    book = torch.randn(V, C, requires_grad=True)
    twin = book.detach().clone().requires_grad_()
    weights = torch.randn(4, 13, C)
    with ops.use_backend("kernel"):
        (ops.scale_shift(codes, book, schedule) * weights).sum().backward()
    with ops.use_backend("reference"):
        (ops.scale_shift(codes, twin, schedule) * weights).sum().backward()
    torch.testing.assert_close(book.grad, twin.grad, atol=1e-5, rtol=0)


@pytest.mark.skipif(not ON_GPU, reason="atomics are nondeterministic only on a GPU; the order is "
                    "checked on the CPU above")
def test_codebook_gradient_bitwise_repeatable_on_gpu():
    V, C, schedule = 4, 32, tuple(range(1, 17))
    codes = torch.randint(0, V, (24, sum(s * s for s in schedule)), device="cuda")
    book = torch.randn(V, C, device="cuda", requires_grad=True)
    weights = torch.randn(24, sum(s * s for s in schedule[1:]), C, device="cuda")
    grads = []
    for _ in range(5):
        with ops.use_backend("kernel"):
            (g,) = torch.autograd.grad((ops.scale_shift(codes, book, schedule) * weights).sum(), book)
        grads.append(g)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_trainer_and_evaluate_flags_turn_deterministic_mode_on(tmp_path, monkeypatch):
    """--deterministic of `sar_fast.train` and `sar_fast.evaluate` reaches the ops (read
    where the runs read it: after their start-up, before any op launches)."""
    import subprocess
    import sys

    from conftest import PACKAGE_PATH
    env = dict(os.environ, PYTHONPATH=PACKAGE_PATH, OMP_NUM_THREADS="1")
    env.pop("SAR_FAST_DETERMINISTIC", None)
    script = (
        "import sys, torch.distributed as dist\n"
        "from sar_fast import ops\n"
        "from sar_fast.train import Trainer, parse_config\n"
        "flags = ['--out', sys.argv[1], '--depth', '1', '--embed-dim', '32', '--num-heads', '2',\n"
        "         '--batch-size', '8', '--workers', '0', '--resume', 'none'] + sys.argv[2:]\n"
        "Trainer(parse_config(flags))\n"
        "print('deterministic', ops.is_deterministic())\n"
        "dist.destroy_process_group()\n")
    for extra, expected in ([], False), (["--deterministic"], True):
        res = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"run{expected}"), *extra], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"deterministic {expected}" in res.stdout
    from sar_fast import evaluate
    from sar_fast.train import parallel
    seen = []

    def stop_at_start_up(*args, **kwargs):
        seen.append(ops.is_deterministic())
        raise KeyboardInterrupt

    monkeypatch.delenv("SAR_FAST_DETERMINISTIC", raising=False)
    monkeypatch.setattr(evaluate, "check_args", lambda args: None)
    monkeypatch.setattr(evaluate, "check_metric_inputs", lambda args, metric: None)
    monkeypatch.setattr(parallel, "init_distributed", stop_at_start_up)
    try:
        for extra in ([], ["--deterministic"]):
            with pytest.raises(KeyboardInterrupt):
                evaluate.main(["--ckpt", str(tmp_path / "x.pth"), *extra])
    finally:
        ops.set_deterministic(None)
    assert seen == [False, True]

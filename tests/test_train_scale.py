"""The trainer at scale, checked on the CPU: collectives per step, no host syncs inside a
step, asynchronous and bounded checkpoints, one resume decision, MFU of every pass, NVML
device mapping. Multi-rank parts run under torchrun + gloo (tests/trainer_probe.py)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from conftest import ROOT

PROBE = os.path.join(ROOT, "tests", "trainer_probe.py")
TINY = ["--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--batch-size", "8", "--num-samples", "0",
        "--workers", "0", "--top-k", "0", "--pretrain-steps", "0", "--max-steps", "10", "--resume", "none",
        "--objective", "sar", "--transitions", "all", "--sampling", "cfg", "--cfg", "1.5", "--log-every", "1000"]


def _torchrun_script(script, timeout: int):
    """Run a Python file on 2 local ranks under torchrun (gloo, this checkout's sar_fast)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script)], env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _probe(tmp_path, nproc, *flags, steps=2, nan_step=-1, probe_flags=()):
    out = tmp_path / "probe.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", PROBE,
           "--json", str(out), "--steps", str(steps), "--nan-step", str(nan_step), *probe_flags, "--",
           "--out", str(tmp_path / "run"), *TINY, *flags]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


# ------------------------------------------------------------------ 1. communication
@pytest.mark.parametrize("accum", [1, 2])
def test_one_gather_and_one_reduce_per_unit_per_step(tmp_path, accum):
    """'step' policy, TF + null-class + student passes, 1 or 2 micro-batches: each FSDP unit
    (2 blocks + root) all-gathered once and reduce-scattered once per step; two all-reduces
    (the loss/flag vector and the gradient norm). Today's trainer: 14 all-gathers and 3
    reduce-scatters (28 and 5 with --grad-accum 2)."""
    r = _probe(tmp_path, 2, "--grad-accum", str(accum), "--reshard", "step")
    c, units = r["collectives_per_step"], r["units"]
    assert units == 3
    assert c.get("c10d::_allgather_base_") == units, c
    assert c.get("c10d::_reduce_scatter_base_") == units, c
    assert c.get("c10d::allreduce_") == 2, c


def test_public_fallback_trains_alike_with_one_gather_per_step(tmp_path):
    """FSDP2's internals made to fail the start-up probe: the 'step' policy runs on the public
    controls (gradient sync in the last micro-batch's backward only) and trains to the same
    parameters; still one all-gather per unit per step, but a reduce-scatter per pass through
    each block (TF and student: 2) and one for the root."""
    runs = {}
    for name, probe_flags in (("private", ()), ("public", ("--public-fallback",))):
        (tmp_path / name).mkdir()
        runs[name] = _probe(tmp_path / name, 2, "--grad-accum", "2", "--reshard", "step",
                            probe_flags=(*probe_flags, "--params", str(tmp_path / f"{name}.pt")))
    assert runs["private"]["reduce_now"] and not runs["public"]["reduce_now"]
    c, units = runs["public"]["collectives_per_step"], runs["public"]["units"]
    assert c.get("c10d::_allgather_base_") == units, c
    assert c.get("c10d::_reduce_scatter_base_") == 2 * (units - 1) + 1, c
    assert c.get("c10d::allreduce_") == 2, c
    a, b = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("private", "public"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_pass_policy_gathers_per_pass(tmp_path):
    """'pass' (FSDP's default) really reshards: more all-gathers than units."""
    r = _probe(tmp_path, 2, "--reshard", "pass")
    assert r["collectives_per_step"]["c10d::_allgather_base_"] > 2 * r["units"]


def test_hsdp_mesh_trains_like_fsdp(tmp_path):
    """--replicas 2 on 2 ranks (HSDP: replicate across the two 'nodes', shard within one):
    the same losses and parameters as the flat mesh."""
    from test_train import _cmd, _metrics, _params
    flags = ["--pretrain-steps", "1", "--max-steps", "1", "--objective", "tf", "--cond-drop", "0",
             "--ckpt-every", "100", "--num-samples", "0"]
    for name, extra in (("flat", []), ("hsdp", ["--replicas", "2"])):
        res = subprocess.run(_cmd(2, tmp_path / name, *flags, *extra), env=_env(), capture_output=True, text=True,
                             check=False,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = _params(tmp_path / "flat"), _params(tmp_path / "hsdp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert [r["loss"] for r in _metrics(tmp_path / "flat")] == pytest.approx(
        [r["loss"] for r in _metrics(tmp_path / "hsdp")], abs=1e-6)


# ------------------------------------------------------------------ 2. host syncs
def test_no_host_sync_inside_unlogged_steps(tmp_path):
    """Two SAR steps (TF, null-class, student, sampling) on 2 ranks: no .item()/bool(tensor)
    anywhere. Today: 41 per step (AdamW's step counts, the skip and stop flags, the
    labels' collate and range check)."""
    r = _probe(tmp_path, 2)
    assert r["host_syncs"] == []


def test_nonfinite_step_is_skipped_on_the_device(tmp_path):
    """A NaN loss on one rank: every rank skips the update on the device (parameters and
    AdamW state bit-identical), grad_norm is NaN, the host counts it, and no sync was needed."""
    r = _probe(tmp_path, 2, nan_step=1)
    assert r["state_unchanged_by_nan_step"] and r["grad_norm_nan"]
    assert r["nonfinite_total"] == 1
    assert r["host_syncs"] == []


def test_layouts_are_cached_by_schedule():
    """Random schedules do not evict each other's attention layouts (today's cache held 128)."""
    from sar_fast.ops import attention
    from sar_fast.schedules import random_flexvar_schedule
    attention._cached_layout.cache_clear()
    rng = random.Random(0)
    scheds = list(dict.fromkeys(random_flexvar_schedule(rng) for _ in range(400)))
    assert len(scheds) > 200
    for s in scheds + scheds:
        attention.scale_layout(tuple(x * x for x in s), "cpu")
    assert attention._cached_layout.cache_info().misses == len(scheds)


# ------------------------------------------------------------------ 3. checkpoints
def test_sigterm_writes_only_the_checkpoint(tmp_path):
    """SIGTERM with export and samples on: a checkpoint, but neither export.pth nor sample
    grids (they are end-of-run work; today they were in the SIGTERM path)."""
    from test_train import SMALL, _wait_for

    from sar_fast.train.checkpointing import list_checkpoints
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sar_fast.train", "--out", str(out), *SMALL, "--pretrain-steps", "0",
           "--max-steps", "100000", "--objective", "tf", "--ckpt-every", "100000", "--num-samples", "4", "--export"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc, 240)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert len(list_checkpoints(out / "checkpoints")) == 1
    assert not (out / "export.pth").exists() and not (out / "samples").exists()
    assert time.time() - t0 < 60


def test_extras_only_at_the_end(tmp_path):
    """Checkpoints every step, but one sample grid and one export: at the last step."""
    from test_train import _train

    from sar_fast.train.checkpointing import list_checkpoints
    out = tmp_path / "run"
    _train(1, out, "--pretrain-steps", "0", "--max-steps", "3", "--objective", "tf", "--ckpt-every", "1",
           "--keep-last", "5")
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1, 2, 3]
    assert sorted(os.listdir(out / "samples")) == ["step_00000003.png"]
    assert (out / "export.pth").exists()


D16_SAVE_BOUND_S = 60.0  # documented in train.py: the SIGTERM path writes one checkpoint


def test_d16_checkpoint_write_is_bounded(tmp_path):
    """A flexvar-d16-sized model (+ AdamW state) on a 1-rank FSDP group: the blocking save
    the SIGTERM path runs finishes within D16_SAVE_BOUND_S; the asynchronous one returns
    to the step sooner than that and completes to the same files."""
    import torch.distributed as dist

    from sar_fast.train import checkpointing, parallel
    from sar_fast.train.build import build_optimizer
    from sar_fast.train.config import OptimConfig
    from sar_fast.models import ScaleAR, preset_config
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        info = parallel.DistInfo(0, 1, 0, torch.device("cpu"))
        model = ScaleAR(preset_config("flexvar-d16", vocab_size=8912, code_dim=32))
        model = parallel.shard_model(model, info, "fp32", reshard="step")
        opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # materialise the AdamW state
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params > 250e6
        t0 = time.time()
        checkpointing.save_checkpoint(str(tmp_path), 1, model, opt, {"step": 1}, info, keep_last=5).wait()
        blocking = time.time() - t0
        t0 = time.time()
        pending = checkpointing.save_checkpoint(str(tmp_path), 2, model, opt, {"step": 2}, info, keep_last=5,
                                                async_=True)
        returned = time.time() - t0
        pending.wait()
        print(f"d16 ({n_params / 1e6:.0f}M params): blocking save {blocking:.1f} s, async returns after "
              f"{returned:.1f} s")
        assert blocking < D16_SAVE_BOUND_S
        assert returned < blocking
        assert [s for s, _ in checkpointing.list_checkpoints(str(tmp_path))] == [1, 2]
    finally:
        dist.destroy_process_group()


def test_resume_auto_is_rank_zeros_choice(tmp_path):
    """Each rank sees a different checkpoint folder; all resume what rank 0 found."""
    script = tmp_path / "resolve.py"
    script.write_text(
        "import os, sys, json, torch.distributed as dist\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from sar_fast.train import checkpointing, parallel\n"
        # deliberate repeat: each 2-rank script below opens, uses and closes its own process group
        "dist.init_process_group('gloo')\n"
        "r = dist.get_rank()\n"
        f"root = os.path.join({str(tmp_path)!r}, f'rank{{r}}')\n"
        "d = os.path.join(root, f'step_{r + 1:08d}'); os.makedirs(d)\n"
        "open(os.path.join(d, 'COMPLETE'), 'w').write('x')\n"
        "info = parallel.DistInfo(r, 2, r, None)\n"
        "p = checkpointing.resolve_resume_everywhere('auto', root, info)\n"
        f"open(os.path.join({str(tmp_path)!r}, f'out{{r}}'), 'w').write(p)\n"
        "from sar_fast.train import parallel as _p; _p.shutdown(); _p.exit_process(0)\n")
    res = _torchrun_script(script, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    answers = {(tmp_path / f"out{r}").read_text() for r in range(2)}
    assert answers == {str(tmp_path / "rank0" / "step_00000001")}


# ------------------------------------------------------------------ 5. MFU and NVML
def test_mfu_counts_every_pass():
    """A SAR step with CFG on every scale: TF (with graph) + null-class prefix (forward
    only) + student (with graph): (3 + 1 + 3) forward-equivalents of B x L tokens."""
    from sar_fast.train import flops
    from sar_fast.models import ScaleAR, preset_config
    from sar_fast.sar import SARConfig, sar_step
    from sar_fast.schedules import scale_offsets
    schedule, B = (1, 2, 3), 3
    model = ScaleAR(preset_config("flexvar-tiny", vocab_size=17, code_dim=4, schedule=schedule, depth=2,
                                  embed_dim=32, num_heads=2, cond_drop_rate=0.0))
    counter = flops.PassFlops(model.blocks[0], model.config)
    counter.enabled = True
    L = scale_offsets(schedule)[-1]
    codes = torch.randint(0, 17, (B, L))
    codebook = torch.nn.functional.normalize(torch.randn(17, 4), dim=-1)
    cfg = SARConfig(objective="sar", transitions="all", sampling="cfg", cfg=2.0, top_k=0, top_p=0.0)
    out = sar_step(model, torch.tensor([0, 1, 2]), codes, schedule, codebook, cfg, step=0)
    out.loss.backward()
    counted, tokens = counter.take()
    c = model.config
    per_token = flops.flops_per_token(c.depth, c.embed_dim, c.vocab_size, c.mlp_ratio,
                                      flops.mean_visible_keys(schedule))
    assert tokens == 3 * B * L
    assert counted == pytest.approx(7 * per_token * B * L)
    assert counter.take() == (0.0, 0)


def test_nvml_follows_cuda_visible_devices(monkeypatch):
    """CUDA_VISIBLE_DEVICES=2 makes cuda:0 the machine's third GPU: the monitor must read
    NVML's device 2 (matched by UUID), not NVML's device 0."""
    from sar_fast.train import gpu_monitor
    uuids = [f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(4)]
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: ("nvml", i),
        nvmlDeviceGetHandleByUUID=lambda u: ("nvml", uuids.index(u)),
        nvmlDeviceGetHandleByPciBusId=lambda b: ("nvml", int(b.split(":")[1], 16)))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    props = types.SimpleNamespace(uuid=uuids[2][4:], pci_domain_id=0, pci_bus_id=2, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    assert gpu_monitor.GpuMonitor(torch.device("cuda", 0)).handle == ("nvml", 2)
    props.uuid = None  # no UUID: the PCI bus id decides
    assert gpu_monitor.GpuMonitor(torch.device("cuda", 0)).handle == ("nvml", 2)


# ------------------------------------------------------------------ 4. start-up
def test_init_is_read_by_rank_zero_only(tmp_path):
    """--init on 2 ranks: only rank 0 reads the weights (the other builds on the meta device;
    every rank's preflight only memory-maps the file), and the shards hold the file's weights."""
    from sar_fast.models import ScaleAR, preset_config, save_export
    model = ScaleAR(preset_config("flexvar-tiny", vocab_size=17, code_dim=1, schedule=(1, 2, 3, 4, 5, 6, 8),
                                  depth=2, embed_dim=32, num_heads=2))
    save_export(model.state_dict(), str(tmp_path / "init.pth"), config=model.config)
    script = tmp_path / "start.py"
    script.write_text(
        "import os, sys, json, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import sar_fast.models.checkpoint as ck\n"
        "reads = []\n"
        "real = ck.read_checkpoint_file\n"
        # the preflight memory-maps the file on every rank (shapes_only: headers and shapes, not
        # the weights):
        # count the reads that load the weights
        "ck.read_checkpoint_file = lambda *a, **k: ((None if k.get('mmap') or k.get('shapes_only') "
        "else reads.append(a[0])), "
        "real(*a, **k))[1]\n"
        "from sar_fast.train import Trainer, parse_config\n"
        f"t = Trainer(parse_config(['--out', {str(tmp_path / 'run')!r}, '--init', {str(tmp_path / 'init.pth')!r},"
        " '--batch-size', '8', '--workers', '0', '--max-steps', '1', '--resume', 'none']))\n"
        "full = {k: v.full_tensor() for k, v in t.model.state_dict().items()}\n"
        f"ref = torch.load({str(tmp_path / 'init.pth')!r}, weights_only=True)\n"
        "ok = all(torch.equal(full[k], ref[k]) for k in full)\n"
        f"open(os.path.join({str(tmp_path)!r}, f'out{{t.info.rank}}'), 'w').write(json.dumps([len(reads), ok]))\n"
        "from sar_fast.train import parallel as _p; _p.shutdown(); _p.exit_process(0)\n")
    res = _torchrun_script(script, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"out{r}").read_text()) for r in range(2))
    assert r0 == [1, True] and r1 == [0, True]


# Like the tests above, this one writes a small torchrun program of its own: each program
# sets up the process group the same way and then probes one behaviour.
def test_collective_timeout_shortens_after_the_first_step(tmp_path):
    """The long --startup-timeout until step 1 is done, --collective-timeout afterwards."""
    script = tmp_path / "timeout.py"
    script.write_text(
        "import os, sys, json, torch.distributed as dist\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import torch\n"
        "from torch.distributed.distributed_c10d import _get_default_group\n"
        "timeout = lambda: _get_default_group()._get_backend(torch.device('cpu')).options._timeout.total_seconds()\n"
        "import sar_fast.train.parallel as parallel\n"
        "from sar_fast.train import Trainer, parse_config\n"
        "seen = []\n"
        "real = parallel.set_collective_timeout\n"
        "parallel.set_collective_timeout = lambda s: (real(s), seen.append(timeout()))\n"
        f"t = Trainer(parse_config(['--out', {str(tmp_path / 'run')!r}, '--depth', '1', '--embed-dim', '32',"
        " '--num-heads', '2', '--batch-size', '8', '--workers', '0', '--pretrain-steps', '0', '--max-steps', '3',"
        " '--num-samples', '0', '--no-export', '--no-progress', '--objective', 'tf', '--startup-timeout', '999',"
        " '--collective-timeout', '77']))\n"
        "start = timeout()\n"
        "t.run()\n"
        f"open(os.path.join({str(tmp_path)!r}, f'out{{t.info.rank}}'), 'w').write(json.dumps([start, seen]))\n"
        "from sar_fast.train import parallel as _p; _p.shutdown(); _p.exit_process(0)\n")
    res = _torchrun_script(script, timeout=200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "out0").read_text()) == [999.0, [77.0]]

"""The trainer end to end on the CPU: torchrun + gloo + FSDP2 (small models, few steps)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import PACKAGE_PATH
from sar_fast.train.checkpointing import list_checkpoints, resolve_resume
from sar_fast.models import load_checkpoint
from sar_fast.train import parse_config

SMALL = ["--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--batch-size", "16", "--num-samples", "4",
         "--log-every", "1", "--no-progress", "--workers", "0", "--top-k", "0"]


def _env():
    env = dict(os.environ, PYTHONPATH=PACKAGE_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _cmd(nproc, out, *flags):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            "-m", "sar_fast.train", "--out", str(out), *SMALL, *flags]


def _train(nproc, out, *flags, timeout=300):
    res = subprocess.run(_cmd(nproc, out, *flags), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(out):
    return torch.load(os.path.join(out, "export.pth"), weights_only=True)


@pytest.mark.parametrize("flags, msg", [
    (["--init", "/nope.pth"], "--init /nope.pth: no such file"),
    (["--data", "/nope"], "--data /nope: no such directory"),
    (["--preset", "flexvar-d16"], "needs --vae"),
    (["--preset", "flexvar-d16", "--cache", "."], "give --init"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--objective", "official", "--transitions", "all"], "official"),
    (["--betas", "0.9,1.5"], "--betas"),
    (["--resume", "/nope"], "--resume /nope"),
])
def test_bad_flags_fail_fast(flags, msg):
    with pytest.raises(SystemExit, match=msg):
        parse_config(flags)


def test_unknown_flag_and_help():
    res = subprocess.run([sys.executable, "-m", "sar_fast.train", "--lr", "abc"], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "--lr" in res.stderr
    res = subprocess.run([sys.executable, "-m", "sar_fast.train", "--help"], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--transitions" in res.stdout and "--pretrain-steps" in res.stdout


# CFG sampling of every scale (top-p 0.96 over the 17 codes): the SSR draws are keyed by each
# sample's global row, so 1 rank, 2 ranks and 2 ranks x 2 micro-batches draw the same codes
# (draws keyed by the rank's batch, e.g. one generator per (step, scale), would not).
SAR_CFG = ["--pretrain-steps", "2", "--max-steps", "2", "--objective", "sar", "--transitions", "all",
           "--sampling", "cfg", "--cfg", "1.5", "--gamma", "0.5", "--cond-drop", "0", "--ckpt-every", "2"]


def test_one_rank_equals_two_ranks(tmp_path):
    _train(1, tmp_path / "r1", *SAR_CFG)
    _train(2, tmp_path / "r2", *SAR_CFG)
    _train(2, tmp_path / "r2a", *SAR_CFG, "--grad-accum", "2", "--num-samples", "0")
    m1, m2, m2a = _metrics(tmp_path / "r1"), _metrics(tmp_path / "r2"), _metrics(tmp_path / "r2a")
    assert [r["objective"] for r in m1] == ["tf", "tf", "sar", "sar"]
    assert m1[-1]["csf_loss"] > 0
    for a, b, c in zip(m1, m2, m2a):
        for key in ("loss", "tf_loss", "csf_loss"):
            if a[key] is not None:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])
                assert abs(a[key] - c[key]) < 1e-5, (a["step"], key, a[key], c[key], "grad-accum")
    p1, p2, p2a = _params(tmp_path / "r1"), _params(tmp_path / "r2"), _params(tmp_path / "r2a")
    assert max((p1[k] - p2[k]).abs().max().item() for k in p1) < 1e-5
    assert max((p1[k] - p2a[k]).abs().max().item() for k in p1) < 1e-5
    # everything the run promises is on disk
    run = tmp_path / "r2"
    for name in ("loss.png", "samples.png", "config.json", "export.pth"):
        assert (run / name).stat().st_size > 0, name
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4]
    model = load_checkpoint(run / "export.pth")  # the flat export loads as a model
    assert model.config.depth == 1 and model.vocab_size == 17


NOISY = ["--depth", "2", "--cond-drop", "0.5", "--drop-path", "0.5", "--pretrain-steps", "1", "--max-steps", "2",
         "--lr", "1e-3", "--pretrain-lr", "1e-3",
         "--objective", "sar", "--transitions", "all", "--sampling", "cfg", "--gamma", "0.5",
         "--ckpt-every", "100", "--num-samples", "0"]


def test_label_dropout_and_drop_path_do_not_depend_on_ranks_or_accumulation(tmp_path):
    """1 == 2 == 4 ranks == 2 ranks x 2 micro-batches with label dropout, drop-path and CFG
    sampling of every transition on: all noise is keyed by (seed, step, global row), not
    drawn per rank."""
    runs = {"r1": (1,), "r2": (2,), "r4": (4,), "r2a2": (2, "--grad-accum", "2")}
    for name, (nproc, *extra) in runs.items():
        _train(nproc, tmp_path / name, *NOISY, *extra)
    m1, p1 = _metrics(tmp_path / "r1"), _params(tmp_path / "r1")
    for name in runs:
        m, p = _metrics(tmp_path / name), _params(tmp_path / name)
        diff = max((p1[k] - p[k]).abs().max().item() for k in p1)
        assert diff < 1e-5, (name, diff)  # per-rank noise: ~6e-4 after 3 steps
        for a, b in zip(m1, m):
            for key in ("loss", "tf_loss", "csf_loss"):
                if a[key] is not None:
                    assert abs(a[key] - b[key]) < 1e-5, (name, a["step"], key, a[key], b[key])
    # the noise is on: another seed changes the losses
    _train(1, tmp_path / "seed", *NOISY, "--seed", "1")
    assert _metrics(tmp_path / "seed")[0]["loss"] != m1[0]["loss"]


def test_resume_equals_straight_run(tmp_path):
    common = ["--pretrain-steps", "2", "--objective", "sar", "--sampling", "cfg", "--cond-drop", "0.2",
              "--ckpt-every", "2", "--keep-last", "5"]
    _train(2, tmp_path / "straight", *common, "--max-steps", "2")
    _train(2, tmp_path / "split", *common, "--max-steps", "0")  # stops after the TF phase (step 2)
    _train(2, tmp_path / "split", *common, "--max-steps", "2")  # --resume auto continues to step 4
    a, b = _params(tmp_path / "straight"), _params(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [r["loss"] for r in _metrics(tmp_path / "straight")]
    lb = [r["loss"] for r in _metrics(tmp_path / "split")]
    assert la == lb


def _wait_for(predicate, proc, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_kill_9_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    # plain python (a 1-rank group), so SIGKILL hits the process that is writing
    cmd = [sys.executable, "-m", "sar_fast.train", "--out", str(out), *SMALL, "--pretrain-steps", "0",
           "--max-steps", "200", "--objective", "tf", "--ckpt-every", "1", "--keep-last", "2", "--no-export",
           "--num-samples", "0"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        ckpts = out / "checkpoints"
        assert _wait_for(lambda: len(list_checkpoints(ckpts)) >= 2, proc, 240), "no checkpoints written"
        # kill the whole group while a save is in flight (a temp folder exists), else at once
        _wait_for(lambda: any(n.startswith(".tmp-") for n in os.listdir(ckpts)), proc, 20)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    path = resolve_resume("auto", str(ckpts))
    assert path is not None
    # the newest complete checkpoint loads, and training resumes from it
    _train(1, out, "--pretrain-steps", "0", "--max-steps", str(int(path[-8:]) + 1), "--objective", "tf",
           "--ckpt-every", "1000", "--no-export", "--num-samples", "0")
    assert list_checkpoints(ckpts)[-1][0] == int(path[-8:]) + 1


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    # the trainer process itself gets the signal (as from a cluster scheduler); torchrun would
    # forward it to its workers and then report the signal as its own exit status
    cmd = [sys.executable, "-m", "sar_fast.train", "--out", str(out), *SMALL, "--pretrain-steps", "0",
           "--max-steps", "100000", "--objective", "tf", "--ckpt-every", "100000", "--num-samples", "0",
           "--no-export"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc, 240)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "signal received" in err
    steps = list_checkpoints(out / "checkpoints")
    assert len(steps) == 1 and steps[0][0] >= 1


def test_nonfinite_losses_abort_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(_cmd(1, out, "--pretrain-steps", "0", "--max-steps", "50", "--objective", "tf",
                              "--lr", "1e30", "--clip", "0", "--warmup-steps", "0", "--max-nonfinite", "3",
                              "--num-samples", "0", "--no-export", "--ckpt-every", "1000"),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "non-finite losses in a row" in res.stderr
    rec = _metrics(out)[-1]
    assert rec["nonfinite_total"] >= 3
    assert list_checkpoints(out / "checkpoints"), "no checkpoint before the abort"


def test_code_cache_with_random_schedules_and_init(tmp_path):
    """--cache (every side 1..8 cached) serves FlexVAR's random schedules; --init starts from
    an earlier run's export."""
    from sar_fast.cache import main as cache_main
    cache = tmp_path / "cache"
    assert cache_main(["--data", "embedded-digits", "--vae", "embedded-digits", "--out", str(cache),
                       "--no-progress", "--num-workers", "0"]) == 0
    _train(1, tmp_path / "first", "--cache", str(cache), "--random-schedules", "--pretrain-steps", "1",
           "--max-steps", "2", "--objective", "sar", "--ckpt-every", "100")
    recs = _metrics(tmp_path / "first")
    assert len({tuple(r["schedule"]) for r in recs}) > 1 and all(r["schedule"][-1] == 8 for r in recs)
    _train(1, tmp_path / "second", "--init", str(tmp_path / "first" / "export.pth"), "--cache", str(cache),
           "--pretrain-steps", "0", "--max-steps", "1", "--objective", "tf", "--ckpt-every", "100")
    assert _metrics(tmp_path / "second")[0]["loss"] < _metrics(tmp_path / "first")[0]["loss"] + 1.0


def test_image_folder_with_a_real_tokenizer(tmp_path):
    """--data (class folders of images) tokenised on the fly by a FlexVQ16 checkpoint, and
    activation checkpointing."""
    import numpy as np
    from PIL import Image

    from sar_fast.models.tokenizers import FlexVQ16
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            img = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    tok = FlexVQ16(vocab_size=64, Cvae=4, z_channels=32, ch=32, ch_mult=(1, 1), num_res_blocks=1)
    torch.save({"model": tok.state_dict()}, tmp_path / "tok.pth")
    _train(2, tmp_path / "run", "--data", str(tmp_path / "data"), "--vae", str(tmp_path / "tok.pth"),
           "--resolution", "8", "--schedule", "1,2,4", "--pretrain-steps", "1", "--max-steps", "1",
           "--objective", "sar", "--activation-checkpointing", "--ckpt-every", "100")
    recs = _metrics(tmp_path / "run")
    assert [r["objective"] for r in recs] == ["tf", "sar"] and all(r["schedule"] == [1, 2, 4] for r in recs)
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    flags = ["--pretrain-steps", "0", "--max-steps", "2", "--objective", "tf", "--cond-drop", "0",
             "--ckpt-every", "100", "--num-samples", "0"]
    _train(2, tmp_path / "one", *flags)
    _train(2, tmp_path / "accum", *flags, "--grad-accum", "2")
    a, b = _params(tmp_path / "one"), _params(tmp_path / "accum")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    la, lb = _metrics(tmp_path / "one"), _metrics(tmp_path / "accum")
    assert all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(la, lb))


def test_batches_are_range_checked_on_the_host():
    from sar_fast.data.loader import check_batch_ranges
    check_batch_ranges(torch.tensor([0, 9]), torch.tensor([[0, 16]]), 10, 17)
    with pytest.raises(ValueError, match="labels in \\[0, 10\\] but the model has 10 classes"):
        check_batch_ranges(torch.tensor([0, 10]), None, 10, 17)
    with pytest.raises(ValueError, match="codes in \\[0, 17\\] but the tokenizer has 17 codes"):
        check_batch_ranges(torch.tensor([0]), torch.tensor([[0, 17]]), 10, 17)


def test_exit_process_runs_exit_handlers_and_keeps_the_code():
    """The trainer's clean exit skips the interpreter's teardown but not Python's exit
    handlers (e.g. a thread pool's join) nor buffered output."""
    code = ("import atexit, sys; from sar_fast.train import parallel; "
            "atexit.register(lambda: print('handler ran', flush=True)); "
            "sys.stdout.write('buffered '); parallel.exit_process(3)")
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr[-2000:]
    assert res.stdout == "buffered handler ran\n"

"""A launch as users outgrow one machine: two torchrun "nodes" of two processes each on
localhost, joined by torchrun's c10d rendezvous (no --standalone), training with --replicas 2
(HSDP: the parameters sharded within a node, replicated across the two), reach the same
weights and losses as one node of four processes."""
import json
import os
import socket
import subprocess
import sys
import uuid

from test_train import NOISY, SMALL, _env, _metrics, _params, _train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _node_cmd(out, port: int, run_id: str, *flags):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", run_id,
            "-m", "sar_fast.train", "--out", str(out), *SMALL, *flags]


def test_two_nodes_of_two_equal_one_node_of_four(tmp_path):
    _train(4, tmp_path / "one_node", *NOISY)
    port, run_id = _free_port(), f"sar-{uuid.uuid4().hex[:8]}"
    nodes = [subprocess.Popen(_node_cmd(tmp_path / "two_nodes", port, run_id, *NOISY, "--replicas", "2"),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=400) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:] + err[-3000:]
    # the two launchers formed one four-rank world (each rank saved its RNG state into the
    # final checkpoint; two separate two-rank worlds would have written rank0 and rank1 only),
    # and the mesh was HSDP's
    (ckpt,) = (tmp_path / "two_nodes" / "checkpoints").iterdir()
    assert sorted(os.listdir(ckpt / "rng")) == [f"rank{r}.pt" for r in range(4)]
    assert json.loads((tmp_path / "two_nodes" / "config.json").read_text())["system"]["replicas"] == 2
    a, b = _params(tmp_path / "one_node"), _params(tmp_path / "two_nodes")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, diff  # the tolerance of the 1 == 2 == 4 ranks test
    ma, mb = _metrics(tmp_path / "one_node"), _metrics(tmp_path / "two_nodes")
    assert len(ma) == len(mb) > 0
    for x, y in zip(ma, mb):
        for key in ("loss", "tf_loss", "csf_loss"):
            if x[key] is not None:
                assert abs(x[key] - y[key]) < 1e-5, (x["step"], key, x[key], y[key])

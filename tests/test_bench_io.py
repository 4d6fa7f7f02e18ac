"""The benches' JSON writer (bench/_common.JsonReport): a bench killed midway (a timeout, the
end of a GPU lease) leaves a valid JSON file holding every row it measured, and every
bench_*.py writes through it."""
import ast
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

BENCH = os.path.join(ROOT, "bench")

# writes three rows, announcing each on stdout, then hangs until killed
WRITER = """
import sys, time
sys.path.insert(0, {bench!r})
from _common import JsonReport
report = JsonReport({path!r}, bench="probe", rows=[])
for i in range(3):
    report.append("rows", {{"i": i, "payload": "x" * 100000}})
    print(i, flush=True)
time.sleep(600)
"""


def test_killed_bench_leaves_valid_json_of_the_rows_done(tmp_path):
    path = str(tmp_path / "probe.json")
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(bench=BENCH, path=path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        for want in ("0", "1", "2"):
            assert proc.stdout.readline().strip() == want
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    doc = json.load(open(path))
    assert doc["complete"] is False and doc["bench"] == "probe"
    assert [row["i"] for row in doc["rows"]] == [0, 1, 2]
    assert os.listdir(tmp_path) == ["probe.json"]  # no temporary file left behind


def test_every_write_is_a_whole_document(tmp_path, monkeypatch):
    """A reader that opens the file between any two writes finds valid JSON; close() marks it
    complete."""
    sys.path.insert(0, BENCH)
    monkeypatch.setattr(sys, "path", sys.path)
    from _common import JsonReport
    path = str(tmp_path / "r.json")
    seen = []
    report = JsonReport(path, header=1, rows=[])
    seen.append(json.load(open(path)))
    for i in range(4):
        report.append("rows", {"i": i})
        seen.append(json.load(open(path)))
    report.close(summary={"n": 4})
    final = json.load(open(path))
    assert [len(doc["rows"]) for doc in seen] == [0, 1, 2, 3, 4]
    assert not any(doc["complete"] for doc in seen)
    assert final["complete"] is True and final["summary"] == {"n": 4} and final["header"] == 1


def _bench_scripts() -> list[str]:
    return sorted(glob.glob(os.path.join(BENCH, "bench_*.py")))


@pytest.mark.parametrize("script", _bench_scripts(), ids=os.path.basename)
def test_every_bench_writes_through_the_row_writer(script):
    """No bench dumps its JSON in one piece at its end: each imports JsonReport and calls no
    json.dump itself."""
    tree = ast.parse(open(script).read(), script)
    imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "_common"
               for alias in node.names}
    dumps = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr == "dump"
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"]
    assert "JsonReport" in imports, f"{os.path.basename(script)} does not write through _common.JsonReport"
    assert not dumps, f"{os.path.basename(script)} calls json.dump at lines {dumps}"


def test_bench_train_step_rows_hold_memory_and_mfu(tmp_path):
    """The smoke run's rows carry peak memory ("n/a" on the CPU), tokens/s and the FLOP
    model's count (MFU null without a GPU peak)."""
    out = tmp_path / "ts"
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train_step.py"), "--smoke", "--cases", "tf,sar",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.load(open(out / "bench_train_step.json"))
    assert doc["complete"] and set(doc["cases"]) == {"tf", "sar"}, time.monotonic() - t0
    for row in doc["cases"].values():
        assert row["peak_allocated_gib"] == "n/a" and row["peak_reserved_gib"] == "n/a"
        assert row["model_flops"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] is None
    # sar runs the TF pass and more: the FLOP model counts more work than for tf
    assert doc["cases"]["sar"]["model_flops"] > doc["cases"]["tf"]["model_flops"]

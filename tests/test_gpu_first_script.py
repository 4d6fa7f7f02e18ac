"""bench/gpu_first.sh against the lent GPU's constraints (docs/gpu.md), read as text: no
package installs, no network, no bare `python` (the image has python3 only), every step
under its own timeout, the steps in the order the issue asks, their timeouts within 8.5
minutes together. Its --dry-run (.ci/run) runs every step's code path."""
import os
import re

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "bench", "gpu_first.sh")
BUDGET_S = 510  # 8.5 minutes: every step's timeout together
STEPS = ["env", "correctness", "train_step", "attention", "cross_entropy", "trainer", "extension"]


def code_lines(text: str) -> list[str]:
    """Logical lines (backslash continuations joined) without comments; heredoc bodies kept."""
    joined = re.sub(r"\\\n", " ", text)
    return [line for line in (re.sub(r"(^|\s)#.*$", "", raw).strip() for raw in joined.splitlines()) if line]


@pytest.fixture(scope="module")
def text() -> str:
    with open(SCRIPT) as f:
        return f.read()


def test_no_package_installs_or_network(text):
    code = "\n".join(code_lines(text))
    for pattern in (r"\bpip3?\b", r"\bconda\b", r"\bapt(-get)?\b", r"\bcurl\b", r"\bwget\b", r"https?://",
                    r"\bgit\s+(clone|fetch|pull|submodule)\b", r"\bssh\b", r"\bscp\b", r"--index-url",
                    r"\burllib\b", r"\brequests\b", r"huggingface", r"\bnc\s"):
        assert not re.search(pattern, code), f"gpu_first.sh uses {pattern!r}"


def test_python3_only(text):
    """Every interpreter call goes through $PY (python3, or $PYTHON3); `python` never bare."""
    for line in code_lines(text):
        assert not re.search(r"(?<![\w$./-])python(?![\w3])", line), f"bare python: {line}"
    assert re.search(r'^PY="\$\{PYTHON3:-python3\}"$', text, re.M), "PY must default to python3, overridable by PYTHON3"


def steps(text) -> list[tuple[str, str]]:
    """(name, timeout expression) of every `step` call, in order."""
    return [(m.group(1), m.group(2)) for line in code_lines(text)
            if (m := re.match(r'^step (\w+) ("[^"]*"|\S+) ', line))]


def test_steps_in_order_each_with_a_timeout_within_the_budget(text):
    found = steps(text)
    assert [name for name, _ in found] == STEPS
    fixed = [int(limit) for name, limit in found if name != "extension"]
    assert sum(fixed) <= BUDGET_S - 60, f"fixed timeouts {sum(fixed)} s leave step 6 under 60 s of {BUDGET_S}"
    assert fixed[1] <= 90, "the correctness pytest run gets at most 90 s"
    # the last step gets what is left of the budget, so all timeouts together stay within it
    assert re.search(rf"^TOTAL_BUDGET={BUDGET_S}\b", text, re.M)
    assert re.search(r"^LEFT=\$\(\(TOTAL_BUDGET \* SLACK - \(SECONDS - START\)\)\)$", text, re.M)
    assert dict(found)["extension"] == '"$((LEFT / SLACK))"'
    assert "timeout --kill-after=10 \"$limit\"" in text, "step() must run its command under timeout"


def test_every_interpreter_call_is_timed(text):
    """Each "$PY" call sits in a step line, under `timeout`, or in a function that only a
    step line runs (its timeout covers the function)."""
    lines = code_lines(text)
    step_lines = [line for line in lines if line.startswith("step ")]
    current = None
    for line in lines:
        if m := re.match(r"^(\w+)\(\) \{$", line):
            current = m.group(1)
            continue
        if line == "}":
            current = None
            continue
        if '"$PY"' not in line or line.startswith("step ") or "timeout " in line:
            continue
        assert current is not None, f"untimed interpreter call: {line}"
        callers = [s for s in step_lines if current in s]
        assert callers, f"{current}() runs {line!r} but no step runs {current}()"


def test_header_states_each_steps_timeout(text):
    header = text.split("set -u", 1)[0]
    for name, limit in steps(text):
        if limit.isdigit():
            assert re.search(rf"\b{limit} s\b", header), f"the header does not state {name}'s timeout ({limit} s)"
    assert "rest of 510 s" in header


def test_gpu_first_selection_holds_the_gpu_only_tests():
    """`-m gpu_first` (tests/conftest.py) picks the op matrix, every test that skips without a
    GPU, and leaves the CPU-only tests out."""
    import subprocess
    import sys
    files = ["tests/test_gpu_ops.py", "tests/test_scale_shift.py", "tests/test_cross_entropy.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "gpu_first", *files], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    selected = {line.split("[")[0] for line in done.stdout.splitlines() if "::" in line}
    assert {"tests/test_gpu_ops.py::test_scale_causal_attention", "tests/test_gpu_ops.py::test_cached_attention",
            "tests/test_gpu_ops.py::test_fused_head_loss", "tests/test_gpu_ops.py::test_scale_shift",
            "tests/test_scale_shift.py::test_bf16_output_on_gpu",  # skip reason names the GPU
            "tests/test_scale_shift.py::test_random_schedules_do_not_recompile",
            "tests/test_cross_entropy.py::test_kl_bf16_on_gpu_no_worse_than_eager",
            "tests/test_cross_entropy.py::test_half_precision_no_worse_than_eager"} <= selected
    assert "tests/test_scale_shift.py::test_codes_match_reference" not in selected

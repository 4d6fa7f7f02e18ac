#!/usr/bin/env python
"""Compile every Triton kernel variant the ops launch, for named GPU architectures, on a
machine without a GPU; report compile errors, shared memory, registers, spills and the
tensor-core instructions used. The CUDA quantiser (csrc/msq_cuda.cu) is compiled with nvcc.

    python bench/compile_report.py --arch 80,90,100 --out DIR [--dtypes bf16,fp16,fp32] [--jobs 2]

How the variants are found (nothing hand-written that could drift from the kernels): a
stand-in Triton driver reports a CUDA target (GPUTarget("cuda", arch, 32)) and the ops'
own launch code runs on CPU tensors at the d16 shapes -- the torch.library op bodies of
sar_fast.ops.* calling the launchers of sar_fast.kernels.* -- with every autotuned kernel
asked for every config its autotuner keeps after the project's own pruning. Triton's
jit_cache_hook records each compile request (Triton's own specialization data, as JSON)
instead of compiling or launching; a process pool then compiles each distinct request with
JITFunction.preload for that target. `cuobjdump -res-usage` (shipped with Triton) reads
registers and stack bytes (spills) from the cubin; the PTX says which tensor-core family
the GEMMs use (mma.sync on sm_80, wgmma on sm_90, tcgen05 on sm_100).

Workers run with TRITON_INTERPRET unset (the kernels pick their configs at import) and a
fresh Triton cache, so compile seconds are real. Writes DIR/compile_report.json and
DIR/compile_report.md; exit status 1 when a check fails (see `failures`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from sar_fast.kernels.support import HEAD_DIMS  # noqa: E402  (imports no triton)
from sar_fast.schedules import STANDARD_SCHEDULE  # noqa: E402

# d16 (VAR/FlexVAR depth 16) shapes: 256 px standard schedule, width 1024, vocabulary 8912.
D16 = dict(batch=2, schedule=tuple(STANDARD_SCHEDULE), channels=1024, vocab=8912,
           codebook_dim=32)
ARCHS = (80, 90, 100)
# Max dynamic shared memory per block (opt-in), CUDA programming guide, compute capabilities table.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
              120: 99 * 1024}
# Archs on which a variant must not spill (sm_100 is checked for compiling and fitting only).
NO_SPILL_ARCHS = (80, 90)
# Stack a variant may keep on a NO_SPILL arch under one Triton release (major.minor), with its
# cost; measured (bench/RESULTS.md), every other variant of that release compiles clean.
# Triton 3.6 (the lent GPU's image) gives the sm_90 KV-cache 16- and 32-query x 64-key tiles
# at head dim 128 an 8 / 16 B stack frame that 3.8 does not: one or two 8-byte local slots
# per thread, L1-resident, touched a few times per 64-key tile next to its 16-32 x 64 x 128
# x 2 tensor-core FLOPs; sampling (the KV cache) only, not the training step. Not worth a
# list per Triton release.
ACCEPTED_STACK = {
    ("3.6", 90, "_fwd_kernel", "HEAD_DIM=128 BLOCK_M=16 BLOCK_N=64 w8s3"): 8,
    ("3.6", 90, "_fwd_kernel", "HEAD_DIM=128 BLOCK_M=32 BLOCK_N=64 w8s3"): 16,
}
DTYPE_NAMES = ("bf16", "fp16", "fp32")
# Kernels that carry a GEMM (tl.dot) and so must use tensor cores.
GEMM_KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_ce_forward_kernel",
                "_kl_forward_kernel", "_grad_logits_kernel")
TENSOR_CORE_FAMILY = {80: "mma.sync", 90: "wgmma", 100: "tcgen05"}


# ----------------------------------------------------------------------------------------
# the stand-in driver and the recording of compile requests
# ----------------------------------------------------------------------------------------
def clean_env() -> None:
    """Compiles must see the real kernels, not the interpreter's configs."""
    os.environ.pop("TRITON_INTERPRET", None)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


class StandInDriver:
    """A Triton driver that reports a CUDA target and device 0 but can launch nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("stand-in driver: nothing can run here")


def _jit_functions() -> list:
    """Every JITFunction imported so far: triton >= 3.7 keeps a registry of them; 3.6 has
    none, so there they are collected from the imported sar_fast.kernels modules (the only
    kernels this report launches)."""
    try:
        from triton.runtime.jit import _triton_jit_function_registry
    except ImportError:
        return _kernel_jit_functions()
    return list(_triton_jit_function_registry.values())


def _kernel_jit_functions() -> list:
    """The JITFunctions of every sar_fast.kernels module (imported here if need be); tuned,
    autotuned and heuristic kernels wrap theirs (`.autotuner`, `.fn`, several layers deep)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import sar_fast.kernels as package
    from sar_fast.kernels._tuning import TunedKernel
    for info in pkgutil.iter_modules(package.__path__):  # a worker may not have imported them all yet
        importlib.import_module(f"{package.__name__}.{info.name}")
    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "sar_fast.kernels" or name.startswith("sar_fast.kernels.")):
            continue
        for value in vars(module).values():
            while not isinstance(value, JITFunction):  # TunedKernel -> Autotuner -> Heuristics -> JITFunction
                inner = value.autotuner if isinstance(value, TunedKernel) else getattr(value, "fn", None)
                if inner is None or inner is value:
                    break
                value = inner
            if isinstance(value, JITFunction):
                found[_jit_name(value)] = value
    return list(found.values())


def _jit_name(fn) -> str:
    """'module:qualname', the key triton's own registry uses."""
    return f"{fn.module}:{fn.fn.__qualname__}"


def _jit_function(name: str):
    """The JITFunction called `name` ('module:qualname') among the imported ones."""
    for fn in _jit_functions():
        if _jit_name(fn) == name:
            return fn
    raise KeyError(f"no imported Triton kernel {name!r}")


@contextlib.contextmanager
def stand_in(arch: int, on_request: Callable[[object, dict], None] | None = None):
    """Make `arch` the active target. With on_request: every compile a launch asks for is
    handed to on_request(jit_function, compile_info) and skipped (nothing compiles or runs),
    and every autotuned kernel is asked for each config left after its pruning."""
    from triton import knobs
    from triton.runtime import autotuner, driver

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        on_request(fn.jit_function, compile)
        return True  # skip: the pool compiles it

    def every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            for config in self.prune_configs(kwargs):
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    def drop_binders():  # a binder captures the target it was made for
        for f in _jit_functions():
            f.device_caches.clear()

    saved = (knobs.runtime.jit_cache_hook, autotuner.Autotuner.run, driver._active)
    drop_binders()
    driver.set_active(StandInDriver(arch))
    if on_request is not None:
        knobs.runtime.jit_cache_hook = hook
        autotuner.Autotuner.run = every_config
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook, autotuner.Autotuner.run, driver._active = saved
        drop_binders()


def current_arch() -> int | None:
    """The capability of the active Triton target (None when there is no CUDA target);
    what the kernels' config pruning keys on."""
    try:
        from triton.runtime import driver
        target = driver.active.get_current_target()
    except Exception:  # noqa: BLE001 - no driver at all (CPU-only, not interpreting)
        return None
    return int(target.arch) if getattr(target, "backend", None) == "cuda" else None


@dataclasses.dataclass
class Request:
    arch: int
    op: str          # the op call that asked for it (first one; `ops` lists all)
    kernel: str
    dtype: str
    config: str      # constexprs and launch options that tell the variants apart
    spec: str        # Triton's specialization data (JSON) for JITFunction.preload
    name: str        # module:qualname of the JITFunction
    ops: list = dataclasses.field(default_factory=list)


_TORCH_DTYPE_SHORT = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
_CONFIG_SKIP = {"DOT_PRECISION"}


def _describe(fn, info: dict) -> str:
    parts = []
    for path, value in info["constants"].items():
        name = fn.arg_names[path[0]]
        if name == "DOT_PRECISION" and value == "tf32" and _sig_dtype(info) == "fp32":
            parts.append("TF32")  # fp32 operands on TF32 tensor cores (torch's "high" fp32 matmul precision)
        elif name.isupper() and name not in _CONFIG_SKIP and not name.endswith("_ptr"):
            parts.append(f"{name}={value}")
    parts.append(f"w{info['num_warps']}s{info['num_stages']}")
    return " ".join(parts)


def _sig_dtype(info: dict) -> str:
    for ty in info["signature"].values():
        if isinstance(ty, str) and ty.startswith("*") and ty[1:] in ("bf16", "fp16"):
            return ty[1:]
    return "fp32"


@contextlib.contextmanager
def _fp32_matmul(precision: str):
    import torch
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


def _op_modules():
    """The op modules whose torch.library bodies are run (sar_fast.ops re-exports functions
    of the same names, hence the module imports by name)."""
    import importlib
    return tuple(importlib.import_module(f"sar_fast.ops.{m}") for m in ("attention", "cross_entropy", "scale_shift"))


def _d16_lengths() -> tuple[int, list[int], int]:
    """(B, per-scale token counts, L) of the d16 shapes."""
    lens = [s * s for s in D16["schedule"]]
    return D16["batch"], lens, sum(lens)


def _attention_case(dt, D: int) -> None:
    """scale_causal_attention: the custom ops with the arguments it passes, forward and backward."""
    import torch
    att = _op_modules()[0]
    B, lens, L = _d16_lengths()
    H = D16["channels"] // D
    q, k, v = (torch.empty(B, H, L, D, dtype=dt) for _ in range(3))
    lay = att.scale_layout(lens, q.device)
    out, lse = att._attention_fwd(q, k, v, lay.sid, lay.sid, lay.off, lay.off, D ** -0.5, att._NO_WINDOW, False)
    att._attention_bwd(torch.empty_like(q), q, k, v, out, lse, lay.sid, lay.sid, lay.off, lay.off,
                       D ** -0.5, att._NO_WINDOW)


def _cached_attention_case(dt, D: int) -> None:
    """cached_attention (sampling): each scale's queries against the cache so far."""
    import torch
    att = _op_modules()[0]
    B, lens, _ = _d16_lengths()
    H = D16["channels"] // D
    seen = 0
    for n in lens:
        seen += n
        q = torch.empty(B, H, n, D, dtype=dt)
        k, v = (torch.empty(B, H, seen, D, dtype=dt) for _ in range(2))
        ql, kl = att.scale_layout((n,), q.device), att.scale_layout((seen,), q.device)
        att._attention_fwd(q, k, v, ql.sid, kl.sid, ql.off, kl.off, D ** -0.5, 1, True)


def _fp32_precisions(dtype_name: str) -> tuple[str, ...]:
    """fp32 GEMMs run exact (IEEE) by default and on TF32 tensor cores under torch's "high"
    fp32 matmul precision (what the trainer sets): both are launched."""
    return ("ieee", "tf32") if dtype_name == "fp32" else ("ieee",)


def _cross_entropy_case(dt, precisions: tuple[str, ...]) -> None:
    """fused_linear_cross_entropy forward (with and without bias and smoothing) and backward."""
    import torch
    ce = _op_modules()[1]
    B, _, L = _d16_lengths()
    N, C, V = B * L, D16["channels"], D16["vocab"]
    h, w, b = torch.empty(N, C, dtype=dt), torch.empty(V, C, dtype=dt), torch.empty(V, dtype=dt)
    target = torch.zeros(N, dtype=torch.long)
    for precision in precisions:
        with _fp32_matmul(precision):
            for bias in (b, None):
                for smoothing in (0.0, 0.1):
                    _, lse, _ = ce._ce_fwd(h, w, bias, target, smoothing, -100)
                # the variant depends on the bias gradient flag, not on which of dh/dW is asked
                ce._ce_bwd(torch.empty(N), h, w, bias, target, lse, 0.1, -100,
                           bias is None, False, bias is not None)


def _kl_div_case(dt, precisions: tuple[str, ...]) -> None:
    """fused_linear_kl_div forward and backward, teacher given as logits and as hidden states."""
    import torch
    ce = _op_modules()[1]
    B, _, L = _d16_lengths()
    N, C, V = B * L, D16["channels"], D16["vocab"]
    h, w, b = torch.empty(N, C, dtype=dt), torch.empty(V, C, dtype=dt), torch.empty(V, dtype=dt)
    teachers = {"logits": (torch.empty(N, V, dtype=dt), None), "hidden": (None, torch.empty(N, C, dtype=dt))}
    for precision in precisions:
        with _fp32_matmul(precision):
            for bias in (b, None):
                for t_logits, t_hidden in teachers.values():
                    kl, lse, t_lse = ce._kl_fwd(h, w, bias, t_logits, t_hidden, 1.0)
                    ce._kl_bwd(kl, h, w, bias, t_logits, t_hidden, lse, t_lse, 1.0,
                               bias is None, False, bias is not None)


def _scale_shift_case(dt) -> None:
    """scale_shift from codes (TF: every transition, SSR: chosen ones), dense, and its adjoint."""
    import torch
    ss = _op_modules()[2]
    B, _, L = _d16_lengths()
    sched = D16["schedule"]
    codes = torch.zeros(B, L, dtype=torch.long)
    every = list(range(len(sched) - 1))
    # the scale shift works on codebook vectors (Cvae 32); the model width (1024) is
    # what a caller upsampling hidden states would pass (channel blocks of 128)
    for width in (D16["codebook_dim"], D16["channels"]):
        book = torch.empty(4096, width, dtype=dt)
        ss._codes_op(codes, book, list(sched), every, dt)  # TF: every transition
        ss._codes_op(codes, book, list(sched), every[::2], dt)  # SSR: chosen transitions
        maps = [torch.empty(B, width, s, s, dtype=dt) for s in sched]
        out = ss._dense_op(maps, list(sched), every, dt)
        ss._adjoint_op(out, list(sched), every, True, dt)
        ss._adjoint_op(out, list(sched), every, False, dt)


def _cases(dtypes: Iterable[str], head_dims: Iterable[int]) -> list[tuple[str, Callable[[], None]]]:
    """(label, call) for every op call whose launches are recorded: the torch.library op bodies
    (what the public ops run on the Triton path) on CPU tensors of the d16 shapes."""
    import torch
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cases = []
    for name in dtypes:
        dt = torch_dtype[name]
        for D in head_dims:
            cases += [(f"scale_causal_attention fwd+bwd {name} D{D}", functools.partial(_attention_case, dt, D)),
                      (f"cached_attention {name} D{D}", functools.partial(_cached_attention_case, dt, D))]
        precisions = _fp32_precisions(name)
        cases += [(f"fused_linear_cross_entropy fwd+bwd {name}",
                   functools.partial(_cross_entropy_case, dt, precisions)),
                  (f"fused_linear_kl_div fwd+bwd {name}", functools.partial(_kl_div_case, dt, precisions)),
                  (f"scale_shift TF/SSR/dense/adjoint {name}", functools.partial(_scale_shift_case, dt))]
    return cases


def record(arch: int, dtypes: Iterable[str], head_dims: Iterable[int]) -> list[Request]:
    """The distinct compile requests of every case for `arch` (runs in a clean worker)."""
    clean_env()
    import torch
    found: dict[tuple[str, str], Request] = {}
    label = [""]

    def on_request(fn, info):
        name = _jit_name(fn)
        spec = info["specialization_data"]
        key = (name, spec)
        if key not in found:
            found[key] = Request(arch, label[0], fn.fn.__name__, _sig_dtype(info), _describe(fn, info),
                                 spec, name)
        if label[0] not in found[key].ops:
            found[key].ops.append(label[0])

    torch.set_num_threads(1)
    with stand_in(arch, on_request):
        for case_label, call in _cases(dtypes, head_dims):
            label[0] = case_label
            call()
    return list(found.values())


# ----------------------------------------------------------------------------------------
# compiling one request and reading the binary
# ----------------------------------------------------------------------------------------
def _nvidia_bin(tool: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    return path if os.path.exists(path) else (shutil.which(tool) or tool)


def resource_usage(cubin: bytes) -> dict:
    """{'registers', 'stack', 'local', 'static_shared'} from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", -1)),
            "local": int(fields.get("LOCAL", -1)), "static_shared": int(fields.get("SHARED", 0))}


def tensor_core_family(ptx: str) -> str:
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


def compile_request(req: Request) -> dict:
    """Compile one request for its target; the row of the report (runs in a clean worker)."""
    clean_env()
    import importlib
    module = req.name.split(":")[0]
    importlib.import_module(module)
    fn = _jit_function(req.name)
    row = {k: v for k, v in dataclasses.asdict(req).items() if k != "spec"}
    start = time.perf_counter()
    try:
        with stand_in(req.arch):
            kernel = fn.preload(req.spec)
    except Exception as e:  # noqa: BLE001 - the error is the result
        last_line = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
        row.update(ok=False, error=f"{type(e).__name__}: {last_line}",
                   seconds=round(time.perf_counter() - start, 2))
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    usage = resource_usage(kernel.asm["cubin"])
    # what Triton's launcher checks against the device's opt-in limit (dynamic shared memory)
    import triton
    row.update(ok=True, error="", shared=int(kernel.metadata.shared), smem_limit=SMEM_LIMIT[req.arch], **usage,
               tensor_cores=tensor_core_family(kernel.asm["ptx"]), triton=triton.__version__)
    return row


# ----------------------------------------------------------------------------------------
# the CUDA quantiser (nvcc -Xptxas -v)
# ----------------------------------------------------------------------------------------
def cuda_home() -> str | None:
    """CUDA_HOME, else the root `nvcc --dryrun` reports in its _HERE_ line (minus /bin)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    text = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True)
    match = re.search(r"_HERE_=(\S+)", text.stdout + text.stderr)
    return os.path.dirname(match.group(1)) if match else None


_PTXAS_FUNC = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(text: str) -> list[dict]:
    """One row per entry function of `ptxas -v` output."""
    rows, cur = [], None
    for line in text.splitlines():
        if m := _PTXAS_FUNC.search(line):
            cur = {"kernel": m.group(1), "arch": int(re.sub(r"\D", "", m.group(2))), "registers": -1,
                   "stack": -1, "spill_stores": -1, "spill_loads": -1, "shared": 0}
            rows.append(cur)
        elif cur is not None and (m := _PTXAS_STACK.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := _PTXAS_REGS.search(line)):
            cur["registers"] = int(m.group(1))
            cur["shared"] = int(m.group(2) or 0)
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    def short(d: str) -> str:  # sar_fast::(anonymous namespace)::kernel<64>(float const*, ...) -> kernel<64>
        return d.replace("(anonymous namespace)::", "").split("(")[0].split("::")[-1]
    return {n: (short(d) if d else n) for n, d in zip(names, out)}


def compile_quantiser(archs: Iterable[int]) -> dict:
    """nvcc -c -Xptxas -v of csrc/msq_cuda.cu for each arch (sm_100 included when asked)."""
    home = cuda_home()
    if home is None:
        return {"ok": False, "error": "no nvcc / CUDA_HOME", "rows": []}
    import torch.utils.cpp_extension as ext
    includes = [f"-I{p}" for p in ext.include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}"]
    rows, errors, seconds = [], [], {}
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            # device code only (-cubin): ptxas -v is what is wanted, not the host object
            cmd = [os.path.join(home, "bin", "nvcc"), "-cubin", os.path.join(ROOT, "csrc", "msq_cuda.cu"),
                   "-o", os.path.join(tmp, "msq_cuda.cubin"), "-std=c++20", "-O3", "-DSAR_FAST_WITH_CUDA=1",
                   f"-arch=sm_{arch}", "-Xptxas", "-v",
                   "-D_GLIBCXX_USE_CXX11_ABI=1", "-DTORCH_EXTENSION_NAME=_C", *includes]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds[arch] = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            errors.append(f"sm_{arch}: " + (proc.stderr.strip().splitlines() or ["nvcc failed"])[-1][:300])
            continue
        rows += parse_ptxas(proc.stderr + proc.stdout)
    names = _demangle(sorted({r["kernel"] for r in rows}))
    for r in rows:
        r["mangled"], r["kernel"] = r["kernel"], names[r["kernel"]]
    return {"ok": not errors, "error": "; ".join(errors), "rows": rows, "seconds": seconds}


# ----------------------------------------------------------------------------------------
# the matrix, the checks and the tables
# ----------------------------------------------------------------------------------------
def _pool_init(cache_dir: str) -> None:
    clean_env()
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _pool(jobs: int, cache_dir: str):
    """Spawned workers that start with the interpreter switched off before anything imports
    triton (the kernels pick their configs at import)."""
    ctx = multiprocessing.get_context("spawn")
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return ctx.Pool(max(1, jobs), initializer=_pool_init, initargs=(cache_dir,))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def record_requests(archs: Iterable[int], dtypes: Iterable[str], head_dims: Iterable[int],
                    jobs: int = 2) -> list[Request]:
    """The compile requests of every op call (nothing compiled): which variants the ops'
    launch code asks for after the autotuners' pruning."""
    with tempfile.TemporaryDirectory(prefix="sar_fast_compile_") as cache_dir, _pool(jobs, cache_dir) as pool:
        return [r for rs in pool.starmap(record, [(a, list(dtypes), list(head_dims)) for a in archs]) for r in rs]


def run_matrix(archs: Iterable[int], dtypes: Iterable[str] = DTYPE_NAMES,
               head_dims: Iterable[int] = HEAD_DIMS, jobs: int = 2, progress: bool = True,
               kernels: Iterable[str] | None = None, subset: str = "all",
               partial: str | None = None) -> list[dict]:
    """Record and compile every variant (of `kernels` only, when given; subset "ci": see
    ci_subset); one row per (arch, distinct compile request). `partial`: a JSON-lines file
    that receives each row as it completes (a long run cut short keeps what finished)."""
    archs, dtypes, head_dims = list(archs), list(dtypes), list(head_dims)
    with tempfile.TemporaryDirectory(prefix="sar_fast_compile_") as cache_dir, _pool(jobs, cache_dir) as pool:
        requests = [r for rs in pool.starmap(record, [(a, dtypes, head_dims) for a in archs]) for r in rs
                    if kernels is None or r.kernel in kernels]
        if subset == "ci":
            requests = ci_subset(requests)
        # longest first (big tiles, many warps) for a short tail
        requests.sort(key=lambda r: -sum(int(x) for x in re.findall(r"\d+", r.config)))
        rows, start = [], time.perf_counter()
        sink = open(partial, "w") if partial else None
        for i, row in enumerate(pool.imap_unordered(compile_request, requests), 1):
            rows.append(row)
            if sink:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
            if progress and (i % 20 == 0 or i == len(requests)):
                print(f"  compiled {i}/{len(requests)} variants ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
        if sink:
            sink.close()
    rows.sort(key=lambda r: (r["arch"], r["kernel"], r["dtype"], r["config"]))
    return rows


# Flags whose variants differ by a little epilogue or prologue only; the CI subset compiles
# one variant per (arch, kernel, tile config, other constexprs) with these set on.
MINOR_FLAGS = ("HAS_BIAS", "SMOOTH", "BIAS_GRAD", "EVEN_K")


def ci_subset(requests: list[Request]) -> list[Request]:
    """One request per (arch, kernel, dtype, config without MINOR_FLAGS), preferring the one
    with the flags on (more work in the same registers). Length specialisations (the KV-cache
    path's Lq == 1, multiples of 16) share a config and so collapse to one variant too."""
    def flags_on(r):
        return sum(f"{f}=True" in r.config for f in MINOR_FLAGS)
    chosen: dict[tuple, Request] = {}
    for r in requests:
        rest = " ".join(p for p in r.config.split() if p.split("=")[0] not in MINOR_FLAGS)
        key = (r.arch, r.kernel, r.dtype, rest)
        if key not in chosen or flags_on(r) > flags_on(chosen[key]):
            chosen[key] = r
    return list(chosen.values())


def _allowed_tc(row: dict) -> tuple[str, ...]:
    """The arch's own tensor-core family; tiles under 64 rows (the KV-cache path's 16/32-query
    tiles) cannot fill a wgmma/tcgen05 warpgroup tile and may use mma.sync."""
    family = TENSOR_CORE_FAMILY.get(row["arch"], "mma.sync")
    blocks = [int(v) for k, v in re.findall(r"BLOCK_(M|N)=(\d+)", row["config"])]
    return (family, "mma.sync") if blocks and min(blocks) < 64 else (family,)


def _accepted_stack(row: dict) -> int:
    """The stack bytes ACCEPTED_STACK allows this row's variant (0: none)."""
    release = ".".join(str(row.get("triton", "")).split(".")[:2])
    return ACCEPTED_STACK.get((release, row["arch"], row["kernel"], row["config"]), 0)


def failures(rows: list[dict], quantiser: dict | None = None) -> list[str]:
    """Every violated check, one line each: compile errors, shared memory over the limit,
    spills on NO_SPILL_ARCHS, GEMM kernels without the arch's tensor-core instructions."""
    bad = []
    for r in rows:
        where = f"sm_{r['arch']} {r['kernel']} {r['dtype']} [{r['config']}]"
        if not r["ok"]:
            bad.append(f"compile error: {where}: {r['error']}")
            continue
        if r["shared"] > r["smem_limit"]:
            bad.append(f"shared memory: {where}: {r['shared']} B > {r['smem_limit']} B")
        if r["arch"] in NO_SPILL_ARCHS and r["stack"] != 0 and r["stack"] > _accepted_stack(r):
            bad.append(f"spill: {where}: {r['stack']} B stack/thread ({r['registers']} registers)")
        # fp32 inputs take exact IEEE products by default (no tensor cores), TF32 ones when asked
        on_tensor_cores = r["dtype"] != "fp32" or "TF32" in r["config"].split()
        if r["kernel"] in GEMM_KERNELS and on_tensor_cores and r["tensor_cores"] not in _allowed_tc(r):
            bad.append(f"tensor cores: {where}: {r['tensor_cores']} (want {'/'.join(_allowed_tc(r))})")
    if quantiser is not None:
        if not quantiser["ok"]:
            bad.append(f"quantiser: {quantiser['error']}")
        for r in quantiser["rows"]:
            if r["arch"] in NO_SPILL_ARCHS and (r["spill_stores"] or r["spill_loads"] or r["stack"]):
                bad.append(f"quantiser spill: sm_{r['arch']} {r['kernel']}: stack {r['stack']} B, "
                           f"spill stores {r['spill_stores']} B")
    return bad


def summary(rows: list[dict]) -> list[dict]:
    """Per (arch, kernel): variants, failures, overflows, spilling variants, max registers,
    max stack, max shared, tensor-core families, compile seconds."""
    out: dict[tuple, dict] = {}
    for r in rows:
        s = out.setdefault((r["arch"], r["kernel"]), dict(arch=r["arch"], kernel=r["kernel"], variants=0,
                                                          errors=0, overflow=0, spilling=0, max_registers=0,
                                                          max_stack=0, max_shared=0, tensor_cores=set(),
                                                          seconds=0.0))
        s["variants"] += 1
        s["seconds"] += r["seconds"]
        if not r["ok"]:
            s["errors"] += 1
            continue
        s["overflow"] += r["shared"] > r["smem_limit"]
        s["spilling"] += r["stack"] > 0
        s["max_registers"] = max(s["max_registers"], r["registers"])
        s["max_stack"] = max(s["max_stack"], r["stack"])
        s["max_shared"] = max(s["max_shared"], r["shared"])
        s["tensor_cores"].add(r["tensor_cores"])
    for s in out.values():
        s["tensor_cores"] = "/".join(sorted(s["tensor_cores"]))
        s["seconds"] = round(s["seconds"], 1)
    return [out[k] for k in sorted(out)]


def markdown(rows: list[dict], quantiser: dict | None, wall: float, jobs: int) -> str:
    lines = [f"# Compile report ({len(rows)} Triton variants, {wall:.0f} s wall with {jobs} jobs)", "",
             "| arch | kernel | variants | errors | smem over | spilling | max regs | max stack B | "
             "max smem KB (limit) | tensor cores | compile s |", "|" + "---|" * 11]
    for s in summary(rows):
        lines.append(f"| sm_{s['arch']} | {s['kernel']} | {s['variants']} | {s['errors']} | {s['overflow']} | "
                     f"{s['spilling']} | {s['max_registers']} | {s['max_stack']} | "
                     f"{s['max_shared'] / 1024:.0f} ({SMEM_LIMIT[s['arch']] // 1024}) | {s['tensor_cores']} | "
                     f"{s['seconds']} |")
    if quantiser is not None:
        lines += ["", "## CUDA quantiser (nvcc -Xptxas -v)", "",
                  "| arch | kernel | registers | stack B | spill stores B | spill loads B | smem B |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| sm_{r['arch']} | {r['kernel']} | {r['registers']} | {r['stack']} | {r['spill_stores']} | "
                  f"{r['spill_loads']} | {r['shared']} |" for r in quantiser["rows"]]
        if quantiser["error"]:
            lines.append(f"\nerror: {quantiser['error']}")
    lines += ["", "## Every variant", "",
              "| arch | kernel | dtype | config | ok | regs | stack B | smem B | tensor cores | s | first op |",
              "|" + "---|" * 11]
    for r in rows:
        if r["ok"]:
            lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['config']} | yes | {r['registers']} | "
                         f"{r['stack']} | {r['shared']} | {r['tensor_cores']} | {r['seconds']} | {r['op']} |")
        else:
            lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['dtype']} | {r['config']} | "
                         f"**{r['error'][:80]}** | | | | | {r['seconds']} | {r['op']} |")
    return "\n".join(lines) + "\n"


def _kernels_dir() -> str:
    """Where the workers' `sar_fast.kernels` comes from (an installed copy may not be this checkout)."""
    import importlib.util
    return os.path.dirname(os.path.realpath(importlib.util.find_spec("sar_fast.kernels").origin))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80,90,100", help="compute capabilities, comma separated (default 80,90,100)")
    p.add_argument("--dtypes", default=",".join(DTYPE_NAMES), help="bf16,fp16,fp32 (default: all three)")
    p.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="attention head dims")
    p.add_argument("--out", default="runs/compile_report", help="output folder")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile processes (default 2)")
    p.add_argument("--kernels", default="", help="only these kernels (comma separated names, e.g. _fwd_kernel)")
    p.add_argument("--subset", choices=("all", "ci"), default="all",
                   help="ci: one variant per kernel config, minor flags on (what tests/test_compile.py runs)")
    p.add_argument("--no-quantiser", action="store_true", help="skip nvcc on csrc/msq_cuda.cu")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]
    unknown = [a for a in archs if a not in SMEM_LIMIT]
    if unknown:
        p.error(f"--arch: no shared-memory limit known for {unknown}; known: {sorted(SMEM_LIMIT)}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    if set(dtypes) - set(DTYPE_NAMES):
        p.error(f"--dtypes must be among {DTYPE_NAMES}, got {dtypes}")
    head_dims = [int(d) for d in args.head_dims.split(",") if d]
    os.makedirs(args.out, exist_ok=True)
    kernels_dir = _kernels_dir()
    if os.path.commonpath([kernels_dir, ROOT]) != ROOT:
        print(f"warning: the kernels compiled are those of the installed sar_fast in {kernels_dir}, "
              f"not of this checkout ({ROOT})", file=sys.stderr, flush=True)

    start = time.perf_counter()
    kernels = [k for k in args.kernels.split(",") if k] or None
    rows = run_matrix(archs, dtypes, head_dims, args.jobs, kernels=kernels, subset=args.subset,
                      partial=os.path.join(args.out, "compile_report.partial.jsonl"))
    quantiser = None if args.no_quantiser else compile_quantiser([a for a in archs])
    wall = time.perf_counter() - start
    bad = failures(rows, quantiser)
    report = {"kernels_dir": kernels_dir, "archs": archs, "dtypes": dtypes, "head_dims": head_dims, "shapes": D16,
              "wall_seconds": round(wall, 1), "jobs": args.jobs, "failures": bad, "summary": summary(rows),
              "variants": rows, "quantiser": quantiser}
    with open(os.path.join(args.out, "compile_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "compile_report.md"), "w") as f:
        f.write(markdown(rows, quantiser, wall, args.jobs))
    for s in summary(rows):
        print(f"sm_{s['arch']:<3} {s['kernel']:<26} {s['variants']:>3} variants  errors {s['errors']}  "
              f"smem-over {s['overflow']}  spilling {s['spilling']}  max regs {s['max_registers']}  "
              f"max stack {s['max_stack']}  tc {s['tensor_cores']}  {s['seconds']} s")
    print(f"{len(rows)} variants, {len(bad)} failures, {wall:.0f} s -> {args.out}/compile_report.{{json,md}}")
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

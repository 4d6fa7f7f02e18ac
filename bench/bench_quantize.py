"""Benchmark multi-scale quantisation: the C++/CUDA extension vs the PyTorch reference.

    python bench/bench_quantize.py --out DIR                 # CUDA if available, else CPU
    python bench/bench_quantize.py --out DIR --device cpu [--repeats 5]
    python bench/bench_quantize.py --out DIR --smoke           # CPU, tiny shapes: seconds

Shapes (FlexVAR / VAR d16): B = 64 latents of C = 32 channels at 16 x 16, the standard
schedule (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) (L = 680 tokens), codebooks of V = 8912
(FlexVAR, L2-normalised) and 4096 (VAR, raw) rows; both modes are run with both sizes.
- flexvar: every scale area-downsampled and quantised independently (normalize=True);
- var: VAR's residual quantiser with Phi = 0.5 h + 0.5 conv3x3(h) (4 shared convs, as
  VAR) between the scales (normalize=False); Phi's cost is the same on both sides.
Peers: `reference` = sar_fast.ops.reference.msq_encode (per scale F.interpolate, a
[N, V] score matrix from addmm, argmin); `extension` = sar_fast.ops.msq_encode through
sar_fast._C (flexvar: one call for all scales; var: one call per scale).
Time: median (and min) of --repeats calls after a warm-up, peers interleaved.
Peak memory: on CUDA, torch.cuda.max_memory_allocated over the call minus what was
allocated before. On CPU, the peak resident set size over the call minus the RSS before it
(/proc/self/status VmHWM after resetting it through /proc/self/clear_refs); PyTorch's CPU
allocations are invisible to tracemalloc, and RSS also counts pages the allocator had
already mapped, so analytic sizes are reported next to it: for the reference its largest
[N, V] fp32 score matrix (the last scale, N = B * 256; several temporaries of that size are
alive at once), for the extension all its buffers (token rows, norms, codes, codebook copies).
`agree` = fraction of codes equal to the reference's. Writes DIR/bench_quantize.json and,
if matplotlib imports, DIR/bench_quantize.png.
Target: extension >= 3x faster than the reference on the CPU, memory independent of V.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import JsonReport, add_smoke_flag, bar_panels, time_ms  # noqa: E402

from sar_fast.schedules import STANDARD_SCHEDULE  # noqa: E402

SCHEDULE = STANDARD_SCHEDULE
TARGET_SPEEDUP = 3.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for bench_quantize.json / .png")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocabs", type=int, nargs="+", default=[8912, 4096])
    p.add_argument("--modes", nargs="+", choices=["flexvar", "var"], default=["flexvar", "var"])
    p.add_argument("--repeats", type=int, default=None, help="timed calls per peer (default 5 CPU, 20 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_smoke_flag(p)
    return p.parse_args()


class PeakMemory:
    """Peak memory of one call: CUDA allocator statistics, or the process's peak RSS."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda
        self.rss_ok = not cuda and os.path.exists("/proc/self/clear_refs")

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def measure(self, fn) -> float | None:
        """MiB above the level before the call, or None when it cannot be measured."""
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            before = self.torch.cuda.memory_allocated()
            fn()
            self.torch.cuda.synchronize()
            return (self.torch.cuda.max_memory_allocated() - before) / 2**20
        if not self.rss_ok:
            fn()
            return None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.rss_ok = False
            fn()
            return None
        before = self._status_kib("VmRSS")
        fn()
        return (self._status_kib("VmHWM") - before) / 1024


def make_phi(torch, channels: int, device):
    convs = [torch.nn.Conv2d(channels, channels, 3, padding=1).to(device) for _ in range(4)]

    def phi(h, i, n):
        conv = convs[min(3, (4 * i) // max(1, n))]
        return 0.5 * h + 0.5 * conv(h)
    return phi


def measure_case(torch, report: JsonReport, memory: PeakMemory, latent, codebook, mode: str, phi,
                 cuda: bool, repeats: int) -> None:
    """One (mode, V) case: reference vs extension time, peak and analytic memory, and how
    often their codes agree; a row per peer, the speedup in the summary, one printed line."""
    from sar_fast import ops
    from sar_fast.ops import reference
    normalize = mode == "flexvar"
    run_phi = phi if mode == "var" else None
    B, C, H = latent.shape[0], latent.shape[1], latent.shape[-1]
    V = codebook.shape[0]

    def ref():
        return reference.msq_encode(latent, codebook, SCHEDULE, mode, normalize, run_phi)

    def ext():
        with ops.use_backend("kernel"):  # the extension, never the reference
            return ops.msq_encode(latent, codebook, SCHEDULE, mode, normalize, run_phi)

    peers = {"reference": ref, "extension": ext}
    want = ref()
    agree = {"reference": 1.0, "extension": (ext() == want).float().mean().item()}
    peak = {name: memory.measure(fn) for name, fn in peers.items()}
    times = time_ms(peers, "cuda" if cuda else "cpu", repeats)
    nv_mib = B * H * H * V * 4 / 2**20
    L = sum(s * s for s in SCHEDULE)
    # the extension's buffers: token rows (+ their normalised copy), norms and
    # codes per token, the fp32 codebook and its packed copy
    ext_mib = (B * L * (2 * C * 4 + 4 + 8) + 2 * V * C * 4) / 2**20
    analytic = {"reference": nv_mib, "extension": ext_mib}
    for name in peers:
        row = {"mode": mode, "V": V, "case": f"{mode} V={V}", "peer": name, "B": B,
               "ms_median": statistics.median(times[name]), "ms_min": min(times[name]),
               "ms_all": times[name], "peak_mib": peak[name], "agree": agree[name],
               "analytic_mib": analytic[name]}
        report.append("rows", row)
    speedup = statistics.median(times["reference"]) / statistics.median(times["extension"])
    report.append("summary", {"mode": mode, "V": V, "speedup": speedup})
    print(f"{mode:8s} V={V:5d}  reference {statistics.median(times['reference']):9.1f} ms"
          f" (peak {_fmt(peak['reference'])} MiB; largest [N,V] fp32 {nv_mib:.0f} MiB)  "
          f"extension {statistics.median(times['extension']):8.1f} ms (peak "
          f"{_fmt(peak['extension'])} MiB; buffers {ext_mib:.1f} MiB)  speedup {speedup:5.1f}x  "
          f"agree {agree['extension']:.6f}",
          flush=True)


def main() -> int:
    args = parse_args()
    if args.smoke:  # CPU, 2 latents, a 64-row codebook, one timed call per peer
        args.device, args.batch, args.vocabs, args.repeats = "cpu", 2, [64], 1
    import torch

    from sar_fast import _C_loader

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not (torch.cuda.is_available() and _C_loader.cuda_compiled()):
        print("bench_quantize: CUDA requested but no GPU or no CUDA kernels in sar_fast._C", file=sys.stderr)
        return 2
    if not _C_loader.has_extension():
        print("bench_quantize: sar_fast._C is not built; " + _C_loader.BUILD_HINT, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    repeats = args.repeats or (20 if cuda else 5)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    B, C, H = args.batch, 32, SCHEDULE[-1]
    latent = torch.randn(B, C, H, H, device=device)
    memory = PeakMemory(torch, cuda)
    report = JsonReport(
        os.path.join(args.out, "bench_quantize.json"), bench="quantize",
        device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        cpu_threads=torch.get_num_threads(), cpu_isa=_C_loader.cpu_isa(), torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"), batch=B, channels=C, side=H, schedule=SCHEDULE, repeats=repeats,
        target_speedup=TARGET_SPEEDUP, rows=[], summary=[],
        memory_method="torch.cuda.max_memory_allocated delta" if cuda else "peak RSS delta (VmHWM)")
    with torch.no_grad():
        phi = make_phi(torch, C, device)
        for mode in args.modes:
            for V in args.vocabs:
                codebook = torch.randn(V, C, device=device) * (1.0 if mode == "flexvar" else 0.5)
                measure_case(torch, report, memory, latent, codebook, mode, phi, cuda, repeats)
    report.close()
    cases = [f"{m} V={v}" for m in args.modes for v in args.vocabs]
    bar_panels(os.path.join(args.out, "bench_quantize.png"), report.doc["rows"], "case", cases,
               ["reference", "extension"],
               [(m, key, f"{m}: {title}") for m in args.modes
                for key, title in (("ms_median", "ms per call (median)"), ("peak_mib", "peak memory (MiB)"))],
               grid=(len(args.modes), 2))
    worst = min(s["speedup"] for s in report.doc["summary"])
    print(f"slowest speedup {worst:.1f}x (target >= {TARGET_SPEEDUP}x)")
    return 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{max(v, 0.0):.0f}"


if __name__ == "__main__":
    sys.exit(main())

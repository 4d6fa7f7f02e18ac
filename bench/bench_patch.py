"""Benchmark sar_fast.patch: an original-class model (the test stand-ins of VAR's VAR and
FlexVAR's FlexVAR, which reproduce the originals' dense-mask attention), unpatched vs patched.

    python bench/bench_patch.py --out DIR [--batch 16] [--family var flexvar infinity]
    python bench/bench_patch.py --out DIR --smoke         # no GPU: tiny shapes, interpreter

Shapes (GPU): d16 (depth 16, width 1024, 16 heads of 64, MLP 4x), scales 1..16 (L = 680),
vocab 4096 (VAR) / 8912 (FlexVAR), code dim 32, bf16 autocast, fp32 master weights.
Peers, one training step each (teacher-forcing input given, forward + loss + backward):
- unpatched: the model as its project ships it: SDPA with the dense L x L float mask,
  head(x) then CrossEntropyLoss(label_smoothing=0.1, reduction='none') on fp32 logits;
- patched:   patch_model(model): attention through sar_fast's block-causal kernel;
- patched+loss: also hidden_states(model) + sar_fast.nn.FusedLinearCrossEntropy (no logits).
Infinity (the stand-in of FoundationVision/Infinity's model, --family infinity, GPU shapes
Infinity-2B: depth 32, width 2048, 16 heads of 128, cosine attention, 2-D RoPE, its 1024 px
1:1 schedule of 13 (1, h, w) boxes (L = 10521) padded to a multiple of 128 (L = 10624), text
cross-attention over 64 tokens, MLP 4x, 64 bit-label logits, batch --infinity-batch):
unpatched = SDPA with Infinity's dense [1, 1, L, L] bias; patched = patch_model(model).
Reported: median step ms, ratio vs unpatched, peak memory allocated above the model and
inputs during the step, and the max abs logit difference patched vs unpatched.
Writes DIR/bench_patch.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import JsonReport, add_smoke_flag, start, time_ms  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for bench_patch.json")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--family", nargs="+", default=["var", "flexvar"], choices=["var", "flexvar", "infinity"])
    p.add_argument("--infinity-batch", type=int, default=1, help="batch of the Infinity-2B case")
    p.add_argument("--repeats", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    add_smoke_flag(p)
    return p.parse_args()


INFINITY_1024 = [(1, h, h) for h in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)]  # dynamic_resolution.py '1M'


def build_infinity(smoke: bool, device: str):
    from standins.infinity_like import Infinity
    if smoke:
        boxes, dims = [(1, 1, 1), (1, 2, 3), (1, 3, 5)], dict(depth=2, embed_dim=128, num_heads=4, mlp_ratio=2)
    else:
        boxes, dims = INFINITY_1024, dict(depth=32, embed_dim=2048, num_heads=16, mlp_ratio=4)
    model = Infinity([boxes], in_dim=32, vocab=64, pad_to_multiplier=8 if smoke else 128, **dims)
    return model.to(device), boxes, 64


def build(torch, family: str, smoke: bool, device: str):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    if family == "infinity":
        return build_infinity(smoke, device)
    from standins.flexvar_like import FlexVAR, VQModel
    from standins.var_like import VAR, VQVAE

    from sar_fast.schedules import STANDARD_SCHEDULE
    if smoke:
        dims = dict(depth=2, embed_dim=64, num_heads=2)
        sides, vocab = (1, 2, 3), 64
    else:
        dims = dict(depth=16, embed_dim=1024, num_heads=16)
        sides, vocab = tuple(STANDARD_SCHEDULE), (4096 if family == "var" else 8912)
    if family == "var":
        vae = VQVAE(vocab_size=vocab, z_channels=32, v_patch_nums=sides)
        model = VAR(vae, num_classes=1000, patch_nums=sides, **dims)
    else:
        vae = VQModel(codebook_size=vocab, codebook_embed_dim=32)
        model = FlexVAR(vae, num_classes=1000, patch_nums=sides, pos_grid=max(sides), **dims)
    return model.to(device), sides, vocab


def training_step(torch, family: str, model, sides, V: int, batch: int, device: str, autocast):
    """step(fused_loss) -> logits (None with the fused loss): one forward + loss + backward
    of `model` on fixed random inputs of the family's kind."""
    import torch.nn.functional as F
    from sar_fast.nn import FusedLinearCrossEntropy
    from sar_fast.patch import hidden_states
    infinity = family == "infinity"
    L = sum(t * h * w for t, h, w in sides) if infinity else sum(s * s for s in sides)
    labels = torch.randint(0, 1000, (batch,), device=device)
    x = torch.randn(batch, L - 1, 32, device=device)
    gt = torch.randint(0, V, (batch, L), device=device)
    fused_ce = FusedLinearCrossEntropy(model.head, label_smoothing=0.1)
    if infinity:  # text condition and cross-attention tokens instead of a class label
        C = model.C
        labels = (torch.randn(batch, C, device=device), torch.randn(batch, 64, C, device=device))

    def forward(fused_loss: bool):
        extra = () if family == "var" else (list(sides),)
        with autocast:
            if infinity:
                logits = model(x, list(sides), *labels)
                ce = F.cross_entropy(logits.float().view(-1, V), gt.view(-1), label_smoothing=0.1)
                return ce, logits.detach()
            if fused_loss:
                with hidden_states(model):
                    h = model(labels, x, *extra)
                return fused_ce(h, gt).mean(), None
            logits = model(labels, x, *extra)
            ce = F.cross_entropy(logits.float().view(-1, V), gt.view(-1), label_smoothing=0.1, reduction="none")
            return ce.mean(), logits.detach()

    def step(fused_loss: bool):
        model.zero_grad(set_to_none=True)
        loss, logits = forward(fused_loss)
        loss.backward()
        return logits
    return step


def compare_family(torch, family: str, model, step, device: str, repeats: int, warmup: int) -> list[dict]:
    """The family's rows: unpatched, patched and (VAR, FlexVAR) patched+loss, each with its
    ratio to unpatched and the max abs logit difference patched vs unpatched."""
    from sar_fast.patch import patch_model, unpatch
    cuda = device == "cuda"

    def measure(peer: str, fused_loss: bool):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = time_ms({peer: lambda: step(fused_loss)}, device, repeats, warmup)[peer]
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
        return {"family": family, "peer": peer, "ms": statistics.median(times), "peak_mib": peak}

    ref_logits = step(False)
    rows = [measure("unpatched", False)]
    patch_model(model)
    diff = (step(False).float() - ref_logits.float()).abs().max().item()
    rows.append(measure("patched", False))
    if family != "infinity":  # the stand-in has no get_logits / hidden_states hook
        rows.append(measure("patched+loss", True))
    unpatch(model)
    for r in rows:
        r["vs_unpatched"] = rows[0]["ms"] / r["ms"]
        r["max_abs_logit_diff"] = diff
    return rows


def main() -> None:
    args = parse_args()
    got = start("bench_patch", args.out, args.smoke, args.dtype)
    if got is None:
        return
    torch, device, dtype = got
    from sar_fast import ops
    cuda = device == "cuda"
    if not cuda:
        ops.set_backend("kernel")  # the kernels under the interpreter, not the reference
    B = 2 if args.smoke else args.batch
    repeats, warmup = (1, 1) if args.smoke else (args.repeats, args.warmup)
    autocast = torch.autocast(device, dtype=dtype, enabled=cuda and dtype != torch.float32)
    path = os.path.join(args.out, "bench_patch.json")
    report = JsonReport(path, device=torch.cuda.get_device_name() if cuda else "cpu (interpreter smoke)",
                        batch=B, dtype=str(dtype), results=[])
    for family in args.family:
        torch.manual_seed(0)
        model, sides, V = build(torch, family, args.smoke, device)
        model.cond_drop_rate = 0.0
        batch = args.infinity_batch if family == "infinity" and not args.smoke else B
        step = training_step(torch, family, model, sides, V, batch, device, autocast)
        for r in compare_family(torch, family, model, step, device, repeats, warmup):
            mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} MiB"
            print(f"{family:8s} {r['peer']:13s} {r['ms']:9.2f} ms  x{r['vs_unpatched']:.2f}  peak {mem}  "
                  f"|patched - unpatched logits| <= {r['max_abs_logit_diff']:.3g}", flush=True)
            report.append("results", r)  # a family's rows compare with its unpatched one: written together
    report.close()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""sar_fast.patch for FoundationVision/Infinity: the fused block-causal attention in place of
the customised FlashAttention, FlexAttention or dense-bias SDPA call of `SelfAttention`.

    from sar_fast.patch import patch_infinity   # or patch_model (detects Infinity)
    report = patch_infinity(infinity)
    ...                                          # train / sample as before; unpatch(infinity)

Facts of Infinity's code this module relies on (infinity/models/basic.py, infinity.py,
flex_attn.py); every attribute is also listed in REQUIRED (sar_fast.patch.core) and checked:

  Infinity.forward           pads x to a multiple of `pad_to_multiplier` (need_to_pad rows
                             after the last scale) in the SDPA and FlexAttention branches; the
                             customised-flash branch passes (Infinity_visible_kvlen,
                             Infinity_invisible_qlen)[:l_end] and does not pad. Branch order:
                             customized_flash_attn, then use_flex_attn (attn_fn =
                             attn_fn_compile_dict[tuple(scale_schedule)], asserts C % 128 == 0,
                             no bias), else the dense [1, 1, L, L] bias (padded rows see token 0).
                             Returns head(x[:, :l_end]): padded rows never reach the loss.
  scale_schedule             list of (t, h, w) boxes; scale i holds t * h * w tokens.
  SelfAttention.forward      (x, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None,
                             rope2d_freqs_grid=None, scale_ind=0): qkv = linear(x, mat_qkv.weight,
                             cat(q_bias, zero_k_bias, v_bias)) viewed [B, L, 3, H, c]; using_flash:
                             q, k, v [B, L, H, c] (scale_mul_1H11 is [1, 1, H, 1]), else
                             [B, H, L, c] ([1, H, 1, 1]); cos_attn: q = normalize(q) *
                             exp(clamp_max(scale_mul_1H11, max_scale_mul)), k = normalize(k),
                             softmax scale `scale` (1); rope: the module-level
                             apply_rotary_emb(q, k, scale_schedule, rope2d_freqs_grid,
                             pad_to_multiplier, rope2d_normalized_by_hw, scale_ind) when the
                             grid is given; caching: cached_k / cached_v grow along L;
                             out -> proj -> proj_drop.
  inference                  kv_caching(True), blocks called per scale with
                             attn_bias_or_two_vector=None (attn_fn = the dict's .get(...)):
                             every query sees every cached key; no padding.
  CrossAttnBlock.sa / .ca    self- / cross-attention (t2i); SelfAttnBlock.attn (class-cond).

The dense bias is only built in Infinity.forward's SDPA branch; the patch sends such a model
through its FlexAttention branch instead (use_flex_attn=True, attn_fn_compile_dict = fused
callables for any schedule), which pads the same way and builds no mask, so no L x L tensor
is allocated. No FlexAttention is compiled. unpatch restores both attributes.
"""
from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from .. import ops as _ops
from ..ops.attention import HEAD_DIMS
from .core import REQUIRED, PatchError, PatchReport, _apply, _require, _Swap

REQUIRED.update({
    "Infinity": {
        "pad_to_multiplier": "sequence padded to a multiple of it (padded rows see token 0)",
        "unregistered_blocks": "every block, whatever the block_chunks grouping",
        "customized_flash_attn": "branch 1 of forward: the (visible_kvlen, invisible_qlen) vectors",
        "use_flex_attn": "branch 2 of forward: set True so that no L x L bias is built",
        "attn_fn_compile_dict": "replaced: schedule -> fused attention callable",
        "C": "width; FlexAttention branch asserts C % 128 == 0",
    },
    "CrossAttnBlock": {"sa": "the SelfAttention module", "ca": "CrossAttention (left alone)"},
    "SelfAttnBlock": {"attn": "the SelfAttention module"},
    # deliberate repeat: of var.py's SelfAttention rows: each family's table lists its own upstream attributes
    "Infinity.SelfAttention": {
        "forward": "replaced (x, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid, scale_ind)",
        "mat_qkv": "Linear(C, 3C, bias=False)", "q_bias": "q part of the qkv bias",
        "zero_k_bias": "k part of the qkv bias (zeros)", "v_bias": "v part of the qkv bias",
        "num_heads": "heads H", "head_dim": "c = C / H; must be one the kernel takes",
        "using_flash": "customised-flash layout [B, L, H, c] (else [B, H, L, c])",
        "cos_attn": "cosine attention with a learned per-head gain",
        "scale": "the softmax scale (1 with cos_attn)",
        "pad_to_multiplier": "passed to apply_rotary_emb",
        "rope2d_normalized_by_hw": "passed to apply_rotary_emb",
        "proj": "output Linear", "proj_drop": "output dropout module",
        "caching": "KV cache on (kv_caching(True), sampling)",
        "cached_k": "the cached keys", "cached_v": "the cached values",
    },
    "Infinity.SelfAttention(cos_attn)": {
        "scale_mul_1H11": "log of the per-head gain", "max_scale_mul": "the cap of that log-gain",
    },
    "Infinity.basic": {"apply_rotary_emb": "the model's own 2-D RoPE, called as the original does"},
})


def box_lens(scale_schedule) -> list[int]:
    """Tokens per scale of Infinity's (t, h, w) boxes."""
    lens = []
    for box in scale_schedule:
        if len(box) != 3 or any(int(n) < 1 for n in box):
            raise RuntimeError(f"sar_fast.patch: scale_schedule entries must be (t, h, w) boxes of positive "
                               f"sides, got {box!r} in {scale_schedule!r}")
        lens.append(int(box[0]) * int(box[1]) * int(box[2]))
    return lens


def _block_causal(q, k, v, scale_schedule, softmax_scale):
    """q, k, v [B, H, L, c] over the boxes of scale_schedule plus Infinity's padded tail."""
    if scale_schedule is None:
        raise RuntimeError("sar_fast.patch: Infinity's SelfAttention got a mask but no scale_schedule; "
                           "the block-causal layout is taken from scale_schedule")
    lens = box_lens(scale_schedule)
    pad = q.shape[2] - sum(lens)
    if pad < 0:
        raise RuntimeError(f"sar_fast.patch: the attention got {q.shape[2]} tokens, fewer than the "
                           f"{sum(lens)} of scale_schedule={list(scale_schedule)}")
    return _ops.padded_scale_causal_attention(q, k, v, lens, pad, softmax_scale)


class FusedAttnFn:
    """A drop-in for Infinity's FlexAttn.forward(q, k, v, scale): [B, H, L, c] in and out;
    training layout from the schedule, KV-cache calls (fewer queries than keys) unmasked."""
    def __init__(self, scale_schedule):
        self.scale_schedule = tuple(tuple(b) for b in scale_schedule)

    def __call__(self, q, k, v, scale=None):
        q, k = q.to(v.dtype), k.to(v.dtype)
        if q.shape[2] != k.shape[2]:
            return _ops.cached_attention(q, k, v, softmax_scale=scale)
        return _block_causal(q, k, v, self.scale_schedule, scale)


class FusedAttnFns:
    """Replaces Infinity.attn_fn_compile_dict: a FusedAttnFn for any schedule (no compile)."""
    def __getitem__(self, scale_schedule) -> FusedAttnFn:
        return FusedAttnFn(scale_schedule)

    def get(self, scale_schedule, default=None) -> FusedAttnFn:
        return FusedAttnFn(scale_schedule)

    def __contains__(self, scale_schedule) -> bool:
        return True


def _attention_forward(rope):
    def forward(self, x, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None,
                scale_ind=0):
        B, L, C = x.shape
        in_bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, in_bias).view(B, L, 3, self.num_heads, self.head_dim)
        if self.using_flash:
            (q, k, v), L_dim = qkv.unbind(2), 1
        else:
            (q, k, v), L_dim = qkv.permute(2, 0, 3, 1, 4).unbind(0), 2
        if self.cos_attn:
            gain = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q, k = F.normalize(q, dim=-1, eps=1e-12).mul(gain), F.normalize(k, dim=-1, eps=1e-12)
        if rope2d_freqs_grid is not None:  # the model's RoPE, in the model's layout
            q, k = rope(q, k, scale_schedule, rope2d_freqs_grid, self.pad_to_multiplier,
                        self.rope2d_normalized_by_hw, scale_ind)
        if self.caching:
            if self.cached_k is not None:
                k, v = torch.cat((self.cached_k, k), dim=L_dim), torch.cat((self.cached_v, v), dim=L_dim)
            self.cached_k, self.cached_v = k, v
        if self.using_flash:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        # one dtype for the kernel, as the original's flash call (the fp32 gain promotes q)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if self.caching or (attn_bias_or_two_vector is None and attn_fn is None):
            out = _ops.cached_attention(q, k, v, softmax_scale=self.scale)  # every query sees every key
        else:
            out = _block_causal(q, k, v, scale_schedule, self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))
    return forward


def _self_attention(block, where: str) -> tuple[object, str] | str:
    """(SelfAttention, its label) of a block, or the problem."""
    if hasattr(block, "sa"):
        return _require(block, "CrossAttnBlock", where) or (block.sa, where + ".sa")
    return _require(block, "SelfAttnBlock", where) or (block.attn, where + ".attn")


def _attention_swaps(model, report: PatchReport) -> list[_Swap]:
    names = {id(m): n for n, m in model.named_modules()}
    swaps = []
    for i, block in enumerate(model.unregistered_blocks):
        found = _self_attention(block, names.get(id(block), f"unregistered_blocks.{i}"))
        if isinstance(found, str):
            report.left_alone.append((f"unregistered_blocks.{i}", found))
            continue
        attn, where = found
        basic = sys.modules.get(type(attn).__module__)
        problem = (_require(attn, "Infinity.SelfAttention", where)
                   or (attn.cos_attn and _require(attn, "Infinity.SelfAttention(cos_attn)", where))
                   or _require(basic, "Infinity.basic", f"module {type(attn).__module__}"))
        if problem:
            report.left_alone.append((where, problem))
        elif attn.head_dim not in HEAD_DIMS:
            report.left_alone.append((where, f"SelfAttention.head_dim={attn.head_dim}: the attention kernel "
                                      f"takes head dims {HEAD_DIMS}"))
        elif attn.caching and attn.cached_k is not None:
            report.left_alone.append((where, "SelfAttention.cached_k is set: patch between generations"))
        else:
            forward = _attention_forward(basic.apply_rotary_emb)
            swaps.append(_Swap(attn, "forward", lambda m, f=forward: types.MethodType(f, m), where + ".forward"))
    return swaps


def _no_bias_swaps(model, report: PatchReport) -> list[_Swap]:
    """Route Infinity.forward around its dense bias (see the module docstring)."""
    swaps = [_Swap(model, "attn_fn_compile_dict", lambda m: FusedAttnFns(), "attn_fn_compile_dict")]
    if model.customized_flash_attn or model.use_flex_attn:
        return swaps  # O(L) vectors, or no mask at all: nothing L x L left to skip
    if int(model.C) % 128:
        report.left_alone.append(("Infinity.forward's L x L bias", f"Infinity.C={model.C}: its FlexAttention "
                                  f"branch (the one without the bias) asserts C % 128 == 0; the patched attention "
                                  f"does not read the bias, but forward still builds it"))
        return swaps
    return swaps + [_Swap(model, "use_flex_attn", lambda m: True, "use_flex_attn=True")]


def _sdpa_blhc(q, k, v, softmax_scale=None, causal=False):
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         is_causal=causal, scale=softmax_scale)
    return out.transpose(-3, -2)


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **unsupported):
    """Stock flash_attn_func semantics ([B, L, H, c]) through SDPA."""
    if dropout_p or unsupported:
        raise NotImplementedError(f"sar_fast's flash_attn shim: dropout_p={dropout_p}, {sorted(unsupported)} "
                                  f"are not implemented (install flash-attn)")
    return _sdpa_blhc(q, k, v, softmax_scale, causal)


def _flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     dropout_p=0.0, softmax_scale=None, causal=False, **unsupported):
    """Stock varlen semantics (q [Nq, H, c], kv [Nk, 2, H, c], sequences cut at cu_seqlens_*)
    through SDPA, one sequence at a time (Infinity's text cross-attention)."""
    if dropout_p or causal or unsupported:
        raise NotImplementedError("sar_fast's flash_attn shim: dropout, causal and extra options are not "
                                  "implemented (install flash-attn)")
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        k, v = kv[ck[i]:ck[i + 1]].unbind(1)
        out[cq[i]:cq[i + 1]] = _sdpa_blhc(q[None, cq[i]:cq[i + 1]], k[None], v[None], softmax_scale)[0]
    return out


def install_flash_attn_shim() -> bool:
    """Infinity's basic.py imports flash_attn_func and flash_attn_varlen_kvpacked_func at module
    import. Without flash-attn installed, call this before importing Infinity: it registers a
    module `flash_attn` with both (stock semantics, through SDPA). Infinity then finds no
    customised kernel (it looks for 'Infinity' in flash_attn_func's arguments) and takes its
    SDPA path, which patch_infinity replaces; the fused flash ops (flash_attn.ops.*) are
    imported under try/except there and stay off. Returns False (and does nothing) when
    flash_attn is importable."""
    try:
        import flash_attn  # noqa: F401
        return False
    except ImportError:
        pass
    shim = types.ModuleType("flash_attn", "sar_fast's stand-in for flash-attn's two attention calls (SDPA)")
    shim.flash_attn_func = _flash_attn_func
    shim.flash_attn_varlen_kvpacked_func = _flash_attn_varlen_kvpacked_func
    sys.modules["flash_attn"] = shim
    return True


def patch_infinity(model, strict: bool = True) -> PatchReport:
    """Patch an Infinity instance (FoundationVision/Infinity `Infinity`): every block's
    SelfAttention call through the fused kernel; cross-attention, RoPE, the cosine-attention
    gain, parameters, buffers and state_dict() untouched. strict=False patches what it can
    and lists the rest in the report."""
    if "Infinity" not in {c.__name__ for c in type(model).__mro__}:
        raise PatchError(f"patch_infinity expects an Infinity instance, got {type(model).__name__}")
    report = PatchReport("Infinity")
    problem = _require(model, "Infinity", "Infinity")
    if problem:
        report.left_alone.append(("attention", problem))
        return _apply(model, [], report, strict)
    swaps = _attention_swaps(model, report)
    all_patched = len(swaps) == len(model.unregistered_blocks)
    if all_patched:  # an unpatched SelfAttention would read the bias the reroute drops
        swaps += _no_bias_swaps(model, report)
    elif swaps:
        report.left_alone.append(("Infinity.forward's L x L bias", "kept: some SelfAttention modules are not patched"))
    return _apply(model, swaps, report, strict)


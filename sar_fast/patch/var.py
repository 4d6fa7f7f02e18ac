"""Put sar_fast's fused ops into model objects of the original VAR / FlexVAR / SAR projects
(Infinity: sar_fast.patch.infinity; `sar_fast.patch` exports both).

    from sar_fast.patch import patch_model, unpatch
    report = patch_model(var)            # VAR, or FlexVAR / SAR's FlexVAR (family detected)
    ...                                  # train / sample exactly as before
    unpatch(var)                         # the original methods again

What is swapped, per instance (never per class: a second model of the same class is left as
it is), by binding replacement methods on the module objects:
- every block's `SelfAttention.forward`: q/k/v, VAR's `attn_l2_norm` scaling and the KV cache
  as the original computes them, the attention through `sar_fast.ops.scale_causal_attention`
  (training: the scale layout is taken from the model's `patch_nums`, i.e. FlexVAR's schedule
  of the current call and SAR's `[1, n]` student-forcing layout) or `cached_attention`
  (sampling); the `attn_bias` argument is not read (see _check_mask_buffer).
- FlexVAR: `update_patch_related` keeps the schedule bookkeeping but builds no L x L bias.
- VAR's `VectorQuantizer2` (reached through `VAR.vae_quant_proxy`): `f_to_idxBl_or_fhat`
  through `msq_encode`, `idxBl_to_var_input` through `scale_shift`.
- FlexVAR / SAR trainers (`patch_flexvar(model, trainer=...)`): `encode_var_wo_firstL`
  through `msq_encode` + `scale_shift`.
Parameters, buffers and state_dict() are never touched. The loss side is opt-in:
`hidden_states(model)` makes the model return the pre-head hidden state for
`sar_fast.nn.FusedLinearCrossEntropy(model.head)`.

Every attribute of the original classes this module relies on is listed in REQUIRED below and
checked at patch time, so an upstream rename fails loudly, naming the attribute.
"""
from __future__ import annotations

import contextlib
import types
import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .. import ops as _ops
from ..ops.attention import HEAD_DIMS  # the head dims the attention kernel takes
from .core import _MISSING, REQUIRED, PatchError, PatchReport, _apply, _require, _Swap, is_patched, unpatch
from .infinity import patch_infinity

__all__ = ["PatchError", "PatchReport", "REQUIRED", "patch_model", "patch_var", "patch_flexvar", "patch_infinity",
           "unpatch", "is_patched", "hidden_states"]


# ------------------------------------------------------------------------------------------
# THE table (sar_fast.patch.core.REQUIRED, one for every family): every attribute of the
# original classes the patch reads or replaces, and why.
# Class names are those of the original projects (VAR: FoundationVision/VAR models/;
# FlexVAR: jiaosiyu1999/FlexVAR models/ + trainer.py; SAR: GengzeZhou/SAR, same classes).
# ------------------------------------------------------------------------------------------
REQUIRED.update({
    "VAR": {
        "patch_nums": "scale sides; the block-causal layout of the attention",
        "blocks": "the AdaLNSelfAttn blocks whose attention is swapped",
        "attn_bias_for_masking": "checked once: must be the block-causal mask of patch_nums",
        "vae_quant_proxy": "(VectorQuantizer2,): the tokenizer's quantiser",
        "head": "the classifier Linear (hidden_states / FusedLinearCrossEntropy)",
        "get_logits": "calls self.head; hidden_states relies on it",
    },
    "FlexVAR": {
        "patch_nums": "the schedule of the current call (set by update_patch_related)",
        "blocks": "the AdaLNSelfAttn blocks whose attention is swapped",
        "update_patch_related": "replaced: same bookkeeping, no L x L bias built",
        "L": "set by update_patch_related", "first_l": "set by update_patch_related",
        "begin_ends": "set by update_patch_related",
        "num_stages_minus_1": "set by update_patch_related",
        "head": "the classifier Linear (hidden_states / FusedLinearCrossEntropy)",
        "get_logits": "calls self.head; hidden_states relies on it",
    },
    "AdaLNSelfAttn": {"attn": "the SelfAttention module"},
    "SelfAttention": {
        "forward": "replaced (x, attn_bias) -> [B, L, C]",
        "mat_qkv": "Linear(C, 3C, bias=False)", "q_bias": "q part of the qkv bias",
        "zero_k_bias": "k part of the qkv bias (zeros)", "v_bias": "v part of the qkv bias",
        "num_heads": "heads H", "head_dim": "D = C / H; must be one the kernel takes",
        "attn_l2_norm": "cosine attention with a learned per-head gain",
        "scale": "the softmax scale (1 with attn_l2_norm)",
        "proj": "output Linear", "proj_drop": "output dropout module",
        "attn_drop": "attention dropout probability; must be 0 (the kernel has no dropout)",
        "caching": "KV cache on (kv_caching(True), sampling)",
        "cached_k": "the cached keys", "cached_v": "the cached values",
        "kv_caching": "turns the cache on/off and clears it (kept as is)",
    },
    "SelfAttention(attn_l2_norm)": {
        "scale_mul_1H11": "log of the per-head gain [1, H, 1, 1]",
        "max_scale_mul": "the cap of that log-gain",
    },
    "VectorQuantizer2": {
        "f_to_idxBl_or_fhat": "replaced: residual multi-scale encode through msq_encode",
        "idxBl_to_var_input": "replaced: teacher-forcing input through scale_shift",
        "embedding": "the codebook Embedding [V, Cvae]",
        "v_patch_nums": "the tokenizer's scale sides",
        "using_znorm": "cosine (True) or Euclidean (False) nearest code",
        "quant_resi": "Phi convs, indexed by si / (SN - 1)",
        "prog_si": "progressive training index; any value but -1 runs the original code",
    },
    "VectorQuantizer": {  # FlexVAR / SAR: LlamaGen VQ-16
        "embedding": "the codebook Embedding [V, Cvae]",
        "l2_norm": "normalised codebook and latents",
        "show_usage": "in training mode the original updates codebook_used: runs the original",
    },
    "VQModel": {"encode_conti": "image -> continuous latent", "quantize": "the VectorQuantizer"},
    "VARTrainer": {
        "encode_var_wo_firstL": "replaced: (x, curr_patch_nums) -> (inputs [B, L-1, C], codes [B, L])",
        "vae_local": "the VQModel",
    },
})


def _family(obj) -> str | None:
    names = {c.__name__ for c in type(obj).__mro__}
    for family in ("FlexVAR", "VAR"):  # SAR's model class is FlexVAR
        if family in names:
            return family
    return None


# ------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------
def _scale_lens(model_ref: weakref.ref, L: int, family: str) -> list[int]:
    """Tokens per scale of the first scales of model.patch_nums that hold L tokens (VAR's
    progressive training uses a prefix; FlexVAR/SAR set patch_nums per call)."""
    model = model_ref()
    if model is None:
        raise RuntimeError("sar_fast.patch: the patched model was garbage-collected")
    lens, total = [], 0
    for p in model.patch_nums:
        lens.append(int(p) * int(p))
        total += lens[-1]
        if total == L:
            return lens
    raise RuntimeError(f"sar_fast.patch: the attention got {L} tokens, but {family}.patch_nums = "
                       f"{tuple(model.patch_nums)} has no scale prefix of that length; the block-causal "
                       f"layout is taken from patch_nums, so call the blocks through the model's forward")


def _attention_forward(model_ref: weakref.ref, family: str):
    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        in_bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, in_bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, D] views, no copy
        if self.attn_l2_norm:
            gain = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q, k = F.normalize(q, dim=-1).mul(gain), F.normalize(k, dim=-1)
        # the fp32 gain promotes q under autocast; the kernel wants one dtype, as VAR's flash path
        q, k, v = q.to(qkv.dtype), k.to(qkv.dtype), v.to(qkv.dtype)
        if self.caching:  # sampling: this scale's queries against every cached scale
            if self.cached_k is not None:
                k, v = torch.cat((self.cached_k, k), dim=2), torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
            out = _ops.cached_attention(q, k, v, softmax_scale=self.scale)
        elif attn_bias is None:  # the originals' no-mask call: every query sees every key
            out = _ops.cached_attention(q, k, v, softmax_scale=self.scale)
        else:
            out = _ops.scale_causal_attention(q, k, v, _scale_lens(model_ref, L, family),
                                              softmax_scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))
    return forward


def _check_mask_buffer(model, family: str) -> str | None:
    """The patched attention builds the mask from patch_nums instead of reading attn_bias; that
    is only right when the model's own mask is the block-causal mask of patch_nums."""
    lens = [int(p) * int(p) for p in model.patch_nums]
    L = sum(lens)
    bias = model.attn_bias_for_masking
    if bias.dim() != 4 or bias.shape[-1] < L or bias.shape[-2] < L:
        if family == "FlexVAR":
            return None  # rebuilt per call from that call's schedule; nothing to compare yet
        return f"{family}.attn_bias_for_masking has shape {tuple(bias.shape)}, not [1, 1, {L}, {L}]"
    level = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    visible = (level[:, None] >= level[None, :]).to(bias.device)
    top = bias[0, 0, :L, :L]
    if not (torch.equal(top == 0, visible) and torch.equal(top == float("-inf"), ~visible)):
        return (f"{family}.attn_bias_for_masking is not the block-causal mask of {family}.patch_nums="
                f"{tuple(model.patch_nums)}: a layout the scale_causal_attention kernel cannot express")
    return None


def _attention_swaps(model, family: str, report: PatchReport) -> list[_Swap]:
    problem = _require(model, family, family)
    if problem:
        report.left_alone.append(("attention", problem))
        return []
    if not all(isinstance(p, int) or (hasattr(p, "__int__") and not isinstance(p, (tuple, list)))
               for p in model.patch_nums):
        report.left_alone.append(("attention", f"{family}.patch_nums={model.patch_nums!r}: only square "
                                  f"scales (int sides) map onto the kernel's layout"))
        return []
    problem = _check_mask_buffer(model, family)
    if problem:
        report.left_alone.append(("attention", problem))
        return []
    ref = weakref.ref(model)
    forward = _attention_forward(ref, family)
    swaps = []
    for i, block in enumerate(model.blocks):
        where = f"blocks.{i}"
        problem = _require(block, "AdaLNSelfAttn", where) or _require(block.attn, "SelfAttention", where + ".attn")
        if not problem and block.attn.attn_l2_norm:
            problem = _require(block.attn, "SelfAttention(attn_l2_norm)", where + ".attn")
        if problem:
            report.left_alone.append((where + ".attn", problem))
            continue
        attn = block.attn
        if attn.head_dim not in HEAD_DIMS:
            report.left_alone.append((where + ".attn", f"SelfAttention.head_dim={attn.head_dim}: the attention "
                                      f"kernel takes head dims {HEAD_DIMS}"))
        elif float(attn.attn_drop) > 0:
            report.left_alone.append((where + ".attn", f"SelfAttention.attn_drop={attn.attn_drop}: the kernel "
                                      f"has no attention dropout"))
        elif attn.caching and attn.cached_k is not None:
            report.left_alone.append((where + ".attn", "SelfAttention.cached_k is set: patch between "
                                      "generations, not during one"))
        else:
            swaps.append(_Swap(attn, "forward", lambda m: types.MethodType(forward, m), where + ".attn.forward"))
    return swaps


# ------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------
def _var_phi(quant) -> Callable:
    return lambda h, i, n: quant.quant_resi[i / (n - 1)](h)


def _square_sides(sides) -> tuple[int, ...] | None:
    out = []
    for p in sides:
        if isinstance(p, (tuple, list)):
            if len(p) != 2 or p[0] != p[1]:
                return None
            p = p[0]
        out.append(int(p))
    return tuple(out)


def _var_quantizer_swaps(quant, where: str, report: PatchReport) -> list[_Swap]:
    problem = _require(quant, "VectorQuantizer2", where)
    if problem:
        report.left_alone.append((where, problem))
        return []
    encode_orig, input_orig = quant.f_to_idxBl_or_fhat, quant.idxBl_to_var_input

    def f_to_idxBl_or_fhat(self, f_BChw, to_fhat, v_patch_nums=None):
        sides = _square_sides(v_patch_nums or self.v_patch_nums)
        if self.prog_si >= 0 or sides is None:  # progressive training / non-square: the original
            return encode_orig(f_BChw, to_fhat, v_patch_nums)
        out = _ops.msq_encode(f_BChw, self.embedding.weight, sides, mode="var", normalize=bool(self.using_znorm),
                              phi=_var_phi(self), return_quantized=bool(to_fhat))
        if to_fhat:
            return out[1]
        return list(out.split([s * s for s in sides], dim=1))

    def idxBl_to_var_input(self, gt_ms_idx_Bl):
        sides = _square_sides(self.v_patch_nums)
        if self.prog_si >= 0 or sides is None:
            return input_orig(gt_ms_idx_Bl)
        if len(sides) == 1:
            return None
        codes = list(gt_ms_idx_Bl)
        if len(codes) == len(sides) - 1:  # the last scale's codes are never read
            codes.append(codes[0].new_zeros(codes[0].shape[0], sides[-1] ** 2))
        return _ops.scale_shift(torch.cat(codes, dim=1), self.embedding.weight, sides, mode="var",
                                phi=_var_phi(self), out_dtype=torch.float32)

    return [_Swap(quant, "f_to_idxBl_or_fhat", lambda m: types.MethodType(f_to_idxBl_or_fhat, m),
                  where + ".f_to_idxBl_or_fhat"),
            _Swap(quant, "idxBl_to_var_input", lambda m: types.MethodType(idxBl_to_var_input, m),
                  where + ".idxBl_to_var_input")]


def _flexvar_trainer_swaps(trainer, report: PatchReport) -> list[_Swap]:
    problem = _require(trainer, "VARTrainer", "trainer")
    vae = getattr(trainer, "vae_local", None)
    problem = problem or _require(vae, "VQModel", "trainer.vae_local") \
        or _require(vae.quantize, "VectorQuantizer", "trainer.vae_local.quantize")
    if problem:
        report.left_alone.append(("trainer.encode_var_wo_firstL", problem))
        return []
    original = trainer.encode_var_wo_firstL

    def encode_var_wo_firstL(self, x, curr_patch_nums):
        quant = self.vae_local.quantize
        if quant.training and quant.show_usage:  # the original also updates codebook_used
            return original(x, curr_patch_nums)
        h = self.vae_local.encode_conti(x)
        sides = tuple(int(s) for s in curr_patch_nums)
        if h.shape[-1] != sides[-1] or h.shape[-2] != sides[-1]:  # the original resizes the last scale too
            return original(x, curr_patch_nums)
        book = quant.embedding.weight
        codes = _ops.msq_encode(h, book, sides, mode="flexvar", normalize=bool(quant.l2_norm))
        embed = F.normalize(book, p=2, dim=-1) if quant.l2_norm else book
        inputs = _ops.scale_shift(codes, embed, sides, mode="flexvar", check_range=False, out_dtype=h.dtype)
        return inputs, codes

    return [_Swap(trainer, "encode_var_wo_firstL", lambda m: types.MethodType(encode_var_wo_firstL, m),
                  "trainer.encode_var_wo_firstL")]


# ------------------------------------------------------------------------------------------
# FlexVAR's per-call schedule without the mask
# ------------------------------------------------------------------------------------------
def _update_patch_related(self, infer_patch_nums):
    """FlexVAR.update_patch_related minus the L x L bias (the patched attention derives the
    layout from patch_nums). attn_bias_for_masking keeps its value."""
    self.patch_nums = infer_patch_nums
    self.L = sum(p * p for p in infer_patch_nums)
    self.first_l = infer_patch_nums[0] ** 2
    self.begin_ends, start = [], 0
    for p in infer_patch_nums:
        self.begin_ends.append((start, start + p * p))
        start += p * p
    self.num_stages_minus_1 = len(infer_patch_nums) - 1


# ------------------------------------------------------------------------------------------
# public entry points
# ------------------------------------------------------------------------------------------
def patch_var(model, strict: bool = True, attention: bool = True, tokenizer: bool = True) -> PatchReport:
    """Patch a VAR model instance (FoundationVision/VAR `VAR`) and its VQVAE's quantiser."""
    if _family(model) != "VAR":
        raise PatchError(f"patch_var expects a VAR instance, got {type(model).__name__}")
    report = PatchReport("VAR")
    swaps = _attention_swaps(model, "VAR", report) if attention else []
    if tokenizer:
        proxy = getattr(model, "vae_quant_proxy", None)
        quant = proxy[0] if isinstance(proxy, tuple) and proxy else None
        if quant is None:
            report.left_alone.append(("tokenizer", "VAR.vae_quant_proxy[0] (the VectorQuantizer2) is missing"))
        else:
            swaps += _var_quantizer_swaps(quant, "vae_quant_proxy[0]", report)
    return _apply(model, swaps, report, strict)


def patch_flexvar(model, trainer=None, strict: bool = True, attention: bool = True) -> PatchReport:
    """Patch a FlexVAR model instance (FlexVAR's or SAR's `FlexVAR`) and, when given, the
    trainer's teacher-forcing builder `encode_var_wo_firstL` (FlexVAR's / SAR's VARTrainer)."""
    if _family(model) != "FlexVAR":
        raise PatchError(f"patch_flexvar expects a FlexVAR instance, got {type(model).__name__}")
    report = PatchReport("FlexVAR")
    swaps = []
    if attention:
        swaps = _attention_swaps(model, "FlexVAR", report)
        if swaps:  # the bias is only skipped when the patched attention does not read it
            swaps.append(_Swap(model, "update_patch_related", lambda m: types.MethodType(_update_patch_related, m),
                               "update_patch_related"))
    if trainer is not None:
        swaps += _flexvar_trainer_swaps(trainer, report)
    return _apply(model, swaps, report, strict)


def patch_model(model, strict: bool = True, trainer=None) -> PatchReport:
    """Detect the family (VAR, FlexVAR / SAR's FlexVAR, or Infinity) and patch `model` in place.

    strict=True: anything that cannot be patched raises PatchError (nothing is patched);
    strict=False: patches what it can and lists the rest in the returned report.
    """
    family = _family(model)
    if family == "VAR":
        if trainer is not None:
            raise PatchError("trainer= is for FlexVAR / SAR trainers; VAR's trainer needs no patch "
                             "(its encode and inputs go through the patched VectorQuantizer2)")
        return patch_var(model, strict=strict)
    if family == "FlexVAR":
        return patch_flexvar(model, trainer=trainer, strict=strict)
    if "Infinity" in {c.__name__ for c in type(model).__mro__}:
        if trainer is not None:
            raise PatchError("trainer= is for FlexVAR / SAR trainers; Infinity's needs no patch")
        return patch_infinity(model, strict=strict)
    raise PatchError(f"sar_fast.patch supports VAR's VAR, FlexVAR's / SAR's FlexVAR and Infinity; got an unknown "
                     f"class {type(model).__module__}.{type(model).__name__}")


def _identity(x):
    return x


@contextlib.contextmanager
def hidden_states(model) -> Iterator[None]:
    """Inside the block the model's forward returns the hidden state its head would read
    ([..., C], after VAR's AdaLNBeforeHead) instead of logits, for
    sar_fast.nn.FusedLinearCrossEntropy(model.head). Only model.head's forward is swapped
    (per instance), and only for the duration of the block."""
    for attr in ("head", "get_logits"):
        if not hasattr(model, attr):
            raise PatchError(f"{type(model).__name__}.{attr} missing: hidden_states needs the model's "
                             f"classifier `head` called from `get_logits`")
    head = model.head
    if not isinstance(head, torch.nn.Linear):
        raise PatchError(f"{type(model).__name__}.head is {type(head).__name__}, not nn.Linear")
    old = head.__dict__.get("forward", _MISSING)
    object.__setattr__(head, "forward", _identity)
    try:
        yield
    finally:
        if old is _MISSING:
            object.__delattr__(head, "forward")
        else:
            object.__setattr__(head, "forward", old)
